//! The PostgreSQL engine: the store's key spaces as rows of one table
//! (`migrations/postgres/`), so every node of a cluster reads and writes
//! the same store.
//!
//! Connections ("lanes"), each owned by a thread of its own: the store's
//! interface is synchronous and is called from tokio tasks, where a
//! blocking client must not start its own runtime. Callers hand a lane a
//! job and wait for its answer. One lane runs the store's transactions
//! and nothing else; the others (`[store] pool` minus one) serve reads
//! and the cluster's leases and heartbeats, which must never run inside
//! a store transaction (a rollback would undo them).
//!
//! Transactions: [`PgDb::begin`] opens a PostgreSQL transaction (READ
//! COMMITTED). There is no store-wide lock: a row the transaction reads
//! to change it is locked until it ends ([`PgDb::get_for_update`]), a
//! key it found missing is written at commit only if still missing
//! ([`rows`]), and numbers come from sequences, so nodes working on
//! other rows commit in parallel. Its writes are applied at
//! [`PgDb::commit`] with the COMMIT. Reads of rows that never change
//! once written (stored mail) may run on another lane.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use ::postgres::config::SslMode;
use ::postgres::{Client, NoTls};
use tokio_rustls::rustls::ClientConfig;

use super::codec::{prefix_end, Tree, TREES};
use super::write::{Fence, Op};

mod batch;
mod kpis;
mod rows;
mod upgrade;
use super::StoreError;

/// The advisory lock a daemon holds (shared) while it runs; `store
/// migrate` takes it exclusive, so no daemon writes while a store moves.
const DAEMON_LOCK: i64 = 0x6573_636e;
/// The advisory lock migrations run under.
const MIGRATE_LOCK: i64 = 0x6573_636d;
/// Rows fetched per round trip when scanning a range.
const PAGE: i64 = 1000;

/// Versioned schema migrations, applied in order, each once, in the
/// store's schema (`{schema}` in their text). Versions 1 and 2 made the
/// single table `escalator_kv` of older releases (see [`upgrade`]).
const MIGRATIONS: [(i32, &str); 2] = [
    (3, include_str!("../../migrations/postgres/0003_tables.sql")),
    (
        4,
        include_str!("../../migrations/postgres/0004_case_kpis.sql"),
    ),
];

/// The schema a store's tables live in unless `[store] schema` says.
pub const DEFAULT_SCHEMA: &str = "escalator";

/// Is `name` a schema name the store takes: a plain lower-case SQL
/// identifier (it is put into statements, quoted), not one of the
/// schemas other software shares.
pub fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
        && !name.starts_with("pg_")
        // Schemas other software keeps its own tables in.
        && !matches!(name, "public" | "information_schema")
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// The connection thread's state: the client (None after it was lost,
/// until the next call reconnects), and whether a store transaction is
/// open on it. A connection lost inside a transaction is not replaced
/// until that transaction has ended (its writes were never committed;
/// reads of a new connection would not hold its lock).
struct Session {
    config: ::postgres::Config,
    tls: PgTls,
    client: Option<Client>,
    in_tx: bool,
    lost_in_tx: bool,
    /// The daemon lock this connection holds: taken again on a new
    /// connection (a session lock dies with its connection).
    daemon_lock: Option<LockMode>,
}

/// How the daemon lock is held: by every daemon of a cluster (shared),
/// or by one `store migrate` alone (exclusive).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LockMode {
    Shared,
    Exclusive,
}

impl LockMode {
    fn sql(self) -> &'static str {
        match self {
            LockMode::Shared => "SELECT pg_try_advisory_lock_shared($1)",
            LockMode::Exclusive => "SELECT pg_try_advisory_lock($1)",
        }
    }
}

/// Where a call stands in a store transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Begin,
    End,
    Inside,
}

