//! Prometheus metrics: process-wide counters and histograms that the
//! workers bump, and a small HTTP endpoint (`[metrics] listen`) that
//! prints them in the text exposition format. Counters count since the
//! daemon started, as Prometheus expects; the KPIs that must survive a
//! restart come from the store (`escalator stats`), not from here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::case::{Event, EventKind};
use crate::store::Store;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    over: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        match BUCKETS.iter().position(|b| s <= *b) {
            Some(i) => self.counts[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.over.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cum}");
    }
}

/// A counter family with labels.
#[derive(Default)]
pub struct Family(Mutex<BTreeMap<Vec<(&'static str, String)>, u64>>);

impl Family {
    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        let key = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    pub fn get(&self, labels: &[(&'static str, &str)]) -> u64 {
        let key: Vec<_> = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "{name}{} {v}", label_text(labels));
        }
    }
}

fn label_text(labels: &[(&'static str, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// Everything the daemon counts.
#[derive(Default)]
pub struct Metrics {
    /// Messages fetched and what became of them (stored, duplicate, ...).
    pub ingested: Family,
    pub cases_opened: AtomicU64,
    pub cases_resolved: AtomicU64,
    pub staff_answers: AtomicU64,
    /// By reason and the tier the case went to.
    pub escalations: Family,
    pub breaches: Family,
    /// Automatic mails an automatic-mail limit held back, by `limit`
    /// (`recipient`, or `global`: a flood reached the hourly cap).
    pub auto_mail_held: Family,
    /// Mail accepted by the SMTP server, by kind (ack, notice, forward...).
    pub mail_sent: Family,
    /// Failed attempts: transient (retried) or permanent.
    pub mail_failures: Family,
    /// Delivery reports of a recipient's failure, by the mail that
    /// bounced (`ack`, `forward`...), or `unmatched`: a report about no
    /// mail escalator sent (backscatter), not stored.
    pub bounces: Family,
    /// Delay warnings (a mail still being tried), by mail.
    pub delivery_delays: Family,
    pub imap_errors: AtomicU64,
    /// The same two per queue: `ingested` by queue and outcome, IMAP
    /// errors by queue (new series, so the totals keep their labels).
    pub queue_ingested: Family,
    pub queue_imap_errors: Family,
    /// Ingest commits refused because this node had lost the mailbox's
    /// lease (a cluster on PostgreSQL).
    pub fenced: AtomicU64,
    /// Store failures a mailbox watcher retried (the database unreachable,
    /// its lock not had in time, a refused write).
    pub store_errors: AtomicU64,
    pub smtp_errors: AtomicU64,
    /// 1 while the SMTP server refuses this node's configuration (the
    /// login, the sender address, TLS), else 0.
    pub smtp_refused: AtomicU64,
    pub timers_fired: AtomicU64,
    /// Times the scheduler woke up (a timer, or new mail changing timers).
    pub scheduler_wakeups: AtomicU64,
    /// Mail seen in the mailbox → its case committed.
    pub ingest_latency: Histogram,
    /// Case committed (ack queued) → ack accepted by SMTP.
    pub ack_latency: Histogram,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts what a committed case change did.
pub fn committed(events: &[Event]) {
    let m = &*METRICS;
    for e in events {
        match &e.what {
            EventKind::Created { .. } => inc(&m.cases_opened),
            EventKind::Resolved { .. } => inc(&m.cases_resolved),
            EventKind::StaffAnswer { .. } => inc(&m.staff_answers),
            EventKind::Escalated { to, reason, .. } => m
                .escalations
                .inc(&[("reason", reason.as_str()), ("tier", to)]),
            EventKind::Breached { tier } => m.breaches.inc(&[("tier", tier)]),
            EventKind::AckSuppressed {
                limit: Some(limit), ..
            } => m.auto_mail_held.inc(&[("limit", limit)]),
            EventKind::Bounced { mail, .. } => m.bounces.inc(&[("mail", mail)]),
            EventKind::DeliveryDelayed { mail, .. } => m.delivery_delays.inc(&[("mail", mail)]),
            _ => {}
        }
    }
}

/// The exposition text; the gauges are stored counts, cheap to read.
// Long: one entry per metric family, in the order the exposition shows them: a list, not logic.
fn render(store: &Store) -> String {
    let m = &*METRICS;
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    };
    m.ingested.render(
        &mut out,
        "escalator_messages_ingested_total",
        "Messages fetched from the mailbox, by outcome.",
    );
    counter(
        &mut out,
        "escalator_cases_opened_total",
        "Cases opened.",
        &m.cases_opened,
    );
    counter(
        &mut out,
        "escalator_cases_resolved_total",
        "Cases resolved.",
        &m.cases_resolved,
    );
    counter(
        &mut out,
        "escalator_staff_answers_total",
        "Staff answers recognised.",
        &m.staff_answers,
    );
    m.escalations.render(
        &mut out,
        "escalator_escalations_total",
        "Escalations, by reason and the tier the case went to.",
    );
    m.breaches.render(
        &mut out,
        "escalator_deadlines_breached_total",
        "Deadlines passed at the top tier.",
    );
    m.auto_mail_held.render(
        &mut out,
        "escalator_auto_mail_held_total",
        "Automatic mails held back by a limit: per recipient, or the global hourly one.",
    );
    m.mail_sent.render(
        &mut out,
        "escalator_mail_sent_total",
        "Mail accepted by the SMTP server, by kind.",
    );
    m.mail_failures.render(
        &mut out,
        "escalator_mail_failures_total",
        "Failed send attempts: transient (retried) or permanent.",
    );
    m.bounces.render(
        &mut out,
        "escalator_bounces_total",
        "Recipients reported failed by delivery reports, by the mail that bounced; mail=\"unmatched\": reports about no mail escalator sent.",
    );
    m.delivery_delays.render(
        &mut out,
        "escalator_delivery_delays_total",
        "Delay warnings (a mail still being tried), by mail.",
    );
    counter(
        &mut out,
        "escalator_imap_errors_total",
        "IMAP connection or protocol errors.",
        &m.imap_errors,
    );
    m.queue_ingested.render(
        &mut out,
        "escalator_queue_messages_ingested_total",
        "Messages fetched from a queue's mailbox, by queue and outcome.",
    );
    m.queue_imap_errors.render(
        &mut out,
        "escalator_queue_imap_errors_total",
        "IMAP connection or protocol errors of a queue's mailbox.",
    );
    counter(
        &mut out,
        "escalator_fenced_writes_total",
        "Ingest commits refused because another node had taken the mailbox's lease.",
        &m.fenced,
    );
    counter(
        &mut out,
        "escalator_store_errors_total",
        "Store failures a mailbox watcher retried with backoff.",
        &m.store_errors,
    );
    counter(
        &mut out,
        "escalator_smtp_errors_total",
        "SMTP errors of any kind.",
        &m.smtp_errors,
    );
    counter(
        &mut out,
        "escalator_timers_fired_total",
        "Case timers fired.",
        &m.timers_fired,
    );
    counter(
        &mut out,
        "escalator_scheduler_wakeups_total",
        "Times the timer scheduler woke up.",
        &m.scheduler_wakeups,
    );
    let _ = writeln!(
        out,
        "# HELP escalator_smtp_refused 1 while the SMTP server refuses this node's configuration (login, sender address, TLS); mail stays queued.\n# TYPE escalator_smtp_refused gauge\nescalator_smtp_refused {}",
        m.smtp_refused.load(Ordering::Relaxed)
    );
    // A gauge the store cannot read is left out, not shown as 0.
    if let Ok(depth) = store.outbox_depth() {
        let _ = writeln!(
            out,
            "# HELP escalator_outbox_depth Mail waiting to be sent.\n# TYPE escalator_outbox_depth gauge\nescalator_outbox_depth {depth}",
        );
    }
    let _ = writeln!(
        out,
        "# HELP escalator_open_cases Unresolved cases, by the tier holding them.\n# TYPE escalator_open_cases gauge"
    );
    for (tier, n) in store.open_cases_by_tier().unwrap_or_default() {
        let _ = writeln!(
            out,
            "escalator_open_cases{} {n}",
            label_text(&[("tier", tier)])
        );
    }
    if let Ok(grants) = store.oauth_grants() {
        oauth(&mut out, &grants);
    }
    m.ingest_latency.render(
        &mut out,
        "escalator_ingest_latency_seconds",
        "From a message seen in the mailbox to its case committed.",
    );
    m.ack_latency.render(
        &mut out,
        "escalator_ack_latency_seconds",
        "From a case committed to its acknowledgement accepted by SMTP.",
    );
    out
}

/// The OAuth 2 grants, from the store (so every node of a cluster says
/// the same): refresh failures of every node, and whether the grant can
/// still get tokens.
fn oauth(out: &mut String, grants: &[crate::record::OAuthGrant]) {
    if grants.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP escalator_oauth_refresh_failures_total Failed refreshes of an OAuth 2 identity's access token, every node's.\n# TYPE escalator_oauth_refresh_failures_total counter"
    );
    for g in grants {
        let _ = writeln!(
            out,
            "escalator_oauth_refresh_failures_total{} {}",
            label_text(&[("identity", g.identity.clone())]),
            g.refresh_failures
        );
    }
    let _ = writeln!(
        out,
        "# HELP escalator_oauth_grant_valid 1 while the identity's grant gets tokens; 0 after invalid_grant or logout: run escalator auth login NAME.\n# TYPE escalator_oauth_grant_valid gauge"
    );
    for g in grants {
        let _ = writeln!(
            out,
            "escalator_oauth_grant_valid{} {}",
            label_text(&[("identity", g.identity.clone())]),
            u8::from(crate::record::OAuthGrant::usable(Some(g), false))
        );
    }
}

/// Binds the endpoint now (so a taken port fails start-up loudly) and
/// returns the server to spawn.
/// Connections the metrics endpoint serves at once.
pub const MAX_CONNECTIONS: usize = 8;

pub async fn serve(
    listen: SocketAddr,
    store: Arc<Store>,
    cancel: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metrics endpoint listening");
    // A scraper needs one connection; a flood of them must not pile up
    // tasks and store reads. Past the limit, connections are closed.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(async move {
        loop {
            let (conn, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("metrics endpoint busy; connection closed");
                drop(conn);
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, &store)).await;
                drop(slot);
            });
        }
    })
}

