//! Outbox: every mail escalator sends is first written here, in the same
//! transaction as the change that caused it, and only then sent. The
//! worker sends each entry with its fixed Message-ID, marks it, and never
//! sends an entry that is marked sent.
//!
//! The window between "the server has the mail" and "the store knows"
//! is handled deliberately. The entry is flushed as `sending` before the
//! SMTP transaction; right after the server's 250 its id is appended to
//! the sent journal (one write call, safe from a killed process) and then
//! marked `sent` in the store. If the process dies while the server is
//! still taking the mail (it has the message, its 250 has not reached
//! us), the client cannot know whether it was kept. So every mail is also
//! addressed, in the same transaction, to the support address: after a
//! restart an entry left `sending` waits up to `confirm_wait` for that
//! confirmation copy (ingest settles the entry when it arrives), and until
//! ingest has read the inbox through past that wait; only without a copy
//! is it sent again. With copies off, it is sent again at once
//! with the same Message-ID: a rare duplicate rather than a lost
//! acknowledgement or escalation.

pub mod compose;
pub mod health;
pub mod journal;
pub mod smtp;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::case::EventKind;
use crate::clock::Clock;
use crate::store::{Store, StoreError};
pub use health::SmtpHealth;
use smtp::{Mailer, SmtpError};

pub use crate::record::{OutboxEntry, OutboxState};

/// The nonce of a mail's attachment placeholders: keyed, so a customer
/// cannot know it and put a placeholder into their own text.
pub fn attach_nonce(key: &[u8; 32], message_id: &str) -> String {
    let h = blake3::keyed_hash(key, format!("attach:{message_id}").as_bytes());
    h.to_hex()[..24].to_string()
}

/// The bytes standing in for stored message `seq` in a composed mail.
pub fn placeholder(nonce: &str, seq: u64) -> String {
    format!("escalator-original-{nonce}-{seq}")
}

/// The mail as it goes out: each placeholder replaced by the stored
/// message it stands for. A message no longer stored becomes a note; a
/// read error is an error.
pub fn expand(store: &Store, entry: &OutboxEntry, raw: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if entry.attach.is_empty() {
        return Ok(raw);
    }
    let mut out = raw;
    for seq in &entry.attach {
        let ph = placeholder(&entry.attach_nonce, *seq);
        let Some(at) = out.windows(ph.len()).position(|w| w == ph.as_bytes()) else {
            continue;
        };
        let original = match store.raw(*seq)? {
            Some(bytes) => bytes,
            None => {
                format!("X-Escalator-Note: message {seq} is no longer stored\r\n\r\n").into_bytes()
            }
        };
        out.splice(at..at + ph.len(), original);
    }
    Ok(out)
}

/// Transient failures are retried this long, then the entry fails.
const GIVE_UP_AFTER: chrono::Duration = chrono::Duration::days(3);

fn backoff(attempts: u32) -> chrono::Duration {
    let secs = 15u64.saturating_mul(1 << attempts.min(8)).min(3600);
    chrono::Duration::seconds(secs as i64)
}

/// What one drain did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub sent: usize,
    pub retrying: usize,
    pub failed: usize,
    /// A server refused our configuration (see [`SmtpHealth`]): its
    /// mail stays queued; the other servers' went on.
    pub refused: bool,
}

/// What became of one entry's send.
#[derive(Debug, PartialEq, Eq)]
enum Sending {
    Done(OutboxState),
    /// The server refused our configuration; the entry waits.
    Refused,
}

/// The outbox worker.
pub struct Outbox {
    pub store: Arc<Store>,
    pub mailer: Arc<dyn Mailer>,
    pub clock: Arc<dyn Clock>,
    /// Where accepted mail is noted the instant the server says 250.
    pub journal: journal::Journal,
    /// With confirmation copies (each mail Bcc'd to the address it is
    /// from: its queue's mailbox): how long an interrupted send waits
    /// for its copy.
    pub confirm: Option<Duration>,
    /// Woken when ingest or the scheduler queued new mail.
    pub wake: Arc<crate::wake::Wakers>,
    /// On a shared store (a cluster): how long an entry whose sending
    /// began belongs to the node sending it (`[cluster] claim`).
    pub claim: Option<Duration>,
    pub health: SmtpHealth,
    /// The addresses whose inboxes ingest reads (where the confirmation
    /// copies land): an interrupted send from one of them is sent again
    /// only once its inbox has been read past `confirm_wait`.
    pub watched: Vec<String>,
}

