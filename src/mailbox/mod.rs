//! Mailbox: watches one queue's folder over IMAP and feeds every new
//! message to ingest (one watcher per queue, each with its own connection
//! and backoff, so one mailbox down holds up no other). Resumable by UID (the cursor lives in the store and
//! moves in the same transaction as the message), changing nothing
//! (BODY.PEEK, so customers' mail keeps its flags; SELECT rather than
//! EXAMINE because some servers keep UIDs only for a read-write session),
//! IDLE when the server has it with a re-check every `poll_interval`
//! (servers that notify only once a minute), polling otherwise, and
//! reconnecting with backoff forever.

#[cfg(test)]
mod fake;
mod fetch;
mod folder;
pub mod imap;
#[cfg(test)]
mod memfolder;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, MailboxConfig};
use crate::ingest::{Ingestor, Item, Outcome, Source};
use crate::store::{Fence, StoreError};
use crate::wake::Wakers;
use fetch::{Step, Troubles, FETCH_ATTEMPTS};
use folder::{Folder, ImapFolder};
use imap::{timed, ImapError, ImapSession};

/// RFC 2177: re-issue IDLE before 29 minutes.
const IDLE_RENEW: Duration = Duration::from_secs(25 * 60);
/// Most message bytes one ingest transaction holds before it commits.
const TX_BYTES: usize = 1 << 20;
/// How long a sent folder the server does not have is not asked for.
const MISSING_RECHECK: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error("cannot store a fetched message")]
    Store(#[from] StoreError),
}

/// What `run --once` got from one mailbox: what was stored before any
/// failure (so its summary stays true), and the failure.
#[derive(Debug)]
pub struct OnceOutcome {
    pub report: PassReport,
    pub error: Option<WatchError>,
}

/// What a pass over the folder did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassReport {
    pub fetched: usize,
    pub stored: usize,
    pub new_cases: usize,
    pub duplicates: usize,
    pub quarantined: usize,
}

impl PassReport {
    /// What was added since `before`.
    fn since(&self, before: &PassReport) -> PassReport {
        PassReport {
            fetched: self.fetched - before.fetched,
            stored: self.stored - before.stored,
            new_cases: self.new_cases - before.new_cases,
            duplicates: self.duplicates - before.duplicates,
            quarantined: self.quarantined - before.quarantined,
        }
    }

    pub fn add(&mut self, r: &PassReport) {
        self.fetched += r.fetched;
        self.stored += r.stored;
        self.new_cases += r.new_cases;
        self.duplicates += r.duplicates;
        self.quarantined += r.quarantined;
    }
}

pub struct Watcher {
    pub config: Arc<Config>,
    /// The queue whose mailbox this watches.
    pub queue: String,
    pub ingestor: Arc<Ingestor>,
    /// Told after each committed batch, so acks go out at once and the
    /// scheduler sees new deadlines.
    pub wake: Arc<Wakers>,
    /// Per folder: where fetching last broke (see [`fetch`]).
    troubles: Troubles,
    /// On a shared store: the lease this node watches the mailbox under;
    /// every ingest transaction commits only while it is held.
    fence: Option<Fence>,
    /// The sent folder the server did not have: logged once, and not
    /// asked for again (each try costs a LIST of every folder) until
    /// [`MISSING_RECHECK`] has passed; the inbox is watched anyway.
    missing_sent: Mutex<Option<(String, std::time::Instant)>>,
    /// Per folder: passes in a row that found a new UIDVALIDITY and
    /// nothing new: a server that renumbers every session, said once.
    renumbered: Mutex<HashMap<String, u32>>,
    /// Access tokens for `auth = "oauth2"`.
    tokens: Option<Arc<dyn crate::credentials::AccessTokens>>,
    /// Tests: a scripted server instead of the network.
    #[cfg(test)]
    fake: Option<fake::FakeServer>,
}

impl Watcher {
    pub fn new(
        config: Arc<Config>,
        queue: &str,
        ingestor: Arc<Ingestor>,
        wake: Arc<Wakers>,
    ) -> Watcher {
        Watcher {
            config,
            queue: queue.to_string(),
            ingestor,
            wake,
            troubles: Troubles::default(),
            fence: None,
            missing_sent: Mutex::new(None),
            renumbered: Mutex::new(HashMap::new()),
            tokens: None,
            #[cfg(test)]
            fake: None,
        }
    }

