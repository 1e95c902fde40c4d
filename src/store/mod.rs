//! Store: everything escalator keeps — cases, messages with their raw
//! bytes, the indexes threading and the scheduler read, the outbox, the
//! quarantine, folder cursors, per-case facts for the KPIs — behind one
//! typed interface. Two engines sit behind it, sled (embedded, the
//! default) and PostgreSQL (`store/sled.rs`, `store/postgres.rs`, both
//! behind `store/engine.rs`); the trees, keys and their encoding
//! (`store/codec.rs`) are never seen outside this module.
//!
//! Reads are methods of [`Store`]; writes happen in [`Store::transact`]:
//! the closure reads (seeing its own writes) and writes through a [`Tx`],
//! and everything it wrote is committed atomically when it returns `Ok`,
//! or nothing if it returns an error. A read-modify-write inside one is
//! never lost to another: sled serialises transactions; PostgreSQL locks
//! each row read to be changed until the commit and writes a key found
//! missing only if it still is ([`StoreError::Conflict`] otherwise), so
//! the nodes of a cluster commit in parallel. PostgreSQL keeps each key
//! space in a table of its own with the records' fields as typed columns
//! for people (`store/columns.rs`).

pub use self::cluster::{LeaseRow, NodeInfo, NodeRow};
pub use self::migrate::Copied;
pub use self::postgres::{valid_schema, PgTls, DEFAULT_SCHEMA, MIN_POOL};
pub use self::read_ahead::{Lookups, Window};
pub use self::tx::{Savepoint, Tx};
pub use self::write::Fence;

mod cluster;
#[cfg(test)]
mod cluster_tests;
mod codec;
mod columns;
mod engine;
mod facts;
mod grants;
mod migrate;
#[cfg(test)]
mod migrate_tests;
mod postgres;
mod rawlog;
mod read_ahead;
mod sled;
#[cfg(test)]
mod tables_tests;
#[cfg(test)]
mod tests;
mod tx;
#[cfg(test)]
mod upgrade_tests;
mod write;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::case::{Case, CaseId, Event, Timer};
use crate::record::{Cursor, MessageRecord, OutboxEntry, QuarantineEntry, SmtpProblem};

