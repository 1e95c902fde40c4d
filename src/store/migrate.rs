//! `escalator store migrate --from-sled`: copies a sled store into an
//! empty PostgreSQL database, key space by key space, in batches. Both
//! engines keep the same keys and values, so a copy is the whole store:
//! cases, messages with their raw bytes, history, timers, the outbox,
//! cursors, quarantine, facts, and the store's secret (our Message-IDs'
//! keyed hashes stay valid). Each batch commits with a progress mark, so
//! an interrupted copy goes on from where it stopped; the counts are
//! checked key space by key space at the end.

use std::collections::BTreeMap;

use super::codec::{Tree, TREES};
use super::{engine::Db, Result, Store, StoreError};

/// Rows per committed batch.
const BATCH: usize = 500;
/// Meta keys of the copy's progress in the target: `migrate/<tree>` is
/// the last key copied; `migrate/done` marks a finished copy.
const PROGRESS: &str = "migrate/";

/// What a copy found in each key space (source and target agree).
#[derive(Debug, Default)]
pub struct Copied {
    pub rows: BTreeMap<&'static str, usize>,
    /// The target held a finished copy already: nothing was written.
    pub already_done: bool,
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
            // Run again right after: the same counts, nothing to do.
            return match self.verify(target) {
                Ok(mut copied) => {
                    copied.already_done = true;
                    Ok(copied)
                }
                Err(_) => Err(StoreError::Migrate(
                    "the PostgreSQL database already holds a store (a finished copy that has \
                     changed since, or another store's); nothing was copied"
                        .into(),
                )),
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
        let copied = self.verify(target)?;
        target.db.begin()?;
        target.db.commit(
            &[(
                Tree::Meta,
                done_key.into_bytes(),
                Some(b"1".to_vec().into()),
            )],
            None,
        )?;
        Ok(copied)
    }

    pub(super) fn copy_tree(&self, target: &Store, tree: Tree, name: &str) -> Result<()> {
        let mark = format!("{PROGRESS}{name}").into_bytes();
        let mut after = target.db.get(Tree::Meta, &mark)?;
        loop {
            // Keys after the mark (the mark itself was copied).
            let start = after.clone().unwrap_or_default();
            let mut keys: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
            for r in self.db.range(tree, &start, None) {
                let (k, _) = r?;
                if after.as_deref() == Some(k.as_slice()) || is_progress(tree, &k) {
                    continue;
                }
                keys.push(k);
                if keys.len() == BATCH {
                    break;
                }
            }
            let Some(last) = keys.last().cloned() else {
                return Ok(());
            };
            let mut ops = Vec::with_capacity(keys.len() + 1);
            for k in keys {
                // Through `get`: the raw tree's bytes come whole from the log.
                if let Some(v) = self.db.get(tree, &k)? {
                    ops.push((tree, k, Some(v.into())));
                }
            }
            ops.push((Tree::Meta, mark.clone(), Some(last.clone().into())));
            target.db.begin()?;
            target.db.commit(&ops, None)?;
            after = Some(last);
        }
    }

    /// Counts each key space on both sides; an error names the first that
    /// differs.
    fn verify(&self, target: &Store) -> Result<Copied> {
        let mut copied = Copied::default();
        for (tree, name) in TREES {
            let count = |db: &Db| -> Result<usize> {
                let mut n = 0;
                for r in db.range(tree, &[], None) {
                    let (k, _) = r?;
                    n += usize::from(!is_progress(tree, &k));
                }
                Ok(n)
            };
            let (src, dst) = (count(&self.db)?, count(&target.db)?);
            if src != dst {
                return Err(StoreError::Migrate(format!(
                    "{name}: {src} in the sled store, {dst} in PostgreSQL"
                )));
            }
            copied.rows.insert(name, src);
        }
        Ok(copied)
    }
}

fn is_progress(tree: Tree, key: &[u8]) -> bool {
    tree == Tree::Meta && key.starts_with(PROGRESS.as_bytes())
}
