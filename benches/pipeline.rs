//! The benchmark: escalator against the mail servers' own limits.
//!
//! `cargo bench --bench pipeline` starts the same private Dovecot + Postfix
//! as the integration tests and prints a table; every figure is measured
//! in the same run as its baseline and given as a ratio. Sizes come from
//! the environment (defaults in brackets):
//!
//! - `ESCALATOR_BENCH_N` messages for ingest and acks [10000]
//! - `ESCALATOR_BENCH_LATENCY` messages for the latency run [200]
//! - `ESCALATOR_BENCH_CASES` store sizes for timers [10000,100000,1000000]
//! - `ESCALATOR_BENCH_IDLE` seconds of the idle window [60]
//!
//! `cargo test --all-targets` only builds it (and CI with it); with
//! `ESCALATOR_BENCH_SMOKE=1` it runs the same code at toy sizes.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/it/support.rs"]
mod support;

#[path = "../src/testing/postgres.rs"]
mod postgres_server;

#[path = "pipeline/cluster.rs"]
mod cluster;

#[path = "pipeline/languages.rs"]
mod languages;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::TryStreamExt;

use escalator::case::{Case, Timer, TimerKind};
use escalator::clock::{Clock, SystemClock};
use escalator::config::{Config, Live};
use escalator::ingest::Ingestor;
use escalator::scheduler::Scheduler;
use escalator::store::{Store, StoreError};
use escalator::wake::Wakers;
use support::MailStack;

struct Sizes {
    n: usize,
    latency: usize,
    cases: Vec<usize>,
    idle: u64,
    due: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sizes() -> Sizes {
    let bench = std::env::args().any(|a| a == "--bench");
    let (n, latency, cases, idle, due) = if bench {
        (10_000, 200, "10000,100000,1000000", 60, 1000)
    } else {
        (200, 10, "1000,3000", 2, 100)
    };
    Sizes {
        n: env_or("ESCALATOR_BENCH_N", n),
        latency: env_or("ESCALATOR_BENCH_LATENCY", latency),
        cases: std::env::var("ESCALATOR_BENCH_CASES")
            .unwrap_or_else(|_| cases.into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        idle: env_or("ESCALATOR_BENCH_IDLE", idle),
        due,
    }
}

/// A tiny deterministic generator, so every run seeds the same mail.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: [&str; 16] = [
    "printer",
    "invoice",
    "the",
    "login",
    "error",
    "since",
    "update",
    "please",
    "account",
    "refund",
    "again",
    "cannot",
    "order",
    "screen",
    "help",
    "yesterday",
];

/// Customers writing in (each a real mailbox, so acks are delivered).
const CUSTOMERS: usize = 2000;

fn customer(i: usize) -> String {
    format!("c{}", i % CUSTOMERS)
}

/// N customer messages, 2-20 KB, about 70% new threads and 30% replies.
fn corpus(n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x5eed_cafe);
    let mut last: Vec<Option<usize>> = vec![None; CUSTOMERS];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % CUSTOMERS;
        let size = 2048 + rng.below(18 * 1024) as usize;
        let mut body = String::with_capacity(size + 80);
        while body.len() < size {
            body.push_str(WORDS[rng.below(16) as usize]);
            body.push(if rng.below(12) == 0 { '\n' } else { ' ' });
        }
        let reply = last[c].filter(|_| rng.below(10) < 3);
        let mut head = format!(
            "From: Customer {c} <{}@{}>\r\nTo: support@{}\r\nMessage-ID: <m{i}@bench.test>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n",
            customer(c),
            support::DOMAIN,
            support::DOMAIN
        );
        match reply {
            Some(p) => head.push_str(&format!(
                "Subject: Re: Problem {p}\r\nIn-Reply-To: <m{p}@bench.test>\r\nReferences: <m{p}@bench.test>\r\n"
            )),
            None => {
                head.push_str(&format!("Subject: Problem {i}\r\n"));
                last[c] = Some(i);
            }
        }
        out.push(format!("{head}\r\n{}\r\n", body.replace('\n', "\r\n")).into_bytes());
    }
    out
}

