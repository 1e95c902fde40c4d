//! The KPIs on PostgreSQL: `stats` and the digest count the facts table's
//! typed columns (one row per case) in SQL, and the readers of facts
//! (a window of cases, the unresolved ones) select their rows instead of
//! walking the key space.
//!
//! The SQL counts exactly what [`crate::stats::Tally`] counts from the
//! same facts (a test compares the two over one store): durations are
//! whole seconds truncated as chrono's `num_seconds`, percentiles are
//! nearest-rank picked from the sorted values by integer arithmetic
//! (`percentile_disc` multiplies in floating point: 0.9 × 70 is 63.000…01
//! there, and it would pick the 64th value), and the shares are worked out
//! in Rust by the one function both engines use.

use std::collections::BTreeMap;

use ::postgres::types::ToSql;
use ::postgres::{Client, Row};
use chrono::{DateTime, Utc};

use super::super::codec::Tree;
use super::{prepared, PgDb, StoreError, PAGE};
use crate::stats::{Counted, OpenCase, Sets, Spread, REASONS};

type Window = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// The facts rows of a window: `$1` since (inclusive), `$2` until
/// (exclusive), either NULL for no bound.
const WINDOW: &str = "case_id IS NOT NULL \
     AND ($1::timestamptz IS NULL OR opened_at >= $1) \
     AND ($2::timestamptz IS NULL OR opened_at < $2)";

/// Count, median and 90th percentile (nearest rank) of `x`, NULLs left out.
fn spread(x: &str) -> String {
    let sorted = format!("(array_agg({x} ORDER BY {x}) FILTER (WHERE {x} IS NOT NULL))");
    let rank = |p: u32| format!("greatest(1, ({p} * count({x}) + 99) / 100)::int");
    format!("count({x}), {sorted}[{}], {sorted}[{}]", rank(50), rank(90))
}

/// The KPI columns of a set, in the order [`counted`] reads them:
/// cases, escalated, per reason, first answer, resolution, breached,
/// repeat customers, CSAT count and sum.
fn kpi_columns(escalated: &str, reason: &str, breached: &str, csat: &str) -> String {
    let reasons: Vec<String> = REASONS
        .iter()
        .map(|r| format!("count(*) FILTER (WHERE '{}' = {reason})", r.as_str()))
        .collect();
    format!(
        "count(*), count(*) FILTER (WHERE {escalated}), {}, {}, {}, \
         count(*) FILTER (WHERE {breached}), count(*) FILTER (WHERE repeat_customer), \
         count({csat}), coalesce(sum({csat}), 0)::bigint",
        reasons.join(", "),
        spread("fa"),
        spread("rs"),
    )
}

/// A set's counts from a row of [`kpi_columns`] starting at column `at`.
fn counted(r: &Row, at: usize) -> Counted {
    let n = |i: usize| r.get::<_, i64>(at + i).max(0) as u64;
    let mut c = Counted::empty();
    let k = &mut c.kpis;
    k.cases = n(0);
    k.escalated = n(1);
    for (i, reason) in REASONS.iter().enumerate() {
        k.escalated_by_reason
            .insert(reason.as_str().to_string(), n(2 + i));
    }
    let spread = |i: usize| Spread {
        count: n(i) as usize,
        median_secs: r.get(at + i + 1),
        p90_secs: r.get(at + i + 2),
    };
    k.first_answer = spread(6);
    k.resolve = spread(9);
    k.breached = n(12);
    k.repeat_customers = n(13);
    k.csat_count = n(14);
    c.csat_sum = n(15);
    c
}

/// Seconds from `from` to `to`, truncated toward zero (chrono's
/// `num_seconds`).
fn secs(to: &str, from: &str) -> String {
    format!("trunc(extract(epoch FROM {to} - {from}))::bigint")
}

fn query(
    c: &mut Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, postgres::Error> {
    let st = prepared(c, sql)?;
    c.query(&st, params)
}

fn set<'a>(sets: &'a mut BTreeMap<String, Counted>, name: String) -> &'a mut Counted {
    sets.entry(name).or_insert_with(Counted::empty)
}

