//! `escalator store migrate --from-sled`: copies a sled store into an
//! empty PostgreSQL database, key space by key space, in batches. Both
//! engines keep the same keys and values, so a copy is the whole store:
//! cases, messages with their raw bytes, history, timers, the outbox,
//! cursors, quarantine, facts, and the store's secret (our Message-IDs'
//! keyed hashes stay valid).
//!
//! Three passes. The bulk copy commits each batch with a progress mark,
//! so an interrupted copy goes on from where it stopped. The sled daemon
//! may have run in between (a case changed, a case number handed out),
//! so what was copied before the interruption may be stale: the
//! reconciliation walks source and target of each key space side by side
//! in key order and writes what differs, removing what the source no
//! longer has. Last, each key space's digest (keys and values, in key
//! order) must be the same on both sides. (What the sled daemon's sent
//! journal records is marked sent before the copy, by
//! `app::migrate_from_sled`: the store cannot read the outbox's journal.)

use std::cmp::Ordering;
use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::codec::{Tree, TREES};
use super::write::Op;
use super::{engine::Db, Result, Store, StoreError};

/// Most rows per committed batch.
const BATCH_ROWS: usize = 500;
/// Most bytes (keys and values) per committed batch: raw messages may be
/// megabytes each, and a statement's parameters must stay far below
/// PostgreSQL's 1 GB limits (and the copy's memory small).
const BATCH_BYTES: usize = 32 << 20;
/// Meta keys of the copy's progress in the target: `migrate/<tree>` is
/// the last key copied; `migrate/done` marks a finished copy.
const PROGRESS: &str = "migrate/";

type Rows<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + 'a>;

/// What a copy found in each key space (source and target agree).
#[derive(Debug, Default)]
pub struct Copied {
    pub rows: BTreeMap<&'static str, usize>,
    /// The target held a finished copy already: nothing was written.
    pub already_done: bool,
    /// Records the reconciliation wrote or removed: the sled store had
    /// changed since an interrupted copy copied them.
    pub reconciled: usize,
}

/// Does a batch of `rows` rows and `bytes` bytes take one more row of
/// `len` bytes? An empty batch takes any row, however large, so every
/// batch makes progress.
pub(super) fn fits(rows: usize, bytes: usize, len: usize) -> bool {
    rows == 0 || (rows < BATCH_ROWS && bytes.saturating_add(len) <= BATCH_BYTES)
}

/// Writes to the target, committed a bounded batch at a time.
#[derive(Default)]
struct Batch {
    ops: Vec<Op>,
    bytes: usize,
}

impl Batch {
    /// Queues `op`, committing what is queued first when it would not
    /// fit; `mark` (the progress key) then records the last key written.
    fn push(&mut self, target: &Store, op: Op, mark: Option<&[u8]>) -> Result<()> {
        let len = op.1.len() + op.2.as_ref().map_or(0, |v| v.len());
        if !fits(self.ops.len(), self.bytes, len) {
            self.commit(target, mark)?;
        }
        self.ops.push(op);
        self.bytes += len;
        Ok(())
    }

    fn commit(&mut self, target: &Store, mark: Option<&[u8]>) -> Result<()> {
        let Some((_, last, _)) = self.ops.last() else {
            return Ok(());
        };
        if let Some(mark) = mark {
            let last = last.clone();
            self.ops
                .push((Tree::Meta, mark.to_vec(), Some(last.into())));
        }
        target.db.begin()?;
        target.db.commit(&self.ops, &Default::default(), None)?;
        self.ops.clear();
        self.bytes = 0;
        Ok(())
    }
}