/// The tests' config, with the per-customer auto-reply limit out of the
/// way (each of 2,000 customers writes several times).
fn config_text(stack: &MailStack, store: &Path, extra: &str) -> String {
    stack.config(
        "support",
        store,
        &format!("\n[cases]\nauto_reply_limit = 100000000\nauto_reply_global_limit = 0\n{extra}"),
    )
}

/// Queues of the several-mailboxes run.
const QUEUES: usize = 8;

fn users() -> Vec<String> {
    let mut u: Vec<String> = vec!["support".into(), "tier2".into(), "direct".into()];
    u.extend((0..QUEUES).map(|q| format!("q{q}")));
    // The cluster figures' mailboxes: each run a new database on
    // mailboxes of its own (a new store reads a mailbox from its start).
    u.extend((0..16).map(|k| format!("k{k}")));
    u.extend((0..CUSTOMERS).map(customer));
    u
}

fn start_stack() -> MailStack {
    let u = users();
    let refs: Vec<&str> = u.iter().map(String::as_str).collect();
    MailStack::start(&refs)
}

/// Waits until Postfix has delivered everything (no time limit worth
/// failing on: large runs take minutes).
fn drain_postfix(stack: &MailStack) {
    let deadline = Instant::now() + Duration::from_secs(1800);
    while Instant::now() < deadline {
        let out = Command::new("postqueue")
            .arg("-c")
            .arg(stack.dir.join("postfix"))
            .arg("-j")
            .output()
            .unwrap();
        if out.stdout.iter().all(|b| b.is_ascii_whitespace()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn maildir_count(stack: &MailStack, user: &str) -> usize {
    let md = stack.dir.join("mail").join(user).join("Maildir");
    ["new", "cur"]
        .iter()
        .map(|s| fs::read_dir(md.join(s)).map(|d| d.count()).unwrap_or(0))
        .sum()
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

/// A plain IMAP client: every message of the INBOX with BODY.PEEK[] over
/// one connection. Returns (messages, bytes).
async fn raw_fetch(stack: &MailStack) -> (usize, usize) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.imap_port))
        .await
        .unwrap();
    let mut client = async_imap::Client::new(tcp);
    client.read_response().await.unwrap();
    let mut s = client
        .login("support", "support")
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    s.examine("INBOX").await.unwrap();
    let fetches: Vec<_> = s
        .uid_fetch("1:*", "BODY.PEEK[]")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let bytes = fetches
        .iter()
        .map(|f| f.body().map_or(0, |b| b.len()))
        .sum();
    let _ = s.logout().await;
    (fetches.len(), bytes)
}

/// A JSON log line's field, from `escalator --log-format json`.
fn log_field(log: &str, message: &str, field: &str) -> Option<u64> {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == message)
        .and_then(|v| v["fields"][field].as_u64())
}

struct Row {
    what: String,
    escalator: String,
    baseline: String,
    ratio: String,
    goal: String,
}

fn row(what: &str, escalator: String, baseline: String, ratio: String, goal: &str) -> Row {
    // Said at once too: a later section that fails loses no figure.
    eprintln!("bench figure: {what} | {escalator} | {baseline} | {ratio} | {goal}");
    Row {
        what: what.into(),
        escalator,
        baseline,
        ratio,
        goal: goal.into(),
    }
}