/// How long past `confirm_wait` an interrupted send waits for its inbox
/// to be read through before it goes out again all the same: a mailbox
/// that cannot be read for an hour should not hold up mail for good (a
/// rare duplicate beats a lost mail).
const READ_THROUGH_WAIT: chrono::Duration = chrono::Duration::hours(1);

/// Per watched address (lowercase): until when its inbox has been read
/// (None: not yet since the store began recording it).
type ReadThrough = std::collections::HashMap<String, Option<DateTime<Utc>>>;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox store access failed")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

impl Outbox {
    /// Runs until cancelled: drain, then sleep until the next retry or
    /// until ingest says there is new mail.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let wait = match self.drain(false, &cancel).await {
                Ok(_) => self.next_wake().unwrap_or(Duration::from_secs(3600)).min(
                    // Another process may queue mail, and its
                    // notification may be lost: look again now and then.
                    if self.store.is_shared() {
                        crate::wake::SHARED_POLL
                    } else {
                        Duration::MAX
                    },
                ),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "outbox drain failed; retrying in 10s");
                    Duration::from_secs(10)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.outbox.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.mailer.close().await;
    }

    /// Until when each watched inbox has been read, as the store has it.
    fn read_through(&self) -> Result<ReadThrough, StoreError> {
        self.watched
            .iter()
            .map(|a| Ok((a.to_ascii_lowercase(), self.store.read_through(a)?)))
            .collect()
    }

    /// An entry left `sending` by a crash: until when to wait for the
    /// confirmation copy (None: send it now). Its arrival in the inbox
    /// takes up to `confirm_wait`; then ingest must have read the inbox
    /// that far, which under a backlog of customer mail takes longer
    /// (a copy behind 1,000 messages once made an ack go out twice).
    fn awaiting_copy(
        &self,
        entry: &OutboxEntry,
        now: DateTime<Utc>,
        read: &ReadThrough,
    ) -> Option<DateTime<Utc>> {
        let wait = self.confirm.as_ref()?;
        if entry.state != OutboxState::Sending {
            return None;
        }
        let until = entry.attempt_at? + chrono::Duration::from_std(*wait).ok()?;
        if until > now {
            return Some(until);
        }
        // Not an inbox escalator reads: only the wait.
        let seen = read.get(&entry.from.to_ascii_lowercase())?;
        if seen.is_some_and(|seen| seen >= until) {
            return None;
        }
        let last = until + READ_THROUGH_WAIT;
        (last > now).then_some(last)
    }

    /// An entry left `sending` that nobody may touch yet: another node
    /// of the cluster claimed it (until its claim expires), or it waits
    /// for its confirmation copy. Until when.
    fn held(
        &self,
        entry: &OutboxEntry,
        now: DateTime<Utc>,
        read: &ReadThrough,
    ) -> Option<DateTime<Utc>> {
        let claimed = self.claim.and_then(|claim| {
            let until = entry.attempt_at? + chrono::Duration::from_std(claim).ok()?;
            (entry.state == OutboxState::Sending && until > now).then_some(until)
        });
        claimed.max(self.awaiting_copy(entry, now, read))
    }

    /// With a claim (a shared store): how much of it is left to a send
    /// claimed at `claimed_at`.
    fn claim_left(&self, claimed_at: DateTime<Utc>) -> Option<Duration> {
        let claim = self.claim?;
        let held = (self.clock.now() - claimed_at).to_std().unwrap_or_default();
        Some(claim.saturating_sub(held))
    }

    fn next_wake(&self) -> Option<Duration> {
        let now = self.clock.now();
        // A store that cannot be read now is asked again soon, as a
        // failed drain is.
        let Ok(pending) = self.store.outbox_pending() else {
            return Some(Duration::from_secs(10));
        };
        let Ok(read) = self.read_through() else {
            return Some(Duration::from_secs(10));
        };
        let next = pending
            .iter()
            .map(|e| {
                let blocked = self.health.blocked(&self.mailer.server(&e.from), now);
                self.held(e, now, &read)
                    .unwrap_or(e.next_attempt_at)
                    .max(blocked.unwrap_or(e.next_attempt_at))
            })
            .min()?;
        Some(
            (next - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(50)),
        )
    }

    /// Settles mail the server accepted just before the last stop.
    pub fn recover(&self) -> Result<usize, OutboxError> {
        Ok(self.journal.replay(&self.store, self.clock.now())?)
    }

    /// Sends every due entry once. With `all`, entries waiting for a
    /// retry are tried now too (for `run --once`).
    pub async fn drain(
        &self,
        all: bool,
        cancel: &CancellationToken,
    ) -> Result<DrainReport, OutboxError> {
        let mut report = DrainReport::default();
        let now = self.clock.now();
        // Mail the server accepted whose mark did not commit (the
        // database was gone for a moment): marked now, before anything is
        // sent, so this node never sends it again. (Another node could,
        // if this one stays cut off from the database past the claim.)
        self.journal.settle_pending(&self.store, now)?;
        // Servers that refused us in this drain: their other mail waits
        // (each try would be one more failed login).
        let mut refusing = std::collections::HashSet::new();
        let read = self.read_through()?;
        for entry in self.store.outbox_pending()? {
            if cancel.is_cancelled() {
                break;
            }
            if !all && entry.next_attempt_at > now {
                continue;
            }
            let server = self.mailer.server(&entry.from);
            if refusing.contains(&server) || (!all && self.health.blocked(&server, now).is_some()) {
                report.retrying += 1;
                report.refused = true;
                continue;
            }
            if let Some(at) = self.held(&entry, now, &read) {
                tracing::debug!(outbox_id = entry.id, until = %at, "being sent by another node, or waiting for its copy");
                report.retrying += 1;
                continue;
            }
            let id = entry.id;
            let sending = std::panic::AssertUnwindSafe(self.send_one(entry, &read));
            match futures::FutureExt::catch_unwind(sending).await {
                Ok(state) => match state? {
                    Sending::Done(OutboxState::Sent) => report.sent += 1,
                    Sending::Done(OutboxState::Failed) => report.failed += 1,
                    Sending::Done(_) => report.retrying += 1,
                    Sending::Refused => {
                        refusing.insert(server);
                        report.refused = true;
                        report.retrying += 1;
                    }
                },
                Err(panic) => {
                    // One bad entry must not kill the worker (and, after a
                    // restart, come first again): it is parked as failed
                    // with the error, for a person to look at and retry.
                    let why = crate::panic_text(&panic);
                    tracing::error!(outbox_id = id, error = %why, "sending panicked; entry parked as failed");
                    self.park(id, &why)?;
                    report.failed += 1;
                }
            }
        }
        if report.sent > 0 {
            // Every journaled id is marked sent by now (this worker is the
            // journal's only writer): once durable, the lines can go.
            self.store.flush_async().await?;
            if let Err(e) = self.journal.clear() {
                tracing::warn!(error = %e, "cannot empty the sent journal; it is replayed at start-up");
            }
        }
        Ok(report)
    }

    #[tracing::instrument(skip_all, fields(case_id = entry.case, outbox_id = entry.id, kind = %entry.kind))]
    async fn send_one(
        &self,
        entry: OutboxEntry,
        read: &ReadThrough,
    ) -> Result<Sending, OutboxError> {
        let now = self.clock.now();
        let id = entry.id;
        let mut entry = match self.claim_entry(id, now, read)? {
            Ok(e) => e,
            Err(state) => {
                if state == OutboxState::Sent {
                    self.journal.settled(id);
                }
                return Ok(Sending::Done(state));
            }
        };
        let stored = self.store.outbox_raw(entry.id)?;
        let Some(raw) = stored.map(|r| expand(&self.store, &entry, r)).transpose()? else {
            entry.state = OutboxState::Failed;
            entry.last_error = Some("the mail's bytes are missing from the store".into());
            self.finish(&entry)?;
            return Ok(Sending::Done(entry.state));
        };
        // Durable before the effect: a crash from here on resends.
        self.store.flush_async().await?;
        let mut rcpt = entry.to.clone();
        if self.confirm.is_some() {
            // Same transaction, so the copy's arrival proves acceptance.
            if !rcpt.iter().any(|r| r.eq_ignore_ascii_case(&entry.from)) {
                rcpt.push(entry.from.clone());
            }
        }
        let result = match self.claim_left(now) {
            None => self.mailer.send(&entry.from, &rcpt, &raw).await,
            // The claim ran out before the send began (a slow flush, a
            // paused process): another node may be sending it by now.
            Some(left) if left.is_zero() => {
                tracing::warn!("the claim on this mail expired before its send began; left to the node that claims it next");
                return Ok(Sending::Done(OutboxState::Sending));
            }
            // A send that began is never cut: dropped after the final
            // dot it could go out twice. `cluster.claim` outlasts the
            // longest send (the config refuses a shorter one).
            Some(_) => self.mailer.send(&entry.from, &rcpt, &raw).await,
        };
        let now = self.clock.now();
        count(&entry, &result, now);
        self.settle(entry, result, now).await
    }

    /// Reads the entry again and claims it as `sending`, in one
    /// transaction: the list came from a snapshot, and the entry may have
    /// been settled since (its confirmation copy arrived, a person failed
    /// or retried it). The state it is in when it is not to be sent.
    fn claim_entry(
        &self,
        id: u64,
        now: DateTime<Utc>,
        read: &ReadThrough,
    ) -> Result<Result<OutboxEntry, OutboxState>, StoreError> {
        self.store.transact(|tx| {
            // Another node claiming or settling it at this moment: left
            // to it, as a claimed entry is (no wait for its transaction).
            let Ok(found) = tx.outbox_entry_unless_held(id)? else {
                return Ok::<_, StoreError>(Err(OutboxState::Sending));
            };
            let Some(mut e) = found else {
                return Ok(Err(OutboxState::Failed));
            };
            if !e.state.is_pending() {
                return Ok(Err(e.state));
            }
            // This node's server accepted it already; only its mark had
            // not reached the store.
            if self.journal.holds(e.id) {
                journal::mark_sent(tx, &mut e, now)?;
                return Ok(Err(OutboxState::Sent));
            }
            // Claimed by another node since our list was read.
            if self.held(&e, now, read).is_some() {
                return Ok(Err(e.state));
            }
            if e.state == OutboxState::Sending {
                if self.confirm.is_some() && read.contains_key(&e.from.to_ascii_lowercase()) {
                    // Read through past the wait, or not read for an hour.
                    let seen = read.get(&e.from.to_ascii_lowercase()).copied().flatten();
                    tracing::warn!(inbox_read_until = ?seen, "sending again after an interruption mid-send: its confirmation copy is not in the inbox (or the inbox could not be read for an hour); if the server had it, the recipient sees it twice (same Message-ID)");
                } else {
                    tracing::warn!("sending again after an interruption mid-send; the recipient may see it twice (same Message-ID)");
                }
            }
            e.state = OutboxState::Sending;
            e.attempts += 1;
            e.attempt_at = Some(now);
            let node = self.health.node();
            e.claimed_by = (!node.is_empty()).then(|| node.to_string());
            tx.put_outbox(&e, None)?;
            Ok(Ok(e))
        })
    }

    /// Records what the server said about one mail: sent (journal, then
    /// store), failed for good, waiting for its server's fix, waiting for
    /// its confirmation copy, or pending a retry.
    async fn settle(
        &self,
        mut entry: OutboxEntry,
        result: Result<(), SmtpError>,
        now: DateTime<Utc>,
    ) -> Result<Sending, OutboxError> {
        let mut refused_by = None;
        match result {
            Ok(()) => {
                if let Err(e) = self.journal.record(entry.id) {
                    tracing::warn!(error = %e, "cannot write the sent journal; a crash now would send this mail again");
                }
                crate::fault::point(crate::fault::AFTER_SMTP_ACCEPT);
                self.store
                    .transact(|tx| journal::mark_sent(tx, &mut entry, now))?;
                self.journal.settled(entry.id);
                self.health
                    .works(&self.store, &self.mailer.server(&entry.from))?;
                // No flush here: the journal line already keeps the
                // acceptance across a crash (and the confirmation copy
                // across a power cut), so the store's next flush is enough.
                tracing::info!(to = ?entry.to, "mail sent");
                return Ok(Sending::Done(entry.state));
            }
            Err(SmtpError::Permanent(why)) | Err(SmtpError::Setup(why)) => {
                tracing::error!(error = %why, "mail refused for good");
                entry.state = OutboxState::Failed;
                entry.last_error = Some(why);
            }
            Err(SmtpError::Config(why)) => {
                // Not this mail's fault: it waits, however long the fix
                // takes (no give-up time), until its server's backoff ends.
                let server = self.mailer.server(&entry.from);
                entry.state = OutboxState::Pending;
                entry.next_attempt_at = self.health.refused(&server, &why, now);
                // The give-up time for transient failures counts from
                // when the server took us again, as after `outbox retry`:
                // mail that waited out a 4-day outage of the password is
                // not failed by the first timeout after the fix.
                entry.created_at = now;
                entry.last_error = Some(why);
                refused_by = Some(server);
            }
            Err(SmtpError::Unknown(why)) if self.confirm.is_some() => {
                // As after a crash mid-send: the server may have the mail.
                // Stay `sending`; the confirmation copy settles it within
                // `confirm_wait`, and only without one is it sent again.
                let wait = self.confirm.unwrap_or_default();
                entry.next_attempt_at =
                    now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::zero());
                entry.attempt_at = Some(now);
                tracing::warn!(error = %why, until = %entry.next_attempt_at, "answer to the message data lost; waiting for the confirmation copy");
                entry.last_error = Some(why);
            }
            Err(SmtpError::Transient(why)) | Err(SmtpError::Unknown(why)) => {
                if now - entry.created_at > GIVE_UP_AFTER {
                    entry.state = OutboxState::Failed;
                    entry.last_error =
                        Some(format!("gave up after {} attempts: {why}", entry.attempts));
                } else {
                    entry.state = OutboxState::Pending;
                    entry.next_attempt_at = now + backoff(entry.attempts);
                    tracing::warn!(error = %why, retry_at = %entry.next_attempt_at, "temporary SMTP failure; will retry");
                    entry.last_error = Some(why);
                }
            }
        }
        self.finish(&entry)?;
        if let Some(server) = &refused_by {
            // After the mail's own record: a failed write here leaves
            // the mail as it should be.
            self.health.record(&self.store, server)?;
        }
        self.store.flush_async().await?;
        Ok(match refused_by {
            Some(_) => Sending::Refused,
            None => Sending::Done(entry.state),
        })
    }

    /// Parks an entry whose sending panicked: failed, with the error.
    fn park(&self, id: u64, why: &str) -> Result<(), StoreError> {
        let Some(mut entry) = self.store.outbox_entry(id)? else {
            return Ok(());
        };
        entry.state = OutboxState::Failed;
        entry.last_error = Some(format!("internal error while sending: {why}"));
        self.finish(&entry)?;
        self.store.flush()
    }

    /// Records a retry or a failure on the entry (and a failure in the case).
    fn finish(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        let now = self.clock.now();
        self.store.transact(|tx| {
            // Settled meanwhile (its confirmation copy or its bounce
            // arrived while we were waiting for the server): sent stays
            // sent, bounced stays bounced.
            if let Some(stored) = tx.outbox_entry(entry.id)? {
                if matches!(stored.state, OutboxState::Sent | OutboxState::Bounced) {
                    return Ok(());
                }
            }
            tx.put_outbox(entry, None)?;
            if entry.state == OutboxState::Failed {
                if let Some(mut c) = tx.case(entry.case)? {
                    c.push(
                        now,
                        EventKind::MailFailed {
                            outbox_id: entry.id,
                            mail: entry.kind.clone(),
                            error: entry.last_error.clone().unwrap_or_default(),
                        },
                    );
                    tx.put_case(&mut c)?;
                }
            }
            Ok(())
        })
    }
}

