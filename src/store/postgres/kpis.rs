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

/// What a row of the first query adds to the tier set of a case with
/// one stint (`only_tier`): that stint is the whole case, so its counts are
/// the case's (it never left the tier; its deadline missed is the
/// case's breach; the last stint holds the CSAT).
fn add_only_stint(c: &mut Counted, r: &Row) {
    let k = &mut c.kpis;
    k.cases += n(r, 2);
    k.breached += n(r, 8);
    k.repeat_customers += n(r, 9);
    k.csat_count += n(r, 10);
    c.csat_sum += n(r, 11);
}

/// The KPI sets in three queries, one snapshot: see [`by_queue_and_tier`],
/// [`escalated_stints`] and [`spreads`].
fn kpi_sets(
    c: &mut Client,
    facts: &str,
    (since, until): Window,
    now: DateTime<Utc>,
) -> Result<Sets, postgres::Error> {
    let window: [&(dyn ToSql + Sync); 2] = [&since, &until];
    let mut sets = Sets {
        overall: Counted::empty(),
        tiers: Vec::new(),
        queues: Vec::new(),
    };
    let mut tiers = BTreeMap::new();
    let mut queues = BTreeMap::new();
    by_queue_and_tier(
        c,
        facts,
        (since, until),
        now,
        &mut sets.overall,
        &mut tiers,
        &mut queues,
    )?;
    escalated_stints(c, facts, &window, &mut tiers)?;
    spreads(
        c,
        facts,
        &window,
        &mut sets.overall,
        &mut tiers,
        &mut queues,
    )?;
    sets.tiers = tiers.into_iter().collect();
    sets.queues = queues.into_iter().collect();
    Ok(sets)
}

/// Everything that adds up, counted in parallel over every row, per
/// queue, current tier and (for a case with one stint) that stint's
/// tier: the window's cases, bounces, and open cases by age over all the
/// unresolved ones (hours truncated as chrono's `num_hours`: an age
/// under an hour, or a negative one, is under an hour).
fn by_queue_and_tier(
    c: &mut Client,
    facts: &str,
    (since, until): Window,
    now: DateTime<Utc>,
    overall: &mut Counted,
    tiers: &mut BTreeMap<String, Counted>,
    queues: &mut BTreeMap<String, Counted>,
) -> Result<(), postgres::Error> {
    let reasons: Vec<String> = REASONS
        .iter()
        .map(|r| format!("count(*) FILTER (WHERE w AND escalated_{})", r.as_str()))
        .collect();
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
                count(*) FILTER (WHERE open AND age >= 604800), \
                only_tier \
         FROM (SELECT *, ({IN_WINDOW}) AS w, status <> 'resolved' AS open, \
                      extract(epoch FROM $3::timestamptz - opened_at) AS age, \
                      CASE WHEN cardinality(stint_tier) = 1 THEN stint_tier[1] END AS only_tier \
               FROM {facts} WHERE case_id IS NOT NULL) f \
         GROUP BY queue, tier, only_tier",
        reasons.join(", ")
    );
    for r in query(c, &sql, &[&since, &until, &now])? {
        // A group only of resolved cases outside the window is in no set.
        if n(&r, 2) == 0 && n(&r, 14) == 0 {
            continue;
        }
        add_cases(overall, &r, true);
        add_cases(set(queues, r.get(0)), &r, true);
        add_cases(set(tiers, r.get(1)), &r, false);
        if let (Some(only), true) = (r.get::<_, Option<String>>(19), n(&r, 2) > 0) {
            add_only_stint(set(tiers, only), &r);
        }
    }
    Ok(())
}

/// The stints of the window's cases that moved on (those with one
/// stint are counted by [`by_queue_and_tier`]): a case counts at every
/// tier it reached, and the CSAT belongs to the last.
fn escalated_stints(
    c: &mut Client,
    facts: &str,
    window: &[&(dyn ToSql + Sync); 2],
    tiers: &mut BTreeMap<String, Counted>,
) -> Result<(), postgres::Error> {
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
         WHERE {WINDOW} AND cardinality(f.stint_tier) > 1 GROUP BY s.tier",
        reasons.join(", ")
    );
    for r in query(c, &sql, window)? {
        let t = set(tiers, r.get(0));
        let k = &mut t.kpis;
        k.cases += n(&r, 1);
        k.escalated += n(&r, 2);
        for (i, reason) in REASONS.iter().enumerate() {
            *k.escalated_by_reason
                .entry(reason.as_str().to_string())
                .or_default() += n(&r, 3 + i);
        }
        k.breached += n(&r, 7);
        k.repeat_customers += n(&r, 8);
        k.csat_count += n(&r, 9);
        t.csat_sum += n(&r, 10);
    }
    Ok(())
}