/// 1 and 2: ingest N messages, then send their acks, each against its
/// baseline; 6: store size per message.
async fn ingest_and_acks(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    let mail = corpus(sz.n);
    let raw_bytes: usize = mail.iter().map(Vec::len).sum();
    for (i, m) in mail.iter().enumerate() {
        stack.deliver_maildir("support", m, i);
    }
    // Dovecot indexes the new Maildir files on first access: not timed.
    let (seen, _) = raw_fetch(&stack).await;
    assert_eq!(seen, sz.n);
    let t = Instant::now();
    let (got, _) = raw_fetch(&stack).await;
    let fetch_s = t.elapsed().as_secs_f64();
    assert_eq!(got, sz.n);

    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = dir.path().join("escalator.toml");
    fs::write(&cfg, config_text(&stack, &store, "")).unwrap();
    // ESCALATOR_BENCH_WRAP (e.g. "perf record -g --") profiles the run.
    let wrap = std::env::var("ESCALATOR_BENCH_WRAP").unwrap_or_default();
    let mut argv: Vec<String> = wrap.split_whitespace().map(String::from).collect();
    argv.push(env!("CARGO_BIN_EXE_escalator").into());
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .args(["--log-format", "json", "run", "--once", "--config"])
        .arg(&cfg)
        .env("ESCALATOR_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    let fetched = log_field(&log, "mailbox pass done", "fetched").unwrap_or(0) as usize;
    let sent = log_field(&log, "one cycle done", "sent").unwrap_or(0) as usize;
    assert_eq!(fetched, sz.n, "every message became part of a case");
    let ingest_s = log_field(&log, "one cycle done", "ingest_ms").unwrap() as f64 / 1000.0;
    let drain_s = log_field(&log, "one cycle done", "drain_ms").unwrap() as f64 / 1000.0;
    let new_cases = log_field(&log, "mailbox pass done", "new_cases").unwrap_or(0);
    assert!(
        sent > 0 && sent as u64 == new_cases,
        "one ack per new case: {sent} vs {new_cases}"
    );
    let (esc_rate, raw_rate) = (sz.n as f64 / ingest_s, sz.n as f64 / fetch_s);
    rows.push(row(
        &format!("1. Ingest {} messages ({} MB)", sz.n, raw_bytes >> 20),
        format!("{esc_rate:.0} msg/s"),
        format!("{raw_rate:.0} msg/s (raw IMAP fetch)"),
        format!("{:.2}x", esc_rate / raw_rate),
        ">= 0.5x",
    ));
    let store_bytes = dir_bytes(&store);
    rows.push(row(
        "6. Store size per message",
        format!("{} B", store_bytes / sz.n as u64),
        format!("{} B (raw message)", raw_bytes / sz.n),
        format!("{:.2}x", store_bytes as f64 / raw_bytes as f64),
        "(report)",
    ));

    // Baseline for acks: the same number of ack-sized mails, each to a
    // customer and the support address (as escalator's confirmation copy
    // does), over one SMTP connection.
    drain_postfix(&stack);
    let sample = {
        let md = stack.dir.join("mail").join(customer(0)).join("Maildir/new");
        let first = fs::read_dir(&md).unwrap().flatten().next().unwrap().path();
        fs::read(first).unwrap()
    };
    let t = Instant::now();
    let mut client = support::SmtpClient::connect(stack.smtp_port).unwrap();
    let support_addr = format!("support@{}", support::DOMAIN);
    for i in 0..sent {
        let to = format!("{}@{}", customer(i), support::DOMAIN);
        client
            .send(&support_addr, &[&to, &support_addr], &sample)
            .unwrap();
    }
    client.quit();
    let raw_smtp_s = t.elapsed().as_secs_f64();
    let (esc, raw) = (sent as f64 / drain_s, sent as f64 / raw_smtp_s);
    rows.push(row(
        &format!("2. Acks out ({sent})"),
        format!("{esc:.0} mail/s"),
        format!("{raw:.0} mail/s (raw SMTP, one connection)"),
        format!("{:.2}x", esc / raw),
        ">= 0.8x",
    ));
    drain_postfix(&stack);
}

fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

/// Waits for `user`'s Maildir to reach `n` messages; the time it took.
fn arrival(stack: &MailStack, user: &str, n: usize, from: Instant) -> f64 {
    while maildir_count(stack, user) < n {
        assert!(
            from.elapsed() < Duration::from_secs(60),
            "no mail for {user}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    from.elapsed().as_secs_f64()
}

/// 3: customer mail in over SMTP → its ack in the customer's INBOX, with
/// the daemon on IDLE; baseline = Postfix delivering straight to a user.
fn latency(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("escalator.toml");
    fs::write(&cfg, config_text(&stack, &dir.path().join("store"), "")).unwrap();
    let log = dir.path().join("daemon.log");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("watching mailbox")
        && started.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cust = customer(0);
    let from = format!("{cust}@{}", support::DOMAIN);
    let support_addr = format!("support@{}", support::DOMAIN);
    let mut esc = Vec::new();
    for i in 0..sz.latency {
        let raw = format!(
            "From: {from}\r\nTo: {support_addr}\r\nSubject: Latency {i}\r\nMessage-ID: <l{i}@bench.test>\r\n\r\nHello {i}\r\n"
        );
        let t = Instant::now();
        support::smtp_send(stack.smtp_port, &from, &[&support_addr], raw.as_bytes()).unwrap();
        esc.push(arrival(&stack, &cust, i + 1, t));
    }
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    let mut base = Vec::new();
    for i in 0..sz.latency {
        let raw = format!(
            "From: {from}\r\nTo: direct@{}\r\nSubject: Direct {i}\r\nMessage-ID: <d{i}@bench.test>\r\n\r\nHello {i}\r\n",
            support::DOMAIN
        );
        let t = Instant::now();
        let to = format!("direct@{}", support::DOMAIN);
        support::smtp_send(stack.smtp_port, &from, &[&to], raw.as_bytes()).unwrap();
        base.push(arrival(&stack, "direct", i + 1, t));
    }
    for (p, goal) in [(50, "< 1 s"), (99, "< 3 s")] {
        let (e, b) = (percentile(&mut esc, p), percentile(&mut base, p));
        rows.push(row(
            &format!(
                "3. Latency p{p}, mail in → ack in INBOX ({} msgs)",
                sz.latency
            ),
            format!("{:.0} ms", e * 1000.0),
            format!("{:.0} ms (plain delivery)", b * 1000.0),
            format!("{:.1}x", e / b),
            goal,
        ));
    }
}

/// Adds `count` open cases to the store: `due` of them past their
/// deadline, the rest due over the coming week.
fn add_cases(store: &Store, first_id: u64, count: usize, due: usize) {
    let now = Utc::now();
    let week = 7 * 86_400_000i64;
    let mut cases = Vec::with_capacity(1000);
    for i in 0..count {
        let id = first_id + i as u64;
        let at = if i < due {
            now - chrono::Duration::seconds(3600 + i as i64)
        } else {
            now + chrono::Duration::milliseconds(3_600_000 + (i as i64 * week) / count as i64)
        };
        let mut c = Case::new(
            id,
            &format!("bulk{}@bulk.test", id % 50_000),
            &format!("Bulk case {id}"),
            "Frontline",
            &format!("b{id}@bulk.test"),
            now - chrono::Duration::hours(5),
        );
        c.due_at = Some(at);
        c.timer = Some(Timer {
            at,
            kind: TimerKind::Due,
        });
        cases.push(c);
        if i % 1000 == 999 || i + 1 == count {
            store
                .transact(|tx| {
                    for mut c in cases.drain(..) {
                        tx.put_case(&mut c)?;
                    }
                    Ok::<_, StoreError>(())
                })
                .unwrap();
        }
    }
    store.flush().unwrap();
}

fn rss_kb(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sum of a Prometheus metric's samples.
fn metric(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return -1.0;
    };
    let _ = c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 4 and 5: timer passes over growing stores, stats over them, then the
/// daemon's memory and wake-ups on the largest.
fn timers_and_memory(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    let dir = tempfile::tempdir().unwrap();
    let store_path: PathBuf = dir.path().join("store");
    let port = support::free_port();
    let cfg_path = dir.path().join("escalator.toml");
    fs::write(
        &cfg_path,
        config_text(
            &stack,
            &store_path,
            &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        ),
    )
    .unwrap();
    let config = Config::load(&cfg_path).unwrap();
    {
        let store = Arc::new(Store::open(&store_path).unwrap());
        let live = Live::new(config.clone());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let scheduler = Scheduler::new(escalator::handle::Handle {
            store: store.clone(),
            config: live.clone(),
            clock: clock.clone(),
            wake: Arc::new(Wakers::default()),
        });
        let ingestor = Ingestor::new(escalator::handle::Handle {
            store: store.clone(),
            config: live,
            clock,
            wake: Arc::new(Wakers::default()),
        });
        let mut have = 0usize;
        let mut first: Option<(f64, f64)> = None;
        for &size in &sz.cases {
            add_cases(&store, have as u64 + 1, size - have, sz.due);
            have = size;
            let t = Instant::now();
            let fired = scheduler.pass().unwrap();
            let pass_ms = t.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(fired, sz.due);
            let t = Instant::now();
            let report = escalator::admin::stats_report(&ingestor, None, Utc::now()).unwrap();
            let stats_ms = t.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(report.overall.cases as usize, size);
            let (base_pass, base_stats) = *first.get_or_insert((pass_ms, stats_ms));
            rows.push(row(
                &format!("4. Timer pass, {} due of {size} open cases", sz.due),
                format!("{pass_ms:.0} ms"),
                format!("{base_pass:.0} ms (at {})", sz.cases[0]),
                format!("{:.2}x", pass_ms / base_pass),
                "about 1x",
            ));
            rows.push(row(
                &format!("   stats over all {size} cases"),
                format!("{stats_ms:.0} ms"),
                format!("{base_stats:.0} ms (at {})", sz.cases[0]),
                format!("{:.2}x", stats_ms / base_stats),
                "(report)",
            ));
        }
        // The mail the passes queued is not part of the idle minute.
        for e in store.outbox_pending().unwrap() {
            let mut e = e;
            store
                .transact(|tx| escalator::outbox::journal::mark_sent(tx, &mut e, Utc::now()))
                .unwrap();
        }
        store.flush().unwrap();
    }

    let log = dir.path().join("daemon.log");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .stderr(fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = daemon.id();
    let started = Instant::now();
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("watching mailbox")
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (start_rss, _) = rss_kb(pid);
    while metric(port, "escalator_scheduler_wakeups_total") < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(120), "no metrics");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = metric(port, "escalator_scheduler_wakeups_total");
    std::thread::sleep(Duration::from_secs(sz.idle));
    let wakeups = metric(port, "escalator_scheduler_wakeups_total") - before;
    let (idle_rss, _) = rss_kb(pid);
    let largest = *sz.cases.last().unwrap();
    rows.push(row(
        &format!(
            "4. Scheduler wake-ups in {} s idle ({largest} cases)",
            sz.idle
        ),
        format!("{wakeups:.0}"),
        "-".into(),
        "-".into(),
        "0",
    ));
    // Ingest while holding the large store: peak memory.
    let mail = corpus(sz.n.min(2000));
    for (i, m) in mail.iter().enumerate() {
        stack.deliver_maildir("support", m, 1_000_000 + i);
    }
    let t = Instant::now();
    while metric(port, "escalator_messages_ingested_total") < mail.len() as f64 {
        assert!(t.elapsed() < Duration::from_secs(900), "ingest stalled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, peak) = rss_kb(pid);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = daemon.wait();
    rows.push(row(
        &format!("5. Daemon RSS after start, {largest} cases"),
        format!("{} MB", start_rss / 1024),
        "-".into(),
        format!("{:.2}x of goal", start_rss as f64 / 1024.0 / 150.0),
        "< 150 MB",
    ));
    rows.push(row(
        &format!("5. Daemon RSS, idle minute with metrics scrapes, {largest} cases"),
        format!("{} MB", idle_rss / 1024),
        "-".into(),
        format!("{:.2}x of goal", idle_rss as f64 / 1024.0 / 150.0),
        "< 150 MB",
    ));
    rows.push(row(
        &format!("5. Daemon peak RSS, ingesting {} messages", mail.len()),
        format!("{} MB", peak / 1024),
        "-".into(),
        format!("{:.2}x of goal", peak as f64 / 1024.0 / 150.0),
        "< 150 MB",
    ));
}

/// A config for in-process figures, its store in `dir`: nothing
/// connects (the servers' ports are never used), no automatic-mail
/// limit; `rest` adds its sections (the tiers at least).
fn offline_config(dir: &Path, rest: &str) -> Config {
    let cfg_path = dir.join("escalator.toml");
    fs::write(
        &cfg_path,
        format!(
            r#"[mailbox]
host = "127.0.0.1"
port = 9
security = "plain"
username = "support"
password = "x"

[smtp]
host = "127.0.0.1"
port = 9
security = "plain"
from = "Support <support@bench.test>"

[store]
path = "{}"

[cases]
auto_reply_limit = 100000000
auto_reply_global_limit = 0

{rest}"#,
            dir.join("store").display()
        ),
    )
    .unwrap();
    Config::load(&cfg_path).unwrap()
}

/// 6: one customer writing into one case again and again: a message
/// added to a case of 5,000 against one added to a case of 1. Each
/// message is its own durable transaction, as a lone reply would be.
fn append(rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(
        dir.path(),
        "[[tiers]]\nname = \"Frontline\"\nfirst_response = \"4h\"\n",
    );
    let ingestor = Ingestor::new(escalator::handle::Handle {
        store: Arc::new(Store::open(&config.store.path).unwrap()),
        config: Live::new(config),
        clock: Arc::new(SystemClock),
        wake: Arc::new(Wakers::default()),
    });
    let mail = |i: usize| {
        let reply = if i == 0 {
            String::new()
        } else {
            "In-Reply-To: <loop-0@cust.test>\r\n".to_string()
        };
        format!(
            "From: Looping Customer <loop@cust.test>\r\nTo: support@bench.test\r\n\
             Subject: Re: still broken\r\nMessage-ID: <loop-{i}@cust.test>\r\n{reply}\
             Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nStill broken, message {i}.\r\n"
        )
        .into_bytes()
    };
    // Median of `k` single-message transactions, each flushed (the
    // median: one slow fsync should not decide the figure).
    let timed = |from: usize, k: usize| {
        let mut each: Vec<f64> = (from..from + k)
            .map(|i| {
                let t = Instant::now();
                ingestor.ingest(None, &mail(i), None).unwrap();
                ingestor.store.flush().unwrap();
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        percentile(&mut each, 50)
    };
    let k = 50;
    ingestor.ingest(None, &mail(0), None).unwrap();
    let early = timed(1, k);
    let big = 5_000;
    for i in (k + 1)..big {
        ingestor.ingest(None, &mail(i), None).unwrap();
    }
    let late = timed(big, k);
    let case = ingestor.store.case(1).unwrap().unwrap();
    assert_eq!(case.message_count as usize, big + k, "one case");
    rows.push(row(
        &format!("6. Adding message {} to one case (median of {k})", big + 1),
        format!("{late:.2} ms"),
        format!("{early:.2} ms (message 2)"),
        format!("{:.2}x", late / early),
        "≤ 1.5x",
    ));
}

/// `stats` alone over the largest store size, five times (for a
/// profile: `perf record` the benchmark with this section).
fn stats_only(sz: &Sizes, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let n = sz.cases.iter().copied().max().unwrap_or(10_000);
    add_cases(&store, 1, n, 0);
    let cfg = dir.path().join("escalator.toml");
    fs::write(&cfg, format!("[mailbox]\nhost = \"127.0.0.1\"\nport = 9\nsecurity = \"plain\"\nusername = \"s\"\npassword = \"p\"\n[smtp]\nhost = \"127.0.0.1\"\nport = 9\nsecurity = \"plain\"\nfrom = \"s@bench.test\"\n[store]\npath = \"{}\"\n[[tiers]]\nname = \"Frontline\"\nfirst_response = \"4h\"\n", dir.path().join("unused").display())).unwrap();
    let ingestor = Ingestor::new(escalator::handle::Handle {
        store,
        config: Live::new(Config::load(&cfg).unwrap()),
        clock: Arc::new(SystemClock),
        wake: Arc::new(Wakers::default()),
    });
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let r = escalator::admin::stats_report(&ingestor, None, Utc::now()).unwrap();
        best = best.min(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.overall.cases as usize, n);
    }
    rows.push(row(
        &format!("   stats over all {n} cases (best of 5)"),
        format!("{best:.0} ms"),
        "-".into(),
        "-".into(),
        "< 1 s",
    ));
}

/// 8: the same mailbox ingested into sled and into PostgreSQL (a private
/// server, fsync on as in production), one run each on a new store.
fn postgres(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    let mail = corpus(sz.n);
    for (i, m) in mail.iter().enumerate() {
        stack.deliver_maildir("support", m, i);
    }
    let pg = postgres_server::Postgres::start_with(true);
    let ingest = |engine: &str, n: usize| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("escalator.toml");
        let mut text = config_text(&stack, &dir.path().join("store"), "").replacen(
            "[smtp]\n",
            "[smtp]\nconfirm_copies = false\n",
            1,
        );
        if engine == "postgres" {
            let url = pg.database(&format!("bench_{n}"));
            // ESCALATOR_BENCH_PG_POOL: connections per process (default 4).
            let pool = env_or("ESCALATOR_BENCH_PG_POOL", 4usize);
            text = text.replacen(
                "[store]\n",
                &format!(
                    "[store]\nengine = \"postgres\"\nurl = \"{url}\"\nsecurity = \"plain\"\npool = {pool}\n"
                ),
                1,
            );
        }
        fs::write(&cfg, text).unwrap();
        let log = run_once(&cfg);
        assert_eq!(
            log_field(&log, "one cycle done", "fetched"),
            Some(sz.n as u64),
            "{log}"
        );
        log_field(&log, "one cycle done", "ingest_ms").unwrap() as f64 / 1000.0
    };
    // Warm Dovecot's index with one untimed run.
    ingest("sled", 0);
    drain_postfix(&stack);
    let sled_s = ingest("sled", 1);
    drain_postfix(&stack);
    let pg_s = ingest("postgres", 2);
    drain_postfix(&stack);
    let (pg_rate, sled_rate) = (sz.n as f64 / pg_s, sz.n as f64 / sled_s);
    rows.push(row(
        &format!("8. Ingest {} messages into PostgreSQL", sz.n),
        format!("{pg_rate:.0} msg/s"),
        format!("{sled_rate:.0} msg/s (sled, same mailbox)"),
        format!("{:.2}x", pg_rate / sled_rate),
        "≥ 0.8x (issue 22)",
    ));
}

/// Runs `escalator run --once` on `cfg`; its log (JSON lines).
fn run_once(cfg: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(["--log-format", "json", "run", "--once", "--config"])
        .arg(cfg)
        .env("ESCALATOR_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    log
}

/// 7: the same messages in one mailbox, and spread over eight queues'
/// mailboxes (one IMAP connection each, all at once): total ingest time.
fn queues(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    let mail = corpus(sz.n);
    let per = sz.n / QUEUES;
    for (i, m) in mail.iter().enumerate().take(per * QUEUES) {
        stack.deliver_maildir("support", m, i);
        stack.deliver_maildir(&format!("q{}", i / per), m, i);
    }
    let ingest = |text: &dyn Fn(&Path) -> String| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("escalator.toml");
        // No confirmation copies: they would land in the mailboxes read
        // by the next run.
        let text = text(&dir.path().join("store")).replacen(
            "[smtp]\n",
            "[smtp]\nconfirm_copies = false\n",
            1,
        );
        fs::write(&cfg, text).unwrap();
        let log = run_once(&cfg);
        let new_cases = log_field(&log, "one cycle done", "fetched").unwrap_or(0) as usize;
        assert_eq!(new_cases, per * QUEUES, "every message fetched: {log}");
        log_field(&log, "one cycle done", "ingest_ms").unwrap() as f64 / 1000.0
    };
    let limits = "\n[cases]\nauto_reply_limit = 100000000\nauto_reply_global_limit = 0\n";
    // Dovecot indexes new Maildir files on first access: warm both up
    // with one untimed run each, then time a second run on a new store.
    let one = |store: &Path| config_text(&stack, store, "");
    let several = |store: &Path| {
        let mut t = String::new();
        for q in 0..QUEUES {
            t += &stack.queue(
                &format!("q{q}"),
                &format!("q{q}"),
                &format!("address = \"q{q}@{}\"", support::DOMAIN),
            );
        }
        t + &stack.smtp_and_store(store)
            + limits
            + "\n[[tiers]]\nname = \"Frontline\"\nfirst_response = \"4h\"\n"
    };
    ingest(&one);
    ingest(&several);
    drain_postfix(&stack);
    let single_s = ingest(&one);
    drain_postfix(&stack);
    let eight_s = ingest(&several);
    drain_postfix(&stack);
    rows.push(row(
        &format!(
            "7. Ingest {} messages from {QUEUES} queues ({per} each)",
            per * QUEUES
        ),
        format!("{eight_s:.1} s"),
        format!("{single_s:.1} s (one queue, same messages)"),
        format!("{:.2}x", eight_s / single_s),
        "≤ 1.2x",
    ));
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!("{cores} cores, {} GiB RAM", mem / 1024 / 1024)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench && std::env::var_os("ESCALATOR_BENCH_SMOKE").is_none() {
        // `cargo test --all-targets` builds and starts this; the run
        // itself stays out of the test suite (CI time).
        println!("pipeline benchmark: built; run it with `cargo bench --bench pipeline` (ESCALATOR_BENCH_SMOKE=1 for a toy run under cargo test)");
        return;
    }
    let sz = sizes();
    let mut rows = Vec::new();
    // ESCALATOR_BENCH_SECTIONS: a comma list of ingest, latency, timers,
    // append, stats (profiling: stats alone), queues, postgres, cluster,
    // pgtimers, languages.
    let sections = std::env::var("ESCALATOR_BENCH_SECTIONS").unwrap_or_else(|_| {
        "ingest,latency,timers,append,queues,postgres,cluster,pgtimers,languages".into()
    });
    let sections: Vec<&str> = sections.split(',').map(str::trim).collect();
    let on = |name: &str| sections.contains(&name);
    if on("ingest") {
        ingest_and_acks(&sz, &mut rows).await;
    }
    if on("latency") {
        tokio::task::block_in_place(|| latency(&sz, &mut rows));
    }
    if on("timers") {
        tokio::task::block_in_place(|| timers_and_memory(&sz, &mut rows));
    }
    if on("append") {
        tokio::task::block_in_place(|| append(&mut rows));
    }
    if on("stats") {
        tokio::task::block_in_place(|| stats_only(&sz, &mut rows));
    }
    if on("queues") {
        tokio::task::block_in_place(|| queues(&sz, &mut rows));
    }
    if on("postgres") {
        tokio::task::block_in_place(|| postgres(&sz, &mut rows));
    }
    if on("cluster") {
        tokio::task::block_in_place(|| cluster::cluster(&sz, &mut rows));
    }
    if on("pgtimers") {
        tokio::task::block_in_place(|| cluster::timers(&sz, &mut rows));
    }
    if on("languages") {
        tokio::task::block_in_place(|| languages::languages(&sz, &mut rows));
    }
    println!("\nescalator benchmark — {}\n", machine());
    // The columns of BENCHMARKS.md's "Current figures" table, so each
    // line replaces that figure's row there; "met" is the reader's call
    // (goals are sentences, not numbers).
    let run = format!("{}, {}", chrono::Utc::now().format("%Y-%m-%d"), commit());
    println!("| figure | escalator | baseline (same run) | ratio | goal | met | run |\n|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | ? | {run} |",
            r.what, r.escalator, r.baseline, r.ratio, r.goal
        );
    }
}

/// The commit measured (`+dirty` with uncommitted changes), for the
/// table's "run" column.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown commit".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+dirty")
    } else {
        head
    }
}
