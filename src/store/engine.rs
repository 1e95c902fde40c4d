//! The engines behind the store: sled (embedded, the default) and
//! PostgreSQL (shared by the nodes of a cluster). Both keep the same key
//! spaces with the same keys and values ([`super::codec`]); this enum is
//! the one place that tells them apart.

use super::codec::Tree;
use super::postgres::PgDb;
use super::sled::SledDb;
use super::write::{Fence, Op};
use super::StoreError;

type Result<T> = std::result::Result<T, StoreError>;
type Rows<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + 'a>;
/// A key and its value.
pub(super) type Row = (Vec<u8>, Vec<u8>);
/// A range of keys: from a start (inclusive) to an end (exclusive;
/// None: to the end).
pub(super) type KeyRange = (Vec<u8>, Option<Vec<u8>>);

pub(super) enum Db {
    Sled(SledDb),
    // Boxed: its connection settings are large, and one store has one.
    Postgres(Box<PgDb>),
}

impl Db {
    pub(super) fn get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            Db::Sled(d) => d.get(t, key),
            Db::Postgres(d) => d.get(t, key),
        }
    }

    pub(super) fn contains(&self, t: Tree, key: &[u8]) -> Result<bool> {
        match self {
            Db::Sled(d) => d.contains(t, key),
            Db::Postgres(d) => d.contains(t, key),
        }
    }

    /// Keys and values from `start` (inclusive) to `end` (exclusive; None:
    /// to the end), in key order.
    pub(super) fn range(&self, t: Tree, start: &[u8], end: Option<&[u8]>) -> Rows<'_> {
        match self {
            Db::Sled(d) => Box::new(d.range(t, start, end)),
            Db::Postgres(d) => Box::new(d.range(t, start, end)),
        }
    }

    pub(super) fn prefix(&self, t: Tree, prefix: &[u8]) -> Rows<'_> {
        match self {
            Db::Sled(d) => Box::new(d.prefix(t, prefix)),
            Db::Postgres(d) => Box::new(d.prefix(t, prefix)),
        }
    }

    pub(super) fn first_key(&self, t: Tree) -> Result<Option<Vec<u8>>> {
        match self {
            Db::Sled(d) => d.first_key(t),
            Db::Postgres(d) => d.first_key(t),
        }
    }

    pub(super) fn len(&self, t: Tree) -> Result<usize> {
        match self {
            Db::Sled(d) => Ok(d.len(t)),
            Db::Postgres(d) => d.len(t),
        }
    }

    pub(super) fn meta_set_once(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>> {
        match self {
            Db::Sled(d) => d.meta_set_once(key, value),
            Db::Postgres(d) => d.meta_set_once(key, value),
        }
    }

    /// A key's value read inside a store transaction, for changing it:
    /// PostgreSQL locks the row until the transaction ends, so no other
    /// node changes it meanwhile (sled: the in-process lock is enough).
    pub(super) fn get_for_update(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            Db::Sled(d) => d.get(t, key),
            Db::Postgres(d) => d.get_for_update(t, key),
        }
    }

    /// As [`Db::get_for_update`], without waiting for a row another
    /// transaction holds: `Err(())` then (PostgreSQL's `SKIP LOCKED`;
    /// sled: nobody else holds one).
    pub(super) fn get_unless_held(
        &self,
        t: Tree,
        key: &[u8],
    ) -> Result<std::result::Result<Option<Vec<u8>>, ()>> {
        match self {
            Db::Sled(d) => d.get(t, key).map(Ok),
            Db::Postgres(d) => d.get_unless_held(t, key),
        }
    }

    /// The values of `keys` that exist (see [`PgDb::get_many`]), read in
    /// one round trip on PostgreSQL.
    pub(super) fn get_many(&self, t: Tree, keys: Vec<Vec<u8>>) -> Result<Vec<Row>> {
        match self {
            Db::Sled(d) => keys
                .into_iter()
                .filter_map(|k| d.get(t, &k).map(|v| v.map(|v| (k, v))).transpose())
                .collect(),
            Db::Postgres(d) => d.get_many(t, keys),
        }
    }

    /// The first `limit` rows of each range (see [`PgDb::ranges`]), by
    /// range, in one round trip on PostgreSQL.
    pub(super) fn ranges(
        &self,
        t: Tree,
        ranges: Vec<KeyRange>,
        limit: usize,
    ) -> Result<Vec<Vec<Row>>> {
        match self {
            Db::Sled(d) => ranges
                .iter()
                .map(|(lo, hi)| d.range(t, lo, hi.as_deref()).take(limit).collect())
                .collect(),
            Db::Postgres(d) => d.ranges(t, ranges, limit),
        }
    }

    /// The next number of a sequence, when the engine hands them out
    /// itself (PostgreSQL's sequences: no row every node's transactions
    /// would wait for); None: the store counts in its meta space.
    pub(super) fn next_id(&self, s: super::Sequence) -> Result<Option<u64>> {
        match self {
            Db::Sled(_) => Ok(None),
            Db::Postgres(d) => d.next_id(s).map(Some),
        }
    }

    /// Makes the engine's sequences go on after the numbers the meta
    /// space counted (a store copied from sled, or from the one-table
    /// layout, counted there). Only while no daemon runs on the store.
    pub(super) fn sync_sequences(&self) -> Result<()> {
        match self {
            Db::Sled(_) => Ok(()),
            Db::Postgres(d) => d.sync_sequences(),
        }
    }

    /// Starts a store transaction (PostgreSQL: a database transaction,
    /// its rows locked as it reads them; sled: the in-process lock).
    pub(super) fn begin(&self) -> Result<()> {
        match self {
            Db::Sled(_) => Ok(()),
            Db::Postgres(d) => d.begin(),
        }
    }

    /// Writes every op or none, ending the transaction; with a fence,
    /// only while its lease is held (sled: one process, nothing to check).
    /// `absent`: keys the transaction read and found missing. Another
    /// node may have written one since (nothing locks a missing row), so
    /// PostgreSQL writes these only if they are still missing, else
    /// fails with [`StoreError::Conflict`] and writes nothing.
    pub(super) fn commit(
        &self,
        ops: &[Op],
        absent: &std::collections::HashSet<(Tree, Vec<u8>)>,
        fence: Option<&Fence>,
    ) -> Result<()> {
        match self {
            Db::Sled(d) => d.apply(ops),
            Db::Postgres(d) => d.commit(ops, absent, fence),
        }
    }

    /// Ends a transaction that writes nothing.
    pub(super) fn abort(&self) -> Result<()> {
        match self {
            Db::Sled(_) => Ok(()),
            Db::Postgres(d) => d.abort(),
        }
    }

    /// Makes everything committed durable (PostgreSQL's commits are).
    pub(super) fn flush(&self) -> Result<()> {
        match self {
            Db::Sled(d) => d.flush(),
            Db::Postgres(_) => Ok(()),
        }
    }

    pub(super) async fn flush_async(&self) -> Result<()> {
        match self {
            Db::Sled(d) => d.flush_async().await,
            Db::Postgres(_) => Ok(()),
        }
    }

    /// Is this the embedded engine (a store directory on this machine)?
    pub(super) fn is_local(&self) -> bool {
        matches!(self, Db::Sled(_))
    }
}
