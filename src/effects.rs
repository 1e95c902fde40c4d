//! Effects: the policy's actions become outbox entries, written in the
//! same transaction as the case change that caused them. Here live the
//! limits on automatic mail and [`step`]: the one way a changed case and
//! its mails are written. What each mail says is [`crate::mailtext`]'s.

use chrono::{DateTime, Utc};

use crate::case::{Case, CaseId, EventKind};
use crate::config::Config;
use crate::mailtext::{MailText, Text};
use crate::outbox::compose::{self, Envelope};
use crate::policy::{Action, Ctx};
use crate::record::{OutboxEntry, OutboxState};
use crate::store::{Sequence, Store, StoreError, Tx, ALL_RECIPIENTS};
use crate::suppress::recipient_key;
use crate::thread::{MailKind, OwnId};

/// Why queueing a case's mails failed.
#[derive(Debug, thiserror::Error)]
pub enum EffectsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing a mail's bytes failed. mail-builder writes into memory, so
    /// this does not happen in practice; it is not a store failure.
    #[error("cannot compose a mail")]
    Compose(#[source] std::io::Error),
}

/// Queues mails for one case change.
pub struct Effects<'a> {
    pub config: &'a Config,
    pub now: DateTime<Utc>,
}

/// Writes a changed case and queues the mails for `actions`, in `tx`:
/// the one step behind ingest, timers and the CLI. Returns how many
/// mails were queued. The case's new events are counted in the metrics
/// once the transaction commits.
pub fn step(
    tx: &mut Tx<'_>,
    fx: &mut Effects<'_>,
    case: &mut Case,
    actions: Vec<Action>,
) -> Result<usize, EffectsError> {
    let queued = fx.apply(tx, case, actions)?;
    let events = case.new_events.clone();
    tx.put_case(case)?;
    tx.on_commit(move || crate::metrics::committed(&events));
    Ok(queued)
}

