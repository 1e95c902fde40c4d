//! KPIs: what escalation procedures are judged by, computed from case
//! history. Every case write also writes the case's `Facts` (a few
//! hundred bytes derived from its history) in the same transaction, so
//! a window of cases is read from small records and a restart loses
//! nothing. Here the figures are counted from the facts ([`Tally`]); on
//! PostgreSQL the store counts the same figures in SQL and hands over
//! the counted sets ([`Counted`], [`assemble`]), so both engines' reports
//! are made the same way from the counts.
//!
//! The window is a cohort: the cases *opened* in it, with everything that
//! happened to them since. Open cases by age are the current state of all
//! unresolved cases, whenever they were opened.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::case::{rfc3339, Case, CaseId, EventKind, Reason, Status};

/// What the KPIs need of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    pub id: CaseId,
    /// The queue the case belongs to.
    #[serde(default = "crate::case::default_queue")]
    pub queue: String,
    pub customer: String,
    pub subject: String,
    pub created_at: DateTime<Utc>,
    pub status: Status,
    /// The tier holding the case now.
    pub tier: String,
    pub repeat_customer: bool,
    pub first_answer_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub csat: Option<u8>,
    /// The case's time at each tier, in order.
    pub stints: Vec<Stint>,
    /// Trigger reasons seen (`phrase "supervisor"`, `sender ...`).
    pub triggers: Vec<String>,
    /// Recipients of the case's mail reported failed (bounces).
    #[serde(default)]
    pub bounces: u32,
}

/// A case's time at one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stint {
    pub tier: String,
    pub from: DateTime<Utc>,
    pub first_answer: Option<DateTime<Utc>>,
    /// When and why the case left the tier upwards (or sideways, by hand).
    pub left: Option<(DateTime<Utc>, Reason)>,
    /// A deadline passed at this tier without a staff answer.
    pub deadline_missed: bool,
}

/// Subjects are kept short: the digest shows them, nothing else reads them.
const SUBJECT_CHARS: usize = 80;

impl Facts {
    /// The facts of a case made in memory, all of whose history is in
    /// its new events (tests, the digest's examples).
    pub fn of(case: &Case) -> Facts {
        Facts::update(None, case)
    }

