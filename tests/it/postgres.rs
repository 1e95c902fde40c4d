//! The PostgreSQL engine (issue 12, first step): the daemon's store in a
//! private PostgreSQL database instead of sled.

use std::time::Duration;

use crate::support::{escalator, header, mail, Setup};

#[path = "../../src/testing/postgres.rs"]
mod postgres_server;
use postgres_server::Postgres;

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
async fn the_daemon_keeps_its_cases_in_postgresql_and_a_second_daemon_is_refused() {
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

    // One daemon per database until the cluster is built.
    let mut d = s.daemon();
    d.wait_log("escalator started", 1, Duration::from_secs(20))
        .await;
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
    let out = escalator(&["run", "--once", "--config", second.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("another escalator daemon runs on this database"),
        "{err}"
    );
    // The CLI of another node reads the database directly.
    let out = escalator(&[
        "cases",
        "list",
        "--json",
        "--config",
        second.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
