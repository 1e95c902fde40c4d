//! Issue 18: working with the mail servers teams run, and saying what is
//! wrong in the first hour. On the private Dovecot + Postfix: how SMTP
//! sessions begin and end, `check-config --connect`, and a refused SMTP
//! login. Exim is run privately by tests/it/exim.rs. Cyrus and Courier
//! are not run: their packages conflict with Dovecot's and need their
//! own authentication daemons; the scripted IMAP server of
//! src/mailbox/tests.rs plays the behaviours that matter.

use std::time::Duration;

use crate::support::*;

/// Postfix's `disconnect from ...` lines of SMTP sessions (the test
/// stack's readiness probe says no EHLO).
fn sessions(stack: &MailStack) -> Vec<String> {
    let log = std::fs::read_to_string(stack.dir.join("log/postfix.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("disconnect from") && count(l, "ehlo") > 0)
        .map(str::to_string)
        .collect()
}

/// `mail=N` of a disconnect line.
fn count(line: &str, what: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{what}=")))
        .and_then(|n| n.split('/').next()?.parse().ok())
        .unwrap_or(0)
}

async fn wait_sessions(stack: &MailStack, mails: u32) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = sessions(stack);
        let total: u32 = s.iter().map(|l| count(l, "mail")).sum();
        if total >= mails || std::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Seven acks with `max_per_connection = 3`: three sessions of at most
/// three mails, each ended with QUIT, each introduced with `helo_name`
/// (which Postfix writes into the Received header it adds).
#[tokio::test]
async fn sessions_carry_at_most_max_per_connection_mails_and_end_with_quit() {
    let customers: Vec<String> = (1..=7).map(|n| format!("c{n}")).collect();
    let mut users = vec!["support", "tier2"];
    users.extend(customers.iter().map(String::as_str));
    let s = Setup::build(&users, |stack, store| {
        stack.config("support", store, "").replacen(
            "[smtp]\n",
            "[smtp]\nmax_per_connection = 3\nhelo_name = \"helo.escalator.test\"\n",
            1,
        )
    });
    for c in &customers {
        let raw = mail(
            &MailStack::addr(c),
            &MailStack::addr("support"),
            &format!("Question from {c}"),
            &format!("{c}-q@example.org"),
            "",
            "Hello, my printer is on fire.",
        );
        s.stack.deliver_maildir("support", &raw, 1);
    }
    s.once();
    let lines = wait_sessions(&s.stack, 7).await;
    let mails: Vec<u32> = lines.iter().map(|l| count(l, "mail")).collect();
    assert_eq!(mails.iter().sum::<u32>(), 7, "{lines:#?}");
    assert!(
        mails.iter().all(|n| *n <= 3),
        "at most 3 a session: {lines:#?}"
    );
    assert!(lines.len() >= 3, "{lines:#?}");
    for l in &lines {
        assert_eq!(count(l, "quit"), 1, "every session ends with QUIT: {l}");
    }
    let acks = s.stack.wait_for("c1", 1, Duration::from_secs(20)).await;
    let raw = String::from_utf8_lossy(&acks[0]).to_string();
    assert!(
        raw.contains("from helo.escalator.test"),
        "the EHLO name is in Postfix's Received header:\n{raw}"
    );
}

/// A refused SMTP login is the admin's to fix: `run --once` fails and
/// says so (not "temporary failure"), the ack stays queued, `stats`
/// shows it; with the password fixed, the next run sends it.
#[tokio::test]
async fn a_refused_smtp_login_fails_run_once_and_the_mail_goes_out_when_fixed() {
    let s = Setup::new(&["support", "tier2", "carol"], "");
    let good = std::fs::read_to_string(&s.config).unwrap();
    let wrong = good.replacen(
        "from = \"Example Support",
        "username = \"support\"\npassword = \"wrong\"\nfrom = \"Example Support",
        1,
    );
    std::fs::write(&s.config, &wrong).unwrap();
    s.stack.deliver_maildir(
        "support",
        &mail(
            &MailStack::addr("carol"),
            &MailStack::addr("support"),
            "Invoice wrong",
            "carol-1@example.org",
            "",
            "Please fix.",
        ),
        1,
    );
    let out = escalator(&["run", "--once", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "a refused login fails the run:\n{err}"
    );
    assert!(
        err.contains("refused the login") && err.contains("smtp.password"),
        "names the login and the key:\n{err}"
    );
    assert!(!err.contains("temporary SMTP failure"), "{err}");
    assert_eq!(s.cases().len(), 1, "the mail was taken in");
    let outbox = escalator_ok(&["outbox", "list", "--json", "--config", s.cfg()]);
    let entries: serde_json::Value = serde_json::from_slice(&outbox.stdout).unwrap();
    let states: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(states, ["pending"], "the ack waits, not failed");
    let stats = escalator_ok(&["stats", "--json", "--config", s.cfg()]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let problem = stats["smtp_problems"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(problem.contains("refused the login"), "{stats}");
    // Fixed.
    let fixed = good.replacen(
        "from = \"Example Support",
        "username = \"support\"\npassword = \"support\"\nfrom = \"Example Support",
        1,
    );
    std::fs::write(&s.config, fixed).unwrap();
    s.once();
    let acks = s.stack.wait_for("carol", 1, Duration::from_secs(20)).await;
    assert_eq!(acks.len(), 1, "the ack went out on the next run");
    let stats = escalator_ok(&["stats", "--json", "--config", s.cfg()]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["smtp_problems"], serde_json::json!([]), "cleared");
}

fn check(cfg: &str) -> (bool, String) {
    let out = escalator(&["check-config", "--connect", "--config", cfg]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `check-config --connect` logs in everywhere and says what to change.
#[tokio::test]
async fn check_config_connect_names_the_key_to_change() {
    let s = Setup::new(&["support", "tier2"], "");
    let good = std::fs::read_to_string(&s.config).unwrap();
    let (ok, out) = check(s.cfg());
    assert!(ok, "a good config passes:\n{out}");
    assert!(out.contains("OK      imap mailbox"), "{out}");
    assert!(out.contains("OK      smtp smtp"), "{out}");
    // Nothing was sent or stored.
    assert!(s.stack.fetch("support", "INBOX").await.is_empty());

    let write = |text: String| std::fs::write(&s.config, text).unwrap();
    // A wrong IMAP password.
    write(good.replacen("password = \"support\"", "password = \"nope\"", 1));
    let (ok, out) = check(s.cfg());
    assert!(!ok, "{out}");
    assert!(out.contains("FAILED  imap mailbox"), "{out}");
    assert!(out.contains("mailbox.password"), "names the key:\n{out}");
    assert!(!out.contains("nope"), "never the password itself:\n{out}");
    assert!(
        !out.contains("No(") && !out.contains("Some("),
        "no Rust debug text:\n{out}"
    );

    // A wrong SMTP password.
    write(good.replacen(
        "from = \"Example Support",
        "username = \"support\"\npassword = \"nope\"\nfrom = \"Example Support",
        1,
    ));
    let (ok, out) = check(s.cfg());
    assert!(!ok, "{out}");
    assert!(out.contains("FAILED  smtp smtp"), "{out}");
    assert!(out.contains("smtp.password"), "names the key:\n{out}");
    assert!(!out.contains("nope"), "never the password itself:\n{out}");
    assert!(
        out.contains("OK      imap mailbox"),
        "the rest is still checked:\n{out}"
    );

    // A sent folder the server does not have (Dovecot's is "Sent").
    write(good.replacen(
        "poll_interval = \"1s\"",
        "poll_interval = \"1s\"\nsent_folder = \"Sent Items\"",
        1,
    ));
    let (ok, out) = check(s.cfg());
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "mailbox.sent_folder \"Sent Items\" does not exist; the server has: INBOX, Sent"
        ),
        "names the key and the server's folders:\n{out}"
    );

    // TLS on a port that speaks plain text: the hint says starttls.
    write(good.replacen("security = \"plain\"", "security = \"tls\"", 1));
    let (ok, out) = check(s.cfg());
    assert!(!ok, "{out}");
    assert!(
        out.contains("try mailbox.security = \"starttls\""),
        "a hint instead of rustls' words:\n{out}"
    );
}

/// The daemon's log of a missing sent folder names the key and the
/// folders, once, and the inbox is still read; `run --once`'s summary
/// counts what the inbox pass stored.
#[tokio::test]
async fn a_missing_sent_folder_is_named_and_the_inbox_still_read() {
    let s =
        Setup::new(&["support", "tier2", "dave"], "").with_mailbox("sent_folder = \"Sent Items\"");
    s.stack.deliver_maildir(
        "support",
        &mail(
            &MailStack::addr("dave"),
            &MailStack::addr("support"),
            "Where is my order",
            "dave-1@example.org",
            "",
            "Hello.",
        ),
        1,
    );
    let out = escalator(&["run", "--once", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "mailbox.sent_folder \\\"Sent Items\\\" does not exist; the server has: INBOX, Sent"
        ) || err.contains(
            "mailbox.sent_folder \"Sent Items\" does not exist; the server has: INBOX, Sent"
        ),
        "{err}"
    );
    assert!(!err.contains("IMAP connection lost"), "{err}");
    assert!(err.contains("new_cases=1"), "the summary is true:\n{err}");
    assert_eq!(s.cases().len(), 1);
}

/// Over STARTTLS every session still ends with QUIT and a TLS
/// close_notify (Exim logged a TLS error for each session without one;
/// Postfix logs `lost connection` or an SSL error); a CA the machine does
/// not know gets a hint naming `ca_file`, from `check-config --connect`.
#[tokio::test(flavor = "multi_thread")]
async fn tls_sessions_end_cleanly_and_an_unknown_ca_is_named() {
    let (_certs, ca, (cert, key)) = crate::reliability::certificates();
    let stack = MailStack::start_tls(&["support", "tier2", "erin"], &cert, &key);
    stack.deliver_maildir(
        "support",
        &mail(
            &MailStack::addr("erin"),
            &MailStack::addr("support"),
            "Over TLS",
            "erin-1@example.org",
            "",
            "hi",
        ),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let config = |ca: Option<&std::path::Path>| {
        let text = stack.config("support", &dir.path().join("store"), "");
        let text = crate::reliability::secured(
            &text,
            stack.imap_port,
            "127.0.0.1",
            stack.imaps_port.unwrap(),
            "tls",
            ca,
        );
        crate::reliability::secured(
            &text,
            stack.smtp_port,
            "127.0.0.1",
            stack.smtp_port,
            "starttls",
            ca,
        )
    };
    std::fs::write(&cfg, config(None)).unwrap();
    let out = escalator(&[
        "check-config",
        "--connect",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("hint: the server's certificate is not signed by a CA this machine trusts: set mailbox.ca_file"), "{text}");
    assert!(text.contains("set smtp.ca_file"), "{text}");

    // STARTTLS on the port that expects TLS at once: the server waits
    // for a handshake, the client for a greeting; the check gives up
    // within 10 s and says what to try.
    let text = crate::reliability::secured(
        &stack.config("support", &dir.path().join("store"), ""),
        stack.imap_port,
        "127.0.0.1",
        stack.imaps_port.unwrap(),
        "starttls",
        Some(&ca.0),
    );
    std::fs::write(&cfg, text).unwrap();
    let started = std::time::Instant::now();
    let out = escalator(&[
        "check-config",
        "--connect",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("try mailbox.security = \"tls\""), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "no long silence"
    );

    std::fs::write(&cfg, config(Some(&ca.0))).unwrap();
    let read_log =
        || std::fs::read_to_string(stack.dir.join("log/postfix.log")).unwrap_or_default();
    let before = read_log().len();
    escalator_ok(&["run", "--once", "--config", cfg.to_str().unwrap()]);
    let lines = wait_sessions(&stack, 1).await;
    // Only the run's sessions (the refused handshakes above are lost
    // connections, as they should be).
    let log = read_log()[before..].to_string();
    let ours: Vec<&String> = lines.iter().filter(|l| count(l, "starttls") == 1).collect();
    assert!(!ours.is_empty(), "{log}");
    for l in &ours {
        assert_eq!(count(l, "quit"), 1, "{l}");
    }
    assert!(!log.contains("lost connection"), "{log}");
    assert!(!log.to_lowercase().contains("ssl_read"), "{log}");
}

/// The daemon keeps its SMTP connection for the next mail, but not for
/// ever: after 30 s without mail the session is ended with QUIT (not
/// left for the server to time out), while the daemon runs on.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_session_is_ended_with_quit_while_the_daemon_runs() {
    let s = Setup::new(&["support", "tier2", "gina"], "");
    let mut d = s.daemon();
    s.stack.deliver_maildir(
        "support",
        &mail(
            &MailStack::addr("gina"),
            &MailStack::addr("support"),
            "Kept connection",
            "gina-1@example.org",
            "",
            "Hello.",
        ),
        1,
    );
    assert_eq!(
        s.stack
            .wait_for("gina", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    // Sent, the session kept open: no disconnect of ours yet.
    assert!(sessions(&s.stack).is_empty(), "{:?}", sessions(&s.stack));
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while sessions(&s.stack).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(d.alive(), "the daemon runs on");
    let lines = sessions(&s.stack);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(count(&lines[0], "quit"), 1, "ended with QUIT: {}", lines[0]);
    assert!(!lines[0].contains("timeout"), "{}", lines[0]);
    let out = d.stop();
    assert!(out.status.success());
}