fn kpi_sets(
    c: &mut Client,
    facts: &str,
    (since, until): Window,
    now: DateTime<Utc>,
) -> Result<Sets, postgres::Error> {
    let window: [&(dyn ToSql + Sync); 2] = [&since, &until];
    let mut overall = Counted::empty();
    let mut tiers = BTreeMap::new();
    let mut queues = BTreeMap::new();
    // The cases of the window, all and by queue.
    let sql = format!(
        "SELECT grouping(queue), queue, {} FROM ( \
             SELECT *, {} AS fa, {} AS rs FROM {facts} WHERE {WINDOW}) w \
         GROUP BY GROUPING SETS ((), (queue))",
        kpi_columns(
            "cardinality(stint_tier) > 1",
            "ANY(stint_left_reason)",
            "true = ANY(stint_deadline_missed)",
            "csat"
        ),
        secs("first_response_at", "opened_at"),
        secs("resolved_at", "opened_at"),
    );
    for r in query(c, &sql, &window)? {
        match r.get::<_, i32>(0) {
            0 => {
                queues.insert(r.get(1), counted(&r, 2));
            }
            _ => overall = counted(&r, 2),
        }
    }
    // Each tier's time with the window's cases (a case counts at every
    // tier it reached); resolution and CSAT belong to the last.
    let sql = format!(
        "SELECT s.tier, {} FROM ( \
             SELECT s.*, w.repeat_customer, \
                    {} AS fa, \
                    CASE WHEN s.position = cardinality(w.stint_tier) THEN {} END AS rs, \
                    CASE WHEN s.position = cardinality(w.stint_tier) THEN w.csat END AS last_csat \
             FROM {facts} w, \
                  unnest(w.stint_tier, w.stint_entered_at, w.stint_first_response_at, \
                         w.stint_left_reason, w.stint_deadline_missed) \
                      WITH ORDINALITY AS s(tier, entered_at, first_response_at, left_reason, \
                                           deadline_missed, position) \
             WHERE {WINDOW}) s \
         GROUP BY s.tier",
        kpi_columns(
            "left_reason IS NOT NULL",
            "left_reason",
            "deadline_missed",
            "last_csat"
        ),
        secs("s.first_response_at", "s.entered_at"),
        secs("w.resolved_at", "w.opened_at"),
    );
    for r in query(c, &sql, &window)? {
        tiers.insert(r.get(0), counted(&r, 1));
    }
    // Bounces: of all the window's cases, and by the tier holding each
    // now (a tier's are of the cases it holds).
    let sql = format!(
        "SELECT grouping(queue), grouping(tier), queue, tier, \
                coalesce(sum(bounces), 0)::bigint, count(*) FILTER (WHERE bounces > 0) \
         FROM {facts} WHERE {WINDOW} GROUP BY GROUPING SETS ((), (queue), (tier))"
    );
    for r in query(c, &sql, &window)? {
        let target = match (r.get::<_, i32>(0), r.get::<_, i32>(1)) {
            (0, _) => set(&mut queues, r.get(2)),
            (_, 0) => set(&mut tiers, r.get(3)),
            _ => &mut overall,
        };
        target.kpis.bounces = r.get::<_, i64>(4).max(0) as u64;
        target.kpis.bounced_cases = r.get::<_, i64>(5).max(0) as u64;
    }
    // Open cases by age: every unresolved case, whenever opened. Hours
    // truncated as chrono's `num_hours` (an age under an hour, or a
    // negative one, is under an hour).
    let sql = format!(
        "SELECT grouping(queue), grouping(tier), queue, tier, count(*), \
                count(*) FILTER (WHERE age < 3600), \
                count(*) FILTER (WHERE age >= 3600 AND age < 86400), \
                count(*) FILTER (WHERE age >= 86400 AND age < 604800), \
                count(*) FILTER (WHERE age >= 604800) \
         FROM (SELECT queue, tier, extract(epoch FROM $1::timestamptz - opened_at) AS age \
               FROM {facts} WHERE case_id IS NOT NULL AND status <> 'resolved') o \
         GROUP BY GROUPING SETS ((), (queue), (tier))"
    );
    for r in query(c, &sql, &[&now])? {
        let target = match (r.get::<_, i32>(0), r.get::<_, i32>(1)) {
            (0, _) => set(&mut queues, r.get(2)),
            (_, 0) => set(&mut tiers, r.get(3)),
            _ => &mut overall,
        };
        let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
        let open = &mut target.kpis.open;
        (
            open.total,
            open.under_1h,
            open.under_1d,
            open.under_7d,
            open.over_7d,
        ) = (n(4), n(5), n(6), n(7), n(8));
    }
    Ok(Sets {
        overall,
        tiers: tiers.into_iter().collect(),
        queues: queues.into_iter().collect(),
    })
}

impl PgDb {
    /// The KPI sets of the cases opened in `window`, open ages at `now`.
    pub(in crate::store) fn kpi_sets(
        &self,
        window: Window,
        now: DateTime<Utc>,
    ) -> Result<Sets, StoreError> {
        let facts = self.tables.of(Tree::Facts);
        self.call(move |c| kpi_sets(c, &facts, window, now))
    }

    /// Facts rows (key, value) of the cases opened in `window` with keys
    /// after `after`, in key (case) order, a page at most.
    pub(in crate::store) fn facts_page(
        &self,
        window: Window,
        after: Vec<u8>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let sql = format!(
            "SELECT key, value FROM {} WHERE {WINDOW} AND key > $3 ORDER BY key LIMIT {PAGE}",
            self.tables.of(Tree::Facts)
        );
        let (since, until) = window;
        self.call(move |c| {
            let st = prepared(c, &sql)?;
            Ok(c.query(&st, &[&since, &until, &after])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    /// Facts rows of the unresolved cases opened before `before` (all
    /// with None), oldest first.
    pub(in crate::store) fn unresolved_rows(
        &self,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let sql = format!(
            "SELECT key, value FROM {} WHERE {} ORDER BY opened_at, case_id",
            self.tables.of(Tree::Facts),
            UNRESOLVED
        );
        self.call(move |c| {
            let st = prepared(c, &sql)?;
            Ok(c.query(&st, &[&before])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    /// Queue, tier and opening time of the unresolved cases opened before
    /// `before` (all with None), oldest first.
    pub(in crate::store) fn unresolved_cases(
        &self,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<OpenCase>, StoreError> {
        let sql = format!(
            "SELECT queue, tier, opened_at FROM {} WHERE {} ORDER BY opened_at, case_id",
            self.tables.of(Tree::Facts),
            UNRESOLVED
        );
        self.call(move |c| {
            let st = prepared(c, &sql)?;
            Ok(c.query(&st, &[&before])?
                .iter()
                .map(|r| OpenCase {
                    queue: r.get(0),
                    tier: r.get(1),
                    created_at: r.get(2),
                })
                .collect())
        })
    }
}

/// The unresolved cases opened before `$1` (NULL: all).
const UNRESOLVED: &str = "case_id IS NOT NULL AND status <> 'resolved' \
     AND ($1::timestamptz IS NULL OR opened_at < $1)";
