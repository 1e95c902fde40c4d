//! Ingest: raw messages → parse → thread → policy → one store
//! transaction per run of fetched messages. The transaction holds each
//! message, its indexes, its case, the outbox entries it causes and the
//! mailbox cursor, so a crash leaves either all of it or none; re-fetching
//! after a crash finds the messages stored (same Message-ID and content)
//! and ingests nothing twice.
//!
//! Anything that panics on the way is caught: the message goes to
//! quarantine with the error, and the messages after it carry on.

use std::panic::{catch_unwind, AssertUnwindSafe};

use chrono::{DateTime, Utc};

use crate::bounce;
use crate::case::{Case, CaseId, EventKind};
use crate::config::Config;
use crate::effects::{self, Effects, EffectsError};
use crate::handle::Handle;
use crate::message::{self, InboundMail};
use crate::policy::{self, Ctx, Role};
use crate::record::{Cursor, MessageRecord, OutboxState, QuarantineEntry};
use crate::store::{Fence, Sequence, StoreError, Tx};
use crate::suppress;
use crate::thread::{self, Decision, OwnId, Parties};

/// Where a message came from in the mailbox.
#[derive(Debug, Clone)]
pub struct Source {
    /// The queue whose mailbox it is in: a new case opened by it belongs
    /// to that queue.
    pub queue: String,
    pub folder: String,
    pub uid_validity: u32,
    pub uid: u32,
    /// From the support mailbox's Sent folder: an agent's own mail.
    pub sent: bool,
    /// Check and move the folder's UID cursor: false when a person
    /// re-runs a quarantined message (the cursor is long past it).
    pub cursor: bool,
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
    /// Our own mail's confirmation copy: its outbox entry is settled.
    Confirmed {
        outbox_id: u64,
    },
    /// A quarantined message the server would not give: the folder's
    /// cursor was rewound so the watcher fetches it again.
    Refetch {
        folder: String,
        uid: u32,
    },
    /// A delivery report (bounce): recorded on the case of the mail it
    /// reports on, or (None) a standard report about no mail escalator
    /// sent: counted and logged, not stored. It opens no case either way.
    /// (A free-text report that matches nothing is threaded as mail.)
    Bounce {
        case: Option<CaseId>,
    },
}

/// Takes messages in: the shared handle (store, config, clock, wake-up
/// handles), reached through `Deref` as `ingestor.store` and so on.
pub struct Ingestor {
    pub handle: Handle,
}

impl Ingestor {
    pub fn new(handle: Handle) -> Ingestor {
        Ingestor { handle }
    }
}

impl std::ops::Deref for Ingestor {
    type Target = Handle;
    fn deref(&self) -> &Handle {
        &self.handle
    }
}

/// One message for [`Ingestor::ingest_batch`]: its bytes, or the
/// server's refusal to give them.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    /// `truncated` is the real size when only the headers were fetched
    /// (over `max_message_size`).
    Bytes {
        raw: &'a [u8],
        truncated: Option<u64>,
    },
    /// The server will not FETCH it: quarantined with its words.
    Refused(&'a str),
}

impl Ingestor {
    /// Ingests one message (see [`Ingestor::ingest_batch`]).
    pub fn ingest(
        &self,
        src: Option<&Source>,
        raw: &[u8],
        truncated: Option<u64>,
    ) -> Result<Outcome, StoreError> {
        let item = Item::Bytes { raw, truncated };
        self.ensure_space(&[item])?;
        self.store
            .transact(|tx| self.ingest_one(tx, src, item, None))
    }

    /// Records a message the server will not give: a quarantine entry with
    /// the server's words and no bytes, and the cursor moves past it.
    pub fn quarantine_unfetched(
        &self,
        src: &Source,
        why: &str,
        fence: Option<&Fence>,
    ) -> Result<Outcome, StoreError> {
        self.store.transact(|tx| {
            if let Some(f) = fence {
                tx.fence(f.clone());
            }
            self.ingest_one(tx, Some(src), Item::Refused(why), None)
        })
    }

