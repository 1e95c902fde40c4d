//! The store: the only module that touches sled, so a second backend stays
//! possible. Everything that must happen together is written as one
//! `Batch` applied in a single multi-tree transaction: a message, its
//! indexes, its case, the outbox entries it causes and the mailbox cursor
//! either all land or none do. Durable only after `flush`, which callers
//! do before any effect outside the store.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::case::{Case, CaseId, Status};
use crate::message::{Addr, Attachment};
use crate::outbox::{OutboxEntry, OutboxState};
use crate::stats::Facts;
use crate::thread::Lookup;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (a running daemon) holds the store.
    #[error(
        "the store {0} is in use by another escalator process (is the daemon running?); \
         two processes on one store are not allowed"
    )]
    Locked(PathBuf),
    #[error("cannot create the store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store operation failed")]
    Sled(#[from] sled::Error),
    #[error("stored record {key} cannot be read")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode a record")]
    Encode(#[source] serde_json::Error),
    /// Writing on would risk a half-written store: sled cannot recover
    /// from a full disk by itself, so we stop while there is room left.
    #[error(
        "the disk of the store {path} is nearly full: {available} bytes free, \
         store.min_free is {min_free}; free some space, then start again (nothing was lost)"
    )]
    DiskFull {
        path: PathBuf,
        available: u64,
        min_free: u64,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// The trees, named for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    Meta,
    Cases,
    Messages,
    Raw,
    MessageIds,
    Cursors,
    Outbox,
    Quarantine,
    Customers,
    AutoReplies,
    Deadlines,
    /// Ids of outbox entries still to send, so a drain never scans the
    /// whole (mostly sent) outbox.
    OutboxPending,
    /// Compact per-case facts for KPIs, keyed by opening time, and the
    /// set of unresolved cases: `stats` reads these, never whole cases.
    Facts,
    /// `message_id \0 case`: the cases holding a Message-ID in case
    /// (= age) order, each once, whatever the messages' contents.
    MessageCases,
}

const TREES: [(Tree, &str); 14] = [
    (Tree::Meta, "meta"),
    (Tree::Cases, "cases"),
    (Tree::Messages, "messages"),
    (Tree::Raw, "raw"),
    (Tree::MessageIds, "message_ids"),
    (Tree::Cursors, "cursors"),
    (Tree::Outbox, "outbox"),
    (Tree::Quarantine, "quarantine"),
    (Tree::Customers, "customers"),
    (Tree::AutoReplies, "auto_replies"),
    (Tree::Deadlines, "deadlines"),
    (Tree::OutboxPending, "outbox_pending"),
    (Tree::Facts, "facts"),
    (Tree::MessageCases, "message_cases"),
];

/// sled's page cache; its default (1 GiB) would dwarf the daemon.
const CACHE_BYTES: u64 = 4 << 20;

/// Writes to apply atomically.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<(Tree, Vec<u8>, Option<Vec<u8>>)>,
    /// Case events this batch records, counted in metrics on commit.
    events: Vec<crate::case::Event>,
}

impl Batch {
    pub fn put(&mut self, tree: Tree, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), Some(value.into())));
    }
    pub fn put_json<T: Serialize>(
        &mut self,
        tree: Tree,
        key: impl Into<Vec<u8>>,
        value: &T,
    ) -> Result<()> {
        let v = serde_json::to_vec(value).map_err(StoreError::Encode)?;
        self.put(tree, key, v);
        Ok(())
    }
    pub fn remove(&mut self, tree: Tree, key: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Where a folder's ingestion stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub uid_validity: u32,
    /// Every UID up to this one is in the store (or in quarantine).
    pub last_uid: u32,
}

/// A stored message without its raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageRecord {
    pub seq: u64,
    pub case: CaseId,
    pub message_id: String,
    pub content_hash: String,
    pub from: Option<Addr>,
    pub to: Vec<Addr>,
    pub cc: Vec<Addr>,
    pub subject: String,
    pub date: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub folder: String,
    pub uid: u32,
    pub text: String,
    pub attachments: Vec<Attachment>,
    pub size: usize,
    /// Why this needs no automatic answer, if it needs none.
    pub suppressed: Option<String>,
    /// Set when only the headers were kept (over `max_message_size`).
    pub truncated: bool,
    pub parse_error: Option<String>,
    /// The message had more than one `From:` field; `from` is the first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub several_from: bool,
}

/// A message that failed to process, kept with its error for a person.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub id: u64,
    pub folder: String,
    pub uid_validity: u32,
    pub uid: u32,
    pub error: String,
    pub at: DateTime<Utc>,
    pub attempts: u32,
    /// The message came from the support mailbox's Sent folder: a retry
    /// must ingest it as an agent's mail again.
    #[serde(default)]
    pub sent: bool,
    /// The server would not give the message: no bytes are kept, and a
    /// retry rewinds the folder's cursor so the watcher fetches it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unfetched: bool,
}

