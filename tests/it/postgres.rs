//! The PostgreSQL engine (issue 12): the daemon's store in a
//! private PostgreSQL database instead of sled.

use std::time::Duration;

use crate::support::{escalator, escalator_ok, header, mail, Setup};

use crate::postgres_server::Postgres;

/// The same config for a second node (its own directory, the same
/// database); the temp dir holding it, and its path.
fn second_node(s: &Setup) -> (tempfile::TempDir, std::path::PathBuf) {
    let other = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        &format!(
            "path = \"{}",
            s.config.parent().unwrap().join("store").display()
        ),
        &format!("path = \"{}", other.path().join("node2").display()),
    );
    let second = other.path().join("escalator.toml");
    std::fs::write(&second, text).unwrap();
    (other, second)
}

/// The tests' usual config with its store in database `db` of `pg`.
fn on_postgres(users: &[&str], pg: &Postgres, db: &str, security: &str) -> Setup {
    let url = pg.database(db);
    Setup::build(users, |stack, store| {
        stack.config("support", store, "").replacen(
            "[store]\n",
            &format!("[store]\nengine = \"postgres\"\nurl = \"{url}\"\n{security}"),
            1,
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_keeps_its_cases_in_postgresql_and_another_node_leaves_its_mailbox_alone() {
    let pg = Postgres::start();
    let s = on_postgres(
        &["support", "alice"],
        &pg,
        "it_daemon",
        "security = \"plain\"\n",
    );
    let out = escalator(&["check-config", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("store:   postgres"),
        "{text}"
    );
    s.send(
        "alice",
        &mail(
            "Alice <alice@example.test>",
            "support@example.test",
            "Printer on fire",
            "pg1@alice.test",
            "",
            "Help.",
        ),
    );
    s.stack.settle().await;
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 1, "{cases:?}");
    assert_eq!(cases[0]["customer"], "alice@example.test");
    let acks = s.stack.wait_for("alice", 1, Duration::from_secs(20)).await;
    assert_eq!(acks.len(), 1);
    assert!(header(&acks[0], "Subject")
        .unwrap()
        .contains("Printer on fire"));
    // Nothing again on the next cycle: the cursor and the outbox are in
    // the database too.
    s.once();
    assert_eq!(s.cases().len(), 1);

    // The daemon holds the mailbox's lease: a cycle of another node
    // skips it rather than reading it a second time.
    let mut d = s.daemon();
    d.wait_log("lease taken", 1, Duration::from_secs(20)).await;
    let (_other, second) = second_node(&s);
    let out = escalator(&["run", "--once", "--config", second.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("another node watches this mailbox; skipped"),
        "{err}"
    );
    // The CLI of another node reads the database directly.
    let out = escalator_ok(&[
        "cases",
        "list",
        "--json",
        "--config",
        second.to_str().unwrap(),
    ]);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    let out = d.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_connection_uses_tls_unless_told_otherwise() {
    // The test server speaks no TLS: with the default security the
    // connection is refused, never quietly made in plain text.
    let pg = Postgres::start();
    let s = on_postgres(&["support"], &pg, "it_tls", "");
    let out = escalator(&["run", "--once", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.to_lowercase().contains("tls") || err.contains("SSL"),
        "{err}"
    );
    // A bad engine name or a url without engine = "postgres" is refused
    // naming the key.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("engine = \"postgres\"", "engine = \"mysql\""),
    )
    .unwrap();
    let out = escalator(&["check-config", "--config", s.cfg()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.engine"));
    std::fs::write(&s.config, text.replace("engine = \"postgres\"\n", "")).unwrap();
    let out = escalator(&["check-config", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store.url: only with engine = \"postgres\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_connection_checks_the_server_certificate_against_ca_file() {
    let certs = tempfile::tempdir().unwrap();
    let ca = crate::support::private_ca(certs.path());
    let (cert, key) = crate::support::server_cert(certs.path(), "pg", &["127.0.0.1"], &ca);
    let pg = Postgres::start_tls(&cert, &key);
    let ca_file = format!("ca_file = \"{}\"\n", ca.0.display());
    let s = on_postgres(&["support", "alice"], &pg, "it_ca", &ca_file);
    s.send(
        "alice",
        &mail(
            "Alice <alice@example.test>",
            "support@example.test",
            "Over TLS",
            "ca1@alice.test",
            "",
            "Help.",
        ),
    );
    s.stack.settle().await;
    s.once();
    assert_eq!(s.cases().len(), 1);
    // Another CA's certificate is refused: no store is opened.
    let other = tempfile::tempdir().unwrap();
    let stranger = crate::support::private_ca(other.path());
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace(
            &ca.0.display().to_string(),
            &stranger.0.display().to_string(),
        ),
    )
    .unwrap();
    let out = escalator(&["cases", "list", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_migrate_copies_a_sled_store_and_the_daemon_goes_on_without_a_second_ack() {
    let s = Setup::new(&["support", "alice", "bob"], "");
    let send = |who: &str, id: &str| {
        s.send(
            who,
            &mail(
                &format!("{who} <{who}@example.test>"),
                "support@example.test",
                "Printer",
                id,
                "",
                "Help.",
            ),
        )
    };
    send("alice", "m1@alice.test");
    s.stack.settle().await;
    s.once();
    assert_eq!(
        s.stack
            .wait_for("alice", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    let sled_path = s.config.parent().unwrap().join("store");

    // The same config, its store moved to PostgreSQL.
    let pg = Postgres::start();
    let url = pg.database("it_migrate");
    let node = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        &format!("path = \"{}\"", sled_path.display()),
        &format!(
            "path = \"{}\"\nengine = \"postgres\"\nurl = \"{url}\"\nsecurity = \"plain\"",
            node.path().join("node").display()
        ),
    );
    let pg_cfg = node.path().join("escalator.toml");
    std::fs::write(&pg_cfg, text).unwrap();
    let cfg = pg_cfg.to_str().unwrap();
    let migrate = || {
        escalator(&[
            "store",
            "migrate",
            "--from-sled",
            sled_path.to_str().unwrap(),
            "--config",
            cfg,
        ])
    };
    let out = migrate();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("copied and verified"), "{text}");
    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .map(|n| n.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(count("cases "), 1);
    assert_eq!(count("messages "), 1);
    assert_eq!(count("outbox "), 1, "the ack, sent");
    // Again: nothing to do, the counts still agree.
    let again = migrate();
    assert!(String::from_utf8_lossy(&again.stdout).contains("finished copy already"));

    // The daemon on PostgreSQL goes on from where sled stopped: the
    // mailbox is not re-read into a second ack, and numbering goes on.
    let once = escalator(&["run", "--once", "--config", cfg]);
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    send("bob", "m2@bob.test");
    s.stack.settle().await;
    let once = escalator(&["run", "--once", "--config", cfg]);
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let out = escalator(&["cases", "list", "--json", "--config", cfg]);
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> = cases.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2], "{cases:?}");
    assert_eq!(
        s.stack
            .wait_for("bob", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    s.stack.settle().await;
    assert_eq!(
        s.stack.fetch("alice", "INBOX").await.len(),
        1,
        "no second ack"
    );
    // Into a database that holds a store already: refused.
    let other = tempfile::tempdir().unwrap();
    let sled2 = other.path().join("store");
    std::fs::create_dir_all(&sled2).unwrap();
    let out = escalator(&[
        "store",
        "migrate",
        "--from-sled",
        sled2.to_str().unwrap(),
        "--config",
        cfg,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("already holds a store"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_mid_run_loses_nothing_and_both_daemons_go_on() {
    let pg = Postgres::start();
    let s = on_postgres(
        &["support", "alice", "bob"],
        &pg,
        "it_restart",
        "security = \"plain\"\n",
    );
    // Two nodes: both must come back.
    let mut d = s.node("n1");
    let mut d2 = s.node("n2");
    let send = |who: &str, id: &str| {
        s.send(
            who,
            &mail(
                &format!("{who} <{who}@example.test>"),
                "support@example.test",
                "Hello",
                id,
                "",
                "Help.",
            ),
        )
    };
    send("alice", "r1@alice.test");
    assert_eq!(
        s.stack
            .wait_for("alice", 1, Duration::from_secs(30))
            .await
            .len(),
        1
    );
    // Every connection is cut; the daemon reconnects by itself.
    pg.restart();
    send("bob", "r2@bob.test");
    let bob = s.stack.wait_for("bob", 1, Duration::from_secs(60)).await;
    let log = d.log();
    assert_eq!(
        bob.len(),
        1,
        "bob's mail after the restart was answered:\n{log}"
    );
    // Both nodes are back in the cluster, and the mailbox is watched.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = escalator(&["cluster", "status", "--json", "--config", s.cfg()]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let alive = status["nodes"]
            .as_array()
            .map(|n| n.iter().filter(|n| n["alive"] == true).count());
        if alive == Some(2) && !status["mailboxes"][0]["holder"].is_null() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for d in [&mut d, &mut d2] {
        let out = d.stop();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cases = s.cases();
    assert_eq!(cases.len(), 2, "{cases:?}");
    s.stack.settle().await;
    assert_eq!(
        s.stack.fetch("alice", "INBOX").await.len(),
        1,
        "no second ack"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn work_committed_by_another_process_wakes_the_daemon_at_once() {
    // The CLI of another node writes the database directly: its
    // escalation's forward is sent by the daemon within seconds (NOTIFY),
    // not at the daemon's next poll.
    let pg = Postgres::start();
    let s = on_postgres(
        &["support", "alice", "tier2"],
        &pg,
        "it_notify",
        "security = \"plain\"\n",
    );
    let mut d = s.daemon();
    s.send(
        "alice",
        &mail(
            "Alice <alice@example.test>",
            "support@example.test",
            "Printer",
            "n1@alice.test",
            "",
            "Help.",
        ),
    );
    assert_eq!(
        s.stack
            .wait_for("alice", 1, Duration::from_secs(30))
            .await
            .len(),
        1
    );
    let (_other, second) = second_node(&s);
    // Let the daemon settle (the ack's confirmation copy ingested) into
    // its sleep first.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let started = std::time::Instant::now();
    escalator_ok(&[
        "cases",
        "escalate",
        "1",
        "--reason",
        "VIP",
        "--config",
        second.to_str().unwrap(),
    ]);
    let fwd = s.stack.wait_for("tier2", 1, Duration::from_secs(30)).await;
    assert_eq!(fwd.len(), 1, "{}", d.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken, not polled: {:?}",
        started.elapsed()
    );
    let out = d.stop();
    assert!(out.status.success());
}

/// `check-config --connect` with a PostgreSQL store: connects and says
/// whether the store is there, creating nothing (a newer binary's check
/// beside a running cluster must not upgrade its schema); a database
/// that refuses is a failure naming the keys.
#[tokio::test(flavor = "multi_thread")]
async fn check_config_connect_reaches_postgresql_without_creating_anything() {
    let pg = Postgres::start();
    let s = on_postgres(&["support"], &pg, "it_check", "security = \"plain\"\n");
    let out = escalator(&["check-config", "--connect", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OK      store (PostgreSQL)"), "{text}");
    assert!(
        text.contains("no store yet"),
        "nothing created by the check: {text}"
    );
    // After a run the tables are there, and the check says so.
    s.once();
    let out = escalator_ok(&["check-config", "--connect", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("the store's tables are there"), "{text}");
    // A database that does not exist.
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("dbname=it_check", "dbname=it_no_such_db");
    std::fs::write(&s.config, text).unwrap();
    let out = escalator(&["check-config", "--connect", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("FAILED  store (PostgreSQL)"), "{text}");
    assert!(text.contains("hint: check store.url"), "{text}");
}
