//! The review digest: support teams are told to review escalated cases
//! regularly to find patterns. Once per `digest.every` (periods aligned to
//! Monday 00:00 UTC, 5 January 1970, in multiples of `every`), one
//! plain-text mail to `digest.to` with the period's KPIs, its escalated
//! cases, the frequent triggers and repeat customers, and the unresolved
//! cases that missed a deadline.
//!
//! Sent once per period across restarts: the scheduler stores the end of
//! the last period sent in the same transaction as the digest's outbox
//! entry ([`crate::scheduler`]). This module only says when and what.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Config, DigestConfig};
use crate::stats::{self, short_duration, Facts};
use crate::store::{Store, StoreError};
use crate::template::printable;

/// Monday 1970-01-05 00:00 UTC.
const ANCHOR_SECS: i64 = 4 * 86_400;

/// The latest complete period at `now`: [start, end).
pub fn last_period(now: DateTime<Utc>, every: Duration) -> (DateTime<Utc>, DateTime<Utc>) {
    let every = every.as_secs().max(60) as i64;
    let k = (now.timestamp() - ANCHOR_SECS).div_euclid(every);
    let end = ANCHOR_SECS + k * every;
    let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap_or(now);
    (at(end - every), at(end))
}

/// When the current period ends (the next digest is due).
pub fn next_due(now: DateTime<Utc>, every: Duration) -> DateTime<Utc> {
    let (_, end) = last_period(now, every);
    end + chrono::Duration::seconds(every.as_secs().max(60) as i64)
}