/// Meta keys of the nodes' SMTP problems (see [`Store::set_smtp_problem`]).
const SMTP_PROBLEM: &[u8] = b"smtp_problem/";
/// Per mailbox address: when ingest last began a pass of its inbox that
/// it finished (see [`Store::set_read_through`]).
const READ_THROUGH: &[u8] = b"read_through/";
use crate::thread::Lookup;
use codec::{id_key, Tree};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (a running daemon) holds the store.
    #[error(
        "the store {0} is in use by another escalator process (is the daemon running?); \
         two processes on one store are not allowed"
    )]
    Locked(PathBuf),
    /// The database cannot be reached now (a connection lost or
    /// refused): nothing of the failed transaction was written, and a
    /// later try may work.
    #[error("the store's database cannot be reached: {0}")]
    Unavailable(String),
    /// A copy between engines cannot go on.
    #[error("cannot migrate the store: {0}")]
    Migrate(String),
    /// A daemon runs on the database while a store is being migrated
    /// into it (either way round).
    #[error(
        "the database is in use: a store migration and a daemon cannot run on it at the same \
         time (stop every daemon of the cluster, or wait for the migration to finish)"
    )]
    InUse,
    /// The transaction depended on a mailbox's lease that this node no
    /// longer holds: nothing of it was written.
    #[error("the lease on mailbox {0} was lost to another node; nothing was written for it")]
    Fenced(String),
    /// Another node wrote, while this transaction ran, a record it had
    /// found missing and meant to create (the same message stored from
    /// two mailboxes at once): nothing was written, and trying again
    /// sees the other node's record.
    #[error("another node wrote {0} meanwhile; nothing was written, and a retry sees it")]
    Conflict(String),
    /// A cluster operation on the embedded store, which has one process.
    #[error(
        "the embedded store (sled) has no cluster; several daemons need engine = \"postgres\""
    )]
    NotShared,
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
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The disk under the store failed a read or write.
    #[error("store input/output failed")]
    Io(#[source] std::io::Error),
    /// The raw-message log failed a read or write.
    #[error("the raw message log failed")]
    RawLog(#[source] std::io::Error),
    /// The engine failed in a way of its own.
    #[error("the store engine failed")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored record {key} cannot be read")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("stored record {key} is malformed")]
    Malformed { key: String },
    #[error("cannot encode a record")]
    Encode(#[source] serde_json::Error),
    #[error("cannot encode a record: {0}")]
    EncodeBinary(String),
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
    /// The store's secret could not be made.
    #[error("cannot make the store's secret key: {0}")]
    Random(String),
}

impl StoreError {
    /// A failure that may pass (the database restarting): workers retry
    /// with backoff instead of stopping the daemon.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::Conflict(_) => true,
            StoreError::Engine(e) => postgres::is_transient(e.as_ref()),
            _ => false,
        }
    }

    /// Must a mailbox watcher stop on this failure? Going on after a
    /// full disk could half-write the store, and after a lost lease
    /// another node has the mailbox; anything else is retried.
    pub fn stops_a_watcher(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull { .. }
                | StoreError::Fenced(_)
                | StoreError::Locked(_)
                | StoreError::InUse
                | StoreError::NotShared
        )
    }

    /// Could this failure be caused by what one transaction wrote (a
    /// value the database refuses) rather than by the store as a whole?
    /// Such a transaction is worth retrying in smaller parts, to find and
    /// set aside the one message at fault.
    pub fn may_belong_to_one_write(&self) -> bool {
        match self {
            StoreError::Engine(_) => !self.is_transient(),
            StoreError::Encode(_) | StoreError::EncodeBinary(_) => true,
            _ => false,
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Numbers handed out by the store, never twice: a number used by a
/// committed transaction is never handed out again, across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    Case,
    Message,
    Outbox,
    Quarantine,
}

impl Sequence {
    fn key(self) -> &'static str {
        match self {
            Sequence::Case => "next_case",
            Sequence::Message => "next_message",
            Sequence::Outbox => "next_outbox",
            Sequence::Quarantine => "next_quarantine",
        }
    }
}

/// The auto-reply index's key for every automatic mail, whoever it went
/// to: the global hourly limit counts these. No address is just `*`.
pub const ALL_RECIPIENTS: &str = "*";

/// Most cases looked at for one Message-ID (see [`Lookup`]).
pub use crate::thread::MAX_CASES_PER_ID;

pub struct Store {
    path: PathBuf,
    db: engine::Db,
    /// Serialises transactions in this process: a transaction's reads and
    /// its writes see no other writer in between.
    write: Mutex<()>,
    key: [u8; 32],
}

