//! Issue 17: nothing one stranger sends may stop a node. Hostile values
//! that become keys, and a message the store refuses outright, on both
//! engines (PostgreSQL refuses what sled takes).

use super::tests::src;
use super::*;
use crate::clock::ManualClock;
use crate::store::{PgTls, Store};
use std::path::Path;
use std::sync::Arc;

/// An ingestor on the PostgreSQL database `url` (its node directory in
/// `dir`), or on sled in `dir` when `url` is None.
pub(crate) fn ingestor(dir: &Path, url: Option<&str>) -> Ingestor {
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
    Ingestor::new(crate::handle::Handle {
        store,
        config: crate::config::Live::new(config),
        clock,
        wake: Default::default(),
    })
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
         CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON escalator.raw \
         FOR EACH ROW EXECUTE FUNCTION refuse_poison(); \
         CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON escalator.quarantine \
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
    assert_eq!(
        ing.store
            .cursor("default", "INBOX")
            .unwrap()
            .unwrap()
            .last_uid,
        3
    );
    assert_eq!(ing.store.cases().count(), 2);
    // The database as a whole failing is not one message's fault: it is
    // reported, nothing is quarantined, the cursor stays.
    c.batch_execute(
        "DROP TRIGGER refuse_poison ON escalator.raw; \
         DROP TRIGGER refuse_poison ON escalator.quarantine; \
         ALTER TABLE escalator.cursors RENAME TO gone",
    )
    .unwrap();
    let e = ing
        .ingest_batch(&[(src(1, 4), bytes(&good(4)))])
        .unwrap_err();
    assert!(!e.stops_a_watcher(), "{e}");
    c.batch_execute("ALTER TABLE escalator.gone RENAME TO cursors")
        .unwrap();
    assert_eq!(ing.store.quarantined().count(), 1);
    assert_eq!(
        ing.store
            .cursor("default", "INBOX")
            .unwrap()
            .unwrap()
            .last_uid,
        3
    );
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

#[test]
fn r17_each_queue_s_message_ids_carry_its_own_domain() {
    // Input: with `[cases] instance = "neutral"`, the queue of a second
    // brand sent Message-IDs @main-brand.test, which then stood in the
    // customer's In-Reply-To and References.
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[[mailboxes]]
name = "main"
address = "help@main-brand.test"
host = "127.0.0.1"
security = "plain"
username = "s"
password = "p"
[[mailboxes]]
name = "brand2"
address = "help@brand-two.test"
host = "127.0.0.1"
security = "plain"
username = "t"
password = "p"
folder = "Brand2"
[smtp]
host = "127.0.0.1"
security = "plain"
[store]
path = "{}"
[cases]
instance = "neutral"
[[tiers]]
name = "Frontline"
first_response = "4h"
"#,
        dir.path().join("store").display()
    );
    let config =
        crate::config::Config::parse(&text, Path::new("/x.toml")).unwrap_or_else(|e| panic!("{e}"));
    let ing = Ingestor::new(crate::handle::Handle {
        store: Arc::new(Store::open(&config.store.path).unwrap()),
        config: crate::config::Live::new(config),
        clock: Arc::new(ManualClock::new(Utc::now())),
        wake: Default::default(),
    });
    let at = |queue: &str, uid| Source {
        queue: queue.into(),
        folder: if queue == "main" { "INBOX" } else { "Brand2" }.into(),
        ..src(1, uid)
    };
    ing.ingest(Some(&at("brand2", 1)), &good(1), None).unwrap();
    ing.ingest(Some(&at("main", 1)), &good(2), None).unwrap();
    let ids: Vec<(u64, String)> = ing
        .store
        .outbox()
        .map(|e| e.map(|e| (e.case, e.message_id)).unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    for (case, id) in &ids {
        let want = if *case == 1 {
            "@brand-two.test"
        } else {
            "@main-brand.test"
        };
        assert!(id.ends_with(want), "case {case}: {id}");
        // Still ours: a reply naming it threads by its keyed local part.
        assert!(crate::thread::OwnId::verify(id, ing.store.key()).is_some());
    }
    // The customer's reply naming brand 2's ID joins its case.
    let reply = format!(
        "From: bob1@example.org\r\nSubject: Re: x\r\nMessage-ID: <r@x>\r\nIn-Reply-To: <{}>\r\n\r\nok\r\n",
        ids.iter().find(|(c, _)| *c == 1).unwrap().1
    );
    match ing
        .ingest(Some(&at("brand2", 2)), reply.as_bytes(), None)
        .unwrap()
    {
        Outcome::Stored {
            case: 1,
            new: false,
            ..
        } => {}
        o => panic!("{o:?}"),
    }
}

/// Hostile values for a header: long, with NULs, raw bytes that are not
/// UTF-8, encoded words hiding line breaks, address look-alikes.
fn hostile_values() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for len in [0usize, 255, 1024, 1025, 2_700, 10_000, 100_000] {
        out.push(format!("{}@example.org", "a".repeat(len)).into_bytes());
        out.push(format!("<{}@{}>", "i".repeat(len), "d".repeat(len / 2 + 1)).into_bytes());
    }
    out.push(b"x\0y@example.org".to_vec());
    out.push(b"<nul\0id@x>".to_vec());
    out.push(vec![0xff, 0xfe, b'@', 0x80, b'x']);
    out.push(b"=?utf-8?B?YUBiLm9yZw0KQmNjOiBldmlsQGV2aWwub3Jn?=".to_vec());
    out.push(format!("{}x@y", "@".repeat(5_000)).into_bytes());
    out.push(format!("\"{}\" <q@example.org>", "\\\"".repeat(20_000)).into_bytes());
    out
}

