//! Issue 18, item 5: a bounce opens no case; it is recorded on the case
//! of the mail it reports on, once. Then the abuse cases: a report is
//! mail anyone can forge, so each attack below must change nothing that
//! is not the forger's own.

use super::hostile::ingestor;
use super::tests::src;
use super::*;
use crate::case::Status;
use crate::effects::{Effects, EffectsError};

/// A customer's first mail: case 1 and its ack, outbox entry 1.
const CUSTOMER: &[u8] = b"From: Alice <alice@example.org>\r\nTo: support@example.test\r\n\
Subject: Printer on fire\r\nMessage-ID: <m1@example.org>\r\n\r\nIt burns.\r\n";

/// A Postfix-style report on `id` for `recipient`, with `action`.
fn dsn(n: u32, id: &str, recipient: &str, action: &str) -> Vec<u8> {
    let status = if action == "delayed" {
        "4.4.1"
    } else {
        "5.1.1"
    };
    format!(
        "Return-Path: <>\r\nFrom: MAILER-DAEMON@mx.example.test (Mail Delivery System)\r\n\
To: support@example.test\r\nSubject: Undelivered Mail Returned to Sender\r\n\
Message-ID: <dsn{n}@mx.example.test>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
--b\r\nContent-Type: text/plain\r\n\r\n<{recipient}>: mailbox unknown\r\n\
--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.test\r\n\r\n\
Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n\
Diagnostic-Code: smtp; 550 {status} mailbox unknown\r\n\r\n\
--b\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: support@example.test\r\n\
To: {recipient}\r\nMessage-ID: <{id}>\r\n\r\n--b--\r\n"
    )
    .into_bytes()
}

/// Case 1 with its ack (entry 1) sent; returns the ack's Message-ID.
fn acked(ing: &Ingestor) -> String {
    ing.ingest(Some(&src(1, 1)), CUSTOMER, None).unwrap();
    let now = ing.clock.now();
    ing.store
        .transact(|tx| {
            let mut e = tx.outbox_entry(1)?.unwrap();
            crate::outbox::journal::mark_sent(tx, &mut e, now)
        })
        .unwrap();
    let ack = ing.store.outbox_entry(1).unwrap().unwrap();
    assert_eq!(
        (ack.kind.as_str(), ack.to.as_slice()),
        ("ack", &["alice@example.org".to_string()][..])
    );
    ack.message_id
}

fn bounced_events(ing: &Ingestor, case: CaseId) -> Vec<EventKind> {
    ing.store
        .history(case)
        .unwrap()
        .into_iter()
        .map(|e| e.what)
        .filter(|w| {
            matches!(
                w,
                EventKind::Bounced { .. } | EventKind::DeliveryDelayed { .. }
            )
        })
        .collect()
}

fn state(ing: &Ingestor, id: u64) -> OutboxState {
    ing.store.outbox_entry(id).unwrap().unwrap().state
}

fn last_message(ing: &Ingestor, case: CaseId) -> crate::record::MessageRecord {
    let seqs = ing.store.case_messages(case).unwrap();
    ing.store.message(*seqs.last().unwrap()).unwrap().unwrap()
}

