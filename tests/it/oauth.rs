//! OAuth 2 built in (issue 21), end to end and offline: the test
//! authorization server in the repo, a Dovecot whose passdb asks it
//! about every token (IMAP, and Postfix's SMTP AUTH through Dovecot),
//! and the escalator binary: `auth login` by device code, `run` over
//! XOAUTH2, refresh with rotation across restarts, a dead grant (mail
//! waits, the fix is named), a new login, and a store that holds no
//! usable token.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::authserver::{AuthServer, Scripted};
use crate::support::{escalator, mail, Daemon, MailStack};

const KEY: &str = "6f1c0ad3b2e94857a61d0c3e9b7f2a4c5d8e1f0a2b3c4d5e6f708192a3b4c5d6";

struct OAuth {
    server: AuthServer,
    stack: MailStack,
    dir: tempfile::TempDir,
    cfg: String,
}

async fn setup() -> OAuth {
    setup_store(None).await
}

/// With `store`: these `[store]` keys instead of the sled folder.
async fn setup_store(store: Option<&str>) -> OAuth {
    let server = AuthServer::start("support").await;
    let stack = MailStack::start_oauth(&["support", "alice"], server.addr.port());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token.key"), KEY).unwrap();
    let oauth = "auth = \"oauth2\"\noauth2 = \"m365\"";
    let text = stack
        .config(
            "support",
            &dir.path().join("store"),
            &format!(
                "[oauth2]\nkey_file = \"{}\"\n{}",
                dir.path().join("token.key").display(),
                server.identity_toml("m365", "device")
            ),
        )
        .replacen("password = \"support\"", oauth, 1)
        .replacen(
            "security = \"plain\"\nfrom",
            &format!("security = \"plain\"\nusername = \"support\"\n{oauth}\nfrom"),
            1,
        );
    assert!(!text.contains("password"), "{text}");
    let text = match store {
        Some(keys) => text.replacen("[store]\n", &format!("[store]\n{keys}"), 1),
        None => text,
    };
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, &text).unwrap();
    OAuth {
        server,
        stack,
        cfg: cfg.to_str().unwrap().to_string(),
        dir,
    }
}

