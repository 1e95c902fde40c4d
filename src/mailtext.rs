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
use crate::template::{one_line, Kind, Templates};

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

    /// The acknowledgement.
    pub fn ack(&self, case: &Case, eta: DateTime<Utc>) -> Text {
        self.customer(case, Kind::Ack, eta, None)
    }

    /// The customer is told the case moved up and the new ETA.
    pub fn notice(&self, case: &Case, eta: DateTime<Utc>) -> Text {
        self.customer(case, Kind::Notice, eta, None)
    }

    /// The satisfaction survey after resolution.
    pub fn survey(&self, case: &Case) -> Text {
        self.customer(case, Kind::Survey, self.now, None)
    }

    /// A staff answer passed on to the customer.
    pub fn relay(&self, case: &Case, text: &str) -> Text {
        self.customer(case, Kind::Relay, self.now, Some(text))
    }

    /// A customer kind in the customer's language, its values in the
    /// language of the template that writes it.
    fn customer(&self, case: &Case, kind: Kind, eta: DateTime<Utc>, answer: Option<&str>) -> Text {
        let asked = language(self.config, case);
        let speaks = speaks(self.config, kind, asked);
        let mut v = values(case, eta, self.config, self.now, &speaks);
        if let Some(text) = answer {
            // The one value of many lines: the answer is the mail.
            v.insert("answer", text.to_string());
        }
        render_in(self.config, (asked, &speaks), kind, &v)
    }

    /// The whole case to tier `t`, and the stored messages to attach.
    pub fn forward(
        &self,
        tx: &mut Tx<'_>,
        case: &Case,
        t: &TierConfig,
        (reason, detail, previous): (Reason, &str, &str),
    ) -> Result<(Text, Vec<u64>), StoreError> {
        let (history, attachments) = self.conversation(tx, case, true)?;
        let staff = &self.config.language.staff;
        let lang = speaks(self.config, Kind::Forward, staff);
        let mut v = self.staff_values(tx, case, history, &lang)?;
        // The tier it goes to (the policy has moved the case there).
        v.insert("tier", one_line(&t.name));
        v.insert("reason", reason.as_str().to_string());
        v.insert("reason_detail", one_line(detail));
        v.insert("previous_tier", one_line(previous));
        Ok((self.staff(Kind::Forward, &v), attachments))
    }

    /// The deadline is near: to the tier holding the case.
    pub fn warning(&self, tx: &mut Tx<'_>, case: &Case) -> Result<Text, StoreError> {
        let history = self.conversation(tx, case, false)?.0;
        let lang = speaks(self.config, Kind::Warning, &self.config.language.staff);
        let v = self.staff_values(tx, case, history, &lang)?;
        Ok(self.staff(Kind::Warning, &v))
    }

    /// The deadline passed with no staff answer.
    pub fn breach(&self, tx: &mut Tx<'_>, case: &Case) -> Result<Text, StoreError> {
        let history = self.conversation(tx, case, false)?.0;
        let lang = speaks(self.config, Kind::Breach, &self.config.language.staff);
        let v = self.staff_values(tx, case, history, &lang)?;
        Ok(self.staff(Kind::Breach, &v))
    }

    /// A staff kind rendered in `[language] staff`.
    fn staff(&self, kind: Kind, v: &BTreeMap<&'static str, String>) -> Text {
        let asked = &self.config.language.staff;
        render_in(
            self.config,
            (asked, &speaks(self.config, kind, asked)),
            kind,
            v,
        )
    }

    /// The values of staff mail about `case`: who, how long, by when, and
    /// the conversation (`history`), with dates in `lang` (the language
    /// of the template that writes the mail: [`speaks`]).
    pub fn staff_values(
        &self,
        tx: &mut Tx<'_>,
        case: &Case,
        history: String,
        lang: &str,
    ) -> Result<BTreeMap<&'static str, String>, StoreError> {
        let cfg = self.config;
        let tz = cfg.calendar.timezone;
        let date = |at| crate::locale::format_eta(at, tz, lang);
        let earlier = if case.customer.is_empty() {
            0
        } else {
            tx.customer_cases(&case.customer)?
                .iter()
                .filter(|c| **c != case.id)
                .count()
        };
        let mut v = case_values(case, cfg);
        let since = |at: DateTime<Utc>| human((self.now - at).to_std().unwrap_or_default());
        v.insert(
            "customer_display_name",
            case.customer_name.clone().unwrap_or_default(),
        );
        v.insert("opened", date(case.created_at));
        v.insert("age", since(case.created_at));
        v.insert(
            "waiting",
            case.waiting_since
                .map(|w| format!("{} (since {})", since(w), date(w)))
                .unwrap_or_else(|| "not waiting".into()),
        );
        v.insert("due", case.due_at.map(date).unwrap_or_default());
        v.insert("due_utc", case.due_at.map(rfc3339).unwrap_or_default());
        v.insert(
            "priority",
            case.priority.clone().unwrap_or_else(|| "normal".into()),
        );
        v.insert("earlier_cases", earlier.to_string());
        v.insert("participants", case.participants.join(", "));
        for value in v.values_mut() {
            *value = one_line(value);
        }
        // The one value of many lines, without the line end the
        // template's own last line gives.
        v.insert("history", history.trim_end_matches('\n').to_string());
        Ok(v)
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