#[test]
fn r18_a_bounced_ack_opens_no_case_and_is_recorded_on_its_case_on_both_engines() {
    let pg = crate::testing::Postgres::start();
    for url in [None, Some(pg.database("bounce_ack"))] {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), url.as_deref());
        let ack = acked(&ing);
        let before = ing.store.case(1).unwrap().unwrap();
        let out = ing
            .ingest(
                Some(&src(1, 2)),
                &dsn(1, &ack, "alice@example.org", "failed"),
                None,
            )
            .unwrap();
        assert_eq!(out, Outcome::Bounce { case: Some(1) });
        assert_eq!(ing.store.cases().count(), 1, "no case for MAILER-DAEMON");
        assert_eq!(ing.store.quarantined().count(), 0);
        let events = bounced_events(&ing, 1);
        match &events[..] {
            [EventKind::Bounced {
                outbox_id: 1,
                mail,
                recipient,
                status,
                diagnostic: Some(d),
                message_id,
            }] => {
                assert_eq!(
                    (mail.as_str(), recipient.as_str()),
                    ("ack", "alice@example.org")
                );
                assert_eq!(status, "5.1.1");
                assert!(d.contains("mailbox unknown"), "{d}");
                assert_eq!(message_id, "dsn1@mx.example.test");
            }
            other => panic!("{other:?}"),
        }
        let entry = ing.store.outbox_entry(1).unwrap().unwrap();
        assert_eq!(entry.state, OutboxState::Bounced);
        assert!(entry
            .last_error
            .unwrap()
            .contains("alice@example.org 5.1.1"));
        // The report is kept among the case's messages, as robot mail;
        // the case itself is as it was (no customer writing, no clock).
        let after = ing.store.case(1).unwrap().unwrap();
        assert_eq!(after.message_count, before.message_count + 1);
        assert_eq!((after.status, after.due_at), (before.status, before.due_at));
        assert_eq!(after.last_message_id, before.last_message_id);
        let kept = ing
            .store
            .message(ing.store.case_messages(1).unwrap()[1])
            .unwrap()
            .unwrap();
        assert_eq!(kept.suppressed.as_deref(), Some("delivery report (bounce)"));
        assert_eq!(
            ing.store
                .cursor("default", "INBOX")
                .unwrap()
                .unwrap()
                .last_uid,
            2
        );
        // The KPIs count it.
        let report = crate::admin::stats_report(&ing, None, ing.clock.now()).unwrap();
        assert_eq!(
            (report.overall.bounces, report.overall.bounced_cases),
            (1, 1)
        );
        assert!(report.text().contains("1 (1)"), "{}", report.text());
        // `cases show` lists it, in text and JSON.
        use crate::admin::{handle, Request};
        let show = |json| {
            handle(&ing, &Request::CaseShow { id: 1, json })
                .unwrap()
                .output
        };
        let v: serde_json::Value = serde_json::from_str(&show(true)).unwrap();
        assert_eq!(v["bounces"][0]["recipient"], "alice@example.org");
        assert_eq!(v["bounces"][0]["mail"], "ack");
        assert_eq!(v["bounces"][0]["status"], "5.1.1");
        let text = show(false);
        assert!(text.contains("Bounces (1):"), "{text}");
        assert!(text.contains("ack to alice@example.org: 5.1.1"), "{text}");
    }
}

