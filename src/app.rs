//! Runs the daemon: opens the store, starts the mailbox watcher, the
//! timer scheduler, the outbox worker and the control socket, and on
//! shutdown lets each finish its current transaction, flushes, and
//! returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Live};
use crate::ingest::Ingestor;
use crate::mailbox::Watcher;
use crate::outbox::smtp::{Mailer, SmtpMailer};
use crate::outbox::Outbox;
use crate::scheduler::{Scheduler, Wakers};
use crate::store::Store;

/// How long start-up waits for a store held by an admin command.
const STORE_WAIT: Duration = Duration::from_secs(5);

/// How long workers get to finish after a shutdown signal.
const EXIT_DEADLINE: Duration = Duration::from_secs(8);

struct Parts {
    live: Arc<Live>,
    store: Arc<Store>,
    watcher: Watcher,
    scheduler: Scheduler,
    outbox: Outbox,
    ingestor: Arc<Ingestor>,
}

fn parts(config: Config) -> anyhow::Result<Parts> {
    let live = Live::new(config.clone());
    let config = Arc::new(config);
    let store = Arc::new(Store::open_waiting(&config.store.path, STORE_WAIT)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mailer: Arc<dyn Mailer> =
        Arc::new(SmtpMailer::new(&config.smtp).context("cannot set up SMTP")?);
    let wake = Arc::new(Wakers::default());
    let ingestor = Arc::new(Ingestor {
        store: store.clone(),
        config: live.clone(),
        clock: clock.clone(),
        wake: wake.clone(),
    });
    Ok(Parts {
        watcher: Watcher::new(config.clone(), ingestor.clone(), wake.clone()),
        scheduler: Scheduler {
            store: store.clone(),
            config: live.clone(),
            clock: clock.clone(),
            wake: wake.clone(),
            pruned_at: Default::default(),
        },
        outbox: {
            let outbox = Outbox {
                journal: crate::outbox::journal::Journal::open(store.path())
                    .context("cannot open the sent journal")?,
                confirm: config
                    .smtp
                    .confirm_copies
                    .then(|| (config.smtp.from.clone(), config.smtp.confirm_wait)),
                store: store.clone(),
                mailer,
                clock,
                wake,
            };
            outbox.recover()?;
            outbox
        },
        live,
        store,
        ingestor,
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
                |c: &Config| format!("{:?}{:?}{:?}{:?}", c.mailbox, c.smtp, c.store, c.metrics);
            if fixed(&new) != fixed(&old) {
                tracing::warn!("[mailbox], [smtp], [store] and [metrics] changes take effect only after a restart");
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

/// Runs until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future) -> anyhow::Result<()> {
    let Parts {
        live,
        store,
        watcher,
        scheduler,
        outbox,
        ingestor,
    } = parts(config)?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(reload_on_hangup(
        live.clone(),
        scheduler.wake.clone(),
        cancel.clone(),
    ));
    let pending = store.outbox_depth();
    tracing::info!(store = %store.path().display(), pending_mail = pending, "escalator started");
    // A store failure in the watcher stops the daemon: better a loud exit
    // than taking mail in that cannot be kept.
    let fatal = CancellationToken::new();
    let fatal_error = Arc::new(std::sync::Mutex::new(None::<String>));
    {
        let (fatal, slot, cancel) = (fatal.clone(), fatal_error.clone(), cancel.clone());
        tracker.spawn(async move {
            if let Err(e) = watcher.run(cancel).await {
                let text = crate::error_chain(&e);
                tracing::error!(error = %text, "stopping: the store cannot take more mail");
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
                fatal.cancel();
            }
        });
    }
    tracker.spawn(scheduler.run(cancel.clone()));
    tracker.spawn(outbox.run(cancel.clone()));
    if let Some(listen) = live.get().metrics.listen {
        let server = crate::metrics::serve(listen, store.clone(), cancel.clone())
            .await
            .with_context(|| format!("metrics.listen: cannot listen on {listen}"))?;
        tracker.spawn(server);
    }
    let control = crate::control::serve(ingestor, cancel.clone())?;
    tracker.spawn(control);
    tracker.close();
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down: finishing current work"),
        _ = fatal.cancelled() => {}
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
    let failed = fatal_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

/// One full cycle: ingest everything new, fire due timers, drain the
/// outbox, return.
pub async fn run_once(config: Config) -> anyhow::Result<()> {
    let Parts {
        store,
        watcher,
        scheduler,
        outbox,
        ..
    } = parts(config)?;
    let cancel = CancellationToken::new();
    let started = std::time::Instant::now();
    let pass = watcher
        .once(&cancel)
        .await
        .context("cannot ingest from the mailbox")?;
    let ingest_ms = started.elapsed().as_millis() as u64;
    let fired = scheduler.pass()?;
    let sending = std::time::Instant::now();
    let drained = outbox.drain(true, &cancel).await?;
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
    Ok(())
}
