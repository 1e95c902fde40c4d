//! What each mail escalator writes says: subject and body of every kind
//! (acknowledgement, escalation notice, relayed staff answer, survey,
//! forward to a tier, deadline warning and breach), built from the case
//! and what the store knows of it. The one place a mail's words come
//! from (the review digest's are in [`crate::digest`]); the effects
//! step decides which mails go out, this module only what they say.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::case::{rfc3339, Case, Reason};
use crate::config::{Config, TierConfig};
use crate::policy;
use crate::store::{StoreError, Tx};
use crate::template::{Kind, Templates};

/// Originals attached to one forward, at most (the rest are listed).
const MAX_ATTACHED_BYTES: usize = 20 << 20;

/// Writes the mails of one case change.
pub struct MailText<'a> {
    pub config: &'a Config,
    pub now: DateTime<Utc>,
}

impl<'a> MailText<'a> {
    pub fn new(config: &'a Config, now: DateTime<Utc>) -> Self {
        MailText { config, now }
    }

    fn tag(&self, case: &Case) -> String {
        format!("[{} #{}]", self.config.cases.subject_tag, case.id)
    }

    /// The acknowledgement.
    pub fn ack(&self, case: &Case, eta: DateTime<Utc>) -> Text {
        let v = values(case, eta, self.config, self.now);
        render(self.config, case, Kind::Ack, &v)
    }

    /// The customer is told the case moved up and the new ETA.
    pub fn notice(&self, case: &Case, eta: DateTime<Utc>) -> Text {
        let v = values(case, eta, self.config, self.now);
        render(self.config, case, Kind::Notice, &v)
    }

    /// The satisfaction survey after resolution.
    pub fn survey(&self, case: &Case) -> Text {
        let v = values(case, self.now, self.config, self.now);
        render(self.config, case, Kind::Survey, &v)
    }

    /// A staff answer passed on to the customer.
    pub fn relay(&self, case: &Case, text: &str) -> Text {
        let mut v = values(case, self.now, self.config, self.now);
        // The one value of many lines: the answer is the mail.
        v.insert("answer", text.to_string());
        render(self.config, case, Kind::Relay, &v)
    }

    /// The whole case to tier `t`, and the stored messages to attach.
    pub fn forward(
        &self,
        tx: &mut Tx<'_>,
        case: &Case,
        t: &TierConfig,
        why: (Reason, &str, &str),
    ) -> Result<(String, String, Vec<u64>), StoreError> {
        let subject = format!(
            "{} Escalated to {}: {}",
            self.tag(case),
            t.name,
            case.subject
        );
        let mut body = self.summary(tx, case, &format!("Escalated to {}", t.name), Some(why))?;
        let (history, attachments) = self.conversation(tx, case, true)?;
        body.push_str(&history);
        Ok((subject, body, attachments))
    }

    /// The deadline is near: to the tier holding the case.
    pub fn warning(&self, tx: &mut Tx<'_>, case: &Case) -> Result<(String, String), StoreError> {
        let due = case
            .due_at
            .map(|d| policy::format_eta(d, self.config.calendar.timezone))
            .unwrap_or_default();
        let subject = format!(
            "{} Reminder: answer due by {due}: {}",
            self.tag(case),
            case.subject
        );
        let mut body = self.summary(tx, case, "Reminder: the deadline is near", None)?;
        body.push_str(&self.conversation(tx, case, false)?.0);
        Ok((subject, body))
    }

    /// The deadline passed with no staff answer.
    pub fn breach(&self, tx: &mut Tx<'_>, case: &Case) -> Result<(String, String), StoreError> {
        let subject = format!("{} Deadline passed: {}", self.tag(case), case.subject);
        let mut body = self.summary(tx, case, "The deadline passed with no staff answer", None)?;
        body.push_str(&self.conversation(tx, case, false)?.0);
        Ok((subject, body))
    }