/// The digest mail for [start, end), from the `digest` template.
pub fn mail(
    store: &Store,
    config: &Config,
    d: &DigestConfig,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<crate::mailtext::Text, StoreError> {
    let (report, figures) = text(store, config, start, end, now)?;
    Ok(crate::mailtext::digest(
        config,
        (start, end),
        d.every,
        &report,
        figures,
    ))
}

/// The digest's report for [start, end) (its KPIs, escalations,
/// triggers, repeat customers and breaches) and its headline figures:
/// new cases, escalated, breached.
pub fn text(
    store: &Store,
    config: &Config,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(String, (u64, u64, u64)), StoreError> {
    // Facts come in opening order: stop at the period's end.
    let mut window: Vec<Facts> = store.facts_since(Some(start))?;
    window.retain(|f| f.created_at < end);
    let open: Vec<Facts> = store.unresolved_facts()?;
    let (tiers, queues) = config.names();
    let order = stats::Order {
        tiers: &tiers,
        queues: &queues,
    };
    let report = store.report(Some(start), Some(end), end.min(now), &order)?;
    let o = &report.overall;
    let figures = (o.cases, o.escalated, o.breached);
    let mut text = compose(&report, &window, &open, start, end);
    text.push_str(&logins_needed(store, config)?);
    Ok((text, figures))
}

/// The OAuth 2 identities in use that cannot log in (their mail waits):
/// said at the top of the reader's mind, the end of the report.
fn logins_needed(store: &Store, config: &Config) -> Result<String, StoreError> {
    let mut out = String::new();
    for name in config.identities_in_use() {
        let g = store.oauth_grant(&name)?;
        let app_only = config
            .oauth2
            .identities
            .get(&name)
            .is_some_and(|i| i.flow == crate::config::oauth::Flow::ClientCredentials);
        if crate::record::OAuthGrant::usable(g.as_ref(), app_only) {
            continue;
        }
        if out.is_empty() {
            out.push_str(
                "\nMailboxes waiting for an OAuth 2 login (their mail is not read or sent):\n",
            );
        }
        let why = g
            .as_ref()
            .and_then(|g| g.last_error.as_deref())
            .map(crate::template::one_line)
            .unwrap_or_else(|| "never logged in".into());
        out.push_str(&format!(
            "  {name}: {why}; fix: escalator auth login {name}\n"
        ));
    }
    Ok(out)
}

/// Pure: the digest from the period's facts and the unresolved cases'.
// Long: the digest's sections in the order they print (the `digest` template puts its head above).
pub fn compose(
    report: &stats::Report,
    window: &[Facts],
    open: &[Facts],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> String {
    let mut out = String::from("KPIs of the cases opened in the period\n\n");
    out.push_str(&report.text());

    // Escalations that happened in the period, of recent or older cases.
    let mut seen = std::collections::BTreeSet::new();
    let mut rows = Vec::new();
    for f in window.iter().chain(open.iter()) {
        if !seen.insert(f.id) {
            continue;
        }
        for s in &f.stints {
            if let Some((at, reason)) = &s.left {
                if *at >= start && *at < end {
                    let next = f
                        .stints
                        .iter()
                        .find(|n| n.from == *at && n.tier != s.tier)
                        .map(|n| n.tier.as_str())
                        .unwrap_or(f.tier.as_str());
                    rows.push(format!(
                        "  #{:<6} {:<30} {:<16} {} -> {}, {} after opening ({})",
                        f.id,
                        if f.customer.is_empty() {
                            "(unassigned)".to_string()
                        } else {
                            printable(&f.customer)
                        },
                        reason.as_str(),
                        s.tier,
                        next,
                        short_duration((*at - f.created_at).num_seconds()),
                        status_word(f),
                    ));
                }
            }
        }
    }
    out.push_str(&format!("\nEscalations in the period ({})\n", rows.len()));
    for r in &rows {
        out.push_str(r);
        out.push('\n');
    }

    let mut triggers: BTreeMap<&str, u64> = BTreeMap::new();
    let mut repeat: BTreeMap<&str, u64> = BTreeMap::new();
    for f in window {
        for t in &f.triggers {
            *triggers.entry(t.as_str()).or_default() += 1;
        }
        if f.repeat_customer && !f.customer.is_empty() {
            *repeat.entry(f.customer.as_str()).or_default() += 1;
        }
    }
    out.push_str("\nMost frequent triggers\n");
    top(&mut out, triggers, "case(s)");
    out.push_str("\nRepeat customers (cases opened in the period)\n");
    let mut per_customer: BTreeMap<&str, u64> = BTreeMap::new();
    for f in window {
        if repeat.contains_key(f.customer.as_str()) {
            *per_customer.entry(f.customer.as_str()).or_default() += 1;
        }
    }
    top(&mut out, per_customer, "case(s)");

    let breached: Vec<&Facts> = open.iter().filter(|f| f.breached()).collect();
    out.push_str(&format!(
        "\nUnresolved cases that missed a deadline ({})\n",
        breached.len()
    ));
    for f in breached {
        out.push_str(&format!(
            "  #{:<6} {:<30} {:<12} open {}  {}\n",
            f.id,
            printable(&f.customer),
            f.tier,
            short_duration((end - f.created_at).num_seconds()),
            printable(&f.subject)
        ));
    }
    out
}

fn status_word(f: &Facts) -> &'static str {
    match f.status {
        crate::case::Status::Open => "open",
        crate::case::Status::Answered => "answered",
        crate::case::Status::Resolved => "resolved",
    }
}

/// The ten most frequent, most first.
fn top(out: &mut String, counts: BTreeMap<&str, u64>, unit: &str) {
    let mut v: Vec<(&str, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if v.is_empty() {
        out.push_str("  (none)\n");
    }
    for (name, n) in v.into_iter().take(10) {
        out.push_str(&format!("  {n:>4} {unit}  {}\n", printable(name)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::{Case, EventKind, Reason};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn periods_are_aligned_to_monday_and_due_at_their_end() {
        let week = Duration::from_secs(7 * 86_400);
        // Sunday 2026-11-22.
        let (s, e) = last_period(at("2026-11-22T15:00:00Z"), week);
        assert_eq!(s, at("2026-11-09T00:00:00Z"));
        assert_eq!(e, at("2026-11-16T00:00:00Z"));
        assert_eq!(
            next_due(at("2026-11-22T15:00:00Z"), week),
            at("2026-11-23T00:00:00Z")
        );
        let (s, e) = last_period(at("2026-11-22T15:00:30Z"), Duration::from_secs(60));
        assert_eq!(
            (s, e),
            (at("2026-11-22T14:59:00Z"), at("2026-11-22T15:00:00Z"))
        );
    }

    #[test]
    fn digest_lists_escalations_triggers_repeat_customers_and_breaches() {
        let (start, end) = (at("2026-11-16T00:00:00Z"), at("2026-11-23T00:00:00Z"));
        let t = |h: i64| start + chrono::Duration::hours(h);
        let mut a = Case::new(5, "ann@x.org", "Angry", "Tier 2", "m", t(1));
        a.push(
            t(2),
            EventKind::Escalated {
                from: "Frontline".into(),
                to: "Tier 2".into(),
                reason: Reason::Trigger,
                detail: "phrase \"supervisor\"".into(),
            },
        );
        a.push(
            t(30),
            EventKind::Breached {
                tier: "Tier 2".into(),
            },
        );
        let mut b = Case::new(6, "bob@x.org", "Again", "Frontline", "m", t(3));
        b.repeat_customer = true;
        let mut b2 = b.clone();
        b2.id = 7;
        b.status = crate::case::Status::Resolved;
        b.resolved_at = Some(t(5));
        let window: Vec<Facts> = [&a, &b, &b2].iter().map(|c| Facts::of(c)).collect();
        let open: Vec<Facts> = vec![Facts::of(&a), Facts::of(&b2)];
        let order = stats::Order {
            tiers: &[],
            queues: &[],
        };
        // The window's unresolved cases are counted from the window.
        let outside = open
            .iter()
            .filter(|f| f.created_at < start || f.created_at >= end)
            .map(|f| stats::OpenCase {
                queue: f.queue.clone(),
                tier: f.tier.clone(),
                created_at: f.created_at,
            });
        let report = stats::report(window.iter().cloned(), outside, &order, Some(start), end);
        let text = compose(&report, &window, &open, start, end);
        assert!(text.contains("Escalations in the period (1)"), "{text}");
        assert!(text.contains("#5"), "{text}");
        assert!(
            text.contains("trigger") && text.contains("Frontline -> Tier 2, 1h after opening"),
            "{text}"
        );
        assert!(text.contains("1 case(s)  phrase \"supervisor\""), "{text}");
        assert!(text.contains("2 case(s)  bob@x.org"), "{text}");
        assert!(text.contains("missed a deadline (1)"), "{text}");
    }
}
