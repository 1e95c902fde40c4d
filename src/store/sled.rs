//! The sled engine: trees, atomic multi-tree writes, the raw log, and
//! the process lock. Nothing outside the store sees a sled type.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::codec::{Tree, TREES};
use super::rawlog::RawLog;
use super::write::Op;
use super::StoreError;

/// sled's page cache; its default (1 GiB) would dwarf the daemon.
const CACHE_BYTES: u64 = 4 << 20;

pub(super) struct SledDb {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    raw_log: RawLog,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        match e {
            sled::Error::Io(io) => StoreError::Io(io),
            other => StoreError::Engine(Box::new(other)),
        }
    }
}

impl SledDb {
    /// Opens the database in `path` (which exists, mode 0700).
    pub(super) fn open(path: &Path) -> Result<SledDb, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            // Only our `flush` makes sled durable, after the raw log: a
            // record must never outlive (a power cut) the bytes it names.
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                if is_lock_error(&e) {
                    StoreError::Locked(path.to_owned())
                } else {
                    StoreError::Open {
                        path: path.to_owned(),
                        source: Box::new(e),
                    }
                }
            })?;
        let mut trees = Vec::new();
        for (_, name) in TREES {
            trees.push(db.open_tree(name)?);
        }
        let raw_log = RawLog::open(&path.join("raw.log")).map_err(|e| StoreError::Open {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        Ok(SledDb { db, trees, raw_log })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t.index()]
    }

    /// A value; the raw tree's bytes come back whole (from the log).
    pub(super) fn get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.tree(t).get(key)? {
            None => Ok(None),
            Some(v) if t == Tree::Raw => Ok(Some(self.raw_log.decode(&v)?)),
            Some(v) => Ok(Some(v.to_vec())),
        }
    }

    pub(super) fn contains(&self, t: Tree, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tree(t).contains_key(key)?)
    }

    /// Keys and values from `start` (inclusive) to `end` (exclusive; None:
    /// to the end), in key order. Not for the raw tree.
    pub(super) fn range(
        &self,
        t: Tree,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        let iter = match end {
            Some(e) => self.tree(t).range(start.to_vec()..e.to_vec()),
            None => self.tree(t).range(start.to_vec()..),
        };
        iter.map(|r| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(StoreError::from)
        })
    }

    pub(super) fn prefix(
        &self,
        t: Tree,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        self.tree(t).scan_prefix(prefix).map(|r| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(StoreError::from)
        })
    }

    pub(super) fn first_key(&self, t: Tree) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(t).first()?.map(|(k, _)| k.to_vec()))
    }

    pub(super) fn len(&self, t: Tree) -> usize {
        self.tree(t).len()
    }

    /// Sets `key` in meta to `value` unless it is set; returns what is
    /// set afterwards (the winner, if another writer came first).
    pub(super) fn meta_set_once(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let meta = self.tree(Tree::Meta);
        let _ = meta.compare_and_swap(key, None as Option<&[u8]>, Some(value))?;
        self.db.flush()?;
        Ok(meta
            .get(key)?
            .map(|v| v.to_vec())
            .unwrap_or_else(|| value.to_vec()))
    }

    /// Writes every op or none. Raw values go to the raw log first (or
    /// are tagged inline); a failed transaction leaves unreferenced bytes
    /// in the log, harmless.
    pub(super) fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut raw: Vec<Option<Vec<u8>>> = Vec::with_capacity(ops.len());
        for (tree, _, value) in ops {
            raw.push(match (tree, value) {
                (Tree::Raw, Some(v)) => Some(self.raw_log.encode(v)?),
                _ => None,
            });
        }
        // Only the trees the ops touch take part: a transaction's cost
        // grows with its trees.
        let mut used: Vec<usize> = ops.iter().map(|(t, _, _)| t.index()).collect();
        used.sort_unstable();
        used.dedup();
        let trees: Vec<&sled::Tree> = used.iter().map(|i| &self.trees[*i]).collect();
        let slot = |t: Tree| used.binary_search(&t.index()).unwrap_or(0);
        let r = trees[..].transaction(|txs| {
            for ((tree, key, value), raw) in ops.iter().zip(&raw) {
                let i = slot(*tree);
                let value = raw.as_deref().or(value.as_deref());
                match value {
                    Some(v) => {
                        txs[i].insert(key.as_slice(), v)?;
                    }
                    None => {
                        txs[i].remove(key.as_slice())?;
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<sled::Error>>(())
        });
        match r {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) | Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Makes everything written so far durable: the raw log first, then
    /// the records that point into it.
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.raw_log.sync()?;
        self.db.flush()?;
        Ok(())
    }

    pub(super) async fn flush_async(&self) -> Result<(), StoreError> {
        self.raw_log.sync()?;
        self.db.flush_async().await?;
        Ok(())
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().to_lowercase().contains("lock")
        }
        _ => false,
    }
}