    /// The plain-text head of staff mail: who, how long, why, by when.
    pub fn summary(
        &self,
        tx: &mut Tx<'_>,
        case: &Case,
        title: &str,
        why: Option<(Reason, &str, &str)>,
    ) -> Result<String, StoreError> {
        let cfg = self.config;
        let tz = cfg.calendar.timezone;
        let age = human((self.now - case.created_at).to_std().unwrap_or_default());
        let waited = case
            .waiting_since
            .map(|w| {
                format!(
                    "{} (since {})",
                    human((self.now - w).to_std().unwrap_or_default()),
                    policy::format_eta(w, tz)
                )
            })
            .unwrap_or_else(|| "not waiting".into());
        let earlier = if case.customer.is_empty() {
            0
        } else {
            tx.customer_cases(&case.customer)?
                .iter()
                .filter(|c| **c != case.id)
                .count()
        };
        let mut s = format!(
            "{title}: case #{} \"{}\"\n\n\
             Customer:          {}{}\n\
             Case opened:       {} ({} ago)\n\
             Customer waiting:  {}\n",
            case.id,
            compose_safe(&case.subject),
            compose_safe(&case.customer),
            case.customer_name
                .as_ref()
                .map(|n| format!(" ({})", compose_safe(n)))
                .unwrap_or_default(),
            policy::format_eta(case.created_at, tz),
            age,
            waited,
        );
        if let Some((reason, detail, previous)) = why {
            s.push_str(&format!(
                "Why escalated:     {} — {}\n",
                reason.as_str(),
                compose_safe(detail)
            ));
            if !previous.is_empty() {
                s.push_str(&format!("Previous tier:     {previous}\n"));
            }
        }
        s.push_str(&format!(
            "Tier now:          {}\nDeadline:          {}\nPriority:          {}\nEarlier cases from this customer: {}\n",
            case.tier,
            case.due_at.map(|d| format!("{} ({})", policy::format_eta(d, tz), rfc3339(d))).unwrap_or_else(|| "none".into()),
            case.priority.as_deref().unwrap_or("normal"),
            earlier,
        ));
        if !case.participants.is_empty() {
            s.push_str(&format!(
                "Participants:      {}\n",
                compose_safe(&case.participants.join(", "))
            ));
        }
        s.push_str(
            "\nReply to this mail to answer the customer: your reply is passed on\n\
             from the support address and counts as the staff answer. Start it with\n\
             a line \"#note\" for an internal note the customer does not see; add a\n\
             line \"#resolve\" to resolve the case after your answer.\n",
        );
        Ok(s)
    }

    /// The conversation as text in time order, and (if `attach`) the
    /// stored messages to attach (by number).
    pub fn conversation(
        &self,
        tx: &mut Tx<'_>,
        case: &Case,
        attach: bool,
    ) -> Result<(String, Vec<u64>), StoreError> {
        let tz = self.config.calendar.timezone;
        let mut text = String::from("\n==== Conversation ====\n");
        let mut attachments = Vec::new();
        let mut attached_bytes = 0;
        let mut left_out = 0;
        // The message being ingested is in the transaction already.
        for seq in tx.case_messages(case)? {
            let Some(record) = tx.message(seq)? else {
                continue;
            };
            // Only headers are stored of a message over the size limit;
            // its record's size is the real one.
            let raw_len = if record.truncated { 0 } else { record.size };
            let from = record
                .from
                .as_ref()
                .map(|a| a.email.as_str())
                .unwrap_or("(no sender)");
            let who = if from == case.customer {
                " (customer)"
            } else {
                ""
            };
            text.push_str(&format!(
                "\n--- {} — {}{}\nSubject: {}\n",
                policy::format_eta(record.received_at, tz),
                compose_safe(from),
                who,
                compose_safe(&record.subject)
            ));
            if let Some(s) = &record.suppressed {
                text.push_str(&format!("[automatic or robot mail: {s}]\n"));
            }
            text.push('\n');
            let raw = if record.truncated { None } else { tx.raw(seq)? };
            text.push_str(record.text(raw.as_deref()).trim_end());
            text.push('\n');
            for a in &record.attachments {
                text.push_str(&format!(
                    "[attachment: {} ({}, {} bytes)]\n",
                    a.name
                        .as_deref()
                        .map(compose_safe)
                        .unwrap_or_else(|| "unnamed".into()),
                    compose_safe(&a.content_type),
                    a.size
                ));
            }
            if attach {
                if attached_bytes + raw_len <= MAX_ATTACHED_BYTES {
                    attached_bytes += raw_len;
                    attachments.push(seq);
                } else {
                    left_out += 1;
                }
            }
        }
        if attach {
            text.push_str(&format!(
                "\n==== {} original message(s) attached{} ====\n",
                attachments.len(),
                if left_out > 0 {
                    format!("; {left_out} too large to attach, see the support mailbox")
                } else {
                    String::new()
                }
            ));
        }
        Ok((text, attachments))
    }
}

/// Template values every customer-facing mail can use.
pub fn values(
    case: &Case,
    eta: DateTime<Utc>,
    config: &Config,
    now: DateTime<Utc>,
) -> BTreeMap<&'static str, String> {
    let tag = format!("[{} #{}]", config.cases.subject_tag, case.id);
    // In words, the wait counts what the deadline counts: business time
    // when there are business hours ("within 4 business hours", even
    // across a night), wall-clock time otherwise.
    let business = &config.calendar.business;
    let wait = business.between(now, eta);
    let mut v = BTreeMap::new();
    v.insert("case_id", case.id.to_string());
    v.insert("case_tag", tag);
    // Without a display name, the address's local part reads better
    // than the whole address ("Hello alice,").
    v.insert(
        "customer_name",
        case.customer_name
            .clone()
            .unwrap_or_else(|| case.customer.split('@').next().unwrap_or("").to_string()),
    );
    v.insert("customer", case.customer.clone());
    v.insert("subject", case.subject.clone());
    v.insert("tier", case.tier.clone());
    let lang = language(config, case);
    v.insert(
        "eta",
        crate::locale::format_eta(eta, config.calendar.timezone, lang),
    );
    v.insert(
        "eta_in_words",
        crate::locale::eta_words(wait, business.hours.is_some(), lang),
    );
    // The case's queue speaks for it: its name and address.
    let q = config.queue(&case.queue);
    v.insert(
        "support_name",
        q.from_name.clone().unwrap_or_else(|| "Support".into()),
    );
    v.insert("support_address", q.address.clone());
    // Every value is one line, whichever text it goes into: a subject or
    // name with an encoded line break must not add a paragraph to mail
    // that comes from the support address.
    for value in v.values_mut() {
        *value = crate::template::one_line(value);
    }
    v
}

