//! Runs the daemon: opens the store, starts a mailbox watcher per queue
//! (on a shared store, per queue whose lease this node holds: see
//! [`crate::cluster`]), the timer scheduler, the outbox worker and (on the
//! embedded store) the control socket, and on shutdown lets each finish
//! its current transaction, flushes, and returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Live};
use crate::ingest::Ingestor;
use crate::mailbox::Watcher;
use crate::oauth::Broker;
use crate::outbox::smtp::{Mailer, SmtpMailer};
use crate::outbox::Outbox;
use crate::scheduler::Scheduler;
use crate::store::{NodeInfo, Store, StoreError};
use crate::wake::Wakers;

/// How long start-up waits for a store held by an admin command.
const STORE_WAIT: Duration = Duration::from_secs(5);

/// How long workers get to finish after a shutdown signal.
const EXIT_DEADLINE: Duration = Duration::from_secs(8);

struct Parts {
    live: Arc<Live>,
    store: Arc<Store>,
    /// One per queue.
    watchers: Vec<Watcher>,
    /// This node of a cluster (a shared store), else None.
    node: Option<NodeInfo>,
    scheduler: Scheduler,
    outbox: Outbox,
    ingestor: Arc<Ingestor>,
    config: Arc<Config>,
    /// OAuth 2 access tokens, one broker for the process.
    tokens: Arc<Broker>,
}

/// The SMTP client: `[smtp]`'s, with the queues that send through a
/// server of their own routed there by their From address.
fn mailer(config: &Config, tokens: &Arc<Broker>) -> anyhow::Result<Arc<dyn Mailer>> {
    let main: Arc<dyn Mailer> = Arc::new(
        SmtpMailer::new(&config.smtp)
            .context("cannot set up SMTP")?
            .with_tokens(tokens.clone()),
    );
    let mut routes = Vec::new();
    for q in config.queues.iter() {
        if let Some(ep) = &q.smtp {
            let smtp = crate::config::SmtpConfig {
                endpoint: ep.clone(),
                ..config.smtp.clone()
            };
            let m: Arc<dyn Mailer> = Arc::new(
                SmtpMailer::new(&smtp)
                    .with_context(|| format!("cannot set up SMTP for queue {}", q.name))?
                    .with_tokens(tokens.clone()),
            );
            routes.push((q.address.to_lowercase(), m));
        }
    }
    if routes.is_empty() {
        return Ok(main);
    }
    Ok(Arc::new(crate::outbox::smtp::ByFrom { main, routes }))
}

/// Opens the store the config names: sled in `store.path`, or the
/// PostgreSQL database (its URL read now, TLS unless the server is on
/// this machine or the admin allowed plain).
pub fn open_store(config: &Config, wait: Duration) -> anyhow::Result<Store> {
    use crate::config::StoreEngine;
    match &config.store.engine {
        StoreEngine::Sled => Ok(Store::open_waiting(&config.store.path, wait)?),
        StoreEngine::Postgres { pool, schema, .. } => {
            let (url, tls) = postgres_target(config)?;
            Ok(Store::open_postgres_in(
                url.expose(),
                tls,
                *pool,
                schema,
                &config.store.path,
            )?)
        }
    }
}

/// The PostgreSQL store's connection string (read now) and TLS, with
/// the plain-text check: TLS unless the server is on this machine or the
/// admin allowed plain.
pub fn postgres_target(
    config: &Config,
) -> anyhow::Result<(crate::config::Secret, crate::store::PgTls)> {
    use crate::config::{Security, StoreEngine};
    use crate::store::PgTls;
    let StoreEngine::Postgres {
        url,
        security,
        allow_insecure,
        ca_file,
        ..
    } = &config.store.engine
    else {
        anyhow::bail!("the store is not PostgreSQL");
    };
    let key = match url {
        crate::config::PasswordSource::Inline(_) => "store.url",
        crate::config::PasswordSource::Env(_) => "store.url_env",
        crate::config::PasswordSource::File(_) => "store.url_file",
    };
    let url = url.read().map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
    let parsed: postgres::Config = url
        .expose()
        .parse()
        .map_err(|e| anyhow::anyhow!("{key}: not a PostgreSQL connection string: {e}"))?;
    let tls = match security {
        Security::Plain => {
            // Checked here, not in the config: the URL may come from a
            // variable or file read only to connect.
            let remote = crate::config::postgres_remote_addresses(&parsed);
            if !remote.is_empty() && !allow_insecure {
                anyhow::bail!(
                    "store.security: \"plain\" sends the database password and every \
                     record unencrypted; refused for a server not on this machine ({} in \
                     {key}) unless store.allow_insecure = true",
                    remote.join(", ")
                );
            }
            PgTls::Plain
        }
        _ => PgTls::Verify(
            crate::tls::client_config(ca_file.as_deref())
                .map_err(|e| anyhow::anyhow!("store.ca_file: {e}"))?,
        ),
    };
    Ok((url, tls))
}

