//! Reliability under server faults, bad input, loops and floods (issue 4).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{escalator, header, mail, MailStack, Setup};

fn json(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Hostile and broken messages of every kind the issue names.
fn bad_messages() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    out.push((
        "no message-id",
        b"From: a1@example.test\r\nSubject: no id\r\n\r\nbody\r\n".to_vec(),
    ));
    out.push((
        "same id, first",
        b"From: a2@example.test\r\nSubject: twin\r\nMessage-ID: <twin@x.test>\r\n\r\nfirst\r\n"
            .to_vec(),
    ));
    out.push(("same id, second", b"From: a2@example.test\r\nSubject: twin\r\nMessage-ID: <twin@x.test>\r\n\r\nsecond, different\r\n".to_vec()));
    let mut refs = String::from(
        "From: a3@example.test\r\nSubject: refs\r\nMessage-ID: <refs@x.test>\r\nReferences:",
    );
    for i in 0..3000 {
        refs.push_str(&format!(" <r{i}@x.test>\r\n"));
    }
    refs.push_str("\r\nbody\r\n");
    out.push(("3000 references", refs.into_bytes()));
    let mut eight = b"From: a4@example.test\r\nSubject: caf\xe9 \xff\xfe na\xefve\r\nX-Name: \xc0\xc1\r\nMessage-ID: <8bit@x.test>\r\n\r\n\xe9t\xe9\r\n".to_vec();
    eight.extend_from_slice(b"");
    out.push(("8-bit headers", eight));
    out.push(("encoded-word soup", b"From: =?x-unknown?B?SGFsbG8=?= <a5@example.test>\r\nSubject: =?utf-8?Q?caf=C3=A9?= =?iso-8859-1?Q?=E9?= =?bogus?X?zz?= =?utf-8?B?not base64!?= plain\r\nMessage-ID: <soup@x.test>\r\nContent-Type: text/plain; charset=x-made-up\r\n\r\n\xe9\r\n".to_vec()));
    out.push(("0 bytes", Vec::new()));
    out.push((
        "only headers",
        b"From: a6@example.test\r\nSubject: only headers\r\nMessage-ID: <hdr@x.test>\r\n".to_vec(),
    ));
    let mut nested = String::from("From: a7@example.test\r\nSubject: nested\r\nMessage-ID: <nest@x.test>\r\nMIME-Version: 1.0\r\n");
    for i in 0..60 {
        nested.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    nested.push_str("Content-Type: text/plain\r\n\r\ndeep\r\n");
    for i in (0..60).rev() {
        nested.push_str(&format!("--b{i}--\r\n"));
    }
    out.push(("deeply nested", nested.into_bytes()));
    out.push(("html only", b"From: a8@example.test\r\nSubject: html\r\nMessage-ID: <html@x.test>\r\nContent-Type: text/html\r\n\r\n<html><body><p>Hello <script>alert(1)</script><b>bold</b></p></body></html>\r\n".to_vec()));
    out.push(("calendar invite", b"From: a9@example.test\r\nSubject: Invitation\r\nMessage-ID: <cal@x.test>\r\nContent-Type: multipart/alternative; boundary=c\r\n\r\n--c\r\nContent-Type: text/plain\r\n\r\nMeeting\r\n--c\r\nContent-Type: text/calendar; method=REQUEST\r\n\r\nBEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nSUMMARY:Call\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n--c--\r\n".to_vec()));
    out.push(("no address in From", b"From: undisclosed-recipients:;\r\nSubject: who?\r\nMessage-ID: <nobody@x.test>\r\n\r\nbody\r\n".to_vec()));
    let mut big = b"From: b1@example.test\r\nSubject: huge attachment\r\nMessage-ID: <big@x.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--z\r\nContent-Type: application/octet-stream; name=big.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    let line = [b'A'; 76];
    while big.len() < 30 << 20 {
        big.extend_from_slice(&line);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"--z--\r\n");
    out.push(("30 MB attachment", big));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_every_message_lands_in_exactly_one_case() {
    let s = Setup::new(&["support"], "").with_mailbox("max_message_size = \"1MB\"");
    let msgs = bad_messages();
    let mut distinct = std::collections::HashSet::new();
    for (i, (_, raw)) in msgs.iter().enumerate() {
        s.stack.deliver_maildir("support", raw, i);
    }
    assert_eq!(s.stack.fetch("support", "INBOX").await.len(), msgs.len());
    for (what, raw) in &msgs {
        let m = escalator::message::parse(if *what == "30 MB attachment" {
            // Only the headers of an oversized message are fetched.
            &raw[..raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4]
        } else {
            raw
        });
        distinct.insert((m.message_id, m.content_hash));
    }
    s.once();
    let cases = s.cases();
    let total: u64 = cases.iter().map(|c| c["messages"].as_u64().unwrap()).sum();
    assert_eq!(
        total as usize,
        distinct.len(),
        "every distinct message stored once: {cases:#?}"
    );
    assert_eq!(
        distinct.len(),
        msgs.len(),
        "the twins differ by content, so both are kept"
    );
    let q = json(escalator(&[
        "quarantine",
        "list",
        "--json",
        "--config",
        s.cfg(),
    ]));
    assert_eq!(q, serde_json::json!([]));
    assert!(
        cases.iter().any(|c| c["unassigned"] == true),
        "the unreadable sender is in an unassigned case"
    );
    let big = cases
        .iter()
        .find(|c| c["subject"] == "huge attachment")
        .unwrap();
    let shown = s.show(big["id"].as_u64().unwrap());
    let m = &shown["message_list"][0];
    assert_eq!(m["truncated"], true);
    assert!(m["size"].as_u64().unwrap() >= 30 << 20);
    assert!(
        m["text"].as_str().unwrap().contains("max_message_size"),
        "staff are told"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_down_then_back_sends_each_ack_once() {
    let s = Setup::new(&["support", "alice"], "");
    s.stack.stop_smtp();
    s.stack.deliver_maildir(
        "support",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Hi",
            "h1@x.test",
            "",
            "hello",
        ),
        1,
    );
    s.once();
    let entries = json(escalator(&[
        "outbox",
        "list",
        "--json",
        "--config",
        s.cfg(),
    ]));
    assert_eq!(entries.as_array().unwrap().len(), 1);
    assert_eq!(
        entries[0]["state"], "pending",
        "waits for the server: {entries}"
    );
    assert!(!entries[0]["last_error"].as_str().unwrap().is_empty());
    s.stack.start_smtp();
    s.once();
    s.once();
    s.stack.settle().await;
    let inbox = s.stack.wait_for("alice", 1, Duration::from_secs(20)).await;
    assert_eq!(inbox.len(), 1, "sent once after recovery");
    let entries = json(escalator(&[
        "outbox",
        "list",
        "--all",
        "--json",
        "--config",
        s.cfg(),
    ]));
    assert_eq!(entries[0]["state"], "sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_rejection_is_failed_with_the_servers_words() {
    let s = Setup::new(&["support"], "");
    // ghost@example.test is no mailbox: Postfix refuses the ack with 550.
    s.stack.deliver_maildir(
        "support",
        &mail(
            "ghost@example.test",
            "support@example.test",
            "Boo",
            "g1@x.test",
            "",
            "hello",
        ),
        1,
    );
    s.once();
    let entries = json(escalator(&[
        "outbox",
        "list",
        "--json",
        "--config",
        s.cfg(),
    ]));
    assert_eq!(entries[0]["state"], "failed");
    let err = entries[0]["last_error"].as_str().unwrap();
    assert!(err.contains("550") || err.contains("5.1.1"), "{err}");
    let history = s.show(1)["history"].clone();
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "mail_failed" && e["error"].as_str().unwrap().contains("5.1.1")),
        "{history}"
    );
    // Not retried by itself...
    s.once();
    let entries = json(escalator(&[
        "outbox",
        "list",
        "--json",
        "--config",
        s.cfg(),
    ]));
    assert_eq!(entries[0]["attempts"], 1);
    // ...but a person can.
    let id = entries[0]["id"].as_u64().unwrap().to_string();
    let out = escalator(&["outbox", "retry", &id, "--config", s.cfg()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.once();
    let entries = json(escalator(&[
        "outbox",
        "list",
        "--json",
        "--config",
        s.cfg(),
    ]));
    assert_eq!(entries[0]["attempts"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_reconnects_after_the_imap_server_restarts() {
    let s = Setup::new(&["support", "alice"], "");
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("poll_interval = \"1s\"", "poll_interval = \"10m\"");
    std::fs::write(&s.config, text).unwrap();
    let mut d = s.daemon();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.stack.restart_imap();
    s.send(
        "alice",
        &mail(
            "alice@example.test",
            "support@example.test",
            "After restart",
            "ar1@x.test",
            "",
            "hi",
        ),
    );
    let inbox = s.stack.wait_for("alice", 1, Duration::from_secs(40)).await;
    assert_eq!(inbox.len(), 1, "ingestion resumed by itself");
    let out = d.stop();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_login_is_a_clear_error() {
    let s = Setup::new(&["support"], "");
    let text = std::fs::read_to_string(&s.config).unwrap().replacen(
        "password = \"support\"",
        "password = \"wrong\"",
        1,
    );
    std::fs::write(&s.config, text).unwrap();
    let out = escalator(&["run", "--once", "--config", s.cfg()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("login as support refused"), "{err}");
    assert!(
        !err.contains("wrong"),
        "the password is never printed: {err}"
    );
    assert!(!err.contains("panicked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_mailing_each_other_stop_within_three_messages() {
    let stack = MailStack::start(&["supa", "supb"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg_a = dir.path().join("a.toml");
    let cfg_b = dir.path().join("b.toml");
    std::fs::write(&cfg_a, stack.config("supa", &dir.path().join("a"), "")).unwrap();
    std::fs::write(&cfg_b, stack.config("supb", &dir.path().join("b"), "")).unwrap();
    // Someone writes to A pretending to be B.
    stack
        .send(
            "supb@example.test",
            &["supa@example.test"],
            &mail(
                "supb@example.test",
                "supa@example.test",
                "Hello",
                "start@x.test",
                "",
                "hi",
            ),
        )
        .unwrap();
    stack.settle().await;
    for _ in 0..4 {
        for cfg in [&cfg_a, &cfg_b] {
            let out = escalator(&["run", "--once", "--config", cfg.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        stack.settle().await;
    }
    let a = stack.fetch("supa", "INBOX").await.len();
    let b = stack.fetch("supb", "INBOX").await.len();
    assert!(a + b <= 3, "the exchange stopped: {a} + {b} messages");
    assert!(b >= 1, "A answered the first (human-looking) mail once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_gets_limited_answers_and_every_message_is_stored() {
    let s = Setup::new(&["support", "flood"], "");
    for i in 0..1000 {
        s.stack.deliver_maildir(
            "support",
            &mail(
                "flood@example.test",
                "support@example.test",
                &format!("Spam {i}"),
                &format!("f{i}@x.test"),
                "",
                "buy",
            ),
            i,
        );
    }
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 1000, "every message stored");
    s.stack.settle().await;
    let acks = s.stack.fetch("flood", "INBOX").await.len();
    assert_eq!(acks, 3, "auto_reply_limit (3 per hour) holds");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwards_carry_customer_html_only_as_an_attachment() {
    let s = Setup::new(&["support", "alice", "tier2"], "");
    let html = b"From: alice@example.test\r\nTo: support@example.test\r\nSubject: Look\r\nMessage-ID: <h1@x.test>\r\nContent-Type: text/html\r\n\r\n<p>Click <a href=\"http://evil.example/\">here</a><img src=\"http://evil.example/t.png\"></p>\r\n";
    s.stack.deliver_maildir("support", html, 1);
    s.once();
    let out = escalator(&[
        "cases",
        "escalate",
        "1",
        "--reason",
        "check html",
        "--config",
        s.cfg(),
    ]);
    assert!(out.status.success());
    s.once();
    let fwd = s.stack.wait_for("tier2", 1, Duration::from_secs(20)).await;
    let m = escalator::message::parse(&fwd[0]);
    assert_eq!(
        header(&fwd[0], "Content-Type")
            .unwrap()
            .split(';')
            .next()
            .unwrap(),
        "multipart/mixed"
    );
    assert!(
        !m.text.contains("<img"),
        "no customer HTML in the forward's own text"
    );
    assert_eq!(m.attachments.len(), 1);
    assert_eq!(m.attachments[0].content_type, "message/rfc822");
    let raw = String::from_utf8_lossy(&fwd[0]);
    let html_parts = raw.matches("Content-Type: text/html").count();
    assert_eq!(
        html_parts, 1,
        "the only HTML is inside the attached original"
    );
}

/// A config section's plain connection to the stack (on `old_port`)
/// rewritten for TLS.
pub(crate) fn secured(
    text: &str,
    old_port: u16,
    host: &str,
    port: u16,
    security: &str,
    ca: Option<&std::path::Path>,
) -> String {
    let ca = ca
        .map(|p| format!("ca_file = {:?}\n", p.display().to_string()))
        .unwrap_or_default();
    let old = format!("host = \"127.0.0.1\"\nport = {old_port}\nsecurity = \"plain\"");
    assert!(text.contains(&old));
    text.replacen(
        &old,
        &format!("host = \"{host}\"\nport = {port}\nsecurity = \"{security}\"\n{ca}"),
        1,
    )
}

/// A config watching `support` over implicit TLS on the stack's IMAPS port.
fn tls_config(
    stack: &MailStack,
    store: &std::path::Path,
    host: &str,
    ca: Option<&std::path::Path>,
) -> String {
    let text = stack.config("support", store, "");
    secured(
        &text,
        stack.imap_port,
        host,
        stack.imaps_port.unwrap(),
        "tls",
        ca,
    )
}

/// A directory the mail servers can read, with a private CA (cert, key)
/// and a certificate it signed for 127.0.0.1 (cert, key).
pub(crate) fn certificates() -> (
    tempfile::TempDir,
    (std::path::PathBuf, std::path::PathBuf),
    (std::path::PathBuf, std::path::PathBuf),
) {
    let certs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        certs.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ca = crate::support::private_ca(certs.path());
    let good = crate::support::server_cert(certs.path(), "good", &["127.0.0.1", "localhost"], &ca);
    (certs, ca, good)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_verified_a_private_ca_must_be_given_and_names_must_match() {
    let (certs, ca, (cert, key)) = certificates();
    let stack = MailStack::start_tls(&["support", "alice"], &cert, &key);
    stack.deliver_maildir(
        "support",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Over TLS",
            "t1@x.test",
            "",
            "hi",
        ),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let run = |text: String| {
        std::fs::write(&cfg, text).unwrap();
        escalator(&["run", "--once", "--config", cfg.to_str().unwrap()])
    };

    // A certificate from a private CA is refused without the CA...
    let out = run(tls_config(
        &stack,
        &dir.path().join("s1"),
        "127.0.0.1",
        None,
    ));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS with 127.0.0.1 failed"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // ...and accepted with ca_file.
    let out = run(tls_config(
        &stack,
        &dir.path().join("s2"),
        "127.0.0.1",
        Some(&ca.0),
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases = json(escalator(&[
        "cases",
        "list",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]));
    assert_eq!(cases.as_array().unwrap().len(), 1, "ingested over TLS");

    // A certificate for another name is refused even with its CA.
    let (other, other_key) =
        crate::support::server_cert(certs.path(), "other", &["other.example"], &ca);
    drop(stack);
    let stack = MailStack::start_tls(&["support"], &other, &other_key);
    let out = run(tls_config(
        &stack,
        &dir.path().join("s3"),
        "127.0.0.1",
        Some(&ca.0),
    ));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("not valid for name")
            || err.to_lowercase().contains("notvalidforname"),
        "{err}"
    );
}

#[test]
fn plain_to_a_remote_host_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    let demo = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"),
    )
    .unwrap();
    let remote = demo.replacen("host = \"127.0.0.1\"", "host = \"imap.example.com\"", 1);
    std::fs::write(&p, &remote).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(["check-config", "--config", p.to_str().unwrap()])
        .env("ESCALATOR_DEMO_PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mailbox.security"));
    std::fs::write(
        &p,
        remote.replacen(
            "security = \"plain\"",
            "security = \"plain\"\nallow_insecure = true",
            1,
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(["check-config", "--config", p.to_str().unwrap()])
        .env("ESCALATOR_DEMO_PASSWORD", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct TinyDisk(std::path::PathBuf);

impl TinyDisk {
    fn mount(dir: &std::path::Path, size: &str) -> TinyDisk {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "this test needs root to mount a small tmpfs (./scripts/test runs as root)"
        );
        TinyDisk(dir.to_owned())
    }
    fn grow(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let stack = MailStack::start(&["support", "alice"]);
    let dir = tempfile::tempdir().unwrap();
    let disk = TinyDisk::mount(&dir.path().join("disk"), "3m");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        stack.config(
            "support",
            &dir.path().join("disk/store"),
            "[cases]\nauto_reply_limit = 1000\n",
        ),
    )
    .unwrap();
    let n = 40;
    for i in 0..n {
        let body = format!("{i} {}", "y".repeat(150_000));
        stack.deliver_maildir(
            "support",
            &mail(
                "alice@example.test",
                "support@example.test",
                &format!("Big {i}"),
                &format!("big{i}@x.test"),
                "",
                &body,
            ),
            i,
        );
    }
    let out = escalator(&["run", "--once", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a full disk stops the run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nearly full") && err.contains("store.min_free"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // With room again, the next run stores everything exactly once.
    disk.grow("200m");
    let out = escalator(&["run", "--once", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases = json(escalator(&[
        "cases",
        "list",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]));
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), n);
    assert!(cases.iter().all(|c| c["messages"] == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_started_while_imap_is_down_waits_and_then_ingests() {
    let s = Setup::new(&["support", "alice"], "");
    s.stack.deliver_maildir(
        "support",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Waiting",
            "w1@x.test",
            "",
            "hi",
        ),
        1,
    );
    s.stack.stop_imap();
    let mut d = s.daemon();
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.stack.start_imap();
    let inbox = s.stack.wait_for("alice", 1, Duration::from_secs(60)).await;
    assert_eq!(inbox.len(), 1, "ingested once the server was back");
    let out = d.stop();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("cannot connect to 127.0.0.1"),
        "the outage was logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_with_a_refused_login_keeps_trying_without_crashing() {
    let s = Setup::new(&["support"], "");
    let text = std::fs::read_to_string(&s.config).unwrap().replacen(
        "password = \"support\"",
        "password = \"s3cr3t-wrong\"",
        1,
    );
    std::fs::write(&s.config, text).unwrap();
    let mut d = s.daemon();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = d.stop();
    assert!(out.status.success(), "still running, stops cleanly");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("IMAP login failed"), "{log}");
    assert_eq!(
        log.matches("IMAP login failed").count(),
        1,
        "backs off instead of hammering: {log}"
    );
    assert!(
        !log.contains("s3cr3t-wrong"),
        "the password never reaches the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_deleted_and_recreated_is_rescanned_without_duplicates() {
    let s = Setup::new(&["support", "alice"], "[cases]\nauto_reply_limit = 10\n")
        .with_mailbox("folder = \"Support\"");
    let doveadm = |args: &[&str]| {
        let st = std::process::Command::new("doveadm")
            .arg("-c")
            .arg(s.stack.dir.join("dovecot.conf"))
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "doveadm {args:?}");
    };
    doveadm(&["mailbox", "create", "-u", "support", "Support"]);
    let first = mail(
        "alice@example.test",
        "support@example.test",
        "One",
        "one@x.test",
        "",
        "1",
    );
    s.stack
        .deliver_maildir_folder("support", Some("Support"), &first, 1);
    s.once();
    assert_eq!(s.cases().len(), 1);
    doveadm(&["mailbox", "delete", "-u", "support", "Support"]);
    doveadm(&["mailbox", "create", "-u", "support", "Support"]);
    // The same message comes back, and a new one.
    s.stack
        .deliver_maildir_folder("support", Some("Support"), &first, 2);
    s.stack.deliver_maildir_folder(
        "support",
        Some("Support"),
        &mail(
            "alice@example.test",
            "support@example.test",
            "Two",
            "two@x.test",
            "",
            "2",
        ),
        3,
    );
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 2, "{cases:#?}");
    assert!(cases.iter().all(|c| c["messages"] == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_rejections_are_retried_and_the_mail_goes_out_once() {
    let s = Setup::new(&["support", "alice"], "");
    s.stack
        .recipient_access("alice@example.test 450 4.7.1 try again later\n");
    s.stack.deliver_maildir(
        "support",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Soon",
            "s1@x.test",
            "",
            "hi",
        ),
        1,
    );
    s.once();
    s.once();
    let entries = json(escalator(&[
        "outbox",
        "list",
        "--json",
        "--config",
        s.cfg(),
    ]));
    assert_eq!(
        entries[0]["state"], "pending",
        "a 4xx is retried: {entries}"
    );
    assert!(
        entries[0]["last_error"].as_str().unwrap().contains("4.7.1"),
        "{entries}"
    );
    assert_eq!(entries[0]["attempts"], 2);
    s.stack.recipient_access("");
    s.once();
    s.once();
    s.stack.settle().await;
    assert_eq!(
        s.stack
            .wait_for("alice", 1, Duration::from_secs(20))
            .await
            .len(),
        1,
        "delivered once after recovery"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imap_restart_mid_fetch_loses_and_doubles_nothing() {
    let s = Setup::new(
        &["support", "alice"],
        "[cases]\nauto_reply_limit = 100000\n",
    );
    let n = 3000;
    for i in 0..n {
        s.stack.deliver_maildir(
            "support",
            &mail(
                "alice@example.test",
                "support@example.test",
                &format!("M{i}"),
                &format!("m{i}@x.test"),
                "",
                &"z".repeat(3000),
            ),
            i,
        );
    }
    assert_eq!(s.stack.fetch("support", "INBOX").await.len(), n);
    let mut d = s.daemon();
    // Cut the connection while the daemon is fetching.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = escalator(&["cases", "list", "--json", "--config", s.cfg()]);
        if out.status.success()
            && !serde_json::from_slice::<Value>(&out.stdout)
                .unwrap()
                .as_array()
                .unwrap()
                .is_empty()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon made no case");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stack.restart_imap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cases = json(escalator(&["cases", "list", "--json", "--config", s.cfg()]));
        if cases.as_array().unwrap().len() >= n {
            break;
        }
        assert!(Instant::now() < deadline, "ingestion did not resume");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    d.stop();
    let cases = s.cases();
    assert_eq!(cases.len(), n);
    assert!(cases.iter().all(|c| c["messages"] == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_over_starttls_and_implicit_tls_checks_the_certificate() {
    let (_certs, ca, (cert, key)) = certificates();
    let stack = MailStack::start_tls(&["support", "alice"], &cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let base = stack.config("support", &dir.path().join("store"), "");
    let smtp_tls = |port: u16, security: &str, ca: Option<&std::path::Path>| {
        secured(&base, stack.smtp_port, "127.0.0.1", port, security, ca)
    };
    let run = |text: String| {
        std::fs::write(&cfg, text).unwrap();
        escalator(&["run", "--once", "--config", cfg.to_str().unwrap()])
    };
    let customer = |n: u32| {
        mail(
            "alice@example.test",
            "support@example.test",
            &format!("Mail {n}"),
            &format!("tls{n}@x.test"),
            "",
            "hi",
        )
    };

    // Without the private CA the ack stays queued, the error named: a
    // configuration error (run --once exits 1), with the key to set.
    stack
        .send(
            "alice@example.test",
            &["support@example.test"],
            &customer(1),
        )
        .unwrap();
    stack.settle().await;
    let out = run(smtp_tls(stack.smtp_port, "starttls", None));
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(log.contains("certificate"), "{log}");
    assert!(log.contains("smtp.ca_file"), "{log}");
    assert_eq!(stack.fetch("alice", "INBOX").await.len(), 0);

    // STARTTLS with the CA: the queued ack goes out.
    let out = run(smtp_tls(stack.smtp_port, "starttls", Some(&ca.0)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stack
            .wait_for("alice", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );

    // Implicit TLS (port 465 style).
    stack
        .send(
            "alice@example.test",
            &["support@example.test"],
            &customer(2),
        )
        .unwrap();
    stack.settle().await;
    let smtps = stack.smtps_port.unwrap();
    let out = run(smtp_tls(smtps, "tls", Some(&ca.0)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stack
            .wait_for("alice", 2, Duration::from_secs(20))
            .await
            .len(),
        2
    );
    let log = std::fs::read_to_string(stack.dir.join("log/postfix.log")).unwrap();
    assert!(
        log.contains("TLS connection established"),
        "Postfix saw TLS:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_the_server_will_not_fetch_is_quarantined_and_the_rest_go_on() {
    // Input: one message in the middle of the folder that the IMAP server
    // cannot read (here: its file is unreadable). Its whole chunk failed
    // on every pass (ingest stalled), or a FETCH answer without its body
    // was taken as expunged and the cursor moved past it (lost).
    let s = Setup::new(&["support", "alice"], "");
    for n in 1..=3 {
        let raw = mail(
            "alice@example.test",
            "support@example.test",
            &format!("Topic {n}"),
            &format!("unfetchable-{n}@alice.test"),
            "",
            "hello",
        );
        s.stack.deliver_maildir("support", &raw, n);
    }
    // Let Dovecot index the folder, then take away its read access to
    // the second message's file.
    assert_eq!(s.stack.fetch("support", "INBOX").await.len(), 3);
    let md = s.stack.dir.join("mail/support/Maildir");
    let victim = ["cur", "new"]
        .iter()
        .flat_map(|d| std::fs::read_dir(md.join(d)).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("unfetchable-2@")))
        .expect("the second message's file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Dovecot caches what it read; a fresh index makes it read the file.
    for f in std::fs::read_dir(&md).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with("dovecot.index") {
            let _ = std::fs::remove_file(f.path());
        }
    }
    s.once();
    let subjects: Vec<String> = s
        .cases()
        .iter()
        .map(|c| c["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(subjects.len(), 2, "the others are stored: {subjects:?}");
    assert!(!subjects.contains(&"Topic 2".to_string()));
    let q = escalator(&["quarantine", "list", "--json", "--config", s.cfg()]);
    let q: Value = serde_json::from_slice(&q.stdout).unwrap();
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    // Dovecot numbers the seeded files in no fixed order: the entry names
    // whichever UID the unreadable one got.
    let uid = q[0]["uid"].as_u64().unwrap();
    assert!(
        q[0]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("would not FETCH uid {uid}")),
        "{q:?}"
    );
    // Readable again: a person's retry fetches it on the next pass. (The
    // watcher SELECTs, so Dovecot may have moved the file from new/ to
    // cur/, adding flags to its name: found by its unique part.)
    let unique = victim
        .file_name()
        .unwrap()
        .to_string_lossy()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let victim = ["cur", "new"]
        .iter()
        .flat_map(|d| std::fs::read_dir(md.join(d)).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&unique)
        })
        .expect("the second message's file, in new/ or cur/");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let id = q[0]["id"].to_string();
    let out = escalator(&["quarantine", "retry", &id, "--config", s.cfg()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    s.once();
    assert_eq!(s.cases().len(), 3, "now stored, and nothing twice");
    let q = escalator(&["quarantine", "list", "--json", "--config", s.cfg()]);
    let q: Value = serde_json::from_slice(&q.stdout).unwrap();
    assert_eq!(q.as_array().unwrap().len(), 0);
}
