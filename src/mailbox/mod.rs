//! Mailbox: watches the support folder over IMAP and feeds every new
//! message to ingest. Resumable by UID (the cursor lives in the store and
//! moves in the same transaction as the message), read-only (EXAMINE and
//! BODY.PEEK, so customers' mail keeps its flags), IDLE when the server
//! has it, polling otherwise, and reconnecting with backoff forever.

pub mod imap;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::{Ingestor, Outcome, Source};
use crate::scheduler::Wakers;
use crate::store::StoreError;
use imap::{timed, ImapError, ImapSession};

/// RFC 2177: re-issue IDLE before 29 minutes.
const IDLE_RENEW: Duration = Duration::from_secs(25 * 60);
/// UIDs per FETCH round, and most bytes fetched in one round.
const CHUNK: usize = 200;
const CHUNK_BYTES: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error("cannot store a fetched message")]
    Store(#[from] StoreError),
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

pub struct Watcher {
    pub config: Arc<Config>,
    pub ingestor: Arc<Ingestor>,
    /// Told after each committed batch, so acks go out at once and the
    /// scheduler sees new deadlines.
    pub wake: Arc<Wakers>,
}

impl Watcher {
    /// One pass: connect, ingest everything new, log out.
    pub async fn once(&self, cancel: &CancellationToken) -> Result<PassReport, WatchError> {
        let mut s = imap::connect(&self.config.mailbox.endpoint).await?;
        let report = self.pass(&mut s, cancel).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.logout()).await;
        Ok(report)
    }

    /// Watches until cancelled. Server trouble is logged and retried
    /// with backoff, forever; a store failure (a full disk) is returned,
    /// because going on could only lose mail.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StoreError> {
        let mut failures: u32 = 0;
        loop {
            match self.session(&cancel, &mut failures).await {
                Ok(()) => return Ok(()),
                Err(WatchError::Store(e)) => return Err(e),
                Err(e) => {
                    failures += 1;
                    crate::metrics::inc(&crate::metrics::METRICS.imap_errors);
                    let auth = matches!(&e, WatchError::Imap(i) if i.is_auth());
                    // Wrong credentials won't fix themselves quickly: wait
                    // longer, so the server's lockout is not provoked.
                    let base = if auth { 60 } else { 1 };
                    let wait = Duration::from_secs((base << failures.min(6)).min(300));
                    if auth {
                        tracing::error!(error = %crate::error_chain(&e), retry_in = ?wait, "IMAP login failed");
                    } else {
                        tracing::warn!(error = %crate::error_chain(&e), retry_in = ?wait, "IMAP connection lost");
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
        let ep = &self.config.mailbox.endpoint;
        let mut s = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = imap::connect(ep) => r?,
        };
        let caps = timed(ep, "CAPABILITY", s.capabilities(), |e| {
            ImapError::Protocol("CAPABILITY", e)
        })
        .await?;
        let idle = self.config.mailbox.idle && caps.has_str("IDLE");
        tracing::info!(host = %ep.host, folder = %self.config.mailbox.folder, idle, "watching mailbox");
        let wait = if idle {
            IDLE_RENEW.min(
                self.config
                    .mailbox
                    .poll_interval
                    .max(Duration::from_secs(60)),
            )
        } else {
            self.config.mailbox.poll_interval
        };
        loop {
            self.pass(&mut s, cancel).await?;
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
    /// Sent folder (agents' answers) when one is configured.
    async fn pass(
        &self,
        s: &mut ImapSession,
        cancel: &CancellationToken,
    ) -> Result<PassReport, WatchError> {
        let inbox = self.config.mailbox.folder.clone();
        let mut report = self.pass_folder(s, &inbox, false, cancel).await?;
        if let Some(sent) = self.config.mailbox.sent_folder.clone() {
            let r = self.pass_folder(s, &sent, true, cancel).await?;
            report.fetched += r.fetched;
            report.stored += r.stored;
            report.new_cases += r.new_cases;
            report.duplicates += r.duplicates;
            report.quarantined += r.quarantined;
            // IDLE watches the inbox: select it again.
            timed(
                &self.config.mailbox.endpoint,
                "EXAMINE",
                s.examine(&inbox),
                |e| ImapError::Folder(inbox.clone(), e),
            )
            .await?;
        }
        Ok(report)
    }

    /// Fetches and ingests every message of `folder` past its cursor.
    async fn pass_folder(
        &self,
        s: &mut ImapSession,
        folder: &String,
        sent: bool,
        cancel: &CancellationToken,
    ) -> Result<PassReport, WatchError> {
        let ep = &self.config.mailbox.endpoint;
        let mut report = PassReport::default();
        let mbox = timed(ep, "EXAMINE", s.examine(folder), |e| {
            ImapError::Folder(folder.clone(), e)
        })
        .await?;
        let validity = mbox.uid_validity.unwrap_or(0);
        let store = &self.ingestor.store;
        let start = match store.cursor(folder)? {
            Some(c) if c.uid_validity == validity => c.last_uid.saturating_add(1),
            Some(c) => {
                tracing::warn!(old = c.uid_validity, new = validity, "UIDVALIDITY changed; re-scanning the folder (stored messages are not ingested twice)");
                1
            }
            None => 1,
        };
        if mbox.exists == 0 {
            return Ok(report);
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
        for chunk in uids.chunks(CHUNK) {
            if cancel.is_cancelled() {
                break;
            }
            // When these messages were first seen: the start of the
            // ingest latency metric.
            let seen = std::time::Instant::now();
            let sizes = self.sizes(s, chunk).await?;
            let max = self.config.mailbox.max_message_size;
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
            let mut bodies: HashMap<u32, (Vec<u8>, Option<u64>)> = HashMap::new();
            for g in groups {
                for (uid, raw) in self.fetch(s, &g, "BODY.PEEK[]").await? {
                    bodies.insert(uid, (raw, None));
                }
            }
            for &uid in chunk {
                let size = sizes.get(&uid).copied().unwrap_or(0) as u64;
                if size > max {
                    for (u, raw) in self.fetch(s, &[uid], "BODY.PEEK[HEADER]").await? {
                        bodies.insert(u, (raw, Some(size)));
                    }
                }
            }
            // In UID order, so the cursor only ever moves forward over
            // messages that are stored.
            for &uid in chunk {
                let Some((raw, truncated)) = bodies.remove(&uid) else {
                    continue; // expunged meanwhile
                };
                report.fetched += 1;
                let src = Source {
                    folder: folder.clone(),
                    uid_validity: validity,
                    uid,
                    sent,
                    cursor: true,
                };
                let outcome = self.ingestor.ingest(Some(&src), &raw, truncated)?;
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
                };
                m.ingested.inc(&[("outcome", label)]);
            }
            store.flush_async().await?;
            self.wake.both();
        }
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
        Ok(report)
    }

    async fn sizes(
        &self,
        s: &mut ImapSession,
        uids: &[u32],
    ) -> Result<HashMap<u32, u32>, WatchError> {
        let ep = &self.config.mailbox.endpoint;
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

    async fn fetch(
        &self,
        s: &mut ImapSession,
        uids: &[u32],
        what: &str,
    ) -> Result<Vec<(u32, Vec<u8>)>, WatchError> {
        let ep = &self.config.mailbox.endpoint;
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

#[cfg(test)]
mod tests {
    #[test]
    fn uid_sets() {
        assert_eq!(super::uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(super::uid_set(&[4]), "4");
    }
}
