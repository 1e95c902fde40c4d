//! Ingest's unit tests: threading, the cursor, quarantine, limits, over a sled store in a temp dir.

use super::*;
use crate::clock::ManualClock;
use crate::store::Store;
use std::path::Path;
use std::sync::Arc;

/// Ingests `raw` as `src` in `tx` with a planning step that panics,
/// as a bug would: through the same guard as every message, so the
/// tests need no hook inside the ingest code.
fn ingest_buggy(
    ing: &Ingestor,
    tx: &mut Tx<'_>,
    src: &Source,
    raw: &[u8],
) -> Result<Outcome, StoreError> {
    let now = ing.clock.now();
    ing.guarded(tx, Some(src), raw, now, &mut |_| {
        panic!("test-induced failure")
    })
}

fn ingest_buggy_alone(ing: &Ingestor, src: &Source, raw: &[u8]) -> Outcome {
    ing.store
        .transact(|tx| ingest_buggy(ing, tx, src, raw))
        .unwrap()
}

pub(crate) fn setup(dir: &Path) -> (Ingestor, Arc<ManualClock>) {
    setup_with(dir, "")
}

/// `cases` goes into `[cases]` (more keys, or `require_dkim_pass`).
fn setup_with(dir: &Path, cases: &str) -> (Ingestor, Arc<ManualClock>) {
    let cases = format!("auto_reply_limit = 2\nauto_reply_window = \"1h\"\n{cases}");
    let config = crate::testing::config(dir, &cases, "");
    let store = Store::open(&config.store.path).unwrap();
    setup_over(config, store)
}

