//! Brings a database up to the store's schema when a node opens it: the
//! versioned migrations ([`super::MIGRATIONS`]), and the conversion of an
//! older release's store, all its key spaces in the one table
//! `escalator_kv`, into the tables of today's.
//!
//! The conversion runs once, while no other daemon runs on the database
//! (an older release's daemons hold the daemon lock shared: it refuses to
//! start beside them). It first renames the old table, so an older
//! release started meanwhile finds no store and stops instead of writing
//! where nobody reads. It copies key space by key space in batches, each
//! committed with its progress (`upgrade_progress`), so a conversion cut
//! short goes on from where it stopped; nothing but this conversion
//! writes the new tables until it has finished, because every node opens
//! the store through here under the migration lock. The old tables are
//! dropped only at the end, in the same transaction that moves the
//! cluster's leases over.
//!
//! The KPI facts are written one row per case whichever layout they come
//! from (version 4): converted from `escalator_kv`, or from the buckets a
//! store of version 3 keeps in its facts table.

use ::postgres::Client;

use super::super::codec::{read_u64, Tree, TREES};
use super::super::facts::{per_case_rows, BUCKET, LOST_FACTS};
use super::super::migrate::fits;
use super::super::Sequence;
use super::super::StoreError;
use super::rows::Writes;
use super::{LockMode, Tables, DAEMON_LOCK, MIGRATE_LOCK, MIGRATIONS};

/// What the old table is called while it is converted.
const CONVERTING: &str = "escalator_kv_upgrading";
/// Rows looked at per batch (fewer when their values are large).
const BATCH: i64 = 500;

type Outcome = Result<Result<(), StoreError>, postgres::Error>;

/// Applies the migrations not yet applied and converts an older store,
/// under an advisory lock so two nodes starting at once do not both do
/// it (the second waits, then finds it done).
pub(super) fn bring_up_to_date(c: &mut Client, t: &Tables) -> Outcome {
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])?;
    let result = migrate_and_convert(c, t);
    c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])?;
    result
}

fn migrate_and_convert(c: &mut Client, t: &Tables) -> Outcome {
    // Made only when missing: a role given a schema made for it by an
    // admin need not be allowed to make schemas.
    let exists: bool = c
        .query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&t.to_string()])?
        .get(0);
    if !exists {
        c.batch_execute(&format!("CREATE SCHEMA {t}"))?;
    }
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {t}.migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )"
    ))?;
    // A store of version 3 is brought to 4 (and its facts converted)
    // only while no other daemon runs: a node of the release before
    // cannot write a case once version 4 is applied.
    let applied: Vec<i32> = c
        .query(&format!("SELECT version FROM {t}.migrations"), &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let alone = applied.contains(&3) && !applied.contains(&4);
    if alone {
        let got: bool = c
            .query_one(LockMode::Exclusive.sql(), &[&DAEMON_LOCK])?
            .get(0);
        if !got {
            return Ok(Err(StoreError::Migrate(
                "this database holds the store of the release before (schema version 3), \
                 which is upgraded when no other daemon runs on it: stop every daemon of the \
                 cluster (all releases), then start this one alone"
                    .into(),
            )));
        }
    }
    let result = apply_and_convert(c, t, &applied);
    if alone {
        c.execute("SELECT pg_advisory_unlock($1)", &[&DAEMON_LOCK])?;
    }
    result
}