#[test]
fn r18_the_same_report_twice_is_recorded_once() {
    // A restart (the cursor not yet past it), a second copy under a new
    // UIDVALIDITY, or a retry from quarantine: one event, one message.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let ack = acked(&ing);
    let raw = dsn(1, &ack, "alice@example.org", "failed");
    let mut again = b"Received: from relay by mx; Mon, 1 Jan 2024 00:00:00 +0000\r\n".to_vec();
    again.extend_from_slice(&raw);
    assert_eq!(
        ing.ingest(Some(&src(1, 2)), &raw, None).unwrap(),
        Outcome::Bounce { case: Some(1) }
    );
    assert_eq!(
        ing.ingest(Some(&src(1, 2)), &raw, None).unwrap(),
        Outcome::AlreadyDone
    );
    assert_eq!(
        ing.ingest(Some(&src(2, 9)), &again, None).unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(ing.ingest(None, &raw, None).unwrap(), Outcome::Duplicate);
    assert_eq!(bounced_events(&ing, 1).len(), 1);
    assert_eq!(ing.store.case_messages(1).unwrap().len(), 2);
}

#[test]
fn r18_a_bounce_before_the_sent_mark_leaves_the_entry_bounced() {
    // Input: the server accepted the ack and bounced it at once; the
    // report came in before the outbox committed its sent mark. The mark
    // must not turn `bounced` back into `sent`.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    ing.ingest(Some(&src(1, 1)), CUSTOMER, None).unwrap();
    let mut entry = ing.store.outbox_entry(1).unwrap().unwrap();
    assert!(entry.state.is_pending());
    let raw = dsn(1, &entry.message_id, "alice@example.org", "failed");
    ing.ingest(Some(&src(1, 2)), &raw, None).unwrap();
    assert_eq!(state(&ing, 1), OutboxState::Bounced);
    assert!(
        ing.store.outbox_pending().unwrap().is_empty(),
        "never sent again"
    );
    let now = ing.clock.now();
    ing.store
        .transact(|tx| crate::outbox::journal::mark_sent(tx, &mut entry, now))
        .unwrap();
    assert_eq!(state(&ing, 1), OutboxState::Bounced);
    let sent = ing.store.history(1).unwrap();
    let sent = sent
        .iter()
        .filter(|e| matches!(e.what, EventKind::MailSent { .. }));
    assert_eq!(sent.count(), 1, "marked sent once, by the bounce");
}

#[test]
fn r18_a_delay_warning_is_recorded_but_is_no_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let ack = acked(&ing);
    let out = ing
        .ingest(
            Some(&src(1, 2)),
            &dsn(1, &ack, "alice@example.org", "delayed"),
            None,
        )
        .unwrap();
    assert_eq!(out, Outcome::Bounce { case: Some(1) });
    assert!(
        matches!(&bounced_events(&ing, 1)[..], [EventKind::DeliveryDelayed { status, .. }] if status == "4.4.1")
    );
    assert_eq!(state(&ing, 1), OutboxState::Sent);
    let report = crate::admin::stats_report(&ing, None, ing.clock.now()).unwrap();
    assert_eq!(report.overall.bounces, 0);
}

#[test]
fn r18_backscatter_opens_no_case_and_is_counted_not_stored() {
    // Spam forged with the support address bounces back to us: the
    // reports quote IDs we never made. A flood must cost one log line
    // and one counter each, and every one moves the cursor on.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let before = crate::metrics::METRICS
        .bounces
        .get(&[("mail", "unmatched")]);
    for n in 1..=50 {
        let raw = dsn(
            n,
            &format!("spam{n}@spammer.example"),
            "victim@example.org",
            "failed",
        );
        assert_eq!(
            ing.ingest(Some(&src(1, n)), &raw, None).unwrap(),
            Outcome::Bounce { case: None }
        );
    }
    assert_eq!(ing.store.cases().count(), 0);
    assert_eq!(ing.store.quarantined().count(), 0);
    assert_eq!(ing.store.counts().unwrap().1, 0, "no message stored");
    assert_eq!(
        ing.store
            .cursor("default", "INBOX")
            .unwrap()
            .unwrap()
            .last_uid,
        50
    );
    // Other tests count too: at least ours.
    assert!(
        crate::metrics::METRICS
            .bounces
            .get(&[("mail", "unmatched")])
            >= before + 50
    );
}

#[test]
fn r18_a_free_text_bounce_quoting_our_headers_is_matched() {
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let ack = acked(&ing);
    let raw = format!(
        "Return-path: <>\r\nFrom: Mail Delivery System <Mailer-Daemon@mail.example.org>\r\n\
X-Failed-Recipients: alice@example.org\r\nSubject: Mail delivery failed: returning message to sender\r\n\
Message-Id: <E1x@mail.example.org>\r\n\r\n\
The following address(es) failed:\r\n\r\n  alice@example.org\r\n    550 5.2.1 mailbox disabled\r\n\r\n\
------ This is a copy of the message, including all the headers. ------\r\n\r\n\
From: support@example.test\r\nTo: alice@example.org\r\nMessage-ID: <{ack}>\r\n\r\nWe have it.\r\n"
    );
    assert_eq!(
        ing.ingest(Some(&src(1, 2)), raw.as_bytes(), None).unwrap(),
        Outcome::Bounce { case: Some(1) }
    );
    assert!(
        matches!(&bounced_events(&ing, 1)[..], [EventKind::Bounced { status, .. }] if status == "5.2.1")
    );
}