#[test]
fn r17_generated_hostile_headers_are_stored_or_quarantined_on_both_engines() {
    // Every header whose value becomes part of a key (or of a record
    // indexed by one), with each hostile value, into both engines: the
    // chunk commits, each message is stored or quarantined, nothing
    // stops the ingestor.
    const HEADERS: [&str; 8] = [
        "From",
        "Message-ID",
        "In-Reply-To",
        "References",
        "To",
        "Cc",
        "Reply-To",
        "Return-Path",
    ];
    let pg = crate::testing::Postgres::start();
    for url in [None, Some(pg.database("hostile_headers"))] {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), url.as_deref());
        let mut raws = Vec::new();
        for (h, header) in HEADERS.iter().enumerate() {
            for (v, value) in hostile_values().into_iter().enumerate() {
                let mut raw = Vec::new();
                if *header != "From" {
                    raw.extend_from_slice(b"From: someone@example.org\r\n");
                }
                if *header != "Message-ID" {
                    raw.extend_from_slice(format!("Message-ID: <h{h}v{v}@x>\r\n").as_bytes());
                }
                raw.extend_from_slice(header.as_bytes());
                raw.extend_from_slice(b": ");
                raw.extend_from_slice(&value);
                raw.extend_from_slice(b"\r\nSubject: hostile\r\n\r\nbody\r\n");
                raws.push(raw);
            }
        }
        for (n, chunk) in raws.chunks(16).enumerate() {
            let items: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, raw)| (src(1, (n * 16 + i + 1) as u32), bytes(raw)))
                .collect();
            let out = ing
                .ingest_batch(&items)
                .unwrap_or_else(|e| panic!("{url:?} chunk {n}: {}", crate::error_chain(&e)));
            for o in out {
                assert!(
                    matches!(
                        o,
                        Outcome::Stored { .. } | Outcome::Duplicate | Outcome::Quarantined { .. }
                    ),
                    "{url:?}: {o:?}"
                );
            }
        }
        let kept = ing.store.counts().unwrap().1 + ing.store.quarantined().count();
        assert!(kept > 0);
        assert_eq!(
            ing.store
                .cursor("default", "INBOX")
                .unwrap()
                .unwrap()
                .last_uid as usize,
            raws.len(),
            "{url:?}: the cursor passed every message"
        );
    }
}

#[test]
fn r17_a_stranger_who_cites_a_message_id_and_copies_its_author_still_pulls_nothing_in() {
    // Attack (review): mallory cites alice's coming Message-ID and puts
    // alice in Cc, which makes her a participant of his case; staff
    // belong to every case. Neither may pull the original into his case.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let bait = b"From: mallory@evil.example\r\nCc: alice@example.org, agent@example.test\r\n\
Subject: Re: printer on fire\r\nMessage-ID: <bait@evil>\r\nIn-Reply-To: <orig@alice>\r\n\
References: <orig@alice> <staff1@example.test>\r\n\r\nhi\r\n";
    ing.ingest(Some(&src(1, 1)), bait, None).unwrap();
    match ing.ingest(Some(&src(1, 2)), &original(), None).unwrap() {
        Outcome::Stored {
            case: 2, new: true, ..
        } => {}
        o => panic!("{o:?}"),
    }
    let staff = b"From: agent@example.test\r\nTo: bob@example.org\r\nSubject: note\r\n\
Message-ID: <staff1@example.test>\r\n\r\ninternal\r\n";
    match ing.ingest(Some(&src(1, 3)), staff, None).unwrap() {
        Outcome::Stored { case, .. } => assert_ne!(case, 1),
        o => panic!("{o:?}"),
    }
    assert_eq!(ing.store.case_messages(1).unwrap().len(), 1);
}
