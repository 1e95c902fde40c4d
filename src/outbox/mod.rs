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
//! confirmation copy (ingest settles the entry when it arrives), and only
//! without one is it sent again. With copies off, it is sent again at once
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
}

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

    /// An entry left `sending` by a crash: until when to wait for the
    /// confirmation copy (None: send it now).
    fn awaiting_copy(&self, entry: &OutboxEntry, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let wait = self.confirm.as_ref()?;
        if entry.state != OutboxState::Sending {
            return None;
        }
        let until = entry.attempt_at? + chrono::Duration::from_std(*wait).ok()?;
        (until > now).then_some(until)
    }

    /// An entry left `sending` that nobody may touch yet: another node
    /// of the cluster claimed it (until its claim expires), or it waits
    /// for its confirmation copy. Until when.
    fn held(&self, entry: &OutboxEntry, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let claimed = self.claim.and_then(|claim| {
            let until = entry.attempt_at? + chrono::Duration::from_std(claim).ok()?;
            (entry.state == OutboxState::Sending && until > now).then_some(until)
        });
        claimed.max(self.awaiting_copy(entry, now))
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
        let pending = self.store.outbox_pending().ok()?;
        let next = pending
            .iter()
            .map(|e| {
                let blocked = self.health.blocked(&self.mailer.server(&e.from), now);
                self.held(e, now)
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
            if let Some(at) = self.held(&entry, now) {
                tracing::debug!(outbox_id = entry.id, until = %at, "being sent by another node, or waiting for its copy");
                report.retrying += 1;
                continue;
            }
            let id = entry.id;
            let sending = std::panic::AssertUnwindSafe(self.send_one(entry));
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
    async fn send_one(&self, entry: OutboxEntry) -> Result<Sending, OutboxError> {
        let now = self.clock.now();
        let id = entry.id;
        let mut entry = match self.claim_entry(id, now)? {
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
    ) -> Result<Result<OutboxEntry, OutboxState>, StoreError> {
        self.store.transact(|tx| {
            let Some(mut e) = tx.outbox_entry(id)? else {
                return Ok::<_, StoreError>(Err(OutboxState::Failed));
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
            if self.held(&e, now).is_some() {
                return Ok(Err(e.state));
            }
            if e.state == OutboxState::Sending {
                tracing::warn!("sending again after an interruption mid-send; the recipient may see it twice (same Message-ID)");
            }
            e.state = OutboxState::Sending;
            e.attempts += 1;
            e.attempt_at = Some(now);
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
pub(crate) mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Answers with scripted results (then success) and counts sends.
    #[derive(Default)]
    struct Script {
        results: Mutex<VecDeque<Result<(), SmtpError>>>,
        sent: Mutex<Vec<Vec<u8>>>,
        /// Its config section (default `smtp`).
        server: Option<&'static str>,
        /// A mail holding this text makes the transport panic, as a bug
        /// in it would.
        panic_on: Mutex<Option<String>>,
    }

    #[async_trait::async_trait]
    impl Mailer for Script {
        async fn send(&self, _: &str, _: &[String], raw: &[u8]) -> Result<(), SmtpError> {
            let panic_on = self.panic_on.lock().unwrap().take();
            if let Some(text) = panic_on {
                if String::from_utf8_lossy(raw).contains(&text) {
                    panic!("test-induced failure sending {text}");
                }
                *self.panic_on.lock().unwrap() = Some(text);
            }
            self.sent.lock().unwrap().push(raw.to_vec());
            self.results.lock().unwrap().pop_front().unwrap_or(Ok(()))
        }

        fn server(&self, _: &str) -> String {
            self.server.unwrap_or("smtp").to_string()
        }
    }

    fn entry(id: u64, now: DateTime<Utc>) -> OutboxEntry {
        OutboxEntry {
            id,
            case: 0,
            kind: "ack".into(),
            message_id: format!("m{id}@example.test"),
            from: "support@example.test".into(),
            to: vec!["alice@example.org".into()],
            subject: "s".into(),
            state: OutboxState::Pending,
            attempts: 0,
            created_at: now,
            next_attempt_at: now,
            sent_at: None,
            last_error: None,
            attempt_at: None,
            attach: Vec::new(),
            attach_nonce: String::new(),
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        outbox: Outbox,
        mailer: Arc<Script>,
        clock: Arc<ManualClock>,
    }

    fn setup(ids: &[u64], confirm: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
        let now = DateTime::parse_from_rfc3339("2026-11-23T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        store
            .transact(|tx| {
                for id in ids {
                    // As composed mail is: its Message-ID in its header.
                    let raw =
                        format!("Message-ID: <m{id}@example.test>\r\nSubject: s\r\n\r\nbody\r\n");
                    tx.put_outbox(&entry(*id, now), Some(raw.as_bytes()))?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let clock = Arc::new(ManualClock::new(now));
        let mailer = Arc::new(Script::default());
        let outbox = Outbox {
            journal: journal::Journal::open(&dir.path().join("store")).unwrap(),
            store,
            mailer: mailer.clone(),
            clock: clock.clone(),
            confirm: confirm.then_some(Duration::from_secs(120)),
            wake: Default::default(),
            claim: None,
            health: Default::default(),
        };
        Setup {
            _dir: dir,
            outbox,
            mailer,
            clock,
        }
    }

    fn state(s: &Setup, id: u64) -> OutboxState {
        s.outbox.store.outbox_entry(id).unwrap().unwrap().state
    }

    /// The confirmation copy of entry `id` arrives.
    fn settle(s: &Setup, id: u64) {
        let now = s.clock.now();
        s.outbox
            .store
            .transact(|tx| {
                let mut e = tx.outbox_entry(id)?.unwrap();
                journal::mark_sent(tx, &mut e, now)
            })
            .unwrap();
    }

    fn sends(s: &Setup) -> usize {
        s.mailer.sent.lock().unwrap().len()
    }

    /// A wrong SMTP password (or a sender the server will not take) is
    /// not the mail's fault: the first refusal ends the tries through
    /// that server (each would be one more failed login), no mail fails
    /// however long the fix takes, the refusal is kept for `stats` and
    /// the gauge, the server is left alone until its backoff ends, and
    /// the first mail that goes out clears it.
    #[tokio::test(start_paused = true)]
    async fn a_refused_configuration_keeps_all_mail_queued_and_is_recorded() {
        let s = setup(&[1, 2, 3], false);
        let refusal = "the server refused the login as \"support\": 535 5.7.8 bad credentials";
        let refuse = || {
            s.mailer
                .results
                .lock()
                .unwrap()
                .push_back(Err(SmtpError::Config(refusal.into())))
        };
        refuse();
        let r = s
            .outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert!(r.refused);
        assert_eq!((r.sent, r.failed, r.retrying), (0, 0, 3));
        assert_eq!(sends(&s), 1, "one try: the rest wait for the server");
        for id in [1, 2, 3] {
            assert_eq!(state(&s, id), OutboxState::Pending);
        }
        let problems = s.outbox.store.smtp_problems().unwrap();
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].error.as_str(), problems[0].server.as_str()),
            (refusal, "smtp")
        );
        assert_eq!(s.outbox.health.problems(), [refusal]);
        // New mail meanwhile does not make it log in again.
        let r = s
            .outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            (sends(&s), r.refused),
            (1, true),
            "left alone during the backoff"
        );
        assert_eq!(
            s.outbox.next_wake(),
            Some(Duration::from_secs(60)),
            "no busy loop"
        );
        // Days later, still refused: still queued, not given up.
        s.clock.advance(chrono::Duration::days(5));
        refuse();
        let r = s
            .outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert!(r.refused);
        assert_eq!(state(&s, 1), OutboxState::Pending);
        assert_eq!(
            s.outbox.next_wake(),
            Some(Duration::from_secs(120)),
            "the wait doubles"
        );
        // Fixed, and the first try after the fix times out: five days
        // in the queue do not count against the give-up time.
        s.clock.advance(chrono::Duration::minutes(2));
        s.mailer
            .results
            .lock()
            .unwrap()
            .push_back(Err(SmtpError::Transient("timeout".into())));
        s.outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(state(&s, 1), OutboxState::Pending, "not given up");
        // The others went out meanwhile, and this one next.
        let r = s
            .outbox
            .drain(true, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((r.sent, r.refused), (1, false));
        for id in [1, 2, 3] {
            assert_eq!(state(&s, id), OutboxState::Sent);
        }
        assert!(s.outbox.store.smtp_problems().unwrap().is_empty());
        assert!(s.outbox.health.problems().is_empty());
    }

    /// One queue's server refusing us holds up no other queue's mail.
    #[tokio::test(start_paused = true)]
    async fn a_refusing_server_holds_up_only_its_own_mail() {
        let s = setup(&[1, 2, 3], false);
        // Entry 1 is from a queue with a server of its own.
        s.outbox
            .store
            .transact(|tx| {
                let mut e = tx.outbox_entry(1)?.unwrap();
                e.from = "billing@example.test".into();
                tx.put_outbox(&e, None)
            })
            .unwrap();
        let refusing = Arc::new(Script {
            server: Some("mailboxes[1].smtp"),
            ..Default::default()
        });
        refusing
            .results
            .lock()
            .unwrap()
            .push_back(Err(SmtpError::Config("535 no".into())));
        let routed = smtp::ByFrom {
            main: s.mailer.clone(),
            routes: vec![(
                "billing@example.test".into(),
                refusing.clone() as Arc<dyn Mailer>,
            )],
        };
        std::fs::create_dir(s._dir.path().join("other")).unwrap();
        let outbox = Outbox {
            mailer: Arc::new(routed),
            journal: journal::Journal::open(&s._dir.path().join("other")).unwrap(),
            store: s.outbox.store.clone(),
            clock: s.clock.clone(),
            confirm: None,
            wake: Default::default(),
            claim: None,
            health: Default::default(),
        };
        let r = outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((r.sent, r.retrying, r.refused), (2, 1, true));
        assert_eq!(state(&s, 1), OutboxState::Pending);
        assert_eq!(state(&s, 2), OutboxState::Sent);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), chrono::Duration::seconds(30));
        assert!(backoff(3) > backoff(2));
        assert_eq!(backoff(30), chrono::Duration::seconds(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_after_data_waits_for_the_confirmation_copy() {
        // Input: the connection is cut after the message data went out:
        // the server may have accepted it. It was resent at once (a
        // duplicate); now it waits for the copy like after a crash.
        let s = setup(&[1, 2], true);
        s.mailer.results.lock().unwrap().extend([
            Err(SmtpError::Unknown("timeout".into())),
            Err(SmtpError::Unknown("cut".into())),
        ]);
        let cancel = CancellationToken::new();
        s.outbox.drain(false, &cancel).await.unwrap();
        assert_eq!(sends(&s), 2);
        assert_eq!(state(&s, 1), OutboxState::Sending);
        // A minute later: still waiting, nothing sent again.
        s.clock.advance(chrono::Duration::seconds(60));
        s.outbox.drain(false, &cancel).await.unwrap();
        s.outbox.drain(true, &cancel).await.unwrap();
        assert_eq!(sends(&s), 2, "no resend within confirm_wait");
        // Entry 1's copy arrives: it was accepted, it is never resent.
        settle(&s, 1);
        // Past confirm_wait, entry 2 (no copy: the server never had it)
        // goes out again, once.
        s.clock.advance(chrono::Duration::seconds(61));
        s.outbox.drain(false, &cancel).await.unwrap();
        assert_eq!(sends(&s), 3);
        assert_eq!(state(&s, 1), OutboxState::Sent);
        assert_eq!(state(&s, 2), OutboxState::Sent);
    }

    #[tokio::test(start_paused = true)]
    async fn r17_mail_whose_sent_mark_failed_is_marked_not_sent_again_when_its_claim_expires() {
        // Input (PostgreSQL, no confirmation copies): the connection
        // dropped right after the server's 250, the sent mark failed, the
        // entry stayed `sending`, its claim expired and it went out a
        // second time although the journal held its id.
        let mut s = setup(&[1, 2], false);
        s.outbox.claim = Some(Duration::from_secs(120));
        let now = s.clock.now();
        s.outbox
            .store
            .transact(|tx| {
                let mut e = tx.outbox_entry(1)?.unwrap();
                e.state = OutboxState::Sending;
                e.attempt_at = Some(now);
                tx.put_outbox(&e, None)
            })
            .unwrap();
        // Accepted by the server and journaled; the mark never committed.
        s.outbox.journal.record(1).unwrap();
        // Not emptied while a mark it holds is not in the store.
        s.outbox.journal.clear().unwrap();
        let path = s.outbox.store.path().join("sent.journal");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        s.clock.advance(chrono::Duration::seconds(130));
        let cancel = CancellationToken::new();
        s.outbox.drain(true, &cancel).await.unwrap();
        assert_eq!(sends(&s), 1, "entry 2 only: entry 1 was marked, not resent");
        assert_eq!(state(&s, 1), OutboxState::Sent);
        assert!(!s.outbox.journal.holds(1));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "settled, then emptied"
        );
        // The same when the entry is reached through a stale list.
        let mut s = setup(&[3], false);
        s.outbox.claim = Some(Duration::from_secs(120));
        let snapshot = s.outbox.store.outbox_pending().unwrap();
        s.outbox.journal.record(3).unwrap();
        for e in snapshot {
            assert_eq!(
                s.outbox.send_one(e).await.unwrap(),
                Sending::Done(OutboxState::Sent)
            );
        }
        assert_eq!(sends(&s), 0);
    }

    /// Sends only after the clock moved on by `delay` (a slow server).
    struct Slow(Arc<ManualClock>, chrono::Duration, Arc<Script>);

    #[async_trait::async_trait]
    impl Mailer for Slow {
        async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError> {
            self.0.advance(self.1);
            tokio::time::sleep(self.1.to_std().unwrap()).await;
            self.2.send(from, to, raw).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn r17_a_node_checks_its_own_claim_before_a_send_and_never_cuts_one() {
        // Input: `claim` shorter than a send may take; a live node's slow
        // send was sent again by another node meanwhile. The config now
        // refuses such a claim (config::tests); a node checks its claim
        // before a send begins, and a send that began is never cut (cut
        // after the final dot, it could go out twice).
        let mut s = setup(&[1], false);
        s.outbox.claim = Some(Duration::from_secs(60));
        let slow = Arc::new(Slow(
            s.clock.clone(),
            chrono::Duration::seconds(90),
            s.mailer.clone(),
        ));
        s.outbox.mailer = slow;
        let cancel = CancellationToken::new();
        s.outbox.drain(true, &cancel).await.unwrap();
        assert_eq!(sends(&s), 1, "the slow send finished, once");
        assert_eq!(state(&s, 1), OutboxState::Sent);
        // The claim already over when the send would begin: not sent.
        let claimed_at = s.clock.now();
        s.clock.advance(chrono::Duration::seconds(61));
        assert_eq!(s.outbox.claim_left(claimed_at), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn mail_another_node_is_sending_is_left_to_it_until_its_claim_expires() {
        // A cluster without confirmation copies: node B read its list
        // while node A had entry 1 `sending`. Without claims B sent it at
        // once: two nodes, one mail, two deliveries.
        let mut s = setup(&[1, 2], false);
        s.outbox.claim = Some(Duration::from_secs(120));
        let now = s.clock.now();
        let snapshot = s.outbox.store.outbox_pending().unwrap();
        s.outbox
            .store
            .transact(|tx| {
                let mut e = tx.outbox_entry(1)?.unwrap();
                e.state = OutboxState::Sending;
                e.attempt_at = Some(now - chrono::Duration::seconds(10));
                tx.put_outbox(&e, None)
            })
            .unwrap();
        // From the stale snapshot too: the claim is read again.
        for e in snapshot {
            s.outbox.send_one(e).await.unwrap();
        }
        let cancel = CancellationToken::new();
        s.outbox.drain(true, &cancel).await.unwrap();
        assert_eq!(sends(&s), 1, "only entry 2");
        assert_eq!(state(&s, 1), OutboxState::Sending);
        // A died mid-send: once the claim has expired, B sends it, once.
        s.clock.advance(chrono::Duration::seconds(111));
        s.outbox.drain(false, &cancel).await.unwrap();
        assert_eq!(sends(&s), 2);
        assert_eq!(state(&s, 1), OutboxState::Sent);
        s.outbox.drain(true, &cancel).await.unwrap();
        assert_eq!(sends(&s), 2);
    }

    #[test]
    fn daemons_sharing_a_directory_take_journal_slots_and_settle_a_dead_one_s() {
        // Two daemons of a cluster on one machine, one config, one `path`:
        // a shared journal would let one empty the other's lines.
        let s = setup(&[1, 2], true);
        let dir = tempfile::tempdir().unwrap();
        let a = journal::Journal::open_slot(dir.path()).unwrap();
        let b = journal::Journal::open_slot(dir.path()).unwrap();
        assert!(dir.path().join("sent-0.journal").exists());
        assert!(dir.path().join("sent-1.journal").exists(), "a slot each");
        // b had entry 2 accepted by the server, then died.
        b.record(2).unwrap();
        drop(b);
        let now = s.clock.now();
        // a's own slot is held: nothing of it is touched; b's is settled.
        a.record(1).unwrap();
        let settled = journal::Journal::settle_orphans(dir.path(), &s.outbox.store, now).unwrap();
        assert_eq!(settled, 1);
        assert_eq!(state(&s, 2), OutboxState::Sent);
        assert_eq!(
            state(&s, 1),
            OutboxState::Pending,
            "a is alive: its line stays its own"
        );
        // A daemon started now takes the dead one's slot.
        let c = journal::Journal::open_slot(dir.path()).unwrap();
        c.record(7).unwrap();
        let text = std::fs::read_to_string(dir.path().join("sent-1.journal")).unwrap();
        assert_eq!(text, "7\n", "the settled journal was emptied, then reused");
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_settled_since_the_snapshot_is_not_sent() {
        // Race: the drain read its list, then the confirmation copy marked
        // an entry sent; the drain overwrote that and sent it again.
        let s = setup(&[1], true);
        let snapshot = s.outbox.store.outbox_pending().unwrap();
        settle(&s, 1);
        for e in snapshot {
            assert_eq!(
                s.outbox.send_one(e).await.unwrap(),
                Sending::Done(OutboxState::Sent)
            );
        }
        assert_eq!(sends(&s), 0, "sent already: not sent again");
        assert_eq!(state(&s, 1), OutboxState::Sent);
    }

    #[tokio::test(start_paused = true)]
    async fn sent_mail_bodies_are_pruned_after_keep_sent_and_metadata_stays() {
        // Input: a store running for months: every sent mail's bytes (and
        // every forward's copy of the originals) were kept forever.
        let s = setup(&[1, 2, 3], true);
        s.outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(sends(&s), 3);
        // A fourth, failed, created at the same time: keeps its bytes.
        let mut failed = entry(4, s.clock.now());
        failed.state = OutboxState::Failed;
        s.outbox
            .store
            .transact(|tx| tx.put_outbox(&failed, Some(b"x")))
            .unwrap();
        let store = &s.outbox.store;
        let has_raw = |id| store.outbox_raw(id).unwrap().is_some();
        // Before the cutoff nothing goes.
        assert_eq!(
            store
                .prune_sent(s.clock.now() - chrono::Duration::days(30), 100)
                .unwrap(),
            0
        );
        assert!(has_raw(1));
        s.clock.advance(chrono::Duration::days(31));
        let cutoff = s.clock.now() - chrono::Duration::days(30);
        assert_eq!(store.prune_sent(cutoff, 100).unwrap(), 3);
        assert!(!has_raw(1) && !has_raw(2) && !has_raw(3));
        assert!(has_raw(4), "unsent mail keeps its bytes");
        let e = store.outbox_entry(2).unwrap().unwrap();
        assert_eq!(e.state, OutboxState::Sent, "the entry itself stays");
        // The walk resumes where it stopped: nothing is looked at twice.
        assert_eq!(store.prune_sent(cutoff, 100).unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_while_sending_parks_the_entry_and_the_rest_go_out() {
        // Input: one entry whose sending panics; the worker died with it
        // and, after a restart, the same entry came first again.
        let s = setup(&[1, 902, 3], true);
        *s.mailer.panic_on.lock().unwrap() = Some("<m902@example.test>".into());
        let report = s
            .outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((report.sent, report.failed), (2, 1));
        assert_eq!(state(&s, 902), OutboxState::Failed);
        let parked = s.outbox.store.outbox_entry(902).unwrap().unwrap();
        assert!(parked
            .last_error
            .unwrap()
            .contains("test-induced failure sending <m902@example.test>"));
        // A person retries it: it goes out.
        retry(&s.outbox.store, 902, s.clock.now()).unwrap();
        s.outbox
            .drain(false, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(state(&s, 902), OutboxState::Sent);
        assert_eq!(sends(&s), 3);
    }
}