impl Session {
    fn connect(&self) -> Result<Client, postgres::Error> {
        let mut config = self.config.clone();
        let mut client = match &self.tls {
            PgTls::Plain => config.ssl_mode(SslMode::Disable).connect(NoTls)?,
            // TLS is required, never "preferred": a server (or a man in
            // the middle) that declines it is refused.
            PgTls::Verify(tls) => config.ssl_mode(SslMode::Require).connect(
                tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone()),
            )?,
        };
        // A statement that hangs (a lost server, a lock held by a stuck
        // node) fails after a minute instead of holding the daemon.
        client.batch_execute("SET statement_timeout = '60s'")?;
        // Waiting for the store's lock is bounded well below that, and the
        // failure is transient (see [`is_transient`]): a node stuck while
        // holding it is ended by the idle limit below within 30 s, and
        // the waiting nodes try again instead of failing their work.
        client.batch_execute(&format!("SET lock_timeout = '{}s'", LOCK_WAIT.as_secs()))?;
        // A node paused or cut off inside a store transaction would hold
        // the store's lock, and so every node's writes, for as long as it
        // is stuck: the server ends such a session after 30 s idle
        // (nothing of its transaction is written). The transactions' lane
        // is idle while the node reads on other lanes and works out a
        // chunk of messages, seconds on a loaded machine: hence not less.
        client.batch_execute("SET idle_in_transaction_session_timeout = '30s'")?;
        Ok(client)
    }

    fn run<T>(
        &mut self,
        mark: Mark,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        if self.lost_in_tx {
            if mark == Mark::End {
                self.lost_in_tx = false;
                self.in_tx = false;
            }
            return Err(StoreError::Unavailable(
                "the connection to PostgreSQL was lost inside a transaction; nothing of it was \
                 committed"
                    .into(),
            ));
        }
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            // Statements belong to the connection that prepared them.
            STATEMENTS.with(|s| s.borrow_mut().clear());
            let mut c = match self.connect() {
                Ok(c) => c,
                Err(e) => return Err(StoreError::Unavailable(crate::error_chain(&e))),
            };
            if let Some(mode) = self.daemon_lock {
                let got = c
                    .query_one(mode.sql(), &[&DAEMON_LOCK])
                    .map(|r| r.get::<_, bool>(0));
                match got {
                    Ok(true) => {}
                    // A migration started while our connection was down.
                    Ok(false) => return Err(StoreError::InUse),
                    Err(e) => return Err(StoreError::Unavailable(crate::error_chain(&e))),
                }
            }
            self.client = Some(c);
        }
        let Some(client) = self.client.as_mut() else {
            return Err(StoreError::Unavailable("no connection".into()));
        };
        let r = f(client);
        if client.is_closed() {
            self.client = None;
            if self.in_tx && mark != Mark::End {
                self.lost_in_tx = true;
            }
            if mark == Mark::End {
                self.in_tx = false;
            }
            return Err(StoreError::Unavailable(match r {
                Err(e) => crate::error_chain(&e),
                Ok(_) => "the connection to PostgreSQL closed".into(),
            }));
        }
        match (mark, &r) {
            (Mark::Begin, Ok(_)) => self.in_tx = true,
            (Mark::End, _) => self.in_tx = false,
            _ => {}
        }
        r.map_err(engine)
    }
}

impl Session {
    fn new(config: ::postgres::Config, tls: PgTls) -> Session {
        Session {
            config,
            tls,
            client: None,
            in_tx: false,
            lost_in_tx: false,
            daemon_lock: None,
        }
    }
}

impl Lane {
    /// Starts the lane's thread; the first lane also brings the schema
    /// up to date before it answers.
    fn start(
        config: &::postgres::Config,
        tls: &PgTls,
        schema: Option<&Tables>,
    ) -> Result<Lane, StoreError> {
        let mut session = Session::new(config.clone(), tls.clone());
        let schema = schema.cloned();
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel();
        std::thread::Builder::new()
            .name("escalator-postgres".into())
            .spawn(move || {
                let connected = match &schema {
                    Some(t) => session
                        .run(Mark::Inside, |c| upgrade::bring_up_to_date(c, t))
                        .and_then(|r| r),
                    None => session.run(Mark::Inside, |_| Ok(())),
                };
                let _ = ready.send(connected);
                for job in rx {
                    job(&mut session);
                }
            })
            .map_err(|e| StoreError::Engine(Box::new(e)))?;
        started.recv().map_err(|_| gone())??;
        Ok(Lane { jobs })
    }

    fn call<T: Send + 'static>(
        &self,
        mark: Mark,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move |s: &mut Session| {
                let _ = tx.send(s.run(mark, f));
            }))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

