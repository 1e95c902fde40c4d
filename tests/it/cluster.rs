//! Several daemons on one PostgreSQL store (issue 12): mailbox leases
//! with fencing, takeover after a crash, a paused node that wakes up.
//! Every daemon runs the same config (`run --node NAME`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::crash::own_id;
use crate::postgres_server::Postgres;
use crate::support::{escalator, mail, Daemon, Setup};

/// The lease the tests run with: short, so takeovers come quickly.
pub(crate) const LEASE_SECS: u64 = 3;

/// A config with one queue per `(name, user)` on database `db` of `pg`.
pub(crate) fn cluster(pg: &Postgres, db: &str, users: &[&str], queues: &[(&str, &str)]) -> Setup {
    let url = pg.database(db);
    Setup::build(users, |stack, store| {
        let mut text = String::new();
        for (name, user) in queues {
            let address = if *user == "support" {
                String::new()
            } else {
                format!("address = \"{user} <{user}@example.test>\"\n")
            };
            text += &stack.queue(name, user, &address);
        }
        text += &stack.smtp_and_store(store).replacen(
            "[store]\n",
            &format!(
                "confirm_wait = \"10s\"\ntimeout = \"4s\"\n\n[store]\nengine = \"postgres\"\nurl = \"{url}\"\n\
                 security = \"plain\"\n"
            ),
            1,
        );
        text += &format!(
            r#"
[cluster]
lease = "{LEASE_SECS}s"
claim = "30s"

[cases]
auto_reply_limit = 100000

[[tiers]]
name = "Frontline"
first_response = "4h"

[[tiers]]
name = "Tier 2"
forward_to = ["tier2@example.test"]
first_response = "8h"
"#
        );
        text
    })
}

/// The queues `support` and `billing` on database `db`, with mailboxes
/// for tier 2 and customers `c0`.. `c{customers - 1}`.
fn two_queues(pg: &Postgres, db: &str, customers: usize) -> Setup {
    let mut users = vec!["support", "billing", "tier2"];
    let names: Vec<String> = (0..customers).map(|c| format!("c{c}")).collect();
    users.extend(names.iter().map(String::as_str));
    cluster(
        pg,
        db,
        &users,
        &[("support", "support"), ("billing", "billing")],
    )
}

/// `n` new threads from `customers` customers into `user`'s mailbox,
/// Message-IDs `{tag}{i}@x.test`.
pub(crate) fn seed(s: &Setup, user: &str, tag: &str, n: usize, customers: usize) {
    for i in 0..n {
        s.stack.deliver_maildir(
            user,
            &mail(
                &format!("c{}@example.test", i % customers),
                &format!("{user}@example.test"),
                &format!("Topic {tag}{i}"),
                &format!("{tag}{i}@x.test"),
                "",
                &format!("Please help. {}", "x".repeat(800)),
            ),
            i,
        );
    }
}