#[test]
fn r18_a_bounced_digest_marks_its_entry_once() {
    // The review digest belongs to no case: its entry is all there is to
    // mark (and the log names the address).
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let config = ing.config.get();
    let now = ing.clock.now();
    let id = ing
        .store
        .transact(|tx| {
            let mut fx = Effects::new(&config, now);
            let id = fx.digest(tx, vec!["boss@example.org".into()], &digest_text())?;
            let mut e = tx.outbox_entry(id)?.unwrap();
            crate::outbox::journal::mark_sent(tx, &mut e, now)?;
            Ok::<_, EffectsError>(id)
        })
        .unwrap();
    let digest = ing.store.outbox_entry(id).unwrap().unwrap().message_id;
    let raw = dsn(1, &digest, "boss@example.org", "failed");
    assert_eq!(
        ing.ingest(Some(&src(1, 1)), &raw, None).unwrap(),
        Outcome::Bounce { case: None }
    );
    assert_eq!(state(&ing, id), OutboxState::Bounced);
    assert_eq!(ing.ingest(None, &raw, None).unwrap(), Outcome::Duplicate);
    assert_eq!(ing.store.cases().count(), 0);
}

/// A helpdesk writing from `postmaster@` (issue 18 review, B1).
const POSTMASTER: &[u8] = b"Return-Path: <postmaster@customer.example>\r\n\
From: Customer Helpdesk <postmaster@customer.example>\r\nTo: support@example.test\r\n\
Subject: Returned mail from your server\r\nMessage-ID: <pm1@customer.example>\r\n\r\n\
Hello, mail from your server to postmaster@customer.example comes back to us\r\n\
with 550 5.1.1 user unknown. Could you look into it?\r\n";

#[test]
fn b1_a_person_writing_from_postmaster_with_a_bounce_subject_opens_a_case() {
    // Before: read as a free-text bounce, matched nothing, dropped with a
    // warning, the cursor moved past it: the mail was lost.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let out = ing.ingest(Some(&src(1, 1)), POSTMASTER, None).unwrap();
    assert!(
        matches!(
            out,
            Outcome::Stored {
                case: 1,
                new: true,
                ..
            }
        ),
        "{out:?}"
    );
    let case = ing.store.case(1).unwrap().unwrap();
    assert_eq!(case.customer, "postmaster@customer.example");
    assert_eq!(last_message(&ing, 1).message_id, "pm1@customer.example");
    // Sent through a system that uses the null reverse path: still a
    // case (threaded as before bounces were read), only not answered.
    let raw = String::from_utf8(POSTMASTER.to_vec())
        .unwrap()
        .replace(
            "Return-Path: <postmaster@customer.example>",
            "Return-Path: <>",
        )
        .replace("pm1@", "pm2@");
    let out = ing.ingest(Some(&src(1, 2)), raw.as_bytes(), None).unwrap();
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
    assert_eq!(ing.store.cases().count(), 2);
}