/// Changes case `id` as `f` decides (None: leave it as it is), with the
/// mails that causes, in one transaction. Returns the case and how many
/// mails were queued, or None when there is no such case or `f` declined.
pub fn change_case(
    store: &Store,
    config: &Config,
    now: DateTime<Utc>,
    id: CaseId,
    f: impl FnOnce(&mut Tx<'_>, &mut Case, &Ctx) -> Result<Option<Vec<Action>>, EffectsError>,
) -> Result<Option<(Case, usize)>, EffectsError> {
    change_with(store, config, now, |tx| tx.case(id).map(Ok), f)
        .map(|changed| changed.unwrap_or(None))
}

/// Another node's transaction holds the case right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held;

/// As [`change_case`], except that a case another node's transaction
/// holds is left alone (`Err(Held)`) rather than waited for: the
/// scheduler's way to share due timers between nodes (`SKIP LOCKED`).
pub fn change_case_unless_held(
    store: &Store,
    config: &Config,
    now: DateTime<Utc>,
    id: CaseId,
    f: impl FnOnce(&mut Tx<'_>, &mut Case, &Ctx) -> Result<Option<Vec<Action>>, EffectsError>,
) -> Result<Result<Option<(Case, usize)>, Held>, EffectsError> {
    change_with(store, config, now, |tx| tx.case_unless_held(id), f)
}

fn change_with(
    store: &Store,
    config: &Config,
    now: DateTime<Utc>,
    read: impl Fn(&mut Tx<'_>) -> Result<Result<Option<Case>, ()>, crate::store::StoreError>,
    f: impl FnOnce(&mut Tx<'_>, &mut Case, &Ctx) -> Result<Option<Vec<Action>>, EffectsError>,
) -> Result<Result<Option<(Case, usize)>, Held>, EffectsError> {
    store.transact(|tx| {
        let mut case = match read(tx)? {
            Err(()) => return Ok(Err(Held)),
            Ok(None) => return Ok(Ok(None)),
            Ok(Some(c)) => c,
        };
        let ctx = Ctx { config, now };
        let Some(actions) = f(tx, &mut case, &ctx)? else {
            return Ok(Ok(None));
        };
        let mut fx = Effects::new(config, now);
        let queued = step(tx, &mut fx, &mut case, actions)?;
        Ok(Ok(Some((case, queued))))
    })
}

/// What the acknowledgement is called in limit messages.
const ACK: &str = "acknowledgement";

/// Says once a minute, in the log, that the global limit holds acks
/// back: a flood would otherwise write a line per message.
fn global_limit_reached(limit: usize, at: DateTime<Utc>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(at.timestamp()).unwrap_or(0);
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::error!(
            limit,
            "global automatic-mail limit reached (cases.auto_reply_global_limit): acks to new \
             cases are held back; every message is still stored"
        );
    }
}

impl<'a> Effects<'a> {
    pub fn new(config: &'a Config, now: DateTime<Utc>) -> Self {
        Effects { config, now }
    }

    /// Queues the mails for `actions`; returns how many were queued.
    pub fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        case: &mut Case,
        actions: Vec<Action>,
    ) -> Result<usize, EffectsError> {
        let mut queued = 0;
        for action in actions {
            queued += self.one(tx, case, action)? as usize;
        }
        Ok(queued)
    }

    // Long: one arm per action, each arm the whole of what that action queues and records (the templates issue renders every arm through one call).
    fn one(
        &mut self,
        tx: &mut Tx<'_>,
        case: &mut Case,
        action: Action,
    ) -> Result<bool, EffectsError> {
        let cfg = self.config;
        let text = MailText::new(cfg, self.now);
        match action {
            Action::Ack { eta } => {
                if !self.within_limit(tx, case, ACK)? {
                    return Ok(false);
                }
                let t = text.ack(case, eta);
                let id = self.robot_mail(tx, case, MailKind::Ack, &t, "auto-replied")?;
                let to = case.customer.clone();
                case.push(
                    self.now,
                    EventKind::AckQueued {
                        outbox_id: id,
                        to,
                        eta,
                    },
                );
            }
            Action::Notice { eta } => {
                if !self.within_limit(tx, case, "escalation notice")? {
                    return Ok(false);
                }
                let t = text.notice(case, eta);
                let id = self.robot_mail(tx, case, MailKind::Notice, &t, "auto-generated")?;
                self.queued_event(case, id, MailKind::Notice, &case.customer.clone());
            }
            Action::Survey => {
                if !self.within_limit(tx, case, "survey")? {
                    return Ok(false);
                }
                let t = text.survey(case);
                let id = self.robot_mail(tx, case, MailKind::Survey, &t, "auto-generated")?;
                case.push(self.now, EventKind::SurveySent { outbox_id: id });
            }
            Action::Relay { text: answer, from } => {
                let t = text.relay(case, &answer);
                let id = self.customer_mail(tx, case, MailKind::Relay, &t, None)?;
                case.push(
                    self.now,
                    EventKind::Relayed {
                        from,
                        outbox_id: id,
                    },
                );
            }
            Action::Forward {
                tier,
                previous,
                reason,
                detail,
            } => {
                let t = &cfg.tiers[tier];
                let (mail, attachments) =
                    text.forward(tx, case, t, (reason, &detail, &previous))?;
                self.staff_mail(
                    tx,
                    case,
                    MailKind::Forward,
                    &t.forward_to,
                    &mail,
                    attachments,
                )?;
            }
            Action::Warn { tier } => {
                let to = staff_recipients(&cfg.tiers[tier]);
                if to.is_empty() {
                    return Ok(false);
                }
                let mail = text.warning(tx, case)?;
                self.staff_mail(tx, case, MailKind::Warn, &to, &mail, Vec::new())?;
            }
            Action::Renotify { tier } => {
                let to = staff_recipients(&cfg.tiers[tier]);
                if to.is_empty() {
                    return Ok(false);
                }
                let mail = text.breach(tx, case)?;
                self.staff_mail(tx, case, MailKind::Renotify, &to, &mail, Vec::new())?;
            }
        }
        Ok(true)
    }

    /// Checks the automatic-mail limits: per recipient (plus-addressed
    /// variants are one), and for acks the global hourly one. Mails queued
    /// earlier in this transaction count too.
    fn within_limit(
        &mut self,
        tx: &mut Tx<'_>,
        case: &mut Case,
        what: &str,
    ) -> Result<bool, StoreError> {
        let cfg = self.config;
        let window = chrono::Duration::from_std(cfg.cases.auto_reply_window)
            .unwrap_or(chrono::Duration::hours(1));
        let recipient = recipient_key(&case.customer);
        let limit = cfg.cases.auto_reply_limit as usize;
        let sent = tx.auto_replies_since(&recipient, self.now - window, limit)?;
        if sent >= limit {
            let reason = format!(
                "{what} not sent: more than {} automatic mails to {} within {}",
                cfg.cases.auto_reply_limit,
                case.customer,
                humantime::format_duration(cfg.cases.auto_reply_window)
            );
            return Ok(self.held(case, reason, "recipient"));
        }
        let global = cfg.cases.auto_reply_global_limit as usize;
        if what == ACK && global > 0 {
            let all = tx.auto_replies_since(
                ALL_RECIPIENTS,
                self.now - chrono::Duration::hours(1),
                global,
            )?;
            // A flood's senders are new (forged) addresses; a customer
            // with an earlier case is still told their case number.
            let known = tx
                .customer_cases(&case.customer)?
                .iter()
                .any(|c| *c != case.id);
            if all >= global && !known {
                let reason = format!(
                    "{what} not sent: the global limit of {global} automatic mails per hour \
                     (cases.auto_reply_global_limit) is reached, and {} has no earlier case",
                    case.customer
                );
                global_limit_reached(global, self.now);
                return Ok(self.held(case, reason, "global"));
            }
        }
        Ok(true)
    }

    /// Records that a limit held back an automatic mail.
    fn held(&self, case: &mut Case, reason: String, limit: &str) -> bool {
        case.push(
            self.now,
            EventKind::AckSuppressed {
                reason,
                limit: Some(limit.into()),
            },
        );
        false
    }

    fn queued_event(&self, case: &mut Case, id: u64, kind: MailKind, to: &str) {
        case.push(
            self.now,
            EventKind::MailQueued {
                outbox_id: id,
                mail: kind.as_str().into(),
                to: to.to_string(),
            },
        );
    }

    /// An automatic mail to the customer, counted against the
    /// per-recipient limit (the caller checked `within_limit`).
    fn robot_mail(
        &mut self,
        tx: &mut Tx<'_>,
        case: &Case,
        kind: MailKind,
        text: &Text,
        auto: &str,
    ) -> Result<u64, EffectsError> {
        let id = self.customer_mail(tx, case, kind, text, Some(auto))?;
        tx.record_auto_reply(&recipient_key(&case.customer), self.now, id);
        tx.record_auto_reply(ALL_RECIPIENTS, self.now, id);
        Ok(id)
    }

    /// A mail to the customer, in the case's thread, in its language.
    fn customer_mail(
        &mut self,
        tx: &mut Tx<'_>,
        case: &Case,
        kind: MailKind,
        text: &Text,
        auto: Option<&str>,
    ) -> Result<u64, EffectsError> {
        let mut refs = vec![case.root_message_id.clone()];
        if case.last_message_id != case.root_message_id && !case.last_message_id.is_empty() {
            refs.push(case.last_message_id.clone());
        }
        let reply_to = if case.last_message_id.is_empty() {
            &case.root_message_id
        } else {
            &case.last_message_id
        };
        self.queue(
            tx,
            (case.id, &case.queue),
            kind,
            vec![case.customer.clone()],
            case.customer_name.as_deref(),
            text,
            Some(reply_to),
            refs,
            auto,
            None,
            Vec::new(),
        )
    }

    fn staff_mail(
        &mut self,
        tx: &mut Tx<'_>,
        case: &mut Case,
        kind: MailKind,
        to: &[String],
        text: &Text,
        attach: Vec<u64>,
    ) -> Result<u64, EffectsError> {
        let support = self.config.queue(&case.queue).address.clone();
        let id = self.queue(
            tx,
            (case.id, &case.queue),
            kind,
            to.to_vec(),
            None,
            text,
            None,
            Vec::new(),
            Some("auto-generated"),
            Some(&support),
            attach,
        )?;
        self.queued_event(case, id, kind, &to.join(", "));
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    /// Queues one mail of case `case_id` of queue `queue`, from that
    /// queue's address (case 0, queue "": the main address), with its
    /// text's `Content-Language` and HTML alternative.
    // Long: one outbox entry from its parts in order: sender, Message-ID, staff marker, attachment placeholders, the composed bytes, the entry and its index.
    fn queue(
        &mut self,
        tx: &mut Tx<'_>,
        (case_id, queue): (CaseId, &str),
        kind: MailKind,
        to: Vec<String>,
        to_name: Option<&str>,
        text: &Text,
        in_reply_to: Option<&str>,
        references: Vec<String>,
        auto: Option<&str>,
        reply_to: Option<&str>,
        attach: Vec<u64>,
    ) -> Result<u64, EffectsError> {
        let cfg = self.config;
        let id = tx.next_id(Sequence::Outbox)?;
        let (from_name, from) = if queue.is_empty() {
            cfg.main_sender()
        } else {
            let q = cfg.queue(queue);
            (q.from_name.as_deref(), q.address.as_str())
        };
        // The sending queue's own domain: a second brand's mail must not
        // show the main brand in its Message-IDs (which the customer's
        // replies then carry). Threading reads only the local part.
        let domain = from
            .rsplit_once('@')
            .map(|(_, d)| d)
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| cfg.support_domain());
        let message_id = OwnId {
            case: case_id,
            kind,
            seq: id,
        }
        .format(tx.key(), domain);
        // Staff-facing mail opens with the marker a reply is cut at: its
        // token is this mail's own Message-ID (unique, keyed).
        let (mut body, mut html) = (text.body.clone(), text.html.clone());
        if kind.staff_facing() {
            let token = message_id.split('@').next().unwrap_or("");
            let marker = crate::quote::marker_line(token);
            body = format!("{marker}\n\n{body}");
            html = html.map(|h| with_marker(&h, &crate::template::escape_html(&marker)));
        }
        let subject = text.subject.as_str();
        // The originals are not copied into the entry: each is a
        // placeholder that the outbox replaces with the stored message
        // when it sends (see `outbox::expand`).
        let attach_nonce = if attach.is_empty() {
            String::new()
        } else {
            crate::outbox::attach_nonce(tx.key(), &message_id)
        };
        let attachments = attach
            .iter()
            .map(|seq| crate::outbox::placeholder(&attach_nonce, *seq).into_bytes())
            .collect();
        let first = to.first().cloned().unwrap_or_default();
        let raw = compose::compose(
            &Envelope {
                from_name,
                from,
                to_name,
                to: &first,
                subject,
                message_id: &message_id,
                in_reply_to,
                references,
                auto_submitted: auto,
                reply_to,
                attachments,
                instance: &cfg.cases.instance,
                case_id,
                date: self.now,
                language: Some(&text.language),
                html: html.as_deref(),
            },
            &body,
        )
        .map_err(EffectsError::Compose)?;
        let entry = OutboxEntry {
            id,
            case: case_id,
            kind: kind.as_str().into(),
            message_id: message_id.clone(),
            from: from.to_string(),
            to,
            subject: subject.to_string(),
            state: OutboxState::Pending,
            attempts: 0,
            created_at: self.now,
            next_attempt_at: self.now,
            sent_at: None,
            last_error: None,
            attempt_at: None,
            attach,
            attach_nonce,
            claimed_by: None,
        };
        tx.put_outbox(&entry, Some(&raw))?;
        tx.index_message_id(&message_id, "out", case_id, id);
        Ok(id)
    }

    /// The alert that an OAuth 2 identity needs a login, to `to`.
    pub fn alert(
        &mut self,
        tx: &mut Tx<'_>,
        to: Vec<String>,
        text: &Text,
    ) -> Result<u64, EffectsError> {
        self.caseless(tx, MailKind::Alert, to, text)
    }

    /// The review digest to `to`.
    pub fn digest(
        &mut self,
        tx: &mut Tx<'_>,
        to: Vec<String>,
        text: &Text,
    ) -> Result<u64, EffectsError> {
        self.caseless(tx, MailKind::Digest, to, text)
    }

    /// Staff mail about no case, threaded to nothing.
    fn caseless(
        &mut self,
        tx: &mut Tx<'_>,
        kind: MailKind,
        to: Vec<String>,
        text: &Text,
    ) -> Result<u64, EffectsError> {
        self.queue(
            tx,
            (0, ""),
            kind,
            to,
            None,
            text,
            None,
            Vec::new(),
            Some("auto-generated"),
            None,
            Vec::new(),
        )
    }
}

/// An HTML body with the staff marker as its first paragraph: inside
/// `<body ...>` when the template writes a whole document, else after
/// `<html ...>` or the doctype (in front of `<!DOCTYPE>` it would put
/// browsers in quirks mode). Comments are skipped: a marker inside one
/// would be invisible and lost from a reply.
fn with_marker(html: &str, marker: &str) -> String {
    let para = format!("<p>{marker}</p>\n");
    let at = ["<body", "<html", "<!doctype"]
        .iter()
        .find_map(|tag| tag_end(html, tag));
    match at {
        Some(at) => format!("{}\n{para}{}", &html[..at], &html[at..]),
        None => format!("{para}{html}"),
    }
}

/// Where the first `<tag ...>` outside comments ends (after its `>`,
/// quoted attribute values read past), matching `tag` as a whole name.
fn tag_end(html: &str, tag: &str) -> Option<usize> {
    let lower = html.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Bytes, not str: `i` may stand inside a multibyte character.
        if bytes[i..].starts_with(b"<!--") {
            i += bytes[i..]
                .windows(3)
                .position(|w| w == b"-->")
                .map_or(bytes.len(), |e| e + 3);
            continue;
        }
        if bytes[i..].starts_with(tag.as_bytes()) {
            let after = bytes.get(i + tag.len()).copied();
            if matches!(
                after,
                Some(b'>' | b'/') | Some(b' ' | b'\t' | b'\n' | b'\r')
            ) {
                let mut quote = None;
                for (k, &b) in bytes.iter().enumerate().skip(i + tag.len()) {
                    match (quote, b) {
                        (None, b'"' | b'\'') => quote = Some(b),
                        (Some(q), b) if b == q => quote = None,
                        (None, b'>') => return Some(k + 1),
                        _ => {}
                    }
                }
                return None;
            }
        }
        i += 1;
    }
    None
}

/// Where mail for a tier goes: its `forward_to`, or for the first tier
/// (read from the support mailbox) its staff addresses.
fn staff_recipients(t: &crate::config::TierConfig) -> Vec<String> {
    if !t.forward_to.is_empty() {
        return t.forward_to.clone();
    }
    t.staff
        .iter()
        .filter(|s| !s.starts_with('@'))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Reason;
    use crate::record::MessageRecord;
    use std::path::Path;

    fn config(dir: &Path) -> Config {
        let tier2 = "[[tiers]]\nname = \"Tier 2\"\nfirst_response = \"4h\"\n\
                     staff = [\"tier2@example.test\"]\nforward_to = [\"tier2@example.test\"]";
        crate::testing::config(dir, "", tier2)
    }

    /// The text bodies of every queued mail, by kind.
    fn bodies(store: &Store) -> Vec<(String, String)> {
        store
            .outbox()
            .map(|e| {
                let e = e.unwrap();
                let raw = store.outbox_raw(e.id).unwrap().unwrap();
                let m = mail_parser::MessageParser::default().parse(&raw).unwrap();
                (e.kind, m.body_text(0).unwrap_or_default().into_owned())
            })
            .collect()
    }

    #[test]
    fn the_staff_marker_opens_the_html_body_inside_a_whole_document() {
        assert_eq!(with_marker("<p>hi</p>", "M"), "<p>M</p>\n<p>hi</p>");
        assert_eq!(
            with_marker("<!DOCTYPE html><html><BODY class=x><p>hi</p></body>", "M"),
            "<!DOCTYPE html><html><BODY class=x>\n<p>M</p>\n<p>hi</p></body>"
        );
        // Not inside a comment, nor an attribute; no body: after <html>.
        assert_eq!(
            with_marker("<head><!-- <body> --></head><body data-x=\"a>b\">x", "M"),
            "<head><!-- <body> --></head><body data-x=\"a>b\">\n<p>M</p>\nx"
        );
        assert_eq!(
            with_marker("<!DOCTYPE html><html lang=de><p>x", "M"),
            "<!DOCTYPE html><html lang=de>\n<p>M</p>\n<p>x"
        );
        // <bodyguard> is no body; multibyte text around is kept whole.
        assert_eq!(with_marker("<bodyguard>ü", "M"), "<p>M</p>\n<bodyguard>ü");
    }

    #[test]
    fn customer_text_adds_no_line_to_any_mail_kind() {
        // Attack: a subject and display name whose encoded CR/LF (or
        // Unicode line separator) would add a paragraph of the sender's
        // choosing ("log in at ...") to mail from the support address.
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let store = Store::open(&cfg.store.path).unwrap();
        let now = Utc::now();
        let evil =
            "Locked\r\n\r\nYour account is locked, log in at http://evil.example\u{2028}INJECTED";
        let mut case = Case::new(7, "eve@example.org", evil, "Frontline", "r@x", now);
        case.customer_name = Some("Eve\nINJECTED: call +1 555".into());
        case.due_at = Some(now);
        let mut fx = Effects::new(&cfg, now);
        let actions = vec![
            Action::Ack { eta: now },
            Action::Notice { eta: now },
            Action::Survey,
            Action::Relay {
                text: "Fixed.".into(),
                from: "tier2@example.test".into(),
            },
            Action::Forward {
                tier: 1,
                previous: "Frontline".into(),
                reason: Reason::Trigger,
                detail: "phrase\r\nINJECTED".into(),
            },
            Action::Warn { tier: 1 },
            Action::Renotify { tier: 1 },
        ];
        store
            .transact(|tx| fx.apply(tx, &mut case, actions))
            .unwrap();
        let all = bodies(&store);
        let kinds: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
        for kind in [
            "ack", "notice", "survey", "relay", "forward", "warning", "breach",
        ] {
            assert!(kinds.contains(&kind), "{kind} not queued: {kinds:?}");
        }
        for (kind, body) in &all {
            // Staff-facing mail opens with its own marker line.
            let staff = ["forward", "warning", "breach"].contains(&kind.as_str());
            let first = body.lines().next().unwrap_or("");
            assert_eq!(
                staff,
                first.contains(crate::quote::MARKER_WORDS) && first.contains("[ref: c7."),
                "{kind}: {first:?}"
            );
            for line in body.lines() {
                let t = line.trim_start();
                assert!(
                    !t.starts_with("INJECTED") && !t.starts_with("Your account is locked"),
                    "{kind}: customer text became its own line: {line:?}\n{body}"
                );
            }
        }
    }

    #[test]
    fn a_forward_references_the_originals_instead_of_copying_them() {
        // Input: a case with a 200 KB message escalated through tiers:
        // every forward stored another copy of every original.
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let store = Store::open(&cfg.store.path).unwrap();
        let now = Utc::now();
        let big = format!(
            "From: eve@example.org\r\nSubject: logs\r\nMessage-ID: <big@x>\r\n\r\n{}\r\n",
            "log line 1234567890\r\n".repeat(10_000)
        );
        let record = MessageRecord {
            seq: 5,
            case: 7,
            message_id: "big@x".into(),
            content_hash: "h".into(),
            from: None,
            to: Vec::new(),
            cc: Vec::new(),
            subject: "logs".into(),
            date: None,
            received_at: now,
            folder: "INBOX".into(),
            uid: 1,
            attachments: Vec::new(),
            size: big.len(),
            suppressed: None,
            truncated: false,
            parse_error: None,
            several_from: false,
        };
        store
            .transact(|tx| tx.put_message(&record, big.as_bytes()))
            .unwrap();
        let mut case = Case::new(7, "eve@example.org", "logs", "Frontline", "big@x", now);
        case.new_messages = vec![5];
        let mut fx = Effects::new(&cfg, now);
        let forward = Action::Forward {
            tier: 1,
            previous: "Frontline".into(),
            reason: Reason::Stale,
            detail: String::new(),
        };
        store
            .transact(|tx| fx.apply(tx, &mut case, vec![forward]))
            .unwrap();
        let entry = store.outbox().next().unwrap().unwrap();
        let stored = store.outbox_raw(entry.id).unwrap().unwrap();
        // The conversation's text (read from the stored bytes) is in
        // the body; the original itself is not copied in as well.
        assert!(
            stored.len() < big.len() + 20_000,
            "no copy of the original: {} bytes",
            stored.len()
        );
        assert!(String::from_utf8_lossy(&stored).contains("log line 1234567890"));
        assert_eq!(entry.attach, vec![5]);
        let sent = crate::outbox::expand(&store, &entry, stored).unwrap();
        let m = mail_parser::MessageParser::default().parse(&sent).unwrap();
        let attached = m.attachments().next().unwrap();
        assert_eq!(attached.len(), big.len(), "the original goes out whole");
        assert!(String::from_utf8_lossy(&sent).contains("Message-ID: <big@x>"));
    }
}
