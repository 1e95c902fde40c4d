//! Ingest: one raw message → parse → thread → policy → one store
//! transaction. The transaction holds the message, its indexes, its case,
//! the outbox entries it causes and the mailbox cursor, so a crash leaves
//! either all of it or none; re-fetching after a crash finds the message
//! stored (same Message-ID and content) and ingests nothing twice.
//!
//! Anything that panics on the way is caught: the message goes to
//! quarantine with the error, and the messages after it carry on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::case::{Case, CaseId, EventKind};
use crate::clock::Clock;
use crate::config::Config;
use crate::message::{self, InboundMail};
use crate::outbox::compose::{self, Envelope};
use crate::outbox::{OutboxEntry, OutboxState};
use crate::policy::{self, Outgoing};
use crate::store::{
    id_key, Batch, Cursor, MessageRecord, QuarantineEntry, Store, StoreError, Tree,
};
use crate::suppress;
use crate::thread::{self, Decision, MailKind, OwnId, Parties};

/// Where a message came from in the mailbox.
#[derive(Debug, Clone)]
pub struct Source {
    pub folder: String,
    pub uid_validity: u32,
    pub uid: u32,
}

/// What ingesting one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The cursor was already past this UID.
    AlreadyDone,
    /// The same message is stored already.
    Duplicate,
    Stored {
        case: CaseId,
        new: bool,
        queued: usize,
    },
    Quarantined {
        id: u64,
    },
}

pub struct Ingestor {
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
}

/// The planned writes for one message.
struct Plan {
    batch: Batch,
    outcome: Outcome,
}

impl Ingestor {
    /// Ingests one message. `truncated` is the real size when only the
    /// headers were fetched (over `max_message_size`).
    pub fn ingest(
        &self,
        src: Option<&Source>,
        raw: &[u8],
        truncated: Option<u64>,
    ) -> Result<Outcome, StoreError> {
        let _w = self.store.lock();
        let cursor = match src {
            Some(s) => {
                let c = self.store.cursor(&s.folder)?;
                if let Some(c) = c {
                    if c.uid_validity == s.uid_validity && s.uid <= c.last_uid {
                        return Ok(Outcome::AlreadyDone);
                    }
                }
                Some(c)
            }
            None => None,
        };
        let now = self.clock.now();
        let planned = catch_unwind(AssertUnwindSafe(|| self.plan(src, raw, truncated, now)));
        let mut plan = match planned {
            Ok(r) => r?,
            Err(panic) => self.quarantine_plan(src, raw, &panic_text(&panic), now)?,
        };
        if let (Some(s), Some(c)) = (src, cursor) {
            let last = match c {
                Some(c) if c.uid_validity == s.uid_validity => c.last_uid.max(s.uid),
                _ => s.uid,
            };
            plan.batch.put_json(
                Tree::Cursors,
                s.folder.as_bytes().to_vec(),
                &Cursor {
                    uid_validity: s.uid_validity,
                    last_uid: last,
                },
            )?;
        }
        self.store.apply(&plan.batch)?;
        Ok(plan.outcome)
    }

