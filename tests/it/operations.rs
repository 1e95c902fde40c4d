//! Operations (issue 5): KPIs, the review digest, metrics, config reload.

use std::time::Duration;

use serde_json::Value;

use crate::support::{escalator, mail, Setup};

/// The escalation tests' tiers, and "supervisor" escalates at once.
fn tiers(extra: &str) -> String {
    crate::support::tiers(&format!(
        "\n[[triggers]]\nphrases = [\"supervisor\"]\nescalate = true\n{extra}"
    ))
}

fn stats(s: &Setup, args: &[&str]) -> Value {
    let mut all = vec!["stats", "--json", "--config", s.cfg()];
    all.extend_from_slice(args);
    let out = escalator(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn customer_mail(user: &str, subject: &str, body: &str) -> Vec<u8> {
    mail(
        &format!("{user}@example.test"),
        "support@example.test",
        subject,
        &format!("{subject}.{user}@example.test").replace(' ', "-"),
        "",
        body,
    )
}

/// Three cases: one answered by staff and resolved, one that goes stale,
/// one that asks for a supervisor.
async fn three_cases(s: &Setup) {
    s.send("ann", &customer_mail("ann", "Invoice", "Where is it?"));
    s.send("bob", &customer_mail("bob", "Crash", "It crashes."));
    s.send(
        "cid",
        &customer_mail("cid", "Angry", "I want a supervisor now."),
    );
    s.stack.settle().await;
    s.once();
    // Postfix delivers in no fixed order: find ann's case by its customer.
    let ann = s
        .cases()
        .iter()
        .find(|c| c["customer"] == "ann@example.test")
        .and_then(|c| c["id"].as_u64())
        .unwrap();
    let answer = mail(
        "Support <support@example.test>",
        "ann@example.test",
        &format!("Re: [Case #{ann}] Invoice"),
        "ans1@example.test",
        "In-Reply-To: <Invoice.ann@example.test>\r\n",
        "Attached.",
    );
    s.stack
        .deliver_maildir_folder("support", Some("Sent"), &answer, 1);
    s.once();
    let id = ann.to_string();
    let out = escalator(&["cases", "resolve", &id, "--config", s.cfg()]);
    assert!(out.status.success());
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.once();
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_report_escalations_answers_and_open_cases_per_tier() {
    let s = Setup::with_tiers(&["support", "ann", "bob", "cid", "tier2"], &tiers(""))
        .with_mailbox("sent_folder = \"Sent\"");
    three_cases(&s).await;
    let r = stats(&s, &["--since", "1h"]);
    let o = &r["overall"];
    assert_eq!(o["cases"], 3);
    assert_eq!(o["escalated"], 2);
    assert_eq!(o["escalated_by_reason"]["stale"], 1);
    assert_eq!(o["escalated_by_reason"]["trigger"], 1);
    assert_eq!(o["escalated_by_reason"]["manual"], 0);
    assert_eq!(o["escalation_rate"], 0.667);
    assert_eq!(o["first_answer"]["count"], 1);
    assert!(o["first_answer"]["median_secs"].as_i64().unwrap() < 60);
    assert_eq!(o["resolve"]["count"], 1);
    assert_eq!(o["breached"], 1, "bob's Frontline deadline passed");
    assert_eq!(o["open"]["total"], 2);
    assert_eq!(o["open"]["under_1h"], 2);
    let tiers = r["tiers"].as_array().unwrap();
    assert_eq!(tiers[0]["tier"], "Frontline");
    assert_eq!(tiers[0]["cases"], 3);
    assert_eq!(tiers[0]["escalated"], 2);
    assert_eq!(tiers[0]["open"]["total"], 0);
    assert_eq!(tiers[1]["tier"], "Tier 2");
    assert_eq!(tiers[1]["cases"], 2);
    assert_eq!(tiers[1]["open"]["total"], 2);
    assert!(r["since"].is_string());

    // The same figures come from a running daemon over its socket, and
    // the text table names every tier.
    let mut d = s.daemon();
    let out = escalator(&["stats", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    d.stop();
    assert!(out.status.success(), "{text}");
    for want in [
        "overall",
        "Frontline",
        "Tier 2",
        "escalated",
        "2 (67%)",
        "open now",
    ] {
        assert!(text.contains(want), "stats lacks {want:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_the_new_is_wrong() {
    let s = Setup::with_tiers(
        &["support", "ann", "bob", "cid", "tier2"],
        &tiers("").replace("\"2s\"", "\"4h\""),
    );
    let d = s.daemon();
    s.send("ann", &customer_mail("ann", "First", "hello"));
    s.stack.wait_for("ann", 1, Duration::from_secs(20)).await;

    // Frontline now answers within 2 s: deadlines computed from now on.
    // A mailbox setting changes too: that one waits for a restart.
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replace("\"4h\"", "\"2s\"");
    let text = text.replacen("poll_interval = \"1s\"", "poll_interval = \"2s\"", 1);
    std::fs::write(&s.config, text).unwrap();
    d.signal("HUP");
    let log = d
        .wait_log("config reloaded", 1, Duration::from_secs(10))
        .await;
    assert!(log.contains("config reloaded"), "{log}");
    // The log goes to a file: no colour codes (they were written always).
    assert!(
        !log.contains('\u{1b}'),
        "ANSI codes in a log file:\n{log:?}"
    );
    assert!(
        log.contains("take effect only after a restart"),
        "the start-only change is named:\n{log}"
    );
    s.send("bob", &customer_mail("bob", "Second", "hello"));
    let fwd = s.stack.wait_for("tier2", 1, Duration::from_secs(30)).await;
    assert_eq!(fwd.len(), 1, "bob's case went stale under the new timeline");

    // A typo is refused, named, and the daemon goes on with the last good config.
    let good = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        good.replacen("first_response", "first_respons", 1),
    )
    .unwrap();
    d.signal("HUP");
    let log = d
        .wait_log("config reload refused", 1, Duration::from_secs(10))
        .await;
    assert!(log.contains("config reload refused"), "{log}");
    assert!(
        log.contains("first_respons"),
        "the error names the key:\n{log}"
    );
    s.send("cid", &customer_mail("cid", "Third", "hello"));
    let fwd = s.stack.wait_for("tier2", 2, Duration::from_secs(30)).await;
    assert_eq!(
        fwd.len(),
        2,
        "cid's case used the 2 s timeline still in force"
    );
    let mut d = d;
    let out = d.stop();
    assert!(out.status.success());
    std::fs::write(&s.config, good).unwrap();
    let cases = s.cases();
    let tiers: Vec<&str> = cases.iter().map(|c| c["tier"].as_str().unwrap()).collect();
    assert_eq!(
        tiers,
        vec!["Frontline", "Tier 2", "Tier 2"],
        "ann's deadline was kept"
    );
}

/// GET /metrics: the body.
async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of one sample line, by its full name with labels.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_counts_ingest_escalations_mail_and_latency() {
    let port = crate::support::free_port();
    let s = Setup::with_tiers(
        &["support", "ann", "tier2"],
        &(tiers("").replace("\"2s\"", "\"4h\"")
            + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")),
    );
    let mut d = s.daemon();
    s.send(
        "ann",
        &customer_mail("ann", "Urgent", "Get me a supervisor."),
    );
    s.stack.wait_for("ann", 1, Duration::from_secs(20)).await;
    s.stack.wait_for("tier2", 1, Duration::from_secs(20)).await;
    let mut text = String::new();
    // The sent mail is counted just after the server's answer.
    for _ in 0..50 {
        text = scrape(port).await;
        if sample(&text, "escalator_mail_sent_total{kind=\"forward\"}") == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, want) in [
        ("escalator_messages_ingested_total{outcome=\"stored\"}", 1.0),
        (
            "escalator_queue_messages_ingested_total{queue=\"default\",outcome=\"stored\"}",
            1.0,
        ),
        ("escalator_cases_opened_total", 1.0),
        (
            "escalator_escalations_total{reason=\"trigger\",tier=\"Tier 2\"}",
            1.0,
        ),
        ("escalator_mail_sent_total{kind=\"ack\"}", 1.0),
        ("escalator_mail_sent_total{kind=\"forward\"}", 1.0),
        ("escalator_open_cases{tier=\"Tier 2\"}", 1.0),
        ("escalator_outbox_depth", 0.0),
        ("escalator_ingest_latency_seconds_count", 1.0),
        ("escalator_ack_latency_seconds_count", 1.0),
        ("escalator_smtp_errors_total", 0.0),
    ] {
        assert_eq!(sample(&text, name), Some(want), "{name} in:\n{text}");
    }
    let out = d.stop();
    assert!(out.status.success());
}

/// Sleeps until `secs` seconds past the next full minute.
async fn until_next_minute(secs: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.as_millis() as u64 % 60_000;
    tokio::time::sleep(Duration::from_millis(60_000 - into + secs * 1000)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_review_digest_goes_out_once_per_period_with_the_escalations() {
    let s = Setup::with_tiers(
        &["support", "ann", "bob", "boss", "tier2"],
        &(tiers("").replace("\"2s\"", "\"4h\"")
            + "\n[digest]\nto = [\"boss@example.test\"]\nevery = \"1m\"\n"),
    );
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if into_minute > 40 {
        until_next_minute(1).await;
    }
    s.send(
        "ann",
        &customer_mail("ann", "Angry", "I want a supervisor."),
    );
    s.send("bob", &customer_mail("bob", "Calm", "A question."));
    s.stack.settle().await;
    s.once();
    let out = escalator(&["digest", "--print", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Escalations in the period (1)"), "{text}");
    assert!(text.contains("phrase \"supervisor\""), "{text}");

    // The first digest covers the first full period after start-up.
    until_next_minute(1).await;
    s.once();
    let got = s.stack.wait_for("boss", 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    let body = escalator::message::parse(&got[0]).text;
    assert!(crate::support::header(&got[0], "Subject")
        .unwrap()
        .starts_with("Escalation review"),);
    assert!(body.contains("ann@example.test"), "{body}");
    assert!(body.contains("trigger"), "{body}");
    assert!(body.contains("cases"), "the KPI table:\n{body}");
    // Again in the same period, and a daemon restart: nothing more.
    s.once();
    let mut d = s.daemon();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.stop();
    s.stack.settle().await;
    assert_eq!(s.stack.fetch("boss", "INBOX").await.len(), 1);
}

/// A token introspection endpoint (RFC 7662) for Dovecot's oauth2
/// passdb: `good-token` is the support mailbox's, anything else is not
/// active. Returns its port and how many tokens it was asked about.
async fn introspection_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then the form body by Content-Length.
                loop {
                    let n = c.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let text = String::from_utf8_lossy(&buf);
                let answer = if text.contains("token=good-token") {
                    r#"{"active":true,"username":"support"}"#
                } else {
                    r#"{"active":false}"#
                };
                let _ = c
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                            answer.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (port, asked)
}

#[tokio::test(flavor = "multi_thread")]
async fn xoauth2_logs_in_to_imap_and_smtp_with_a_token_read_at_each_login() {
    let (port, asked) = introspection_server().await;
    let stack = crate::support::MailStack::start_oauth(&["support", "alice"], port);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "good-token\n").unwrap();
    let oauth = format!(
        "auth = \"xoauth2\"\noauth_token_file = \"{}\"",
        token.display()
    );
    let text = stack
        .config("support", &dir.path().join("store"), "")
        .replacen("password = \"support\"", &oauth, 1)
        .replacen(
            "security = \"plain\"\nfrom",
            &format!("security = \"plain\"\nusername = \"support\"\n{oauth}\nfrom"),
            1,
        );
    assert!(!text.contains("password"), "{text}");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, &text).unwrap();
    stack
        .send(
            "alice@example.test",
            &["support@example.test"],
            &customer_mail("alice", "Token", "hi"),
        )
        .unwrap();
    stack.settle().await;
    let out = escalator(&["run", "--once", "--config", cfg.to_str().unwrap()]);
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
        1,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(stack.dir.join("log/postfix.log")).unwrap();
    assert!(
        log.contains("sasl_method=XOAUTH2"),
        "SMTP used XOAUTH2:\n{log}"
    );
    assert!(
        asked.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "IMAP and SMTP asked"
    );

    // A token that is no longer valid: the login fails, clearly.
    std::fs::write(&token, "expired-token").unwrap();
    let out = escalator(&["run", "--once", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("XOAUTH2"), "{err}");
}
