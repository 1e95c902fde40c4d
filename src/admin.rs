//! What admins ask of the store: list and show cases, the outbox and the
//! quarantine, and retry what failed. One `Request` type serves the CLI
//! (which opens the store itself when no daemon runs) and the daemon's
//! control socket (when one does, since a store has one owner at a time).

use serde::{Deserialize, Serialize};

use crate::case::{rfc3339, Case, Event};
use crate::effects::{self, EffectsError};
use crate::handle::Handle;
use crate::ingest::{Ingestor, Outcome};
use crate::outbox::{self, OutboxState};
use crate::policy::{self, Ctx};
use crate::store::StoreError;
use crate::template::printable;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    CasesList {
        json: bool,
        /// Only the cases of this queue.
        #[serde(default)]
        queue: Option<String>,
    },
    CaseShow {
        id: u64,
        json: bool,
    },
    QuarantineList {
        json: bool,
    },
    QuarantineRetry {
        id: Option<u64>,
    },
    OutboxList {
        json: bool,
        all: bool,
    },
    OutboxRetry {
        id: u64,
    },
    /// One outbox mail, decoded for reading.
    OutboxShow {
        id: u64,
    },
    CaseEscalate {
        id: u64,
        reason: String,
    },
    CaseResolve {
        id: u64,
    },
    /// Re-arms a parked timer (firing it failed) to fire now.
    CaseRetry {
        id: u64,
    },
    /// KPIs of the cases opened in the last `since_secs` (None: all).
    Stats {
        since_secs: Option<u64>,
        json: bool,
    },
    /// The review digest of the last `digest.every`, up to now.
    Digest,
    /// The cluster's nodes, who holds which mailbox, outbox depth, due
    /// timers.
    ClusterStatus {
        json: bool,
    },
}

/// What to print and the exit code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub code: i32,
    pub output: String,
}

impl Response {
    fn ok(output: String) -> Response {
        Response { code: 0, output }
    }
    fn fail(output: String) -> Response {
        Response { code: 1, output }
    }
}