/// `store migrate --from-sled`: copies the (stopped) sled daemon's store
/// `source` into `target`, the PostgreSQL store of the config.
pub fn migrate_from_sled(source: &Store, target: &Store) -> anyhow::Result<crate::store::Copied> {
    if source.is_shared() {
        anyhow::bail!("--from-sled: not a sled store");
    }
    // Mail the SMTP server accepted just before the sled daemon stopped
    // may be in its sent journal only: marked sent in the sled store
    // first, or the daemon on PostgreSQL would send it again.
    let journal = crate::outbox::journal::Journal::open(source.path())
        .context("cannot open the sled store's sent journal")?;
    journal
        .replay(source, crate::clock::SystemClock.now())
        .context("cannot settle the sled store's sent journal")?;
    // No daemon may write while the store moves.
    target.lock_out_daemons()?;
    Ok(source.copy_into(target)?)
}

// Long: the daemon's parts built in the order they depend on each other (store, handle, tokens, mail, workers).
fn parts(config: Config) -> anyhow::Result<Parts> {
    let live = Live::new(config.clone());
    let config = Arc::new(config);
    let store = Arc::new(open_store(&config, STORE_WAIT)?);
    store.lock_for_daemon()?;
    let wake = Arc::new(Wakers::default());
    {
        // Work committed by another process (the CLI of another node)
        // wakes the outbox and the timers at once.
        let wake = wake.clone();
        store.listen(move || wake.both())?;
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let handle = crate::handle::Handle {
        store: store.clone(),
        config: live.clone(),
        clock: clock.clone(),
        wake: wake.clone(),
    };
    let tokens = Arc::new(Broker::new(&handle));
    let mailer = mailer(&config, &tokens)?;
    let ingestor = Arc::new(Ingestor::new(handle));
    Ok(Parts {
        watchers: config
            .queues
            .iter()
            .map(|q| {
                Watcher::new(config.clone(), &q.name, ingestor.clone(), wake.clone())
                    .with_tokens(tokens.clone())
            })
            .collect(),
        scheduler: Scheduler::new(crate::handle::Handle {
            store: store.clone(),
            config: live.clone(),
            clock: clock.clone(),
            wake: wake.clone(),
        }),
        node: store.is_shared().then(|| NodeInfo {
            node: crate::cluster::node_name(None, config.cluster.node.as_deref()),
            host: crate::cluster::host_name(),
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            started_at: clock.now(),
        }),
        outbox: {
            let journal = if store.is_shared() {
                // Daemons of a cluster on one machine may share the
                // directory: each takes a journal slot of its own.
                crate::outbox::journal::Journal::open_slot(store.path())
            } else {
                crate::outbox::journal::Journal::open(store.path())
            };
            let outbox = Outbox {
                journal: journal.context("cannot open the sent journal")?,
                claim: store.is_shared().then_some(config.cluster.claim),
                confirm: config
                    .smtp
                    .confirm_copies
                    .then_some(config.smtp.confirm_wait),
                store: store.clone(),
                mailer,
                clock,
                wake,
                watched: config.queues.iter().map(|q| q.address.clone()).collect(),
                health: crate::outbox::SmtpHealth::new(if store.is_shared() {
                    crate::cluster::node_name(None, config.cluster.node.as_deref())
                } else {
                    String::new()
                }),
            };
            outbox.recover()?;
            if store.is_shared() {
                crate::outbox::journal::Journal::settle_orphans(
                    store.path(),
                    &store,
                    outbox.clock.now(),
                )?;
            }
            outbox
        },
        live,
        store,
        ingestor,
        config,
        tokens,
    })
}

/// Loads the config file again for SIGHUP. Tiers, timelines, calendar,
/// triggers, templates and the rest of the policy apply from now on;
/// mailbox, SMTP, store and metrics settings are read at start only.
fn reload(live: &Live, wake: &Wakers) {
    let old = live.get();
    match Config::load(&old.source) {
        Ok(new) => {
            let fixed =
                |c: &Config| format!("{:?}{:?}{:?}{:?}", c.queues, c.smtp, c.store, c.metrics);
            if fixed(&new) != fixed(&old) {
                tracing::warn!("[mailbox]/[[mailboxes]], [smtp], [store] and [metrics] changes take effect only after a restart");
            }
            live.set(new);
            // Timers may be computed differently now; let the scheduler look.
            wake.timers.notify_one();
            tracing::info!(config = %old.source.display(), "config reloaded");
        }
        Err(e) => tracing::error!(
            config = %old.source.display(),
            error = %crate::error_chain(&e),
            "config reload refused; the previous config stays in force"
        ),
    }
}

/// Reloads the config on every SIGHUP until cancelled.
async fn reload_on_hangup(live: Arc<Live>, wake: Arc<Wakers>, cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; config reload is off");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                reload(&live, &wake);
            }
        }
    }
}

