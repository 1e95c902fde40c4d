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
        assert_eq!(ing.store.cursor("INBOX").unwrap().unwrap().last_uid, 2);
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
    assert_eq!(ing.store.cursor("INBOX").unwrap().unwrap().last_uid, 50);
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
            let id = fx.digest(tx, vec!["boss@example.org".into()], "Digest", "KPIs")?;
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
        // Attack: a "report" carrying the case's subject tag and an
        // In-Reply-To to the customer's mail, to be threaded into the
        // case (and forwarded to staff) like a customer's message.
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path(), None);
        acked(&ing);
        let raw = b"From: MAILER-DAEMON@evil.example\r\nSubject: Undeliverable: [Case #1] Printer on fire\r\n\
In-Reply-To: <m1@example.org>\r\nReferences: <m1@example.org>\r\nMessage-ID: <f1@evil.example>\r\n\r\n\
Please call +1 555 0100 to fix your account.\r\n";
        let out = ing.ingest(Some(&src(1, 2)), raw, None).unwrap();
        assert_eq!(out, Outcome::Bounce { case: None });
        assert_eq!(ing.store.case_messages(1).unwrap().len(), 1);
        assert_eq!(ing.store.cases().count(), 1);
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
        assert_eq!(ing.store.cursor("INBOX").unwrap().unwrap().last_uid, 10);
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
