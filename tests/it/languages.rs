//! Each customer in their own language (issue 20), on the real stack: a
//! `Content-Language` header, a long text in French, a short "ok" that
//! gets the queue's language, a reply that keeps its case's, and a
//! language set for the customer by the admin.

use std::time::Duration;

use serde_json::Value;

use crate::support::{escalator, header, mail, Setup};

const TIERS: &str = r#"
[[tiers]]
name = "Frontline"
staff = ["agent@example.test"]
first_response = "4h"

[[tiers]]
name = "Tier 2"
staff = ["tier2@example.test"]
forward_to = ["tier2@example.test"]
first_response = "8h"

[[triggers]]
phrases = ["URGENT-ESCALATE"]
escalate = true
"#;

const FRENCH: &str = "Bonjour, depuis la mise à jour de ce matin, je ne peux plus \
me connecter à mon compte. Pourriez-vous vérifier ce qui se passe, s'il vous plaît ? \
Merci d'avance pour votre aide.";

/// A mail as a client shows it: subject and body decoded.
fn text(raw: &[u8]) -> (String, String) {
    let m = escalator::message::parse(raw);
    (m.subject, m.text)
}

/// `escalator ARGS --config ...`, which must succeed; its stdout.
fn cli(s: &Setup, args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--config", s.cfg()]);
    let out = escalator(&all);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn case_of(s: &Setup, customer: &str) -> Value {
    s.cases()
        .into_iter()
        .find(|c| c["customer"] == customer)
        .unwrap_or_else(|| panic!("no case of {customer}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_customer_is_answered_in_their_language_and_the_case_remembers_it() {
    let s = Setup::with_tiers(
        &["support", "agent", "tier2", "hans", "marie", "kees"],
        TIERS,
    )
    .with_mailbox("language = \"nl\"");
    s.send(
        "hans",
        &mail(
            "Hans <hans@example.test>",
            "support@example.test",
            "Drucker",
            "h1@example.test",
            "Content-Language: de\r\n",
            "Hallo",
        ),
    );
    s.send(
        "marie",
        &mail(
            "marie@example.test",
            "support@example.test",
            "Connexion impossible",
            "m1@example.test",
            "",
            FRENCH,
        ),
    );
    s.send(
        "kees",
        &mail(
            "kees@example.test",
            "support@example.test",
            "Vraag",
            "k1@example.test",
            "",
            "ok",
        ),
    );
    // Delivered into the support mailbox before the cycle reads it.
    s.stack.settle().await;
    s.once();
    let wait = Duration::from_secs(30);

    // German from the header: the German ack, labelled, with the wait
    // and the date in German.
    let got = s.stack.wait_for("hans", 1, wait).await;
    assert_eq!(header(&got[0], "Content-Language").as_deref(), Some("de"));
    let (_, body) = text(&got[0]);
    assert!(body.contains("Guten Tag Hans,"), "{body}");
    assert!(body.contains("innerhalb von 4 Stunden antworten"), "{body}");
    let weekdays = [
        "Montag",
        "Dienstag",
        "Mittwoch",
        "Donnerstag",
        "Freitag",
        "Samstag",
        "Sonntag",
    ];
    assert!(
        weekdays
            .iter()
            .any(|d| body.contains(&format!("spätestens bis {d}, "))),
        "{body}"
    );

    // French from the text alone.
    let got = s.stack.wait_for("marie", 1, wait).await;
    assert_eq!(header(&got[0], "Content-Language").as_deref(), Some("fr"));
    assert!(text(&got[0])
        .1
        .contains("Nous vous remercions de votre message"));

    // "ok" says nothing: the queue's language.
    let got = s.stack.wait_for("kees", 1, wait).await;
    assert_eq!(header(&got[0], "Content-Language").as_deref(), Some("nl"));
    assert!(text(&got[0]).1.contains("Geachte kees,"));

    let lang = |c: &Value| {
        (
            c["language"].as_str().unwrap_or_default().to_string(),
            c["language_source"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    assert_eq!(
        lang(&case_of(&s, "hans@example.test")),
        ("de".into(), "content-language".into())
    );
    assert_eq!(
        lang(&case_of(&s, "marie@example.test")),
        ("fr".into(), "detected".into())
    );
    assert_eq!(
        lang(&case_of(&s, "kees@example.test")),
        ("nl".into(), "queue".into())
    );

    // Marie answers in English and asks to escalate: her case stays
    // French, so the notice is French.
    s.send(
        "marie",
        &mail(
            "marie@example.test",
            "support@example.test",
            "Re: Connexion impossible",
            "m2@example.test",
            "In-Reply-To: <m1@example.test>\r\nContent-Language: en\r\n",
            "URGENT-ESCALATE please, this is blocking our whole team since this morning.",
        ),
    );
    // Delivered into the support mailbox before the cycle reads it.
    s.stack.settle().await;
    s.once();
    let got = s.stack.wait_for("marie", 2, wait).await;
    let notice = got
        .iter()
        .find(|m| text(m).1.contains("a été transmis"))
        .expect("a French notice");
    assert_eq!(header(notice, "Content-Language").as_deref(), Some("fr"));
    // Her case went to tier 2 in the staff language, and says so.
    let forward = s.stack.wait_for("tier2", 1, wait).await;
    assert_eq!(
        header(&forward[0], "Content-Language").as_deref(),
        Some("en")
    );
    assert!(text(&forward[0]).1.contains("Escalated to Tier 2"));
    assert_eq!(
        lang(&case_of(&s, "marie@example.test")),
        ("fr".into(), "detected".into())
    );

    // The admin sets Kees's language: his open case follows, and the
    // next mail to him is Spanish.
    let said = cli(
        &s,
        &["customers", "set-language", "Kees@Example.test", "es-ES"],
    );
    assert!(said.contains("1 open case"), "{said}");
    let kees = case_of(&s, "kees@example.test");
    assert_eq!(lang(&kees), ("es-es".into(), "customer".into()));
    let id = kees["id"].as_u64().unwrap().to_string();
    cli(&s, &["cases", "escalate", &id, "--reason", "VIP"]);
    // Delivered into the support mailbox before the cycle reads it.
    s.stack.settle().await;
    s.once();
    let got = s.stack.wait_for("kees", 2, wait).await;
    let notice = got
        .iter()
        .find(|m| text(m).1.contains("Su caso #"))
        .expect("a Spanish notice");
    // Spanish of Spain has no file of its own: the Spanish one, so labelled.
    assert_eq!(header(notice, "Content-Language").as_deref(), Some("es"));

    // The previews: Marie's notice in her language by default, the
    // forward of her case in the staff language with its history, and
    // the digest (about no case) refused with a case.
    let marie = case_of(&s, "marie@example.test")["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let text = cli(&s, &["templates", "show", "notice", "--case", &marie]);
    assert!(
        text.contains("Content-Language: fr") && text.contains("a été transmis"),
        "{text}"
    );
    let text = cli(&s, &["templates", "show", "forward", "--case", &marie]);
    assert!(text.contains("Content-Language: en"), "{text}");
    assert!(
        text.contains("==== Conversation ====") && text.contains("URGENT-ESCALATE"),
        "{text}"
    );
    let out = escalator(&[
        "templates",
        "show",
        "digest",
        "--case",
        &marie,
        "--config",
        s.cfg(),
    ]);
    assert_eq!(out.status.code(), Some(1));

    // A tag that is not one, or a language without templates, is refused.
    for (tag, why) in [
        ("xx-INVALID!", "is not a language tag"),
        ("sv", "no acknowledgement template"),
    ] {
        let out = escalator(&[
            "customers",
            "set-language",
            "kees@example.test",
            tag,
            "--config",
            s.cfg(),
        ]);
        assert_eq!(out.status.code(), Some(1));
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(why), "{said}");
    }
}

/// An `.html` template beside the text one makes the ack
/// multipart/alternative, and a subject with `<script>` is text in it.
#[tokio::test(flavor = "multi_thread")]
async fn an_html_template_escapes_a_script_in_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ack.en.txt"),
        "Subject: {{ case_tag }} Re: {{ subject }}\n\nCase {{ case_id }}: {{ subject }}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("ack.en.html"),
        "<p>Case {{ case_id }}: <b>{{ subject }}</b></p>\n",
    )
    .unwrap();
    let tail = format!("{TIERS}\n[templates]\ndir = \"{}\"\n", dir.path().display());
    let s = Setup::with_tiers(&["support", "agent", "tier2", "eve"], &tail);
    s.send(
        "eve",
        &mail(
            "eve@example.test",
            "support@example.test",
            "<script>alert(1)</script>",
            "e1@example.test",
            "",
            "hello",
        ),
    );
    // Delivered into the support mailbox before the cycle reads it.
    s.stack.settle().await;
    s.once();
    let got = s.stack.wait_for("eve", 1, Duration::from_secs(30)).await;
    let m = mail_parser::MessageParser::default()
        .parse(&got[0])
        .unwrap();
    let ct = header(&got[0], "Content-Type").unwrap_or_default();
    assert!(ct.starts_with("multipart/alternative"), "{ct}");
    assert_eq!(
        m.body_text(0).unwrap().trim(),
        "Case 1: <script>alert(1)</script>"
    );
    let html = m.body_html(0).unwrap();
    assert!(
        html.contains("<b>&lt;script&gt;alert(1)&lt;&#x2f;script&gt;</b>"),
        "{html}"
    );
    assert!(!html.contains("<script>"), "{html}");
}

/// Bad input from the issue: a 5,000-character subject, a name with
/// CR/LF and bidi controls, template syntax, a 10 KB or invalid
/// `Content-Language`, an empty body, a text in a language without
/// templates: each customer gets one well-formed ack in a sensible
/// language, and nothing they wrote became a header.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_mail_gets_a_well_formed_ack_in_a_sensible_language() {
    let s = Setup::with_tiers(
        &["support", "agent", "tier2", "h1", "h2", "h3", "h4"],
        TIERS,
    );
    let long_subject = "Ü".repeat(5000);
    let huge_lang = format!("Content-Language: {}\r\n", "de-".repeat(3400));
    let polish = "Dzień dobry, od dzisiejszej aktualizacji nie mogę zalogować się do \
                  swojego konta. Proszę o sprawdzenie, co się dzieje. Dziękuję bardzo.";
    let mails = [
        (
            "h1",
            "=?utf-8?q?Evil=0D=0ABcc:_x@evil.test_=E2=80=AE?= <h1@example.test>".to_string(),
            long_subject.clone(),
            huge_lang.clone(),
            "".to_string(),
        ),
        (
            "h2",
            "h2@example.test".to_string(),
            "{{ case_id }} {% for x in range(99999999) %}x{% endfor %}".to_string(),
            "Content-Language: xx-INVALID\r\n".to_string(),
            "{{ 7*7 }}".to_string(),
        ),
        (
            "h3",
            "h3@example.test".to_string(),
            "Problem".to_string(),
            "Accept-Language: *;q=1\r\n".to_string(),
            polish.to_string(),
        ),
        (
            "h4",
            "h4@example.test".to_string(),
            "".to_string(),
            "Content-Language: de\r\nContent-Language: fr\r\n".to_string(),
            "".to_string(),
        ),
    ];
    for (user, from, subject, extra, body) in &mails {
        s.send(
            user,
            &mail(
                from,
                "support@example.test",
                subject,
                &format!("{user}@x.test"),
                extra,
                body,
            ),
        );
    }
    // Delivered into the support mailbox before the cycle reads it.
    s.stack.settle().await;
    s.once();
    // The 10 KB header chose German by its first tag, as the duplicated
    // header's first did; the invalid tag, the wildcard and Polish (no
    // template) chose nothing: the default.
    let expected = [("h1", "de"), ("h2", "en"), ("h3", "en"), ("h4", "de")];
    for (user, want) in expected {
        let got = s.stack.wait_for(user, 1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "{user}: one ack");
        let raw = &got[0];
        let lang = header(raw, "Content-Language").unwrap_or_default();
        assert_eq!(lang, want, "{user}");
        let fields: Vec<(String, String)> = escalator::message::header_fields(raw).collect();
        for name in ["bcc", "content-language", "subject", "from", "to"] {
            let n = fields.iter().filter(|(n, _)| n == name).count();
            assert!(n <= 1, "{user}: {n} {name} fields");
        }
        let m = mail_parser::MessageParser::default()
            .parse(raw)
            .expect("parses");
        assert!(
            m.subject().is_some_and(|s| s.contains("[Case #")),
            "{user}: subject"
        );
        assert!(
            !m.body_text(0).unwrap_or_default().is_empty(),
            "{user}: a body"
        );
    }
    // The template syntax a customer typed was printed, never run.
    let got = s.stack.wait_for("h2", 1, Duration::from_secs(5)).await;
    let subject = escalator::message::parse(&got[0]).subject;
    assert!(
        subject.contains("{{ case_id }} {% for x in range(99999999) %}"),
        "{subject}"
    );
}