fn apply_and_convert(c: &mut Client, t: &Tables, applied: &[i32]) -> Outcome {
    for (version, sql) in MIGRATIONS {
        if !applied.contains(&version) {
            let mut tx = c.transaction()?;
            tx.batch_execute(&sql.replace("{schema}", &t.to_string()))?;
            tx.execute(
                &format!("INSERT INTO {t}.migrations (version) VALUES ($1)"),
                &[&version],
            )?;
            tx.commit()?;
        }
    }
    let old: Option<String> = c
        .query_one(
            "SELECT coalesce(to_regclass($1)::text, to_regclass('escalator_kv')::text)",
            &[&CONVERTING],
        )?
        .get(0);
    if let Some(old) = old {
        if let Err(e) = convert(c, t, &old)? {
            return Ok(Err(e));
        }
        // An older release started on this database finds its own
        // bookkeeping (kept, with this version added) saying its
        // migrations are applied, so it finds no table and stops rather
        // than make an empty store and read every mailbox again.
        c.execute(
            "INSERT INTO escalator_migrations (version) VALUES (3) ON CONFLICT DO NOTHING",
            &[],
        )?;
    }
    facts_per_case(c, t)?;
    sync_sequences(c, t)?;
    Ok(Ok(()))
}

/// Writes the per-case facts rows of facts records of any earlier
/// layout, each key once (a damaged store might give one case twice). A
/// record that cannot be read does not stop the upgrade: it is marked
/// (`facts-lost/` ++ bucket number), and the node that opens the store
/// makes its cases' facts again from their history
/// (`Store::rebuild_lost_facts`), the cases and their history being
/// what the facts summarise.
fn facts_writes(records: &[(Vec<u8>, Vec<u8>)], writes: &mut Writes) {
    let mut rows = std::collections::BTreeMap::new();
    let mut marks = std::collections::BTreeSet::new();
    for (key, value) in records {
        match per_case_rows(key, value) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                tracing::error!(error = %e, "a KPI facts record could not be read; its cases' facts are made again from their history");
                let id = match key.first() {
                    Some(b'c') => key.get(9..17).and_then(read_u64),
                    _ => key
                        .get(1..9)
                        .and_then(read_u64)
                        .map(|b| b.saturating_mul(BUCKET)),
                };
                if let Some(id) = id {
                    let mut mark = LOST_FACTS.to_vec();
                    mark.extend_from_slice(&(id / BUCKET).to_be_bytes());
                    marks.insert(mark);
                }
            }
        }
    }
    // Each key once: a statement may not upsert a row twice.
    for (k, v) in &rows {
        writes.add(Tree::Facts, k, Some(v), false);
    }
    for mark in &marks {
        writes.add(Tree::Meta, mark, Some(&[]), false);
    }
}

