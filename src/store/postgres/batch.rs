//! Reads that serve many lookups in one round trip: numbers taken from
//! a sequence a block at a time, keys read together, ranges read
//! together (see [`super::super::read_ahead`]). A round trip from a
//! node to PostgreSQL, not the work each does, was most of ingest's
//! time (bench figure 8).

use std::cell::Cell;

use super::super::engine::{KeyRange, Row};
use super::{prepared, PgDb, StoreError, Tree, IN_TX};

/// Numbers a process takes from a sequence at once (see
/// [`PgDb::next_id`]).
const ID_BLOCK: i64 = 64;

impl PgDb {
    /// The next number of a sequence (see `0003_tables.sql`): taken at
    /// once, never handed out again, whether this transaction commits
    /// or not. Numbers are taken [`ID_BLOCK`] at a time and handed out
    /// by this process in order: a round trip per case, message and
    /// outbox mail was a third of ingest's. Case numbers came in blocks
    /// of 64 before (the sequence's `CACHE 64` per connection), so they
    /// look as they did; other nodes' blocks interleave, as case numbers
    /// did. Numbers a process did not use before it stopped are gaps.
    pub(in crate::store) fn next_id(&self, s: crate::store::Sequence) -> Result<u64, StoreError> {
        let slot = s as usize;
        let mut pools = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pools[slot].pop_front() {
            return Ok(n);
        }
        // Quarantined messages are rare and named on the command line:
        // one at a time, without gaps.
        let block: i64 = if s == crate::store::Sequence::Quarantine {
            1
        } else {
            ID_BLOCK
        };
        let sql = format!(
            "SELECT nextval('{}.{}') FROM generate_series(1, $1::bigint)",
            self.tables,
            s.key()
        );
        let taken = self.call(move |c| {
            let st = prepared(c, &sql)?;
            Ok(c.query(&st, &[&block])?
                .iter()
                .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0))
                .collect::<Vec<u64>>())
        })?;
        pools[slot].extend(taken);
        pools[slot]
            .pop_front()
            .ok_or_else(|| StoreError::Engine("a sequence handed out no number".into()))
    }

    /// Keys' values read at once (locked, as [`PgDb::get_for_update`]
    /// would, in key order so two nodes lock in the same order): the
    /// keys found, with their values.
    pub(in crate::store) fn get_many(
        &self,
        t: Tree,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Row>, StoreError> {
        let lock = if t.changes_in_place() && IN_TX.with(Cell::get) {
            " FOR UPDATE"
        } else {
            ""
        };
        let sql = format!(
            "SELECT key, value FROM {} WHERE key = ANY($1) ORDER BY key{lock}",
            self.tables.of(t)
        );
        self.call(move |c| {
            let st = prepared(c, &sql)?;
            Ok(c.query(&st, &[&keys])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    /// The first `limit` rows of each range (from its start, inclusive,
    /// to its end, exclusive; None: to the table's end), in one round
    /// trip: for each range (by position), its rows in key order.
    pub(in crate::store) fn ranges(
        &self,
        t: Tree,
        ranges: Vec<KeyRange>,
        limit: usize,
    ) -> Result<Vec<Vec<Row>>, StoreError> {
        let mut out = vec![Vec::new(); ranges.len()];
        // Both bounds must be plain comparisons for the index to bound
        // each scan (`hi IS NULL OR key < hi` scanned on to the table's
        // end, measured 50 ms a chunk). A range with no end (a prefix
        // of 0xFF bytes only, which UTF-8 text never is) is read on its
        // own.
        let (bounded, open): (Vec<_>, Vec<_>) = ranges
            .into_iter()
            .enumerate()
            .partition(|(_, (_, hi))| hi.is_some());
        for (i, (lo, _)) in open {
            out[i] = self
                .range(t, &lo, None)
                .take(limit)
                .collect::<Result<_, _>>()?;
        }
        if bounded.is_empty() {
            return Ok(out);
        }
        let (at, bounds): (Vec<usize>, Vec<Row>) = bounded
            .into_iter()
            .map(|(i, (lo, hi))| (i, (lo, hi.unwrap_or_default())))
            .unzip();
        let (starts, ends): (Vec<Vec<u8>>, Vec<Vec<u8>>) = bounds.into_iter().unzip();
        let sql = format!(
            "SELECT p.i, r.key, r.value \
             FROM unnest($1::bytea[], $2::bytea[]) WITH ORDINALITY AS p(lo, hi, i) \
             CROSS JOIN LATERAL (SELECT key, value FROM {} \
               WHERE key >= p.lo AND key < p.hi ORDER BY key LIMIT $3) AS r",
            self.tables.of(t)
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.call(move |c| {
            let st = prepared(c, &sql)?;
            Ok(c.query(&st, &[&starts, &ends, &limit])?
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get(1), r.get(2)))
                .collect::<Vec<(i64, Vec<u8>, Vec<u8>)>>())
        })?;
        for (i, k, v) in rows {
            // WITH ORDINALITY counts from 1.
            let slot = usize::try_from(i - 1)
                .ok()
                .and_then(|i| at.get(i))
                .and_then(|i| out.get_mut(*i))
                .ok_or_else(|| StoreError::Engine("a range read names no range".into()))?;
            slot.push((k, v));
        }
        Ok(out)
    }
}