impl Store {
    /// Opens (creating, mode 0700) the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        create_private_dir(path).map_err(|source| StoreError::CreateDir {
            path: path.to_owned(),
            source,
        })?;
        let db = engine::Db::Sled(sled::SledDb::open(path)?);
        Store::with(path, db)
    }

    /// Opens the store in the PostgreSQL database at `url` (applying its
    /// schema migrations); `path` is this node's own directory (the sent
    /// journal, the control socket).
    /// `pool` is how many connections it opens (at least [`MIN_POOL`]).
    pub fn open_postgres(url: &str, tls: PgTls, pool: usize, path: &Path) -> Result<Store> {
        Store::open_postgres_in(url, tls, pool, DEFAULT_SCHEMA, path)
    }

    /// As [`Store::open_postgres`], with the tables in `schema` (`[store]
    /// schema`), created when missing.
    pub fn open_postgres_in(
        url: &str,
        tls: PgTls,
        pool: usize,
        schema: &str,
        path: &Path,
    ) -> Result<Store> {
        create_private_dir(path).map_err(|source| StoreError::CreateDir {
            path: path.to_owned(),
            source,
        })?;
        let db = postgres::PgDb::open(url, tls, pool, schema)?;
        Store::with(path, engine::Db::Postgres(Box::new(db)))
    }

    /// Connects to a PostgreSQL store without opening it: (user,
    /// database, whether its tables exist). Writes nothing.
    pub fn probe_postgres(url: &str, tls: PgTls, schema: &str) -> Result<(String, String, bool)> {
        postgres::PgDb::probe(url, tls, schema)
    }

    /// Is this store shared with other processes that write (PostgreSQL)?
    /// Their work reaches this one by [`Store::listen`], and by polling
    /// where a notification may be lost.
    pub fn is_shared(&self) -> bool {
        !self.db.is_local()
    }

    /// Reads made so far on PostgreSQL (round trips; sled: 0).
    #[cfg(test)]
    pub(crate) fn reads_made(&self) -> usize {
        match &self.db {
            engine::Db::Sled(_) => 0,
            engine::Db::Postgres(d) => d.reads.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Calls `wake` when another process commits mail to send or moves
    /// timers (PostgreSQL: LISTEN/NOTIFY; sled: never, nobody else writes).
    pub fn listen(&self, wake: impl Fn() + Send + 'static) -> Result<()> {
        match &self.db {
            engine::Db::Sled(_) => Ok(()),
            engine::Db::Postgres(pg) => pg.listen(wake),
        }
    }

    /// For a daemon: makes sure no migration writes into this store while
    /// it runs (sled: the open store is locked already; PostgreSQL: a
    /// shared lock every daemon of the cluster holds while it runs).
    pub fn lock_for_daemon(&self) -> Result<()> {
        self.lock_daemons(postgres::LockMode::Shared)
    }

    /// For `store migrate`: makes sure no daemon runs on this store while
    /// a store moves into it.
    pub fn lock_out_daemons(&self) -> Result<()> {
        self.lock_daemons(postgres::LockMode::Exclusive)
    }

    fn lock_daemons(&self, mode: postgres::LockMode) -> Result<()> {
        match &self.db {
            engine::Db::Sled(_) => Ok(()),
            engine::Db::Postgres(pg) => match pg.try_lock_daemon(mode)? {
                true => Ok(()),
                false => Err(StoreError::InUse),
            },
        }
    }

    fn with(path: &Path, db: engine::Db) -> Result<Store> {
        let mut store = Store {
            path: path.to_owned(),
            db,
            write: Mutex::new(()),
            key: [0; 32],
        };
        store.key = store.load_key()?;
        store.build_indexes()?;
        store.rebuild_lost_facts()?;
        store.bound_key_texts()?;
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
        if let Some(v) = self.db.get(Tree::Meta, b"key")? {
            if let Ok(k) = <[u8; 32]>::try_from(v.as_slice()) {
                return Ok(k);
            }
        }
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| StoreError::Random(e.to_string()))?;
        // Set once: a key written meanwhile wins, never two keys.
        let v = self.db.meta_set_once(b"key", &k)?;
        Ok(<[u8; 32]>::try_from(v.as_slice()).unwrap_or(k))
    }

    /// Refuses to write on when fewer than `min_free` + `need` bytes are
    /// free on the store's disk.
    pub fn ensure_space(&self, min_free: u64, need: u64) -> Result<()> {
        if !self.db.is_local() {
            return Ok(());
        }
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

    /// Makes everything committed so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()
    }

    pub async fn flush_async(&self) -> Result<()> {
        self.db.flush_async().await
    }

    /// Runs `f` as one transaction: its writes are committed together
    /// when it returns `Ok` (then its `on_commit` hooks run), and none
    /// of them when it returns an error (or panics).
    pub fn transact<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        // Called from async workers too: a transaction (its waits for the
        // store's lock, its round trips) must not hold up the other tasks
        // of a runtime worker (a lease renewal behind an ingest commit).
        crate::blocking(|| self.transact_here(f))
    }

    /// As [`Store::transact`], run again (at most three times in all)
    /// while its commit conflicts with another node's
    /// ([`StoreError::Conflict`], or a deadlock the database broke by
    /// rolling this one back): for work whose every decision is made
    /// inside the transaction, so a new run starts from nothing.
    pub fn transact_retrying<T>(&self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.transact(&mut f) {
                Err(StoreError::Conflict(what)) if tries < 3 => {
                    tracing::info!(
                        what,
                        "another node wrote the same record at once; trying again"
                    );
                }
                Err(StoreError::Engine(e)) if tries < 3 && postgres::is_rolled_back(e.as_ref()) => {
                    tracing::info!(error = %e, "the database rolled the transaction back (a deadlock with another node); trying again");
                }
                r => return r,
            }
        }
    }

    fn transact_here<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.db.begin()?;
        // Ends the engine's transaction however `f` leaves (an error, a
        // panic) unless it committed.
        let mut open = Open(&self.db, true);
        let mut tx = Tx {
            store: self,
            _guard: guard,
            overlay: BTreeMap::new(),
            timers: HashMap::new(),
            on_commit: Vec::new(),
            undo: Vec::new(),
            fence: None,
            reads: Default::default(),
            absent: Default::default(),
            scans: Default::default(),
        };
        let out = f(&mut tx)?;
        // Each key once, with its last value: a chunk of messages writes
        // the cursor, the counters and a busy case many times.
        let ops: Vec<write::Op> = std::mem::take(&mut tx.overlay)
            .into_iter()
            .map(|((t, k), v)| (t, k, v))
            .collect();
        open.1 = false;
        self.db
            .commit(&ops, &tx.absent.borrow(), tx.fence.as_ref())?;
        let hooks = std::mem::take(&mut tx.on_commit);
        drop(tx);
        for h in hooks {
            h();
        }
        Ok(out)
    }

    // ----------------------------------------------------------- reads

    fn get<T: DeserializeOwned>(&self, t: Tree, key: &[u8]) -> Result<Option<T>> {
        match self.db.get(t, key)? {
            None => Ok(None),
            Some(v) => codec::decode(t, key, &v).map(Some),
        }
    }

    fn scan<T: DeserializeOwned>(&self, t: Tree) -> impl Iterator<Item = Result<T>> + '_ {
        self.db
            .range(t, &[], None)
            .map(move |r| r.and_then(|(k, v)| codec::decode(t, &k, &v)))
    }

    /// A case's summary (its messages: [`Store::case_messages`], its
    /// history: [`Store::history`]).
    pub fn case(&self, id: CaseId) -> Result<Option<Case>> {
        match self.db.get(Tree::Cases, &id_key(id))? {
            None => Ok(None),
            Some(v) => codec::decode(Tree::Cases, &id_key(id), &v).map(Some),
        }
    }

    pub fn cases(&self) -> impl Iterator<Item = Result<Case>> + '_ {
        self.db
            .range(Tree::Cases, &[], None)
            .map(|r| r.and_then(|(k, v)| codec::decode(Tree::Cases, &k, &v)))
    }

    /// A case's history, oldest first.
    pub fn history(&self, id: CaseId) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for r in self.db.prefix(Tree::History, &id_key(id)) {
            let (k, v) = r?;
            let events: Vec<Event> = codec::decode(Tree::History, &k, &v)?;
            out.extend(events);
        }
        Ok(out)
    }

    /// The keys of a case's messages, in arrival order.
    pub fn case_messages(&self, id: CaseId) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for r in self.db.prefix(Tree::CaseMessages, &id_key(id)) {
            let (k, v) = r?;
            out.push(codec::read_u64(&v).ok_or_else(|| StoreError::Malformed {
                key: format!("CaseMessages/{}", String::from_utf8_lossy(&k)),
            })?);
        }
        Ok(out)
    }

    pub fn message(&self, seq: u64) -> Result<Option<MessageRecord>> {
        self.get(Tree::Messages, &id_key(seq))
    }

    /// A stored message's bytes.
    pub fn raw(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.db.get(Tree::Raw, &id_key(seq))
    }

    /// Is the exact message (by ID and content) already stored?
    pub fn has_message(&self, message_id: &str, content_hash: &str) -> Result<bool> {
        self.db.contains(
            Tree::MessageIds,
            &codec::message_id_key(message_id, content_hash),
        )
    }

    /// The cases holding a message with this ID, oldest first, each once,
    /// at most [`MAX_CASES_PER_ID`]: however many cases a sender opens
    /// with a copied ID, the original's is among them.
    pub fn cases_with_message_id(&self, message_id: &str) -> Result<Vec<CaseId>> {
        let prefix = codec::pair_key(message_id, &[]);
        let mut out = Vec::new();
        for r in self
            .db
            .prefix(Tree::MessageCases, &prefix)
            .take(MAX_CASES_PER_ID)
        {
            let (k, _) = r?;
            if let Some(id) = codec::read_u64(&k[prefix.len()..]) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Cases whose timer is at or before `now`, earliest first.
    pub fn due_timers(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<CaseId>> {
        let end = codec::deadline_key(now, u64::MAX);
        let mut out = Vec::new();
        for r in self.db.range(Tree::Deadlines, &[], Some(&end)).take(limit) {
            let (k, _) = r?;
            if let Some(id) = k.get(8..).and_then(codec::read_u64) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The earliest timer of all cases: the scheduler sleeps until then.
    pub fn next_timer(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .db
            .first_key(Tree::Deadlines)?
            .and_then(|k| codec::deadline_at(&k)))
    }

    /// Where reading `folder` of queue `queue` got to.
    pub fn cursor(&self, queue: &str, folder: &str) -> Result<Option<Cursor>> {
        self.get(Tree::Cursors, &codec::cursor_key(queue, folder))
    }

    pub fn outbox_entry(&self, id: u64) -> Result<Option<OutboxEntry>> {
        self.get(Tree::Outbox, &id_key(id))
    }

    /// An outgoing mail's bytes (None once pruned after `keep_sent`).
    pub fn outbox_raw(&self, id: u64) -> Result<Option<Vec<u8>>> {
        self.db.get(Tree::Raw, &codec::outbox_raw_key(id))
    }

    pub fn outbox(&self) -> impl Iterator<Item = Result<OutboxEntry>> + '_ {
        self.scan(Tree::Outbox)
    }

    /// Entries waiting to be sent, oldest first.
    pub fn outbox_pending(&self) -> Result<Vec<OutboxEntry>> {
        let mut out = Vec::new();
        for r in self.db.range(Tree::OutboxPending, &[], None) {
            let (k, _) = r?;
            if let Some(e) = self.get::<OutboxEntry>(Tree::Outbox, &k)? {
                if e.state.is_pending() {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Records that every message delivered to `address`'s inbox before
    /// `at` has been ingested (a pass that began at `at` went through
    /// all it found). The outbox waits for this before it decides that
    /// an interrupted send's confirmation copy never came: a copy behind
    /// a backlog of customer mail has arrived but is not read yet. Only
    /// ever moves forward.
    pub fn set_read_through(&self, address: &str, at: DateTime<Utc>) -> Result<()> {
        let key = [READ_THROUGH, address.to_ascii_lowercase().as_bytes()].concat();
        self.transact(|tx| {
            let old = tx
                .get_bytes(Tree::Meta, &key)?
                .and_then(|v| codec::read_u64(&v));
            let new = u64::try_from(at.timestamp_millis()).unwrap_or(0);
            if old.is_none_or(|old| old < new) {
                tx.put(Tree::Meta, key.clone(), new.to_be_bytes().to_vec());
            }
            Ok(())
        })
    }

    /// Until when `address`'s inbox has been read through (None: no
    /// pass has finished yet).
    pub fn read_through(&self, address: &str) -> Result<Option<DateTime<Utc>>> {
        let key = [READ_THROUGH, address.to_ascii_lowercase().as_bytes()].concat();
        Ok(self
            .db
            .get(Tree::Meta, &key)?
            .and_then(|v| codec::read_u64(&v))
            .and_then(|ms| DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)))
    }

    /// Records why a node's SMTP server refuses its mail (one record per
    /// server and node).
    pub fn set_smtp_problem(&self, problem: &SmtpProblem) -> Result<()> {
        let key = [
            SMTP_PROBLEM,
            problem.server.as_bytes(),
            b"\0",
            problem.node.as_bytes(),
        ]
        .concat();
        let value = serde_json::to_vec(problem).map_err(StoreError::Encode)?;
        self.transact(|tx| {
            tx.put(Tree::Meta, key, value);
            Ok(())
        })
    }

    /// Clears the records of `server`, every node's: mail went out
    /// through it.
    pub fn clear_smtp_problems(&self, server: &str) -> Result<()> {
        let prefix = [SMTP_PROBLEM, server.as_bytes(), b"\0"].concat();
        let mut keys = Vec::new();
        for r in self.db.prefix(Tree::Meta, &prefix) {
            keys.push(r?.0);
        }
        if keys.is_empty() {
            return Ok(());
        }
        self.transact(|tx| {
            for k in keys {
                tx.remove(Tree::Meta, k);
            }
            Ok(())
        })
    }

    /// Every node's SMTP problem, as recorded.
    pub fn smtp_problems(&self) -> Result<Vec<SmtpProblem>> {
        let mut out = Vec::new();
        for r in self.db.prefix(Tree::Meta, SMTP_PROBLEM) {
            let (k, v) = r?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// How many entries wait to be sent.
    pub fn outbox_depth(&self) -> Result<usize> {
        self.db.len(Tree::OutboxPending)
    }

    pub fn quarantined(&self) -> impl Iterator<Item = Result<QuarantineEntry>> + '_ {
        self.db
            .range(Tree::Quarantine, &[], None)
            .filter(|r| r.as_ref().map(|(k, _)| k.len() == 8).unwrap_or(true))
            .map(|r| r.and_then(|(k, v)| codec::decode(Tree::Quarantine, &k, &v)))
    }

    pub fn quarantine_entry(&self, id: u64) -> Result<Option<QuarantineEntry>> {
        self.get(Tree::Quarantine, &id_key(id))
    }

    /// Raw bytes of a quarantined message.
    pub fn quarantine_raw(&self, id: u64) -> Result<Option<Vec<u8>>> {
        self.db
            .get(Tree::Quarantine, &codec::quarantine_raw_key(id))
    }

    /// Numbers of stored cases and messages.
    pub fn counts(&self) -> Result<(usize, usize)> {
        Ok((self.db.len(Tree::Cases)?, self.db.len(Tree::Messages)?))
    }

    /// Unresolved cases by the tier holding them: counts kept in step by
    /// every case write, so this reads a handful of keys (PostgreSQL:
    /// counted from the cases table's index).
    pub fn open_cases_by_tier(&self) -> Result<BTreeMap<String, u64>> {
        if let engine::Db::Postgres(pg) = &self.db {
            return pg.open_by_tier();
        }
        let mut out = BTreeMap::new();
        for r in self.db.prefix(Tree::Meta, codec::OPEN_PREFIX) {
            let (k, v) = r?;
            let tier = String::from_utf8_lossy(&k[codec::OPEN_PREFIX.len()..]).into_owned();
            let n = codec::read_u64(&v).unwrap_or(0);
            if n > 0 {
                out.insert(tier, n);
            }
        }
        Ok(out)
    }

    // ----------------------------------------------------- maintenance

    /// Drops the bytes of mail sent before `cutoff` (the entries stay, for
    /// the CLI and the KPIs), going on from where the last call stopped
    /// and looking at most at `limit` entries. Entries are in creation
    /// order, so the walk stops at the first one created after `cutoff`.
    /// Returns how many mails lost their bytes.
    pub fn prune_sent(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<usize> {
        self.transact(|tx| {
            let from = tx.meta_u64("pruned_outbox_upto")?.unwrap_or(1);
            let mut next = from;
            let mut pruned = 0;
            let entries: Vec<(Vec<u8>, Vec<u8>)> = self
                .db
                .range(Tree::Outbox, &id_key(from), None)
                .take(limit)
                .collect::<Result<_>>()?;
            for (k, v) in entries {
                let e: OutboxEntry = codec::decode(Tree::Outbox, &k, &v)?;
                if e.created_at >= cutoff {
                    break;
                }
                // Unsent (pending, failed) mail keeps its bytes for a
                // retry; sent mail (bounced later or not) needs them no more.
                if matches!(
                    e.state,
                    crate::record::OutboxState::Sent | crate::record::OutboxState::Bounced
                ) && e.sent_at.is_some_and(|t| t < cutoff)
                {
                    tx.remove(Tree::Raw, codec::outbox_raw_key(e.id));
                    pruned += 1;
                }
                next = e.id + 1;
            }
            if next != from {
                tx.set_meta_u64("pruned_outbox_upto", next);
            }
            Ok(pruned)
        })
    }

    /// Drops automatic-mail records older than `cutoff` (they only count
    /// for the limits' windows). Returns how many.
    pub fn prune_auto_replies(&self, cutoff: DateTime<Utc>) -> Result<usize> {
        let cut = cutoff.timestamp_millis();
        self.transact(|tx| {
            let mut n = 0;
            let keys: Vec<Vec<u8>> = self
                .db
                .range(Tree::AutoReplies, &[], None)
                .map(|r| r.map(|(k, _)| k))
                .collect::<Result<_>>()?;
            for k in keys {
                // Key: recipient, 0, time (8 bytes), outbox id (8 bytes).
                let Some(at) = k.len().checked_sub(16).and_then(|i| k.get(i..i + 8)) else {
                    continue;
                };
                let at = i64::from_be_bytes(at.try_into().unwrap_or([0; 8]));
                if at < cut {
                    tx.remove(Tree::AutoReplies, k);
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// The index version `build_indexes` is to build; None when the
    /// store has it. 8, on PostgreSQL only: the KPI facts one row per
    /// case (turned so when the database was brought up to date, which
    /// also sets 8; a store converted from `escalator_kv` arrives with 7
    /// and needs nothing more). A release that knows only 7 rebuilds its
    /// indexes when it finds 8, writes a facts bucket and is refused
    /// (`facts_per_case`), so it stops at start instead of running beside
    /// this one (where every case write of it would fail, and each
    /// message be quarantined).
    fn indexes_to_build(&self) -> Result<Option<&'static [u8]>> {
        let version = if self.db.is_local() {
            b"7"
        } else {
            SHARED_INDEXES
        };
        let have = self.db.get(Tree::Meta, b"indexes")?;
        if have.as_deref() == Some(version) {
            return Ok(None);
        }
        if have.as_deref() == Some(b"7") && !self.db.is_local() {
            self.transact(|tx| {
                tx.put(Tree::Meta, b"indexes".to_vec(), version.to_vec());
                Ok::<_, StoreError>(())
            })?;
            return Ok(None);
        }
        Ok(Some(version))
    }

    /// Builds the derived indexes (facts, open counts, pending outbox,
    /// Message-IDs by case) of a store written before they existed. Runs
    /// once per index version; cheap when done.
    fn build_indexes(&self) -> Result<()> {
        let Some(version) = self.indexes_to_build()? else {
            return Ok(());
        };
        // Rebuilt from the records: the counts start from nothing.
        self.transact(|tx| {
            for r in self.db.prefix(Tree::Meta, codec::OPEN_PREFIX) {
                tx.remove(Tree::Meta, r?.0);
            }
            for r in self.db.prefix(Tree::Facts, b"u") {
                tx.remove(Tree::Facts, r?.0);
            }
            Ok::<_, StoreError>(())
        })?;
        self.bucket_old_facts()?;
        let cases: Vec<CaseId> = self
            .db
            .range(Tree::Cases, &[], None)
            .map(|r| r.map(|(k, _)| codec::read_u64(&k).unwrap_or(0)))
            .collect::<Result<_>>()?;
        for chunk in cases.chunks(500) {
            self.transact(|tx| {
                for id in chunk {
                    let key = id_key(*id);
                    let Some(v) = tx.get_bytes(Tree::Cases, &key)? else {
                        continue;
                    };
                    if codec::is_legacy_case(&v) {
                        tx.convert_legacy_case(&key, &v)?;
                    } else {
                        let case = codec::decode(Tree::Cases, &key, &v)?;
                        tx.case_indexes(&case)?;
                    }
                }
                Ok::<_, StoreError>(())
            })?;
        }
        // In batches: on a large PostgreSQL store one transaction over
        // every outbox entry and Message-ID would hold the store's lock
        // past the statement timeout. Each batch only adds index entries,
        // so a rebuild cut short is simply done again at the next open
        // (the version is written last).
        let entries: Vec<OutboxEntry> = self.outbox().collect::<Result<_>>()?;
        for chunk in entries.chunks(2000) {
            self.transact(|tx| {
                for entry in chunk {
                    tx.outbox_index(entry);
                }
                Ok::<_, StoreError>(())
            })?;
        }
        // Version 5: Message-IDs by case, from the index by content.
        let mut by_case = Vec::new();
        for r in self.db.range(Tree::MessageIds, &[], None) {
            let (k, v) = r?;
            let (Some(sep), Some(case)) = (k.iter().rposition(|b| *b == 0), v.get(..8)) else {
                continue;
            };
            let mut key = k[..=sep].to_vec();
            key.extend_from_slice(case);
            by_case.push(key);
        }
        for chunk in by_case.chunks(2000) {
            self.transact(|tx| {
                for key in chunk {
                    tx.put(Tree::MessageCases, key.clone(), Vec::new());
                }
                Ok::<_, StoreError>(())
            })?;
        }
        self.transact(|tx| {
            tx.put(Tree::Meta, b"indexes".to_vec(), version.to_vec());
            Ok::<_, StoreError>(())
        })?;
        self.db.flush()
    }
}

/// The index version of a store on PostgreSQL (see `build_indexes`).
pub(super) const SHARED_INDEXES: &[u8] = b"8";

impl Store {
    /// Rewrites keys an older release made of a sender's text as it was,
    /// however long (see [`codec::KEY_TEXT_MAX`]): they are found again
    /// under the key the text has now. Once per store, in batches, so a
    /// large store never holds the lock for long.
    fn bound_key_texts(&self) -> Result<()> {
        const DONE: &[u8] = b"key_texts";
        if self.db.get(Tree::Meta, DONE)?.is_some() {
            return Ok(());
        }
        let spaces = [
            (Tree::MessageIds, None),
            (Tree::MessageCases, Some(8)),
            (Tree::Customers, Some(8)),
            (Tree::AutoReplies, Some(16)),
        ];
        for (tree, tail) in spaces {
            let mut moves = Vec::new();
            for r in self.db.range(tree, &[], None) {
                let (k, v) = r?;
                if let Some(new) = codec::bounded_key(&k, tail) {
                    moves.push((k, new, v));
                }
            }
            for chunk in moves.chunks(500) {
                self.transact(|tx| {
                    for (old, new, v) in chunk {
                        tx.remove(tree, old.clone());
                        tx.put(tree, new.clone(), v.clone());
                    }
                    Ok::<_, StoreError>(())
                })?;
            }
        }
        self.transact(|tx| {
            tx.put(Tree::Meta, DONE.to_vec(), b"1".to_vec());
            Ok::<_, StoreError>(())
        })?;
        self.db.flush()
    }
}

/// An engine transaction to end if its store transaction did not commit.
struct Open<'d>(&'d engine::Db, bool);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.1 {
            let _ = self.0.abort();
        }
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
impl Store {
    /// Every key space's name, row count and digest (SHA-256 over each
    /// key and value, length-prefixed, in key order), leaving out the
    /// meta keys under `skip_meta`: a store converted from one layout to
    /// another keeps these.
    pub(crate) fn tree_digests(
        &self,
        skip_meta: &[&str],
    ) -> Result<Vec<(&'static str, usize, String)>> {
        use sha2::{Digest, Sha256};
        let mut out = Vec::new();
        for (tree, name) in codec::TREES {
            let (mut n, mut h) = (0, Sha256::new());
            for r in self.db.range(tree, &[], None) {
                let (k, _) = r?;
                if tree == Tree::Meta && skip_meta.iter().any(|p| k.starts_with(p.as_bytes())) {
                    continue;
                }
                // Through `get`: sled's raw tree holds where the bytes are.
                let v = self.db.get(tree, &k)?.unwrap_or_default();
                h.update((k.len() as u64).to_be_bytes());
                h.update(&k);
                h.update((v.len() as u64).to_be_bytes());
                h.update(&v);
                n += 1;
            }
            let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            out.push((name, n, digest));
        }
        Ok(out)
    }
}
