//! Bounces end to end (issue 18, item 5), with real delivery-status
//! notifications: the private Postfix accepts mail to `bounce.test` and
//! returns it to its envelope sender (the support address) as a
//! `multipart/report`, which lands in the support mailbox like any bounce.

use std::time::Duration;

use serde_json::Value;

use crate::support::{escalator, escalator_ok, mail, tiers, Setup, BOUNCE_DOMAIN};

/// Waits until the support INBOX holds a delivery report (the copies
/// of our own mail land there too: `confirm_copies`); returns it.
/// (`tests/fixtures/bounces/postfix-real.eml` is one, captured.)
async fn wait_dsn(s: &Setup) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        s.stack.settle().await;
        let inbox = s.stack.fetch("support", "INBOX").await;
        let dsn = inbox
            .into_iter()
            .find(|m| String::from_utf8_lossy(m).contains("report-type=delivery-status"));
        match dsn {
            Some(d) => return d,
            None if std::time::Instant::now() > deadline => panic!(
                "no bounce arrived; postfix log:\n{}",
                std::fs::read_to_string(s.stack.dir.join("log/postfix.log")).unwrap_or_default()
            ),
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn outbox(s: &Setup) -> Vec<Value> {
    let out = escalator_ok(&["outbox", "list", "--all", "--json", "--config", s.cfg()]);
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn r18_a_real_dsn_of_an_ack_opens_no_case_and_is_recorded_on_the_original_case() {
    // Issue 18: "A bounced ack opens a new case for mailer-daemon@...".
    let s = Setup::new(&["support"], "");
    let customer = format!("someone@{BOUNCE_DOMAIN}");
    s.stack.deliver_maildir(
        "support",
        &mail(
            &format!("Someone <{customer}>"),
            "support@example.test",
            "Printer on fire",
            "p1@bounce.test",
            "",
            "It burns.",
        ),
        1,
    );
    s.once();
    assert_eq!(s.cases().len(), 1);
    // Postfix took the ack, then returned it: a real multipart/report.
    wait_dsn(&s).await;
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 1, "no case for MAILER-DAEMON: {cases:?}");
    let shown = s.show(1);
    let b = &shown["bounces"][0];
    assert_eq!(b["recipient"], customer.as_str(), "{shown}");
    assert_eq!(
        (b["mail"].as_str(), b["status"].as_str()),
        (Some("ack"), Some("5.1.1"))
    );
    assert!(
        b["diagnostic"].as_str().unwrap().contains("550 5.1.1"),
        "{b}"
    );
    let kinds: Vec<&str> = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "bounced").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        shown["status"], "open",
        "a bounce is not the customer writing"
    );
    let ack = outbox(&s);
    assert_eq!(ack.len(), 1);
    assert_eq!(ack[0]["state"], "bounced", "{ack:?}");
    // Shown in text, counted in the KPIs.
    let text = escalator_ok(&["cases", "show", "1", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("ack to {customer}: 5.1.1")),
        "{text}"
    );
    let stats = escalator_ok(&["stats", "--json", "--config", s.cfg()]);
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["overall"]["bounces"], 1, "{stats}");
    assert_eq!(stats["overall"]["bounced_cases"], 1, "{stats}");
    // Again (a restart re-reads nothing, a re-run records nothing twice).
    s.once();
    assert_eq!(s.cases().len(), 1);
    assert_eq!(s.show(1)["bounces"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn r18_a_bounced_forward_is_an_error_naming_the_tier_s_address() {
    let tier2 = format!("tier2@{BOUNCE_DOMAIN}");
    let s = Setup::with_tiers(
        &["support", "alice"],
        &tiers("").replace(
            "forward_to = [\"tier2@example.test\"]",
            &format!("forward_to = [\"{tier2}\"]"),
        ),
    );
    s.send(
        "alice",
        &mail(
            "Alice <alice@example.test>",
            "support@example.test",
            "Printer on fire",
            "p1@alice.test",
            "",
            "It burns.",
        ),
    );
    s.stack.settle().await;
    s.once();
    // Past the Frontline's 2 s: forwarded to Tier 2, whose address bounces.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.once();
    let forward = outbox(&s)
        .into_iter()
        .find(|e| e["kind"] == "forward")
        .expect("a forward");
    assert_eq!(forward["to"][0], tier2.as_str());
    wait_dsn(&s).await;
    let out = escalator(&["run", "--once", "--config", s.cfg()]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("mail to staff bounced"))
        .unwrap_or_else(|| panic!("no error logged: {log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&tier2) && line.contains("Tier 2"), "{line}");
    assert_eq!(s.cases().len(), 1, "no case for MAILER-DAEMON");
    let b = &s.show(1)["bounces"][0];
    assert_eq!(
        (b["mail"].as_str(), b["recipient"].as_str()),
        (Some("forward"), Some(tier2.as_str()))
    );
    let forward = outbox(&s)
        .into_iter()
        .find(|e| e["kind"] == "forward")
        .unwrap();
    assert_eq!(forward["state"], "bounced");
}