pub struct Store {
    path: PathBuf,
    db: sled::Db,
    /// Large raw messages, appended here rather than kept in sled.
    raw_log: RawLog,
    trees: Vec<sled::Tree>,
    /// Serialises writers in this process: threading reads outside the
    /// transaction, so two writers could otherwise decide on stale reads.
    write: Mutex<()>,
    key: [u8; 32],
}

/// The auto-reply index's key for every automatic mail, whoever it went
/// to: the global hourly limit counts these. No address is just `*`.
pub const ALL_RECIPIENTS: &str = "*";

pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

impl Store {
    /// Opens (creating, mode 0700) the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        create_private_dir(path).map_err(|source| StoreError::CreateDir {
            path: path.to_owned(),
            source,
        })?;
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
                        source: e,
                    }
                }
            })?;
        let mut trees = Vec::new();
        for (_, name) in TREES {
            trees.push(db.open_tree(name)?);
        }
        let raw_log = RawLog::open(&path.join("raw.log")).map_err(|e| StoreError::Open {
            path: path.to_owned(),
            source: sled::Error::Io(e),
        })?;
        let mut store = Store {
            path: path.to_owned(),
            db,
            raw_log,
            trees,
            write: Mutex::new(()),
            key: [0; 32],
        };
        store.key = store.load_key()?;
        store.build_indexes()?;
        Ok(store)
    }

    /// Opens, waiting up to `wait` while another process holds the lock:
    /// an admin command holds it for a moment, a daemon for good.
    pub fn open_waiting(path: &Path, wait: std::time::Duration) -> Result<Store> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Store::open(path) {
                Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The secret behind our Message-IDs' hashes, made on first open.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    fn load_key(&self) -> Result<[u8; 32]> {
        let meta = self.tree(Tree::Meta);
        if let Some(v) = meta.get(b"key")? {
            if let Ok(k) = <[u8; 32]>::try_from(v.as_ref()) {
                return Ok(k);
            }
        }
        let mut k = [0u8; 32];
        getrandom::fill(&mut k)
            .map_err(|e| StoreError::Sled(sled::Error::Io(std::io::Error::other(e.to_string()))))?;
        // compare_and_swap: a key written meanwhile wins, never two keys.
        let _ = meta.compare_and_swap(b"key", None as Option<&[u8]>, Some(&k[..]))?;
        self.db.flush()?;
        let v = meta
            .get(b"key")?
            .ok_or_else(|| sled::Error::Unsupported("store key vanished".into()))?;
        Ok(<[u8; 32]>::try_from(v.as_ref()).unwrap_or(k))
    }

    pub fn tree(&self, t: Tree) -> &sled::Tree {
        let i = TREES.iter().position(|(x, _)| *x == t).unwrap_or(0);
        &self.trees[i]
    }

    /// Takes the process-wide write lock; hold it across read-decide-write.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        // A poisoned lock only means another writer panicked; sled's
        // transactions kept the data consistent, so carry on.
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses to write on when fewer than `min_free` + `need` bytes are
    /// free on the store's disk.
    pub fn ensure_space(&self, min_free: u64, need: u64) -> Result<()> {
        let available = fs2::available_space(&self.path).unwrap_or(u64::MAX);
        if available < min_free.saturating_add(need) {
            return Err(StoreError::DiskFull {
                path: self.path.clone(),
                available,
                min_free,
            });
        }
        Ok(())
    }

    /// Makes everything written so far durable: the raw log first, then
    /// the records that point into it.
    pub fn flush(&self) -> Result<()> {
        self.raw_log.sync()?;
        self.db.flush()?;
        Ok(())
    }

    pub async fn flush_async(&self) -> Result<()> {
        self.raw_log.sync()?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Applies a batch atomically.
    pub fn apply(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // Raw values go to the raw log first (or are tagged inline); the
        // transaction stores what `encode` returns. A failed transaction
        // leaves unreferenced bytes in the log, harmless.
        let mut raw: Vec<Option<Vec<u8>>> = Vec::with_capacity(batch.ops.len());
        for (tree, _, value) in &batch.ops {
            raw.push(match (tree, value) {
                (Tree::Raw, Some(v)) => Some(self.raw_log.encode(v)?),
                _ => None,
            });
        }
        // Only the trees the batch touches take part: a transaction's cost
        // grows with its trees.
        let index = |t: Tree| TREES.iter().position(|(x, _)| *x == t).unwrap_or(0);
        let mut used: Vec<usize> = batch.ops.iter().map(|(t, _, _)| index(*t)).collect();
        used.push(index(Tree::Meta));
        used.sort_unstable();
        used.dedup();
        let trees: Vec<&sled::Tree> = used.iter().map(|i| &self.trees[*i]).collect();
        let slot = |t: Tree| used.binary_search(&index(t)).unwrap_or(0);
        let meta = slot(Tree::Meta);
        let r = trees[..].transaction(|txs| {
            for ((tree, key, value), raw) in batch.ops.iter().zip(&raw) {
                let value = raw.as_ref().or(value.as_ref());
                let i = slot(*tree);
                if *tree == Tree::Facts && key.first() == Some(&b'u') {
                    // Keep the open-cases-by-tier counts in step with the
                    // unresolved index, in the same transaction.
                    let old = txs[i].get(key.as_slice())?;
                    let old_tier = old.as_ref().and_then(|v| v.get(8..).map(<[u8]>::to_vec));
                    let new_tier = value.and_then(|v| v.get(8..).map(<[u8]>::to_vec));
                    if old_tier != new_tier {
                        if let Some(t) = old_tier {
                            bump_open(&txs[meta], &t, -1)?;
                        }
                        if let Some(t) = new_tier {
                            bump_open(&txs[meta], &t, 1)?;
                        }
                    }
                }
                match value {
                    Some(v) => {
                        txs[i].insert(key.as_slice(), v.as_slice())?;
                    }
                    None => {
                        txs[i].remove(key.as_slice())?;
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<sled::Error>>(())
        });
        match r {
            Ok(()) => {
                crate::metrics::committed(&batch.events);
                Ok(())
            }
            Err(TransactionError::Abort(e)) | Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn get_json<T: DeserializeOwned>(&self, tree: Tree, key: &[u8]) -> Result<Option<T>> {
        match self.tree(tree).get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    key: format!("{tree:?}/{}", String::from_utf8_lossy(key)),
                    source,
                }),
        }
    }

    fn scan_json<T: DeserializeOwned>(&self, tree: Tree) -> impl Iterator<Item = Result<T>> + '_ {
        self.tree(tree).iter().map(move |r| {
            let (k, v) = r?;
            serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                key: format!("{tree:?}/{}", String::from_utf8_lossy(&k)),
                source,
            })
        })
    }

    /// Reads a counter; the caller writes `value + 1` in its batch.
    pub fn counter(&self, name: &str) -> Result<u64> {
        Ok(self
            .tree(Tree::Meta)
            .get(name.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1))
    }

    // ----------------------------------------------------------- cases

    pub fn case(&self, id: CaseId) -> Result<Option<Case>> {
        let mut c: Option<Case> = self.get_json(Tree::Cases, &id_key(id))?;
        if let Some(c) = c.as_mut() {
            c.stored_events = c.history.len();
        }
        Ok(c)
    }

    pub fn cases(&self) -> impl Iterator<Item = Result<Case>> + '_ {
        self.scan_json(Tree::Cases)
    }

    pub fn message(&self, seq: u64) -> Result<Option<MessageRecord>> {
        self.get_json(Tree::Messages, &id_key(seq))
    }

    pub fn raw(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.raw_bytes(&id_key(seq))
    }

    /// Bytes under `key` in the raw tree (messages, outgoing mail).
    pub fn raw_bytes(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.tree(Tree::Raw).get(key)? {
            None => Ok(None),
            Some(v) => Ok(Some(self.raw_log.decode(&v)?)),
        }
    }

    /// Cases of a customer, oldest first.
    pub fn customer_cases(&self, email: &str) -> Result<Vec<CaseId>> {
        let mut prefix = email.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for r in self.tree(Tree::Customers).scan_prefix(&prefix) {
            let (k, _) = r?;
            if let Ok(b) = <[u8; 8]>::try_from(&k[prefix.len()..]) {
                out.push(u64::from_be_bytes(b));
            }
        }
        Ok(out)
    }

    pub fn customer_key(email: &str, case: CaseId) -> Vec<u8> {
        let mut k = email.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&id_key(case));
        k
    }

    /// Index key of a message ID; the suffix tells copies apart.
    pub fn message_id_key(message_id: &str, suffix: &str) -> Vec<u8> {
        let mut k = message_id.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(suffix.as_bytes());
        k
    }

    /// Deadline index key: time first, so a range scan is in time order.
    pub fn deadline_key(at: DateTime<Utc>, case: CaseId) -> Vec<u8> {
        let mut k = at.timestamp_millis().to_be_bytes().to_vec();
        // Flip the sign bit so negative times still sort first.
        k[0] ^= 0x80;
        k.extend_from_slice(&id_key(case));
        k
    }

    /// Drops the bytes of mail sent before `cutoff` (the entries stay, for
    /// the CLI and the KPIs), going on from where the last call stopped
    /// and looking at most at `limit` entries. Entries are in creation
    /// order, so the walk stops at the first one created after `cutoff`.
    /// Returns how many mails lost their bytes.
    pub fn prune_sent(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<usize> {
        let _w = self.lock();
        let from = self.counter("pruned_outbox_upto")?;
        let mut batch = Batch::default();
        let mut next = from;
        let mut pruned = 0;
        for item in self.tree(Tree::Outbox).range(id_key(from)..).take(limit) {
            let (k, v) = item?;
            let e: OutboxEntry =
                serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    key: format!("Outbox/{}", String::from_utf8_lossy(&k)),
                    source,
                })?;
            if e.created_at >= cutoff {
                break;
            }
            // Unsent (pending, failed) mail keeps its bytes for a retry.
            if e.state == OutboxState::Sent && e.sent_at.is_some_and(|t| t < cutoff) {
                batch.remove(Tree::Raw, OutboxEntry::raw_key(e.id));
                pruned += 1;
            }
            next = e.id + 1;
        }
        if next != from {
            batch.put(
                Tree::Meta,
                "pruned_outbox_upto",
                next.to_be_bytes().to_vec(),
            );
            self.apply(&batch)?;
        }
        Ok(pruned)
    }

    /// Drops automatic-mail records older than `cutoff` (they only count
    /// for the limits' windows). Returns how many.
    pub fn prune_auto_replies(&self, cutoff: DateTime<Utc>) -> Result<usize> {
        let _w = self.lock();
        let cut = cutoff.timestamp_millis();
        let mut batch = Batch::default();
        let mut n = 0;
        for item in self.tree(Tree::AutoReplies).iter() {
            let (k, _) = item?;
            // Key: recipient, 0, time (8 bytes), outbox id (8 bytes).
            let Some(at) = k.len().checked_sub(16).and_then(|i| k.get(i..i + 8)) else {
                continue;
            };
            let at = i64::from_be_bytes(at.try_into().unwrap_or([0; 8]));
            if at < cut {
                batch.remove(Tree::AutoReplies, k.to_vec());
                n += 1;
            }
        }
        if n > 0 {
            self.apply(&batch)?;
        }
        Ok(n)
    }

    /// Recent automatic mails to `email` since `since`, counted up to
    /// `at_most` (the limit being checked: a flood's entries are not
    /// all counted for every mail). `email` is a key from
    /// [`crate::suppress::recipient_key`], or [`ALL_RECIPIENTS`].
    pub fn auto_replies_since(
        &self,
        email: &str,
        since: DateTime<Utc>,
        at_most: usize,
    ) -> Result<usize> {
        let mut start = email.as_bytes().to_vec();
        start.push(0);
        let prefix_len = start.len();
        start.extend_from_slice(&since.timestamp_millis().to_be_bytes());
        let mut end = email.as_bytes().to_vec();
        end.push(1);
        Ok(self
            .tree(Tree::AutoReplies)
            .range(start..end)
            .filter(|r| {
                r.as_ref()
                    .map(|(k, _)| k.len() > prefix_len)
                    .unwrap_or(false)
            })
            .take(at_most)
            .count())
    }

    pub fn auto_reply_key(email: &str, at: DateTime<Utc>, outbox: u64) -> Vec<u8> {
        let mut k = email.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&at.timestamp_millis().to_be_bytes());
        k.extend_from_slice(&id_key(outbox));
        k
    }

    /// Adds a case and its timer index change to a batch.
    pub fn write_case(
        &self,
        batch: &mut Batch,
        timer_before: Option<crate::case::Timer>,
        case: &Case,
    ) -> Result<()> {
        if timer_before != case.timer {
            if let Some(t) = timer_before {
                batch.remove(Tree::Deadlines, Self::deadline_key(t.at, case.id));
            }
            if let Some(t) = case.timer {
                batch.put(
                    Tree::Deadlines,
                    Self::deadline_key(t.at, case.id),
                    Vec::new(),
                );
            }
        }
        let new = case.history.get(case.stored_events..).unwrap_or_default();
        batch.events.extend(new.iter().cloned());
        Self::case_ops(batch, case)
    }

    /// A case record and its facts: every case write goes through here.
    fn case_ops(batch: &mut Batch, case: &Case) -> Result<()> {
        let facts = Facts::of(case);
        let value = serde_json::to_vec(&facts).map_err(StoreError::Encode)?;
        batch.put(
            Tree::Facts,
            Self::facts_key(case.created_at, case.id),
            value,
        );
        if case.status == Status::Resolved {
            batch.remove(Tree::Facts, Self::unresolved_key(case.id));
        } else {
            // Opening time and tier: enough to count open cases by tier
            // and age without decoding anything, and to find the facts.
            let mut v = case.created_at.timestamp_millis().to_be_bytes().to_vec();
            v.extend_from_slice(case.tier.as_bytes());
            batch.put(Tree::Facts, Self::unresolved_key(case.id), v);
        }
        batch.put_json(Tree::Cases, id_key(case.id), case)
    }

    /// `c` ++ opening time ++ id: a window of cases is one range.
    fn facts_key(at: DateTime<Utc>, case: CaseId) -> Vec<u8> {
        let mut k = b"c".to_vec();
        k.extend(Self::deadline_key(at, case));
        k
    }

    /// `u` ++ id: present while the case is unresolved.
    fn unresolved_key(case: CaseId) -> Vec<u8> {
        let mut k = b"u".to_vec();
        k.extend_from_slice(&id_key(case));
        k
    }

    /// Facts of the cases opened at or after `since`, oldest first.
    pub fn facts_since(
        &self,
        since: Option<DateTime<Utc>>,
    ) -> impl Iterator<Item = Result<Facts>> + '_ {
        let start = match since {
            Some(t) => Self::facts_key(t, 0),
            None => b"c".to_vec(),
        };
        self.tree(Tree::Facts)
            .range(start..b"d".to_vec())
            .map(decode_facts)
    }

    /// Facts of every unresolved case.
    pub fn unresolved_facts(&self) -> impl Iterator<Item = Result<Facts>> + '_ {
        let tree = self.tree(Tree::Facts);
        tree.scan_prefix(b"u").filter_map(move |r| {
            let (k, v) = match r {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let (at, id) = unresolved_entry(&k, &v)?;
            let key = Self::facts_key(at, id);
            match tree.get(&key) {
                Ok(Some(f)) => Some(decode_facts(Ok((key.into(), f)))),
                Ok(None) => None,
                Err(e) => Some(Err(e.into())),
            }
        })
    }

    /// Every unresolved case's tier and opening time, without decoding
    /// its facts.
    pub fn unresolved(&self) -> impl Iterator<Item = Result<(String, DateTime<Utc>)>> + '_ {
        self.tree(Tree::Facts).scan_prefix(b"u").filter_map(|r| {
            let (k, v) = match r {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let (at, _) = unresolved_entry(&k, &v)?;
            let tier = String::from_utf8_lossy(v.get(8..).unwrap_or_default()).into_owned();
            Some(Ok((tier, at)))
        })
    }

    /// Unresolved cases by the tier holding them: stored counts, kept
    /// by `apply`, so this reads a handful of keys whatever the store's size.
    pub fn open_cases_by_tier(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut out = std::collections::BTreeMap::new();
        for r in self.tree(Tree::Meta).scan_prefix(OPEN_PREFIX) {
            let (k, v) = r?;
            let tier = String::from_utf8_lossy(&k[OPEN_PREFIX.len()..]).into_owned();
            let n = <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if n > 0 {
                out.insert(tier, n);
            }
        }
        Ok(out)
    }

    /// Adds an outbox entry's pending-index change to a batch.
    pub fn outbox_index(batch: &mut Batch, entry: &OutboxEntry) {
        let key = id_key(entry.id);
        match entry.state {
            OutboxState::Pending | OutboxState::Sending => {
                batch.put(Tree::OutboxPending, key, Vec::new())
            }
            OutboxState::Sent | OutboxState::Failed => batch.remove(Tree::OutboxPending, key),
        }
    }

    /// Builds the derived trees (facts, pending outbox) of a store
    /// written before they existed. Runs once; cheap when done.
    fn build_indexes(&self) -> Result<()> {
        const VERSION: &[u8] = b"5";
        let meta = self.tree(Tree::Meta);
        if meta.get(b"indexes")?.as_deref() == Some(VERSION) {
            return Ok(());
        }
        // Rebuilt from the cases: the counts start from nothing.
        for r in meta.scan_prefix(OPEN_PREFIX) {
            meta.remove(r?.0)?;
        }
        let facts = self.tree(Tree::Facts);
        for r in facts.scan_prefix(b"u") {
            facts.remove(r?.0)?;
        }
        let mut batch = Batch::default();
        for case in self.cases() {
            Self::case_ops(&mut batch, &case?)?;
            if batch.ops.len() > 3000 {
                self.apply(&std::mem::take(&mut batch))?;
            }
        }
        for entry in self.outbox() {
            Self::outbox_index(&mut batch, &entry?);
            if batch.ops.len() > 3000 {
                self.apply(&std::mem::take(&mut batch))?;
            }
        }
        // Version 5: Message-IDs by case, from the index by content.
        for r in self.tree(Tree::MessageIds).iter() {
            let (k, v) = r?;
            let Some(sep) = k.iter().rposition(|b| *b == 0) else {
                continue;
            };
            let Some(case) = v.get(..8) else {
                continue;
            };
            let mut key = k[..=sep].to_vec();
            key.extend_from_slice(case);
            batch.put(Tree::MessageCases, key, Vec::new());
            if batch.ops.len() > 3000 {
                self.apply(&std::mem::take(&mut batch))?;
            }
        }
        batch.put(Tree::Meta, "indexes", VERSION.to_vec());
        self.apply(&batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Cases whose timer is at or before `now`, earliest first.
    pub fn due_timers(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<CaseId>> {
        let end = Self::deadline_key(now, u64::MAX);
        let mut out = Vec::new();
        for r in self.tree(Tree::Deadlines).range(..=end).take(limit) {
            let (k, _) = r?;
            if let Ok(b) = <[u8; 8]>::try_from(&k[8..]) {
                out.push(u64::from_be_bytes(b));
            }
        }
        Ok(out)
    }

    /// Removes index entries of `case` at or before `now` that its
    /// record no longer has.
    pub fn drop_stale_timers(&self, case: CaseId, now: DateTime<Utc>) -> Result<()> {
        let end = Self::deadline_key(now, u64::MAX);
        let tree = self.tree(Tree::Deadlines);
        for r in tree.range(..=end) {
            let (k, _) = r?;
            if k.len() == 16 && k[8..] == id_key(case) {
                tree.remove(k)?;
            }
        }
        Ok(())
    }

    /// The earliest timer of all cases: the scheduler sleeps until then.
    pub fn next_timer(&self) -> Result<Option<DateTime<Utc>>> {
        let Some((k, _)) = self.tree(Tree::Deadlines).first()? else {
            return Ok(None);
        };
        let mut b = <[u8; 8]>::try_from(&k[..8]).unwrap_or([0; 8]);
        b[0] ^= 0x80;
        Ok(DateTime::from_timestamp_millis(i64::from_be_bytes(b)))
    }

    // --------------------------------------------------------- cursors

    pub fn cursor(&self, folder: &str) -> Result<Option<Cursor>> {
        self.get_json(Tree::Cursors, folder.as_bytes())
    }

    // ---------------------------------------------------------- outbox

    pub fn outbox_entry(&self, id: u64) -> Result<Option<OutboxEntry>> {
        self.get_json(Tree::Outbox, &id_key(id))
    }

    pub fn outbox(&self) -> impl Iterator<Item = Result<OutboxEntry>> + '_ {
        self.scan_json(Tree::Outbox)
    }

    /// Entries waiting to be sent, oldest first.
    pub fn outbox_pending(&self) -> Result<Vec<OutboxEntry>> {
        let mut out = Vec::new();
        for r in self.tree(Tree::OutboxPending).iter() {
            let (k, _) = r?;
            if let Some(e) = self.get_json::<OutboxEntry>(Tree::Outbox, &k)? {
                if matches!(e.state, OutboxState::Pending | OutboxState::Sending) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// How many entries wait to be sent.
    pub fn outbox_depth(&self) -> usize {
        self.tree(Tree::OutboxPending).len()
    }

    /// Writes one outbox entry (and optionally its case) atomically.
    pub fn put_outbox(&self, entry: &OutboxEntry, case: Option<&Case>) -> Result<()> {
        let mut b = Batch::default();
        b.put_json(Tree::Outbox, id_key(entry.id), entry)?;
        Self::outbox_index(&mut b, entry);
        if let Some(c) = case {
            Self::case_ops(&mut b, c)?;
        }
        self.apply(&b)
    }

    // ------------------------------------------------------ quarantine

    pub fn quarantined(&self) -> impl Iterator<Item = Result<QuarantineEntry>> + '_ {
        self.tree(Tree::Quarantine)
            .iter()
            .filter(|r| r.as_ref().map(|(k, _)| k.len() == 8).unwrap_or(true))
            .map(|r| {
                let (k, v) = r?;
                serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    key: format!("quarantine/{}", String::from_utf8_lossy(&k)),
                    source,
                })
            })
    }

    pub fn quarantine_entry(&self, id: u64) -> Result<Option<QuarantineEntry>> {
        self.get_json(Tree::Quarantine, &id_key(id))
    }

    /// Raw bytes of a quarantined message, under `id ++ "raw"`.
    pub fn quarantine_raw(&self, id: u64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .tree(Tree::Quarantine)
            .get(Self::quarantine_raw_key(id))?
            .map(|v| v.to_vec()))
    }

    pub fn quarantine_raw_key(id: u64) -> Vec<u8> {
        let mut k = id_key(id).to_vec();
        k.extend_from_slice(b"raw");
        k
    }

    /// Indexes a stored message (or our own mail, `suffix` "out") under
    /// its Message-ID: by content for duplicates, by case for threading.
    pub fn index_message_id(
        batch: &mut Batch,
        message_id: &str,
        suffix: &str,
        case: CaseId,
        seq: u64,
    ) {
        let mut v = id_key(case).to_vec();
        v.extend_from_slice(&id_key(seq));
        batch.put(
            Tree::MessageIds,
            Self::message_id_key(message_id, suffix),
            v,
        );
        let mut k = message_id.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&id_key(case));
        batch.put(Tree::MessageCases, k, Vec::new());
    }

    /// Is the exact message (by ID and content) already stored?
    pub fn has_message(&self, message_id: &str, content_hash: &str) -> Result<bool> {
        Ok(self
            .tree(Tree::MessageIds)
            .contains_key(Self::message_id_key(message_id, content_hash))?)
    }

    /// Numbers of stored messages, cases and pending outbox entries.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.tree(Tree::Cases).len(),
            self.tree(Tree::Messages).len(),
        )
    }
}