/// How the connection is protected.
#[derive(Clone)]
pub enum PgTls {
    /// No TLS (the caller has checked the server is on this machine, or
    /// that the admin allowed it).
    Plain,
    /// TLS with certificate and host-name checks (the IMAP/SMTP setup).
    Verify(Arc<ClientConfig>),
}

/// One connection and the thread that owns it.
struct Lane {
    jobs: mpsc::Sender<Job>,
}

/// The store's schema, quoted, as statements name it: `"escalator"`.
/// Its tables are `{schema}.cases` and so on ([`Tables::of`]).
#[derive(Clone, Debug)]
pub(super) struct Tables(Arc<str>);

impl Tables {
    pub(super) fn new(schema: &str) -> Result<Tables, StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError::Engine(
                format!("{schema:?} is not a schema name escalator takes").into(),
            ));
        }
        Ok(Tables(format!("\"{schema}\"").into()))
    }

    /// The table of a key space.
    pub(super) fn of(&self, t: Tree) -> String {
        format!("{}.{}", self.0, TREES[t.index()].1)
    }
}

impl std::fmt::Display for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(super) struct PgDb {
    /// Runs the store's transactions (begin, commit, abort) only.
    tx: Lane,
    /// Reads, leases, heartbeats: never inside a store transaction.
    others: Vec<Lane>,
    next: AtomicUsize,
    /// Numbers taken from each sequence and not handed out yet, by
    /// [`super::Sequence`].
    ids: std::sync::Mutex<[VecDeque<u64>; 4]>,
    /// Reads made (round trips), for the tests that hold ingest to a
    /// few a chunk.
    #[cfg(test)]
    pub(super) reads: AtomicUsize,
    /// For connections of their own (the listener).
    config: ::postgres::Config,
    tls: PgTls,
    tables: Tables,
}

thread_local! {
    /// A lane's prepared statements by their text (each lane is a thread
    /// with one connection): a query then costs one round trip, not two
    /// (prepare, then execute).
    static STATEMENTS: std::cell::RefCell<std::collections::HashMap<String, ::postgres::Statement>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// This thread is inside a store transaction (between begin and
    /// commit or abort).
    static IN_TX: Cell<bool> = const { Cell::new(false) };
    /// The lane this thread reads on outside transactions.
    static LANE: std::cell::OnceCell<usize> = const { std::cell::OnceCell::new() };
}

/// The statement for `sql` on this lane's connection, prepared once.
fn prepared(c: &mut Client, sql: &str) -> Result<::postgres::Statement, postgres::Error> {
    if let Some(st) = STATEMENTS.with(|s| s.borrow().get(sql).cloned()) {
        return Ok(st);
    }
    let st = c.prepare(sql)?;
    STATEMENTS.with(|s| s.borrow_mut().insert(sql.to_string(), st.clone()));
    Ok(st)
}

/// The fewest connections a store opens: one for transactions, one for
/// the rest.
pub const MIN_POOL: usize = 2;

/// The channel a commit that queued mail or moved timers notifies: the
/// other processes on the database wake their workers.
const CHANNEL: &str = "escalator_work";

/// How long a transaction waits for the store's lock before it fails
/// (transiently) and is tried again.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Is this engine failure one that passes by itself: a lost connection,
/// a lock not had in time, a cancelled statement, a server shutting down
/// or short of resources? Anything else (a value the database refuses)
/// may belong to what one transaction wrote.
pub(super) fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let Some(pg) = e.downcast_ref::<postgres::Error>() else {
        return false;
    };
    if pg.is_closed() {
        return true;
    }
    let Some(code) = pg.code() else {
        return false;
    };
    let code = code.code();
    // A statement cancelled by `statement_timeout` (57014) may be one
    // chunk's write too large to finish in time: it is split, not
    // retried whole forever.
    code != "57014"
        && ["08", "40", "53", "57", "58"]
            .iter()
            .any(|class| code.starts_with(class))
        || code == "55P03" // lock_not_available
        || code == "25P02" // in_failed_sql_transaction
}