async fn answer(mut conn: tokio::net::TcpStream, store: &Arc<Store>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, ctype) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "only GET\n".to_string(),
            "text/plain",
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        let store = store.clone();
        let body = tokio::task::spawn_blocking(move || render(&store))
            .await
            .unwrap_or_default();
        ("200 OK", body, "text/plain; version=0.0.4; charset=utf-8")
    } else {
        ("404 Not Found", "see /metrics\n".to_string(), "text/plain")
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_automatic_mail_is_counted_by_limit() {
        let held = |limit: &str| Event {
            at: chrono::Utc::now(),
            what: EventKind::AckSuppressed {
                reason: "x".into(),
                limit: Some(limit.into()),
            },
        };
        let before = METRICS.auto_mail_held.get(&[("limit", "global")]);
        committed(&[held("global"), held("global"), held("recipient")]);
        assert_eq!(
            METRICS.auto_mail_held.get(&[("limit", "global")]),
            before + 2
        );
        let mut out = String::new();
        METRICS
            .auto_mail_held
            .render(&mut out, "escalator_auto_mail_held_total", "h");
        assert!(
            out.contains("escalator_auto_mail_held_total{limit=\"global\"}"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_a_bounded_number_of_connections() {
        // Attack: thousands of idle connections to the metrics port, each
        // a task (and, once a request comes, a store read).
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(addr, store, cancel.clone()).await.unwrap());
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed at once, not left waiting")
            .unwrap_or(0);
        assert_eq!(n, 0, "the connection over the limit is closed");
        drop(idle);
        cancel.cancel();
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(700));
        h.observe(Duration::from_secs(1000));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"300\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn labels_are_escaped() {
        let f = Family::default();
        f.inc(&[("tier", "Tier \"2\"")]);
        f.inc(&[("tier", "Tier \"2\"")]);
        let mut out = String::new();
        f.render(&mut out, "y_total", "h");
        assert!(
            out.contains("y_total{tier=\"Tier \\\"2\\\"\"} 2\n"),
            "{out}"
        );
        assert_eq!(f.get(&[("tier", "Tier \"2\"")]), 2);
    }
}