/// A store failure a worker cannot ride out (a full disk) stops the
/// daemon: better a loud exit than taking mail in that cannot be kept.
#[derive(Clone, Default)]
struct Fatal {
    stop: CancellationToken,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Fatal {
    fn fail(&self, e: &StoreError) {
        let text = crate::error_chain(e);
        tracing::error!(error = %text, "stopping: the store cannot take more mail");
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
        self.stop.cancel();
    }
}

/// Starts the mailbox watchers: one per queue on the embedded store; on a
/// shared store the node's part in the cluster, which starts a watcher
/// for each mailbox whose lease it gets and stops it when it goes.
fn watch_mailboxes(
    tracker: &TaskTracker,
    watchers: Vec<Watcher>,
    cluster: Option<crate::cluster::Membership>,
    fatal: &Fatal,
    cancel: &CancellationToken,
) {
    let (fatal, cancel) = (fatal.clone(), cancel.clone());
    match cluster {
        None => {
            for watcher in watchers {
                let (fatal, cancel) = (fatal.clone(), cancel.clone());
                let span = tracing::info_span!("mailbox", queue = %watcher.queue);
                tracker.spawn(
                    async move {
                        if let Err(e) = watcher.run(cancel).await {
                            fatal.fail(&e);
                        }
                    }
                    .instrument(span),
                );
            }
        }
        Some(membership) => {
            tracker.spawn(async move {
                if let Err(e) = membership.run(cancel).await {
                    fatal.fail(&e);
                }
            });
        }
    }
}

/// Runs until `shutdown` completes.
// Long: every worker started in turn (reload, cluster, mailboxes, timers, tokens, outbox, metrics), then the ordered stop.
pub async fn run(config: Config, shutdown: impl Future) -> anyhow::Result<()> {
    let Parts {
        live,
        store,
        watchers,
        scheduler,
        outbox,
        ingestor,
        node,
        config,
        tokens,
    } = parts(config)?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(reload_on_hangup(
        live.clone(),
        scheduler.wake.clone(),
        cancel.clone(),
    ));
    let pending = store.outbox_depth()?;
    tracing::info!(store = %store.path().display(), pending_mail = pending, "escalator started");
    let fatal = Fatal::default();
    let cluster = node.map(|me| crate::cluster::Membership {
        store: store.clone(),
        me,
        lease: config.cluster.lease,
        queues: config.queues.iter().map(|q| q.name.clone()).collect(),
        spawn: {
            let (config, ingestor, wake, tokens) = (
                config.clone(),
                ingestor.clone(),
                scheduler.wake.clone(),
                tokens.clone(),
            );
            Arc::new(move |queue: &str, fence, stop| {
                let w = Watcher::new(config.clone(), queue, ingestor.clone(), wake.clone())
                    .with_tokens(tokens.clone())
                    .fenced(fence);
                let span = tracing::info_span!("mailbox", queue = %queue);
                tokio::spawn(w.run(stop).instrument(span))
            })
        },
    });
    watch_mailboxes(&tracker, watchers, cluster, &fatal, &cancel);
    tracker.spawn(scheduler.run(cancel.clone()));
    tracker.spawn(crate::oauth::keeper::keep(
        tokens.clone(),
        live.clone(),
        cancel.clone(),
    ));
    tracker.spawn(outbox.run(cancel.clone()));
    if let Some(listen) = live.get().metrics.listen {
        let server = crate::metrics::serve(listen, store.clone(), cancel.clone())
            .await
            .with_context(|| format!("metrics.listen: cannot listen on {listen}"))?;
        tracker.spawn(server);
    }
    if !store.is_shared() {
        // On PostgreSQL the CLI uses the database itself.
        let control = crate::control::serve(ingestor.handle.clone(), cancel.clone())?;
        tracker.spawn(control);
    }
    tracker.close();
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down: finishing current work"),
        _ = fatal.stop.cancelled() => {}
    }
    cancel.cancel();
    if tokio::time::timeout(EXIT_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "workers did not stop within {EXIT_DEADLINE:?}; exiting anyway (the store is consistent)"
        );
    }
    store.flush_async().await?;
    tracing::info!("stopped");
    let failed = fatal.error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