    fn quarantine_plan(
        &self,
        src: Option<&Source>,
        raw: &[u8],
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<Plan, StoreError> {
        let id = self.store.counter("next_quarantine")?;
        tracing::error!(quarantine_id = id, error, "message quarantined");
        let mut batch = Batch::default();
        batch.put(
            Tree::Meta,
            "next_quarantine",
            (id + 1).to_be_bytes().to_vec(),
        );
        let entry = QuarantineEntry {
            id,
            folder: src.map(|s| s.folder.clone()).unwrap_or_default(),
            uid_validity: src.map(|s| s.uid_validity).unwrap_or(0),
            uid: src.map(|s| s.uid).unwrap_or(0),
            error: error.to_string(),
            at: now,
            attempts: 1,
        };
        batch.put_json(Tree::Quarantine, id_key(id), &entry)?;
        batch.put(
            Tree::Quarantine,
            Store::quarantine_raw_key(id),
            raw.to_vec(),
        );
        Ok(Plan {
            batch,
            outcome: Outcome::Quarantined { id },
        })
    }

    fn plan(
        &self,
        src: Option<&Source>,
        raw: &[u8],
        truncated: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<Plan, StoreError> {
        let store = &*self.store;
        let config = &*self.config;
        #[cfg(test)]
        tests::maybe_panic();
        let mail = message::parse(raw);
        let support = config.support_addresses();
        let key = store.key();
        let decision = thread::decide(
            &mail,
            store,
            &Parties { support: &support },
            &config.cases.subject_tag,
            key,
        );
        let mut batch = Batch::default();
        let (mut case, new, via) = match decision {
            Decision::Duplicate => {
                tracing::debug!(message_id = %mail.message_id, "already stored");
                return Ok(Plan {
                    batch,
                    outcome: Outcome::Duplicate,
                });
            }
            Decision::Join { case, via } => match store.case(case)? {
                Some(c) => (c, false, via.as_str()),
                None => {
                    return Err(StoreError::Sled(sled::Error::ReportableBug(format!(
                        "case {case} vanished"
                    ))))
                }
            },
            Decision::New => {
                let id = store.counter("next_case")?;
                batch.put(Tree::Meta, "next_case", (id + 1).to_be_bytes().to_vec());
                (policy::open_case(id, &mail, config, now), true, "new")
            }
        };
        let span = tracing::info_span!("case", case_id = case.id);
        let _e = span.enter();
        let old_due = if new { None } else { case.due_at };
        let seq = store.counter("next_message")?;
        batch.put(Tree::Meta, "next_message", (seq + 1).to_be_bytes().to_vec());
        let suppressed = suppress::classify(&mail, &support);
        let sender = mail
            .from
            .as_ref()
            .map(|a| a.email.clone())
            .unwrap_or_default();
        if !new {
            case.push(
                now,
                EventKind::Message {
                    message_id: mail.message_id.clone(),
                    from: sender.clone(),
                    via: via.to_string(),
                    automatic: suppressed
                        .as_ref()
                        .filter(|s| s.is_automatic())
                        .map(|s| s.to_string()),
                },
            );
        }
        case.messages.push(seq);
        let outgoing = policy::on_message(&mut case, &mail, new, suppressed.as_ref(), config, now);
        let mut queued = 0;
        let mut next_outbox = store.counter("next_outbox")?;
        for out in outgoing {
            match out {
                Outgoing::Ack { eta } => {
                    let to = case.customer.clone();
                    let limit_from = now
                        - chrono::Duration::from_std(config.cases.auto_reply_window)
                            .unwrap_or(chrono::Duration::hours(1));
                    if store.auto_replies_since(&to, limit_from)?
                        >= config.cases.auto_reply_limit as usize
                    {
                        case.push(
                            now,
                            EventKind::AckSuppressed {
                                reason: format!(
                                    "more than {} automatic mails to {to} within {}",
                                    config.cases.auto_reply_limit,
                                    humantime::format_duration(config.cases.auto_reply_window)
                                ),
                            },
                        );
                        continue;
                    }
                    let id = next_outbox;
                    next_outbox += 1;
                    self.queue_ack(&mut batch, &mut case, &mail, id, eta, now)?;
                    batch.put(
                        Tree::AutoReplies,
                        Store::auto_reply_key(&to, now, id),
                        Vec::new(),
                    );
                    queued += 1;
                }
            }
        }
        batch.put(
            Tree::Meta,
            "next_outbox",
            next_outbox.to_be_bytes().to_vec(),
        );

        let (stored_raw, text_note) = match truncated {
            Some(size) => (raw.to_vec(), Some(size)),
            None => (raw.to_vec(), None),
        };
        let record = MessageRecord {
            seq,
            case: case.id,
            message_id: mail.message_id.clone(),
            content_hash: mail.content_hash.clone(),
            from: mail.from.clone(),
            to: mail.to.clone(),
            cc: mail.cc.clone(),
            subject: mail.subject.clone(),
            date: mail.date,
            received_at: now,
            folder: src.map(|s| s.folder.clone()).unwrap_or_default(),
            uid: src.map(|s| s.uid).unwrap_or(0),
            text: match text_note {
                Some(size) => format!("[This message is {size} bytes, over mailbox.max_message_size: only its headers were stored. Read it in the support mailbox.]"),
                None => mail.text.clone(),
            },
            attachments: mail.attachments.clone(),
            size: truncated.map(|s| s as usize).unwrap_or(mail.size),
            suppressed: suppressed.as_ref().map(|s| s.to_string()),
            truncated: truncated.is_some(),
            parse_error: mail.parse_error.clone(),
        };
        batch.put_json(Tree::Messages, id_key(seq), &record)?;
        batch.put(Tree::Raw, id_key(seq), stored_raw);
        batch.put(
            Tree::MessageIds,
            Store::message_id_key(&mail.message_id, &mail.content_hash),
            index_value(case.id, seq),
        );
        if new && !case.customer.is_empty() {
            batch.put(
                Tree::Customers,
                Store::customer_key(&case.customer, case.id),
                Vec::new(),
            );
        }
        if old_due != case.due_at {
            if let Some(d) = old_due {
                batch.remove(Tree::Deadlines, Store::deadline_key(d, case.id));
            }
            if let Some(d) = case.due_at {
                batch.put(Tree::Deadlines, Store::deadline_key(d, case.id), Vec::new());
            }
        }
        batch.put_json(Tree::Cases, id_key(case.id), &case)?;
        tracing::info!(new, via, message_id = %mail.message_id, queued, "message stored");
        Ok(Plan {
            batch,
            outcome: Outcome::Stored {
                case: case.id,
                new,
                queued,
            },
        })
    }

    fn queue_ack(
        &self,
        batch: &mut Batch,
        case: &mut Case,
        mail: &InboundMail,
        id: u64,
        eta: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let config = &*self.config;
        let message_id = OwnId {
            case: case.id,
            kind: MailKind::Ack,
            seq: id,
        }
        .format(self.store.key(), config.support_domain());
        let (subject, body) = policy::ack_text(case, eta, config, now);
        let mut references = mail.references.clone();
        references.push(mail.message_id.clone());
        let raw = compose::compose(
            &Envelope {
                from_name: config.smtp.from_name.as_deref(),
                from: &config.smtp.from,
                to_name: case.customer_name.as_deref(),
                to: &case.customer,
                subject: &subject,
                message_id: &message_id,
                in_reply_to: Some(&mail.message_id),
                references,
                auto_submitted: "auto-replied",
                instance: &config.cases.instance,
                case_id: case.id,
                date: now,
            },
            &body,
        )
        .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        let entry = OutboxEntry {
            id,
            case: case.id,
            kind: MailKind::Ack.as_str().into(),
            message_id: message_id.clone(),
            from: config.smtp.from.clone(),
            to: vec![case.customer.clone()],
            subject,
            state: OutboxState::Pending,
            attempts: 0,
            created_at: now,
            next_attempt_at: now,
            sent_at: None,
            last_error: None,
        };
        entry.write(batch, raw)?;
        batch.put(
            Tree::MessageIds,
            Store::message_id_key(&message_id, "out"),
            index_value(case.id, id),
        );
        case.push(
            now,
            EventKind::AckQueued {
                outbox_id: id,
                to: case.customer.clone(),
                eta,
            },
        );
        Ok(())
    }

    /// Re-runs a quarantined message; on success its entry is removed.
    pub fn retry_quarantined(&self, id: u64) -> Result<Option<Outcome>, StoreError> {
        let Some(raw) = self.store.quarantine_raw(id)? else {
            return Ok(None);
        };
        // A message that fails again gets a fresh entry; the old one goes.
        let outcome = self.ingest(None, &raw, None)?;
        {
            let _w = self.store.lock();
            let mut b = Batch::default();
            b.remove(Tree::Quarantine, id_key(id));
            b.remove(Tree::Quarantine, Store::quarantine_raw_key(id));
            self.store.apply(&b)?;
        }
        self.store.flush()?;
        Ok(Some(outcome))
    }
}

fn index_value(case: CaseId, seq: u64) -> Vec<u8> {
    let mut v = id_key(case).to_vec();
    v.extend_from_slice(&id_key(seq));
    v
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .map(|s| format!("panic while processing: {s}"))
        .unwrap_or_else(|| "panic while processing".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::cell::Cell;
    use std::path::Path;

    thread_local! {
        static PANIC: Cell<bool> = const { Cell::new(false) };
    }

    /// Lets a test make the next message's processing panic.
    pub(super) fn maybe_panic() {
        if PANIC.with(|p| p.replace(false)) {
            panic!("test-induced failure");
        }
    }

    fn setup(dir: &Path) -> (Ingestor, Arc<ManualClock>) {
        let text = format!(
            r#"
[mailbox]
host = "127.0.0.1"
security = "plain"
username = "s"
password = "p"
[smtp]
host = "127.0.0.1"
security = "plain"
from = "Support <support@example.test>"
[store]
path = "{}"
[cases]
auto_reply_limit = 2
auto_reply_window = "1h"
[[tiers]]
name = "Frontline"
first_response = "4h"
"#,
            dir.join("store").display()
        );
        let config = Config::parse(&text, Path::new("/x.toml"), &|_| None).unwrap();
        let clock = Arc::new(ManualClock::new(
            DateTime::parse_from_rfc3339("2026-11-23T09:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
        ));
        let store = Arc::new(Store::open(&config.store.path).unwrap());
        (
            Ingestor {
                store,
                config: Arc::new(config),
                clock: clock.clone(),
            },
            clock,
        )
    }

    fn mail(n: u32) -> Vec<u8> {
        format!("From: alice@example.org\r\nSubject: topic {n}\r\nMessage-ID: <m{n}@x>\r\n\r\nbody {n}\r\n")
            .into_bytes()
    }

    fn src(validity: u32, uid: u32) -> Source {
        Source {
            folder: "INBOX".into(),
            uid_validity: validity,
            uid,
        }
    }

    #[test]
    fn automatic_mails_per_recipient_are_limited() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, clock) = setup(dir.path());
        let mut queued = 0;
        for n in 1..=4 {
            if let Outcome::Stored {
                queued: q,
                new: true,
                ..
            } = ing.ingest(Some(&src(1, n)), &mail(n), None).unwrap()
            {
                queued += q;
            }
        }
        assert_eq!(queued, 2, "two acks within the hour, then silence");
        let case4 = ing.store.case(4).unwrap().unwrap();
        assert!(case4.history.iter().any(|e| matches!(&e.what, EventKind::AckSuppressed { reason } if reason.contains("automatic mails"))));
        clock.advance(chrono::Duration::minutes(61));
        match ing.ingest(Some(&src(1, 5)), &mail(5), None).unwrap() {
            Outcome::Stored { queued, .. } => assert_eq!(queued, 1, "the window moved on"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_panic_quarantines_the_message_and_the_next_one_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, _) = setup(dir.path());
        PANIC.with(|p| p.set(true));
        let out = ing.ingest(Some(&src(1, 1)), &mail(1), None).unwrap();
        let Outcome::Quarantined { id } = out else {
            panic!("{out:?}")
        };
        assert!(matches!(
            ing.ingest(Some(&src(1, 2)), &mail(2), None).unwrap(),
            Outcome::Stored { .. }
        ));
        assert_eq!(ing.store.cursor("INBOX").unwrap().unwrap().last_uid, 2);
        let q: Vec<_> = ing.store.quarantined().collect::<Result<_, _>>().unwrap();
        assert_eq!(q.len(), 1);
        assert!(
            q[0].error.contains("test-induced failure"),
            "{}",
            q[0].error
        );
        // Retry processes it for real and empties the quarantine.
        assert!(matches!(
            ing.retry_quarantined(id).unwrap(),
            Some(Outcome::Stored { new: true, .. })
        ));
        assert_eq!(ing.store.quarantined().count(), 0);
        assert_eq!(ing.store.cases().count(), 2);
    }

    #[test]
    fn refetching_after_uidvalidity_change_stores_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, _) = setup(dir.path());
        for n in 1..=3 {
            ing.ingest(Some(&src(7, n)), &mail(n), None).unwrap();
        }
        // Same UID again under the same validity: skipped by the cursor.
        assert_eq!(
            ing.ingest(Some(&src(7, 2)), &mail(2), None).unwrap(),
            Outcome::AlreadyDone
        );
        // New validity, new UIDs, same messages: duplicates by content.
        for n in 1..=3 {
            assert_eq!(
                ing.ingest(Some(&src(8, n + 10)), &mail(n), None).unwrap(),
                Outcome::Duplicate
            );
        }
        assert_eq!(
            ing.store.cursor("INBOX").unwrap().unwrap(),
            Cursor {
                uid_validity: 8,
                last_uid: 13
            }
        );
        // A different message that reuses a Message-ID is kept.
        let other = String::from_utf8(mail(1))
            .unwrap()
            .replace("body 1", "other body");
        assert!(matches!(
            ing.ingest(Some(&src(8, 14)), other.as_bytes(), None)
                .unwrap(),
            Outcome::Stored { .. }
        ));
        assert_eq!(ing.store.counts().1, 4);
    }

    #[test]
    fn unreadable_sender_gets_an_unassigned_case_without_ack() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, _) = setup(dir.path());
        for (n, raw) in [
            &b""[..],
            b"Subject: no sender\r\n\r\nhi\r\n",
            b"\x00\xff garbage",
        ]
        .iter()
        .enumerate()
        {
            let out = ing.ingest(Some(&src(1, n as u32 + 1)), raw, None).unwrap();
            assert!(
                matches!(
                    out,
                    Outcome::Stored {
                        new: true,
                        queued: 0,
                        ..
                    }
                ),
                "{out:?}"
            );
        }
        for c in ing.store.cases() {
            assert_eq!(c.unwrap().customer, "");
        }
    }
}