#[test]
fn b1_a_postmaster_s_reply_to_the_ack_is_a_reply_not_a_bounce() {
    // The customer wrote with her helpdesk in Cc; the helpdesk answers
    // our ack to her (postmaster@ gets no ack itself): its In-Reply-To is
    // the ack's ID, its subject repeats hers, its text names her address
    // (the ack's recipient). Before: a "bounce" of the ack, and staff
    // never saw it.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let first = String::from_utf8(POSTMASTER.to_vec())
        .unwrap()
        .replace("postmaster@", "alice@")
        .replace("Customer Helpdesk", "Alice")
        .replace(
            "To: support@example.test\r\n",
            "To: support@example.test\r\nCc: postmaster@customer.example\r\n",
        );
    ing.ingest(Some(&src(1, 1)), first.as_bytes(), None)
        .unwrap();
    let now = ing.clock.now();
    ing.store
        .transact(|tx| {
            let mut e = tx.outbox_entry(1)?.unwrap();
            crate::outbox::journal::mark_sent(tx, &mut e, now)
        })
        .unwrap();
    let ack = ing.store.outbox_entry(1).unwrap().unwrap();
    assert!(ack.to.contains(&"alice@customer.example".to_string()));
    let reply = format!(
        "Return-Path: <postmaster@customer.example>\r\n\
From: postmaster@customer.example\r\nTo: support@example.test\r\n\
Subject: Re: [Case #1] Returned mail from your server\r\n\
In-Reply-To: <{id}>\r\nReferences: <pm1@customer.example> <{id}>\r\n\
Message-ID: <pm3@customer.example>\r\n\r\n\
Still undeliverable: alice@customer.example gets 550 5.1.1 from you.\r\n",
        id = ack.message_id
    );
    let out = ing
        .ingest(Some(&src(1, 2)), reply.as_bytes(), None)
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Stored {
                case: 1,
                new: false,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(state(&ing, 1), OutboxState::Sent);
    assert!(bounced_events(&ing, 1).is_empty());
    assert_eq!(last_message(&ing, 1).message_id, "pm3@customer.example");
}

#[test]
fn b1_a_vacation_reply_with_a_null_return_path_and_a_trigger_subject_is_no_bounce() {
    // The customer's own subject holds a trigger phrase; the ack repeats
    // it, the vacation notice (sent with `<>`) too, refers to the ack in
    // In-Reply-To and names the customer's address.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let first = String::from_utf8(CUSTOMER.to_vec())
        .unwrap()
        .replace("Printer on fire", "Undeliverable parcel");
    ing.ingest(Some(&src(1, 1)), first.as_bytes(), None)
        .unwrap();
    let now = ing.clock.now();
    ing.store
        .transact(|tx| {
            let mut e = tx.outbox_entry(1)?.unwrap();
            crate::outbox::journal::mark_sent(tx, &mut e, now)
        })
        .unwrap();
    let ack = ing.store.outbox_entry(1).unwrap().unwrap().message_id;
    let vacation = format!(
        "Return-Path: <>\r\nFrom: Alice <alice@example.org>\r\nTo: support@example.test\r\n\
Subject: Out of office: Re: [Case #1] Undeliverable parcel\r\nAuto-Submitted: auto-replied\r\n\
In-Reply-To: <{ack}>\r\nMessage-ID: <vac1@example.org>\r\n\r\n\
I am away until Monday. Mail to alice@example.org is read then.\r\n"
    );
    let out = ing
        .ingest(Some(&src(1, 2)), vacation.as_bytes(), None)
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Stored {
                case: 1,
                new: false,
                queued: 0
            }
        ),
        "{out:?}"
    );
    assert_eq!(state(&ing, 1), OutboxState::Sent);
    assert!(bounced_events(&ing, 1).is_empty());
}

#[test]
fn b1_a_forged_null_return_path_below_the_real_one_does_not_count() {
    // The delivering server prepends the real Return-Path; the sender's
    // own `Return-Path: <>` further down used to win, making a bounce of
    // what quotes our ack and names its recipient.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let ack = acked(&ing);
    let raw = format!(
        "Return-Path: <alice@example.org>\r\n\
Received: from mx.example.org by mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
Return-Path: <>\r\nFrom: Alice <alice@example.org>\r\n\
Subject: Mail delivery failed\r\nX-Failed-Recipients: alice@example.org\r\n\
Message-ID: <m2@example.org>\r\n\r\nalice@example.org: 550 5.1.1\r\n\r\n\
Message-ID: <{ack}>\r\n"
    );
    let out = ing.ingest(Some(&src(1, 2)), raw.as_bytes(), None).unwrap();
    assert!(matches!(out, Outcome::Stored { .. }), "{out:?}");
    assert_eq!(state(&ing, 1), OutboxState::Sent);
    assert!(bounced_events(&ing, 1).is_empty());
    // As the first field, the same `<>` makes it a report of the ack.
    let raw = raw
        .replace("Return-Path: <alice@example.org>\r\n", "")
        .replace("m2@", "m3@");
    let out = ing.ingest(Some(&src(1, 3)), raw.as_bytes(), None).unwrap();
    assert_eq!(out, Outcome::Bounce { case: Some(1) });
    assert_eq!(state(&ing, 1), OutboxState::Bounced);
}

