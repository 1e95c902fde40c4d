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
pub mod imap;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, MailboxConfig};
use crate::ingest::{Ingestor, Item, Outcome, Source};
use crate::store::{Fence, StoreError};
use crate::wake::Wakers;
use imap::{timed, ImapError, ImapSession};

/// RFC 2177: re-issue IDLE before 29 minutes.
const IDLE_RENEW: Duration = Duration::from_secs(25 * 60);
/// UIDs per FETCH round, and most bytes fetched in one round.
const CHUNK: usize = 200;
/// Tries at fetching one message the server will not give, before it is
/// quarantined with the server's words (and the cursor may pass it).
const FETCH_ATTEMPTS: u32 = 3;
const CHUNK_BYTES: u64 = 32 << 20;
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
    /// Per folder: where fetching last broke (see [`Trouble`]).
    trouble: Mutex<HashMap<String, Trouble>>,
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
            trouble: Mutex::new(HashMap::new()),
            fence: None,
            missing_sent: Mutex::new(None),
            renumbered: Mutex::new(HashMap::new()),
            #[cfg(test)]
            fake: None,
        }
    }

    /// Connects and logs in to the queue's server.
    async fn open(&self) -> Result<ImapSession, ImapError> {
        let ep = &self.mailbox().endpoint;
        #[cfg(test)]
        if let Some(f) = &self.fake {
            return imap::connect_fake(ep, f.accept()).await;
        }
        imap::connect(ep).await
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
            let result = self.pass(&mut s, cancel, &mut report).await;
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
        !self
            .trouble
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
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
            if let Some(missing) = self.pass(&mut s, cancel, &mut report).await? {
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
    async fn pass(
        &self,
        s: &mut ImapSession,
        cancel: &CancellationToken,
        report: &mut PassReport,
    ) -> Result<Option<ImapError>, WatchError> {
        let inbox = self.mailbox().folder.clone();
        self.pass_folder(s, &inbox, false, cancel, report).await?;
        let Some(sent) = self.mailbox().sent_folder.clone() else {
            return Ok(None);
        };
        if let Some((_, at)) = &*self.missing_sent.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.elapsed() < MISSING_RECHECK {
                // Asked again only after the wait (each try costs a LIST).
                return Ok(None);
            }
        }
        let missing = match self.pass_folder(s, &sent, true, cancel, report).await {
            Ok(()) => {
                *self.missing_sent.lock().unwrap_or_else(|p| p.into_inner()) = None;
                None
            }
            Err(WatchError::Imap(e @ ImapError::MissingFolder { .. })) => Some(e),
            Err(e) => return Err(e),
        };
        // IDLE watches the inbox: select it again.
        let ep = &self.mailbox().endpoint;
        imap::select(ep, s, &inbox, &format!("{}.folder", ep.section)).await?;
        Ok(missing)
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

    /// Fetches and ingests every message of `folder` past its cursor.
    async fn pass_folder(
        &self,
        s: &mut ImapSession,
        folder: &String,
        sent: bool,
        cancel: &CancellationToken,
        total: &mut PassReport,
    ) -> Result<(), WatchError> {
        let ep = &self.mailbox().endpoint;
        // Counted straight into the caller's report, so what was stored
        // stays counted when a later step fails.
        let before = *total;
        let report = total;
        let key = if sent { "sent_folder" } else { "folder" };
        let mbox = imap::select(ep, s, folder, &format!("{}.{key}", ep.section)).await?;
        let validity = mbox.uid_validity.unwrap_or(0);
        let store = &self.ingestor.store;
        let cursor = store.cursor(&self.queue, folder)?;
        let renumbered = match &cursor {
            Some(c) if c.uid_validity != validity => Some(c.uid_validity),
            _ => None,
        };
        let start = match cursor {
            Some(c) if c.uid_validity == validity => c.last_uid.saturating_add(1),
            Some(c) => {
                tracing::warn!(folder = %folder, old = c.uid_validity, new = validity, "the server gave the folder a new UIDVALIDITY (its messages were renumbered, or the folder was re-created); re-scanning it: stored messages are recognised and not ingested twice");
                1
            }
            None => 1,
        };
        if mbox.exists == 0 {
            return Ok(());
        }
        let found = timed(
            ep,
            "UID SEARCH",
            s.uid_search(format!("UID {start}:*")),
            |e| ImapError::Protocol("UID SEARCH", e),
        )
        .await?;
        // `n:*` matches the last message even when n is past it.
        let mut uids: Vec<u32> = found.into_iter().filter(|u| *u >= start).collect();
        uids.sort_unstable();
        let mut rest: &[u32] = &uids;
        while !rest.is_empty() {
            if cancel.is_cancelled() {
                break;
            }
            // Near a message that broke earlier fetches: one at a time,
            // and one that failed alone too often is quarantined.
            let trouble = self.trouble(folder, validity);
            if let Some(t) = trouble.as_ref().filter(|t| t.stuck_on(rest[0])) {
                let src = Source {
                    queue: self.queue.clone(),
                    folder: folder.clone(),
                    uid_validity: validity,
                    uid: rest[0],
                    sent,
                    cursor: true,
                };
                let why = format!("the server would not FETCH uid {}: {}", rest[0], t.error);
                tracing::error!(uid = rest[0], error = %t.error, "fetching this message failed {FETCH_ATTEMPTS} times; quarantined");
                self.ingestor
                    .quarantine_unfetched(&src, &why, self.fence.as_ref())?;
                report.quarantined += 1;
                self.clear_trouble(folder);
                rest = &rest[1..];
                continue;
            }
            let n = match &trouble {
                Some(t) if rest[0] <= t.until => 1,
                _ => CHUNK.min(rest.len()),
            };
            let (chunk, after) = rest.split_at(n);
            rest = after;
            // When these messages were first seen: the start of the
            // ingest latency metric.
            let seen = std::time::Instant::now();
            let Fetched { bodies, refused } = match self.fetch_chunk(s, chunk).await {
                Ok(f) => f,
                Err(e) => {
                    self.note_trouble(folder, validity, chunk, &e);
                    return Err(e);
                }
            };
            if n == 1 {
                self.clear_trouble_at(folder, chunk[0]);
            }
            // In UID order, so the cursor only ever moves forward over
            // messages that are stored.
            let src = |uid| Source {
                queue: self.queue.clone(),
                folder: folder.clone(),
                uid_validity: validity,
                uid,
                sent,
                cursor: true,
            };
            let mut items = Vec::with_capacity(chunk.len());
            for &uid in chunk {
                match (bodies.get(&uid), refused.get(&uid)) {
                    (Some((raw, truncated)), _) => {
                        report.fetched += 1;
                        items.push((
                            src(uid),
                            Item::Bytes {
                                raw,
                                truncated: *truncated,
                            },
                        ));
                    }
                    // The server keeps refusing this one message: kept in
                    // quarantine with its words, so the rest go on and
                    // the cursor passes nothing unrecorded.
                    (None, Some(why)) => items.push((src(uid), Item::Refused(why))),
                    (None, None) => {} // expunged meanwhile
                }
            }
            // One transaction per few MB: the transaction holds its
            // messages' bytes until it commits.
            let mut outcomes = Vec::with_capacity(items.len());
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
                outcomes.extend(
                    self.ingestor
                        .ingest_batch_fenced(&items[start..end], self.fence.as_ref())?,
                );
                start = end;
            }
            let m = &crate::metrics::METRICS;
            for outcome in outcomes {
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
            store.flush_async().await?;
            self.wake.both();
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

    async fn sizes(
        &self,
        s: &mut ImapSession,
        uids: &[u32],
    ) -> Result<HashMap<u32, u32>, WatchError> {
        let ep = &self.mailbox().endpoint;
        let set = uid_set(uids);
        let fetches = timed(
            ep,
            "UID FETCH",
            async {
                s.uid_fetch(&set, "(UID RFC822.SIZE)")
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            },
            |e| ImapError::Protocol("UID FETCH", e),
        )
        .await?;
        Ok(fetches
            .iter()
            .filter_map(|f| Some((f.uid?, f.size.unwrap_or(0))))
            .collect())
    }

    /// Sizes, then bytes of one chunk (headers only over the size limit).
    async fn fetch_chunk(&self, s: &mut ImapSession, chunk: &[u32]) -> Result<Fetched, WatchError> {
        let sizes = match self.sizes(s, chunk).await {
            // The server refused the sizes of this chunk (a message it
            // cannot read): take them one by one; one it refuses counts as
            // small and meets the same refusal when fetched.
            Err(WatchError::Imap(ImapError::Protocol(_, e))) if refusal(&e) => {
                let mut each = HashMap::new();
                for &uid in chunk {
                    match self.sizes(s, &[uid]).await {
                        Ok(one) => each.extend(one),
                        Err(WatchError::Imap(ImapError::Protocol(_, e))) if refusal(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                each
            }
            other => other?,
        };
        let max = self.mailbox().max_message_size;
        let mut group: Vec<u32> = Vec::new();
        let mut bytes = 0u64;
        let mut groups = Vec::new();
        for &uid in chunk {
            let size = sizes.get(&uid).copied().unwrap_or(0) as u64;
            if size > max {
                continue;
            }
            if !group.is_empty() && bytes + size > CHUNK_BYTES {
                groups.push(std::mem::take(&mut group));
                bytes = 0;
            }
            bytes += size;
            group.push(uid);
        }
        if !group.is_empty() {
            groups.push(group);
        }
        let mut got = Fetched::default();
        for g in groups {
            self.fetch_each(s, &g, "BODY.PEEK[]", None, &mut got)
                .await?;
        }
        for &uid in chunk {
            let size = sizes.get(&uid).copied().unwrap_or(0) as u64;
            if size > max {
                self.fetch_each(s, &[uid], "BODY.PEEK[HEADER]", Some(size), &mut got)
                    .await?;
            }
        }
        Ok(got)
    }

    /// Where fetching `folder` last broke, if it is still stuck there.
    fn trouble(&self, folder: &str, validity: u32) -> Option<Trouble> {
        let map = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
        map.get(folder).filter(|t| t.validity == validity).cloned()
    }

    /// Counts a failed fetch of `chunk`. A chunk that failed
    /// [`FETCH_ATTEMPTS`] times is then fetched one UID at a time; a
    /// single UID that failed as often is quarantined on the next pass.
    fn note_trouble(&self, folder: &str, validity: u32, chunk: &[u32], e: &WatchError) {
        let mut map = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
        let first = chunk[0];
        let last = chunk[chunk.len() - 1];
        let t = map.entry(folder.to_string()).or_insert(Trouble {
            validity,
            at: first,
            until: 0,
            failures: 0,
            error: String::new(),
        });
        if t.validity != validity {
            t.validity = validity;
            t.until = 0;
        }
        if t.at != first {
            t.at = first;
            t.failures = 0;
        }
        t.failures += 1;
        t.error = crate::error_chain(e);
        if chunk.len() > 1 && t.failures >= FETCH_ATTEMPTS {
            t.until = t.until.max(last);
            t.failures = 0;
        }
    }

    fn clear_trouble(&self, folder: &str) {
        let mut map = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get_mut(folder) {
            t.failures = 0;
        }
    }

    /// A single UID came through: the failures counted were elsewhere.
    fn clear_trouble_at(&self, folder: &str, uid: u32) {
        let mut map = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get_mut(folder) {
            if t.at == uid {
                t.failures = 0;
            }
            if uid >= t.until {
                map.remove(folder);
            }
        }
    }

    /// Fetches `uids` into `got`. When the server refuses the set, or
    /// answers without a message's bytes, each missing UID is fetched on
    /// its own, up to [`FETCH_ATTEMPTS`] times; one it still will not
    /// give (and has not expunged) goes to `got.refused` with its words.
    /// Connection trouble is returned as an error: the pass is retried.
    async fn fetch_each(
        &self,
        s: &mut ImapSession,
        uids: &[u32],
        what: &str,
        truncated: Option<u64>,
        got: &mut Fetched,
    ) -> Result<(), WatchError> {
        let mut why = "the server's FETCH answer held no message".to_string();
        match self.fetch(s, uids, what).await {
            Ok(v) => got
                .bodies
                .extend(v.into_iter().map(|(u, raw)| (u, (raw, truncated)))),
            Err(WatchError::Imap(ImapError::Protocol(_, e))) if refusal(&e) => {
                why = e.to_string();
                tracing::warn!(uids = uids.len(), error = %why, "the server refused a FETCH; fetching one message at a time");
            }
            Err(e) => return Err(e),
        }
        for &uid in uids {
            if got.bodies.contains_key(&uid) {
                continue;
            }
            let mut body = None;
            for _ in 0..FETCH_ATTEMPTS {
                match self.fetch(s, &[uid], what).await {
                    Ok(mut v) if !v.is_empty() => {
                        body = v.pop().map(|(_, raw)| raw);
                        break;
                    }
                    Ok(_) => {}
                    Err(WatchError::Imap(ImapError::Protocol(_, e))) if refusal(&e) => {
                        why = e.to_string();
                    }
                    Err(e) => return Err(e),
                }
            }
            match body {
                Some(raw) => {
                    got.bodies.insert(uid, (raw, truncated));
                }
                None if self.exists(s, uid).await? => {
                    tracing::error!(uid, error = %why, "the server will not give this message; quarantined");
                    got.refused
                        .insert(uid, format!("the server would not FETCH uid {uid}: {why}"));
                }
                None => {} // expunged meanwhile
            }
        }
        Ok(())
    }

    /// Is `uid` still in the selected folder?
    async fn exists(&self, s: &mut ImapSession, uid: u32) -> Result<bool, WatchError> {
        let ep = &self.mailbox().endpoint;
        let found = timed(ep, "UID SEARCH", s.uid_search(format!("UID {uid}")), |e| {
            ImapError::Protocol("UID SEARCH", e)
        })
        .await?;
        Ok(found.contains(&uid))
    }

    async fn fetch(
        &self,
        s: &mut ImapSession,
        uids: &[u32],
        what: &str,
    ) -> Result<Vec<(u32, Vec<u8>)>, WatchError> {
        let ep = &self.mailbox().endpoint;
        let set = uid_set(uids);
        let query = format!("(UID {what})");
        // Drain the whole response before the next command.
        let fetches = timed(
            ep,
            "UID FETCH",
            async {
                s.uid_fetch(&set, &query)
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            },
            |e| ImapError::Protocol("UID FETCH", e),
        )
        .await?;
        let wanted: std::collections::HashSet<u32> = uids.iter().copied().collect();
        Ok(fetches
            .iter()
            .filter_map(|f| {
                let uid = f.uid?;
                if !wanted.contains(&uid) {
                    return None;
                }
                let raw = f.body().or_else(|| f.header())?;
                Some((uid, raw.to_vec()))
            })
            .collect())
    }
}

/// Where fetching a folder broke the connection (a message the server
/// cannot read may make it hang up): kept across reconnects, so the
/// watcher narrows down to the message instead of failing forever.
#[derive(Debug, Clone)]
struct Trouble {
    validity: u32,
    /// The first UID of the fetch that failed.
    at: u32,
    /// Up to this UID, fetch one message at a time.
    until: u32,
    /// Failed fetches in a row starting at `at`.
    failures: u32,
    error: String,
}

impl Trouble {
    /// Has fetching `uid` alone failed often enough to give up on it?
    fn stuck_on(&self, uid: u32) -> bool {
        self.at == uid && uid <= self.until && self.failures >= FETCH_ATTEMPTS
    }
}

/// What a FETCH round brought: bytes (with the real size when only the
/// headers were fetched), and the UIDs the server refused, with its words.
#[derive(Default)]
struct Fetched {
    bodies: HashMap<u32, (Vec<u8>, Option<u64>)>,
    refused: HashMap<u32, String>,
}

/// The server answered NO or BAD: it refuses this command, the
/// connection itself is fine.
fn refusal(e: &async_imap::error::Error) -> bool {
    matches!(
        e,
        async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_)
    )
}

/// `1,3,5:9` from sorted UIDs.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}
