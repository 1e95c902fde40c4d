//! Ingest of delivery reports ([`crate::bounce`]): a report never opens
//! a case. One that quotes the Message-ID of a mail escalator sent, and
//! names one of that mail's recipients, is recorded on the mail's case
//! (the report stored among its messages, a `bounced` or
//! `delivery_delayed` event per recipient, the outbox entry marked
//! `bounced`). A standard report (`multipart/report`) that matches
//! nothing escalator sent (backscatter from spam forged with the support
//! address, bounces of an agent's own mail) is counted and logged, and
//! left in the mailbox: a flood of those must not fill the store or the
//! quarantine. A free-text one that matches nothing is not dropped: it may
//! be a person's mail (a helpdesk at `postmaster@`, a vacation notice), so
//! it goes the ordinary way, stored and threaded, and gets no automatic
//! answer (see `suppress`).
//!
//! A report is a claim anyone can forge. It can only touch a mail whose
//! Message-ID it quotes, and our IDs carry a keyed hash: only the mail's
//! recipients (or whoever they showed it) know one. The recipient it
//! names must be that mail's recipient too. Nothing in a report is
//! threaded, obeyed or given a role: it is never a customer's message or
//! a staff answer.

use chrono::{DateTime, Utc};

use super::{Ingestor, Outcome, Source};
use crate::bounce::{Action, Form, Recipient, Report};
use crate::case::EventKind;
use crate::effects::{self, Effects, EffectsError};
use crate::message::InboundMail;
use crate::record::{OutboxEntry, OutboxState};
use crate::store::{Sequence, StoreError, Tx};
use crate::thread::{MailKind, OwnId};

/// Why a report matched nothing, for the log.
const NO_MATCH: &str = "delivery report about no mail escalator sent";

/// A report matched to one of our mails.
struct Matched {
    entry: OutboxEntry,
    /// What the mail was, as its Message-ID says.
    kind: MailKind,
    /// The report's recipients that are recipients of the entry, at
    /// least one.
    recipients: Vec<Recipient>,
}

/// The message being ingested, for [`Ingestor::bounce`].
pub(super) struct Inbound<'a> {
    pub src: Option<&'a Source>,
    pub raw: &'a [u8],
    pub truncated: Option<u64>,
    pub mail: &'a InboundMail,
}