/// The spreads, which need every value sorted, in one pass over the
/// window's rows that have one: each row gives its values to all cases
/// (kind 0), its queue (1) and each tier it reached (2: first answer
/// from reaching it, resolution at the last).
fn spreads(
    c: &mut Client,
    facts: &str,
    window: &[&(dyn ToSql + Sync); 2],
    overall: &mut Counted,
    tiers: &mut BTreeMap<String, Counted>,
    queues: &mut BTreeMap<String, Counted>,
) -> Result<(), postgres::Error> {
    let sql = format!(
        "SELECT s.kind, s.name, {}, {} FROM {facts} f, LATERAL ( \
             SELECT 0 AS kind, ''::text AS name, f.first_response_secs AS fa, \
                    f.resolve_secs AS rs \
             UNION ALL SELECT 1, f.queue, f.first_response_secs, f.resolve_secs \
             UNION ALL SELECT 2, u.tier, u.fa, \
                    CASE WHEN u.position = cardinality(f.stint_tier) THEN f.resolve_secs END \
             FROM unnest(f.stint_tier, f.stint_first_response_secs) \
                  WITH ORDINALITY AS u(tier, fa, position)) s \
         WHERE {WINDOW} AND (f.first_response_secs IS NOT NULL OR f.resolve_secs IS NOT NULL \
                             OR f.stint_first_response_secs IS NOT NULL) \
         GROUP BY s.kind, s.name",
        spread("s.fa"),
        spread("s.rs"),
    );
    for r in query(c, &sql, window)? {
        let target = match r.get::<_, i32>(0) {
            0 => &mut *overall,
            1 => set(queues, r.get(1)),
            _ => set(tiers, r.get(1)),
        };
        target.kpis.first_answer = spread_at(&r, 2);
        target.kpis.resolve = spread_at(&r, 5);
    }
    Ok(())
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
            // One snapshot, so the three queries count the same cases. JIT
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
        (since, until): Window,
        after: Vec<u8>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let sql = format!(
            "SELECT key, value FROM {} WHERE {WINDOW} AND key > $3 ORDER BY key LIMIT {PAGE}",
            self.tables.of(Tree::Facts)
        );
        self.select(
            sql,
            vec![Box::new(since), Box::new(until), Box::new(after)],
            |r| (r.get(0), r.get(1)),
        )
    }

    /// Facts rows of the unresolved cases opened before `before` (all
    /// with None), oldest first.
    pub(in crate::store) fn unresolved_rows(
        &self,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let sql = format!(
            "SELECT key, value FROM {} WHERE {UNRESOLVED} ORDER BY opened_at, case_id",
            self.tables.of(Tree::Facts)
        );
        self.select(sql, vec![Box::new(before)], |r| (r.get(0), r.get(1)))
    }

    /// Queue, tier and opening time of the unresolved cases opened before
    /// `before` (all with None), oldest first.
    pub(in crate::store) fn unresolved_cases(
        &self,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<OpenCase>, StoreError> {
        let sql = format!(
            "SELECT queue, tier, opened_at FROM {} WHERE {UNRESOLVED} ORDER BY opened_at, case_id",
            self.tables.of(Tree::Facts)
        );
        self.select(sql, vec![Box::new(before)], |r| OpenCase {
            queue: r.get(0),
            tier: r.get(1),
            created_at: r.get(2),
        })
    }

    /// The rows of a prepared statement, each made into a `T`.
    fn select<T: Send + 'static>(
        &self,
        sql: String,
        params: Vec<Box<dyn ToSql + Send + Sync>>,
        row: fn(&Row) -> T,
    ) -> Result<Vec<T>, StoreError> {
        self.call(move |c| {
            let params: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            Ok(query(c, &sql, &params)?.iter().map(row).collect())
        })
    }
}

/// The unresolved cases opened before `$1` (NULL: all).
const UNRESOLVED: &str = "case_id IS NOT NULL AND status <> 'resolved' \
     AND ($1::timestamptz IS NULL OR opened_at < $1)";
