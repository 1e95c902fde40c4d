//! 9–11: the cluster on PostgreSQL (issue 12): two daemons against one on
//! the same two mailboxes, failover after SIGKILL, and the timer pass
//! over a large store in PostgreSQL.

use super::*;

/// A daemon of the cluster with its own metrics port.
struct Node {
    child: std::process::Child,
    port: u16,
}

impl Node {
    fn start(text: &str, dir: &Path, name: &str) -> Node {
        let port = support::free_port();
        let cfg = dir.join(format!("{name}.toml"));
        fs::write(
            &cfg,
            format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_escalator"))
            .args(["run", "--node", name, "--config"])
            .arg(&cfg)
            .env("ESCALATOR_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        Node { child, port }
    }

    fn ingested(&self) -> f64 {
        metric(self.port, "escalator_messages_ingested_total").max(0.0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// The holders of the mailboxes, by `cluster status`.
fn holders(cfg: &Path) -> Vec<Option<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(["cluster", "status", "--json", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["mailboxes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["holder"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The config of a cluster on `url` watching the given users' mailboxes.
fn cluster_config(
    stack: &MailStack,
    store: &Path,
    url: &str,
    mailboxes: &[&str],
    lease: &str,
) -> String {
    let mut t = String::new();
    for q in mailboxes {
        t += &stack.queue(q, q, &format!("address = \"{q}@{}\"", support::DOMAIN));
    }
    t + &stack
        .smtp_and_store(store)
        .replacen("[smtp]\n", "[smtp]\nconfirm_copies = false\n", 1)
        .replacen(
            "[store]\n",
            &format!("[store]\nengine = \"postgres\"\nurl = \"{url}\"\nsecurity = \"plain\"\n"),
            1,
        )
        + &format!(
            "\n[cases]\nauto_reply_limit = 100000000\nauto_reply_global_limit = 0\n\
             \n[cluster]\nlease = \"{lease}\"\n\
             \n[[tiers]]\nname = \"Frontline\"\nfirst_response = \"4h\"\n"
        )
}

/// 9 and 10.
pub fn cluster(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    let pg = postgres_server::Postgres::start_with(true);
    let mail = corpus(sz.n);
    // One run: `nodes` daemons on mailboxes `pair` (new ones per run: a
    // new database reads a mailbox from its start). Mail is delivered
    // once the leases have settled, and timed until all is ingested.
    let run = |nodes: usize, pair: [&str; 2], db: &str| -> f64 {
        let dir = tempfile::tempdir().unwrap();
        let text = cluster_config(
            &stack,
            &dir.path().join("node"),
            &pg.database(db),
            &pair,
            "15s",
        );
        let started: Vec<Node> = (0..nodes)
            .map(|i| Node::start(&text, dir.path(), &format!("n{i}")))
            .collect();
        let cfg = dir.path().join("n0.toml");
        wait_until("leases spread", Duration::from_secs(120), || {
            let h = holders(&cfg);
            let distinct: std::collections::HashSet<_> = h.iter().flatten().collect();
            h.len() == 2 && h.iter().all(Option::is_some) && distinct.len() == nodes.min(2)
        });
        let t = Instant::now();
        for (i, m) in mail.iter().enumerate() {
            stack.deliver_maildir(pair[i % 2], m, i);
        }
        wait_until("ingest", Duration::from_secs(1800), || {
            started.iter().map(Node::ingested).sum::<f64>() >= mail.len() as f64
        });
        let secs = t.elapsed().as_secs_f64();
        for n in started {
            n.stop();
        }
        drain_postfix(&stack);
        secs
    };
    let one = run(1, ["q0", "q1"], "cluster_one");
    let two = run(2, ["q2", "q3"], "cluster_two");
    let (one_rate, two_rate) = (mail.len() as f64 / one, mail.len() as f64 / two);
    rows.push(row(
        &format!(
            "9. Ingest {} messages from 2 mailboxes, 2 daemons",
            mail.len()
        ),
        format!("{two_rate:.0} msg/s"),
        format!("{one_rate:.0} msg/s (1 daemon, same 2 mailboxes)"),
        format!("{:.2}x", two_rate / one_rate),
        "≥ 1.6x (issue 12)",
    ));

    // 10: SIGKILL the holder; time to the first message its successor
    // ingests (mail arrives right after the kill).
    for (k, lease) in [(4usize, 15u64), (5, 5)] {
        let dir = tempfile::tempdir().unwrap();
        let mbox = format!("q{k}");
        let text = cluster_config(
            &stack,
            &dir.path().join("node"),
            &pg.database(&format!("failover_{lease}")),
            &[&mbox],
            &format!("{lease}s"),
        );
        let mut a = Node::start(&text, dir.path(), "a");
        let cfg = dir.path().join("a.toml");
        wait_until("a holds", Duration::from_secs(60), || {
            holders(&cfg) == [Some("a".to_string())]
        });
        let b = Node::start(&text, dir.path(), "b");
        stack.deliver_maildir(&mbox, &mail[0], 0);
        wait_until("a ingests", Duration::from_secs(60), || a.ingested() >= 1.0);
        wait_until("b is up", Duration::from_secs(60), || {
            b.ingested() >= 0.0 && metric(b.port, "escalator_messages_ingested_total") >= 0.0
        });
        a.child.kill().unwrap();
        let killed = Instant::now();
        let _ = a.child.wait();
        stack.deliver_maildir(&mbox, &mail[1], 1);
        wait_until("b takes over", Duration::from_secs(10 * lease), || {
            b.ingested() >= 1.0
        });
        let took = killed.elapsed().as_secs_f64();
        b.stop();
        rows.push(row(
            &format!("10. Failover: SIGKILL of the holder → first message ingested by the next (lease {lease} s)"),
            format!("{took:.1} s"),
            format!("{lease} s (the lease)"),
            format!("{:.2}x", took / lease as f64),
            "≤ lease + 2 s",
        ));
    }
}

/// 11: the scheduler's pass over growing stores in PostgreSQL (the same
/// sizes and due count as 4 on sled).
pub fn timers(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    let pg = postgres_server::Postgres::start_with(true);
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database("timers");
    let cfg_path = dir.path().join("escalator.toml");
    let text = config_text(&stack, &dir.path().join("node"), "").replacen(
        "[store]\n",
        &format!("[store]\nengine = \"postgres\"\nurl = \"{url}\"\nsecurity = \"plain\"\n"),
        1,
    );
    fs::write(&cfg_path, text).unwrap();
    let config = Config::load(&cfg_path).unwrap();
    let store = Arc::new(
        Store::open_postgres(
            &url,
            escalator::store::PgTls::Plain,
            4,
            &dir.path().join("node"),
        )
        .unwrap(),
    );
    let scheduler = Scheduler::new(escalator::handle::Handle {
        store: store.clone(),
        config: Live::new(config),
        clock: Arc::new(SystemClock),
        wake: Arc::new(Wakers::default()),
    });
    let mut have = 0usize;
    let mut first: Option<f64> = None;
    for &size in &sz.cases {
        let t = Instant::now();
        add_cases(&store, have as u64 + 1, size - have, sz.due);
        eprintln!(
            "bench: {} cases into PostgreSQL in {:.0} s",
            size - have,
            t.elapsed().as_secs_f64()
        );
        have = size;
        let t = Instant::now();
        let fired = scheduler.pass().unwrap();
        let pass_ms = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(fired, sz.due);
        let base = *first.get_or_insert(pass_ms);
        rows.push(row(
            &format!(
                "11. Timer pass on PostgreSQL, {} due of {size} open cases",
                sz.due
            ),
            format!("{pass_ms:.0} ms"),
            format!("{base:.0} ms (at {})", sz.cases[0]),
            format!("{:.2}x", pass_ms / base),
            "about 1x",
        ));
    }
}