/// An ingestor with `config` over `store` (PostgreSQL, say), on a clock
/// that moves only when told.
pub(crate) fn setup_over(config: Config, store: Store) -> (Ingestor, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(
        DateTime::parse_from_rfc3339("2026-11-23T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    ));
    let store = Arc::new(store);
    (
        Ingestor::new(crate::handle::Handle {
            store,
            config: crate::config::Live::new(config),
            clock: clock.clone(),
            wake: Default::default(),
        }),
        clock,
    )
}

fn mail(n: u32) -> Vec<u8> {
    format!(
        "From: alice@example.org\r\nSubject: topic {n}\r\nMessage-ID: <m{n}@x>\r\n\r\nbody {n}\r\n"
    )
    .into_bytes()
}

pub(crate) fn src(validity: u32, uid: u32) -> Source {
    Source {
        queue: "default".into(),
        folder: "INBOX".into(),
        uid_validity: validity,
        uid,
        sent: false,
        cursor: true,
    }
}

fn status(ing: &Ingestor, id: CaseId) -> crate::case::Status {
    ing.store.case(id).unwrap().unwrap().status
}

#[test]
fn a_staff_answer_in_the_inbox_stops_the_clock() {
    // Input: an agent answers the customer directly from their own
    // staff address with support in Cc (or one copy sits in both
    // INBOX and Sent): no reference to a forward, yet it answered the
    // customer. It stops the clock but is neither relayed nor obeyed.
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    ing.ingest(Some(&src(1, 1)), &mail(1), None).unwrap();
    assert_eq!(status(&ing, 1), crate::case::Status::Open);
    let answer = b"From: Agent <agent@example.test>\r\nTo: alice@example.org\r\n\
Cc: support@example.test\r\nSubject: Re: [Case #1] topic 1\r\nMessage-ID: <a1@x>\r\n\
In-Reply-To: <m1@x>\r\n\r\n#resolve\r\nFixed it.\r\n";
    match ing.ingest(Some(&src(1, 2)), answer, None).unwrap() {
        Outcome::Stored {
            case: 1,
            new: false,
            queued: 0,
        } => {}
        o => panic!("{o:?}"),
    }
    let case = ing.store.case(1).unwrap().unwrap();
    assert_eq!(case.status, crate::case::Status::Answered, "clock stopped");
    assert!(case.timer.is_none() && case.due_at.is_none());
    assert!(ing
        .store
        .history(1)
        .unwrap()
        .iter()
        .any(|e| matches!(e.what, EventKind::UnverifiedStaff { .. })));
    // The support address's own copy in the inbox counts the same.
    ing.ingest(
        Some(&src(1, 3)),
        b"From: alice@example.org\r\nSubject: Re: [Case #1] topic 1\r\nMessage-ID: <m3@x>\r\n\r\nstill broken\r\n",
        None,
    )
    .unwrap();
    assert_eq!(status(&ing, 1), crate::case::Status::Open);
    let own = b"From: Support <support@example.test>\r\nTo: alice@example.org\r\n\
Subject: Re: [Case #1] topic 1\r\nMessage-ID: <s1@x>\r\n\r\nTry again now.\r\n";
    ing.ingest(Some(&src(1, 4)), own, None).unwrap();
    assert_eq!(status(&ing, 1), crate::case::Status::Answered);
}

#[test]
fn with_dkim_required_an_unsigned_staff_answer_does_not_stop_the_clock() {
    // Attack: a forged staff From (no DKIM pass from our receiving
    // server) tries to pause a case's clock.
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup_with(
        dir.path(),
        "require_dkim_pass = true\nauthserv_id = \"mx.example.test\"",
    );
    ing.ingest(Some(&src(1, 1)), &mail(1), None).unwrap();
    let forged = b"From: agent@example.test\r\nSubject: Re: [Case #1] topic 1\r\n\
Message-ID: <f1@x>\r\nAuthentication-Results: mx.example.test; dkim=pass header.d=example.test\r\n\
\r\nok\r\n";
    // Received from outside: the forged result lies below it.
    let mut raw =
        b"Received: from evil.net by relay.evil.net; Mon, 1 Jan 2024 00:00:00 +0000\r\n".to_vec();
    raw.extend_from_slice(forged);
    ing.ingest(Some(&src(1, 2)), &raw, None).unwrap();
    assert_eq!(status(&ing, 1), crate::case::Status::Open);
    let signed = b"Authentication-Results: mx.example.test; dkim=pass header.d=example.test\r\n\
From: agent@example.test\r\nSubject: Re: [Case #1] topic 1\r\nMessage-ID: <g1@x>\r\n\r\nok\r\n";
    ing.ingest(Some(&src(1, 3)), signed, None).unwrap();
    assert_eq!(status(&ing, 1), crate::case::Status::Answered);
}

#[test]
fn automatic_mails_per_recipient_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let (ing, clock) = setup(dir.path());
    let mut queued = 0;
    for n in 1..=4 {
        if let Outcome::Stored {
            queued: q,
            new: true,
            ..
        } = ing.ingest(Some(&src(1, n)), &mail(n), None).unwrap()
        {
            queued += q;
        }
    }
    assert_eq!(queued, 2, "two acks within the hour, then silence");
    let case4 = ing.store.history(4).unwrap();
    assert!(case4.iter().any(|e| matches!(&e.what, EventKind::AckSuppressed { reason, .. } if reason.contains("automatic mails"))));
    clock.advance(chrono::Duration::minutes(61));
    match ing.ingest(Some(&src(1, 5)), &mail(5), None).unwrap() {
        Outcome::Stored { queued, .. } => assert_eq!(queued, 1, "the window moved on"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn plus_addressed_variants_share_one_auto_reply_limit() {
    // Attack: a flood from `a+1@x`, `a+2@x`, ... to get one answer
    // per variant out of the per-recipient cap.
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    let mut queued = 0;
    for n in 1..=6 {
        let raw = format!(
            "From: victim+{n}@example.org\r\nSubject: s{n}\r\nMessage-ID: <p{n}@x>\r\n\r\nb\r\n"
        );
        if let Outcome::Stored { queued: q, .. } =
            ing.ingest(Some(&src(1, n)), raw.as_bytes(), None).unwrap()
        {
            queued += q;
        }
    }
    assert_eq!(queued, 2, "auto_reply_limit = 2 for all variants together");
    assert_eq!(ing.store.cases().count(), 6, "every message stored");
}

#[test]
fn a_flood_from_many_senders_stops_at_the_global_limit() {
    // Attack: forged senders, each new, so the per-recipient cap never
    // bites; we would mail thousands of strangers (backscatter).
    let dir = tempfile::tempdir().unwrap();
    let (ing, clock) = setup_with(dir.path(), "auto_reply_global_limit = 3");
    let mut queued = 0;
    for n in 1..=8 {
        let raw = format!(
            "From: s{n}@example{n}.org\r\nSubject: s{n}\r\nMessage-ID: <g{n}@x>\r\n\r\nb\r\n"
        );
        if let Outcome::Stored { queued: q, .. } =
            ing.ingest(Some(&src(1, n)), raw.as_bytes(), None).unwrap()
        {
            queued += q;
        }
    }
    assert_eq!(queued, 3, "three acks within the hour, then none");
    assert_eq!(ing.store.cases().count(), 8, "every message stored");
    let held = ing.store.history(8).unwrap();
    assert!(held.iter().any(|e| matches!(
        &e.what,
        EventKind::AckSuppressed { limit: Some(l), reason }
            if l == "global" && reason.contains("auto_reply_global_limit")
    )));
    // A customer with an earlier case still gets their ack.
    let raw = b"From: s1@example1.org\r\nSubject: other\r\nMessage-ID: <known@x>\r\n\r\nb\r\n";
    match ing.ingest(Some(&src(1, 20)), raw, None).unwrap() {
        Outcome::Stored {
            new: true, queued, ..
        } => assert_eq!(queued, 1, "known sender"),
        o => panic!("{o:?}"),
    }
    clock.advance(chrono::Duration::minutes(61));
    let raw = b"From: late@example.org\r\nSubject: x\r\nMessage-ID: <late@x>\r\n\r\nb\r\n";
    match ing.ingest(Some(&src(1, 21)), raw, None).unwrap() {
        Outcome::Stored { queued, .. } => assert_eq!(queued, 1, "the hour moved on"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn a_batch_threads_within_itself_and_quarantines_only_the_failing_message() {
    // One transaction per fetched chunk: a reply fetched in the same
    // chunk as the message it answers must join its case, and one
    // message that fails must not take the others with it.
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    let first = mail(1);
    let reply = b"From: alice@example.org\r\nSubject: Re: topic 1\r\nMessage-ID: <r1@x>\r\n\
In-Reply-To: <m1@x>\r\n\r\nmore\r\n"
        .to_vec();
    let third = mail(3);
    let items = vec![
        (
            src(1, 1),
            Item::Bytes {
                raw: &first,
                truncated: None,
            },
        ),
        (
            src(1, 2),
            Item::Bytes {
                raw: &reply,
                truncated: None,
            },
        ),
        (src(1, 3), Item::Refused("NO cannot read")),
        (
            src(1, 4),
            Item::Bytes {
                raw: &third,
                truncated: None,
            },
        ),
    ];
    let out = ing.ingest_batch(&items).unwrap();
    assert_eq!(
        out[1],
        Outcome::Stored {
            case: 1,
            new: false,
            queued: 0
        },
        "the reply joined the case opened earlier in the batch"
    );
    assert!(matches!(out[2], Outcome::Quarantined { .. }));
    assert!(matches!(
        out[3],
        Outcome::Stored {
            case: 2,
            new: true,
            ..
        }
    ));
    assert_eq!(
        ing.store
            .cursor("default", "INBOX")
            .unwrap()
            .unwrap()
            .last_uid,
        4
    );
    // Again: every UID is behind the cursor now.
    let again = ing.ingest_batch(&items).unwrap();
    assert!(again.iter().all(|o| *o == Outcome::AlreadyDone));
    // A panic in the middle of a batch quarantines that message only.
    let fourth = mail(5);
    let sixth = mail(6);
    let out = ing
        .store
        .transact(|tx| {
            let sixth = Item::Bytes {
                raw: &sixth,
                truncated: None,
            };
            Ok::<_, StoreError>(vec![
                ingest_buggy(&ing, tx, &src(1, 5), &fourth)?,
                ing.ingest_one(tx, Some(&src(1, 6)), sixth, None)?,
            ])
        })
        .unwrap();
    assert!(matches!(out[0], Outcome::Quarantined { .. }), "{out:?}");
    assert!(
        matches!(out[1], Outcome::Stored { new: true, .. }),
        "{out:?}"
    );
    assert_eq!(ing.store.cases().count(), 3);
    assert_eq!(ing.store.quarantined().count(), 2);
}

#[test]
fn a_panic_quarantines_the_message_and_the_next_one_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    let out = ingest_buggy_alone(&ing, &src(1, 1), &mail(1));
    let Outcome::Quarantined { id } = out else {
        panic!("{out:?}")
    };
    assert!(matches!(
        ing.ingest(Some(&src(1, 2)), &mail(2), None).unwrap(),
        Outcome::Stored { .. }
    ));
    assert_eq!(
        ing.store
            .cursor("default", "INBOX")
            .unwrap()
            .unwrap()
            .last_uid,
        2
    );
    let q: Vec<_> = ing.store.quarantined().collect::<Result<_, _>>().unwrap();
    assert_eq!(q.len(), 1);
    assert!(
        q[0].error.contains("test-induced failure"),
        "{}",
        q[0].error
    );
    // Retry processes it for real and empties the quarantine.
    assert!(matches!(
        ing.retry_quarantined(id).unwrap(),
        Some(Outcome::Stored { new: true, .. })
    ));
    assert_eq!(ing.store.quarantined().count(), 0);
    assert_eq!(ing.store.cases().count(), 2);
}

#[test]
fn quarantine_retry_keeps_the_sent_folder() {
    // Input: an agent's mail from the Sent folder quarantined, then
    // retried: it was re-ingested as if from the INBOX and opened a
    // case whose customer was the support address.
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    let sent = Source {
        folder: "Sent".into(),
        sent: true,
        ..src(1, 1)
    };
    let agent = b"From: Support <support@example.test>\r\nTo: Bob <bob@example.org>\r\n\
Subject: About your order\r\nMessage-ID: <out1@x>\r\n\r\nYour order shipped.\r\n";
    let Outcome::Quarantined { id } = ingest_buggy_alone(&ing, &sent, agent) else {
        panic!("not quarantined")
    };
    let q = ing.store.quarantine_entry(id).unwrap().unwrap();
    assert_eq!((q.folder.as_str(), q.sent), ("Sent", true));
    assert!(matches!(
        ing.retry_quarantined(id).unwrap(),
        Some(Outcome::Stored { new: true, .. })
    ));
    let case = ing.store.case(1).unwrap().unwrap();
    assert_eq!(case.customer, "bob@example.org", "the agent wrote to bob");
    assert_eq!(case.status, crate::case::Status::Answered);
    let record = ing
        .store
        .message(ing.store.case_messages(1).unwrap()[0])
        .unwrap()
        .unwrap();
    assert_eq!(record.folder, "Sent");
}

#[test]
fn refetching_after_uidvalidity_change_stores_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    for n in 1..=3 {
        ing.ingest(Some(&src(7, n)), &mail(n), None).unwrap();
    }
    // Same UID again under the same validity: skipped by the cursor.
    assert_eq!(
        ing.ingest(Some(&src(7, 2)), &mail(2), None).unwrap(),
        Outcome::AlreadyDone
    );
    // New validity, new UIDs, same messages: duplicates by content.
    for n in 1..=3 {
        assert_eq!(
            ing.ingest(Some(&src(8, n + 10)), &mail(n), None).unwrap(),
            Outcome::Duplicate
        );
    }
    assert_eq!(
        ing.store.cursor("default", "INBOX").unwrap().unwrap(),
        Cursor {
            uid_validity: 8,
            last_uid: 13
        }
    );
    // A different message that reuses a Message-ID is kept.
    let other = String::from_utf8(mail(1))
        .unwrap()
        .replace("body 1", "other body");
    assert!(matches!(
        ing.ingest(Some(&src(8, 14)), other.as_bytes(), None)
            .unwrap(),
        Outcome::Stored { .. }
    ));
    assert_eq!(ing.store.counts().unwrap().1, 4);
}

#[test]
fn unreadable_sender_gets_an_unassigned_case_without_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    for (n, raw) in [
        &b""[..],
        b"Subject: no sender\r\n\r\nhi\r\n",
        b"\x00\xff garbage",
    ]
    .iter()
    .enumerate()
    {
        let out = ing.ingest(Some(&src(1, n as u32 + 1)), raw, None).unwrap();
        assert!(
            matches!(
                out,
                Outcome::Stored {
                    new: true,
                    queued: 0,
                    ..
                }
            ),
            "{out:?}"
        );
    }
    for c in ing.store.cases() {
        assert_eq!(c.unwrap().customer, "");
    }
}

/// A case whose first mail said nothing of its language ("ok") falls
/// back to the default, and chooses again from the next customer mail; a
/// language the customer's mail chose stays with the case.
#[test]
fn a_fallen_back_language_is_chosen_again_and_a_chosen_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (ing, _) = setup(dir.path());
    let msg = |n: u32, reply: bool, body: &str| {
        let irt = if reply { "In-Reply-To: <l1@x>\r\n" } else { "" };
        format!("From: claire@example.org\r\nSubject: Connexion\r\nMessage-ID: <l{n}@x>\r\n{irt}\r\n{body}\r\n")
            .into_bytes()
    };
    let lang = |ing: &Ingestor| {
        let c = ing.store.case(1).unwrap().unwrap();
        (
            c.language.unwrap_or_default(),
            c.language_source.unwrap_or_default(),
        )
    };
    ing.ingest(None, &msg(1, false, "ok"), None).unwrap();
    assert_eq!(lang(&ing), ("en".to_string(), "default".to_string()));
    let french = "Bonjour, depuis la mise à jour de ce matin, je ne peux plus me connecter \
                  à mon compte. Pourriez-vous vérifier ce qui se passe ?";
    ing.ingest(None, &msg(2, true, french), None).unwrap();
    assert_eq!(lang(&ing), ("fr".to_string(), "detected".to_string()));
    let english = "Hello again, I still cannot log in to my account since the update \
                   this morning, could you please have a look at it?";
    ing.ingest(None, &msg(3, true, english), None).unwrap();
    assert_eq!(lang(&ing), ("fr".to_string(), "detected".to_string()));
}