/// Makes a failed entry pending again (`escalator outbox retry`).
pub fn retry(
    store: &Store,
    id: u64,
    now: DateTime<Utc>,
) -> Result<Option<OutboxEntry>, StoreError> {
    let e = store.transact(|tx| {
        let Some(mut e) = tx.outbox_entry(id)? else {
            return Ok::<_, StoreError>(None);
        };
        if e.state == OutboxState::Failed {
            e.state = OutboxState::Pending;
            e.next_attempt_at = now;
            e.created_at = now;
            tx.put_outbox(&e, None)?;
        }
        Ok(Some(e))
    })?;
    store.flush()?;
    Ok(e)
}

/// Counts one send in the metrics.
fn count(entry: &OutboxEntry, result: &Result<(), SmtpError>, now: DateTime<Utc>) {
    let m = &crate::metrics::METRICS;
    match result {
        Ok(()) => {
            m.mail_sent.inc(&[("kind", &entry.kind)]);
            if entry.kind == "ack" {
                m.ack_latency
                    .observe((now - entry.created_at).to_std().unwrap_or_default());
            }
        }
        Err(e) => {
            crate::metrics::inc(&m.smtp_errors);
            let class = match e {
                SmtpError::Transient(_) | SmtpError::Unknown(_) => "transient",
                SmtpError::Config(_) => "config",
                _ => "permanent",
            };
            m.mail_failures.inc(&[("kind", class)]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