/// Version 4: the facts of a store of version 3 (in buckets of 64 cases,
/// with an index of the unresolved ones) become one row per case, a
/// batch a transaction. Resumable: each batch removes what it converted.
/// Runs under the migration lock before the node serves, so no node of
/// this release reads the facts of a case not yet converted.
fn facts_per_case(c: &mut Client, t: &Tables) -> Result<(), postgres::Error> {
    let facts = t.of(Tree::Facts);
    // Every key but `k ++ id` (k is 0x6b), as two ranges of the primary
    // key: run at every open, it must not scan a million rows to find
    // nothing.
    let old = format!(
        "(SELECT key, value FROM {facts} WHERE key < '\\x6b'::bytea ORDER BY key LIMIT 200) \
         UNION ALL \
         (SELECT key, value FROM {facts} WHERE key >= '\\x6c'::bytea ORDER BY key LIMIT 200)"
    );
    let mut converted = 0u64;
    loop {
        let rows = c.query(&old, &[])?;
        if rows.is_empty() {
            if converted > 0 {
                tracing::info!(
                    records = converted,
                    "the KPI facts are one row per case now"
                );
            }
            return Ok(());
        }
        let mut writes = Writes::default();
        let records: Vec<(Vec<u8>, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (k, _) in &records {
            writes.add(Tree::Facts, k, None, false);
        }
        facts_writes(&records, &mut writes);
        c.batch_execute("BEGIN")?;
        let committed = writes.write(c, t).and_then(|_| c.batch_execute("COMMIT"));
        if committed.is_err() {
            let _ = c.batch_execute("ROLLBACK");
        }
        committed?;
        converted += rows.len() as u64;
        tracing::info!(
            records = converted,
            "turning the KPI facts into one row per case"
        );
    }
}

/// Converts the old table `old` (the name it has now) into the tables.
fn convert(c: &mut Client, t: &Tables, old: &str) -> Outcome {
    let alone: bool = c
        .query_one(LockMode::Exclusive.sql(), &[&DAEMON_LOCK])?
        .get(0);
    if !alone {
        return Ok(Err(StoreError::Migrate(
            "this database holds an older release's store (the table escalator_kv), which is \
             converted to today's tables when no other daemon runs on it: stop every daemon \
             of the cluster (all releases), then start this one alone"
                .into(),
        )));
    }
    let result = convert_alone(c, t, old);
    c.execute("SELECT pg_advisory_unlock($1)", &[&DAEMON_LOCK])?;
    result.map(Ok)
}

fn convert_alone(c: &mut Client, t: &Tables, old: &str) -> Result<(), postgres::Error> {
    if old != CONVERTING {
        tracing::info!("converting the PostgreSQL store of an older release into tables");
        c.batch_execute(&format!(
            "ALTER TABLE {old} RENAME TO {CONVERTING};
             CREATE TABLE IF NOT EXISTS {t}.upgrade_progress (
                 tree     smallint PRIMARY KEY,
                 last_key bytea    NOT NULL,
                 rows     bigint   NOT NULL
             )"
        ))?;
    } else {
        tracing::info!("going on with the conversion of an older release's store");
    }
    for (tree, name) in TREES {
        copy_key_space(c, t, tree, name)?;
    }
    let mut tx = c.transaction()?;
    let old_cluster = tx
        .query_one("SELECT to_regclass('escalator_leases') IS NOT NULL", &[])?
        .get::<_, bool>(0);
    if old_cluster {
        // Fencing tokens go on growing: a token of before the upgrade is
        // never handed out again.
        tx.batch_execute(&format!(
            "INSERT INTO {t}.leases SELECT * FROM escalator_leases ON CONFLICT DO NOTHING;
             SELECT setval('{t}.lease_tokens', greatest(
                 (SELECT last_value FROM escalator_lease_tokens),
                 (SELECT coalesce(max(token), 1) FROM {t}.leases)));
             DROP TABLE escalator_leases, escalator_nodes;
             DROP SEQUENCE escalator_lease_tokens;"
        ))?;
    }
    tx.batch_execute(&format!(
        "DROP TABLE {CONVERTING}; DROP TABLE {t}.upgrade_progress"
    ))?;
    tx.commit()?;
    tracing::info!("the PostgreSQL store is converted; the old table is dropped");
    Ok(())
}

/// Raises each sequence to the number the meta space counted to, where
/// that is higher (a store that counted there: converted, or copied from
/// sled). Never lowers one: a node's numbers are never handed out again.
/// It sets a sequence only when the meta space counted further, which
/// happens only to a store just converted or copied, before any node
/// handed out numbers from the sequence (under the migration lock at
/// open, or while `store migrate` keeps the daemons out); on a store
/// running on the tables nothing counts in the meta space, so it reads
/// and sets nothing while other nodes run.
pub(super) fn sync_sequences(c: &mut Client, t: &Tables) -> Result<(), postgres::Error> {
    for s in [
        Sequence::Case,
        Sequence::Message,
        Sequence::Outbox,
        Sequence::Quarantine,
    ] {
        let name = s.key();
        let counted = c
            .query_opt(
                &format!("SELECT value FROM {t}.meta WHERE key = $1"),
                &[&name.as_bytes()],
            )?
            .and_then(|r| read_u64(&r.get::<_, Vec<u8>>(0)))
            .and_then(|n| i64::try_from(n).ok());
        let Some(counted) = counted else { continue };
        let row = c.query_one(
            &format!("SELECT last_value, is_called FROM {t}.{name}"),
            &[],
        )?;
        let (last, called): (i64, bool) = (row.get(0), row.get(1));
        let next = if called { last + 1 } else { last };
        if next < counted {
            // Numbering goes on where the store left it (the admin sees
            // case 6 follow case 5); the nodes' blocks of 64 start there.
            c.execute(
                &format!("SELECT setval('{t}.{name}', $1, false)"),
                &[&counted],
            )?;
        }
    }
    Ok(())
}

/// Copies one key space from where its progress says, a batch a
/// transaction.
fn copy_key_space(
    c: &mut Client,
    t: &Tables,
    tree: Tree,
    name: &str,
) -> Result<(), postgres::Error> {
    let id = tree.index() as i16;
    let total: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {CONVERTING} WHERE tree = $1"),
            &[&id],
        )?
        .get(0);
    let progress = c.query_opt(
        &format!("SELECT last_key, rows FROM {t}.upgrade_progress WHERE tree = $1"),
        &[&id],
    )?;
    let (mut from, mut copied): (Vec<u8>, i64) = match progress {
        Some(r) => (r.get(0), r.get(1)),
        None => (Vec::new(), 0),
    };
    let mut first = progress_is_empty(copied, &from);
    loop {
        // Keys and sizes first: a batch holds as many rows as fit in
        // memory and in one statement, raw mail being megabytes each.
        let op = if first { ">=" } else { ">" };
        let sizes = c.query(
            &format!(
                "SELECT key, length(value) FROM {CONVERTING} WHERE tree = $1 AND key {op} $2 \
                 ORDER BY key LIMIT {BATCH}"
            ),
            &[&id, &from],
        )?;
        let Some(last) = last_fitting(&sizes) else {
            break;
        };
        let rows = c.query(
            &format!(
                "SELECT key, value FROM {CONVERTING} WHERE tree = $1 AND key {op} $2 \
                 AND key <= $3 ORDER BY key"
            ),
            &[&id, &from, &last],
        )?;
        let mut writes = Writes::default();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if tree == Tree::Facts {
            facts_writes(&rows, &mut writes);
        } else {
            for (k, v) in &rows {
                writes.add(tree, k, Some(v), false);
            }
        }
        copied += rows.len() as i64;
        c.batch_execute("BEGIN")?;
        let committed = (|| {
            // Upserts only (nothing else writes the tables meanwhile), so
            // no insert can find its row taken: nothing to report.
            let _no_inserts = writes.write(c, t)?;
            c.execute(
                &format!(
                    "INSERT INTO {t}.upgrade_progress (tree, last_key, rows) \
                     VALUES ($1, $2, $3) ON CONFLICT (tree) DO UPDATE \
                     SET last_key = EXCLUDED.last_key, rows = EXCLUDED.rows"
                ),
                &[&id, &last, &copied],
            )?;
            c.batch_execute("COMMIT")
        })();
        if committed.is_err() {
            let _ = c.batch_execute("ROLLBACK");
        }
        committed?;
        tracing::info!(key_space = name, copied, of = total, "converting the store");
        from = last;
        first = false;
    }
    Ok(())
}

/// Nothing of a key space copied yet: its first key may be empty, so the
/// first batch starts at (not after) the empty key.
fn progress_is_empty(copied: i64, from: &[u8]) -> bool {
    copied == 0 && from.is_empty()
}

/// The last key of the rows (key, length) that fit in one batch; None
/// when there are none.
fn last_fitting(rows: &[::postgres::Row]) -> Option<Vec<u8>> {
    let (mut n, mut bytes, mut last) = (0, 0usize, None);
    for r in rows {
        let (k, len): (Vec<u8>, i32) = (r.get(0), r.get(1));
        let len = k.len() + usize::try_from(len).unwrap_or(0);
        if !fits(n, bytes, len) {
            break;
        }
        n += 1;
        bytes += len;
        last = Some(k);
    }
    last
}