fn json(v: &impl Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Handles one request with the workers' shared handle (store, config,
/// clock, wake-ups).
pub fn handle(shared: &Handle, req: &Request) -> Result<Response, EffectsError> {
    let store = &*shared.store;
    match *req {
        Request::CasesList {
            json: as_json,
            ref queue,
        } => {
            let cases: Vec<Case> = store
                .cases()
                .filter(|c| match (queue, c) {
                    (Some(q), Ok(c)) => &c.queue == q,
                    _ => true,
                })
                .collect::<Result<_, _>>()?;
            if as_json {
                let v: Vec<_> = cases.iter().map(Case::summary_json).collect();
                return Ok(Response::ok(json(&v)));
            }
            // With several queues, the tier column names the queue too.
            let several = shared.config.get().queues.len() > 1;
            let mut out = format!(
                "{:>6}  {:<8}  {:<12}  {:<20}  {:<28}  {}\n",
                "CASE",
                "STATUS",
                if several { "QUEUE/TIER" } else { "TIER" },
                "DUE",
                "CUSTOMER",
                "SUBJECT"
            );
            for c in &cases {
                let tier = if several {
                    format!("{}/{}", c.queue, c.tier)
                } else {
                    c.tier.clone()
                };
                out.push_str(&format!(
                    "{:>6}  {:<8}  {:<12}  {:<20}  {:<28}  {}\n",
                    c.id,
                    serde_json::to_value(c.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    tier,
                    match (&c.parked_timer, c.due_at) {
                        (Some(_), _) => "timer parked!".to_string(),
                        (None, Some(d)) => d.format("%Y-%m-%d %H:%M UTC").to_string(),
                        (None, None) => "-".into(),
                    },
                    if c.customer.is_empty() {
                        "(unassigned)".to_string()
                    } else {
                        printable(&c.customer)
                    },
                    printable(&c.subject)
                ));
            }
            out.push_str(&format!("{} case(s)\n", cases.len()));
            Ok(Response::ok(out))
        }
        Request::CaseShow { id, json: as_json } => {
            let Some(case) = store.case(id)? else {
                return Ok(Response::fail(format!("no case #{id}\n")));
            };
            let history = store.history(id)?;
            let mut messages = Vec::new();
            for seq in store.case_messages(id)? {
                if let Some(m) = store.message(seq)? {
                    // The text is read from the stored bytes.
                    let raw = if m.truncated { None } else { store.raw(seq)? };
                    let text = m.text(raw.as_deref());
                    messages.push((m, text));
                }
            }
            let bounces = bounces_of(&history);
            if as_json {
                let mut v = case.summary_json();
                v["bounces"] = serde_json::Value::Array(bounces);
                v["history"] = serde_json::to_value(&history).unwrap_or_default();
                v["message_list"] = serde_json::to_value(
                    messages
                        .iter()
                        .map(|(m, text)| {
                            serde_json::json!({
                                "seq": m.seq,
                                "message_id": m.message_id,
                                "from": m.from.as_ref().map(|a| a.email.clone()),
                                "subject": m.subject,
                                "date": m.date.map(rfc3339),
                                "received_at": rfc3339(m.received_at),
                                "size": m.size,
                                "attachments": m.attachments,
                                "suppressed": m.suppressed,
                                "truncated": m.truncated,
                                "parse_error": m.parse_error,
                                "text": text,
                            })
                        })
                        .collect::<Vec<_>>(),
                )
                .unwrap_or_default();
                return Ok(Response::ok(json(&v)));
            }
            let mut out = format!(
                "Case #{}: {}\n  customer: {}{}\n  status:   {:?}\n  queue:    {}\n  tier:     {}\n  due:      {}\n  created:  {}\n",
                case.id,
                printable(&case.subject),
                if case.customer.is_empty() { "(unassigned: sender unreadable)".to_string() } else { printable(&case.customer) },
                case.customer_name.as_ref().map(|n| format!(" ({})", printable(n))).unwrap_or_default(),
                case.status,
                case.queue,
                case.tier,
                case.due_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                rfc3339(case.created_at),
            );
            if let Some(p) = &case.parked_timer {
                out.push_str(&format!(
                    "  timer:    PARKED since {} ({}); `escalator cases retry {}` re-arms it\n",
                    rfc3339(p.at),
                    printable(&p.error),
                    case.id
                ));
            }
            if !case.participants.is_empty() {
                out.push_str(&format!(
                    "  participants: {}\n",
                    printable(&case.participants.join(", "))
                ));
            }
            if !bounces.is_empty() {
                out.push_str(&format!("\nBounces ({}):\n", bounces.len()));
                for b in &bounces {
                    let field = |k: &str| b[k].as_str().unwrap_or("").to_string();
                    out.push_str(&format!(
                        "  {}  {} to {}: {} {}\n",
                        field("at"),
                        field("mail"),
                        printable(&field("recipient")),
                        field("status"),
                        printable(&field("diagnostic"))
                    ));
                }
            }
            out.push_str(&format!("\nMessages ({}):\n", messages.len()));
            for (m, text) in &messages {
                out.push_str(&format!(
                    "--- {} from {} — {}\n",
                    m.received_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    printable(
                        m.from
                            .as_ref()
                            .map(|a| a.email.as_str())
                            .unwrap_or("(no sender)")
                    ),
                    printable(&m.subject)
                ));
                for line in text.lines().take(20) {
                    out.push_str(&format!("    {}\n", printable(line)));
                }
            }
            out.push_str("\nHistory:\n");
            for e in &history {
                out.push_str(&format!("  {}\n", printable(&event_line(e))));
            }
            Ok(Response::ok(out))
        }
        Request::QuarantineList { json: as_json } => {
            let entries: Vec<_> = store.quarantined().collect::<Result<_, _>>()?;
            if as_json {
                return Ok(Response::ok(json(&entries)));
            }
            let mut out = String::new();
            for q in &entries {
                out.push_str(&format!(
                    "{:>5}  {} uid {}  {}  {}\n",
                    q.id,
                    printable(&q.folder),
                    q.uid,
                    q.at.to_rfc3339(),
                    printable(&q.error)
                ));
            }
            out.push_str(&format!("{} message(s) in quarantine\n", entries.len()));
            Ok(Response::ok(out))
        }
        Request::QuarantineRetry { id } => {
            let ids: Vec<u64> = match id {
                Some(id) => vec![id],
                None => store
                    .quarantined()
                    .map(|q| q.map(|q| q.id))
                    .collect::<Result<_, _>>()?,
            };
            let mut out = String::new();
            let mut code = 0;
            for id in ids {
                match Ingestor::new(shared.clone()).retry_quarantined(id)? {
                    None => {
                        out.push_str(&format!("{id}: no such quarantined message\n"));
                        code = 1;
                    }
                    Some(Outcome::Quarantined { id: again }) => {
                        out.push_str(&format!(
                            "{id}: failed again (now quarantine entry {again})\n"
                        ));
                        code = 1;
                    }
                    Some(Outcome::Stored { case, .. }) => {
                        out.push_str(&format!("{id}: stored in case #{case}\n"))
                    }
                    Some(Outcome::Bounce { case: Some(case) }) => out.push_str(&format!(
                        "{id}: a delivery report, recorded on case #{case}\n"
                    )),
                    Some(Outcome::Bounce { case: None }) => out.push_str(&format!(
                        "{id}: a delivery report about no mail escalator sent; not stored\n"
                    )),
                    Some(Outcome::Refetch { folder, uid }) => out.push_str(&format!(
                        "{id}: the server would not give it; uid {uid} of {} is fetched again \
                         on the watcher's next pass\n",
                        printable(&folder)
                    )),
                    Some(_) => out.push_str(&format!("{id}: already stored\n")),
                }
            }
            Ok(Response { code, output: out })
        }
        Request::OutboxList { json: as_json, all } => {
            let entries: Vec<_> = store
                .outbox()
                .filter(|e| {
                    all || e
                        .as_ref()
                        .map(|e| e.state != OutboxState::Sent)
                        .unwrap_or(true)
                })
                .collect::<Result<_, _>>()?;
            if as_json {
                // The placeholders' nonce stays inside the store.
                let v: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        let mut v = serde_json::to_value(e).unwrap_or_default();
                        if let Some(o) = v.as_object_mut() {
                            o.remove("attach_nonce");
                        }
                        v
                    })
                    .collect();
                return Ok(Response::ok(json(&v)));
            }
            let mut out = String::new();
            for e in &entries {
                out.push_str(&format!(
                    "{:>6}  case #{:<6} {:<8} {:<8} attempts {}  to {}  {}\n",
                    e.id,
                    e.case,
                    e.kind,
                    format!("{:?}", e.state).to_lowercase(),
                    e.attempts,
                    printable(&e.to.join(", ")),
                    printable(e.last_error.as_deref().unwrap_or(""))
                ));
            }
            out.push_str(&format!(
                "{} entr{}\n",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            ));
            Ok(Response::ok(out))
        }
        Request::CaseEscalate { id, ref reason } => {
            let before = store.case(id)?.map(|c| c.tier);
            match change_case(shared, id, |c, ctx| {
                policy::escalate_manually(c, reason, ctx)
            })? {
                None => Ok(Response::fail(format!("no case #{id}\n"))),
                Some((c, _)) if Some(&c.tier) == before.as_ref() => Ok(Response::fail(format!(
                    "case #{id} is already at the top tier ({}); nothing to escalate\n",
                    c.tier
                ))),
                Some((c, n)) => Ok(Response::ok(format!(
                    "case #{id} escalated to {} ({n} mail(s) queued)\n",
                    c.tier
                ))),
            }
        }
        Request::CaseResolve { id } => {
            let who = std::env::var("USER").unwrap_or_else(|_| "admin".into());
            match change_case(shared, id, |c, ctx| {
                policy::resolve_case(c, &format!("cli:{who}"), ctx)
            })? {
                None => Ok(Response::fail(format!("no case #{id}\n"))),
                Some((_, n)) => Ok(Response::ok(format!(
                    "case #{id} resolved ({n} mail(s) queued)\n"
                ))),
            }
        }
        Request::CaseRetry { id } => {
            let who = std::env::var("USER").unwrap_or_else(|_| "admin".into());
            let mut had = false;
            let changed = change_case(shared, id, |c, ctx| {
                if let Some(p) = c.parked_timer.take() {
                    had = true;
                    c.timer = Some(crate::case::Timer {
                        at: ctx.now.min(p.timer.at),
                        kind: p.timer.kind,
                    });
                    c.push(
                        ctx.now,
                        crate::case::EventKind::TimerRearmed {
                            by: format!("cli:{who}"),
                        },
                    );
                }
                Vec::new()
            })?;
            match changed {
                None => Ok(Response::fail(format!("no case #{id}\n"))),
                Some(_) if !had => Ok(Response::fail(format!("case #{id} has no parked timer\n"))),
                Some(_) => Ok(Response::ok(format!(
                    "case #{id}: timer re-armed; it fires now\n"
                ))),
            }
        }
        Request::Stats {
            since_secs,
            json: as_json,
        } => {
            let now = shared.clock.now();
            let report = stats_report(shared, since_secs, now)?;
            Ok(Response::ok(if as_json {
                json(&report) + "\n"
            } else {
                report.text()
            }))
        }
        Request::Digest => {
            let config = shared.config.get();
            let d = config
                .digest
                .clone()
                .unwrap_or(crate::config::DigestConfig {
                    to: Vec::new(),
                    every: std::time::Duration::from_secs(7 * 86_400),
                });
            let now = shared.clock.now();
            let start = now - chrono::Duration::from_std(d.every).unwrap_or_default();
            let text = crate::digest::text(store, &config, &d, start, now, now)?;
            Ok(Response::ok(text))
        }
        Request::ClusterStatus { json: as_json } => {
            let now = shared.clock.now();
            let status = crate::cluster::status(store, &shared.config.get(), now)?;
            Ok(Response::ok(if as_json {
                json(&status) + "\n"
            } else {
                status.text(now)
            }))
        }
        Request::OutboxShow { id } => {
            let Some(entry) = store.outbox_entry(id)? else {
                return Ok(Response::fail(format!("no outbox entry {id}\n")));
            };
            match store.outbox_raw(id)? {
                Some(raw) => {
                    let raw = outbox::expand(store, &entry, raw)?;
                    Ok(Response::ok(readable_mail(&entry, &raw)))
                }
                None => Ok(Response::fail(format!(
                    "outbox entry {id}: its text is no longer kept (sent mail is pruned \
                     after [store] keep_sent)\n"
                ))),
            }
        }
        Request::OutboxRetry { id } => match outbox::retry(store, id, shared.clock.now())? {
            None => Ok(Response::fail(format!("no outbox entry {id}\n"))),
            Some(e) if e.state == OutboxState::Pending => Ok(Response::ok(format!(
                "outbox entry {id} queued for sending again\n"
            ))),
            Some(e) => Ok(Response::fail(format!(
                "outbox entry {id} is {:?}, not failed; nothing to retry\n",
                e.state
            ))),
        },
    }
}