impl OAuth {
    /// `auth login m365`, the device code approved at the server as soon
    /// as it is handed out (the admin entering it elsewhere).
    fn login(&self) -> (bool, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_escalator"))
            .args(["auth", "login", "m365", "--config", &self.cfg])
            .env("ESCALATOR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let mut text = String::new();
        std::thread::scope(|scope| {
            let done2 = done.clone();
            scope.spawn(move || {
                while !done2.load(Ordering::SeqCst) {
                    self.server.approve_all();
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
            for line in BufReader::new(stdout).lines() {
                text.push_str(&line.unwrap());
                text.push('\n');
            }
            done.store(true, Ordering::SeqCst);
        });
        let out = child.wait_with_output().unwrap();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn once(&self) -> (bool, String) {
        let out = escalator(&["run", "--once", "--config", &self.cfg]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn status(&self) -> (Option<i32>, Value) {
        let out = escalator(&["auth", "status", "--json", "--config", &self.cfg]);
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v[0].clone())
    }

    async fn customer_writes(&self, n: u32) {
        self.stack
            .send(
                "alice@example.test",
                &["support@example.test"],
                &mail(
                    "alice@example.test",
                    "support@example.test",
                    &format!("Help {n}"),
                    &format!("oauth-{n}@example.test"),
                    "",
                    "My printer is on fire.",
                ),
            )
            .unwrap();
        self.stack.settle().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_login_then_run_over_xoauth2_refresh_with_rotation_and_a_dead_grant_that_waits() {
    let t = setup().await;

    // Before any login: the mail waits, and the fix is named.
    t.customer_writes(1).await;
    let (ok, err) = t.once();
    assert!(!ok);
    assert!(err.contains("escalator auth login m365"), "{err}");
    let (code, st) = t.status();
    assert_eq!(code, Some(1), "an identity in use needs a login");
    assert_eq!(st["grant"], "needs_login");

    // The login: the code printed, the tokens stored, and a real IMAP
    // and SMTP login with them, naming the account reached.
    let (ok, out) = t.login();
    assert!(ok, "{out}");
    assert!(out.contains("enter the code CODE-"), "{out}");
    assert!(out.contains("tokens of m365 stored"), "{out}");
    assert!(out.contains("ok    imap mailbox (127.0.0.1"), "{out}");
    assert!(out.contains("ok    smtp smtp (127.0.0.1"), "{out}");
    assert!(out.contains("logged in as \"support\""), "{out}");
    assert_eq!(
        t.server
            .grants("urn:ietf:params:oauth:grant-type:device_code"),
        1
    );

    // The waiting mail is read and answered, over XOAUTH2 both ways.
    let (ok, err) = t.once();
    assert!(ok, "{err}");
    let got = t.stack.wait_for("alice", 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{err}");
    let log = std::fs::read_to_string(t.stack.dir.join("log/postfix.log")).unwrap();
    assert!(
        log.contains("sasl_method=XOAUTH2"),
        "SMTP used XOAUTH2:\n{log}"
    );
    let (code, st) = t.status();
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["grant"], "valid");
    assert_eq!(st["account"], "support");
    assert!(st["access_token_expires_at"].is_string(), "{st}");
    assert_eq!(st["refresh_failures"], 0);

    // Short tokens: each run past a token's first half refreshes, and
    // the rotated refresh token stored by one run is what the next run
    // uses (the server voids each refresh token at its use).
    t.server.set_expires_in(61);
    let (ok, out) = t.login();
    assert!(ok, "{out}");
    let mut logs = String::new();
    for n in 2..=3 {
        t.customer_writes(n).await;
        // A 61 s token is due in its second half.
        tokio::time::sleep(Duration::from_secs(31)).await;
        let (ok, err) = t.once();
        assert!(ok, "run {n}: {err}");
        logs.push_str(&err);
    }
    assert!(
        t.server.grants("refresh_token") >= 2,
        "refreshed in each run: {} refreshes\n{logs}",
        t.server.grants("refresh_token")
    );
    assert_eq!(
        t.stack
            .wait_for("alice", 3, Duration::from_secs(20))
            .await
            .len(),
        3
    );
    let (_, st) = t.status();
    assert!(st["last_refresh"].is_string(), "{st}");

    // The provider revokes the grant: the mail waits in the mailbox,
    // the error names the fix, status and exit code say so.
    t.server.revoke_all();
    t.server.set_expires_in(3600);
    t.customer_writes(4).await;
    let (ok, err) = t.once();
    assert!(!ok);
    assert!(err.contains("invalid_grant"), "{err}");
    assert!(err.contains("escalator auth login m365"), "{err}");
    let (code, st) = t.status();
    assert_eq!(code, Some(1));
    assert_eq!(st["grant"], "needs_login");
    assert!(
        st["last_error"].as_str().unwrap().contains("invalid_grant"),
        "{st}"
    );
    assert!(st["refresh_failures"].as_u64().unwrap() >= 1);
    assert_eq!(
        t.stack.fetch("alice", "INBOX").await.len(),
        3,
        "no ack for the waiting mail yet"
    );

    // Logged in again: the waiting mail is ingested and answered.
    let (ok, out) = t.login();
    assert!(ok, "{out}");
    let (ok, err) = t.once();
    assert!(ok, "{err}");
    assert!(err.contains("message_id=oauth-4@example.test"), "{err}");
    // (No fourth ack: alice's acks are rate-limited by then.)
    let cases = escalator(&["cases", "list", "--json", "--config", &t.cfg]);
    let cases: Value = serde_json::from_slice(&cases.stdout).unwrap();
    assert_eq!(cases.as_array().unwrap().len(), 4, "one case per mail");

    // A copy of the store gives no mailbox access: no token the server
    // would take is in any of its files.
    let mut secrets = t.server.refresh_tokens();
    secrets.extend(t.server.access_tokens());
    assert!(!secrets.is_empty());
    for f in files(&t.dir.path().join("store")) {
        let bytes = std::fs::read(&f).unwrap();
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "a token in {}",
                f.display()
            );
        }
    }

    // Logout: forgotten, and status says what to do.
    let out = escalator(&["auth", "logout", "m365", "--config", &t.cfg]);
    assert!(out.status.success());
    let (code, st) = t.status();
    assert_eq!(code, Some(1));
    assert_eq!(st["grant"], "needs_login");
    let text = escalator(&["auth", "status", "--config", &t.cfg]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("fix: escalator auth login m365"), "{text}");
    for s in &secrets {
        assert!(!text.contains(s.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_fails_at_login_says_so_stores_nothing_and_a_failed_poll_is_retried() {
    let t = setup().await;
    // The device authorization endpoint answers a proxy's error page.
    t.server.script(Scripted::Html500);
    let (ok, out) = t.login();
    assert!(!ok, "{out}");
    assert!(out.contains("not JSON (HTTP 500"), "{out}");
    let (_, st) = t.status();
    assert_eq!(st["grant"], "needs_login");
    assert!(st["logged_in_at"].is_null(), "nothing stored: {st}");
    // A poll of the token endpoint that fails is retried with backoff
    // (RFC 8628 3.5), and the login goes through.
    t.server.script(Scripted::Pass);
    t.server.script(Scripted::Html500);
    let (ok, out) = t.login();
    assert!(ok, "{out}");
    let (_, st) = t.status();
    assert_eq!(st["grant"], "valid");
}

/// The daemon: tokens refreshed while it runs (the first expires at the
/// server mid-run and mail still goes out), then a revoked grant seen by
/// the keeper: the error with its fix in the log, and the metrics.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_refreshes_before_tokens_end_and_shows_a_dead_grant_in_its_metrics() {
    let t = setup().await;
    // 61 s tokens: due in their second half, so the keeper (every 30 s)
    // refreshes every other look.
    t.server.set_expires_in(61);
    let (ok, out) = t.login();
    assert!(ok, "{out}");
    let first_tokens = t.server.access_tokens();
    let port = crate::support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        &t.cfg,
        &["--metrics-listen", &listen],
        t.dir.path().join("daemon.log"),
    );
    t.customer_writes(1).await;
    assert_eq!(
        t.stack
            .wait_for("alice", 1, Duration::from_secs(30))
            .await
            .len(),
        1,
        "{}",
        d.log()
    );
    // Past the end of the login's token at the server: a new SMTP login
    // (the first session was closed after 30 s idle) needs a refreshed
    // token, and the mail goes out.
    tokio::time::sleep(Duration::from_secs(65)).await;
    t.customer_writes(2).await;
    assert_eq!(
        t.stack
            .wait_for("alice", 2, Duration::from_secs(30))
            .await
            .len(),
        2,
        "{}",
        d.log()
    );
    assert!(t.server.grants("refresh_token") >= 1, "{}", d.log());
    let log = d.log();
    assert!(log.contains("access token refreshed"), "{log}");
    assert!(
        !first_tokens.iter().any(|tok| log.contains(tok.as_str())),
        "no token in the log"
    );
    assert_eq!(
        crate::support::scrape(port, "escalator_oauth_grant_valid"),
        Some(1.0)
    );

    // Revoked: the keeper's next refresh is refused; one error with the
    // fix, the gauge drops, failures counted.
    t.server.revoke_all();
    let log = d
        .wait_log("escalator auth login m365", 1, Duration::from_secs(75))
        .await;
    assert!(log.contains("an OAuth 2 identity cannot log in"), "{log}");
    assert_eq!(
        crate::support::scrape(port, "escalator_oauth_grant_valid"),
        Some(0.0),
        "{log}"
    );
    assert!(
        crate::support::scrape(port, "escalator_oauth_refresh_failures_total").unwrap_or(0.0)
            >= 1.0
    );
    // The daemon keeps running (sessions opened before the revocation go
    // on until they end; new logins wait, as the run --once test shows).
    let mut d = d;
    assert!(d.alive());
    let out = d.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .matches("an OAuth 2 identity cannot log in")
            .count(),
        1,
        "told once (an hour apart)"
    );
}

/// Two daemons on one PostgreSQL store share one grant: each refresh is
/// done by one node (a rotated refresh token used twice would be
/// refused by the server, killing the grant), and none fails.
#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_on_postgresql_share_the_grant_and_refresh_once_each_time() {
    let pg = crate::postgres_server::Postgres::start();
    let url = pg.database("it_oauth");
    let t = setup_store(Some(&format!(
        "engine = \"postgres\"\nurl = \"{url}\"\nsecurity = \"plain\"\n"
    )))
    .await;
    t.server.set_expires_in(61);
    let (ok, out) = t.login();
    assert!(ok, "{out}");
    let a = Daemon::start(&t.cfg, &["--node", "a"], t.dir.path().join("a.log"));
    let b = Daemon::start(&t.cfg, &["--node", "b"], t.dir.path().join("b.log"));
    t.customer_writes(1).await;
    assert_eq!(
        t.stack
            .wait_for("alice", 1, Duration::from_secs(30))
            .await
            .len(),
        1
    );
    // Three rounds of both keepers.
    tokio::time::sleep(Duration::from_secs(65)).await;
    let logs = a.log() + &b.log();
    let refreshed = logs.matches("access token refreshed").count() as u64;
    assert!(refreshed >= 1, "{logs}");
    assert_eq!(
        t.server.grants("refresh_token"),
        refreshed,
        "one refresh per node's log line: {logs}"
    );
    let (code, st) = t.status();
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["refresh_failures"], 0, "{st}\n{logs}");
    assert!(!logs.contains("invalid_grant"), "{logs}");
    // Both nodes refreshed at some point, or one did and the other used
    // its tokens: either way every refresh token was used once.
    assert!(a.log().contains("escalator started") && b.log().contains("escalator started"));
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