impl Ingestor {
    /// Takes a delivery report in place of threading (see the module's
    /// comment). None for a free-text ([`Form::Heuristic`]) report that
    /// matches no mail of ours: it may be a person's mail (a helpdesk
    /// writing from `postmaster@`, a vacation notice), so the caller
    /// threads it like any other; its null reverse path keeps it from
    /// being answered automatically.
    // Long: the steps of matching a report to our mail (the entry, the recipients, events, outbox state, metrics) in the order they must happen in one transaction.
    pub(super) fn bounce(
        &self,
        tx: &mut Tx<'_>,
        m: &Inbound<'_>,
        report: &Report,
        now: DateTime<Utc>,
    ) -> Result<Option<Outcome>, EffectsError> {
        let mail = m.mail;
        // The same report again (a restart, a second copy): once only.
        if tx.has_message(&mail.message_id, &mail.content_hash)? {
            return Ok(Some(Outcome::Duplicate));
        }
        let Some(matched) = find_match(tx, report)? else {
            if report.form == Form::Heuristic {
                tracing::debug!(
                    message_id = %mail.message_id,
                    "free-text delivery report about no mail escalator sent: threaded as mail"
                );
                return Ok(None);
            }
            unmatched(tx, mail, report, m.truncated.is_some());
            return Ok(Some(Outcome::Bounce { case: None }));
        };
        let failed: Vec<&Recipient> = matched
            .recipients
            .iter()
            .filter(|r| r.action == Action::Failed)
            .collect();
        let mut entry = matched.entry.clone();
        let has_case = entry.case != 0 && tx.case(entry.case)?.is_some();
        if !has_case && entry.state == OutboxState::Bounced {
            // Nowhere to keep the report but the entry, marked already (a
            // digest to several addresses): a report on another of its
            // recipients is still news for the log, and for `last_error`.
            let news: Vec<Recipient> = matched
                .recipients
                .iter()
                .filter(|r| !(r.action == Action::Failed && names_bounced(&entry, r)))
                .cloned()
                .collect();
            if !news.iter().any(|r| r.action == Action::Failed) {
                // The same report again: nothing stored, nothing new.
                return Ok(Some(Outcome::Duplicate));
            }
            self.log_report(tx, &entry, matched.kind, &news);
            let more: Vec<&Recipient> =
                news.iter().filter(|r| r.action == Action::Failed).collect();
            let mut error = entry.last_error.take().unwrap_or_default();
            error.push_str("; ");
            error.push_str(&bounce_error(&more));
            entry.last_error = Some(error);
            tx.put_outbox(&entry, None)?;
            return Ok(Some(Outcome::Bounce { case: None }));
        }
        if !failed.is_empty() {
            mark_bounced(tx, &mut entry, &failed, now)?;
        }
        self.log_report(tx, &entry, matched.kind, &matched.recipients);
        // Read after the mark: marking a mail still `sending` as sent
        // wrote the case.
        let case = match has_case {
            true => tx.case(entry.case)?,
            false => None,
        };
        let Some(mut case) = case else {
            return Ok(Some(Outcome::Bounce { case: None }));
        };
        let seq = tx.next_id(Sequence::Message)?;
        // The report as a message of the case: its bytes kept for people
        // (and its Message-ID indexed, so it is recorded once).
        let suppressed = crate::suppress::Suppress::Bounce;
        let record = super::message_record(
            seq,
            case.id,
            m.mail,
            m.src,
            m.truncated,
            Some(&suppressed),
            now,
        );
        tx.put_message(&record, m.raw)?;
        case.new_messages.push(seq);
        for r in &matched.recipients {
            if let Some(what) = event(r, &entry, &mail.message_id) {
                case.push(now, what);
            }
        }
        let config = self.config.get();
        let mut fx = Effects::new(&config, now);
        effects::step(tx, &mut fx, &mut case, Vec::new())?;
        Ok(Some(Outcome::Bounce {
            case: Some(case.id),
        }))
    }

    /// Logs what the report says once it is committed. A bounce of mail
    /// to staff is an error naming the tier and its address: escalated
    /// cases are not reaching anyone, and only an admin can fix that.
    fn log_report(
        &self,
        tx: &mut Tx<'_>,
        entry: &OutboxEntry,
        mail: MailKind,
        recipients: &[Recipient],
    ) {
        let config = self.config.get();
        let kind = entry.kind.clone();
        let staff = mail.staff_facing() || matches!(mail, MailKind::Digest | MailKind::Alert);
        let lines: Vec<(Recipient, Option<String>)> = recipients
            .iter()
            .map(|r| {
                let tier = config
                    .tiers
                    .iter()
                    .find(|t| t.forward_to.iter().any(|a| r.names(a)) || t.is_staff(&r.address))
                    .map(|t| t.name.clone());
                (r.clone(), tier)
            })
            .collect();
        let (case_id, outbox_id) = (entry.case, entry.id);
        tx.on_commit(move || {
            for (r, tier) in lines {
                let diagnostic = r.diagnostic.as_deref().unwrap_or("");
                match r.action {
                    Action::Failed if staff => tracing::error!(
                        case_id, outbox_id, mail = %kind, tier = tier.as_deref().unwrap_or("-"),
                        address = %r.address, status = %r.status, diagnostic,
                        "mail to staff bounced: the tier's address does not take mail"
                    ),
                    Action::Failed => tracing::warn!(
                        case_id, outbox_id, mail = %kind, recipient = %r.address,
                        status = %r.status, diagnostic, "mail bounced"
                    ),
                    Action::Delayed => tracing::info!(
                        case_id, outbox_id, mail = %kind, recipient = %r.address,
                        status = %r.status, "mail delayed; the sending server still tries"
                    ),
                    Action::Delivered => tracing::debug!(
                        case_id, outbox_id, recipient = %r.address, "delivery reported"
                    ),
                }
            }
        });
    }
}