/// KPIs over the cases opened in the last `since_secs` seconds.
pub fn stats_report(
    shared: &Handle,
    since_secs: Option<u64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<crate::stats::Report, StoreError> {
    let store = &*shared.store;
    let since = since_secs
        .map(|s| now - chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000)));
    let config = shared.config.get();
    let (tiers, queues) = config.names();
    // Streamed: a million cases' facts never sit in memory at once.
    let mut tally = crate::stats::Tally::new(now);
    store.each_fact(since, true, |f| tally.add(f))?;
    // The window's own unresolved cases came with its facts; those
    // opened before it are read from the unresolved index.
    if since.is_some() {
        for o in store.unresolved(since) {
            tally.add_open(&o?);
        }
    }
    let order = crate::stats::Order {
        tiers: &tiers,
        queues: &queues,
    };
    let mut report = tally.finish(&order, since);
    report.smtp_problems = store.smtp_problems()?;
    Ok(report)
}

/// Applies a person's change to a case: policy, mails, store, in one
/// transaction, then wakes the workers.
fn change_case(
    shared: &Handle,
    id: u64,
    f: impl FnOnce(&mut Case, &Ctx) -> Vec<crate::policy::Action>,
) -> Result<Option<(Case, usize)>, EffectsError> {
    let config = shared.config.get();
    let now = shared.clock.now();
    let changed = effects::change_case(&shared.store, &config, now, id, |_, case, ctx| {
        Ok(Some(f(case, ctx)))
    })?;
    shared.store.flush()?;
    shared.wake.both();
    Ok(changed)
}