/// Everything logged on this thread while `f` runs.
fn logged(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    #[derive(Clone)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf(Arc::default());
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let out = buf.0.lock().unwrap().clone();
    String::from_utf8(out).unwrap()
}

#[test]
fn b6_a_digest_bounced_by_a_second_address_logs_that_one_too() {
    // The digest (no case) went to two addresses; each one's server
    // reports apart. The second report must name its address in the
    // log (an error: the address is staff's) though the entry is
    // bounced already; the same report again is a duplicate.
    let dir = tempfile::tempdir().unwrap();
    let ing = ingestor(dir.path(), None);
    let config = ing.config.get();
    let now = ing.clock.now();
    let to = vec!["boss@example.org".into(), "chief@example.org".into()];
    let id = ing
        .store
        .transact(|tx| {
            let mut fx = Effects::new(&config, now);
            let id = fx.digest(tx, to, &digest_text())?;
            let mut e = tx.outbox_entry(id)?.unwrap();
            crate::outbox::journal::mark_sent(tx, &mut e, now)?;
            Ok::<_, EffectsError>(id)
        })
        .unwrap();
    let digest = ing.store.outbox_entry(id).unwrap().unwrap().message_id;
    let first = dsn(1, &digest, "boss@example.org", "failed");
    let second = dsn(2, &digest, "chief@example.org", "failed");
    let log = logged(|| {
        let out = ing.ingest(Some(&src(1, 1)), &first, None).unwrap();
        assert_eq!(out, Outcome::Bounce { case: None });
    });
    assert!(
        log.contains("ERROR") && log.contains("boss@example.org"),
        "{log}"
    );
    let log = logged(|| {
        let out = ing.ingest(Some(&src(1, 2)), &second, None).unwrap();
        assert_eq!(out, Outcome::Bounce { case: None });
    });
    assert!(
        log.contains("ERROR") && log.contains("chief@example.org"),
        "{log}"
    );
    assert!(!log.contains("boss@example.org"), "logged once: {log}");
    let entry = ing.store.outbox_entry(id).unwrap().unwrap();
    assert_eq!(entry.state, OutboxState::Bounced);
    let error = entry.last_error.unwrap();
    assert!(
        error.contains("bounced: boss@example.org 5.1.1")
            && error.contains("bounced: chief@example.org 5.1.1"),
        "{error}"
    );
    for (uid, raw) in [(3, &first), (4, &second)] {
        let log = logged(|| {
            let out = ing.ingest(Some(&src(1, uid)), raw, None).unwrap();
            assert_eq!(out, Outcome::Duplicate);
        });
        assert!(!log.contains("bounced"), "{log}");
    }
}

/// Abuse cases: what a forged report must not do.
mod abuse {
    use super::*;

    #[test]
    fn a_guessed_id_for_another_case_matches_nothing() {
        // Attack: "c1.a1.<anything>@example.test" names case 1 and its
        // ack; without our key the hash is wrong.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        let ack = acked(&ing);
        let (local, domain) = ack.split_once('@').unwrap();
        let (body, _mac) = local.rsplit_once('.').unwrap();
        let forged = format!("{body}.000000000000@{domain}");
        let out = ing
            .ingest(
                Some(&src(1, 2)),
                &dsn(1, &forged, "alice@example.org", "failed"),
                None,
            )
            .unwrap();
        assert_eq!(out, Outcome::Bounce { case: None });
        assert!(bounced_events(&ing, 1).is_empty());
        assert_eq!(state(&ing, 1), OutboxState::Sent);
    }

