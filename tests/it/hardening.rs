//! Issue 17: nothing a stranger sends may stop a node, let alone the
//! cluster. Each test is named after the defect it shows (r17_...).

use std::time::Duration;

use crate::cluster::{cluster, cluster_status, each_message_once_and_one_ack_each, seed};
use crate::postgres_server::Postgres;
use crate::support::Daemon;

/// A mail whose From is 6,000 characters long: PostgreSQL refused the
/// commit of the chunk holding it (the address is part of index keys).
fn poison() -> Vec<u8> {
    format!(
        "From: {}@example.test\r\nTo: support@example.test\r\nSubject: poison\r\n\
         Message-ID: <poison@x.test>\r\n\r\nhello\r\n",
        "p".repeat(6000)
    )
    .into_bytes()
}

fn all_alive(nodes: &mut [Daemon]) {
    for (i, d) in nodes.iter_mut().enumerate() {
        assert!(d.alive(), "node {} stopped:\n{}", i + 1, d.log());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn r17_a_poison_from_address_stops_no_daemon_on_postgresql() {
    let pg = Postgres::start();
    let users = ["support", "tier2", "c0", "c1"];
    let s = cluster(&pg, "it_poison_one", &users, &[("support", "support")]);
    seed(&s, "support", "a", 3, 2);
    s.stack.deliver_maildir("support", &poison(), 3);
    let mut d = [s.node("n1")];
    // The poison's case is new too: its ack to the long address is
    // refused by the mail server, which is not this test's concern.
    let cases = until_done_allowing_failed(&s, 4, &d).await;
    assert_eq!(cases.len(), 4);
    all_alive(&mut d);
    // A second message after it, and a restart: the node reads on.
    seed(&s, "support", "b", 2, 2);
    let cases = until_done_allowing_failed(&s, 6, &d).await;
    assert_eq!(cases.len(), 6);
    all_alive(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn r17_a_poison_from_address_stops_no_node_of_a_three_node_cluster() {
    // Before: the holder of the poisoned mailbox died, the next node took
    // the lease and died the same way, and the other queue went unread.
    let pg = Postgres::start();
    let users = ["support", "billing", "tier2", "c0", "c1"];
    let s = cluster(
        &pg,
        "it_poison_three",
        &users,
        &[("support", "support"), ("billing", "billing")],
    );
    seed(&s, "support", "s", 20, 2);
    s.stack.deliver_maildir("support", &poison(), 20);
    seed(&s, "billing", "b", 20, 2);
    let mut nodes = [s.node("n1"), s.node("n2"), s.node("n3")];
    let cases = until_done_allowing_failed(&s, 41, &nodes).await;
    all_alive(&mut nodes);
    let status = cluster_status(&s);
    let alive = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == true)
        .count();
    assert_eq!(alive, 3, "{status}");
    let normal: Vec<_> = cases
        .into_iter()
        .filter(|c| !c["customer"].as_str().unwrap_or("").starts_with("ppp"))
        .collect();
    each_message_once_and_one_ack_each(&s, &normal, 40, 2).await;
}

/// Waits until `n` cases exist and nothing is left to send but mail the
/// server refused for good (the poison's ack).
async fn until_done_allowing_failed(
    s: &crate::support::Setup,
    n: usize,
    logs: &[Daemon],
) -> Vec<serde_json::Value> {
    let refs: Vec<&Daemon> = logs.iter().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let cases = s.cases();
        if cases.len() >= n {
            break;
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = refs.iter().map(|d| d.log()).collect();
            panic!("{} cases of {n}\n{}", cases.len(), logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    until_sent(s, Duration::from_secs(120), &refs).await
}

/// Waits until no outbox entry is pending (failed ones may stay).
async fn until_sent(
    s: &crate::support::Setup,
    within: Duration,
    logs: &[&Daemon],
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let out = crate::support::escalator(&["outbox", "list", "--json", "--config", s.cfg()]);
        let pending: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let waiting = pending
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["state"] != "failed")
            .count();
        if waiting == 0 {
            s.stack.settle().await;
            return s.cases();
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|d| d.log()).collect();
            panic!("still sending: {pending}\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn r17_a_reply_delivered_before_its_original_gets_one_case_and_one_ack() {
    // Parallel delivery, greylisting and retries reorder mail: the reply
    // reached the mailbox first (one pass), its original next (the next
    // pass). Before: two cases and two acks for one matter.
    let s = crate::support::Setup::new(&["support", "alice"], "");
    let original = crate::support::mail(
        "alice@example.test",
        "support@example.test",
        "Printer on fire",
        "orig@alice.test",
        "",
        "Help!",
    );
    let reply = crate::support::mail(
        "alice@example.test",
        "support@example.test",
        "Re: Printer on fire",
        "re1@alice.test",
        "In-Reply-To: <orig@alice.test>\r\nReferences: <orig@alice.test>\r\n",
        "Still burning.",
    );
    s.stack.deliver_maildir("support", &reply, 0);
    s.once();
    s.stack.deliver_maildir("support", &original, 1);
    s.once();
    let cases = s.cases();
    assert_eq!(cases.len(), 1, "{cases:?}");
    assert_eq!(cases[0]["messages"], 2, "{cases:?}");
    s.stack.settle().await;
    let acks = s
        .stack
        .fetch("alice", "INBOX")
        .await
        .iter()
        .filter(|m| crate::crash::own_id(m).is_some_and(|(_, kind, _)| kind == 'a'))
        .count();
    assert_eq!(acks, 1, "one ack to the customer");
}