/// Did the database roll the transaction back for the sake of another
/// (a deadlock, a serialization failure: SQLSTATE class 40)? Running it
/// again at once is what the database asks for.
pub(super) fn is_rolled_back(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<postgres::Error>()
        .and_then(|pg| pg.code())
        .is_some_and(|c| c.code().starts_with("40"))
}

fn engine(e: postgres::Error) -> StoreError {
    StoreError::Engine(Box::new(e))
}

fn gone() -> StoreError {
    StoreError::Engine("the PostgreSQL connection thread stopped".into())
}

impl PgDb {
    /// Connects as the store would and reads who and where it is, and
    /// whether the store's tables are there (or an older release's single
    /// table): changes nothing (no schema, no lock), for `check-config
    /// --connect` beside a running cluster.
    pub(super) fn probe(
        url: &str,
        tls: PgTls,
        schema: &str,
    ) -> Result<(String, String, bool), StoreError> {
        let tables = Tables::new(schema)?;
        let mut config: ::postgres::Config = url.parse().map_err(engine)?;
        // A host that drops packets answers nothing for minutes.
        config.connect_timeout(std::time::Duration::from_secs(10));
        let mut client = Session::new(config, tls).connect().map_err(engine)?;
        let row = client
            .query_one(
                "SELECT current_user::text, current_database()::text, \
                 to_regclass($1) IS NOT NULL OR to_regclass('escalator_kv') IS NOT NULL",
                &[&tables.of(Tree::Cases)],
            )
            .map_err(engine)?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// Connects `pool` connections (at least [`MIN_POOL`]), and brings
    /// the schema up to date (converting an older release's table).
    pub(super) fn open(
        url: &str,
        tls: PgTls,
        pool: usize,
        schema: &str,
    ) -> Result<PgDb, StoreError> {
        let tables = Tables::new(schema)?;
        let config: ::postgres::Config = url.parse().map_err(engine)?;
        let mut lanes = Vec::new();
        for n in 0..pool.max(MIN_POOL) {
            lanes.push(Lane::start(&config, &tls, (n == 0).then_some(&tables))?);
        }
        let tx = lanes.remove(0);
        Ok(PgDb {
            tx,
            others: lanes,
            next: AtomicUsize::new(0),
            ids: Default::default(),
            #[cfg(test)]
            reads: AtomicUsize::new(0),
            config,
            tls,
            tables,
        })
    }

    /// The store's schema, for statements of the cluster's tables.
    pub(super) fn tables(&self) -> Tables {
        self.tables.clone()
    }

    /// Calls `wake` whenever another process's commit queued mail or
    /// moved timers (LISTEN on a connection of its own, reconnected with
    /// backoff; notifications sent while it is down are lost, so workers
    /// also poll).
    pub(super) fn listen(&self, wake: impl Fn() + Send + 'static) -> Result<(), StoreError> {
        let session = Session::new(self.config.clone(), self.tls.clone());
        std::thread::Builder::new()
            .name("escalator-listen".into())
            .spawn(move || {
                let mut failures = 0u32;
                loop {
                    let listened = session.connect().and_then(|mut c| {
                        c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
                        failures = 0;
                        // Wake once after (re)connecting: what was
                        // notified meanwhile is lost.
                        wake();
                        let mut n = c.notifications();
                        let mut it = n.blocking_iter();
                        while let Some(_note) = ::postgres::fallible_iterator::FallibleIterator::next(&mut it)? {
                            wake();
                        }
                        Ok(())
                    });
                    if let Err(e) = listened {
                        tracing::warn!(error = %e, "listening for other nodes' work failed; reconnecting");
                    }
                    failures += 1;
                    std::thread::sleep(std::time::Duration::from_secs(1 << failures.min(5)));
                }
            })
            .map_err(|e| StoreError::Engine(Box::new(e)))?;
        Ok(())
    }

    /// Runs `f` and waits for its answer: on the transactions' lane when
    /// this thread is inside a store transaction (its reads then run in
    /// the same server session, measured faster than another lane), else
    /// on one of the other lanes, the same one for a thread each time.
    pub(super) fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        #[cfg(test)]
        self.reads.fetch_add(1, Ordering::Relaxed);
        if IN_TX.with(Cell::get) {
            return self.tx.call(Mark::Inside, f);
        }
        self.other().call(Mark::Inside, f)
    }