pub(crate) fn cluster_status(s: &Setup) -> Value {
    let out = escalator(&["cluster", "status", "--json", "--config", s.cfg()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `n` cases hold `n` messages and nothing waits to be sent.
pub(crate) async fn until_done(
    s: &Setup,
    n: usize,
    within: Duration,
    logs: &[&Daemon],
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let cases = s.cases();
        let pending: Value = serde_json::from_slice(
            &escalator(&["outbox", "list", "--json", "--config", s.cfg()]).stdout,
        )
        .unwrap();
        if cases.len() >= n && pending.as_array().is_some_and(|p| p.is_empty()) {
            s.stack.settle().await;
            return cases;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|d| d.log()).collect();
            panic!(
                "not done: {} cases of {n}, pending {pending}\n{}",
                cases.len(),
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every message in exactly one case, and each customer one ack per case
/// (one Message-ID, delivered once).
pub(crate) async fn each_message_once_and_one_ack_each(
    s: &Setup,
    cases: &[Value],
    n: usize,
    customers: usize,
) {
    let stored: u64 = cases.iter().map(|c| c["messages"].as_u64().unwrap()).sum();
    assert_eq!(cases.len(), n, "one case per thread");
    assert_eq!(stored as usize, n, "every message in exactly one case");
    let mut acks: HashMap<u64, (HashSet<String>, usize)> = HashMap::new();
    for c in 0..customers {
        for m in s.stack.fetch(&format!("c{c}"), "INBOX").await {
            if let Some((case, 'a', id)) = own_id(&m) {
                let e = acks.entry(case).or_default();
                e.0.insert(id);
                e.1 += 1;
            }
        }
    }
    let doubled: Vec<_> = acks
        .iter()
        .filter(|(_, (ids, n))| ids.len() != 1 || *n != 1)
        .collect();
    assert!(doubled.is_empty(), "acks sent twice: {doubled:?}");
    assert_eq!(acks.len(), n, "one ack per case");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_on_two_mailboxes_take_in_every_message_once() {
    let pg = Postgres::start();
    let customers = 6;
    let s = two_queues(&pg, "it_three", customers);
    let per = 1500;
    seed(&s, "support", "s", per, customers);
    seed(&s, "billing", "b", per, customers);
    // One config for all three: each its own /metrics by the flag.
    let ports: Vec<u16> = (0..3).map(|_| crate::support::free_port()).collect();
    let mut nodes: Vec<Daemon> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| s.node_with_metrics(&format!("n{}", i + 1), &format!("127.0.0.1:{p}")))
        .collect();
    let cases = until_done(
        &s,
        2 * per,
        Duration::from_secs(400),
        &nodes.iter().collect::<Vec<_>>(),
    )
    .await;
    // The two mailboxes are watched by two different nodes, the third
    // stands by; every node is alive (a heartbeat late on a loaded
    // machine is given a few seconds).
    let settled = |status: &Value| {
        let holders: HashSet<&str> = status["mailboxes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["holder"].as_str())
            .collect();
        let alive = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["alive"] == true)
            .count();
        holders.len() == 2 && alive == 3
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut status = cluster_status(&s);
    while !settled(&status) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        status = cluster_status(&s);
    }
    assert!(settled(&status), "{status}");
    assert_eq!(status["outbox_depth"], 0);
    // Every mail sent names the node that claimed it, one of the three.
    let url = pg.database("it_three");
    let claimed: Vec<(Option<String>, i64)> = tokio::task::spawn_blocking(move || {
        let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        c.query(
            "SELECT claimed_by, count(*) FROM escalator.outbox WHERE state = 'sent' \
             GROUP BY claimed_by ORDER BY claimed_by",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    })
    .await
    .unwrap();
    assert!(
        !claimed.is_empty()
            && claimed.iter().all(|(node, _)| node
                .as_deref()
                .is_some_and(|n| ["n1", "n2", "n3"].contains(&n))),
        "{claimed:?}"
    );
    // Each node counted what it took in; together, every message once
    // (acks' confirmation copies count as own copies on top).
    let stored: f64 = ports
        .iter()
        .map(|p| {
            crate::support::scrape(*p, "escalator_queue_messages_ingested_total")
                .unwrap_or_else(|| panic!("no /metrics on {p}"))
        })
        .sum();
    assert!(stored >= (2 * per) as f64, "{stored}");
    let fenced: f64 = ports
        .iter()
        .filter_map(|p| crate::support::scrape(*p, "escalator_fenced_writes_total"))
        .sum();
    assert_eq!(fenced, 0.0, "no node lost a lease it was writing under");
    each_message_once_and_one_ack_each(&s, &cases, 2 * per, customers).await;
    for d in nodes.iter_mut() {
        let out = d.stop();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A clean stop leaves the cluster and hands the mailboxes back.
    let status = cluster_status(&s);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 0, "{status}");
    assert!(
        status["mailboxes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["holder"].is_null()),
        "{status}"
    );
}

/// One mailbox holding 800 new threads from 4 customers: the setup, the
/// number of messages, the number of customers.
fn one_mailbox_filled(pg: &Postgres, db: &str, tag: &str) -> (Setup, usize, usize) {
    let customers = 4;
    let mut users = vec!["support", "tier2"];
    let names: Vec<String> = (0..customers).map(|c| format!("c{c}")).collect();
    users.extend(names.iter().map(String::as_str));
    let s = cluster(pg, db, &users, &[("support", "support")]);
    let n = 800;
    seed(&s, "support", tag, n, customers);
    (s, n, customers)
}

/// Starts `n1`, waits until it watches the mailbox and has taken some
/// mail in, then starts `n2`.
async fn holder_mid_ingest(s: &Setup, progress: usize) -> (Daemon, Daemon) {
    let n1 = s.node("n1");
    n1.wait_log("lease taken", 1, Duration::from_secs(30)).await;
    let n2 = s.node("n2");
    n2.wait_log("joining the cluster", 1, Duration::from_secs(30))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.cases().len() < progress {
        assert!(Instant::now() < deadline, "no progress:\n{}", n1.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (n1, n2)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_lease_holder_s_mailbox_is_taken_over_within_a_lease_and_nothing_is_lost() {
    let pg = Postgres::start();
    let (s, n, customers) = one_mailbox_filled(&pg, "it_kill", "k");
    let (mut n1, n2) = holder_mid_ingest(&s, 50).await;
    assert_eq!(n2.log().matches("lease taken").count(), 0, "n1 holds it");
    n1.kill();
    let killed = Instant::now();
    let log = n2
        .wait_log("lease taken", 1, Duration::from_secs(4 * LEASE_SECS))
        .await;
    let took = killed.elapsed();
    eprintln!("takeover {took:?} after SIGKILL (lease {LEASE_SECS}s)");
    assert!(log.contains("lease taken"), "no takeover:\n{log}");
    // Expiry (at most a lease after the last renewal) plus the poll of
    // the log; the bench measures it precisely.
    assert!(took <= Duration::from_secs(2 * LEASE_SECS), "took {took:?}");
    // Mail the killed node was sending is settled by its confirmation
    // copy or sent again once its claim expires: once either way.
    let cases = until_done(&s, n, Duration::from_secs(240), &[&n2]).await;
    each_message_once_and_one_ack_each(&s, &cases, n, customers).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_lease_holder_that_wakes_up_writes_nothing_and_steps_back() {
    let pg = Postgres::start();
    let (s, n, customers) = one_mailbox_filled(&pg, "it_pause", "p");
    let (n1, n2) = holder_mid_ingest(&s, 50).await;
    n1.signal("STOP");
    // Paused past its lease (and past the database's limit on a session
    // idle inside a transaction): n2 takes over and goes on.
    let log = n2
        .wait_log("lease taken", 1, Duration::from_secs(4 * LEASE_SECS))
        .await;
    assert!(log.contains("lease taken"), "no takeover:\n{log}");
    let before = s.cases().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.cases().len() <= before {
        assert!(
            Instant::now() < deadline,
            "n2 makes no progress:\n{}",
            n2.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    n1.signal("CONT");
    // n1 finds its lease gone: a write it had in hand is refused by the
    // fence (or it stops before writing), and it does not take the
    // mailbox back from a live holder.
    let woke = n1
        .wait_log("stepped back", 1, Duration::from_secs(20))
        .await;
    let woke = if woke.contains("stepped back") {
        woke
    } else {
        n1.wait_log("lease lost", 1, Duration::from_secs(20)).await
    };
    assert!(
        woke.contains("stepped back")
            || woke.contains("lease lost")
            || woke.contains("before it could expire"),
        "{woke}"
    );
    let cases = until_done(&s, n, Duration::from_secs(240), &[&n1, &n2]).await;
    assert_eq!(n1.log().matches("lease taken").count(), 1, "{}", n1.log());
    let status = cluster_status(&s);
    assert_eq!(status["mailboxes"][0]["holder"], "n2", "{status}");
    each_message_once_and_one_ack_each(&s, &cases, n, customers).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_killed_mid_ingest_under_two_daemons_loses_and_doubles_nothing() {
    // An immediate stop: no checkpoint, every connection cut, the server
    // recovers from its WAL. What was committed stays; what was not is
    // fetched again from the mailbox.
    let pg = Postgres::start();
    let (s, n, customers) = one_mailbox_filled(&pg, "it_pgcrash", "x");
    let (n1, n2) = holder_mid_ingest(&s, 50).await;
    pg.crash_restart();
    // Mid-ingest: the crash came before the last message was in.
    let at_crash = s.cases().len();
    assert!(at_crash < n, "{at_crash} of {n}: the crash came too late");
    let cases = until_done(&s, n, Duration::from_secs(240), &[&n1, &n2]).await;
    each_message_once_and_one_ack_each(&s, &cases, n, customers).await;
    // Both daemons rode it out: still running, both alive in the cluster.
    let status = cluster_status(&s);
    let alive = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == true)
        .count();
    assert_eq!(alive, 2, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_message_in_two_queues_mailboxes_taken_in_by_two_nodes_at_once_is_one_message() {
    // Issue 22: nodes commit in parallel, so two nodes may both find a
    // Message-ID missing and both store it. The unique key stops the
    // second; its chunk runs again and finds the message stored.
    let pg = Postgres::start();
    let customers = 4;
    let s = two_queues(&pg, "it_same_id", customers);
    let n = 400;
    let ports: Vec<u16> = (0..2).map(|_| crate::support::free_port()).collect();
    let mut nodes: Vec<Daemon> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| s.node_with_metrics(&format!("n{}", i + 1), &format!("127.0.0.1:{p}")))
        .collect();
    // Mail arrives once each node holds one mailbox, so both take it in
    // at the same time.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cluster_status(&s);
        let holders: HashSet<String> = status["mailboxes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["holder"].as_str().map(str::to_string))
            .collect();
        if holders.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "leases not spread: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each mail delivered to both mailboxes (Cc to both addresses).
    for i in 0..n {
        let m = mail(
            &format!("c{}@example.test", i % customers),
            "support@example.test, billing@example.test",
            &format!("Topic {i}"),
            &format!("both{i}@x.test"),
            "",
            &format!("Please help. {}", "x".repeat(400)),
        );
        s.stack.deliver_maildir("support", &m, i);
        s.stack.deliver_maildir("billing", &m, i);
    }
    // Both mailboxes read through: every copy fetched and accounted for.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let fetched: f64 = ports
            .iter()
            .filter_map(|p| crate::support::scrape(*p, "escalator_messages_ingested_total"))
            .sum();
        if fetched >= (2 * n) as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "fetched {fetched} of {}", 2 * n);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cases = until_done(
        &s,
        n,
        Duration::from_secs(120),
        &nodes.iter().collect::<Vec<_>>(),
    )
    .await;
    each_message_once_and_one_ack_each(&s, &cases, n, customers).await;
    let races = nodes
        .iter()
        .map(|d| {
            d.log()
                .matches("another node wrote the same record at once")
                .count()
        })
        .sum::<usize>();
    eprintln!("commits that conflicted and ran again: {races}");
    for d in nodes.iter_mut() {
        let out = d.stop();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