impl Lookup for Store {
    fn is_stored(&self, message_id: &str, content_hash: &str) -> bool {
        self.has_message(message_id, content_hash).unwrap_or(false)
    }

    fn cases_with_message_id(&self, message_id: &str) -> Vec<CaseId> {
        let mut prefix = message_id.as_bytes().to_vec();
        prefix.push(0);
        // Case order: the oldest cases first, so however many cases a
        // sender opens with a copied ID, the original's is looked at.
        self.tree(Tree::MessageCases)
            .scan_prefix(&prefix)
            .take(crate::thread::MAX_CASES_PER_ID)
            .filter_map(|r| r.ok())
            .filter_map(|(k, _)| <[u8; 8]>::try_from(k.get(prefix.len()..)?).ok())
            .map(u64::from_be_bytes)
            .collect()
    }

    fn case(&self, id: CaseId) -> Option<Case> {
        Store::case(self, id).ok().flatten()
    }
}

/// Raw messages above `INLINE_MAX` bytes, appended to one file. sled
/// rewrites whole tree nodes as they change, so big values inside it cost
/// several times their size in writes and disk; here each is written once.
/// Values in the raw tree are tagged: `INLINE` + bytes, or `POINTER` +
/// offset + length (untagged ones come from stores older than the log).
struct RawLog {
    file: std::fs::File,
    len: Mutex<u64>,
}

