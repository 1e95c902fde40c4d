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
    s.once();
    let got = s.stack.wait_for("marie", 2, wait).await;
    let notice = got
        .iter()
        .find(|m| text(m).1.contains("a été transmis"))
        .expect("a French notice");
    assert_eq!(header(notice, "Content-Language").as_deref(), Some("fr"));
    assert_eq!(
        lang(&case_of(&s, "marie@example.test")),
        ("fr".into(), "detected".into())
    );

    // The admin sets Kees's language: his open case follows, and the
    // next mail to him is Spanish.
    let out = escalator(&[
        "customers",
        "set-language",
        "Kees@Example.test",
        "es-ES",
        "--config",
        s.cfg(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 open case"));
    let kees = case_of(&s, "kees@example.test");
    assert_eq!(lang(&kees), ("es-es".into(), "customer".into()));
    let id = kees["id"].as_u64().unwrap().to_string();
    let out = escalator(&[
        "cases",
        "escalate",
        &id,
        "--reason",
        "VIP",
        "--config",
        s.cfg(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.once();
    let got = s.stack.wait_for("kees", 2, wait).await;
    let notice = got
        .iter()
        .find(|m| text(m).1.contains("Su caso #"))
        .expect("a Spanish notice");
    // Spanish of Spain has no file of its own: the Spanish one, so labelled.
    assert_eq!(header(notice, "Content-Language").as_deref(), Some("es"));

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
