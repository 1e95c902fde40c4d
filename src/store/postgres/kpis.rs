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

/// A facts row: key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

type Window = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// The facts rows of a window: `$1` since (inclusive), `$2` until
/// (exclusive), either NULL for no bound.
const WINDOW: &str = "case_id IS NOT NULL \
     AND ($1::timestamptz IS NULL OR opened_at >= $1) \
     AND ($2::timestamptz IS NULL OR opened_at < $2)";
/// Opened in the window (as [`WINDOW`], of a row known to be a case's).
const IN_WINDOW: &str = "($1::timestamptz IS NULL OR opened_at >= $1) \
     AND ($2::timestamptz IS NULL OR opened_at < $2)";

/// Count, median and 90th percentile (nearest rank) of `x`, NULLs left
/// out. percentile_disc(f) takes the value at rank ceil(f × n), with f × n
/// in floating point: 0.9 × 70 is 63.000…01 there, rank 64, where the
/// nearest rank is 63. f is taken a billionth lower, which moves a
/// product that is a whole number back onto it and changes no other
/// rank: f × n has a fractional part of at least 0.1 (f is 0.5 or 0.9),
/// far more than n billionths for any n under 10⁸.
fn spread(x: &str) -> String {
    let at = |p: f64| format!("percentile_disc({}) WITHIN GROUP (ORDER BY {x})", p - 1e-9);
    format!("count({x}), {}, {}", at(0.5), at(0.9))
}

/// A set's three spread columns from `at`.
fn spread_at(r: &Row, at: usize) -> Spread {
    Spread {
        count: r.get::<_, i64>(at).max(0) as usize,
        median_secs: r.get(at + 1),
        p90_secs: r.get(at + 2),
    }
}

fn n(r: &Row, i: usize) -> u64 {
    r.get::<_, i64>(i).max(0) as u64
}