const INLINE_MAX: usize = 4096;
const INLINE: u8 = 0xFE;
const POINTER: u8 = 0xFF;

impl RawLog {
    fn open(path: &Path) -> std::io::Result<RawLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(RawLog {
            file,
            len: Mutex::new(len),
        })
    }

    /// The stored form of `value`, appending it to the log if big.
    fn encode(&self, value: &[u8]) -> Result<Vec<u8>> {
        use std::io::Write;
        if value.len() <= INLINE_MAX {
            let mut v = Vec::with_capacity(value.len() + 1);
            v.push(INLINE);
            v.extend_from_slice(value);
            return Ok(v);
        }
        let mut len = self.len.lock().unwrap_or_else(|p| p.into_inner());
        let offset = *len;
        if let Err(e) = (&self.file).write_all(value) {
            // A partial append: the end is wherever the file ends now.
            *len = self.file.metadata().map(|m| m.len()).unwrap_or(offset);
            return Err(sled::Error::Io(e).into());
        }
        *len = offset + value.len() as u64;
        let mut v = vec![POINTER];
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&(value.len() as u64).to_be_bytes());
        Ok(v)
    }

    fn decode(&self, stored: &[u8]) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        match stored.split_first() {
            Some((&INLINE, rest)) => Ok(rest.to_vec()),
            Some((&POINTER, rest)) if rest.len() == 16 => {
                let n = |b: &[u8]| u64::from_be_bytes(<[u8; 8]>::try_from(b).unwrap_or([0; 8]));
                let (offset, len) = (n(&rest[..8]), n(&rest[8..]));
                let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                self.file
                    .read_exact_at(&mut buf, offset)
                    .map_err(sled::Error::Io)?;
                Ok(buf)
            }
            _ => Ok(stored.to_vec()),
        }
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(sled::Error::Io)?;
        Ok(())
    }
}