/// Subject and body of the acknowledgement of `case`.
pub fn ack_text(
    case: &Case,
    eta: DateTime<Utc>,
    config: &Config,
    now: DateTime<Utc>,
) -> (String, String) {
    let t = MailText::new(config, now).ack(case, eta);
    (t.subject, t.body)
}

/// A customer mail's words and their language (the `Content-Language`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text {
    pub subject: String,
    pub body: String,
    pub language: String,
}

/// The language `case`'s customer gets: the case's (chosen by
/// [`crate::language`] from the customer's mail), else its queue's, else
/// `[language] default`.
pub fn language<'c>(config: &'c Config, case: &'c Case) -> &'c str {
    case.language
        .as_deref()
        .or(config.queue(&case.queue).language.as_deref())
        .unwrap_or(&config.language.default)
}

/// [`language`] and where it came from (`language_source` in the JSON).
pub fn language_and_source<'c>(config: &'c Config, case: &'c Case) -> (&'c str, &'c str) {
    match (&case.language, &case.language_source) {
        (Some(l), Some(s)) => (l, s),
        (Some(l), None) => (l, crate::language::Source::Case.as_str()),
        (None, _) => match &config.queue(&case.queue).language {
            Some(q) => (q, crate::language::Source::Queue.as_str()),
            None => (
                &config.language.default,
                crate::language::Source::Default.as_str(),
            ),
        },
    }
}

/// Renders `kind` from the config's templates. Every template was
/// checked when the config was loaded; one that still fails on a real
/// case is logged (naming its file and line) and the built-in set is
/// used, and should that fail too (a value so large the fuel runs out),
/// the plain text below: the customer always gets their mail, never an
/// error message.
fn render(config: &Config, case: &Case, kind: Kind, v: &BTreeMap<&'static str, String>) -> Text {
    let lang = language(config, case);
    let rendered = config.templates.set.render(kind, lang, v).or_else(|e| {
        tracing::error!(kind = kind.name(), error = %e, "a mail template failed; the built-in text is used");
        Templates::builtin().render(kind, lang, v)
    });
    match rendered {
        Ok(r) => Text {
            subject: r.subject,
            body: r.body,
            // A neutral template speaks the language asked for.
            language: if r.language.is_empty() {
                lang.to_string()
            } else {
                r.language
            },
        },
        Err(e) => {
            tracing::error!(kind = kind.name(), error = %e, "the built-in template failed too; the plain text is used");
            let (subject, body) = plain(kind, v);
            Text {
                subject,
                body,
                language: "en".into(),
            }
        }
    }
}

/// The last resort: each kind's text without any template.
fn plain(kind: Kind, v: &BTreeMap<&'static str, String>) -> (String, String) {
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or_default();
    let (tag, subject, name) = (get("case_tag"), get("subject"), get("support_name"));
    match kind {
        Kind::Relay => (
            format!("{tag} Re: {subject}"),
            format!("{}\n\n-- \n{name} · case #{}\n", get("answer"), get("case_id")),
        ),
        Kind::Survey => (
            format!("{tag} How did we do? {subject}"),
            format!(
                "Your case #{} is resolved. How did it go? Please reply with a number \
                 from 1 (poor) to 5 (great).\n\n{name}\n",
                get("case_id")
            ),
        ),
        Kind::Ack | Kind::Notice => (
            format!("{tag} Re: {subject}"),
            format!(
                "Your case #{} is with our {} team. They will answer {}, by {}.\n\n\
                 To add to this case, reply to this mail and keep {tag} in the subject.\n\n{name}\n",
                get("case_id"),
                get("tier"),
                get("eta_in_words"),
                get("eta")
            ),
        ),
    }
}

fn compose_safe(s: &str) -> String {
    crate::template::one_line(s)
}

fn human(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    let (days, hours, mins) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (days, hours) {
        (0, 0) => format!("{mins}m"),
        (0, h) => format!("{h}h {mins}m"),
        (d, h) => format!("{d}d {h}h"),
    }
}