    /// For work that must never run inside a store transaction (leases,
    /// heartbeats): a lane other than the transactions'.
    pub(super) fn call_outside<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.other().call(Mark::Inside, f)
    }

    fn other(&self) -> &Lane {
        let n = LANE.with(|l| *l.get_or_init(|| self.next.fetch_add(1, Ordering::Relaxed)))
            % self.others.len().max(1);
        self.others.get(n).unwrap_or(&self.tx)
    }

    pub(super) fn get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = format!("SELECT value FROM {} WHERE key = $1", self.tables.of(t));
        let key = key.to_vec();
        let read = move |c: &mut Client| {
            let st = prepared(c, &sql)?;
            let row = c.query_opt(&st, &[&key])?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        };
        if t == Tree::Raw {
            // Stored mail (up to tens of MB) is read away from the
            // connection that holds the transaction's row locks. A node
            // paused while the server sends it such a value is not idle
            // in its transaction, so the server would never end it and
            // other nodes would wait for its rows; paused on another
            // connection, its transaction goes idle and ends after 30 s.
            // The bytes under a key never change once written (they are
            // only pruned), so another connection reads what this
            // transaction would.
            return self.call_outside(read);
        }
        self.call(read)
    }

    pub(super) fn contains(&self, t: Tree, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(t, key)?.is_some())
    }

    /// Keys and values from `start` (inclusive) to `end` (exclusive), in
    /// key order, fetched a page at a time.
    pub(super) fn range(
        &self,
        t: Tree,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        Range {
            db: self,
            table: self.tables.of(t),
            column: "value",
            from: start.to_vec(),
            inclusive: true,
            end: end.map(<[u8]>::to_vec),
            buf: VecDeque::new(),
            done: false,
        }
    }

    /// Every key of a key space with the SHA-256 of its value, in key
    /// order: hashed by the server, so comparing a key space with a copy
    /// does not fetch its values (raw messages: megabytes each).
    pub(super) fn range_hashed(
        &self,
        t: Tree,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        Range {
            db: self,
            table: self.tables.of(t),
            column: "sha256(value)",
            from: Vec::new(),
            inclusive: true,
            end: None,
            buf: VecDeque::new(),
            done: false,
        }
    }

    pub(super) fn prefix(
        &self,
        t: Tree,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        let end = prefix_end(prefix);
        self.range(t, prefix, end.as_deref())
    }

    pub(super) fn first_key(&self, t: Tree) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = format!("SELECT key FROM {} ORDER BY key LIMIT 1", self.tables.of(t));
        self.call(move |c| {
            let row = c.query_opt(&sql, &[])?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    pub(super) fn len(&self, t: Tree) -> Result<usize, StoreError> {
        let sql = format!("SELECT count(*) FROM {}", self.tables.of(t));
        self.call(move |c| {
            let n: i64 = c.query_one(&sql, &[])?.get(0);
            Ok(n.max(0) as usize)
        })
    }

    /// Sets `key` in meta unless it is set; returns what is set after.
    pub(super) fn meta_set_once(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let meta = self.tables.of(Tree::Meta);
        let name = String::from_utf8_lossy(key).into_owned();
        let (key, value) = (key.to_vec(), value.to_vec());
        self.call(move |c| {
            c.execute(
                &format!(
                    "INSERT INTO {meta} (key, value, name) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO NOTHING"
                ),
                &[&key, &value, &name],
            )?;
            let row = c.query_one(&format!("SELECT value FROM {meta} WHERE key = $1"), &[&key])?;
            Ok(row.get(0))
        })
    }

    /// Takes the daemon lock of the database in `mode` for as long as
    /// this engine lives (a session lock): false when it is held in a
    /// mode that excludes ours.
    pub(super) fn try_lock_daemon(&self, mode: LockMode) -> Result<bool, StoreError> {
        let Some(lane) = self.others.first() else {
            return Err(gone());
        };
        let (tx, rx) = mpsc::sync_channel(1);
        lane.jobs
            .send(Box::new(move |s: &mut Session| {
                let got = s.run(Mark::Inside, |c| {
                    let got: bool = c.query_one(mode.sql(), &[&DAEMON_LOCK])?.get(0);
                    Ok(got)
                });
                if let Ok(true) = got {
                    s.daemon_lock = Some(mode);
                }
                let _ = tx.send(got);
            }))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    /// Opens a transaction holding the store's lock (see the module).
    pub(super) fn begin(&self) -> Result<(), StoreError> {
        self.tx.call(Mark::Begin, |c| c.batch_execute("BEGIN"))?;
        IN_TX.with(|t| t.set(true));
        Ok(())
    }

    /// Reads a key inside the store transaction and locks its row until
    /// the transaction ends (`FOR UPDATE`): a case, an outgoing mail, a
    /// cursor changes under its own lock. Rows that never change once
    /// written (indexes, stored mail, history) are read without one.
    pub(super) fn get_for_update(
        &self,
        t: Tree,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if !t.changes_in_place() || !IN_TX.with(Cell::get) {
            return self.get(t, key);
        }
        let sql = format!(
            "SELECT value FROM {} WHERE key = $1 FOR UPDATE",
            self.tables.of(t)
        );
        let key = key.to_vec();
        self.call(move |c| {
            let st = prepared(c, &sql)?;
            Ok(c.query_opt(&st, &[&key])?.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    /// Unresolved cases by tier, counted from the cases table.
    pub(super) fn open_by_tier(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let sql = format!(
            "SELECT tier, count(*) FROM {} WHERE status <> 'resolved' GROUP BY tier",
            self.tables.of(Tree::Cases)
        );
        self.call(move |c| {
            Ok(c.query(&sql, &[])?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
                .collect())
        })
    }

    /// See [`super::engine::Db::sync_sequences`].
    pub(super) fn sync_sequences(&self) -> Result<(), StoreError> {
        let tables = self.tables.clone();
        self.call_outside(move |c| upgrade::sync_sequences(c, &tables))?;
        // Numbers taken before may lie below where the sequences go on.
        for pool in self
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            pool.clear();
        }
        Ok(())
    }

    /// See [`super::engine::Db::get_unless_held`]: a row locked by
    /// another transaction is skipped (`SKIP LOCKED`), then told apart
    /// from a missing one.
    pub(super) fn get_unless_held(
        &self,
        t: Tree,
        key: &[u8],
    ) -> Result<Result<Option<Vec<u8>>, ()>, StoreError> {
        let table = self.tables.of(t);
        let locked = format!("SELECT value FROM {table} WHERE key = $1 FOR UPDATE SKIP LOCKED");
        let exists = format!("SELECT 1 FROM {table} WHERE key = $1");
        let key = key.to_vec();
        self.call(move |c| {
            let st = prepared(c, &locked)?;
            if let Some(r) = c.query_opt(&st, &[&key])? {
                return Ok(Ok(Some(r.get::<_, Vec<u8>>(0))));
            }
            let st = prepared(c, &exists)?;
            Ok(match c.query_opt(&st, &[&key])? {
                Some(_) => Err(()),
                None => Ok(None),
            })
        })
    }

    /// Writes every op and commits; on failure nothing is written. All
    /// puts are one statement and all removals another (arrays unnested),
    /// not a round trip per key: a chunk of messages writes thousands.
    /// The transaction's overlay holds each key once, as an upsert of
    /// several rows needs. With a `fence`, the commit first checks that
    /// the lease it names is still held with its token, neither released
    /// nor expired by the database's clock: a node that lost or gave back
    /// its mailbox writes nothing for it.
    // Long: one database transaction from BEGIN to COMMIT (fence check, deletes, upserts per tree, sequences); split, the transaction would be passed through every part.
    pub(super) fn commit(
        &self,
        ops: &[Op],
        absent: &std::collections::HashSet<(Tree, Vec<u8>)>,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        IN_TX.with(|t| t.set(false));
        let fence = fence.cloned();
        let fenced_mailbox = fence
            .as_ref()
            .map(|f| f.mailbox.clone())
            .unwrap_or_default();
        let wakes = ops
            .iter()
            .any(|(t, _, _)| matches!(t, Tree::OutboxPending | Tree::Deadlines));
        let writes = rows::Writes::of(ops, absent);
        let tables = self.tables.clone();
        let (fenced_tx, fenced_rx) = mpsc::sync_channel(1);
        let (conflict_tx, conflict_rx) = mpsc::sync_channel(1);
        let result = self.tx.call(Mark::End, move |c| {
            let written = (|| {
                if let Some(f) = &fence {
                    // No row lock: it would hold up the holder's own
                    // renewals. A node that takes the mailbox over after
                    // this check and before the COMMIT still reads
                    // everything this one commits: every fenced write
                    // reads the mailbox's cursor, locking its row (or,
                    // before the first, finds it missing, and the second
                    // to write it conflicts), so the new holder's read
                    // of the cursor waits for this commit.
                    // A released or expired lease fences too: another
                    // node may take it at any moment without a new
                    // row. clock_timestamp(), not now(): now() is when
                    // this transaction began, maybe seconds ago.
                    let st = prepared(
                        c,
                        &format!(
                            "SELECT holder, token, expires_at > clock_timestamp() \
                         FROM {tables}.leases WHERE mailbox = $1"
                        ),
                    )?;
                    let row = c.query_opt(&st, &[&f.mailbox])?;
                    let held = row.is_some_and(|r| {
                        r.get::<_, String>(0) == f.holder
                            && r.get::<_, i64>(1) == f.token
                            && r.get::<_, bool>(2)
                    });
                    if !held {
                        let _ = fenced_tx.send(());
                        return c.batch_execute("ROLLBACK");
                    }
                }
                if let Err(conflict) = writes.write(c, &tables)? {
                    let _ = conflict_tx.send(conflict);
                    return c.batch_execute("ROLLBACK");
                }
                if wakes {
                    // Delivered when (and only if) the commit succeeds.
                    c.batch_execute(&format!("NOTIFY {CHANNEL}; COMMIT"))
                } else {
                    c.batch_execute("COMMIT")
                }
            })();
            if written.is_err() {
                let _ = c.batch_execute("ROLLBACK");
            }
            written
        });
        if fenced_rx.try_recv().is_ok() {
            return Err(StoreError::Fenced(fenced_mailbox));
        }
        if let Ok(what) = conflict_rx.try_recv() {
            return Err(StoreError::Conflict(what));
        }
        result
    }

    /// Ends a transaction without writing (its closure failed).
    pub(super) fn abort(&self) -> Result<(), StoreError> {
        IN_TX.with(|t| t.set(false));
        self.tx.call(Mark::End, |c| c.batch_execute("ROLLBACK"))
    }
}

/// A page-at-a-time scan.
struct Range<'d> {
    db: &'d PgDb,
    table: String,
    /// What comes with each key: `value`, or an expression of it.
    column: &'static str,
    /// Where the next page starts; after the first page, exclusive.
    from: Vec<u8>,
    inclusive: bool,
    end: Option<Vec<u8>>,
    buf: VecDeque<(Vec<u8>, Vec<u8>)>,
    done: bool,
}

impl Iterator for Range<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() && !self.done {
            let (table, column, from, inclusive, end) = (
                self.table.clone(),
                self.column,
                self.from.clone(),
                self.inclusive,
                self.end.clone(),
            );
            let page = self.db.call(move |c| {
                let op = if inclusive { ">=" } else { ">" };
                let rows = match &end {
                    Some(e) => {
                        let st = prepared(
                            c,
                            &format!(
                                "SELECT key, {column} FROM {table} WHERE key {op} $1 \
                                 AND key < $2 ORDER BY key LIMIT {PAGE}"
                            ),
                        )?;
                        c.query(&st, &[&from, e])?
                    }
                    None => {
                        let st = prepared(
                            c,
                            &format!(
                                "SELECT key, {column} FROM {table} WHERE key {op} $1 \
                                 ORDER BY key LIMIT {PAGE}"
                            ),
                        )?;
                        c.query(&st, &[&from])?
                    }
                };
                Ok(rows
                    .into_iter()
                    .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                    .collect::<Vec<_>>())
            });
            match page {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(rows) => {
                    self.done = (rows.len() as i64) < PAGE;
                    if let Some((k, _)) = rows.last() {
                        self.from = k.clone();
                        self.inclusive = false;
                    }
                    self.buf.extend(rows);
                }
            }
        }
        self.buf.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::prefix_end;

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