/// What the case records of one recipient's report (None for a success
/// notice: the report is kept among the messages, nothing more).
fn event(r: &Recipient, entry: &OutboxEntry, report_id: &str) -> Option<EventKind> {
    let (outbox_id, mail, message_id) = (entry.id, entry.kind.clone(), report_id.to_string());
    let (recipient, status, diagnostic) =
        (r.address.clone(), r.status.clone(), r.diagnostic.clone());
    Some(match r.action {
        Action::Failed => EventKind::Bounced {
            outbox_id,
            mail,
            recipient,
            status,
            diagnostic,
            message_id,
        },
        Action::Delayed => EventKind::DeliveryDelayed {
            outbox_id,
            mail,
            recipient,
            status,
            diagnostic,
            message_id,
        },
        Action::Delivered => return None,
    })
}

/// The first quoted Message-ID that is one of our mails, with the
/// report's recipients among that mail's. A forged ID fails its keyed
/// hash; a real one quoted with another recipient matches nothing.
fn find_match(tx: &mut Tx<'_>, report: &Report) -> Result<Option<Matched>, StoreError> {
    for id in &report.original_ids {
        let Some(own) = OwnId::verify(id, tx.key()) else {
            continue;
        };
        let Some(entry) = tx.outbox_entry(own.seq)? else {
            continue;
        };
        if entry.message_id != *id || entry.case != own.case {
            continue;
        }
        let recipients: Vec<Recipient> = report
            .recipients
            .iter()
            .filter(|r| entry.to.iter().any(|to| r.names(to)))
            .cloned()
            .collect();
        if !recipients.is_empty() {
            return Ok(Some(Matched {
                entry,
                kind: own.kind,
                recipients,
            }));
        }
    }
    Ok(None)
}

/// Marks the entry bounced (a bounce proves the server had accepted it:
/// one still `sending` is marked sent first, as its confirmation copy
/// would).
fn mark_bounced(
    tx: &mut Tx<'_>,
    entry: &mut OutboxEntry,
    failed: &[&Recipient],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if entry.state.is_pending() {
        crate::outbox::journal::mark_sent(tx, entry, now)?;
    }
    entry.state = OutboxState::Bounced;
    entry.last_error = Some(bounce_error(failed));
    tx.put_outbox(entry, None)
}

/// `last_error` of a bounced entry: `bounced: <address> <status>[: <the
/// server's words>]` per failed recipient, `; ` between them (the
/// server's words lose their own `;`, so the list reads back exactly).
fn bounce_error(failed: &[&Recipient]) -> String {
    let one = |r: &&Recipient| match &r.diagnostic {
        Some(d) => format!(
            "bounced: {} {}: {}",
            r.address,
            r.status,
            d.replace(';', ",")
        ),
        None => format!("bounced: {} {}", r.address, r.status),
    };
    failed.iter().map(one).collect::<Vec<_>>().join("; ")
}

/// Does the bounced entry's `last_error` name `r` already? (An address
/// holds neither space nor `;`: see `bounce::plausible_address`.)
fn names_bounced(entry: &OutboxEntry, r: &Recipient) -> bool {
    let error = entry.last_error.as_deref().unwrap_or("");
    error.split(';').any(|one| {
        one.trim_start()
            .strip_prefix("bounced: ")
            .and_then(|rest| rest.split(' ').next())
            == Some(r.address.as_str())
    })
}

/// A standard report about no mail of ours: counted and logged once
/// committed, nothing stored (the message stays in the mailbox, so a
/// re-scan of it after a UIDVALIDITY change counts and logs it again).
fn unmatched(tx: &mut Tx<'_>, mail: &InboundMail, report: &Report, truncated: bool) {
    let message_id = mail.message_id.clone();
    let recipients: Vec<String> = report
        .recipients
        .iter()
        .take(3)
        .map(|r| r.address.clone())
        .collect();
    let quoted = report.original_ids.len();
    tx.on_commit(move || {
        crate::metrics::METRICS
            .bounces
            .inc(&[("mail", "unmatched")]);
        tracing::warn!(
            %message_id, ?recipients, quoted_ids = quoted, truncated,
            "{NO_MATCH}: not stored, left in the mailbox"
        );
    });
}
