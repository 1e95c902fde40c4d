//! The report reader against samples of each form (tests/fixtures/bounces,
//! written after real notices of Postfix, Exim, qmail, Gmail and
//! Exchange) and against hostile input.

use super::*;
use crate::message::parse;

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bounces")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn report(raw: &[u8]) -> Option<Report> {
    read(raw, &parse(raw))
}

/// One recipient as expected: address, action, status.
type Expected = (&'static str, Action, &'static str);
/// A sample file, its form, its recipients and the quoted original ID.
type Sample = (&'static str, Form, &'static [Expected], &'static str);

#[test]
fn samples_are_read() {
    // (file, form, [(recipient, action, status)], quoted original ID)
    let table: &[Sample] = &[
        (
            // Captured from the test stack's Postfix (tests/it/bounces.rs).
            "postfix-real.eml",
            Form::Standard,
            &[("someone@bounce.test", Action::Failed, "5.1.1")],
            "c1.a1.cqmsjq1zyx18@example.test",
        ),
        (
            "postfix.eml",
            Form::Standard,
            &[("someone@bounce.test", Action::Failed, "5.1.1")],
            "c1.a1.k3j4h5g6f7d8@example.test",
        ),
        (
            "gmail.eml",
            Form::Standard,
            &[("dave.nonexistent@gmail.com", Action::Failed, "5.1.1")],
            "c9.a20.qqqqwwwweeee@example.test",
        ),
        (
            "delayed.eml",
            Form::Standard,
            &[("slow@slow.example", Action::Delayed, "4.4.1")],
            "c4.a8.uuuuiiiioooo@example.test",
        ),
        (
            "exim.eml",
            Form::Heuristic,
            &[("bob@example.org", Action::Failed, "5.1.1")],
            "c7.f12.aaaabbbbcccc@example.test",
        ),
        (
            "qmail.eml",
            Form::Heuristic,
            &[("carol@qmail.example", Action::Failed, "5.1.1")],
            "c3.n5.zzzzyyyyxxxx@example.test",
        ),
        (
            "exchange.eml",
            Form::Heuristic,
            &[("erin@contoso.example", Action::Failed, "5.1.10")],
            "c11.a30.rrrrttttyyyy@example.test",
        ),
    ];
    for (file, form, recipients, id) in table {
        let r = report(&fixture(file)).unwrap_or_else(|| panic!("{file}: not a report"));
        assert_eq!(r.form, *form, "{file}");
        let got: Vec<(&str, Action, &str)> = r
            .recipients
            .iter()
            .map(|x| (x.address.as_str(), x.action, x.status.as_str()))
            .collect();
        assert_eq!(got, *recipients, "{file}");
        assert_eq!(
            r.original_ids.first().map(String::as_str),
            Some(*id),
            "{file}"
        );
    }
}

#[test]
fn diagnostics_are_one_capped_line() {
    let r = report(&fixture("gmail.eml")).unwrap();
    let d = r.recipients[0].diagnostic.as_deref().unwrap();
    assert!(d.starts_with("smtp; 550-5.1.1 The email account"), "{d}");
    assert!(!d.contains('\n') && d.contains("NoSuchUser"), "{d}");
    let r = report(&fixture("postfix.eml")).unwrap();
    assert_eq!(
        r.recipients[0].original.as_deref(),
        Some("someone@bounce.test")
    );
    assert_eq!(
        r.recipients[0].diagnostic.as_deref(),
        Some("X-Postfix; mailbox unknown")
    );
    let r = report(&fixture("exim.eml")).unwrap();
    let d = r.recipients[0].diagnostic.as_deref().unwrap();
    assert!(d.contains("bob@example.org"), "{d}");
}

#[test]
fn other_robot_and_customer_mail_is_no_report() {
    for file in ["not-vacation.eml", "not-mdn.eml", "not-forwarded.eml"] {
        assert_eq!(report(&fixture(file)), None, "{file}");
    }
    let plain = b"From: alice@example.org\r\nSubject: Undeliverable\r\n\r\nmy parcel\r\n";
    assert_eq!(
        report(plain),
        None,
        "a customer's subject alone is no bounce"
    );
    // A person at postmaster@ (an ISP's helpdesk) is a person: without
    // the null reverse path, no subject makes a free-text bounce, nor a
    // `Return-Path: <>` the sender wrote below the real one.
    let helpdesk = b"Return-Path: <postmaster@isp.example>\r\n\
From: postmaster@isp.example\r\nSubject: Returned mail from your server\r\n\
X-Failed-Recipients: postmaster@isp.example\r\n\r\nplease look\r\n";
    assert_eq!(report(helpdesk), None);
    let forged = b"Return-Path: <mallory@evil.example>\r\nReturn-Path: <>\r\n\
From: MAILER-DAEMON@evil.example\r\nSubject: failure notice\r\n\r\nx@y.example\r\n";
    assert_eq!(report(forged), None);
    let below = forged.iter().position(|&b| b == b'\n').unwrap() + 1;
    assert_eq!(
        report(&forged[below..]).map(|r| r.form),
        Some(Form::Heuristic),
        "the same `<>` as the first field"
    );
}

#[test]
fn a_free_text_report_takes_no_id_from_its_own_headers() {
    // A vacation notice or a person's reply refers to our mail in its
    // In-Reply-To/References just as some bounces do: in the free-text
    // form only quoted headers count. A standard report keeps it (Gmail).
    let raw = b"Return-Path: <>\r\nFrom: Alice <alice@example.org>\r\n\
Subject: Auto: Re: [Case #1] Undeliverable parcel\r\n\
In-Reply-To: <c1.a1.aaaabbbbcccc@example.test>\r\n\
References: <c1.a1.aaaabbbbcccc@example.test>\r\n\r\n\
Away until Monday; alice@example.org is read then.\r\n";
    let r = report(raw).unwrap();
    assert_eq!(r.form, Form::Heuristic);
    assert!(r.original_ids.is_empty(), "{:?}", r.original_ids);
    let r = report(&fixture("gmail.eml")).unwrap();
    assert_eq!(r.form, Form::Standard);
    assert!(!r.original_ids.is_empty());
}

/// Abuse cases: a "bounce" is mail anyone can send. Reading one must stay
/// bounded and total; what it claims is checked later against what
/// escalator sent (see `ingest/bounces.rs`).
mod hostile {
    use super::*;

    fn dsn(status_part: &str, original: &str) -> Vec<u8> {
        format!(
            "From: MAILER-DAEMON@evil.example\r\nSubject: Undelivered Mail Returned to Sender\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
--b\r\nContent-Type: text/plain\r\n\r\nno\r\n\
--b\r\nContent-Type: message/delivery-status\r\n\r\n{status_part}\r\n\
--b\r\nContent-Type: text/rfc822-headers\r\n\r\n{original}\r\n--b--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn thousands_of_recipients_are_capped() {
        let mut fields = String::from("Reporting-MTA: dns; x\r\n\r\n");
        for i in 0..5_000 {
            fields.push_str(&format!(
                "Final-Recipient: rfc822; r{i}@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            ));
        }
        let r = report(&dsn(&fields, "Message-ID: <x@y>")).unwrap();
        assert_eq!(r.recipients.len(), MAX_RECIPIENTS);
        assert_eq!(r.recipients[0].address, "r0@example.org");
    }

    #[test]
    fn many_quoted_ids_are_capped() {
        let mut text = String::from(
            "Return-Path: <>\r\nFrom: MAILER-DAEMON@x.example\r\nSubject: failure notice\r\n\r\n<v@x.example>: no\r\n",
        );
        for i in 0..10_000 {
            text.push_str(&format!("Message-ID: <id{i}@x>\r\n"));
        }
        let r = report(text.as_bytes()).unwrap();
        assert_eq!(r.original_ids.len(), MAX_ORIGINAL_IDS);
        assert_eq!(r.original_ids[0], "id0@x");
    }

    #[test]
    fn a_huge_diagnostic_is_cut_and_controls_removed() {
        let long = "A\u{7}\u{1b}[31m".repeat(100_000);
        let fields = format!(
            "Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; {long}\r\n"
        );
        let r = report(&dsn(&fields, "Message-ID: <x@y>")).unwrap();
        let d = r.recipients[0].diagnostic.as_deref().unwrap();
        assert!(d.chars().count() <= MAX_DIAGNOSTIC);
        assert!(!d.chars().any(char::is_control), "{d:?}");
    }

    #[test]
    fn addresses_with_control_characters_or_junk_are_no_recipient() {
        // They would reach the logs (`address = ...`) and the events: a
        // terminal escape, a bell, a NUL, brackets, a second @ are no
        // address; a plain one and an SMTPUTF8 one are.
        let bad = [
            "a\u{1b}[31m@example.org",
            "a\u{7}@example.org",
            "a\u{0}b@example.org",
            "a\u{85}@example.org",
            "a@exa\u{9b}mple.org",
            "a<b>@example.org",
            "a@b@example.org",
            "a,b@example.org",
            "@example.org",
            "a@",
            "a@.example.org",
        ];
        let mut fields = String::new();
        for a in bad {
            fields.push_str(&format!(
                "Final-Recipient: rfc822; {a}\r\nAction: failed\r\n\r\n"
            ));
        }
        fields.push_str("Final-Recipient: rfc822; <Ok@Example.org>\r\nAction: failed\r\n\r\n");
        fields.push_str("Final-Recipient: utf-8; jörg@bücher.example\r\nAction: failed\r\n\r\n");
        fields.push_str(
            "Original-Recipient: rfc822; x\u{1b}]0;@example.org\r\n\
Final-Recipient: rfc822; fine@example.org\r\nAction: failed\r\n\r\n",
        );
        let r = report(&dsn(&fields, "Message-ID: <x@y>")).unwrap();
        let got: Vec<_> = r
            .recipients
            .iter()
            .map(|x| (x.address.as_str(), x.original.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("ok@example.org", None),
                ("jörg@bücher.example", None),
                ("fine@example.org", None)
            ]
        );
    }

    #[test]
    fn broken_and_missing_parts_give_an_empty_report() {
        // No delivery-status part, no original, no boundary at all.
        let raw = b"From: MAILER-DAEMON@x.example\r\n\
Content-Type: multipart/report; report-type=delivery-status\r\n\r\ngarbage\r\n";
        let r = report(raw).unwrap();
        assert_eq!(r.form, Form::Standard);
        assert!(r.original_ids.is_empty());
        // Unknown action, no address, a status that is not one.
        let fields = "Final-Recipient: rfc822; nobody\r\nAction: failed\r\n\r\n\
Final-Recipient: rfc822; a@example.org\r\nAction: exploded\r\n\r\n\
Final-Recipient: rfc822; b@example.org\r\nAction: failed\r\nStatus: 5.1.1; drop table\r\n";
        let r = report(&dsn(fields, "")).unwrap();
        let got: Vec<_> = r
            .recipients
            .iter()
            .map(|x| (x.address.as_str(), x.status.as_str()))
            .collect();
        assert_eq!(got, [("b@example.org", "5.0.0")]);
        assert!(r.original_ids.is_empty());
    }

    #[test]
    fn non_utf8_bytes_do_not_hide_the_fields() {
        let mut raw = dsn(
            "Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.2.2\r\nDiagnostic-Code: smtp; \u{fffd}",
            "Message-ID: <orig@example.test>",
        );
        // Replace the replacement character by raw Latin-1 bytes.
        let at = raw
            .windows(3)
            .position(|w| w == "\u{fffd}".as_bytes())
            .unwrap();
        raw.splice(at..at + 3, [0xe9, 0xff, 0x00]);
        let r = report(&raw).unwrap();
        assert_eq!(r.recipients[0].status, "5.2.2");
        assert_eq!(r.original_ids, ["orig@example.test"]);
    }

    #[test]
    fn deep_nesting_and_huge_input_stay_bounded() {
        // A report quoting a report quoting a report ...: only the top
        // level's parts are read.
        let mut inner = String::from("Message-ID: <deepest@x>\r\n\r\nhi\r\n");
        for i in 0..50 {
            inner = format!(
                "Message-ID: <level{i}@x>\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"n{i}\"\r\n\r\n\
--n{i}\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n--n{i}--\r\n"
            );
        }
        let raw = format!("From: MAILER-DAEMON@x.example\r\n{inner}");
        let r = report(raw.as_bytes()).unwrap();
        assert!(r.original_ids.len() <= MAX_ORIGINAL_IDS);
        // 20 MB of text with no structure.
        let mut big =
            b"Return-Path: <>\r\nFrom: MAILER-DAEMON@x.example\r\nSubject: failure notice\r\n\r\n"
                .to_vec();
        big.extend(std::iter::repeat_n(b'a', 20 << 20));
        let r = report(&big).unwrap();
        assert!(r.recipients.is_empty() && r.original_ids.is_empty());
    }

    #[test]
    fn the_corpus_reads_without_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return; // the corpus is optional on a developer's machine
        };
        let mut stack: Vec<_> = dirs.flatten().map(|e| e.path()).collect();
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            } else if p.extension().is_some_and(|e| e == "eml") {
                let raw = std::fs::read(&p).unwrap();
                // As a report whatever its headers say.
                let mut mail = parse(&raw);
                mail.robot.return_path = Some(String::new());
                mail.subject = "failure notice".into();
                let _ = read(&raw, &mail);
            }
        }
    }
}