/// A composed mail as a person reads it: decoded headers and text body,
/// attachments listed; every value made printable.
fn readable_mail(entry: &outbox::OutboxEntry, raw: &[u8]) -> String {
    let mut out = format!(
        "Outbox entry {} ({}, case #{}, {})\n",
        entry.id,
        entry.kind,
        entry.case,
        format!("{:?}", entry.state).to_lowercase()
    );
    let Some(m) = mail_parser::MessageParser::default().parse(raw) else {
        out.push_str("(the stored mail cannot be parsed)\n");
        return out;
    };
    let addrs = |a: Option<&mail_parser::Address>| -> String {
        a.map(|a| {
            a.iter()
                .map(|x| match (x.name(), x.address()) {
                    (Some(n), Some(e)) => format!("{n} <{e}>"),
                    (_, Some(e)) => e.to_string(),
                    (Some(n), None) => n.to_string(),
                    (None, None) => String::new(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
    };
    for (name, value) in [
        ("From", addrs(m.from())),
        ("To", entry.to.join(", ")),
        ("Reply-To", addrs(m.reply_to())),
        ("Subject", m.subject().unwrap_or_default().to_string()),
        ("Message-ID", m.message_id().unwrap_or_default().to_string()),
    ] {
        if !value.is_empty() {
            out.push_str(&format!("{name}: {}\n", printable(&value)));
        }
    }
    out.push('\n');
    for line in m.body_text(0).unwrap_or_default().lines() {
        out.push_str(&printable(line));
        out.push('\n');
    }
    for (i, a) in m.attachments().enumerate() {
        use mail_parser::MimeHeaders;
        out.push_str(&format!(
            "[attachment {}: {} ({} bytes)]\n",
            i + 1,
            printable(a.attachment_name().unwrap_or("unnamed")),
            a.len()
        ));
    }
    out
}

/// The case's bounced mails, from its history: what `cases show` lists
/// (and its JSON gives as `bounces`), oldest first.
fn bounces_of(history: &[Event]) -> Vec<serde_json::Value> {
    history
        .iter()
        .filter_map(|e| match &e.what {
            crate::case::EventKind::Bounced {
                outbox_id,
                mail,
                recipient,
                status,
                diagnostic,
                message_id,
            } => Some(serde_json::json!({
                "at": rfc3339(e.at),
                "outbox_id": outbox_id,
                "mail": mail,
                "recipient": recipient,
                "status": status,
                "diagnostic": diagnostic,
                "report_message_id": message_id,
            })),
            _ => None,
        })
        .collect()
}

fn event_line(e: &Event) -> String {
    let v = serde_json::to_value(e).unwrap_or_default();
    let mut parts = Vec::new();
    if let Some(map) = v.as_object() {
        for (k, val) in map {
            if k != "at" && k != "kind" {
                parts.push(format!(
                    "{k}={}",
                    val.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| val.to_string())
                ));
            }
        }
    }
    format!(
        "{}  {:<14} {}",
        e.at.format("%Y-%m-%d %H:%M:%S"),
        v["kind"].as_str().unwrap_or(""),
        parts.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::tests::{setup, src};

    #[test]
    fn stats_count_each_open_case_once_whatever_the_window() {
        // Input: all-time stats counted the open cases twice (from the
        // window's facts and again from the unresolved index).
        let dir = tempfile::tempdir().unwrap();
        let (ing, clock) = setup(dir.path());
        for (i, who) in ["ann", "bob", "cid"].iter().enumerate() {
            let raw = format!(
                "From: {who}@example.org\r\nSubject: s\r\nMessage-ID: <{who}@x>\r\n\r\nhi\r\n"
            );
            ing.ingest(Some(&src(1, i as u32 + 1)), raw.as_bytes(), None)
                .unwrap();
            clock.advance(chrono::Duration::hours(2));
        }
        let now = ing.clock.now();
        let all = stats_report(&ing, None, now).unwrap();
        assert_eq!((all.overall.cases, all.overall.open.total), (3, 3));
        // A window holding the last case: the two before it are open too.
        let recent = stats_report(&ing, Some(3 * 3600), now).unwrap();
        assert_eq!((recent.overall.cases, recent.overall.open.total), (1, 3));
        assert_eq!(recent.queues[0].kpis.open.total, 3);
    }

    #[test]
    fn outbox_show_decodes_what_the_mailbox_holds_encoded() {
        // Input: the demo showed raw quoted-printable (`=E2=80=94`) where a
        // person expects to read the mail.
        let dir = tempfile::tempdir().unwrap();
        let (ing, _) = setup(dir.path());
        let raw = "From: Jörg <joerg@example.org>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe_=E2=80=94_Drucker?=\r\n\
Message-ID: <q1@x>\r\n\r\nkaputt\r\n";
        ing.ingest(Some(&src(1, 1)), raw.as_bytes(), None).unwrap();
        let stored = ing.store.outbox_raw(1).unwrap().unwrap();
        let stored = String::from_utf8_lossy(&stored);
        assert!(
            stored.contains("=C3") || stored.contains("=E2") || stored.contains("base64"),
            "{stored}"
        );
        let out = handle(&ing, &Request::OutboxShow { id: 1 }).unwrap();
        assert_eq!(out.code, 0);
        assert!(out.output.contains("Grüße — Drucker"), "{}", out.output);
        assert!(
            !out.output.contains("=C3") && !out.output.contains("=E2"),
            "{}",
            out.output
        );
        assert!(
            out.output.contains("To: joerg@example.org"),
            "{}",
            out.output
        );
        let none = handle(&ing, &Request::OutboxShow { id: 99 }).unwrap();
        assert_eq!(none.code, 1);
    }

    #[test]
    fn admin_output_escapes_terminal_controls_and_json_stays_exact() {
        // Attack: a subject and name with ESC sequences and CR, printed by
        // `cases list`/`cases show`: they could retitle or clear the
        // admin's terminal, or overwrite a row with a forged one.
        let dir = tempfile::tempdir().unwrap();
        let (ing, _) = setup(dir.path());
        let raw = "From: =?utf-8?q?Eve=1B[2J?= <eve@example.org>\r\n\
Subject: =?utf-8?q?hi=1B]0;pwned=07=0D____42__open?=\r\nMessage-ID: <e1@x>\r\n\r\n\
body\u{1b}[31m red\r\n";
        ing.ingest(Some(&src(1, 1)), raw.as_bytes(), None).unwrap();
        for req in [
            Request::CasesList {
                json: false,
                queue: None,
            },
            Request::CaseShow { id: 1, json: false },
            Request::OutboxList {
                json: false,
                all: true,
            },
        ] {
            let out = handle(&ing, &req).unwrap().output;
            assert!(
                !out.chars().any(|c| c.is_control() && c != '\n'),
                "{req:?}: {out:?}"
            );
            if !matches!(req, Request::OutboxList { .. }) {
                assert!(out.contains("\\x1b"), "{req:?} shows the escape: {out}");
            }
        }
        let json = handle(&ing, &Request::CaseShow { id: 1, json: true })
            .unwrap()
            .output;
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(
            v["subject"].as_str().unwrap().contains('\u{1b}'),
            "JSON is exact"
        );
    }
}
