//! What admins ask of the store: list and show cases, the outbox and the
//! quarantine, and retry what failed. One `Request` type serves the CLI
//! (which opens the store itself when no daemon runs) and the daemon's
//! control socket (when one does, since a store has one owner at a time).
//!
//! Here: the requests and [`handle`], which dispatches each to its own
//! function: `cases` (list, show, escalate, resolve, retry a timer),
//! `mail` (the outbox and the quarantine), `reports` (stats, digest,
//! cluster status); and the text helpers they share.

mod auth;
mod cases;
mod customers;
mod mail;
mod reports;
mod templates;

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
    /// A mail template rendered as the customer would get it: with
    /// sample values, or those of case `case`.
    TemplateShow {
        kind: String,
        lang: Option<String>,
        case: Option<u64>,
    },
    /// Sets (None: clears) the language of a customer's mail.
    CustomerSetLanguage {
        address: String,
        language: Option<String>,
    },
    /// Every `[oauth2]` identity and its grant.
    AuthStatus {
        json: bool,
    },
    /// A login's tokens, sealed by the CLI.
    AuthStore {
        login: crate::oauth::broker::Login,
    },
    AuthLogout {
        identity: String,
    },
}

/// What to print and the exit code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub code: i32,
    pub output: String,
}

impl Response {
    pub(super) fn ok(output: String) -> Response {
        Response { code: 0, output }
    }
    pub(super) fn fail(output: String) -> Response {
        Response { code: 1, output }
    }
}

pub(super) fn json(v: &impl Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Handles one request with the workers' shared handle (store, config,
/// clock, wake-ups).
pub fn handle(shared: &Handle, req: &Request) -> Result<Response, EffectsError> {
    match *req {
        Request::CasesList {
            json: as_json,
            ref queue,
        } => cases::list_cases(shared, as_json, queue),
        Request::CaseShow { id, json: as_json } => cases::show_case(shared, id, as_json),
        Request::QuarantineList { json: as_json } => mail::list_quarantine(shared, as_json),
        Request::QuarantineRetry { id } => mail::retry_quarantine(shared, id),
        Request::OutboxList { json: as_json, all } => mail::list_outbox(shared, as_json, all),
        Request::CaseEscalate { id, ref reason } => cases::escalate_case(shared, id, reason),
        Request::CaseResolve { id } => cases::resolve_case(shared, id),
        Request::CaseRetry { id } => cases::retry_case(shared, id),
        Request::Stats {
            since_secs,
            json: as_json,
        } => reports::stats(shared, since_secs, as_json),
        Request::Digest => reports::digest(shared),
        Request::TemplateShow {
            ref kind,
            ref lang,
            case,
        } => templates::show(shared, kind, lang.as_deref(), case),
        Request::ClusterStatus { json: as_json } => reports::cluster_status(shared, as_json),
        Request::CustomerSetLanguage {
            ref address,
            ref language,
        } => customers::set_language(shared, address, language.as_deref()),
        Request::AuthStatus { json } => auth::status(shared, json),
        Request::AuthStore { ref login } => auth::store(shared, login),
        Request::AuthLogout { ref identity } => auth::logout(shared, identity),
        Request::OutboxShow { id } => mail::show_outbox(shared, id),
        Request::OutboxRetry { id } => mail::retry_outbox(shared, id),
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
    let order = crate::stats::Order {
        tiers: &tiers,
        queues: &queues,
    };
    let mut report = store.report(since, None, now, &order)?;
    report.smtp_problems = store.smtp_problems()?;
    Ok(report)
}

/// Applies a person's change to a case: policy, mails, store, in one
/// transaction, then wakes the workers.
pub(super) fn change_case(
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
pub(super) fn readable_mail(entry: &outbox::OutboxEntry, raw: &[u8]) -> String {
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
pub(super) fn bounces_of(history: &[Event]) -> Vec<serde_json::Value> {
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

pub(super) fn event_line(e: &Event) -> String {
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
