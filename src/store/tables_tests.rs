//! Issue 22: the PostgreSQL tables are a contract. The README's example
//! queries, taken from the README itself, return the expected rows over
//! known cases, and agree with `escalator stats`.

use super::tests::{case, ok, pg_store};
use super::*;
use crate::case::{EventKind, Status};

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

/// Cases of every kind, written in two rounds (the second adds to cases
/// of the first, so facts are read back and updated): escalations for
/// each reason, first answers at each tier, breaches, resolutions, CSAT,
/// bounces, triggers, repeat customers, in two queues, and a tier no
/// longer configured whose name holds what an array literal is made of.
fn write_varied_cases(store: &Store, n: u64) {
    const ODD: &str = "Old \"T3\", {x}\\";
    let tiers = ["T1", "T2", ODD];
    let reasons = crate::stats::REASONS;
    // A fixed sequence of pseudo-random numbers: the same cases each run.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let mut cases = Vec::new();
    for id in 1..=n {
        let opened = t(0, (id as i64) * 1800 + rnd(600) as i64);
        let mut c = case(id, "T1", 0);
        c.created_at = opened;
        c.queue = if rnd(3) == 0 { "billing" } else { "default" }.into();
        c.repeat_customer = rnd(4) == 0;
        cases.push(c);
    }
    for round in 0..2 {
        ok(store.transact(|tx| {
            for c in cases.iter_mut().filter(|c| round == 0 || c.id % 3 == 0) {
                let mut at = c.updated_at.max(c.created_at) + chrono::Duration::seconds(1);
                let mut step = |rnd: &mut dyn FnMut(u64) -> u64| {
                    at += chrono::Duration::seconds(rnd(20_000) as i64 + 1);
                    at
                };
                if rnd(3) > 0 {
                    let when = step(&mut rnd);
                    c.push(
                        when,
                        EventKind::StaffAnswer {
                            from: "s@x".into(),
                            message_id: "a@x".into(),
                        },
                    );
                    c.first_answer_at.get_or_insert(when);
                    c.status = Status::Answered;
                }
                if rnd(4) == 0 {
                    let tier = c.tier.clone();
                    c.push(step(&mut rnd), EventKind::Breached { tier });
                }
                if rnd(5) == 0 {
                    c.push(
                        step(&mut rnd),
                        EventKind::Priority {
                            priority: "high".into(),
                            why: format!("phrase \"p{}\"", rnd(3)),
                        },
                    );
                }
                let hops = rnd(3);
                for _ in 0..hops {
                    let from = c.tier.clone();
                    let to = tiers[(tiers.iter().position(|t| *t == from).unwrap_or(0) + 1) % 3]
                        .to_string();
                    let reason = reasons[rnd(4) as usize];
                    c.push(
                        step(&mut rnd),
                        EventKind::Escalated {
                            from,
                            to: to.clone(),
                            reason,
                            detail: format!("phrase \"w{}\"", rnd(2)),
                        },
                    );
                    c.tier = to;
                    c.escalations += 1;
                    c.status = Status::Open;
                }
                if rnd(5) == 0 {
                    c.push(
                        step(&mut rnd),
                        EventKind::Bounced {
                            outbox_id: 1,
                            mail: "ack".into(),
                            recipient: c.customer.clone(),
                            status: "5.1.1".into(),
                            diagnostic: None,
                            message_id: "b@x".into(),
                        },
                    );
                }
                if rnd(3) == 0 {
                    c.status = Status::Resolved;
                    c.resolved_at = Some(step(&mut rnd));
                    if rnd(2) == 0 {
                        c.csat = Some(rnd(5) as u8 + 1);
                    }
                } else if round == 1 && c.status == Status::Resolved {
                    c.status = Status::Open;
                }
                tx.put_case(c)?;
            }
            Ok(())
        }));
    }
}

fn order_of<'a>(tiers: &'a [String], queues: &'a [String]) -> crate::stats::Order<'a> {
    crate::stats::Order { tiers, queues }
}

