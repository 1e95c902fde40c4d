//! Several mailboxes (issue 11): two queues on the private Dovecot +
//! Postfix, each with its own mailbox, address and escalation path.

use std::time::Duration;

use serde_json::Value;

use crate::support::{escalator, header, mail, MailStack, Setup};

/// support@ (Frontline → Tier 2) and billing@ (Billing → Finance).
fn two_queues(users: &[&str], billing_password: Option<&str>) -> Setup {
    let password = billing_password.map(|p| format!("password = \"{p}\"\n"));
    Setup::build(users, |stack, store| {
        let billing = stack
            .queue(
                "billing",
                "billing",
                "address = \"Acme Billing <billing@example.test>\"\n\
                 tiers = [\"Billing\", \"Finance\"]",
            )
            .replace(
                "password = \"billing\"\n",
                password.as_deref().unwrap_or("password = \"billing\"\n"),
            );
        stack.queue("support", "support", "tiers = [\"Frontline\", \"Tier 2\"]")
            + &billing
            + &stack.smtp_and_store(store)
            + r#"
[[tiers]]
name = "Frontline"
staff = ["agent@example.test"]
first_response = "4h"

[[tiers]]
name = "Tier 2"
forward_to = ["tier2@example.test"]
first_response = "4h"

[[tiers]]
name = "Billing"
first_response = "4h"

[[tiers]]
name = "Finance"
forward_to = ["fin@example.test"]
first_response = "4h"

[[triggers]]
phrases = ["supervisor"]
escalate = true
"#
    })
}

fn from_of(raw: &[u8]) -> String {
    header(raw, "From").unwrap_or_default()
}

fn case_of<'a>(cases: &'a [Value], customer: &str) -> &'a Value {
    cases
        .iter()
        .find(|c| c["customer"] == customer)
        .unwrap_or_else(|| panic!("no case of {customer}: {cases:?}"))
}

const USERS: [&str; 6] = ["support", "billing", "alice", "bob", "tier2", "fin"];

#[tokio::test(flavor = "multi_thread")]
async fn each_customer_is_answered_from_the_queue_they_wrote_to_and_a_cross_queue_reply_joins_its_case(
) {
    answered_from_their_queue(two_queues(&USERS, None)).await;
}

/// The same with the store in PostgreSQL (issue 12).
#[tokio::test(flavor = "multi_thread")]
async fn on_postgresql_each_customer_is_answered_from_their_queue_and_a_cross_queue_reply_joins_its_case(
) {
    let pg = crate::postgres_server::Postgres::start();
    let s = two_queues(&USERS, None);
    let text = std::fs::read_to_string(&s.config).unwrap().replacen(
        "[store]\n",
        &format!(
            "[store]\nengine = \"postgres\"\nurl = \"{}\"\nsecurity = \"plain\"\n",
            pg.database("it_queues")
        ),
        1,
    );
    std::fs::write(&s.config, text).unwrap();
    answered_from_their_queue(s).await;
}

