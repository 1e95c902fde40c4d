//! The gateway end to end (issue 2): mail in over IMAP, cases in sled,
//! acknowledgements out over SMTP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{escalator, header, mail, Setup};

fn customer(n: usize) -> String {
    format!("c{n}")
}

fn acks_for(raw: &[Vec<u8>]) -> Vec<&Vec<u8>> {
    raw.iter()
        .filter(|m| header(m, "X-Escalator-Case").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn new_mail_becomes_a_case_and_gets_exactly_one_ack() {
    let s = Setup::new(&["support", "alice"], "");
    let original = mail(
        "Alice Example <alice@example.test>",
        "support@example.test",
        "Printer on fire",
        "first@alice.example.test",
        "",
        "My printer is on fire. Please help.",
    );
    s.send("alice", &original);
    s.stack.settle().await;
    s.once();

    let cases = s.cases();
    assert_eq!(cases.len(), 1, "{cases:?}");
    let c = &cases[0];
    assert_eq!(c["customer"], "alice@example.test");
    assert_eq!(c["subject"], "Printer on fire");
    assert_eq!(c["status"], "open");
    assert_eq!(c["tier"], "Frontline");
    assert_eq!(c["messages"], 1);
    assert_eq!(c["escalations"], 0);
    let id = c["id"].as_u64().unwrap();
    let created = chrono::DateTime::parse_from_rfc3339(c["created_at"].as_str().unwrap()).unwrap();
    let due = chrono::DateTime::parse_from_rfc3339(c["due_at"].as_str().unwrap()).unwrap();
    assert_eq!(due - created, chrono::Duration::hours(4));

    let inbox = s.stack.wait_for("alice", 1, Duration::from_secs(20)).await;
    assert_eq!(inbox.len(), 1);
    let ack = &inbox[0];
    let subject = header(ack, "Subject").unwrap();
    assert_eq!(subject, format!("[Case #{id}] Re: Printer on fire"));
    assert_eq!(
        header(ack, "In-Reply-To").unwrap(),
        "<first@alice.example.test>"
    );
    assert!(header(ack, "References")
        .unwrap()
        .contains("<first@alice.example.test>"));
    assert_eq!(header(ack, "Auto-Submitted").unwrap(), "auto-replied");
    assert_eq!(header(ack, "Precedence").unwrap(), "bulk");
    assert_eq!(header(ack, "X-Auto-Response-Suppress").unwrap(), "All");
    assert!(header(ack, "X-Escalator-Loop").is_some());
    assert!(header(ack, "From")
        .unwrap()
        .contains("support@example.test"));
    assert!(header(ack, "Message-ID")
        .unwrap()
        .ends_with("@example.test>"));
    let body = escalator::message::parse(ack).text;
    assert!(body.contains(&format!("case #{id}")), "{body}");
    assert!(body.contains("within 4 hours"), "{body}");
    assert!(body.contains("UTC"), "the ETA names its zone: {body}");

    // Another cycle sends nothing again.
    s.once();
    s.stack.settle().await;
    assert_eq!(s.stack.fetch("alice", "INBOX").await.len(), 1);
    // The daemon never marks customers' mail as read, never deletes it;
    // the support mailbox also holds the ack's confirmation copy.
    let flags = s.stack.flags("support", "INBOX").await;
    let customer: Vec<_> = flags
        .iter()
        .filter(|(m, _)| header(m, "From").unwrap().contains("alice@"))
        .collect();
    assert_eq!(customer.len(), 1);
    assert!(
        !customer[0].1.contains("Seen"),
        "flags: {:?}",
        customer[0].1
    );
    let copies: Vec<_> = flags
        .iter()
        .filter(|(m, _)| header(m, "Message-ID") == header(ack, "Message-ID"))
        .collect();
    assert_eq!(copies.len(), 1, "one confirmation copy of the ack");
    let history = s.show(id)["history"].as_array().unwrap().clone();
    let kinds: Vec<&str> = history
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"created") && kinds.contains(&"ack_queued") && kinds.contains(&"mail_sent"),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_join_by_tag_or_by_reference_without_a_second_ack() {
    let s = Setup::new(&["support", "alice", "bob", "mallory"], "");
    s.send(
        "alice",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Login broken",
            "a1@x.test",
            "Cc: bob@example.test\r\n",
            "Cannot log in.",
        ),
    );
    s.stack.settle().await;
    s.once();
    let id = s.cases()[0]["id"].as_u64().unwrap();
    s.stack.wait_for("alice", 1, Duration::from_secs(20)).await;

    // A reply that keeps the tag.
    s.send(
        "alice",
        &mail(
            "alice@example.test",
            "support@example.test",
            &format!("Re: [Case #{id}] Login broken"),
            "a2@x.test",
            "",
            "Still broken.",
        ),
    );
    // A reply whose client dropped the tag but kept In-Reply-To.
    s.send(
        "alice",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Login broken",
            "a3@x.test",
            "In-Reply-To: <a2@x.test>\r\nReferences: <a1@x.test> <a2@x.test>\r\n",
            "Hello?",
        ),
    );
    // Bob, whom Alice had in Cc, answers without the tag.
    s.send(
        "bob",
        &mail(
            "bob@example.test",
            "support@example.test",
            "Re: Login broken",
            "b1@x.test",
            "In-Reply-To: <a1@x.test>\r\n",
            "Same here.",
        ),
    );
    s.stack.settle().await;
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 1, "{cases:#?}");
    assert_eq!(cases[0]["messages"], 4);
    s.stack.settle().await;
    assert_eq!(
        s.stack.fetch("alice", "INBOX").await.len(),
        1,
        "no second ack"
    );
    assert_eq!(s.stack.fetch("bob", "INBOX").await.len(), 0);
    let shown = s.show(id);
    let vias: Vec<String> = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| e["via"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(vias, vec!["tag", "reference", "reference"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stranger_using_someone_elses_tag_gets_a_new_case() {
    let s = Setup::new(&["support", "alice", "mallory"], "");
    s.send(
        "alice",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Invoice question",
            "a1@x.test",
            "",
            "Private details.",
        ),
    );
    s.stack.settle().await;
    s.once();
    let alice_case = s.cases()[0]["id"].as_u64().unwrap();
    s.send(
        "mallory",
        &mail(
            "mallory@example.test",
            "support@example.test",
            &format!("Re: [Case #{alice_case}] Invoice question"),
            "m1@x.test",
            "In-Reply-To: <a1@x.test>\r\n",
            "Send me the invoice.",
        ),
    );
    s.stack.settle().await;
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 2);
    let alice = cases.iter().find(|c| c["id"] == alice_case).unwrap();
    assert_eq!(alice["messages"], 1, "nothing of Mallory's in Alice's case");
    let mallory = cases.iter().find(|c| c["id"] != alice_case).unwrap();
    assert_eq!(mallory["customer"], "mallory@example.test");
    let inbox = s
        .stack
        .wait_for("mallory", 1, Duration::from_secs(20))
        .await;
    assert_eq!(inbox.len(), 1);
    let body = escalator::message::parse(inbox[0].as_slice()).text;
    assert!(!body.contains("Private details"));
    assert!(header(&inbox[0], "Subject")
        .unwrap()
        .starts_with(&format!("[Case #{}]", mallory["id"])));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_messages_from_fifty_customers_give_the_expected_cases() {
    let mut users = vec!["support".to_string()];
    users.extend((0..50).map(customer));
    let users_ref: Vec<&str> = users.iter().map(String::as_str).collect();
    let s = Setup::new(&users_ref, "[cases]\nauto_reply_limit = 10\n");
    // Each customer opens two threads, then replies twice to each; as
    // real clients do, References carry the thread's root, so a reply
    // delivered before its parent still finds its case.
    for round in 0..2 {
        for c in 0..50 {
            let who = format!("{}@example.test", customer(c));
            s.stack.deliver_maildir(
                "support",
                &mail(
                    &who,
                    "support@example.test",
                    &format!("Question {round} from {c}"),
                    &format!("q{round}-{c}@x.test"),
                    "",
                    "Hi",
                ),
                round * 50 + c,
            );
        }
    }
    // Let Dovecot give the first messages their UIDs before the replies.
    assert_eq!(s.stack.fetch("support", "INBOX").await.len(), 100);
    for c in 0..50 {
        let who = format!("{}@example.test", customer(c));
        for round in 0..2 {
            for n in 0..2 {
                let parent = if n == 0 {
                    format!("q{round}-{c}@x.test")
                } else {
                    format!("r{round}-0-{c}@x.test")
                };
                s.stack.deliver_maildir(
                    "support",
                    &mail(&who, "support@example.test", &format!("Re: Question {round} from {c}"), &format!("r{round}-{n}-{c}@x.test"), &format!("In-Reply-To: <{parent}>\r\nReferences: <q{round}-{c}@x.test> <{parent}>\r\n"), "More"),
                    1000 + c * 10 + round * 2 + n,
                );
            }
        }
    }
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 100, "two cases per customer");
    for c in &cases {
        assert_eq!(c["messages"], 3, "{c}");
    }
    let mut per_customer = std::collections::HashMap::new();
    for c in &cases {
        *per_customer
            .entry(c["customer"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert!(per_customer.values().all(|n| *n == 2), "{per_customer:?}");
    s.stack.settle().await;
    for c in [0, 17, 49] {
        let inbox = s.stack.fetch(&customer(c), "INBOX").await;
        assert_eq!(acks_for(&inbox).len(), 2, "customer {c}: one ack per case");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_half_way_and_restarting_gives_no_duplicates() {
    let mut users = vec!["support".to_string()];
    users.extend((0..20).map(customer));
    let users_ref: Vec<&str> = users.iter().map(String::as_str).collect();
    let s = Setup::new(&users_ref, "[cases]\nauto_reply_limit = 100\n");
    let total = 300;
    for i in 0..total {
        let who = format!("{}@example.test", customer(i % 20));
        s.stack.deliver_maildir(
            "support",
            &mail(
                &who,
                "support@example.test",
                &format!("Topic {i}"),
                &format!("t{i}@x.test"),
                "",
                &"x".repeat(2000),
            ),
            i,
        );
    }
    let mut d = s.daemon();
    // Stop as soon as the daemon has made some cases.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = escalator(&["cases", "list", "--json", "--config", s.cfg()]);
        if out.status.success() {
            let n = serde_json::from_slice::<Value>(&out.stdout)
                .unwrap()
                .as_array()
                .unwrap()
                .len();
            if n > 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "daemon made no case");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = d.stop();
    assert!(
        out.status.success(),
        "SIGTERM exits 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), total, "every message exactly one case");
    assert!(cases.iter().all(|c| c["messages"] == 1));
    s.stack.settle().await;
    let mut acks = 0;
    for c in 0..20 {
        let inbox = s.stack.fetch(&customer(c), "INBOX").await;
        let mut subjects: Vec<String> = acks_for(&inbox)
            .iter()
            .map(|m| header(m, "Subject").unwrap())
            .collect();
        let n = subjects.len();
        subjects.sort();
        subjects.dedup();
        assert_eq!(subjects.len(), n, "customer {c} got a duplicate ack");
        assert_eq!(n, total / 20, "customer {c}: one ack per case");
        acks += n;
    }
    assert_eq!(acks, total);
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_replies_bounces_and_list_mail_get_no_ack() {
    let s = Setup::new(&["support", "dave", "erin", "frank"], "");
    s.send(
        "dave",
        &mail(
            "dave@example.test",
            "support@example.test",
            "Out of office",
            "ooo@x.test",
            "Auto-Submitted: auto-replied\r\n",
            "I am away.",
        ),
    );
    let bounce = b"From: MAILER-DAEMON@mx.example.test\r\nTo: support@example.test\r\n\
Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <bounce@x.test>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
--b\r\nContent-Type: text/plain\r\n\r\nCould not deliver.\r\n\
--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.test\r\n\r\n\
Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n";
    s.stack.send("", &["support@example.test"], bounce).unwrap();
    s.send(
        "erin",
        &mail(
            "erin@example.test",
            "support@example.test",
            "[list] weekly news",
            "list@x.test",
            "List-Id: <news.example.test>\r\nPrecedence: list\r\n",
            "News.",
        ),
    );
    s.send(
        "frank",
        &mail(
            "frank@example.test",
            "support@example.test",
            "Auto: received",
            "auto@x.test",
            "X-Autoreply: yes\r\n",
            "Thanks.",
        ),
    );
    s.stack.settle().await;
    let out = escalator(&["run", "--once", "--config", s.cfg()]);
    eprintln!("ONCE {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("doveadm")
        .arg("-c")
        .arg(s.stack.dir.join("dovecot.conf"))
        .args([
            "mailbox",
            "status",
            "-u",
            "support",
            "uidvalidity uidnext messages",
            "INBOX",
        ])
        .output()
        .unwrap();
    eprintln!("STATUS {}", String::from_utf8_lossy(&out.stdout));
    let cases = s.cases();
    // The bounce reports on no mail escalator sent: counted and logged,
    // never a case (issue 18); the other robots' mail is stored.
    assert_eq!(cases.len(), 3, "every message but the bounce is in a case");
    assert!(
        cases
            .iter()
            .all(|c| !c["customer"].as_str().unwrap().contains("mailer-daemon")),
        "{cases:?}"
    );
    for c in &cases {
        let shown = s.show(c["id"].as_u64().unwrap());
        let kinds: Vec<&str> = shown["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert!(kinds.contains(&"ack_suppressed"), "{kinds:?}");
        assert!(!kinds.contains(&"ack_queued"), "{kinds:?}");
    }
    let out = escalator(&["outbox", "list", "--all", "--json", "--config", s.cfg()]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    s.stack.settle().await;
    for u in ["dave", "erin", "frank"] {
        assert_eq!(s.stack.fetch(u, "INBOX").await.len(), 0, "{u} got mail");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn once_on_an_empty_mailbox_exits_zero_quickly() {
    let s = Setup::new(&["support"], "");
    let start = Instant::now();
    s.once();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    assert!(s.cases().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_acks_new_mail_via_idle_and_the_cli_works_while_it_runs() {
    let s = Setup::new(&["support", "gina"], "");
    // A long poll interval: only IDLE can make this fast.
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("poll_interval = \"1s\"", "poll_interval = \"10m\"");
    std::fs::write(&s.config, text).unwrap();
    let mut d = s.daemon();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.send(
        "gina",
        &mail(
            "gina@example.test",
            "support@example.test",
            "Hello",
            "g1@x.test",
            "",
            "Hi",
        ),
    );
    let inbox = s.stack.wait_for("gina", 1, Duration::from_secs(30)).await;
    assert_eq!(inbox.len(), 1, "ack arrives while the daemon idles");
    // The CLI reaches the store through the running daemon.
    let cases = s.cases();
    assert_eq!(cases.len(), 1);
    // A second daemon on the same store is refused with a clear message.
    let out = escalator(&["run", "--once", "--config", s.cfg()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another escalator process"), "{err}");
    let out = d.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    let good =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"))
            .unwrap();
    std::fs::write(
        &p,
        good.replace("poll_interval = \"30s\"", "pol_interval = \"30s\""),
    )
    .unwrap();
    let out = escalator(&["check-config", "--config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mailbox.pol_interval"), "{err}");
    assert!(err.contains("line "), "{err}");

    std::fs::write(&p, &good).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(["check-config", "--config", p.to_str().unwrap()])
        .env("ESCALATOR_DEMO_PASSWORD", "hunter2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Frontline"), "{text}");
    assert!(!text.contains("hunter2"), "secrets never printed");
}

#[test]
fn store_only_commands_need_no_mail_secrets() {
    // Input: an admin (or cron job) runs `stats` and `cases list` on the
    // demo config without the IMAP/SMTP password variable: they read only
    // the store and must work; `check-config` warns, `run` refuses.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("demo.toml");
    let demo =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"))
            .unwrap();
    let store = dir.path().join("store");
    std::fs::write(
        &p,
        demo.replace("/tmp/escalator-demo/store", store.to_str().unwrap()),
    )
    .unwrap();
    let cfg = p.to_str().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_escalator"))
            .args(args)
            .env_remove("ESCALATOR_DEMO_PASSWORD")
            .output()
            .unwrap()
    };
    for args in [
        &["stats", "--config", cfg][..],
        &["stats", "--config", cfg, "--json"],
        &["cases", "list", "--config", cfg],
        &["outbox", "list", "--config", cfg],
        &["quarantine", "list", "--config", cfg],
    ] {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["check-config", "--config", cfg]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("mailbox.password_env"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(1), "not ready to run: {err}");
    let out = run(&["run", "--once", "--config", cfg]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("ESCALATOR_DEMO_PASSWORD"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes off a terminal: {err:?}"
    );
    // A huge --since is a clear error, not a panic.
    let out = run(&["stats", "--config", cfg, "--since", "100000000d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("too long") && !err.contains("panicked"),
        "{err}"
    );
}

/// Every file of the corpus named by ESCALATOR_CORPUS ends up in exactly
/// one case, with no panic and nothing quarantined.
#[tokio::test(flavor = "multi_thread")]
async fn corpus_every_message_in_exactly_one_case() {
    let Ok(root) = std::env::var("ESCALATOR_CORPUS") else {
        eprintln!("ESCALATOR_CORPUS not set; the corpus test has nothing to deliver");
        return;
    };
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::from(&root)];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if p.is_file()
            && !matches!(p.extension().and_then(|e| e.to_str()), Some("txt" | "md"))
            && !p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("COPYING")
        {
            files.push(p);
        }
    }
    assert!(!files.is_empty(), "no files under {root}");
    let s = Setup::new(&["support"], "");
    let mut distinct = std::collections::HashSet::new();
    for (i, f) in files.iter().enumerate() {
        let raw = std::fs::read(f).unwrap();
        let m = escalator::message::parse(&raw);
        distinct.insert((m.message_id, m.content_hash));
        s.stack.deliver_maildir("support", &raw, i);
    }
    let delivered = s.stack.fetch("support", "INBOX").await.len();
    assert_eq!(delivered, files.len(), "Dovecot holds every file");
    s.once();
    let total: u64 = s
        .cases()
        .iter()
        .map(|c| c["messages"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total as usize,
        distinct.len(),
        "each distinct message in exactly one case"
    );
    let out = escalator(&["quarantine", "list", "--json", "--config", s.cfg()]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_uidvalidity_rescans_without_duplicates() {
    let s = Setup::new(&["support", "hana"], "[cases]\nauto_reply_limit = 10\n");
    for n in 0..3 {
        s.send(
            "hana",
            &mail(
                "hana@example.test",
                "support@example.test",
                &format!("Q{n}"),
                &format!("h{n}@x.test"),
                "",
                "?",
            ),
        );
    }
    s.stack.settle().await;
    s.once();
    assert_eq!(s.cases().len(), 3);
    let status = Command::new("doveadm")
        .arg("-c")
        .arg(s.stack.dir.join("dovecot.conf"))
        .args([
            "mailbox",
            "update",
            "-u",
            "support",
            "--uid-validity",
            "424242",
            "INBOX",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    s.send(
        "hana",
        &mail(
            "hana@example.test",
            "support@example.test",
            "Q3",
            "h3@x.test",
            "",
            "?",
        ),
    );
    s.stack.settle().await;
    s.once();
    let cases = s.cases();
    assert_eq!(
        cases.len(),
        4,
        "old messages not ingested again, the new one is"
    );
    assert!(cases.iter().all(|c| c["messages"] == 1));
    s.stack.settle().await;
    assert_eq!(acks_for(&s.stack.fetch("hana", "INBOX").await).len(), 4);
}