    /// The facts of `case` after its new events, from the facts it had
    /// when read (`prev`, None for a new case): the history is never
    /// walked again, so a long case costs no more to update than a short
    /// one.
    pub fn update(prev: Option<Facts>, case: &Case) -> Facts {
        let (mut stints, mut triggers, mut bounces) = match prev {
            Some(f) => (f.stints, f.triggers, f.bounces),
            None => {
                // A case's first tier is where its first escalation left
                // from; without one, where it is.
                let first_tier = case
                    .new_events
                    .iter()
                    .find_map(|e| match &e.what {
                        EventKind::Escalated { from, .. } => Some(from.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| case.tier.clone());
                let stint = Stint {
                    tier: first_tier,
                    from: case.created_at,
                    first_answer: None,
                    left: None,
                    deadline_missed: false,
                };
                (vec![stint], Vec::new(), 0)
            }
        };
        for e in &case.new_events {
            let Some(cur) = stints.last_mut() else { break };
            match &e.what {
                EventKind::Escalated {
                    to, reason, detail, ..
                } => {
                    cur.left = Some((e.at, *reason));
                    if *reason == Reason::Stale {
                        cur.deadline_missed = true;
                    }
                    if *reason == Reason::Trigger && !triggers.contains(detail) {
                        triggers.push(detail.clone());
                    }
                    stints.push(Stint {
                        tier: to.clone(),
                        from: e.at,
                        first_answer: None,
                        left: None,
                        deadline_missed: false,
                    });
                }
                EventKind::StaffAnswer { .. } => {
                    cur.first_answer.get_or_insert(e.at);
                }
                EventKind::Breached { .. } => cur.deadline_missed = true,
                EventKind::Priority { why, .. } if !triggers.contains(why) => {
                    triggers.push(why.clone());
                }
                EventKind::Bounced { .. } => bounces = bounces.saturating_add(1),
                _ => {}
            }
        }
        Facts {
            id: case.id,
            queue: case.queue.clone(),
            customer: case.customer.clone(),
            subject: case.subject.chars().take(SUBJECT_CHARS).collect(),
            created_at: case.created_at,
            status: case.status,
            tier: case.tier.clone(),
            repeat_customer: case.repeat_customer,
            first_answer_at: case.first_answer_at,
            resolved_at: case.resolved_at.filter(|_| case.status == Status::Resolved),
            csat: case.csat,
            stints,
            triggers,
            bounces,
        }
    }

    pub fn escalated(&self) -> bool {
        self.stints.len() > 1
    }

    pub fn breached(&self) -> bool {
        self.stints.iter().any(|s| s.deadline_missed)
    }
}

/// Median and 90th percentile of durations, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Spread {
    pub count: usize,
    pub median_secs: Option<i64>,
    pub p90_secs: Option<i64>,
}

impl Spread {
    fn of(mut v: Vec<i64>) -> Spread {
        v.sort_unstable();
        Spread {
            count: v.len(),
            median_secs: percentile(&v, 50),
            p90_secs: percentile(&v, 90),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// Unresolved cases by how long ago they were opened.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpenAges {
    pub total: u64,
    pub under_1h: u64,
    pub under_1d: u64,
    pub under_7d: u64,
    pub over_7d: u64,
}

impl OpenAges {
    fn add(&mut self, age: chrono::Duration) {
        self.total += 1;
        let h = age.num_hours();
        match h {
            h if h < 1 => self.under_1h += 1,
            h if h < 24 => self.under_1d += 1,
            h if h < 24 * 7 => self.under_7d += 1,
            _ => self.over_7d += 1,
        }
    }
}

/// The KPIs of one tier, or of all.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Kpis {
    /// Cases opened in the window (for a tier: that reached it).
    pub cases: u64,
    /// Cases that moved up (for a tier: out of it).
    pub escalated: u64,
    pub escalation_rate: f64,
    /// Cases escalated for each reason; a case counts once per reason.
    pub escalated_by_reason: BTreeMap<String, u64>,
    pub escalation_rate_by_reason: BTreeMap<String, f64>,
    /// From opening (for a tier: from reaching it) to the first staff answer.
    pub first_answer: Spread,
    /// From opening to resolution (for a tier: of the cases it resolved).
    pub resolve: Spread,
    /// Cases whose deadline passed with no staff answer.
    pub breached: u64,
    pub repeat_customers: u64,
    pub repeat_customer_share: f64,
    pub csat_count: u64,
    pub csat_mean: Option<f64>,
    /// Unresolved now, by age (all of them, not only the window's).
    pub open: OpenAges,
    /// Mail of these cases that bounced (a recipient reported failed by
    /// a delivery report), and how many cases had one. For a tier: of
    /// the cases it holds now.
    pub bounces: u64,
    pub bounced_cases: u64,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Start of the window (None: all time).
    pub since: Option<String>,
    pub until: String,
    pub overall: Kpis,
    /// In the config's tier order; tiers no longer configured follow.
    pub tiers: Vec<TierKpis>,
    /// The KPIs of each queue's cases, in the config's queue order;
    /// queues no longer configured follow.
    pub queues: Vec<QueueKpis>,
    /// Per node whose SMTP server refuses its configuration (a wrong
    /// password, a sender it will not take): mail waits until it is
    /// fixed. Empty when every node can send.
    pub smtp_problems: Vec<crate::record::SmtpProblem>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueKpis {
    pub queue: String,
    #[serde(flatten)]
    pub kpis: Kpis,
}

/// An unresolved case outside the report's window: what the open-case
/// ages need of it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenCase {
    pub queue: String,
    pub tier: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierKpis {
    pub tier: String,
    #[serde(flatten)]
    pub kpis: Kpis,
}

/// Accumulates one KPI set.
#[derive(Default)]
struct Acc {
    kpis: Kpis,
    first_answer: Vec<i64>,
    resolve: Vec<i64>,
    csat_sum: u64,
}

impl Acc {
    fn finish(mut self) -> Counted {
        self.kpis.first_answer = Spread::of(std::mem::take(&mut self.first_answer));
        self.kpis.resolve = Spread::of(std::mem::take(&mut self.resolve));
        Counted {
            kpis: self.kpis,
            csat_sum: self.csat_sum,
        }
    }
}

/// One KPI set counted, by the tally here or by the database (PostgreSQL
/// computes the KPIs in SQL): its counts and spreads, and the sum the
/// CSAT mean is made from. The shares are worked out from these in one
/// place, so both engines' reports agree to the digit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counted {
    pub kpis: Kpis,
    pub csat_sum: u64,
}

impl Counted {
    /// A set with no case (every reason listed, at zero).
    pub fn empty() -> Counted {
        new_acc().finish()
    }

