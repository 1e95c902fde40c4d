//! Issue 22: a PostgreSQL store of the release before the tables (one
//! table `escalator_kv`, tests/fixtures/postgres-kv-0e742f5) is converted
//! in place when a node opens it: the same store, read through the new
//! tables, also when the conversion is cut short and started again.

use super::tests::ok;
use super::*;

const DUMP: &str = include_str!("../../tests/fixtures/postgres-kv-0e742f5/dump.sql");
const DIGESTS: &str = include_str!("../../tests/fixtures/postgres-kv-0e742f5/digests.txt");

/// A database holding the old release's store.
fn old_store(pg: &crate::testing::Postgres, name: &str) -> (String, ::postgres::Client) {
    let url = pg.database(name);
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    c.batch_execute(DUMP).unwrap();
    // The dump leaves its session without a search path.
    let c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    (url, c)
}

fn open(url: &str, dir: &Path) -> Result<Store> {
    Store::open_postgres(url, PgTls::Plain, 2, dir)
}

/// The digest of every key space but the facts, which the conversion
/// turns from buckets into one row per case: those are checked to be
/// each case's, counted in SQL to what the tally counts.
fn digests(s: &Store) -> String {
    let facts = ok(s.facts_since(None));
    let cases: Vec<Case> = s.cases().map(ok).collect();
    assert_eq!(facts.len(), cases.len());
    for (f, c) in facts.iter().zip(&cases) {
        assert_eq!((f.id, &f.tier, f.status), (c.id, &c.tier, c.status));
    }
    let order = crate::stats::Order {
        tiers: &[],
        queues: &[],
    };
    let now = Utc::now();
    assert_eq!(
        ok(s.report(None, None, now, &order)),
        ok(s.tally(None, None, now)).finish(&order, None)
    );
    without_facts(
        &ok(s.tree_digests(&[]))
            .into_iter()
            .map(|(name, n, d)| format!("{name} {n} {d}\n"))
            .collect::<String>(),
    )
}

/// The digests but the facts' and the meta's hash: the meta holds the
/// index version, which is 8 on the tables (their facts one row per
/// case) where the old release had 7; its records are still counted.
fn without_facts(digests: &str) -> String {
    digests
        .lines()
        .filter(|l| !l.starts_with("facts "))
        .map(|l| match l.strip_prefix("meta ") {
            Some(rest) => format!("meta {}\n", rest.split(' ').next().unwrap_or("")),
            None => format!("{l}\n"),
        })
        .collect()
}

fn exists(c: &mut ::postgres::Client, relation: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&relation])
        .unwrap()
        .get(0)
}

