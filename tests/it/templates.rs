//! Mail templates (issue 20) on the real stack: files in `[templates]
//! dir` replace the built-in texts, check-config refuses a broken one
//! naming file and line, and SIGHUP loads an edit (a broken edit keeps
//! the old set).

use std::path::Path;
use std::time::Duration;

use crate::support::{escalator, header, mail, tiers, Setup};

fn customer_mail(user: &str, subject: &str) -> Vec<u8> {
    mail(
        &format!("{user}@example.test"),
        "support@example.test",
        subject,
        &format!("{user}-{}@example.test", subject.len()),
        "",
        "hello",
    )
}

/// The body of a raw mail (after the blank line), LF line ends, without
/// the trailing line ends transport adds.
fn body(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw).replace("\r\n", "\n");
    let body = text.split_once("\n\n").map(|(_, b)| b).unwrap_or_default();
    body.trim_end().to_string()
}

fn with_dir(dir: &Path) -> String {
    tiers(&format!("\n[templates]\ndir = \"{}\"\n", dir.display()))
}

#[test]
fn check_config_refuses_a_template_with_an_unknown_variable_naming_file_and_line() {
    let s = Setup::with_tiers(&["support"], "");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ack.en.txt"),
        "Subject: {{ case_tag }} {{ subject }}\n\nHello,\n\nyour {{ tikcet_number }} is open.\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap() + &with_dir(dir.path());
    std::fs::write(&s.config, text).unwrap();
    let out = escalator(&["check-config", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let file = dir.path().join("ack.en.txt");
    assert!(err.contains("templates.dir"), "names the key: {err}");
    assert!(
        err.contains(&format!("{}:5:", file.display())),
        "names file and line: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_in_dir_writes_the_ack_and_sighup_loads_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let ack = dir.path().join("ack.en.txt");
    std::fs::write(
        &ack,
        "Subject: {{ case_tag }} We have it: {{ subject }}\n\nDear {{ customer_name }},\n\ncase {{ case_id }} is with {{ tier }}.\n",
    )
    .unwrap();
    let s = Setup::with_tiers(
        &["support", "ann", "bob", "cid", "agent", "tier2"],
        &with_dir(dir.path()),
    );
    let d = s.daemon();
    // A customer who writes template syntax in the subject gets it back
    // as text.
    s.send("ann", &customer_mail("ann", "Order {{ 7*7 }} late"));
    let got = s.stack.wait_for("ann", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    let subject = header(&got[0], "Subject").unwrap();
    assert!(
        subject.ends_with("We have it: Order {{ 7*7 }} late"),
        "{subject}"
    );
    assert_eq!(body(&got[0]), "Dear ann,\n\ncase 1 is with Frontline.");

    // The admin edits the template and sends SIGHUP: the next ack is new.
    std::fs::write(
        &ack,
        "Subject: {{ case_tag }} Thanks: {{ subject }}\n\nThanks, {{ customer_name }}.\n",
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log("config reloaded", 1, Duration::from_secs(10))
        .await;
    s.send("bob", &customer_mail("bob", "Second"));
    let got = s.stack.wait_for("bob", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert!(header(&got[0], "Subject")
        .unwrap()
        .ends_with("Thanks: Second"));
    assert_eq!(body(&got[0]), "Thanks, bob.");

    // A broken edit is refused with the file and line, the last good set
    // goes on.
    std::fs::write(&ack, "Subject: x\n\n{{ nope }}\n").unwrap();
    d.signal("HUP");
    let log = d
        .wait_log("config reload refused", 1, Duration::from_secs(10))
        .await;
    assert!(log.contains(&format!("{}:3:", ack.display())), "{log}");
    s.send("cid", &customer_mail("cid", "Third"));
    let got = s.stack.wait_for("cid", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(body(&got[0]), "Thanks, cid.");
    // The preview renders the running set with a real case's values
    // (through the daemon, which holds the store); the CLI reads the
    // config first, so the broken edit is undone.
    std::fs::write(
        &ack,
        "Subject: {{ case_tag }} Thanks: {{ subject }}\n\nThanks, {{ customer_name }}.\n",
    )
    .unwrap();
    let out = escalator(&[
        "templates",
        "show",
        "ack",
        "--case",
        "1",
        "--config",
        s.cfg(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Thanks: Order {{ 7*7 }} late") && text.contains("Thanks, ann."),
        "{text}"
    );
    let mut d = d;
    assert!(d.stop().status.success());
}

#[test]
fn exported_templates_are_a_valid_dir_and_export_keeps_edited_files() {
    let s = Setup::with_tiers(&["support"], "");
    let dir = tempfile::tempdir().unwrap();
    let out = escalator(&["templates", "export", dir.path().to_str().unwrap()]);
    assert!(out.status.success());
    for kind in ["ack", "notice", "relay", "survey"] {
        assert!(
            dir.path().join(format!("{kind}.en.txt")).is_file(),
            "{kind}"
        );
    }
    // An edited file survives a second export.
    let ack = dir.path().join("ack.en.txt");
    std::fs::write(&ack, "Subject: {{ case_tag }} edited\n\nedited\n").unwrap();
    assert!(
        escalator(&["templates", "export", dir.path().to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(
        std::fs::read_to_string(&ack).unwrap(),
        "Subject: {{ case_tag }} edited\n\nedited\n"
    );
    let text = std::fs::read_to_string(&s.config).unwrap() + &with_dir(dir.path());
    std::fs::write(&s.config, text).unwrap();
    let out = escalator(&["check-config", "--config", s.cfg()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = escalator(&["templates", "list", "--config", s.cfg()]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains(&ack.display().to_string()), "{list}");
    // The preview in a language with no template falls back, saying so;
    // its sample tag is the one this config writes ([cases] subject_tag).
    let out = escalator(&[
        "templates",
        "show",
        "ack",
        "--lang",
        "sv-FI",
        "--config",
        s.cfg(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("Subject: [Case #42] edited\nContent-Language: en\n"),
        "{text}"
    );
}

/// The queue's language picks the template, and the mail says which
/// language it is in; a queue with no template in its language gets the
/// English one, labelled so.
#[tokio::test(flavor = "multi_thread")]
async fn a_queue_s_language_picks_its_template_and_the_mail_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ack.de.txt"),
        "Subject: {{ case_tag }} Eingangsbestätigung: {{ subject }}\n\nGuten Tag {{ customer_name }},\n\nIhre Anfrage ist Fall {{ case_id }}.\n",
    )
    .unwrap();
    let s = Setup::with_tiers(&["support", "ann", "agent", "tier2"], &with_dir(dir.path()))
        .with_mailbox("language = \"de-AT\"");
    s.send("ann", &customer_mail("ann", "Bestellung"));
    // Delivered into the support mailbox before the cycle reads it.
    s.stack.settle().await;
    s.once();
    let got = s.stack.wait_for("ann", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(header(&got[0], "Content-Language").as_deref(), Some("de"));
    // Decoded as a mail client shows it (the header is RFC 2047 encoded).
    let subject = escalator::message::parse(&got[0]).subject;
    assert!(
        subject.ends_with("Eingangsbestätigung: Bestellung"),
        "{subject}"
    );

    // A language tag that is not one is refused, naming the key.
    let text =
        std::fs::read_to_string(&s.config).unwrap() + "\n[language]\ndefault = \"xx-INVALID!!\"\n";
    std::fs::write(&s.config, text).unwrap();
    let out = escalator(&["check-config", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("language.default") && err.contains("is not a language tag"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_template_in_the_language_the_english_mail_says_en() {
    let s = Setup::with_tiers(
        &["support", "bob", "agent", "tier2"],
        &tiers("\n[language]\ndefault = \"sv\"\n"),
    );
    s.send("bob", &customer_mail("bob", "Commande"));
    // Delivered into the support mailbox before the cycle reads it.
    s.stack.settle().await;
    s.once();
    let got = s.stack.wait_for("bob", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(header(&got[0], "Content-Language").as_deref(), Some("en"));
    assert!(body(&got[0]).contains("thank you for writing to us"));
}
