//! Issue 17: nothing one stranger sends may stop a node. Hostile values
//! that become keys, and a message the store refuses outright, on both
//! engines (PostgreSQL refuses what sled takes).

use super::tests::src;
use super::*;
use crate::clock::ManualClock;
use crate::store::PgTls;
use std::path::Path;

/// An ingestor on the PostgreSQL database `url` (its node directory in
/// `dir`), or on sled in `dir` when `url` is None.
fn ingestor(dir: &Path, url: Option<&str>) -> Ingestor {
    let config = crate::testing::config(dir, "auto_reply_limit = 1000", "");
    let clock = Arc::new(ManualClock::new(
        DateTime::parse_from_rfc3339("2026-11-23T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    ));
    let store = match url {
        Some(url) => Store::open_postgres(url, PgTls::Plain, 2, &dir.join("node")),
        None => Store::open(&config.store.path),
    };
    let store = match store {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("{}", crate::error_chain(&e)),
    };
    Ingestor {
        store,
        config: crate::config::Live::new(config),
        clock,
        wake: Default::default(),
    }
}

fn bytes(raw: &[u8]) -> Item<'_> {
    Item::Bytes {
        raw,
        truncated: None,
    }
}

fn good(n: u32) -> Vec<u8> {
    format!("From: bob{n}@example.org\r\nSubject: help {n}\r\nMessage-ID: <good{n}@x>\r\n\r\nplease\r\n")
        .into_bytes()
}

/// Every header a sender controls that becomes part of a key, long.
fn long_keys(n: usize) -> Vec<u8> {
    let local = "a".repeat(n);
    let id = format!("{}@x", "i".repeat(n));
    format!(
        "From: {local}@example.org\r\nSubject: long\r\nMessage-ID: <{id}>\r\n\
         In-Reply-To: <{}@y>\r\nReferences: <{}@z>\r\n\r\nbody\r\n",
        "r".repeat(n),
        "q".repeat(n)
    )
    .into_bytes()
}

#[test]
fn r17_a_from_address_of_6000_characters_is_stored_and_its_chunk_goes_on() {
    // Input: a From of 6,000 characters made the whole PostgreSQL commit
    // fail (index row size exceeds the btree maximum); the daemon
    // stopped, and so did every node that took the mailbox over.
    let pg = crate::testing::Postgres::start();
    for url in [None, Some(pg.database("poison_from"))] {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), url.as_deref());
        let (a, poison, b) = (good(1), long_keys(6000), good(2));
        let out = ing
            .ingest_batch(&[
                (src(1, 1), bytes(&a)),
                (src(1, 2), bytes(&poison)),
                (src(1, 3), bytes(&b)),
            ])
            .unwrap_or_else(|e| panic!("{url:?}: {}", crate::error_chain(&e)));
        for o in &out {
            assert!(
                matches!(o, Outcome::Stored { new: true, .. }),
                "{url:?}: {out:?}"
            );
        }
        // The long values still work as keys: the same message again is a
        // duplicate, and the long sender's reply joins their case (the
        // parser already sets aside Message-IDs this long: by its tag).
        assert_eq!(
            ing.ingest(Some(&src(1, 2)), &poison, None).unwrap(),
            Outcome::AlreadyDone
        );
        assert_eq!(ing.ingest(None, &poison, None).unwrap(), Outcome::Duplicate);
        let reply = format!(
            "From: {}@example.org\r\nSubject: Re: [Case #2] long\r\nMessage-ID: <re@x>\r\n\r\nstill\r\n",
            "a".repeat(6000),
        );
        match ing
            .ingest(Some(&src(1, 5)), reply.as_bytes(), None)
            .unwrap()
        {
            Outcome::Stored {
                case: 2,
                new: false,
                ..
            } => {}
            o => panic!("{url:?}: {o:?}"),
        }
        let case = ing.store.case(2).unwrap().unwrap();
        let theirs = ing
            .store
            .transact(|tx| tx.customer_cases(&case.customer))
            .unwrap();
        assert_eq!(theirs, vec![2], "{url:?}");
    }
}