    #[test]
    fn a_real_id_with_another_recipient_marks_nothing() {
        // Attack: mallory saw alice's ack (a forward of it, a shared
        // inbox) and reports it bounced for herself: alice's mail must
        // stay delivered, and her case untouched.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        let ack = acked(&ing);
        let out = ing
            .ingest(
                Some(&src(1, 2)),
                &dsn(1, &ack, "mallory@evil.example", "failed"),
                None,
            )
            .unwrap();
        assert_eq!(out, Outcome::Bounce { case: None });
        assert!(bounced_events(&ing, 1).is_empty());
        assert_eq!(state(&ing, 1), OutboxState::Sent);
        assert_eq!(
            ing.store.case_messages(1).unwrap().len(),
            1,
            "nothing joined the case"
        );
    }

    #[test]
    fn a_report_never_joins_or_opens_a_case_through_its_own_headers() {
        // Attack: a standard report carrying the case's subject tag and an
        // In-Reply-To to the customer's mail, to be threaded into the
        // case (and forwarded to staff) like a customer's message. It
        // quotes no mail of ours: dropped as backscatter.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        acked(&ing);
        let raw = String::from_utf8(dsn(1, "f0@evil.example", "victim@evil.example", "failed"))
            .unwrap()
            .replace(
                "Subject: Undelivered Mail Returned to Sender\r\n",
                "Subject: Undeliverable: [Case #1] Printer on fire\r\n\
In-Reply-To: <m1@example.org>\r\nReferences: <m1@example.org>\r\n",
            );
        let out = ing.ingest(Some(&src(1, 2)), raw.as_bytes(), None).unwrap();
        assert_eq!(out, Outcome::Bounce { case: None });
        assert_eq!(ing.store.case_messages(1).unwrap().len(), 1);
        assert_eq!(ing.store.cases().count(), 1);
    }

    #[test]
    fn a_free_text_report_matching_nothing_is_only_mail() {
        // The free-text form cannot tell a bounce from a person's mail,
        // so one that matches nothing is threaded as any mail with those
        // headers would be: no more (no role, no answer) and no less.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        acked(&ing);
        let raw = b"Return-Path: <>\r\nFrom: MAILER-DAEMON@evil.example\r\n\
Subject: Undeliverable: [Case #1] Printer on fire\r\n\
In-Reply-To: <m1@example.org>\r\nReferences: <m1@example.org>\r\nMessage-ID: <f1@evil.example>\r\n\r\n\
Please call +1 555 0100 to fix your account.\r\n";
        let out = ing.ingest(Some(&src(1, 2)), raw, None).unwrap();
        let Outcome::Stored {
            case, queued: 0, ..
        } = out
        else {
            panic!("{out:?}");
        };
        let kept = last_message(&ing, case);
        assert_eq!(kept.message_id, "f1@evil.example");
        assert_eq!(kept.suppressed.as_deref(), Some("delivery report (bounce)"));
        assert_eq!(state(&ing, 1), OutboxState::Sent);
        assert!(bounced_events(&ing, 1).is_empty());
        assert_eq!(ing.store.outbox_pending().unwrap().len(), 0, "no answer");
    }

    #[test]
    fn a_report_from_a_staff_address_is_no_staff_answer() {
        // Attack: a multipart/report "from" the tier's staff address that
        // quotes the case's ack: it must not stop the clock or resolve.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        let ack = acked(&ing);
        let raw = String::from_utf8(dsn(1, &ack, "alice@example.org", "failed"))
            .unwrap()
            .replace(
                "From: MAILER-DAEMON@mx.example.test (Mail Delivery System)",
                "From: agent@example.test",
            )
            .replace("<alice@example.org>: mailbox unknown", "#resolve");
        ing.ingest(Some(&src(1, 2)), raw.as_bytes(), None).unwrap();
        let case = ing.store.case(1).unwrap().unwrap();
        assert_eq!(case.status, Status::Open);
        assert!(case.due_at.is_some(), "the clock runs on");
        let history = ing.store.history(1).unwrap();
        assert!(!history.iter().any(|e| matches!(
            e.what,
            EventKind::StaffAnswer { .. }
                | EventKind::Resolved { .. }
                | EventKind::UnverifiedStaff { .. }
        )));
    }

