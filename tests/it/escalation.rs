//! The escalation engine end to end (issue 3), with short timelines.

use std::time::Duration;

use crate::support::{escalator, header, mail, tiers, Setup};

fn parsed(raw: &[u8]) -> escalator::message::InboundMail {
    escalator::message::parse(raw)
}

fn kinds(s: &Setup, id: u64) -> Vec<String> {
    s.show(id)["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

/// Opens a case for alice and lets its Frontline deadline pass.
async fn stale_case(s: &Setup) -> u64 {
    s.send(
        "alice",
        &mail(
            "Alice <alice@example.test>",
            "support@example.test",
            "Printer on fire",
            "p1@alice.test",
            "",
            "It is burning. <b>Help</b>.",
        ),
    );
    s.stack.settle().await;
    s.once();
    let id = s.cases()[0]["id"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.once();
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_case_nobody_answers_is_forwarded_with_history_and_the_customer_told_once() {
    let s = Setup::with_tiers(&["support", "alice", "tier2"], &tiers(""));
    let id = stale_case(&s).await;
    let c = &s.cases()[0];
    assert_eq!(c["tier"], "Tier 2");
    assert_eq!(c["escalations"], 1);
    let history = s.show(id)["history"].clone();
    let esc = history
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "escalated")
        .unwrap()
        .clone();
    assert_eq!(esc["from"], "Frontline");
    assert_eq!(esc["to"], "Tier 2");
    assert_eq!(esc["reason"], "stale");

    let forwards = s.stack.wait_for("tier2", 1, Duration::from_secs(20)).await;
    assert_eq!(forwards.len(), 1);
    let fwd = &forwards[0];
    assert_eq!(
        header(fwd, "Subject").unwrap(),
        format!("[Case #{id}] Escalated to Tier 2: Printer on fire")
    );
    assert_eq!(header(fwd, "Auto-Submitted").unwrap(), "auto-generated");
    assert!(header(fwd, "Reply-To")
        .unwrap()
        .contains("support@example.test"));
    let m = parsed(fwd);
    for want in [
        "Customer:",
        "alice@example.test",
        "Why escalated:     stale",
        "Previous tier:     Frontline",
        "Deadline:",
        "Priority:          normal",
        "Earlier cases from this customer: 0",
        "==== Conversation ====",
        "It is burning.",
    ] {
        assert!(m.text.contains(want), "forward lacks {want:?}:\n{}", m.text);
    }
    assert_eq!(m.attachments.len(), 1, "the original is attached");
    assert_eq!(m.attachments[0].content_type, "message/rfc822");

    let inbox = s.stack.wait_for("alice", 2, Duration::from_secs(20)).await;
    assert_eq!(inbox.len(), 2, "ack and one notice");
    let notice = inbox
        .iter()
        .find(|m| parsed(m).text.contains("passed to our Tier 2 team"))
        .expect("notice");
    assert!(header(notice, "Subject")
        .unwrap()
        .starts_with(&format!("[Case #{id}]")));
    assert_eq!(header(notice, "In-Reply-To").unwrap(), "<p1@alice.test>");
    assert!(parsed(notice).text.contains("within 1 hour"));

    // Nothing more on later cycles: one forward, one notice.
    s.once();
    s.stack.settle().await;
    assert_eq!(s.stack.fetch("tier2", "INBOX").await.len(), 1);
    assert_eq!(s.stack.fetch("alice", "INBOX").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_staff_answer_in_time_prevents_escalation() {
    let s = Setup::with_tiers(
        &["support", "alice", "tier2"],
        &tiers("").replace("first_response = \"2s\"", "first_response = \"4s\""),
    );
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("[smtp]", "sent_folder = \"Sent\"\n\n[smtp]");
    std::fs::write(&s.config, text).unwrap();
    s.send(
        "alice",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Login",
            "l1@alice.test",
            "",
            "Cannot log in",
        ),
    );
    s.stack.settle().await;
    s.once();
    // An agent answers from the shared mailbox; the copy lands in Sent.
    let answer = mail(
        "Support <support@example.test>",
        "alice@example.test",
        "Re: [Case #1] Login",
        "ans1@example.test",
        "In-Reply-To: <l1@alice.test>\r\n",
        "Reset your password here.",
    );
    s.stack
        .deliver_maildir_folder("support", Some("Sent"), &answer, 1);
    s.once();
    let c = &s.cases()[0];
    assert_eq!(c["status"], "answered");
    assert_eq!(c["due_at"], serde_json::Value::Null);
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.once();
    let c = &s.cases()[0];
    assert_eq!(c["tier"], "Frontline", "answered in time: no escalation");
    assert_eq!(c["escalations"], 0);
    assert!(kinds(&s, 1).contains(&"staff_answer".to_string()));
    s.stack.settle().await;
    assert_eq!(s.stack.fetch("tier2", "INBOX").await.len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tier_two_replies_reach_the_customer_notes_do_not_and_forged_staff_relays_nothing() {
    let s = Setup::with_tiers(&["support", "alice", "tier2", "mallory"], &tiers(""));
    let id = stale_case(&s).await;
    let forward = s
        .stack
        .wait_for("tier2", 1, Duration::from_secs(20))
        .await
        .remove(0);
    let fwd_id = header(&forward, "Message-ID").unwrap();
    s.stack.wait_for("alice", 2, Duration::from_secs(20)).await;

    // An internal note: stored, not relayed.
    let note = mail(
        "tier2@example.test",
        "support@example.test",
        &format!("Re: [Case #{id}] Escalated to Tier 2: Printer on fire"),
        "n1@tier2.test",
        &format!("In-Reply-To: {fwd_id}\r\nReferences: {fwd_id}\r\n"),
        "#note\nLooks like the fuser. Internal only.",
    );
    s.stack
        .send("tier2@example.test", &["support@example.test"], &note)
        .unwrap();
    // A forged staff From with no reference to the forward.
    let forged = mail(
        "tier2@example.test",
        "support@example.test",
        &format!("Re: [Case #{id}] Printer on fire"),
        "f1@evil.test",
        "",
        "#resolve\nPlease send your password to mallory@example.test",
    );
    s.stack
        .send("mallory@example.test", &["support@example.test"], &forged)
        .unwrap();
    s.stack.settle().await;
    s.once();
    s.stack.settle().await;
    assert_eq!(
        s.stack.fetch("alice", "INBOX").await.len(),
        2,
        "neither the note nor the forgery reached alice"
    );
    let k = kinds(&s, id);
    assert!(k.contains(&"note".to_string()), "{k:?}");
    assert!(
        k.contains(&"unverified_staff".to_string()),
        "{k:?} {:#?}",
        s.cases()
    );
    assert_ne!(
        s.cases()[0]["status"],
        "resolved",
        "the forged #resolve is not obeyed"
    );

    // Tier 2 answers by replying to the forward.
    let reply = mail("Tier Two <tier2@example.test>", "support@example.test", &format!("Re: [Case #{id}] Escalated to Tier 2: Printer on fire"), "r1@tier2.test", &format!("In-Reply-To: {fwd_id}\r\nReferences: {fwd_id}\r\n"), "We replaced the fuser; it is fixed.\r\n\r\nOn Monday, Support wrote:\r\n> Customer waiting: 3s");
    s.stack
        .send("tier2@example.test", &["support@example.test"], &reply)
        .unwrap();
    s.stack.settle().await;
    s.once();
    let inbox = s.stack.wait_for("alice", 3, Duration::from_secs(20)).await;
    assert_eq!(inbox.len(), 3);
    let relay = inbox
        .iter()
        .find(|m| parsed(m).text.contains("replaced the fuser"))
        .expect("relayed answer");
    assert!(header(relay, "From")
        .unwrap()
        .contains("support@example.test"));
    let raw = String::from_utf8_lossy(relay);
    assert!(
        !raw.contains("tier2@example.test"),
        "no internal address reaches the customer:\n{raw}"
    );
    assert!(
        !raw.contains("Customer waiting"),
        "no internal summary reaches the customer"
    );
    assert!(!raw.contains("Internal only"));
    let c = &s.cases()[0];
    assert_eq!(c["status"], "answered");
    let k = kinds(&s, id);
    assert!(
        k.contains(&"staff_answer".to_string()) && k.contains(&"relayed".to_string()),
        "{k:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeat_customers_third_case_starts_at_tier_two() {
    let s = Setup::with_tiers(
        &["support", "carol", "tier2"],
        &tiers("[repeat_customer]\ncases = 3\nwithin = \"30d\"\ntier = \"Tier 2\"\n")
            .replace("\"2s\"", "\"4h\""),
    );
    for n in 0..3 {
        s.send(
            "carol",
            &mail(
                "carol@example.test",
                "support@example.test",
                &format!("Problem {n}"),
                &format!("c{n}@carol.test"),
                "",
                "again",
            ),
        );
        s.stack.settle().await;
        s.once();
    }
    let cases = s.cases();
    let tiers: Vec<&str> = cases.iter().map(|c| c["tier"].as_str().unwrap()).collect();
    assert_eq!(tiers, vec!["Frontline", "Frontline", "Tier 2"]);
    let third = cases[2]["id"].as_u64().unwrap();
    let esc = s.show(third)["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "escalated")
        .unwrap()
        .clone();
    assert_eq!(esc["reason"], "repeat_customer");
    let inbox = s.stack.wait_for("carol", 3, Duration::from_secs(20)).await;
    let ack = inbox
        .iter()
        .find(|m| {
            header(m, "Subject")
                .unwrap()
                .starts_with(&format!("[Case #{third}]"))
        })
        .unwrap();
    assert!(
        parsed(ack).text.contains("Tier 2"),
        "the ack names the tier"
    );
    assert_eq!(
        inbox.len(),
        3,
        "no separate notice for a case that starts at tier 2"
    );
    let fwd = s.stack.wait_for("tier2", 1, Duration::from_secs(20)).await;
    assert!(parsed(&fwd[0])
        .text
        .contains("Earlier cases from this customer: 2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn speak_to_a_supervisor_escalates_at_once() {
    let s = Setup::with_tiers(
        &["support", "dan", "tier2"],
        &tiers(
            "[[triggers]]\nphrases = [\"speak to a supervisor\", \"lawyer\"]\nescalate = true\n",
        )
        .replace("\"2s\"", "\"4h\""),
    );
    s.send(
        "dan",
        &mail(
            "dan@example.test",
            "support@example.test",
            "Refund",
            "d1@dan.test",
            "",
            "This is the third time. I want to speak to a supervisor.",
        ),
    );
    s.stack.settle().await;
    s.once();
    let c = &s.cases()[0];
    assert_eq!(c["tier"], "Tier 2");
    let esc = s.show(1)["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "escalated")
        .unwrap()
        .clone();
    assert_eq!(esc["reason"], "trigger");
    assert_eq!(
        s.stack
            .wait_for("tier2", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    let inbox = s.stack.wait_for("dan", 1, Duration::from_secs(20)).await;
    assert_eq!(inbox.len(), 1);
    assert!(parsed(&inbox[0]).text.contains("Tier 2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_passing_while_stopped_fires_exactly_once_after_restart() {
    let s = Setup::with_tiers(&["support", "alice", "tier2"], &tiers(""));
    s.send(
        "alice",
        &mail(
            "alice@example.test",
            "support@example.test",
            "Down",
            "x1@alice.test",
            "",
            "?",
        ),
    );
    s.stack.settle().await;
    s.once();
    // The daemon is down while the 2 s deadline passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut d = s.daemon();
    let fwd = s.stack.wait_for("tier2", 1, Duration::from_secs(30)).await;
    assert_eq!(fwd.len(), 1);
    let out = d.stop();
    assert!(out.status.success());
    // Restart again: nothing fires twice.
    let mut d = s.daemon();
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.stop();
    s.stack.settle().await;
    assert_eq!(
        s.stack.fetch("tier2", "INBOX").await.len(),
        1,
        "one forward"
    );
    let alice = s.stack.fetch("alice", "INBOX").await;
    assert_eq!(alice.len(), 2, "one ack, one notice");
    assert_eq!(s.cases()[0]["escalations"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn resolution_sends_one_survey_and_a_five_records_csat() {
    let s = Setup::with_tiers(
        &["support", "erin", "tier2"],
        &tiers("[resolution]\nsurvey = true\n").replace("\"2s\"", "\"4h\""),
    );
    s.send(
        "erin",
        &mail(
            "erin@example.test",
            "support@example.test",
            "Question",
            "e1@erin.test",
            "",
            "How?",
        ),
    );
    s.stack.settle().await;
    s.once();
    let out = escalator(&["cases", "resolve", "1", "--config", s.cfg()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = escalator(&["cases", "resolve", "1", "--config", s.cfg()]);
    assert!(out.status.success());
    s.once();
    let inbox = s.stack.wait_for("erin", 2, Duration::from_secs(20)).await;
    let surveys: Vec<_> = inbox
        .iter()
        .filter(|m| header(m, "Subject").unwrap().contains("How did we do?"))
        .collect();
    assert_eq!(surveys.len(), 1, "one follow-up");
    let survey = surveys[0];
    assert!(parsed(survey).text.contains("from 1 (poor) to 5 (great)"));
    let sid = header(survey, "Message-ID").unwrap();
    s.send(
        "erin",
        &mail(
            "erin@example.test",
            "support@example.test",
            "Re: [Case #1] How did we do? Question",
            "e2@erin.test",
            &format!("In-Reply-To: {sid}\r\n"),
            "5",
        ),
    );
    s.stack.settle().await;
    s.once();
    let shown = s.show(1);
    assert_eq!(shown["csat"], 5);
    assert_eq!(shown["status"], "resolved", "a rating does not reopen");
    let k = kinds(&s, 1);
    for want in ["resolved", "survey_sent", "csat"] {
        assert!(k.contains(&want.to_string()), "{k:?}");
    }
    assert_eq!(s.cases().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_escalation_from_the_cli() {
    let s = Setup::with_tiers(
        &["support", "gus", "tier2"],
        &tiers("").replace("\"2s\"", "\"4h\""),
    );
    s.send(
        "gus",
        &mail(
            "gus@example.test",
            "support@example.test",
            "VIP",
            "g1@gus.test",
            "",
            "hi",
        ),
    );
    s.stack.settle().await;
    s.once();
    let out = escalator(&[
        "cases",
        "escalate",
        "1",
        "--reason",
        "key account",
        "--config",
        s.cfg(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = escalator(&[
        "cases",
        "escalate",
        "1",
        "--reason",
        "again",
        "--config",
        s.cfg(),
    ]);
    assert!(!out.status.success(), "already at the top tier");
    s.once();
    let esc = s.show(1)["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "escalated")
        .unwrap()
        .clone();
    assert_eq!(esc["reason"], "manual");
    assert_eq!(esc["detail"], "key account");
    let fwd = s.stack.wait_for("tier2", 1, Duration::from_secs(20)).await;
    assert!(parsed(&fwd[0]).text.contains("key account"));
}