impl Store {
    /// Copies this (sled) store into `target` (PostgreSQL), which must be
    /// empty or hold an unfinished copy of this one.
    pub fn copy_into(&self, target: &Store) -> Result<Copied> {
        let (Db::Sled(_), Db::Postgres(_)) = (&self.db, &target.db) else {
            return Err(StoreError::Migrate(
                "copies a sled store into a PostgreSQL database".into(),
            ));
        };
        let done_key = format!("{PROGRESS}done");
        if target.db.get(Tree::Meta, done_key.as_bytes())?.is_some() {
            // Run again right after: the same contents, nothing to do.
            // Once either side has moved on, the copy is not rewritten:
            // a daemon on PostgreSQL may have written since.
            return match self.verify(target) {
                Ok(mut copied) => {
                    copied.already_done = true;
                    Ok(copied)
                }
                Err(StoreError::Migrate(why)) => Err(StoreError::Migrate(format!(
                    "the PostgreSQL database already holds a store: a finished copy that \
                     differs from the sled store ({why}), so one of them has changed since, or \
                     another store's; nothing was copied"
                ))),
                Err(e) => Err(e),
            };
        }
        let started = target
            .db
            .prefix(Tree::Meta, PROGRESS.as_bytes())
            .next()
            .transpose()?
            .is_some();
        // Opening the target wrote its own secret and index version; any
        // case, message or mail means it is somebody's store.
        if !started {
            for t in [Tree::Cases, Tree::Messages, Tree::Outbox, Tree::Quarantine] {
                if target.db.first_key(t)?.is_some() {
                    return Err(StoreError::Migrate(
                        "the PostgreSQL database already holds a store; migrate into an empty one"
                            .into(),
                    ));
                }
            }
        }
        for (tree, name) in TREES {
            self.copy_tree(target, tree, name)?;
        }
        let mut reconciled = 0;
        for (tree, _) in TREES {
            reconciled += self.reconcile_tree(target, tree)?;
        }
        let mut copied = self.verify(target)?;
        copied.reconciled = reconciled;
        target.db.begin()?;
        target.db.commit(
            &[(
                Tree::Meta,
                done_key.into_bytes(),
                Some(b"1".to_vec().into()),
            )],
            &Default::default(),
            None,
        )?;
        // Numbers go on after the sled store's.
        target.db.sync_sequences()?;
        Ok(copied)
    }

    /// Copies the keys after the key space's progress mark.
    pub(super) fn copy_tree(&self, target: &Store, tree: Tree, name: &str) -> Result<()> {
        let mark = format!("{PROGRESS}{name}").into_bytes();
        let after = target.db.get(Tree::Meta, &mark)?;
        let mut batch = Batch::default();
        for r in self.source_rows(tree, after.as_deref().unwrap_or_default()) {
            let (k, v) = r?;
            // The mark itself was copied.
            if after.as_deref() == Some(k.as_slice()) {
                continue;
            }
            batch.push(target, (tree, k, Some(v.into())), Some(&mark))?;
        }
        batch.commit(target, Some(&mark))
    }

    /// Makes the target's key space equal this one's: a merge of both in
    /// key order, writing keys whose values differ or that the target
    /// lacks and removing keys only the target has. Returns how many.
    fn reconcile_tree(&self, target: &Store, tree: Tree) -> Result<usize> {
        let mut src = self.source_rows(tree, &[]);
        let mut dst = target.hashed_rows(tree);
        let (mut s, mut d) = (src.next().transpose()?, dst.next().transpose()?);
        let mut batch = Batch::default();
        let mut changed = 0;
        // The target is written behind both cursors only (at or before
        // the key in hand), so its scan, a page at a time, stays valid.
        loop {
            let order = match (&s, &d) {
                (None, None) => break,
                (Some((sk, _)), Some((dk, _))) => sk.cmp(dk),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
            };
            match (order, s.take(), d.take()) {
                (Ordering::Equal, Some((k, v)), Some((_, dh))) => {
                    if sha256(&v) != dh {
                        batch.push(target, (tree, k, Some(v.into())), None)?;
                        changed += 1;
                    }
                    s = src.next().transpose()?;
                    d = dst.next().transpose()?;
                }
                (Ordering::Less, Some((k, v)), kept) => {
                    batch.push(target, (tree, k, Some(v.into())), None)?;
                    changed += 1;
                    s = src.next().transpose()?;
                    d = kept;
                }
                (_, kept, Some((k, _))) => {
                    batch.push(target, (tree, k, None), None)?;
                    changed += 1;
                    s = kept;
                    d = dst.next().transpose()?;
                }
                // Cannot happen (the order was taken from these very
                // rows); said rather than skipping the rest.
                (_, _, None) => {
                    return Err(StoreError::Migrate(
                        "reconciling lost its place in the key order".into(),
                    ))
                }
            }
        }
        batch.commit(target, None)?;
        Ok(changed)
    }

    /// Counts and digests each key space on both sides; an error names
    /// the first that differs.
    fn verify(&self, target: &Store) -> Result<Copied> {
        let mut copied = Copied::default();
        for (tree, name) in TREES {
            let (src_n, src_digest) = digest(self.hashed_rows(tree))?;
            let (dst_n, dst_digest) = digest(target.hashed_rows(tree))?;
            if src_n != dst_n {
                return Err(StoreError::Migrate(format!(
                    "{name}: {src_n} in the sled store, {dst_n} in PostgreSQL"
                )));
            }
            if src_digest != dst_digest {
                return Err(StoreError::Migrate(format!(
                    "{name}: {src_n} records on both sides, but their contents differ"
                )));
            }
            copied.rows.insert(name, src_n);
        }
        Ok(copied)
    }