#[test]
fn an_escalator_kv_store_is_converted_in_place_into_tables_that_read_the_same() {
    let pg = crate::testing::Postgres::start();
    let (url, mut c) = old_store(&pg, "upgrade");
    let dir = tempfile::tempdir().unwrap();
    let store = open(&url, dir.path()).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
    // Every key space holds what the old release held, key by key.
    assert_eq!(digests(&store), without_facts(DIGESTS));
    for gone in [
        "escalator_kv",
        "escalator_kv_upgrading",
        "escalator_leases",
        "escalator_nodes",
        "escalator.upgrade_progress",
    ] {
        assert!(!exists(&mut c, gone), "{gone} is dropped at the end");
    }
    // The records' fields are columns a person queries.
    let rows = c
        .query(
            "SELECT id, queue, customer, subject, status, tier, escalations \
             FROM escalator.cases ORDER BY id",
            &[],
        )
        .unwrap();
    let cases: Vec<(i64, String, String, String, String, String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect();
    assert_eq!(cases.len(), 5, "{cases:?}");
    assert_eq!(
        cases[0],
        (
            1,
            "default".into(),
            "alice@example.org".into(),
            "Printer on fire".into(),
            "open".into(),
            "Specialists".into(),
            1
        )
    );
    assert_eq!(
        cases[1].3, "Rechnung für November",
        "decoded, not MIME words"
    );
    assert_eq!(cases[2].3, "<script>alert(1)</script>");
    assert_eq!(cases[2].4, "answered");
    for case in &cases {
        let from_store = ok(store.case(case.0 as u64)).unwrap();
        assert_eq!(
            (from_store.subject.as_str(), from_store.tier.as_str()),
            (case.3.as_str(), case.5.as_str())
        );
    }
    // One row per event, the escalations with their reason.
    let escalations: Vec<(i64, String)> = c
        .query(
            "SELECT case_id, reason FROM escalator.case_events \
             WHERE kind = 'escalated' ORDER BY case_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        escalations,
        vec![
            (1, "stale".into()),
            (2, "stale".into()),
            (5, "stale".into())
        ]
    );
    let events: i64 = c
        .query_one("SELECT count(*) FROM escalator.case_events", &[])
        .unwrap()
        .get(0);
    let history: u64 = store.cases().map(|c| ok(c).event_count).sum();
    assert_eq!(events as u64, history);
    // The grant without its sealed tokens; the quarantined message.
    let grant = c
        .query_one(
            "SELECT identity, valid, account FROM escalator.oauth_grants",
            &[],
        )
        .unwrap();
    assert_eq!(grant.get::<_, String>(0), "m365");
    assert!(grant.get::<_, bool>(1));
    let columns: Vec<String> = c
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = 'escalator' AND table_name = 'oauth_grants'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!columns
        .iter()
        .any(|c| c.contains("seal") || c.contains("token")));
    let q: (String, i64) = c
        .query_one(
            "SELECT error, attempts FROM escalator.quarantine WHERE part = 'entry'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(q, ("the rules panicked: test".into(), 3));
    // The store goes on: numbering continues after the old store's.
    let next = ok(store.transact(|tx| tx.next_id(Sequence::Case)));
    assert_eq!(next, 6);
    drop(store);
    // Opened again: nothing more to convert, the same store.
    let store = ok(open(&url, dir.path()));
    assert_eq!(ok(store.counts()), (5, 7));
}

#[test]
fn a_conversion_cut_short_goes_on_where_it_stopped_and_an_old_release_cannot_write_meanwhile() {
    let pg = crate::testing::Postgres::start();
    let (url, mut c) = old_store(&pg, "upgrade_cut");
    // The tables made first, then the conversion fails at the history
    // (as a lost connection or a full disk would).
    let tables = postgres::Tables::new(DEFAULT_SCHEMA).unwrap();
    c.batch_execute(
        &include_str!("../../migrations/postgres/0003_tables.sql")
            .replace("{schema}", &tables.to_string()),
    )
    .unwrap();
    c.batch_execute(
        "CREATE TABLE escalator.migrations (version integer PRIMARY KEY, \
         applied_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO escalator.migrations (version) VALUES (3); \
         CREATE FUNCTION cut() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'cut short' USING ERRCODE = '53100'; END $$; \
         CREATE TRIGGER cut BEFORE INSERT ON escalator.history \
         FOR EACH ROW EXECUTE FUNCTION cut();",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let Err(e) = open(&url, dir.path()) else {
        panic!("the conversion should have failed")
    };
    assert!(crate::error_chain(&e).contains("cut short"), "{e}");
    // Half done: the old table is out of an older release's reach, the
    // key spaces before the history are copied, and recorded so.
    assert!(!exists(&mut c, "escalator_kv"));
    assert!(exists(&mut c, "escalator_kv_upgrading"));
    let done: i64 = c
        .query_one("SELECT count(*) FROM escalator.upgrade_progress", &[])
        .unwrap()
        .get(0);
    assert!(done >= 10, "{done} key spaces recorded");
    let cases: i64 = c
        .query_one("SELECT count(*) FROM escalator.cases", &[])
        .unwrap()
        .get(0);
    assert_eq!(cases, 5);
    // Started again: it goes on, and the store is whole.
    c.batch_execute("DROP TRIGGER cut ON escalator.history")
        .unwrap();
    let store = open(&url, dir.path()).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
    assert_eq!(digests(&store), without_facts(DIGESTS));
    assert!(!exists(&mut c, "escalator_kv_upgrading"));
}

#[test]
fn an_old_store_is_not_converted_while_another_daemon_runs_on_it() {
    let pg = crate::testing::Postgres::start();
    let (url, mut c) = old_store(&pg, "upgrade_busy");
    // An older release's daemon holds the daemon lock shared.
    super::tests::hold_daemon_lock_shared(&mut c);
    let dir = tempfile::tempdir().unwrap();
    let Err(e) = open(&url, dir.path()) else {
        panic!("converted beside a running daemon")
    };
    assert!(
        e.to_string().contains("stop every daemon"),
        "{}",
        crate::error_chain(&e)
    );
    assert!(exists(&mut c, "escalator_kv"), "nothing was touched");
    // Once it has stopped, the conversion runs.
    drop(c);
    let store = ok(open(&url, dir.path()));
    assert_eq!(digests(&store), without_facts(DIGESTS));
}
