//! A commit's writes as one statement: for each key space written, its
//! removals and its upserts (with the typed columns of
//! [`super::super::columns`]) as data-modifying parts of one `WITH`, so a
//! commit is one round trip whatever it touched. Each key comes once (the
//! transaction's overlay, or the upgrade's batch, holds it once), so no
//! row is changed twice in the statement.

use std::collections::BTreeMap;

use ::postgres::types::ToSql;
use ::postgres::Client;

use super::super::codec::Tree;
use super::super::columns;
use super::super::write::Op;
use super::{prepared, Tables};

/// The rows one key space gets.
#[derive(Default)]
struct TreeWrites {
    put_keys: Vec<Vec<u8>>,
    put_values: Vec<Vec<u8>>,
    /// One array per typed column.
    cells: Vec<Vec<Option<String>>>,
    removed: Vec<Vec<u8>>,
}

/// A commit's writes by key space.
#[derive(Default)]
pub(in crate::store) struct Writes(BTreeMap<Tree, TreeWrites>);

impl Writes {
    pub(in crate::store) fn of(ops: &[Op]) -> Writes {
        let mut w = Writes::default();
        for (t, k, v) in ops {
            w.add(*t, k, v.as_deref());
        }
        w
    }

    /// Adds a put (Some) or a removal (None).
    pub(in crate::store) fn add(&mut self, t: Tree, key: &[u8], value: Option<&[u8]>) {
        let tw = self.0.entry(t).or_default();
        match value {
            Some(v) => {
                let cells = columns::project(t, key, v);
                tw.cells.resize_with(cells.len(), Vec::new);
                for (col, cell) in tw.cells.iter_mut().zip(cells) {
                    col.push(cell);
                }
                tw.put_keys.push(key.to_vec());
                tw.put_values.push(v.to_vec());
            }
            None => tw.removed.push(key.to_vec()),
        }
    }

    pub(in crate::store) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs the statement (nothing when there is nothing to write).
    pub(in crate::store) fn write(
        &self,
        c: &mut Client,
        tables: &Tables,
    ) -> Result<(), postgres::Error> {
        if self.is_empty() {
            return Ok(());
        }
        let mut parts = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (t, w) in &self.0 {
            let table = tables.of(*t);
            if !w.removed.is_empty() {
                params.push(&w.removed);
                parts.push(format!(
                    "d{} AS (DELETE FROM {table} WHERE key = ANY(${}::bytea[]))",
                    parts.len(),
                    params.len()
                ));
            }
            if !w.put_keys.is_empty() {
                let cols = columns::of(*t);
                params.push(&w.put_keys);
                let first = params.len();
                params.push(&w.put_values);
                let mut arrays = format!("${first}::bytea[], ${}::bytea[]", first + 1);
                let mut names = String::from("key, value");
                let mut select = String::from("k, v");
                let mut set = String::from("value = EXCLUDED.value");
                for (i, ((name, ty), cells)) in cols.iter().zip(&w.cells).enumerate() {
                    params.push(cells);
                    arrays.push_str(&format!(", ${}::text[]", params.len()));
                    names.push_str(&format!(", \"{name}\""));
                    select.push_str(&format!(", x{i}::{ty}"));
                    set.push_str(&format!(", \"{name}\" = EXCLUDED.\"{name}\""));
                }
                let aliases: String = (0..cols.len()).map(|i| format!(", x{i}")).collect();
                parts.push(format!(
                    "p{} AS (INSERT INTO {table} ({names}) SELECT {select} \
                     FROM unnest({arrays}) AS u(k, v{aliases}) \
                     ON CONFLICT (key) DO UPDATE SET {set})",
                    parts.len()
                ));
            }
        }
        let sql = format!("WITH {} SELECT 1", parts.join(", "));
        let st = prepared(c, &sql)?;
        c.execute(&st, &params)?;
        Ok(())
    }
}
