//! A commit's writes as one statement: for each key space written, its
//! removals, its upserts and its inserts (with the typed columns of
//! [`super::super::columns`]) as data-modifying parts of one `WITH`, so a
//! commit is one round trip whatever it touched. Each key comes once (the
//! transaction's overlay, or the upgrade's batch, holds it once), so no
//! row is changed twice in the statement.
//!
//! Inserts are the rows the transaction found missing: no lock held
//! them, so another node may have written one since. They are written
//! only where still missing, and the statement says how many were: fewer
//! than asked is a conflict, and the commit is rolled back.

use std::collections::{BTreeMap, HashSet};

use ::postgres::types::ToSql;
use ::postgres::Client;

use super::super::codec::{Tree, TREES};
use super::super::columns;
use super::super::write::Op;
use super::{prepared, Tables};

/// Rows to write into one table.
#[derive(Default)]
struct Rows {
    keys: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
    /// One array per typed column.
    cells: Vec<Vec<Option<String>>>,
}

impl Rows {
    fn push(&mut self, t: Tree, key: &[u8], value: &[u8]) {
        let cells = columns::project(t, key, value);
        self.cells.resize_with(cells.len(), Vec::new);
        for (col, cell) in self.cells.iter_mut().zip(cells) {
            col.push(cell);
        }
        self.keys.push(key.to_vec());
        self.values.push(value.to_vec());
    }
}

/// The rows one key space gets.
#[derive(Default)]
struct TreeWrites {
    upserts: Rows,
    inserts: Rows,
    removed: Vec<Vec<u8>>,
}

/// A commit's writes by key space.
#[derive(Default)]
pub(in crate::store) struct Writes(BTreeMap<Tree, TreeWrites>);

impl Writes {
    /// The writes of `ops`; those of keys in `absent` are inserts.
    pub(in crate::store) fn of(ops: &[Op], absent: &HashSet<(Tree, Vec<u8>)>) -> Writes {
        let mut w = Writes::default();
        for (t, k, v) in ops {
            let insert = v.is_some() && absent.contains(&(*t, k.clone()));
            w.add(*t, k, v.as_deref(), insert);
        }
        w
    }

    /// Adds a put (Some) or a removal (None); a put with `insert` only
    /// writes a row still missing.
    pub(in crate::store) fn add(
        &mut self,
        t: Tree,
        key: &[u8],
        value: Option<&[u8]>,
        insert: bool,
    ) {
        let tw = self.0.entry(t).or_default();
        match value {
            Some(v) if insert => tw.inserts.push(t, key, v),
            Some(v) => tw.upserts.push(t, key, v),
            None => tw.removed.push(key.to_vec()),
        }
    }

    pub(in crate::store) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs the statement (nothing when there is nothing to write).
    /// `Ok(Err(what))`: an insert found its row written by another node
    /// (the caller rolls back).
    pub(in crate::store) fn write(
        &self,
        c: &mut Client,
        tables: &Tables,
    ) -> Result<Result<(), String>, postgres::Error> {
        if self.is_empty() {
            return Ok(Ok(()));
        }
        let mut parts = Vec::new();
        let mut inserted = Vec::new();
        let mut expected = 0i64;
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (t, w) in &self.0 {
            let table = tables.of(*t);
            if !w.removed.is_empty() {
                params.push(&w.removed);
                parts.push(format!(
                    "w{} AS (DELETE FROM {table} WHERE key = ANY(${}::bytea[]))",
                    parts.len(),
                    params.len()
                ));
            }
            for (rows, insert) in [(&w.upserts, false), (&w.inserts, true)] {
                if rows.keys.is_empty() {
                    continue;
                }
                let name = format!("w{}", parts.len());
                let (select, names, set) = insert_select(*t, rows, &mut params);
                let on_conflict = match insert {
                    true => {
                        expected += rows.keys.len() as i64;
                        inserted.push(format!("(SELECT count(*) FROM {name})"));
                        "DO NOTHING RETURNING 1".to_string()
                    }
                    false => format!("DO UPDATE SET {set}"),
                };
                parts.push(format!(
                    "{name} AS (INSERT INTO {table} ({names}) {select} \
                     ON CONFLICT (key) {on_conflict})"
                ));
            }
        }
        let count = match inserted.is_empty() {
            true => "0::bigint".to_string(),
            false => inserted.join(" + "),
        };
        let sql = format!("WITH {} SELECT {count}", parts.join(", "));
        let st = prepared(c, &sql)?;
        let written: i64 = c.query_one(&st, &params)?.get(0);
        if written < expected {
            let trees: Vec<&str> = self
                .0
                .iter()
                .filter(|(_, w)| !w.inserts.keys.is_empty())
                .map(|(t, _)| TREES[t.index()].1)
                .collect();
            return Ok(Err(format!("a record of {}", trees.join(", "))));
        }
        Ok(Ok(()))
    }
}

/// `SELECT ... FROM unnest(...)` of `rows` with each typed column cast
/// to its type, the column list, and the `SET` of an upsert; pushes the
/// arrays onto `params`.
fn insert_select<'r>(
    t: Tree,
    rows: &'r Rows,
    params: &mut Vec<&'r (dyn ToSql + Sync)>,
) -> (String, String, String) {
    let cols = columns::of(t);
    params.push(&rows.keys);
    let first = params.len();
    params.push(&rows.values);
    let mut arrays = format!("${first}::bytea[], ${}::bytea[]", first + 1);
    let mut names = String::from("key, value");
    let mut select = String::from("k, v");
    let mut set = String::from("value = EXCLUDED.value");
    for (i, ((name, ty), cells)) in cols.iter().zip(&rows.cells).enumerate() {
        params.push(cells);
        arrays.push_str(&format!(", ${}::text[]", params.len()));
        names.push_str(&format!(", \"{name}\""));
        select.push_str(&format!(", x{i}::{ty}"));
        set.push_str(&format!(", \"{name}\" = EXCLUDED.\"{name}\""));
    }
    let aliases: String = (0..cols.len()).map(|i| format!(", x{i}")).collect();
    (
        format!("SELECT {select} FROM unnest({arrays}) AS u(k, v{aliases})"),
        names,
        set,
    )
}