    /// Ingests messages of one folder, in UID order, in ONE transaction:
    /// each is threaded seeing the ones before it, the cursor moves over
    /// all of them, and one durable commit serves the whole fetch. A
    /// message whose processing fails is quarantined (what it wrote is
    /// undone) and the others go on; only a store failure fails the batch.
    pub fn ingest_batch(&self, items: &[(Source, Item<'_>)]) -> Result<Vec<Outcome>, StoreError> {
        self.ingest_batch_fenced(items, None)
    }

    /// As [`Ingestor::ingest_batch`], committed only while `fence`'s
    /// mailbox lease is held (a watcher on a shared store): a node that
    /// lost the mailbox writes nothing, not even its cursor.
    pub fn ingest_batch_fenced(
        &self,
        items: &[(Source, Item<'_>)],
        fence: Option<&Fence>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let all: Vec<Item<'_>> = items.iter().map(|(_, i)| *i).collect();
        self.ensure_space(&all)?;
        let parsed = ahead::parse_all(&all, self.store.is_shared());
        // Two nodes may store one message at once (delivered to two
        // queues' mailboxes): the loser's commit conflicts, and its new
        // run finds the message stored.
        let together = self.store.transact_retrying(|tx| {
            if let Some(f) = fence {
                tx.fence(f.clone());
            }
            ahead::read_ahead(tx, &parsed, &self.config.get(), self.clock.now())?;
            items
                .iter()
                .zip(&parsed)
                .map(|((src, item), mail)| self.ingest_one(tx, Some(src), *item, mail.as_ref()))
                .collect()
        });
        match together {
            Err(e) if e.may_belong_to_one_write() => {
                tracing::warn!(error = %crate::error_chain(&e), messages = items.len(), "the store refused a chunk of messages; trying them one by one");
                items
                    .iter()
                    .map(|(src, item)| self.ingest_alone(src, *item, fence))
                    .collect()
            }
            r => r,
        }
    }

    /// One message in a transaction of its own, after its chunk failed to
    /// commit: a message the store refuses (a value it cannot index, say)
    /// is quarantined with the store's words, and the mailbox goes on.
    fn ingest_alone(
        &self,
        src: &Source,
        item: Item<'_>,
        fence: Option<&Fence>,
    ) -> Result<Outcome, StoreError> {
        let fenced = |tx: &mut Tx<'_>| {
            if let Some(f) = fence {
                tx.fence(f.clone());
            }
        };
        let e = match self.store.transact(|tx| {
            fenced(tx);
            self.ingest_one(tx, Some(src), item, None)
        }) {
            Err(e) if e.may_belong_to_one_write() => e,
            r => return r,
        };
        let why = format!("the store refused this message: {}", crate::error_chain(&e));
        let raw = match item {
            Item::Bytes { raw, .. } => raw,
            Item::Refused(_) => &[][..],
        };
        let now = self.clock.now();
        let kept = self.store.transact(|tx| -> Result<Outcome, StoreError> {
            fenced(tx);
            let out = self.quarantine(tx, Some(src), raw, &why, now, false)?;
            self.advance_cursor(tx, Some(src))?;
            Ok(out)
        });
        match kept {
            Err(e) if e.may_belong_to_one_write() => {}
            r => return r,
        }
        // Not even its bytes can be kept: recorded without them, as a
        // message to fetch again from the server when a person retries.
        self.store.transact(|tx| {
            fenced(tx);
            let out = self.quarantine(tx, Some(src), &[], &why, now, true)?;
            self.advance_cursor(tx, Some(src))?;
            Ok(out)
        })
    }

    fn ensure_space(&self, items: &[Item<'_>]) -> Result<(), StoreError> {
        // A message takes about three times its size in the store (raw,
        // parsed text, log overhead).
        let need: u64 = items
            .iter()
            .map(|i| match i {
                Item::Bytes { raw, .. } => raw.len() as u64 * 3,
                Item::Refused(_) => 4096,
            })
            .sum();
        self.store
            .ensure_space(self.config.get().store.min_free, need)
    }

    /// `parsed`: the message already parsed (see [`ahead`]), if it was.
    fn ingest_one(
        &self,
        tx: &mut Tx<'_>,
        src: Option<&Source>,
        item: Item<'_>,
        parsed: Option<&InboundMail>,
    ) -> Result<Outcome, StoreError> {
        if self.already_done(tx, src)? {
            return Ok(Outcome::AlreadyDone);
        }
        let now = self.clock.now();
        match item {
            Item::Refused(why) => {
                let outcome = self.quarantine(tx, src, &[], why, now, true)?;
                self.advance_cursor(tx, src)?;
                Ok(outcome)
            }
            Item::Bytes { raw, truncated } => self.guarded(tx, src, raw, now, &mut |tx| {
                self.plan(tx, src, raw, truncated, parsed, now)
            }),
        }
    }

    /// Runs `plan` for one message as a unit that cannot stop the
    /// mailbox: anything but a store failure (an error, a panic)
    /// quarantines the message, what the failed plan wrote is undone, and
    /// the rest of the transaction goes on.
    fn guarded(
        &self,
        tx: &mut Tx<'_>,
        src: Option<&Source>,
        raw: &[u8],
        now: DateTime<Utc>,
        plan: &mut dyn FnMut(&mut Tx<'_>) -> Result<Outcome, EffectsError>,
    ) -> Result<Outcome, StoreError> {
        let before = tx.savepoint();
        let why = match catch_unwind(AssertUnwindSafe(|| plan(tx))) {
            Ok(Ok(outcome)) => {
                self.advance_cursor(tx, src)?;
                return Ok(outcome);
            }
            Ok(Err(EffectsError::Store(e))) => return Err(e),
            Ok(Err(e)) => format!("error while processing: {}", crate::error_chain(&e)),
            Err(panic) => panic_text(&panic),
        };
        tx.rollback(before);
        let outcome = self.quarantine(tx, src, raw, &why, now, false)?;
        self.advance_cursor(tx, src)?;
        Ok(outcome)
    }

    /// Is the folder's cursor already past this message?
    fn already_done(&self, tx: &mut Tx<'_>, src: Option<&Source>) -> Result<bool, StoreError> {
        let Some(s) = src.filter(|s| s.cursor) else {
            return Ok(false);
        };
        Ok(tx
            .cursor(&s.queue, &s.folder)?
            .is_some_and(|c| c.uid_validity == s.uid_validity && s.uid <= c.last_uid))
    }

    /// Moves the folder's cursor over this message, in its transaction.
    fn advance_cursor(&self, tx: &mut Tx<'_>, src: Option<&Source>) -> Result<(), StoreError> {
        let Some(s) = src.filter(|s| s.cursor) else {
            return Ok(());
        };
        let last = match tx.cursor(&s.queue, &s.folder)? {
            Some(c) if c.uid_validity == s.uid_validity => c.last_uid.max(s.uid),
            _ => s.uid,
        };
        tx.set_cursor(
            &s.queue,
            &s.folder,
            &Cursor {
                uid_validity: s.uid_validity,
                last_uid: last,
            },
        )
    }

    fn quarantine(
        &self,
        tx: &mut Tx<'_>,
        src: Option<&Source>,
        raw: &[u8],
        error: &str,
        now: DateTime<Utc>,
        unfetched: bool,
    ) -> Result<Outcome, StoreError> {
        let id = tx.next_id(Sequence::Quarantine)?;
        tracing::error!(quarantine_id = id, error, "message quarantined");
        let entry = QuarantineEntry {
            id,
            queue: src
                .map(|s| s.queue.clone())
                .unwrap_or_else(|| crate::case::DEFAULT_QUEUE.into()),
            folder: src.map(|s| s.folder.clone()).unwrap_or_default(),
            uid_validity: src.map(|s| s.uid_validity).unwrap_or(0),
            uid: src.map(|s| s.uid).unwrap_or(0),
            error: error.to_string(),
            at: now,
            attempts: 1,
            sent: src.is_some_and(|s| s.sent),
            unfetched,
        };
        tx.put_quarantine(&entry, raw)?;
        Ok(Outcome::Quarantined { id })
    }

    /// Threads one message and writes what it means (case, message,
    /// mails) into `tx`.
    // Long: the order of one message's effects inside its transaction (own copy, bounce, thread, role, policy, record, indexes, effects) is the point; each step is a call.
    fn plan(
        &self,
        tx: &mut Tx<'_>,
        src: Option<&Source>,
        raw: &[u8],
        truncated: Option<u64>,
        parsed: Option<&InboundMail>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, EffectsError> {
        let snapshot = self.config.get();
        let config = &*snapshot;
        let parsed_here;
        let mail = match parsed {
            Some(m) => m,
            None => {
                parsed_here = message::parse(raw);
                &parsed_here
            }
        };
        if let Some(id) = self.own_copy(tx, mail)? {
            return Ok(Outcome::Confirmed { outbox_id: id });
        }
        // An agent's mail in the Sent folder is never a report about ours.
        let report = bounce::read(raw, mail).filter(|_| !src.is_some_and(|s| s.sent));
        if let Some(report) = report {
            let inbound = bounces::Inbound {
                src,
                raw,
                truncated,
                mail,
            };
            if let Some(out) = self.bounce(tx, &inbound, &report, now)? {
                return Ok(out);
            }
        }
        let support = config.support_addresses();
        let is_staff = |a: &str| config.tiers.iter().any(|t| t.is_staff(a));
        let key = *tx.key();
        let parties = Parties {
            support: &support,
            is_staff: &is_staff,
        };
        let from_sent = src.is_some_and(|s| s.sent);
        let sender = mail
            .from
            .as_ref()
            .map(|a| a.email.clone())
            .unwrap_or_default();
        let ctx = Ctx { config, now };
        let Some((mut case, new, via)) = self.thread(tx, mail, src, &parties, &sender, &ctx)?
        else {
            tracing::debug!(message_id = %mail.message_id, "already stored");
            return Ok(Outcome::Duplicate);
        };
        let span = tracing::info_span!("case", case_id = case.id);
        let _e = span.enter();
        let seq = tx.next_id(Sequence::Message)?;
        let suppressed = suppress::classify(mail, &support);
        let role = role(&case, mail, &sender, from_sent, &key, config);
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
        case.new_messages.push(seq);
        if (new && !from_sent) || role == Role::Customer {
            self.choose_language(tx, &mut case, mail, config)?;
        }
        let actions = if new && from_sent {
            policy::on_message(&mut case, mail, Role::SupportAgent, None, &ctx)
        } else if new {
            let recent = self.recent_cases(tx, &case, now)?;
            policy::on_new_case(&mut case, mail, suppressed.as_ref(), recent, &ctx)
        } else {
            policy::on_message(&mut case, mail, role, suppressed.as_ref(), &ctx)
        };

        let record = message_record(seq, case.id, mail, src, truncated, suppressed.as_ref(), now);
        if record.several_from {
            tracing::warn!(
                message_id = %mail.message_id,
                from_fields = mail.from_fields,
                "message has several From fields; the first counts"
            );
        }
        // Stored first: a forward queued now reads it with the others.
        tx.put_message(&record, raw)?;
        // Our own IDs name their case already; the others are indexed so
        // an original that arrives after this reply finds its case.
        tx.index_references(
            mail.in_reply_to
                .iter()
                .chain(&mail.references)
                .filter(|id| OwnId::verify(id, &key).is_none()),
            case.id,
        );
        if new && !case.customer.is_empty() {
            tx.add_customer_case(&case.customer, case.id);
        }
        let mut fx = Effects::new(config, now);
        let queued = effects::step(tx, &mut fx, &mut case, actions)?;
        tracing::info!(new, via, message_id = %mail.message_id, queued, "message stored");
        Ok(Outcome::Stored {
            case: case.id,
            new,
            queued,
        })
    }

    /// The language the customer's mail will be in, chosen from what is
    /// known of them and this message, remembered on the case with where
    /// it came from. A case keeps a language its customer's mail chose
    /// (unless one is set for the customer); one that only fell back to
    /// the queue's or the default ("see attached" says nothing) is
    /// chosen again from each message until one does.
    fn choose_language(
        &self,
        tx: &mut Tx<'_>,
        case: &mut Case,
        mail: &InboundMail,
        config: &Config,
    ) -> Result<(), StoreError> {
        let set = if case.customer.is_empty() {
            None
        } else {
            tx.customer_language(&case.customer)?
        };
        use crate::language::Source;
        let fell_back = case
            .language_source
            .as_deref()
            .is_some_and(|s| s == Source::Queue.as_str() || s == Source::Default.as_str());
        let clues = crate::language::Clues {
            customer: set.as_deref(),
            case: case.language.as_deref().filter(|_| !fell_back),
            address: &case.customer,
            mail: Some(mail),
            queue: &case.queue,
        };
        let choice = crate::language::choose(config, &clues);
        if choice.source != Source::Case {
            case.language = Some(choice.language);
            case.language_source = Some(choice.source.as_str().to_string());
        }
        Ok(())
    }

    /// The case a message belongs to, whether it is new, and how it was
    /// found (`None`: a message already stored). A customer's mail long
    /// after resolution opens a follow-on case linked to the old one.
    fn thread(
        &self,
        tx: &mut Tx<'_>,
        mail: &InboundMail,
        src: Option<&Source>,
        parties: &Parties<'_>,
        sender: &str,
        ctx: &Ctx<'_>,
    ) -> Result<Option<(Case, bool, &'static str)>, EffectsError> {
        let (config, now) = (ctx.config, ctx.now);
        let from_sent = src.is_some_and(|s| s.sent);
        let key = *tx.key();
        let decision = thread::decide(mail, &*tx, parties, &config.cases.subject_tag, &key)?;
        let mut previous = None;
        let joined = match decision {
            Decision::Duplicate => return Ok(None),
            Decision::Join { case, via } => match tx.case(case)? {
                // Long after resolution, the customer's new mail is a new
                // matter: a new case that links to the old one.
                Some(c)
                    if c.is_participant(sender) && policy::starts_follow_on_case(&c, mail, ctx) =>
                {
                    previous = Some(c.id);
                    None
                }
                Some(c) => Some((c, via.as_str())),
                None => None,
            },
            Decision::New => None,
        };
        Ok(Some(match joined {
            Some((c, via)) => (c, false, via),
            None => {
                let id = tx.next_id(Sequence::Case)?;
                // The queue whose mailbox it reached (the main queue for
                // mail with no mailbox: tests, the fuzzer).
                let queue = src
                    .map(|s| s.queue.as_str())
                    .unwrap_or_else(|| config.queues.main().name.as_str());
                let mut c = policy::open_case(id, mail, config, queue, now);
                c.previous_case = previous;
                if from_sent {
                    // An agent wrote first from the shared mailbox: the
                    // case belongs to the recipient, already answered.
                    c.customer = mail.to.first().map(|a| a.email.clone()).unwrap_or_default();
                    c.customer_name = mail.to.first().and_then(|a| a.name.clone());
                }
                (c, true, "new")
            }
        }))
    }

    /// Is this the confirmation copy of a mail we sent? If so, settles
    /// its outbox entry (it reached the server) and returns the entry.
    fn own_copy(&self, tx: &mut Tx<'_>, mail: &InboundMail) -> Result<Option<u64>, StoreError> {
        let snapshot = self.config.get();
        let config = &*snapshot;
        let ours = mail
            .from
            .as_ref()
            .is_some_and(|a| config.is_queue_address(&a.email))
            && mail.robot.loop_header.as_deref() == Some(config.cases.instance.as_str());
        if !ours {
            return Ok(None);
        }
        let Some(own) = OwnId::verify(&mail.message_id, tx.key()) else {
            return Ok(None);
        };
        let Some(mut entry) = tx.outbox_entry(own.seq)? else {
            return Ok(None);
        };
        if entry.message_id != mail.message_id {
            return Ok(None);
        }
        if matches!(entry.state, OutboxState::Sending | OutboxState::Pending) {
            tracing::info!(
                outbox_id = entry.id,
                "confirmation copy: the server had accepted this mail"
            );
            crate::outbox::journal::mark_sent(tx, &mut entry, self.clock.now())?;
        }
        Ok(Some(entry.id))
    }

    /// The customer's cases within the repeat-customer window, this one
    /// included.
    fn recent_cases(
        &self,
        tx: &mut Tx<'_>,
        case: &Case,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let config = self.config.get();
        let Some(r) = &config.repeat_customer else {
            return Ok(1);
        };
        if case.customer.is_empty() {
            return Ok(1);
        }
        let since = now - chrono::Duration::from_std(r.within).unwrap_or(chrono::Duration::MAX);
        let mut n = 1;
        for id in tx.customer_cases(&case.customer)? {
            if let Some(c) = tx.case(id)? {
                if c.created_at >= since && c.id != case.id {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Re-runs a quarantined message; on success its entry is removed.
    pub fn retry_quarantined(&self, id: u64) -> Result<Option<Outcome>, StoreError> {
        let Some(raw) = self.store.quarantine_raw(id)? else {
            return Ok(None);
        };
        let Some(entry) = self.store.quarantine_entry(id)? else {
            return Ok(None);
        };
        if entry.unfetched {
            return self.refetch(&entry).map(Some);
        }
        // Where it came from decides how it is read: a message from the
        // Sent folder is an agent's, not a customer's (entries from before
        // `sent` was kept are recognised by their folder).
        let config = self.config.get();
        let sent_folder = config.queue(&entry.queue).mailbox.sent_folder.clone();
        let src = Source {
            queue: entry.queue.clone(),
            sent: entry.sent || sent_folder.as_deref() == Some(entry.folder.as_str()),
            folder: entry.folder,
            uid_validity: entry.uid_validity,
            uid: entry.uid,
            cursor: false,
        };
        // A message that fails again gets a fresh entry; the old one goes.
        let outcome = self.ingest(Some(&src), &raw, None)?;
        self.store.transact(|tx| {
            tx.remove_quarantine(id);
            Ok::<_, StoreError>(())
        })?;
        self.store.flush()?;
        Ok(Some(outcome))
    }
}

impl Ingestor {
    /// Retry of a message the server would not give: rewind its folder's
    /// cursor to just before it, so the watcher fetches it again (what it
    /// already stored after it is recognised and not stored twice).
    fn refetch(&self, entry: &QuarantineEntry) -> Result<Outcome, StoreError> {
        self.store.transact(|tx| {
            if let Some(c) = tx.cursor(&entry.queue, &entry.folder)? {
                if c.uid_validity == entry.uid_validity && c.last_uid >= entry.uid {
                    tx.set_cursor(
                        &entry.queue,
                        &entry.folder,
                        &Cursor {
                            uid_validity: c.uid_validity,
                            last_uid: entry.uid.saturating_sub(1),
                        },
                    )?;
                }
            }
            tx.remove_quarantine(entry.id);
            Ok::<_, StoreError>(())
        })?;
        self.store.flush()?;
        self.wake.both();
        Ok(Outcome::Refetch {
            folder: entry.folder.clone(),
            uid: entry.uid,
        })
    }
}

/// Who wrote the message, for the policy. Staff is verified only by a
/// reference to a staff-facing mail of this very case (its ID carries a
/// keyed hash customers never see), plus DKIM when the config asks.
fn role(
    case: &Case,
    mail: &InboundMail,
    sender: &str,
    from_sent: bool,
    key: &[u8; 32],
    config: &Config,
) -> Role {
    if from_sent {
        return Role::SupportAgent;
    }
    if sender.is_empty() {
        return Role::Other;
    }
    if sender == case.customer {
        return Role::Customer;
    }
    if case.participants.iter().any(|p| p == sender) {
        return Role::Participant;
    }
    let support = config.support_addresses().iter().any(|s| s == sender);
    let staff = config.tiers.iter().any(|t| t.is_staff(sender));
    // The support address in the inbox without our loop header: an
    // agent's answer (Bcc to support, or Gmail's one copy in both
    // INBOX and Sent); with our loop header it is our own mail.
    if staff || (support && mail.robot.loop_header.is_none()) {
        let dkim = dkim_ok(mail, sender, config);
        let answers_us = mail
            .in_reply_to
            .iter()
            .chain(mail.references.iter())
            .filter_map(|id| OwnId::verify(id, key))
            .any(|own| own.case == case.id && own.kind.staff_facing());
        if staff && answers_us && dkim {
            return Role::Staff;
        }
        return Role::UnverifiedStaff { stops_clock: dkim };
    }
    Role::Other
}

/// Staff mail passes DKIM as the config asks: a pass for the sender's
/// domain recorded by our receiving server (see [`crate::authres`]).
fn dkim_ok(mail: &InboundMail, sender: &str, config: &Config) -> bool {
    if !config.cases.require_dkim_pass {
        return true;
    }
    let domain = sender.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    let authserv_id = config.cases.authserv_id.as_deref().unwrap_or("");
    crate::authres::dkim_pass(&mail.headers, authserv_id, domain)
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    format!("panic while processing: {}", crate::panic_text(p))
}

#[path = "ingest/ahead.rs"]
mod ahead;
#[path = "ingest/bounces.rs"]
mod bounces;

#[cfg(test)]
#[path = "ingest/hostile.rs"]
pub(crate) mod hostile;

#[cfg(test)]
#[path = "ingest/bounce_tests.rs"]
mod bounce_tests;

#[cfg(test)]
#[path = "ingest/ahead_tests.rs"]
mod ahead_tests;

/// What is kept of a stored message besides its bytes.
fn message_record(
    seq: u64,
    case: CaseId,
    mail: &InboundMail,
    src: Option<&Source>,
    truncated: Option<u64>,
    suppressed: Option<&suppress::Suppress>,
    now: DateTime<Utc>,
) -> MessageRecord {
    MessageRecord {
        seq,
        case,
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
        attachments: mail.attachments.clone(),
        size: truncated.map(|s| s as usize).unwrap_or(mail.size),
        suppressed: suppressed.map(|s| s.to_string()),
        truncated: truncated.is_some(),
        parse_error: mail.parse_error.clone(),
        several_from: mail.from_fields > 1,
    }
}

#[cfg(test)]
#[path = "ingest/tests.rs"]
pub(crate) mod tests;