#[test]
fn r17_a_message_the_store_refuses_is_quarantined_and_the_rest_of_its_chunk_is_stored() {
    // Input: any value the database refuses (here a trigger refuses rows
    // holding a marker, as it would a value over one of its limits)
    // failed the chunk's commit, and the error stopped the daemon. Now
    // the chunk is tried message by message: the one at fault is
    // quarantined (without its bytes when the store refuses those too),
    // the others are stored, the cursor passes all of them.
    let pg = crate::testing::Postgres::start();
    let url = pg.database("poison_trigger");
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), Some(&url));
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF position('\\x582d506f69736f6e'::bytea IN NEW.value) > 0 THEN \
         RAISE EXCEPTION 'value refused' USING ERRCODE = '54000'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON escalator_kv \
         FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .unwrap();
    let poison =
        b"From: eve@example.org\r\nX-Poison: yes\r\nSubject: x\r\nMessage-ID: <p@x>\r\n\r\nb\r\n";
    let (a, b) = (good(1), good(2));
    let out = ing
        .ingest_batch(&[
            (src(1, 1), bytes(&a)),
            (src(1, 2), bytes(poison)),
            (src(1, 3), bytes(&b)),
        ])
        .unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
    assert!(
        matches!(out[0], Outcome::Stored { new: true, .. }),
        "{out:?}"
    );
    let Outcome::Quarantined { id } = out[1] else {
        panic!("{out:?}")
    };
    assert!(
        matches!(out[2], Outcome::Stored { new: true, .. }),
        "{out:?}"
    );
    let q = ing.store.quarantine_entry(id).unwrap().unwrap();
    assert!(q.error.contains("value refused"), "{}", q.error);
    assert!(
        q.unfetched,
        "its bytes were refused too: fetched again on retry"
    );
    assert_eq!((q.uid, q.folder.as_str()), (2, "INBOX"));
    assert_eq!(ing.store.cursor("INBOX").unwrap().unwrap().last_uid, 3);
    assert_eq!(ing.store.cases().count(), 2);
    // The database as a whole failing is not one message's fault: it is
    // reported, nothing is quarantined, the cursor stays.
    c.batch_execute(
        "DROP TRIGGER refuse_poison ON escalator_kv; ALTER TABLE escalator_kv RENAME TO gone",
    )
    .unwrap();
    let e = ing
        .ingest_batch(&[(src(1, 4), bytes(&good(4)))])
        .unwrap_err();
    assert!(!e.stops_a_watcher(), "{e}");
    c.batch_execute("ALTER TABLE gone RENAME TO escalator_kv")
        .unwrap();
    assert_eq!(ing.store.quarantined().count(), 1);
    assert_eq!(ing.store.cursor("INBOX").unwrap().unwrap().last_uid, 3);
}

fn original() -> Vec<u8> {
    b"From: alice@example.org\r\nSubject: printer on fire\r\nMessage-ID: <orig@alice>\r\n\r\nhelp\r\n"
        .to_vec()
}

fn reply_to_original(from: &str, id: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nSubject: Re: printer on fire\r\nMessage-ID: <{id}>\r\n\
         In-Reply-To: <orig@alice>\r\nReferences: <orig@alice>\r\n\r\nstill burning\r\n"
    )
    .into_bytes()
}

fn acks(ing: &Ingestor) -> usize {
    ing.store
        .outbox()
        .filter(|e| e.as_ref().is_ok_and(|e| e.kind == "ack"))
        .count()
}

#[test]
fn r17_a_reply_delivered_before_its_original_makes_one_case_and_one_ack() {
    // Input: mail is not delivered in the order it was sent. The reply
    // came first and opened a case; its original, second, opened another
    // one, and the customer got two acks for one matter.
    let pg = crate::testing::Postgres::start();
    for url in [None, Some(pg.database("reply_first"))] {
        // In two passes.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), url.as_deref());
        let reply = reply_to_original("alice@example.org", "re1@alice");
        let first = ing.ingest(Some(&src(1, 1)), &reply, None).unwrap();
        assert!(
            matches!(
                first,
                Outcome::Stored {
                    case: 1,
                    new: true,
                    ..
                }
            ),
            "{first:?}"
        );
        match ing.ingest(Some(&src(1, 2)), &original(), None).unwrap() {
            Outcome::Stored {
                case: 1,
                new: false,
                queued: 0,
            } => {}
            o => panic!("{url:?}: {o:?}"),
        }
        assert_eq!(ing.store.cases().count(), 1, "{url:?}");
        assert_eq!(acks(&ing), 1, "{url:?}");
        assert!(ing.store.history(1).unwrap().iter().any(|e| matches!(
            &e.what,
            EventKind::Message { via, .. } if via == "referred_by"
        )));
        // In one chunk, in either order.
        for order in [[0, 1], [1, 0]] {
            let dir = tempfile::tempdir().unwrap();
            let ing = ingestor(dir.path(), url.as_deref());
            let mails = [reply.clone(), original()];
            let items: Vec<_> = order
                .iter()
                .enumerate()
                .map(|(uid, &m)| (src(1, uid as u32 + 1), bytes(&mails[m])))
                .collect();
            let out = ing.ingest_batch(&items).unwrap();
            assert_eq!(ing.store.cases().count(), 1, "{url:?} {order:?}: {out:?}");
            assert_eq!(acks(&ing), 1, "{url:?} {order:?}");
        }
    }
}

#[test]
fn r17_a_stranger_citing_a_message_id_first_does_not_pull_the_original_into_his_case() {
    // Attack: mallory guesses or learns the Message-ID alice's mail will
    // carry and writes "in reply" to it before it arrives: her mail must
    // still open her own case, and his case learns nothing of it.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let bait = reply_to_original("mallory@evil.example", "bait@evil");
    ing.ingest(Some(&src(1, 1)), &bait, None).unwrap();
    match ing.ingest(Some(&src(1, 2)), &original(), None).unwrap() {
        Outcome::Stored {
            case: 2, new: true, ..
        } => {}
        o => panic!("{o:?}"),
    }
    let theirs = ing.store.case(1).unwrap().unwrap();
    assert_eq!(theirs.customer, "mallory@evil.example");
    assert_eq!(ing.store.case_messages(1).unwrap().len(), 1);
    // Alice's own reply, later, still finds her case.
    let hers = reply_to_original("alice@example.org", "re2@alice");
    match ing.ingest(Some(&src(1, 3)), &hers, None).unwrap() {
        Outcome::Stored {
            case: 2,
            new: false,
            ..
        } => {}
        o => panic!("{o:?}"),
    }
}
