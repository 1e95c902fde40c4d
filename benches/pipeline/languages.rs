//! Figures 12 and 13 (issue 20): what choosing and writing in the
//! customer's language costs. In process, no servers: the ack's text
//! from its template, and ingest into a sled store with the language
//! detector on and off. Each side is run in alternating rounds, best
//! round counted (so one slow round of the machine decides nothing).

use super::*;

fn config(dir: &Path, detect: bool) -> Config {
    offline_config(
        dir,
        &format!(
            "[language]\ndetect = {detect}\n\n[calendar]\ntimezone = \"Europe/Berlin\"\n\
             hours = [\"mon-fri 09:00-17:00\"]\n\n[[tiers]]\nname = \"Frontline\"\n\
             first_response = \"8h\"\n"
        ),
    )
}

/// Texts of customers, long enough for the detector to be asked.
const TEXTS: [&str; 4] = [
    "Hello, since this morning's update I cannot log in to my account any more. Could you please check what is going on?",
    "Guten Tag, seit dem Update heute Morgen kann ich mich nicht mehr bei meinem Konto anmelden. Könnten Sie bitte nachsehen?",
    "Bonjour, depuis la mise à jour de ce matin, je ne peux plus me connecter à mon compte. Pourriez-vous vérifier ?",
    "Hola, desde la actualización de esta mañana no puedo iniciar sesión en mi cuenta. ¿Podrían comprobar qué ocurre?",
];

fn mail(round: usize, i: usize) -> Vec<u8> {
    format!(
        "From: Customer {i} <c{i}@cust.test>\r\nTo: support@bench.test\r\n\
         Subject: Login {i}\r\nMessage-ID: <lang-{round}-{i}@cust.test>\r\n\
         Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}\r\n",
        TEXTS[i % TEXTS.len()]
    )
    .into_bytes()
}

pub fn languages(sz: &Sizes, rows: &mut Vec<Row>) {
    ack_render(sz, rows);
    detection_pipeline(sz, rows);
    detection(sz, rows);
}

/// Figure 13: figure 1's ingest (the real IMAP mailbox, `run --once`,
/// the same corpus) with the detector on against off, alternating runs
/// on fresh stores, best of three each.
fn detection_pipeline(sz: &Sizes, rows: &mut Vec<Row>) {
    let stack = start_stack();
    for (i, m) in corpus(sz.n).iter().enumerate() {
        stack.deliver_maildir("support", m, i);
    }
    let run = |detect: bool| {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let cfg = dir.path().join("escalator.toml");
        let extra = format!("\n[language]\ndetect = {detect}\n");
        // No confirmation copies: the next run's mailbox holds only the
        // customers' mail.
        let text = config_text(&stack, &store, &extra).replacen(
            "[store]",
            "confirm_copies = false\n\n[store]",
            1,
        );
        fs::write(&cfg, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_escalator"))
            .args(["--log-format", "json", "run", "--once", "--config"])
            .arg(&cfg)
            .env("ESCALATOR_LOG", "info")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{log}");
        let fetched = log_field(&log, "mailbox pass done", "fetched").unwrap_or(0) as usize;
        assert_eq!(fetched, sz.n);
        let ingest_s = log_field(&log, "one cycle done", "ingest_ms").unwrap() as f64 / 1000.0;
        // The acks it sent are delivered before the next run.
        drain_postfix(&stack);
        sz.n as f64 / ingest_s
    };
    let (mut on, mut off) = (0f64, 0f64);
    for _ in 0..3 {
        off = off.max(run(false));
        on = on.max(run(true));
    }
    rows.push(row(
        &format!("13. Ingest {} messages over IMAP (`run --once`, figure 1's corpus), language detection on", sz.n),
        format!("{on:.0} msg/s"),
        format!("{off:.0} msg/s (detection off)"),
        format!("{:.2}x time", off / on),
        "≤ 1.05x (issue 20)",
    ));
}

/// Figure 12: the ack in German (its words and date in German) against
/// the English one, the path every ack took before languages.
fn ack_render(sz: &Sizes, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), true);
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-23T09:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let eta = now + chrono::Duration::hours(8);
    let english = Case::new(
        7,
        "maria@example.org",
        "Printer offline",
        "Frontline",
        "m@x",
        now,
    );
    let mut german = english.clone();
    german.language = Some("de".into());
    let n = (sz.n * 2).max(1000);
    let time = |case: &Case| {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(escalator::mailtext::ack_text(case, eta, &config, now));
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let (mut en, mut de) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        en = en.min(time(&english));
        de = de.min(time(&german));
    }
    rows.push(row(
        &format!("12. Ack text per mail, in the customer's language (German, best of 5 × {n})"),
        format!("{de:.1} µs"),
        format!(
            "{en:.1} µs (the English ack, same build: the path every ack took before languages)"
        ),
        format!("{:.2}x", de / en),
        "≤ 1.1x (issue 20)",
    ));
}

/// Figure 13b: ingest alone, in process (parse, thread, choose the
/// language, store, queue the ack; no IMAP), with the detector on
/// against off: the detector's cost with nothing around it.
fn detection(sz: &Sizes, rows: &mut Vec<Row>) {
    let n = sz.n.min(5_000);
    let run = |detect: bool, round: usize| {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), detect);
        let ingestor = Ingestor::new(escalator::handle::Handle {
            store: Arc::new(Store::open(&config.store.path).unwrap()),
            config: Live::new(config),
            clock: Arc::new(SystemClock),
            wake: Arc::new(Wakers::default()),
        });
        let mails: Vec<Vec<u8>> = (0..n).map(|i| mail(round, i)).collect();
        let t = Instant::now();
        for m in &mails {
            ingestor.ingest(None, m, None).unwrap();
        }
        ingestor.store.flush().unwrap();
        let took = t.elapsed().as_secs_f64();
        if detect {
            // The detector did its work: the French customers got French.
            let fr = ingestor
                .store
                .case(3)
                .unwrap()
                .and_then(|c| c.language_source.zip(c.language));
            assert_eq!(fr, Some(("detected".into(), "fr".into())));
        }
        n as f64 / took
    };
    let (mut on, mut off) = (0f64, 0f64);
    for round in 0..3 {
        off = off.max(run(false, round));
        on = on.max(run(true, round));
    }
    rows.push(row(
        &format!(
            "13b. Ingest {n} short messages in process (sled, no IMAP), language detection on"
        ),
        format!("{on:.0} msg/s"),
        format!("{off:.0} msg/s (detection off)"),
        format!("{:.2}x time", off / on),
        "≤ 1.05x (issue 20)",
    ));
}