async fn answered_from_their_queue(s: Setup) {
    let stack = &s.stack;
    let to = |user: &str| [MailStack::addr(user)];
    let send = |from: &str, to_user: &str, raw: &[u8]| {
        let rcpt = to(to_user);
        let r: Vec<&str> = rcpt.iter().map(String::as_str).collect();
        stack.send(&MailStack::addr(from), &r, raw).unwrap();
    };
    send(
        "alice",
        "support",
        &mail(
            "Alice <alice@example.test>",
            "support@example.test",
            "Printer on fire",
            "a1@alice.test",
            "",
            "Please help.",
        ),
    );
    send(
        "bob",
        "billing",
        &mail(
            "Bob <bob@example.test>",
            "billing@example.test",
            "Invoice wrong",
            "b1@bob.test",
            "",
            "I was charged twice.",
        ),
    );
    stack.settle().await;
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 2, "{cases:?}");
    let (alice, bob) = (
        case_of(&cases, "alice@example.test"),
        case_of(&cases, "bob@example.test"),
    );
    assert_eq!(
        (alice["queue"].as_str(), alice["tier"].as_str()),
        (Some("support"), Some("Frontline"))
    );
    assert_eq!(
        (bob["queue"].as_str(), bob["tier"].as_str()),
        (Some("billing"), Some("Billing"))
    );
    assert_ne!(
        alice["id"], bob["id"],
        "case numbers are unique across queues"
    );
    let bob_id = bob["id"].as_u64().unwrap();

    let a = stack.wait_for("alice", 1, Duration::from_secs(20)).await;
    let b = stack.wait_for("bob", 1, Duration::from_secs(20)).await;
    assert_eq!((a.len(), b.len()), (1, 1));
    assert!(
        from_of(&a[0]).contains("support@example.test"),
        "{}",
        from_of(&a[0])
    );
    let bob_from = from_of(&b[0]);
    assert!(
        bob_from.contains("billing@example.test") && bob_from.contains("Acme Billing"),
        "{bob_from}"
    );
    // Nothing the customer reads names the other queue (the loop header
    // carries `cases.instance`, by default [smtp] from: see docs/configuration.md).
    let body = escalator::message::parse(&b[0]).text;
    assert!(!body.contains("support@"), "{body}");
    assert!(
        body.contains("Acme Billing") && body.contains("Billing team"),
        "{body}"
    );

    // Bob answers the ack but to support@: the reply reaches the other
    // queue's mailbox, joins his billing case, and its escalation goes
    // along billing's path and is told from billing's address.
    let reply = mail(
        "Bob <bob@example.test>",
        "support@example.test",
        &format!("Re: [Case #{bob_id}] Invoice wrong"),
        "b2@bob.test",
        "In-Reply-To: <b1@bob.test>\r\nReferences: <b1@bob.test>\r\n",
        "Still wrong. I want a supervisor.",
    );
    send("bob", "support", &reply);
    stack.settle().await;
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 2, "the reply joined, no new case: {cases:?}");
    let bob = case_of(&cases, "bob@example.test");
    assert_eq!(bob["id"].as_u64(), Some(bob_id));
    assert_eq!(bob["queue"], "billing", "a case keeps its queue");
    assert_eq!(bob["messages"], 2);
    assert_eq!(bob["tier"], "Finance", "billing's next tier, not Tier 2");
    let fin = stack.wait_for("fin", 1, Duration::from_secs(20)).await;
    assert_eq!(fin.len(), 1, "the forward went to billing's path");
    assert!(
        from_of(&fin[0]).contains("billing@example.test"),
        "{}",
        from_of(&fin[0])
    );
    assert!(header(&fin[0], "Reply-To")
        .unwrap_or_default()
        .contains("billing@example.test"));
    let b = stack.wait_for("bob", 2, Duration::from_secs(20)).await;
    assert_eq!(b.len(), 2, "ack and the escalation notice");
    assert!(
        from_of(&b[1]).contains("billing@example.test"),
        "{}",
        from_of(&b[1])
    );
    assert!(
        stack.fetch("tier2", "INBOX").await.is_empty(),
        "support's tier saw nothing"
    );

    // Confirmation copies went to each queue's own mailbox and settled
    // their entries: nothing is left to send, nothing went twice.
    s.once();
    let out = escalator(&["outbox", "list", "--all", "--json", "--config", s.cfg()]);
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(entries.iter().all(|e| e["state"] == "sent"), "{entries:?}");
    for e in &entries {
        let case = e["case"].as_u64().unwrap();
        let want = if case == bob_id {
            "billing@example.test"
        } else {
            "support@example.test"
        };
        assert_eq!(e["from"], want, "{e}");
    }
    let billing_box = stack.fetch("billing", "INBOX").await;
    let copies = billing_box
        .iter()
        .filter(|m| header(m, "X-Escalator-Case").is_some())
        .count();
    assert_eq!(
        copies, 3,
        "billing's ack, notice and forward, copied to billing@ once each"
    );
    assert_eq!(s.cases().len(), 2, "copies open no case");

    // The text list names each case's queue.
    let out = escalator(&["cases", "list", "--config", s.cfg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("QUEUE/TIER") && text.contains("billing/Finance"),
        "{text}"
    );

    // Per-queue filters and KPIs.
    let out = escalator(&[
        "cases",
        "list",
        "--json",
        "--queue",
        "billing",
        "--config",
        s.cfg(),
    ]);
    let only: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["id"].as_u64(), Some(bob_id));
    let out = escalator(&["stats", "--json", "--config", s.cfg()]);
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    let queues = stats["queues"].as_array().unwrap();
    let names: Vec<&str> = queues
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["support", "billing"]);
    assert_eq!(queues[1]["cases"], 1);
    assert_eq!(queues[1]["escalated"], 1);
    assert_eq!(queues[0]["escalated"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_whose_login_is_refused_holds_up_no_other() {
    let s = two_queues(&["support", "billing", "alice"], Some("wrong-password"));
    let mut d = s.daemon();
    s.send(
        "alice",
        &mail(
            "Alice <alice@example.test>",
            "support@example.test",
            "Still ingesting?",
            "a1@alice.test",
            "",
            "Hello.",
        ),
    );
    s.stack.settle().await;
    let acks = s.stack.wait_for("alice", 1, Duration::from_secs(30)).await;
    assert_eq!(acks.len(), 1, "support goes on while billing is refused");
    let log = d
        .wait_log("IMAP login failed", 1, Duration::from_secs(20))
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("IMAP login failed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("billing"), "the log names the queue: {line}");
    assert!(
        !log.lines()
            .any(|l| l.contains("IMAP login failed") && l.contains("queue=support")),
        "{log}"
    );
    let out = d.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `run --once` reads the queues it can and says which it could not.
    let once = escalator(&["run", "--once", "--config", s.cfg()]);
    assert!(!once.status.success());
    let err = String::from_utf8_lossy(&once.stderr);
    assert!(err.contains("queue(s) billing"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_shows_the_queues_and_refuses_an_unknown_tier_naming_the_key() {
    let s = two_queues(&["support", "billing"], None);
    let out = escalator(&["check-config", "--config", s.cfg()]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("support:") && text.contains("billing:"),
        "{text}"
    );
    assert!(text.contains("Billing → Finance"), "{text}");
    let bad = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("[\"Billing\", \"Finance\"]", "[\"Billing\", \"Finanse\"]");
    std::fs::write(&s.config, bad).unwrap();
    let out = escalator(&["check-config", "--config", s.cfg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("mailboxes[1].tiers[1]") && err.contains("Finanse"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_with_its_own_smtp_server_sends_through_it_and_only_it() {
    // billing's mail goes through a server of its own; here that server
    // is down (a closed port), so billing's ack waits in the outbox while
    // support's, through [smtp], arrives.
    let closed = crate::support::free_port();
    let s = two_queues(&["support", "billing", "alice", "bob"], None);
    let text = std::fs::read_to_string(&s.config).unwrap().replacen(
        "tiers = [\"Billing\", \"Finance\"]\n",
        &format!(
            "tiers = [\"Billing\", \"Finance\"]\n[mailboxes.smtp]\nhost = \"127.0.0.1\"\nport = {closed}\nsecurity = \"plain\"\ntimeout = \"5s\"\n"
        ),
        1,
    );
    std::fs::write(&s.config, text).unwrap();
    let stack = &s.stack;
    for (who, queue, subject) in [
        ("alice", "support", "Printer"),
        ("bob", "billing", "Invoice"),
    ] {
        let raw = mail(
            &format!("{who} <{who}@example.test>"),
            &format!("{queue}@example.test"),
            subject,
            &format!("{who}1@x.test"),
            "",
            "Hello.",
        );
        stack
            .send(&MailStack::addr(who), &[&MailStack::addr(queue)], &raw)
            .unwrap();
    }
    stack.settle().await;
    s.once();
    let a = stack.wait_for("alice", 1, Duration::from_secs(20)).await;
    assert_eq!(a.len(), 1, "support's ack went through [smtp]");
    assert!(stack.fetch("bob", "INBOX").await.is_empty());
    let out = escalator(&["outbox", "list", "--json", "--config", s.cfg()]);
    let waiting: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["from"], "billing@example.test");
    assert!(
        waiting[0]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{waiting:?}"
    );
}
