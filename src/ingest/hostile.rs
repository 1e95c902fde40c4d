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