/// Meta keys `open/<tier>`: how many unresolved cases the tier holds.
const OPEN_PREFIX: &[u8] = b"open/";

fn bump_open(
    meta: &sled::transaction::TransactionalTree,
    tier: &[u8],
    delta: i64,
) -> std::result::Result<(), sled::transaction::UnabortableTransactionError> {
    let mut key = OPEN_PREFIX.to_vec();
    key.extend_from_slice(tier);
    let n = meta
        .get(&key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    let n = n.saturating_add_signed(delta);
    if n == 0 {
        meta.remove(key)?;
    } else {
        meta.insert(key, &n.to_be_bytes())?;
    }
    Ok(())
}

/// An unresolved-index entry: the case's opening time and id.
fn unresolved_entry(k: &[u8], v: &[u8]) -> Option<(DateTime<Utc>, CaseId)> {
    let id = u64::from_be_bytes(<[u8; 8]>::try_from(k.get(1..9)?).ok()?);
    let ms = i64::from_be_bytes(<[u8; 8]>::try_from(v.get(..8)?).ok()?);
    Some((DateTime::from_timestamp_millis(ms)?, id))
}

fn decode_facts(r: sled::Result<(sled::IVec, sled::IVec)>) -> Result<Facts> {
    let (k, v) = r?;
    serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
        key: format!("facts/{}", String::from_utf8_lossy(&k)),
        source,
    })
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

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if path.is_dir() {
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_holding_a_message_id_come_oldest_first_each_once() {
        // Attack: a sender opens thousands of cases with a copied
        // Message-ID (contents tuned so their index keys sort first);
        // the original's case must still be among those looked at.
        use crate::thread::Lookup;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s")).unwrap();
        let mut b = Batch::default();
        for (case, hash) in [(9, "0000"), (3, "ffff"), (9, "0001"), (7, "0002")] {
            Store::index_message_id(&mut b, "alice-1@example.org", hash, case, case * 10);
        }
        s.apply(&b).unwrap();
        assert_eq!(
            s.cases_with_message_id("alice-1@example.org"),
            vec![3, 7, 9]
        );
        assert!(s.cases_with_message_id("alice-1@example.or").is_empty());
    }

    #[test]
    fn a_store_from_before_the_case_index_is_upgraded() {
        // A store written by the previous release has Message-IDs indexed
        // by content only; opening it builds the by-case index once.
        use crate::thread::Lookup;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let s = Store::open(&path).unwrap();
            let mut v = id_key(4).to_vec();
            v.extend_from_slice(&id_key(40));
            s.tree(Tree::MessageIds)
                .insert(Store::message_id_key("old@example.org", "hash"), v)
                .unwrap();
            s.tree(Tree::Meta).insert("indexes", b"4".to_vec()).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.cases_with_message_id("old@example.org"), vec![4]);
    }

    #[test]
    fn batch_is_atomic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let mut b = Batch::default();
        b.put(Tree::Meta, "next_case", 5u64.to_be_bytes().to_vec());
        b.put_json(
            Tree::Cursors,
            "INBOX",
            &Cursor {
                uid_validity: 9,
                last_uid: 3,
            },
        )
        .unwrap();
        s.apply(&b).unwrap();
        assert_eq!(s.counter("next_case").unwrap(), 5);
        assert_eq!(s.counter("next_other").unwrap(), 1);
        assert_eq!(
            s.cursor("INBOX").unwrap(),
            Some(Cursor {
                uid_validity: 9,
                last_uid: 3
            })
        );
    }

    #[test]
    fn store_dir_is_private_and_second_open_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let s = Store::open(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let key = *s.key();
        // sled locks per process with flock: a second open in the same
        // process is not refused by the OS, so the refusal between
        // processes is tested end to end in tests/.
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(*s.key(), key, "the key survives reopening");
    }

    #[test]
    fn deadline_keys_sort_by_time() {
        let a = DateTime::from_timestamp(1_000, 0).unwrap();
        let b = DateTime::from_timestamp(2_000, 0).unwrap();
        let early = DateTime::from_timestamp(-5, 0).unwrap();
        assert!(Store::deadline_key(a, 99) < Store::deadline_key(b, 1));
        assert!(Store::deadline_key(early, 99) < Store::deadline_key(a, 1));
    }

    #[test]
    fn auto_reply_counting_by_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let mut b = Batch::default();
        for (i, t) in [100, 200, 300].iter().enumerate() {
            let at = DateTime::from_timestamp(*t, 0).unwrap();
            b.put(
                Tree::AutoReplies,
                Store::auto_reply_key("a@x.org", at, i as u64),
                vec![],
            );
        }
        b.put(
            Tree::AutoReplies,
            Store::auto_reply_key("a@x.orgg", DateTime::from_timestamp(300, 0).unwrap(), 9),
            vec![],
        );
        s.apply(&b).unwrap();
        let since = DateTime::from_timestamp(150, 0).unwrap();
        assert_eq!(s.auto_replies_since("a@x.org", since, 10).unwrap(), 2);
        assert_eq!(s.auto_replies_since("a@x.org", since, 1).unwrap(), 1);
    }

    #[test]
    fn open_case_counts_follow_tier_changes_and_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let at = DateTime::from_timestamp(1_000, 0).unwrap();
        let write = |c: &Case| {
            let mut b = Batch::default();
            s.write_case(&mut b, None, c).unwrap();
            s.apply(&b).unwrap();
        };
        let mut a = Case::new(1, "a@x.org", "s", "T1", "m1", at);
        let b = Case::new(2, "b@x.org", "s", "T1", "m2", at);
        write(&a);
        write(&b);
        write(&a);
        let counts = |v: &[(&str, u64)]| -> std::collections::BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        assert_eq!(s.open_cases_by_tier().unwrap(), counts(&[("T1", 2)]));
        a.tier = "T2".into();
        write(&a);
        assert_eq!(
            s.open_cases_by_tier().unwrap(),
            counts(&[("T1", 1), ("T2", 1)])
        );
        a.status = Status::Resolved;
        write(&a);
        assert_eq!(s.open_cases_by_tier().unwrap(), counts(&[("T1", 1)]));
        assert_eq!(s.unresolved().count(), 1);
        // Reopening counts it again; a rebuilt index gives the same counts.
        a.status = Status::Open;
        write(&a);
        drop(s);
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.tree(Tree::Meta).remove("indexes").unwrap();
        s.build_indexes().unwrap();
        assert_eq!(
            s.open_cases_by_tier().unwrap(),
            counts(&[("T1", 1), ("T2", 1)])
        );
    }
}