    /// This store's keys and whole values from `start` in key order,
    /// without the copy's progress marks.
    pub(super) fn source_rows(&self, tree: Tree, start: &[u8]) -> Rows<'_> {
        if tree == Tree::Meta && self.db.is_local() {
            // The index version as PostgreSQL keeps it: its facts are
            // the per-case rows below.
            return Box::new(self.plain_rows(tree, start).map(|r| {
                r.map(|(k, v)| match k.as_slice() {
                    b"indexes" => (k, super::SHARED_INDEXES.to_vec()),
                    _ => (k, v),
                })
            }));
        }
        if tree == Tree::Facts && self.db.is_local() {
            // sled packs the facts in buckets; PostgreSQL keeps a row per
            // case: the copy (and its check) is of those rows, in the
            // same key order as the buckets' cases.
            let start = start.to_vec();
            return Box::new(
                self.db
                    .range(tree, b"b", Some(b"c"))
                    .flat_map(|r| {
                        let rows = r.and_then(|(k, v)| super::facts::per_case_rows(&k, &v));
                        match rows {
                            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>(),
                            Err(e) => vec![Err(e)],
                        }
                    })
                    .filter(move |r| !matches!(r, Ok((k, _)) if *k < start)),
            );
        }
        self.plain_rows(tree, start)
    }

    /// This store's keys and whole values from `start`, as they are.
    fn plain_rows(&self, tree: Tree, start: &[u8]) -> Rows<'_> {
        Box::new(
            self.db
                .range(tree, start, None)
                .filter(move |r| !matches!(r, Ok((k, _)) if is_progress(tree, k)))
                .filter_map(move |r| match r {
                    // sled's raw tree holds where the bytes are in its
                    // log: `get` reads them whole.
                    Ok((k, _)) if tree == Tree::Raw && self.db.is_local() => {
                        match self.db.get(tree, &k) {
                            Ok(v) => v.map(|v| Ok((k, v))),
                            Err(e) => Some(Err(e)),
                        }
                    }
                    r => Some(r),
                }),
        )
    }

    /// Keys and the SHA-256 of their values in key order, without the
    /// copy's progress marks. PostgreSQL hashes on the server, so raw
    /// bytes need not cross the network again.
    fn hashed_rows(&self, tree: Tree) -> Rows<'_> {
        match &self.db {
            Db::Postgres(pg) => Box::new(
                pg.range_hashed(tree)
                    .filter(move |r| !matches!(r, Ok((k, _)) if is_progress(tree, k))),
            ),
            Db::Sled(_) => Box::new(
                self.source_rows(tree, &[])
                    .map(|r| r.map(|(k, v)| (k, sha256(&v)))),
            ),
        }
    }
}

fn sha256(v: &[u8]) -> Vec<u8> {
    Sha256::digest(v).to_vec()
}

/// How many rows, and a digest over their keys and value hashes.
fn digest(rows: Rows<'_>) -> Result<(usize, blake3::Hash)> {
    let mut h = blake3::Hasher::new();
    let mut n = 0;
    for r in rows {
        let (k, vh) = r?;
        // Lengths first: keys of any length cannot run into each other.
        h.update(&(k.len() as u64).to_be_bytes());
        h.update(&k);
        h.update(&vh);
        n += 1;
    }
    Ok((n, h.finalize()))
}

fn is_progress(tree: Tree, key: &[u8]) -> bool {
    tree == Tree::Meta && key.starts_with(PROGRESS.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{fits, BATCH_BYTES, BATCH_ROWS};

    /// The batches a copy of rows of these sizes commits (rows each).
    fn plan(lens: &[usize]) -> Vec<usize> {
        let (mut out, mut rows, mut bytes) = (Vec::new(), 0, 0);
        for &len in lens {
            if !fits(rows, bytes, len) {
                out.push(rows);
                (rows, bytes) = (0, 0);
            }
            rows += 1;
            bytes += len;
        }
        if rows > 0 {
            out.push(rows);
        }
        out
    }

    #[test]
    fn a_copy_batch_is_bounded_by_bytes_as_well_as_rows() {
        // Issue 17 (A): 500 raw messages of several MB each made one
        // statement of gigabytes, past PostgreSQL's 1 GB limits.
        const MB: usize = 1 << 20;
        assert_eq!(plan(&[100; 1001]), [BATCH_ROWS, BATCH_ROWS, 1]);
        assert_eq!(plan(&[5 * MB; 500]).iter().max(), Some(&6));
        assert!(plan(&[5 * MB; 500])
            .iter()
            .all(|n| n * 5 * MB <= BATCH_BYTES));
        // A row larger than a batch goes alone, never nowhere.
        assert_eq!(plan(&[10, 40 * MB, 10]), [1, 1, 1]);
        assert_eq!(plan(&[BATCH_BYTES / 2, BATCH_BYTES / 2, 1]), [2, 1]);
        assert_eq!(plan(&[]), Vec::<usize>::new());
    }
}