#[test]
fn stats_on_postgresql_are_counted_in_sql_to_the_same_figures_as_the_tally_and_as_sled() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database("kpis");
    let store = pg_store(&pg, "kpis", &dir.path().join("pg"));
    let sled = ok(Store::open(&dir.path().join("sled")));
    // 300 cases: enough that the percentiles fall where floating point
    // would pick the wrong rank (90% of 70 answered is 63, not 64).
    for s in [&store, &sled] {
        write_varied_cases(s, 300);
    }
    let tiers = vec!["T1".to_string(), "T2".to_string(), "T4".to_string()];
    let queues = vec![
        "default".to_string(),
        "billing".to_string(),
        "empty".to_string(),
    ];
    let order = order_of(&tiers, &queues);
    let end = t(8, 0);
    let windows = [
        (None, None, end),
        (Some(t(2, 0)), None, end),
        (Some(t(1, 0)), Some(t(3, 0)), t(3, 0)),
        (Some(t(2, 7 * 3600)), Some(t(2, 8 * 3600)), t(30, 0)),
        (Some(t(40, 0)), None, t(40, 0)),
    ];
    for (since, until, now) in windows {
        let sql = ok(store.report(since, until, now, &order));
        let tally = ok(store.tally(since, until, now)).finish(&order, since);
        assert_eq!(sql, tally, "window {since:?}..{until:?} at {now}");
        let on_sled = ok(sled.report(since, until, now, &order));
        assert_eq!(
            sql, on_sled,
            "window {since:?}..{until:?}: both engines agree"
        );
    }
    // The figures are not empty ones agreeing: every kind was counted.
    let all = ok(store.report(None, None, end, &order));
    let o = &all.overall;
    assert_eq!(o.cases, 300);
    assert!(
        o.escalated > 0 && o.breached > 0 && o.repeat_customers > 0,
        "{o:?}"
    );
    assert!(o.escalated_by_reason.values().all(|n| *n > 0), "{o:?}");
    assert!(
        o.first_answer.count > 70 && o.resolve.count > 0 && o.csat_count > 0,
        "{o:?}"
    );
    assert!(
        o.bounces > 0 && o.open.total > 0 && o.open.under_7d > 0,
        "{o:?}"
    );
    let names: Vec<&str> = all.tiers.iter().map(|t| t.tier.as_str()).collect();
    assert_eq!(names, ["T1", "T2", "T4", "Old \"T3\", {x}\\"]);
    // One row per case with typed columns, and a row per stint in the view.
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let (rows, stints): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM escalator.facts), \
                        (SELECT count(*) FROM escalator.case_stints)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let facts = ok(store.facts_since(None));
    assert_eq!(rows, 300);
    assert_eq!(
        stints as usize,
        facts.iter().map(|f| f.stints.len()).sum::<usize>()
    );
    let odd: Vec<String> = c
        .query(
            "SELECT DISTINCT tier FROM escalator.case_stints WHERE tier LIKE 'Old%'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(odd, ["Old \"T3\", {x}\\"]);
    // docs/postgresql.md's query of escalations by tier counts what
    // `stats` counts (its window made a fixed date).
    let docs = include_str!("../../docs/postgresql.md");
    let query = docs
        .split("### KPIs in SQL")
        .nth(1)
        .and_then(|s| s.split("```sql\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("docs/postgresql.md has the query")
        .replace(
            "now() - interval '30 days'",
            "'2026-11-01T00:00:00Z'::timestamptz",
        );
    let by_tier: Vec<(String, i64, i64, i64)> = c
        .query(&query, &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut expected: Vec<(String, i64, i64, i64)> = all
        .tiers
        .iter()
        .filter(|t| t.kpis.cases > 0)
        .map(|t| {
            let k = &t.kpis;
            let stale = k.escalated_by_reason["stale"] as i64;
            (t.tier.clone(), k.cases as i64, k.escalated as i64, stale)
        })
        .collect();
    expected.sort();
    assert_eq!(by_tier, expected);
}

/// Takes the store of database `url` back to schema version 3 as the
/// release before left it: migration 4 undone, the KPI facts in sled's
/// buckets and unresolved index (the layout version 3 kept), the index
/// version 7.
fn back_to_version_3(url: &str, facts: &[(Vec<u8>, Vec<u8>)]) {
    let mut c = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
    let added: Vec<String> = include_str!("../../migrations/postgres/0004_case_kpis.sql")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ADD COLUMN "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|c| format!("DROP COLUMN {c}"))
        .collect();
    let added = added
        .iter()
        .filter(|c| *c != "DROP COLUMN claimed_by")
        .cloned()
        .collect::<Vec<_>>();
    c.batch_execute(&format!(
        "DROP VIEW escalator.case_stints; \
         ALTER TABLE escalator.facts DROP CONSTRAINT facts_per_case; \
         DROP INDEX escalator.facts_opened_at, escalator.facts_unresolved; \
         DELETE FROM escalator.facts; \
         ALTER TABLE escalator.facts {}; \
         ALTER TABLE escalator.outbox DROP COLUMN claimed_by; \
         DELETE FROM escalator.migrations WHERE version = 4; \
         UPDATE escalator.meta SET value = '\x37' WHERE key = 'indexes'",
        added.join(", ")
    ))
    .unwrap();
    for (k, v) in facts {
        c.execute(
            "INSERT INTO escalator.facts (key, value) VALUES ($1, $2)",
            &[k, v],
        )
        .unwrap();
    }
}

#[test]
fn a_version_3_store_has_its_facts_turned_into_rows_when_a_node_opens_it_alone() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database("conv");
    let tiers = vec!["T1".to_string(), "T2".to_string()];
    let queues = vec!["default".to_string()];
    let order = order_of(&tiers, &queues);
    let before = {
        let store = pg_store(&pg, "conv", &dir.path().join("pg"));
        write_varied_cases(&store, 150);
        ok(store.report(None, None, t(9, 0), &order))
    };
    let sled = ok(Store::open(&dir.path().join("sled")));
    write_varied_cases(&sled, 150);
    let mut old: Vec<(Vec<u8>, Vec<u8>)> = sled
        .db
        .range(Tree::Facts, &[], None)
        .collect::<Result<_>>()
        .unwrap();
    assert!(old.iter().any(|(k, _)| k[0] == b'b') && old.iter().any(|(k, _)| k[0] == b'u'));
    // One bucket damaged: its cases' facts are made again from history.
    let damaged = old.iter_mut().find(|(k, _)| k[0] == b'b').unwrap();
    damaged.1.truncate(damaged.1.len() / 2);
    // And an unreadable one-case record (the layout before buckets) of
    // the same bucket: marked once, in the same batch.
    let bucket = codec::read_u64(&damaged.0[1..9]).unwrap();
    let mut one = b"c".to_vec();
    one.extend_from_slice(&0u64.to_be_bytes());
    one.extend_from_slice(&(bucket * 64 + 5).to_be_bytes());
    old.push((one, b"\x01garbage".to_vec()));
    back_to_version_3(&url, &old);
    // A node of the release before runs on it: not upgraded beside it.
    let mut running = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    super::tests::hold_daemon_lock_shared(&mut running);
    let Err(e) = Store::open_postgres(&url, PgTls::Plain, 2, &dir.path().join("pg")) else {
        panic!("upgraded beside a running node of the release before")
    };
    assert!(e.to_string().contains("stop every daemon"), "{e}");
    running
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    // Alone: converted, the same figures to the digit.
    let store = pg_store(&pg, "conv", &dir.path().join("pg"));
    assert_eq!(ok(store.report(None, None, t(9, 0), &order)), before);
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let count =
        |c: &mut ::postgres::Client, sql: &str| -> i64 { c.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(count(&mut c, "SELECT count(*) FROM escalator.facts"), 150);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM escalator.facts WHERE case_id IS NULL"
        ),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM escalator.meta WHERE name LIKE 'facts-lost/%'"
        ),
        0
    );
    // A node of the release before started now finds index version 8,
    // rebuilds, and its first facts bucket is refused: it stops at start.
    assert_eq!(
        ok(store.db.get(Tree::Meta, b"indexes")).as_deref(),
        Some(&b"8"[..])
    );
    let err = c
        .execute(
            "INSERT INTO escalator.facts (key, value) VALUES ('\\x6200'::bytea, '\\x00'::bytea)",
            &[],
        )
        .expect_err("a bucket is refused");
    assert!(format!("{err:?}").contains("facts_per_case"), "{err:?}");
}