/// Template values every customer-facing mail can use: the case's and
/// the ETA, in the customer's language.
pub fn values(
    case: &Case,
    eta: DateTime<Utc>,
    config: &Config,
    now: DateTime<Utc>,
    lang: &str,
) -> BTreeMap<&'static str, String> {
    // In words, the wait counts what the deadline counts: business time
    // when there are business hours ("within 4 business hours", even
    // across a night), wall-clock time otherwise.
    let business = &config.calendar.business;
    let wait = business.between(now, eta);
    let mut v = case_values(case, config);
    v.insert(
        "eta",
        crate::locale::format_eta(eta, config.calendar.timezone, lang),
    );
    v.insert(
        "eta_in_words",
        crate::locale::eta_words(wait, business.hours.is_some(), lang),
    );
    v
}

/// The values of every mail about a case, each one line: a subject or
/// name with an encoded line break must not add a paragraph to mail that
/// comes from the support address.
fn case_values(case: &Case, config: &Config) -> BTreeMap<&'static str, String> {
    let tag = format!("[{} #{}]", config.cases.subject_tag, case.id);
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
    // The case's queue speaks for it: its name and address.
    let q = config.queue(&case.queue);
    v.insert(
        "support_name",
        q.from_name.clone().unwrap_or_else(|| "Support".into()),
    );
    v.insert("support_address", q.address.clone());
    for value in v.values_mut() {
        *value = one_line(value);
    }
    v
}

/// The review digest for [`from`, `until`) every `every`: its report
/// (the KPI text of many lines) and headline figures.
pub fn digest(
    config: &Config,
    (from, until): (DateTime<Utc>, DateTime<Utc>),
    every: std::time::Duration,
    report: &str,
    figures: (u64, u64, u64),
) -> Text {
    let mut v = BTreeMap::new();
    v.insert("from", from.format("%Y-%m-%d %H:%M").to_string());
    v.insert("until", until.format("%Y-%m-%d %H:%M UTC").to_string());
    v.insert(
        "every",
        crate::stats::short_duration(every.as_secs() as i64),
    );
    v.insert("report", report.trim_end_matches('\n').to_string());
    v.insert("new_cases", figures.0.to_string());
    v.insert("escalated", figures.1.to_string());
    v.insert("breached", figures.2.to_string());
    let asked = &config.language.staff;
    render_in(
        config,
        (asked, &speaks(config, Kind::Digest, asked)),
        Kind::Digest,
        &v,
    )
}

/// The alert that identity `identity`'s grant died (`error`, at
/// `since`), naming the mailboxes that wait and the fix.
pub fn alert(
    config: &Config,
    identity: &str,
    error: &str,
    since: DateTime<Utc>,
    mailboxes: &[String],
) -> Text {
    let mut v = BTreeMap::new();
    v.insert("identity", identity.to_string());
    v.insert("error", crate::template::one_line(error));
    v.insert("since", since.format("%Y-%m-%d %H:%M UTC").to_string());
    v.insert("fix", format!("escalator auth login {identity}"));
    v.insert(
        "mailboxes",
        if mailboxes.is_empty() {
            "its mailboxes".to_string()
        } else {
            mailboxes.join(", ")
        },
    );
    let asked = &config.language.staff;
    render_in(
        config,
        (asked, &speaks(config, Kind::Alert, asked)),
        Kind::Alert,
        &v,
    )
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
    /// The HTML alternative, when the template has one.
    pub html: Option<String>,
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

/// The language `kind`'s text is in when asked for in `asked`: that of
/// the template that writes it; a neutral template of the admin's is
/// taken to be in `[language] default` (staff kinds: `staff`), the
/// language the admin writes in.
pub fn speaks(config: &Config, kind: Kind, asked: &str) -> String {
    match config.templates.set.resolve(kind, asked) {
        Some(l) if !l.is_empty() => l,
        Some(_) if kind.is_customer() => config.language.default.clone(),
        Some(_) => config.language.staff.clone(),
        None => "en".into(),
    }
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
fn render_in(
    config: &Config,
    (lang, speaks): (&str, &str),
    kind: Kind,
    v: &BTreeMap<&'static str, String>,
) -> Text {
    let rendered = config.templates.set.render(kind, lang, v).or_else(|e| {
        tracing::error!(kind = kind.name(), error = %e, "a mail template failed; the built-in text is used");
        Templates::builtin().render(kind, lang, v)
    });
    match rendered {
        Ok(r) => Text {
            subject: r.subject,
            body: r.body,
            html: r.html,
            // A neutral template speaks what [`speaks`] says.
            language: if r.language.is_empty() {
                speaks.to_string()
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
                html: None,
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
        Kind::Forward | Kind::Warning | Kind::Breach => (
            format!("{tag} {}: {subject}", kind.name()),
            format!(
                "Case #{} of {} ({}), now with {}.\n{}\n",
                get("case_id"),
                get("customer"),
                get("waiting"),
                get("tier"),
                get("history")
            ),
        ),
        Kind::Digest => (
            format!("Escalation review {} to {}", get("from"), get("until")),
            format!("{}\n", get("report")),
        ),
        Kind::Alert => (
            format!("escalator: {} cannot log in", get("identity")),
            format!("{}\n\n{}\n", get("error"), get("fix")),
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
