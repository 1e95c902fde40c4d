//! Issue 22: the PostgreSQL tables are a contract. The README's example
//! queries, taken from the README itself, return the expected rows over
//! known cases, and agree with `escalator stats`.

use super::tests::{case, ok, pg_store};
use super::*;
use crate::case::Status;

/// The SQL blocks of the README's "PostgreSQL tables" section.
fn readme_queries() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## PostgreSQL tables")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README has a PostgreSQL tables section");
    section
        .split("```sql\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .map(str::to_string)
        .collect()
}

/// 2026-11-02, a Monday, 09:00 UTC, plus `days` and `secs`.
fn t(days: i64, secs: i64) -> DateTime<Utc> {
    let monday = DateTime::parse_from_rfc3339("2026-11-02T09:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    monday + chrono::Duration::days(days) + chrono::Duration::seconds(secs)
}

#[test]
fn the_readme_queries_return_the_known_cases_figures_and_agree_with_stats() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database("tables");
    let store = pg_store(&pg, "tables", dir.path());
    // (id, queue, tier, status, opened day, first answer after)
    type Known<'a> = (u64, &'a str, &'a str, Status, i64, Option<i64>);
    let known: [Known<'_>; 6] = [
        (1, "default", "T1", Status::Open, 0, Some(600)),
        (2, "default", "T1", Status::Open, 1, Some(3600)),
        (3, "default", "T2", Status::Open, 2, None),
        (4, "billing", "T1", Status::Resolved, 7, Some(120)),
        (5, "billing", "T1", Status::Answered, 8, Some(7200)),
        (6, "billing", "T2", Status::Open, 9, Some(60)),
    ];
    ok(store.transact(|tx| {
        for (id, queue, tier, status, day, answer) in known {
            let mut c = case(id, tier, 0);
            c.created_at = t(day, 0);
            c.queue = queue.into();
            c.status = status;
            c.first_answer_at = answer.map(|s| t(day, s));
            if status == Status::Resolved {
                c.resolved_at = Some(t(day, 9000));
            }
            tx.put_case(&mut c)?;
        }
        Ok(())
    }));
    let queries = readme_queries();
    assert_eq!(queries.len(), 2, "{queries:?}");
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let open: Vec<(String, String, i64)> = c
        .query(&queries[0], &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let row = |q: &str, t: &str, n| (q.to_string(), t.to_string(), n);
    assert_eq!(
        open,
        vec![
            row("billing", "T1", 1),
            row("billing", "T2", 1),
            row("default", "T1", 2),
            row("default", "T2", 1),
        ]
    );
    let weekly: Vec<(DateTime<Utc>, i64, i64)> = c
        .query(&queries[1], &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let week = |d| t(d, -9 * 3600);
    // Nearest rank: of 600 and 3600 the 2nd; of 60, 120, 7200 the 3rd.
    assert_eq!(weekly, vec![(week(0), 2, 3600), (week(7), 3, 7200)]);
    // The same p90 as `stats` over the same cases.
    let p90: i64 = c
        .query_one(
            "SELECT percentile_disc(0.9) WITHIN GROUP (ORDER BY first_response_secs) \
             FROM escalator.case_facts",
            &[],
        )
        .unwrap()
        .get(0);
    let facts = ok(store.facts_since(None));
    let report = crate::stats::report(
        facts.into_iter(),
        std::iter::empty(),
        &crate::stats::Order {
            tiers: &[],
            queues: &[],
        },
        None,
        t(14, 0),
    );
    assert_eq!(report.overall.first_answer.p90_secs, Some(p90));
    assert_eq!(report.overall.first_answer.count, 5);
}

#[test]
fn a_senders_nul_and_a_date_past_year_9999_neither_fail_a_commit_nor_break_a_view() {
    // Review: a Date header of year 10000 made a typed column PostgreSQL
    // refuses (the whole commit failed), and a NUL in an event's JSON
    // made the case_events view fail for every reader.
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database("hostile_columns");
    let store = pg_store(&pg, "hostile_columns", dir.path());
    let far = DateTime::parse_from_rfc3339("9999-12-31T23:00:00-12:00")
        .unwrap()
        .with_timezone(&Utc);
    ok(store.transact(|tx| {
        let mut c = case(1, "T1", 0);
        c.customer_name = Some("Eve\0Null".into());
        c.subject = "sub\0ject".into();
        c.push(
            t(0, 0),
            crate::case::EventKind::Message {
                message_id: "m\0@x".into(),
                from: "eve\0@x".into(),
                via: "new".into(),
                automatic: None,
            },
        );
        tx.put_case(&mut c)?;
        let mut m = super::tests::record(1, 1, "m\0@x", "h");
        m.date = Some(far);
        tx.put_message(&m, b"raw")
    }));
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let row = c
        .query_one("SELECT subject, customer_name FROM escalator.cases", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "sub\u{FFFD}ject");
    let date: Option<DateTime<Utc>> = c
        .query_one("SELECT date FROM escalator.messages", &[])
        .unwrap()
        .get(0);
    assert_eq!(date, None, "left empty, the message stored");
    let events: Vec<String> = c
        .query(
            "SELECT detail ->> 'from' FROM escalator.case_events WHERE kind = 'message'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, vec!["eve\u{FFFD}@x".to_string()]);
    assert_eq!(
        ok(store.message(1)).unwrap().date,
        Some(far),
        "the record keeps it"
    );
}