    #[test]
    fn thousands_of_recipients_record_only_the_mail_s_own() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        let ack = acked(&ing);
        let mut fields = String::from("Reporting-MTA: dns; x\r\n\r\n");
        for i in 0..3_000 {
            fields.push_str(&format!(
                "Final-Recipient: rfc822; r{i}@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            ));
        }
        fields.push_str(
            "Final-Recipient: rfc822; alice@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n",
        );
        let raw = String::from_utf8(dsn(1, &ack, "x@example.org", "failed"))
            .unwrap()
            .replace("Reporting-MTA: dns; mx.example.test\r\n\r\n", &fields);
        // The real recipient comes after the cap: the report is about
        // others, and marks nothing.
        let out = ing.ingest(Some(&src(1, 2)), raw.as_bytes(), None).unwrap();
        assert_eq!(out, Outcome::Bounce { case: None });
        assert_eq!(state(&ing, 1), OutboxState::Sent);
        // Within the cap: one event, for alice only.
        let raw = raw.replace(
            "Final-Recipient: rfc822; r5@",
            "Final-Recipient: rfc822; alice@",
        );
        let out = ing.ingest(Some(&src(1, 3)), raw.as_bytes(), None).unwrap();
        assert_eq!(out, Outcome::Bounce { case: Some(1) });
        assert_eq!(bounced_events(&ing, 1).len(), 1);
    }

    #[test]
    fn malformed_huge_and_non_utf8_reports_stop_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        acked(&ing);
        let mut huge = b"From: MAILER-DAEMON@x.example\r\nSubject: failure notice\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n--b\r\n"
            .to_vec();
        huge.extend(std::iter::repeat_n(0xffu8, 8 << 20));
        let samples: Vec<Vec<u8>> = vec![
            b"From: MAILER-DAEMON@x.example\r\nContent-Type: multipart/report; report-type=delivery-status\r\n\r\n".to_vec(),
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=\x00\xff\r\n\r\n--\x00\xff\r\n".to_vec(),
            huge,
        ];
        for (n, raw) in samples.iter().enumerate() {
            let out = ing.ingest(Some(&src(1, 2 + n as u32)), raw, None).unwrap();
            assert_eq!(out, Outcome::Bounce { case: None }, "sample {n}");
        }
        // The mailbox goes on.
        let next = b"From: bob@example.org\r\nSubject: hi\r\nMessage-ID: <b1@x>\r\n\r\nhello\r\n";
        assert!(matches!(
            ing.ingest(Some(&src(1, 10)), next, None).unwrap(),
            Outcome::Stored { new: true, .. }
        ));
        assert_eq!(
            ing.store
                .cursor("default", "INBOX")
                .unwrap()
                .unwrap()
                .last_uid,
            10
        );
    }

    #[test]
    fn a_report_in_the_sent_folder_is_an_agent_s_mail() {
        // An agent forwarding a bounce from the shared mailbox: their
        // mail, in Sent, is threaded as theirs, never read as a report.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        let ack = acked(&ing);
        let sent = Source {
            folder: "Sent".into(),
            sent: true,
            ..src(1, 1)
        };
        let out = ing
            .ingest(
                Some(&sent),
                &dsn(1, &ack, "alice@example.org", "failed"),
                None,
            )
            .unwrap();
        assert!(matches!(out, Outcome::Stored { .. }), "{out:?}");
        assert_eq!(state(&ing, 1), OutboxState::Sent);
    }
}

/// A digest's words, for tests that only need one queued.
fn digest_text() -> crate::mailtext::Text {
    crate::mailtext::Text {
        subject: "Digest".into(),
        body: "KPIs".into(),
        language: "en".into(),
        html: None,
    }
}