    fn finish(self) -> Kpis {
        let mut k = self.kpis;
        let cases = k.cases;
        let share = |n: u64| {
            if cases == 0 {
                0.0
            } else {
                round3(n as f64 / cases as f64)
            }
        };
        k.escalation_rate = share(k.escalated);
        k.repeat_customer_share = share(k.repeat_customers);
        k.escalation_rate_by_reason = k
            .escalated_by_reason
            .iter()
            .map(|(r, n)| (r.clone(), share(*n)))
            .collect();
        k.csat_mean =
            (k.csat_count > 0).then(|| round3(self.csat_sum as f64 / k.csat_count as f64));
        k
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub const REASONS: [Reason; 4] = [
    Reason::Stale,
    Reason::RepeatCustomer,
    Reason::Trigger,
    Reason::Manual,
];

fn acc_of<'a>(sets: &'a mut Vec<(String, Acc)>, name: &str) -> &'a mut Acc {
    let i = match sets.iter().position(|(n, _)| n == name) {
        Some(i) => i,
        None => {
            sets.push((name.to_owned(), new_acc()));
            sets.len() - 1
        }
    };
    &mut sets[i].1
}

fn count_reason(by_reason: &mut BTreeMap<String, u64>, r: Reason) {
    match by_reason.get_mut(r.as_str()) {
        Some(n) => *n += 1,
        None => {
            by_reason.insert(r.as_str().to_string(), 1);
        }
    }
}

fn new_acc() -> Acc {
    let mut a = Acc::default();
    for r in REASONS {
        a.kpis.escalated_by_reason.insert(r.as_str().to_string(), 0);
    }
    a
}

/// Counts one case of the window in an overall or per-queue set.
fn add_case(o: &mut Acc, f: &Facts) {
    o.kpis.cases += 1;
    if f.escalated() {
        o.kpis.escalated += 1;
    }
    let mut reasons: Vec<Reason> = f
        .stints
        .iter()
        .filter_map(|s| s.left.as_ref().map(|l| l.1))
        .collect();
    reasons.sort_by_key(|r| r.as_str());
    reasons.dedup();
    for r in reasons {
        count_reason(&mut o.kpis.escalated_by_reason, r);
    }
    if let Some(a) = f.first_answer_at {
        o.first_answer.push((a - f.created_at).num_seconds());
    }
    if let Some(r) = f.resolved_at {
        o.resolve.push((r - f.created_at).num_seconds());
    }
    o.kpis.breached += f.breached() as u64;
    o.kpis.repeat_customers += f.repeat_customer as u64;
    o.kpis.bounces += f.bounces as u64;
    o.kpis.bounced_cases += (f.bounces > 0) as u64;
    if let Some(s) = f.csat {
        o.kpis.csat_count += 1;
        o.csat_sum += s as u64;
    }
}

/// The configured tiers and queues, in config order: the report lists
/// them even when they had no case.
pub struct Order<'a> {
    pub tiers: &'a [String],
    pub queues: &'a [String],
}

/// Computes the report from the window's facts and, for the open-case
/// ages, the unresolved cases outside the window (the window's own
/// unresolved cases are counted from their facts: one pass over a
/// million cases, not two).
pub fn report(
    window: impl Iterator<Item = Facts>,
    open: impl Iterator<Item = OpenCase>,
    order: &Order<'_>,
    since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Report {
    let mut t = Tally::new(now);
    for f in window {
        t.add(&f);
    }
    for o in open {
        t.add_open(&o);
    }
    t.finish(order, since)
}

/// The report being counted, one case at a time: the store hands each
/// case's facts by reference (decoded into one reused value), so a
/// million cases cost no allocation each.
pub struct Tally {
    now: DateTime<Utc>,
    overall: Acc,
    /// By name, in the order first seen: a handful, searched linearly.
    tiers: Vec<(String, Acc)>,
    queues: Vec<(String, Acc)>,
}

impl Tally {
    pub fn new(now: DateTime<Utc>) -> Tally {
        Tally {
            now,
            overall: new_acc(),
            tiers: Vec::new(),
            queues: Vec::new(),
        }
    }

    /// Counts a case of the window.
    pub fn add(&mut self, f: &Facts) {
        if f.status != Status::Resolved {
            let age = self.now - f.created_at;
            self.overall.kpis.open.add(age);
            acc_of(&mut self.tiers, &f.tier).kpis.open.add(age);
            acc_of(&mut self.queues, &f.queue).kpis.open.add(age);
        }
        add_case(&mut self.overall, f);
        add_case(acc_of(&mut self.queues, &f.queue), f);
        let holder = acc_of(&mut self.tiers, &f.tier);
        holder.kpis.bounces += f.bounces as u64;
        holder.kpis.bounced_cases += (f.bounces > 0) as u64;
        let last = f.stints.len().saturating_sub(1);
        for (i, s) in f.stints.iter().enumerate() {
            let t = acc_of(&mut self.tiers, &s.tier);
            t.kpis.cases += 1;
            if let Some((_, reason)) = &s.left {
                t.kpis.escalated += 1;
                count_reason(&mut t.kpis.escalated_by_reason, *reason);
            }
            if let Some(a) = s.first_answer {
                t.first_answer.push((a - s.from).num_seconds());
            }
            t.kpis.breached += s.deadline_missed as u64;
            t.kpis.repeat_customers += f.repeat_customer as u64;
            if i == last {
                if let Some(r) = f.resolved_at {
                    t.resolve.push((r - f.created_at).num_seconds());
                }
                if let Some(c) = f.csat {
                    t.kpis.csat_count += 1;
                    t.csat_sum += c as u64;
                }
            }
        }
    }

    /// Counts an unresolved case opened outside the window (its age only).
    pub fn add_open(&mut self, o: &OpenCase) {
        let age = self.now - o.created_at;
        self.overall.kpis.open.add(age);
        acc_of(&mut self.tiers, &o.tier).kpis.open.add(age);
        acc_of(&mut self.queues, &o.queue).kpis.open.add(age);
    }

    pub fn finish(self, order: &Order<'_>, since: Option<DateTime<Utc>>) -> Report {
        let sets = |v: Vec<(String, Acc)>| v.into_iter().map(|(n, a)| (n, a.finish())).collect();
        assemble(
            Sets {
                overall: self.overall.finish(),
                tiers: sets(self.tiers),
                queues: sets(self.queues),
            },
            order,
            since,
            self.now,
        )
    }
}

/// The counted sets of a report: all cases, each tier's, each queue's.
pub struct Sets {
    pub overall: Counted,
    pub tiers: Vec<(String, Counted)>,
    pub queues: Vec<(String, Counted)>,
}

/// The report from its counted sets, tiers and queues in config order.
pub fn assemble(
    sets: Sets,
    order: &Order<'_>,
    since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Report {
    Report {
        since: since.map(rfc3339),
        until: rfc3339(now),
        overall: sets.overall.finish(),
        tiers: in_order(sets.tiers, order.tiers)
            .into_iter()
            .map(|(tier, kpis)| TierKpis { tier, kpis })
            .collect(),
        queues: in_order(sets.queues, order.queues)
            .into_iter()
            .map(|(queue, kpis)| QueueKpis { queue, kpis })
            .collect(),
        smtp_problems: Vec::new(),
    }
}

/// The named sets in config order (empty ones too), then the rest by
/// name.
fn in_order(mut sets: Vec<(String, Counted)>, names: &[String]) -> Vec<(String, Kpis)> {
    let mut out = Vec::new();
    for name in names {
        let set = match sets.iter().position(|(n, _)| n == name) {
            Some(i) => sets.swap_remove(i).1,
            None => Counted::empty(),
        };
        out.push((name.clone(), set.finish()));
    }
    sets.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(sets.into_iter().map(|(n, c)| (n, c.finish())));
    out
}

/// A duration the way people say it: "3h 20m", "2d 4h", "45s".
pub fn short_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

impl Report {
    /// The table `escalator stats` prints: one column per tier.
    // Long: the rows of the `stats` table in the order they print.
    pub fn text(&self) -> String {
        let mut cols: Vec<(String, &Kpis)> = vec![("overall".into(), &self.overall)];
        cols.extend(self.tiers.iter().map(|t| (t.tier.clone(), &t.kpis)));
        // Queues get columns of their own once there is more than one.
        if self.queues.len() > 1 {
            cols.extend(
                self.queues
                    .iter()
                    .map(|q| (format!("queue {}", q.queue), &q.kpis)),
            );
        }
        let width = cols
            .iter()
            .map(|(n, _)| n.chars().count())
            .max()
            .unwrap_or(8)
            .max(13);
        let pct = |n: u64, rate: f64| format!("{n} ({:.0}%)", rate * 100.0);
        let dur = |d: Option<i64>| d.map(short_duration).unwrap_or_else(|| "-".into());
        let mut out = String::new();
        out.push_str(&format!(
            "Cases opened {} to {}\n\n{:<26}",
            self.since.as_deref().unwrap_or("(all time)"),
            self.until,
            ""
        ));
        for (n, _) in &cols {
            out.push_str(&format!(" {n:>width$}"));
        }
        out.push('\n');
        let mut row = |label: &str, f: &dyn Fn(&Kpis) -> String| {
            out.push_str(&format!("{label:<26}"));
            for (_, k) in &cols {
                out.push_str(&format!(" {:>width$}", f(k)));
            }
            out.push('\n');
        };
        row("cases", &|k| k.cases.to_string());
        row("escalated", &|k| pct(k.escalated, k.escalation_rate));
        for r in REASONS {
            let r = r.as_str();
            row(&format!("  {r}"), &|k| {
                pct(
                    k.escalated_by_reason.get(r).copied().unwrap_or(0),
                    k.escalation_rate_by_reason.get(r).copied().unwrap_or(0.0),
                )
            });
        }
        row("first answer median", &|k| dur(k.first_answer.median_secs));
        row("first answer p90", &|k| dur(k.first_answer.p90_secs));
        row("resolved", &|k| k.resolve.count.to_string());
        row("time to resolve median", &|k| dur(k.resolve.median_secs));
        row("time to resolve p90", &|k| dur(k.resolve.p90_secs));
        row("deadlines breached", &|k| k.breached.to_string());
        row("bounced mails (cases)", &|k| {
            format!("{} ({})", k.bounces, k.bounced_cases)
        });
        row("repeat customers", &|k| {
            pct(k.repeat_customers, k.repeat_customer_share)
        });
        row("satisfaction (1-5)", &|k| match k.csat_mean {
            Some(m) => format!("{m:.2} (n={})", k.csat_count),
            None => "-".into(),
        });
        row("open now", &|k| k.open.total.to_string());
        row("  opened < 1h ago", &|k| k.open.under_1h.to_string());
        row("  1h - 1d", &|k| k.open.under_1d.to_string());
        row("  1d - 7d", &|k| k.open.under_7d.to_string());
        row("  over 7d", &|k| k.open.over_7d.to_string());
        for p in &self.smtp_problems {
            let node = if p.node.is_empty() {
                String::new()
            } else {
                format!(" (node {})", p.node)
            };
            out.push_str(&format!(
                "\nSMTP REFUSES MAIL ({}){node} since {}: {}\n  its mail stays queued until this is fixed\n",
                p.server,
                rfc3339(p.since),
                p.error
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Case;

    fn at(h: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_790_000_000 + h * 3600, 0).unwrap()
    }

    fn escalate(c: &mut Case, h: i64, from: &str, to: &str, reason: Reason, detail: &str) {
        c.push(
            at(h),
            EventKind::Escalated {
                from: from.into(),
                to: to.into(),
                reason,
                detail: detail.into(),
            },
        );
        c.tier = to.into();
    }

    fn answer(c: &mut Case, h: i64) {
        c.push(
            at(h),
            EventKind::StaffAnswer {
                from: "agent@support.test".into(),
                message_id: format!("a{h}@x"),
            },
        );
        c.first_answer_at.get_or_insert(at(h));
    }

    fn resolve(c: &mut Case, h: i64, csat: Option<u8>) {
        c.status = Status::Resolved;
        c.resolved_at = Some(at(h));
        c.csat = csat;
    }

    #[test]
    fn facts_follow_the_history_tier_by_tier() {
        let mut c = Case::new(7, "a@x.org", "Broken", "T2", "m@x", at(0));
        escalate(&mut c, 2, "T1", "T2", Reason::Stale, "deadline");
        answer(&mut c, 3);
        answer(&mut c, 5);
        let f = Facts::of(&c);
        assert_eq!(f.stints.len(), 2);
        assert_eq!(f.stints[0].tier, "T1");
        assert!(f.stints[0].deadline_missed);
        assert_eq!(f.stints[1].first_answer, Some(at(3)));
        assert!(f.escalated() && f.breached());
        assert_eq!(f.resolved_at, None);
    }

    #[test]
    fn report_counts_rates_percentiles_and_ages() {
        let tiers = vec!["T1".to_string(), "T2".to_string(), "T3".to_string()];
        let mut cases = Vec::new();
        // Ten cases; 1-4 escalate (two stale, one trigger, one repeat),
        // all get answered after id hours, the even ones are resolved.
        for id in 1..=10i64 {
            let mut c = Case::new(id as u64, &format!("c{id}@x.org"), "s", "T1", "m", at(0));
            match id {
                1 | 2 => escalate(&mut c, 1, "T1", "T2", Reason::Stale, "deadline"),
                3 => escalate(
                    &mut c,
                    0,
                    "T1",
                    "T2",
                    Reason::Trigger,
                    "phrase \"supervisor\"",
                ),
                4 => {
                    c.repeat_customer = true;
                    escalate(&mut c, 0, "T1", "T3", Reason::RepeatCustomer, "3 cases")
                }
                _ => {}
            }
            answer(&mut c, id);
            if id % 2 == 0 {
                resolve(&mut c, id * 2, Some((id / 2) as u8));
            }
            c.queue = if id <= 5 { "support" } else { "billing" }.into();
            cases.push(c);
        }
        let facts: Vec<Facts> = cases.iter().map(Facts::of).collect();
        // All ten are in the window: its unresolved ones are counted
        // from their facts, and one more opened before it comes apart.
        let before = std::iter::once(OpenCase {
            queue: "support".into(),
            tier: "T2".into(),
            created_at: at(-200),
        });
        let queues = vec![
            "support".to_string(),
            "billing".to_string(),
            "spare".to_string(),
        ];
        let order = Order {
            tiers: &tiers,
            queues: &queues,
        };
        let r = report(facts.into_iter(), before, &order, None, at(30));
        // Per queue: cases 1-5 and the old one are support's, 6-10
        // billing's; a configured queue without cases is listed too.
        let names: Vec<&str> = r.queues.iter().map(|q| q.queue.as_str()).collect();
        assert_eq!(names, ["support", "billing", "spare"]);
        let (sup, bil) = (&r.queues[0].kpis, &r.queues[1].kpis);
        assert_eq!((sup.cases, sup.escalated, sup.open.total), (5, 4, 4));
        assert_eq!((bil.cases, bil.escalated, bil.open.total), (5, 0, 2));
        assert_eq!((bil.resolve.count, bil.csat_count), (3, 3));
        assert_eq!(r.queues[2].kpis.cases, 0);
        let o = &r.overall;
        assert_eq!(o.cases, 10);
        assert_eq!(o.escalated, 4);
        assert_eq!(o.escalation_rate, 0.4);
        assert_eq!(o.escalated_by_reason["stale"], 2);
        assert_eq!(o.escalated_by_reason["trigger"], 1);
        assert_eq!(o.escalated_by_reason["repeat_customer"], 1);
        assert_eq!(o.escalated_by_reason["manual"], 0);
        assert_eq!(o.escalation_rate_by_reason["stale"], 0.2);
        // First answers after 1..=10 hours: median (nearest rank) 5h, p90 9h.
        assert_eq!(o.first_answer.median_secs, Some(5 * 3600));
        assert_eq!(o.first_answer.p90_secs, Some(9 * 3600));
        // Resolved 2,4,6,8,10 at 4,8,12,16,20 hours.
        assert_eq!(o.resolve.count, 5);
        assert_eq!(o.resolve.median_secs, Some(12 * 3600));
        assert_eq!(o.breached, 2);
        assert_eq!(o.repeat_customers, 1);
        assert_eq!(o.csat_count, 5);
        assert_eq!(o.csat_mean, Some(3.0));
        assert_eq!(o.open.total, 6);
        assert_eq!(o.open.over_7d, 1, "the one from before");
        assert_eq!(o.open.under_7d, 5, "30 hours old");
        let t1 = &r.tiers[0].kpis;
        assert_eq!(r.tiers[0].tier, "T1");
        assert_eq!(t1.cases, 10);
        assert_eq!(t1.escalated, 4);
        assert_eq!(t1.breached, 2);
        let t2 = &r.tiers[1].kpis;
        assert_eq!(t2.cases, 3);
        // Cases 1-3 reached T2 at hour 1, 1, 0 and were answered at 1, 2, 3.
        assert_eq!(t2.first_answer.count, 3);
        assert_eq!(t2.first_answer.median_secs, Some(3600));
        assert_eq!(t2.resolve.count, 1, "case 2 was resolved at T2");
        assert_eq!(t2.open.total, 3, "two in the window, one before");
        let t3 = &r.tiers[2].kpis;
        assert_eq!((t3.cases, t3.repeat_customers, t3.csat_count), (1, 1, 1));
        let text = r.text();
        assert!(text.contains("escalated") && text.contains("40%"), "{text}");
    }

    #[test]
    fn percentile_and_durations() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[4], 90), Some(4));
        assert_eq!(percentile(&[1, 2, 3, 4], 50), Some(2));
        assert_eq!(short_duration(59), "59s");
        assert_eq!(short_duration(3 * 3600 + 20 * 60), "3h 20m");
        assert_eq!(short_duration(2 * 86_400 + 4 * 3600 + 5), "2d 4h");
    }
}