    /// Logs in with tokens from `broker` where the mailbox says
    /// `auth = "oauth2"`.
    pub fn with_tokens(mut self, broker: Arc<dyn crate::credentials::AccessTokens>) -> Watcher {
        self.tokens = Some(broker);
        self
    }

    /// Connects and logs in to the queue's server.
    async fn open(&self) -> Result<ImapSession, ImapError> {
        let ep = &self.mailbox().endpoint;
        #[cfg(test)]
        if let Some(f) = &self.fake {
            return imap::connect_fake(ep, f.accept()).await;
        }
        imap::connect(ep, self.tokens.as_deref()).await
    }

    /// Watches under a mailbox lease: what it ingests is written only
    /// while the lease is held with this token.
    pub fn fenced(mut self, fence: Fence) -> Watcher {
        self.fence = Some(fence);
        self
    }

    /// One pass: connect, ingest everything new, log out. A fetch that
    /// breaks the connection is retried on a new one, narrowing down to
    /// the message at fault as the daemon does. What was stored is
    /// reported even when the pass then failed.
    pub async fn once(&self, cancel: &CancellationToken) -> OnceOutcome {
        let mut tries = 0;
        let mut report = PassReport::default();
        loop {
            let mut s = match self.open().await {
                Ok(s) => s,
                Err(e) => {
                    return OnceOutcome {
                        report,
                        error: Some(e.into()),
                    }
                }
            };
            let mut folder = ImapFolder {
                ep: &self.mailbox().endpoint,
                session: &mut s,
            };
            let result = self.pass(&mut folder, cancel, &mut report).await;
            let result = match result {
                Ok(Some(missing)) => Err(WatchError::Imap(missing)),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.logout()).await;
                    return OnceOutcome {
                        report,
                        error: None,
                    };
                }
                Err(WatchError::Imap(e)) if tries < 4 * FETCH_ATTEMPTS && self.in_trouble() => {
                    tries += 1;
                    tracing::warn!(error = %e, "fetch failed; trying again on a new connection");
                }
                Err(e) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.logout()).await;
                    return OnceOutcome {
                        report,
                        error: Some(e),
                    };
                }
            }
        }
    }

    fn mailbox(&self) -> &MailboxConfig {
        &self.config.queue(&self.queue).mailbox
    }

    fn in_trouble(&self) -> bool {
        self.troubles.any()
    }

    /// Watches until cancelled. Server trouble and store failures are
    /// logged and retried with backoff, forever; only a store failure
    /// after which going on could lose or double mail (a full disk, a
    /// lease lost to another node) is returned.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StoreError> {
        let mut failures: u32 = 0;
        loop {
            match self.session(&cancel, &mut failures).await {
                Ok(()) => return Ok(()),
                Err(WatchError::Store(e)) if e.stops_a_watcher() => return Err(e),
                Err(WatchError::Store(e)) => {
                    // Nothing of the failed transaction was written: the
                    // folder is read again from its cursor. A failure one
                    // message caused was set aside already (see
                    // `Ingestor::ingest_batch`), so what is left is the
                    // store's as a whole: retried, never a reason to stop.
                    failures += 1;
                    let wait = Duration::from_secs((1u64 << failures.min(5)).min(30));
                    crate::metrics::inc(&crate::metrics::METRICS.store_errors);
                    if e.is_transient() {
                        tracing::warn!(error = %crate::error_chain(&e), retry_in = ?wait, "the store's database cannot be reached; retrying");
                    } else {
                        tracing::error!(error = %crate::error_chain(&e), retry_in = ?wait, "the store failed; retrying");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    failures += 1;
                    let m = &crate::metrics::METRICS;
                    crate::metrics::inc(&m.imap_errors);
                    m.queue_imap_errors.inc(&[("queue", &self.queue)]);
                    let config = matches!(&e, WatchError::Imap(i) if i.is_config());
                    // Wrong credentials won't fix themselves quickly: wait
                    // longer, so the server's lockout is not provoked.
                    let base = if config { 60 } else { 1 };
                    let wait = Duration::from_secs((base << failures.min(6)).min(300));
                    let hint = match &e {
                        WatchError::Imap(i) => i.hint(&self.mailbox().endpoint),
                        WatchError::Store(_) => None,
                    };
                    let hint = hint.unwrap_or_default();
                    match &e {
                        // The oauth2 keeper says so once an hour with the
                        // fix; the mail waits in the mailbox.
                        WatchError::Imap(ImapError::Token(t)) if t.needs_login => {
                            tracing::info!(error = %t, retry_in = ?wait, "IMAP waits for an OAuth 2 login")
                        }
                        WatchError::Imap(i) if i.is_auth() => {
                            tracing::error!(error = %crate::error_chain(&e), hint, retry_in = ?wait, "IMAP login failed")
                        }
                        _ if config => {
                            tracing::error!(error = %crate::error_chain(&e), hint, retry_in = ?wait, "the mailbox's config does not fit the server")
                        }
                        _ => {
                            tracing::warn!(error = %crate::error_chain(&e), hint, retry_in = ?wait, "IMAP connection lost")
                        }
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn session(
        &self,
        cancel: &CancellationToken,
        failures: &mut u32,
    ) -> Result<(), WatchError> {
        let ep = &self.mailbox().endpoint;
        let mut s = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = self.open() => r?,
        };
        let caps = timed(ep, "CAPABILITY", s.capabilities(), |e| {
            ImapError::Protocol("CAPABILITY", e)
        })
        .await?;
        let idle = self.mailbox().idle && caps.has_str("IDLE");
        tracing::info!(host = %ep.host, folder = %self.mailbox().folder, idle, "watching mailbox");
        // Also while idling, the folder is looked at every poll_interval:
        // some servers (Cyrus without idled, Courier without gamin) tell an
        // idling client about new mail only once a minute or so.
        let wait = IDLE_RENEW.min(self.mailbox().poll_interval);
        loop {
            let mut report = PassReport::default();
            let mut folder = ImapFolder {
                ep,
                session: &mut s,
            };
            if let Some(missing) = self.pass(&mut folder, cancel, &mut report).await? {
                self.missing_sent_once(missing);
            }
            *failures = 0;
            if cancel.is_cancelled() {
                let _ = tokio::time::timeout(Duration::from_secs(5), s.logout()).await;
                return Ok(());
            }
            if idle {
                let mut handle = s.idle();
                timed(ep, "IDLE", handle.init(), |e| {
                    ImapError::Protocol("IDLE", e)
                })
                .await?;
                {
                    let (fut, _stop) = handle.wait_with_timeout(wait);
                    // Our own timeout too: the library's is reset by every
                    // keep-alive, and a server chatting forever would
                    // otherwise keep us in one IDLE past 29 minutes.
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        r = tokio::time::timeout(wait, fut) => {
                            if let Ok(Err(e)) = r {
                                return Err(ImapError::Protocol("IDLE", e).into());
                            }
                        }
                    }
                }
                s = timed(ep, "DONE", handle.done(), |e| {
                    ImapError::Protocol("IDLE DONE", e)
                })
                .await?;
            } else {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            if cancel.is_cancelled() {
                let _ = tokio::time::timeout(Duration::from_secs(5), s.logout()).await;
                return Ok(());
            }
        }
    }

    /// Fetches and ingests every new message of the inbox, then of the
    /// Sent folder (agents' answers) when one is configured, adding to
    /// `report` as messages are stored. A sent folder the server does not
    /// have is returned rather than failed: the inbox goes on being read.
    async fn pass<F: Folder>(
        &self,
        f: &mut F,
        cancel: &CancellationToken,
        report: &mut PassReport,
    ) -> Result<Option<ImapError>, WatchError> {
        let inbox = self.mailbox().folder.clone();
        self.pass_folder(f, &inbox, false, cancel, report).await?;
        let Some(sent) = self.mailbox().sent_folder.clone() else {
            return Ok(None);
        };
        if let Some((_, at)) = &*self.missing_sent.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.elapsed() < MISSING_RECHECK {
                // Asked again only after the wait (each try costs a LIST).
                return Ok(None);
            }
        }
        let missing = match self.pass_folder(f, &sent, true, cancel, report).await {
            Ok(()) => {
                *self.missing_sent.lock().unwrap_or_else(|p| p.into_inner()) = None;
                None
            }
            Err(WatchError::Imap(e @ ImapError::MissingFolder { .. })) => Some(e),
            Err(e) => return Err(e),
        };
        // IDLE watches the inbox: select it again.
        f.select(&inbox, &self.folder_key(false)).await?;
        Ok(missing)
    }

    /// The config key naming the inbox or the sent folder, for errors.
    fn folder_key(&self, sent: bool) -> String {
        let key = if sent { "sent_folder" } else { "folder" };
        format!("{}.{key}", self.mailbox().endpoint.section)
    }

    /// Logs a missing sent folder once (and again if it changes), and
    /// counts it as an IMAP error each pass, so it shows in the metrics.
    fn missing_sent_once(&self, e: ImapError) {
        let m = &crate::metrics::METRICS;
        crate::metrics::inc(&m.imap_errors);
        m.queue_imap_errors.inc(&[("queue", &self.queue)]);
        let text = e.to_string();
        let mut seen = self.missing_sent.lock().unwrap_or_else(|p| p.into_inner());
        if seen.as_ref().map(|(t, _)| t.as_str()) != Some(text.as_str()) {
            let hint = e.hint(&self.mailbox().endpoint).unwrap_or_default();
            tracing::error!(error = %text, hint, recheck_in = ?MISSING_RECHECK, "staff answers in the sent folder are not read; the inbox is");
        }
        *seen = Some((text, std::time::Instant::now()));
    }

    /// Fetches and ingests every message of `folder` past its cursor, in
    /// the steps [`fetch`] plans. Counted straight into the caller's
    /// report, so what was stored stays counted when a later step fails.
    async fn pass_folder<F: Folder>(
        &self,
        f: &mut F,
        folder: &str,
        sent: bool,
        cancel: &CancellationToken,
        report: &mut PassReport,
    ) -> Result<(), WatchError> {
        let before = *report;
        // Whatever was delivered before this moment is in the folder as
        // selected now.
        let began = self.ingestor.clock.now();
        let selected = f.select(folder, &self.folder_key(sent)).await?;
        let validity = selected.uid_validity;
        let (start, renumbered) = self.start_at(folder, validity)?;
        if selected.exists == 0 {
            return Ok(self.read_through(sent, began)?);
        }
        let uids = fetch::new_uids(f.uids_from(start).await?, start);
        let src = |uid| Source {
            queue: self.queue.clone(),
            folder: folder.to_string(),
            uid_validity: validity,
            uid,
            sent,
            cursor: true,
        };
        let mut rest: &[u32] = &uids;
        while !rest.is_empty() && !cancel.is_cancelled() {
            let n = match self.troubles.step(folder, validity, rest) {
                Step::GiveUp(error) => {
                    let why = format!("the server would not FETCH uid {}: {error}", rest[0]);
                    tracing::error!(uid = rest[0], error = %error, "fetching this message failed {FETCH_ATTEMPTS} times; quarantined");
                    self.ingestor
                        .quarantine_unfetched(&src(rest[0]), &why, self.fence.as_ref())?;
                    report.quarantined += 1;
                    self.troubles.gave_up(folder);
                    rest = &rest[1..];
                    continue;
                }
                Step::Fetch(n) => n,
            };
            let (chunk, after) = rest.split_at(n);
            rest = after;
            // When these messages were first seen: the start of the
            // ingest latency metric.
            let seen = std::time::Instant::now();
            let max = self.mailbox().max_message_size;
            let got = match fetch::chunk(f, chunk, max).await {
                Ok(got) => got,
                Err(e) => {
                    self.troubles.failed(folder, validity, chunk, &e);
                    return Err(e.into());
                }
            };
            if n == 1 {
                self.troubles.fetched(folder, chunk[0]);
            }
            self.ingest_chunk(chunk, &got, &src, seen, report)?;
            self.ingestor.store.flush_async().await?;
            self.wake.both();
        }
        if rest.is_empty() {
            self.read_through(sent, began)?;
        }
        let report = report.since(&before);
        self.note_renumbering(folder, renumbered, &report);
        if report.fetched > 0 {
            tracing::info!(
                fetched = report.fetched,
                stored = report.stored,
                new_cases = report.new_cases,
                duplicates = report.duplicates,
                quarantined = report.quarantined,
                "mailbox pass done"
            );
        }
        Ok(())
    }

    /// Notes that the inbox was read through up to `began`, for the
    /// outbox: an interrupted send whose confirmation copy is not among
    /// what was read by then is known never to have been accepted.
    fn read_through(&self, sent: bool, began: DateTime<Utc>) -> Result<(), StoreError> {
        if sent {
            return Ok(());
        }
        let address = &self.config.queue(&self.queue).address;
        self.ingestor.store.set_read_through(address, began)?;
        self.wake.outbox.notify_one();
        Ok(())
    }

    /// The first UID to fetch in `folder`, and the old UIDVALIDITY when
    /// the server renumbered the folder since the cursor was stored.
    fn start_at(&self, folder: &str, validity: u32) -> Result<(u32, Option<u32>), StoreError> {
        Ok(match self.ingestor.store.cursor(&self.queue, folder)? {
            Some(c) if c.uid_validity == validity => (c.last_uid.saturating_add(1), None),
            Some(c) => {
                tracing::warn!(folder = %folder, old = c.uid_validity, new = validity, "the server gave the folder a new UIDVALIDITY (its messages were renumbered, or the folder was re-created); re-scanning it: stored messages are recognised and not ingested twice");
                (1, Some(c.uid_validity))
            }
            None => (1, None),
        })
    }

    /// Ingests what one chunk brought, in UID order (so the cursor only
    /// ever moves forward over messages that are stored), one transaction
    /// per [`TX_BYTES`] (a transaction holds its messages' bytes until it
    /// commits).
    fn ingest_chunk(
        &self,
        chunk: &[u32],
        got: &fetch::Fetched,
        src: &dyn Fn(u32) -> Source,
        seen: std::time::Instant,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        let mut items = Vec::with_capacity(chunk.len());
        for &uid in chunk {
            match (got.bodies.get(&uid), got.refused.get(&uid)) {
                (Some((raw, truncated)), _) => {
                    report.fetched += 1;
                    let truncated = *truncated;
                    items.push((src(uid), Item::Bytes { raw, truncated }));
                }
                // The server keeps refusing this one message: kept in
                // quarantine with its words, so the rest go on and the
                // cursor passes nothing unrecorded.
                (None, Some(why)) => items.push((src(uid), Item::Refused(why))),
                (None, None) => {} // expunged meanwhile
            }
        }
        let mut start = 0;
        while start < items.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < items.len() && (end == start || bytes < TX_BYTES) {
                if let Item::Bytes { raw, .. } = items[end].1 {
                    bytes += raw.len();
                }
                end += 1;
            }
            let outcomes = self
                .ingestor
                .ingest_batch_fenced(&items[start..end], self.fence.as_ref())?;
            for outcome in outcomes {
                self.count(outcome, seen, report);
            }
            start = end;
        }
        Ok(())
    }

    /// Counts one ingest outcome in the pass's report and the metrics.
    fn count(&self, outcome: Outcome, seen: std::time::Instant, report: &mut PassReport) {
        let m = &crate::metrics::METRICS;
        let label = match outcome {
            Outcome::Stored { new, .. } => {
                report.stored += 1;
                report.new_cases += new as usize;
                m.ingest_latency.observe(seen.elapsed());
                "stored"
            }
            Outcome::Confirmed { .. } => {
                report.duplicates += 1;
                "own_copy"
            }
            Outcome::Duplicate | Outcome::AlreadyDone => {
                report.duplicates += 1;
                "duplicate"
            }
            Outcome::Quarantined { .. } => {
                report.quarantined += 1;
                "quarantined"
            }
            Outcome::Refetch { .. } => "refetch",
            Outcome::Bounce { .. } => "bounce",
        };
        m.ingested.inc(&[("outcome", label)]);
        m.queue_ingested
            .inc(&[("queue", &self.queue), ("outcome", label)]);
    }

    /// A folder re-scanned after a new UIDVALIDITY that held nothing new,
    /// twice in a row: the server renumbers the folder on its own. Said
    /// once, as an error: each re-scan downloads the whole folder.
    fn note_renumbering(&self, folder: &str, old: Option<u32>, report: &PassReport) {
        let mut map = self.renumbered.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(folder.to_string()).or_insert(0);
        match old {
            Some(_) if report.stored == 0 && report.fetched > 0 => {
                *n += 1;
                if *n == 2 {
                    tracing::error!(folder = %folder, "the server gives this folder a new UIDVALIDITY in every session although its messages are unchanged, so each pass downloads the whole folder again; the server does not keep UIDs (a Courier-IMAP without write access to the folder behaves so): give the mailbox's user write access");
                }
            }
            Some(_) => *n = 0,
            None if report.fetched > 0 => *n = 0,
            None => {}
        }
    }
}