fn query(
    c: &mut Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, postgres::Error> {
    let st = prepared(c, sql)?;
    c.query(&st, params)
}

fn set(sets: &mut BTreeMap<String, Counted>, name: String) -> &mut Counted {
    sets.entry(name).or_insert_with(Counted::empty)
}

/// What one row of the first query adds to a set: the window's cases
/// (`cases` false for a tier's set, whose cases are its stints') and
/// the open ones.
fn add_cases(c: &mut Counted, r: &Row, cases: bool) {
    let k = &mut c.kpis;
    if cases {
        k.cases += n(r, 2);
        k.escalated += n(r, 3);
        for (i, reason) in REASONS.iter().enumerate() {
            *k.escalated_by_reason
                .entry(reason.as_str().to_string())
                .or_default() += n(r, 4 + i);
        }
        k.breached += n(r, 8);
        k.repeat_customers += n(r, 9);
        k.csat_count += n(r, 10);
        c.csat_sum += n(r, 11);
    }
    k.bounces += n(r, 12);
    k.bounced_cases += n(r, 13);
    let open = &mut k.open;
    open.total += n(r, 14);
    open.under_1h += n(r, 15);
    open.under_1d += n(r, 16);
    open.under_7d += n(r, 17);
    open.over_7d += n(r, 18);
}

/// The KPI sets in four queries, all but the spreads counted in
/// parallel by the server: (1) per queue and current tier, everything
/// that adds up (the window's cases, bounces, open cases by age over all
/// unresolved ones); (2) per tier, its stints' counts; (3) the spreads of
/// all cases and per queue; (4) the spreads per tier.
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
    let reasons: Vec<String> = REASONS
        .iter()
        .map(|r| format!("count(*) FILTER (WHERE w AND escalated_{})", r.as_str()))
        .collect();
    // Hours truncated as chrono's `num_hours` (an age under an hour, or
    // a negative one, is under an hour).
    let sql = format!(
        "SELECT queue, tier, count(*) FILTER (WHERE w), count(*) FILTER (WHERE w AND escalated), \
                {}, count(*) FILTER (WHERE w AND breached), \
                count(*) FILTER (WHERE w AND repeat_customer), \
                count(csat) FILTER (WHERE w), coalesce(sum(csat) FILTER (WHERE w), 0)::bigint, \
                coalesce(sum(bounces) FILTER (WHERE w), 0)::bigint, \
                count(*) FILTER (WHERE w AND bounces > 0), \
                count(*) FILTER (WHERE open), \
                count(*) FILTER (WHERE open AND age < 3600), \
                count(*) FILTER (WHERE open AND age >= 3600 AND age < 86400), \
                count(*) FILTER (WHERE open AND age >= 86400 AND age < 604800), \
                count(*) FILTER (WHERE open AND age >= 604800) \
         FROM (SELECT *, ({IN_WINDOW}) AS w, status <> 'resolved' AS open, \
                      extract(epoch FROM $3::timestamptz - opened_at) AS age \
               FROM {facts} WHERE case_id IS NOT NULL) f \
         GROUP BY queue, tier",
        reasons.join(", ")
    );
    for r in query(c, &sql, &[&since, &until, &now])? {
        // A group only of resolved cases outside the window is in no set.
        if n(&r, 2) == 0 && n(&r, 14) == 0 {
            continue;
        }
        add_cases(&mut overall, &r, true);
        add_cases(set(&mut queues, r.get(0)), &r, true);
        add_cases(set(&mut tiers, r.get(1)), &r, false);
    }
    // A tier's cases are the stints there (a case counts at every tier
    // it reached); CSAT belongs to the last.
    let reasons: Vec<String> = REASONS
        .iter()
        .map(|r| format!("count(*) FILTER (WHERE s.left_reason = '{}')", r.as_str()))
        .collect();
    let sql = format!(
        "SELECT s.tier, count(*), count(s.left_reason), {}, \
                count(*) FILTER (WHERE s.deadline_missed), \
                count(*) FILTER (WHERE f.repeat_customer), \
                count(s.csat), coalesce(sum(s.csat), 0)::bigint \
         FROM {facts} f, LATERAL ( \
             SELECT u.tier, u.left_reason, u.deadline_missed, \
                    CASE WHEN u.position = cardinality(f.stint_tier) THEN f.csat END AS csat \
             FROM unnest(f.stint_tier, f.stint_left_reason, f.stint_deadline_missed) \
                  WITH ORDINALITY AS u(tier, left_reason, deadline_missed, position)) s \
         WHERE {WINDOW} GROUP BY s.tier",
        reasons.join(", ")
    );
    for r in query(c, &sql, &window)? {
        let t = set(&mut tiers, r.get(0));
        let k = &mut t.kpis;
        k.cases = n(&r, 1);
        k.escalated = n(&r, 2);
        for (i, reason) in REASONS.iter().enumerate() {
            k.escalated_by_reason
                .insert(reason.as_str().to_string(), n(&r, 3 + i));
        }
        k.breached = n(&r, 7);
        k.repeat_customers = n(&r, 8);
        k.csat_count = n(&r, 9);
        t.csat_sum = n(&r, 10);
    }
    // Spreads need every value sorted: only the rows that have one.
    let sql = format!(
        "SELECT grouping(queue), queue, {}, {} FROM {facts} \
         WHERE {WINDOW} AND (first_response_secs IS NOT NULL OR resolve_secs IS NOT NULL) \
         GROUP BY GROUPING SETS ((), (queue))",
        spread("first_response_secs"),
        spread("resolve_secs"),
    );
    for r in query(c, &sql, &window)? {
        let target = match r.get::<_, i32>(0) {
            0 => set(&mut queues, r.get(1)),
            _ => &mut overall,
        };
        target.kpis.first_answer = spread_at(&r, 2);
        target.kpis.resolve = spread_at(&r, 5);
    }
    // Per tier: first answer from reaching it, resolution at the last.
    let sql = format!(
        "SELECT s.tier, {}, {} FROM {facts} f, LATERAL ( \
             SELECT u.tier, u.fa, \
                    CASE WHEN u.position = cardinality(f.stint_tier) THEN f.resolve_secs END AS rs \
             FROM unnest(f.stint_tier, f.stint_first_response_secs) \
                  WITH ORDINALITY AS u(tier, fa, position)) s \
         WHERE {WINDOW} AND (f.stint_first_response_secs IS NOT NULL OR f.resolve_secs IS NOT NULL) \
         GROUP BY s.tier",
        spread("s.fa"),
        spread("s.rs"),
    );
    for r in query(c, &sql, &window)? {
        let t = set(&mut tiers, r.get(0));
        t.kpis.first_answer = spread_at(&r, 1);
        t.kpis.resolve = spread_at(&r, 4);
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
        self.call(move |c| {
            // One snapshot, so the four queries count the same cases. JIT
            // compiling costs more than it saves on these; sorts of a
            // million values fit in memory.
            c.batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SET LOCAL jit = off; SET LOCAL work_mem = '64MB'",
            )?;
            let sets = kpi_sets(c, &facts, window, now);
            let end = c.batch_execute(if sets.is_ok() { "COMMIT" } else { "ROLLBACK" });
            let sets = sets?;
            end?;
            Ok(sets)
        })
    }

    /// Facts rows (key, value) of the cases opened in `window` with keys
    /// after `after`, in key (case) order, a page at most.
    pub(in crate::store) fn facts_page(
        &self,
        window: Window,
        after: Vec<u8>,
    ) -> Result<Vec<KeyValue>, StoreError> {
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
    ) -> Result<Vec<KeyValue>, StoreError> {
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