/// One full cycle: ingest everything new, fire due timers, drain the
/// outbox, return.
// Long: the cycle's steps in the order they run (leases, mailboxes, timers, outbox, summary, exit status), each a call.
pub async fn run_once(config: Config) -> anyhow::Result<()> {
    let Parts {
        store,
        watchers,
        scheduler,
        outbox,
        node,
        config,
        ..
    } = parts(config)?;
    let cancel = CancellationToken::new();
    let started = std::time::Instant::now();
    // On a shared store: only the mailboxes no running node watches, each
    // under its lease for this run.
    let leases = match node {
        Some(me) => {
            let queues: Vec<String> = config.queues.iter().map(|q| q.name.clone()).collect();
            Some(
                crate::cluster::leases_for_once(store.clone(), me, config.cluster.lease, &queues)
                    .await?,
            )
        }
        None => None,
    };
    let watchers: Vec<Watcher> = match &leases {
        None => watchers,
        Some(l) => watchers
            .into_iter()
            .filter_map(|w| l.fences.get(&w.queue).cloned().map(|f| w.fenced(f)))
            .collect(),
    };
    // Every queue at once; one that fails holds up no other, and the
    // mail and timers of the rest are still dealt with below.
    let passes = futures::future::join_all(watchers.iter().map(|w| {
        w.once(&cancel)
            .instrument(tracing::info_span!("mailbox", queue = %w.queue))
    }))
    .await;
    let mut pass = crate::mailbox::PassReport::default();
    let mut failed = Vec::new();
    for (w, r) in watchers.iter().zip(passes) {
        pass.add(&r.report);
        if let Some(e) = r.error {
            let hint = match &e {
                crate::mailbox::WatchError::Imap(i) => {
                    i.hint(&config.queue(&w.queue).mailbox.endpoint)
                }
                crate::mailbox::WatchError::Store(_) => None,
            };
            tracing::error!(queue = %w.queue, error = %crate::error_chain(&e), hint = hint.unwrap_or_default(), "cannot ingest everything from the mailbox");
            failed.push(w.queue.clone());
        }
    }
    if let Some(l) = leases {
        l.release().await;
    }
    let ingest_ms = started.elapsed().as_millis() as u64;
    let fired = scheduler.pass()?;
    let sending = std::time::Instant::now();
    let drained = outbox.drain(true, &cancel).await;
    // Every session ends with QUIT, also after a failed drain.
    outbox.mailer.close().await;
    let drained = drained?;
    store.flush_async().await?;
    // The timings are for the benchmark (benches/pipeline.rs) and admins
    // sizing a cron interval.
    tracing::info!(
        ingest_ms,
        drain_ms = sending.elapsed().as_millis() as u64,
        fetched = pass.fetched,
        new_cases = pass.new_cases,
        quarantined = pass.quarantined,
        timers = fired,
        sent = drained.sent,
        retrying = drained.retrying,
        failed = drained.failed,
        "one cycle done"
    );
    if drained.retrying > 0 {
        tracing::warn!(
            retrying = drained.retrying,
            "some mail could not be sent yet; it stays queued for the next run"
        );
    }
    let problems = outbox.health.problems();
    let refused = (drained.refused && !problems.is_empty()).then(|| problems.join("; "));
    match (failed.is_empty(), refused) {
        (true, None) => Ok(()),
        (true, Some(why)) => anyhow::bail!(
            "{why}; {} mail(s) stay queued for the next run",
            drained.retrying
        ),
        (false, refused) => anyhow::bail!(
            "cannot ingest from the mailbox of queue(s) {} (the others were read){}",
            failed.join(", "),
            refused
                .map(|why| format!("; and {why}"))
                .unwrap_or_default()
        ),
    }
}
