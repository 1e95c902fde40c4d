//! Policy: what a new message means for its case (status, deadline) and
//! which mails it causes. Pure: `now` and the config are arguments.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::case::{Case, EventKind, Status};
use crate::config::{Config, TierConfig};
use crate::message::InboundMail;
use crate::suppress::Suppress;

/// A mail the policy wants sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// The acknowledgement of a new case.
    Ack { eta: DateTime<Utc> },
}

/// The tier a case is in (the first one if the config lost its name).
pub fn tier<'a>(config: &'a Config, name: &str) -> &'a TierConfig {
    config
        .tiers
        .iter()
        .find(|t| t.name == name)
        .unwrap_or(&config.tiers[0])
}

/// When a case that starts waiting now must have its answer.
pub fn deadline(now: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX)
}

/// Opens a new case from its first message.
pub fn open_case(id: u64, mail: &InboundMail, config: &Config, now: DateTime<Utc>) -> Case {
    let first = &config.tiers[0];
    let customer = mail
        .from
        .as_ref()
        .map(|a| a.email.clone())
        .unwrap_or_default();
    let subject = crate::thread::clean_subject(&mail.subject, &config.cases.subject_tag);
    let mut case = Case {
        id,
        customer: customer.clone(),
        customer_name: mail.from.as_ref().and_then(|a| a.name.clone()),
        subject: if subject.is_empty() {
            "(no subject)".into()
        } else {
            subject
        },
        status: Status::Open,
        tier: first.name.clone(),
        priority: None,
        participants: Vec::new(),
        messages: Vec::new(),
        escalations: 0,
        created_at: now,
        updated_at: now,
        due_at: Some(deadline(now, first.first_response)),
        root_message_id: mail.message_id.clone(),
        history: Vec::new(),
    };
    case.push(
        now,
        EventKind::Created {
            message_id: mail.message_id.clone(),
            from: customer,
        },
    );
    case
}

/// Applies an inbound message to its case and says what to send.
pub fn on_message(
    case: &mut Case,
    mail: &InboundMail,
    is_new: bool,
    suppress: Option<&Suppress>,
    config: &Config,
    now: DateTime<Utc>,
) -> Vec<Outgoing> {
    let sender = mail.from.as_ref().map(|a| a.email.as_str()).unwrap_or("");
    if sender == case.customer && !sender.is_empty() {
        // People the customer copies in become participants, so their
        // replies join this case instead of opening duplicates.
        let support = config.support_addresses();
        for a in mail.to.iter().chain(mail.cc.iter()) {
            if a.email != case.customer
                && !support.contains(&a.email)
                && !case.participants.contains(&a.email)
            {
                case.participants.push(a.email.clone());
            }
        }
    }
    if is_new {
        return match suppress {
            None if !case.customer.is_empty() => vec![Outgoing::Ack {
                eta: case.due_at.unwrap_or(now),
            }],
            None => vec![],
            Some(s) => {
                case.push(
                    now,
                    EventKind::AckSuppressed {
                        reason: s.to_string(),
                    },
                );
                vec![]
            }
        };
    }
    if case.status == Status::Resolved && suppress.is_none_or(|s| !s.is_automatic()) {
        // Reopening policy belongs to the escalation engine; until then a
        // customer writing again makes the case wait for an answer again.
        case.status = Status::Open;
    }
    Vec::new()
}

/// "within 4 hours", "within 1 day 2 hours": the two largest units.
pub fn eta_words(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "right away".into();
    }
    let units = [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ];
    let mut parts = Vec::new();
    for (name, size) in units {
        if secs >= size && parts.len() < 2 {
            let n = secs / size;
            secs %= size;
            parts.push(format!("{n} {name}{}", if n == 1 { "" } else { "s" }));
        } else if !parts.is_empty() {
            // Only adjacent units: "1 day 30 seconds" reads oddly.
            break;
        }
    }
    format!("within {}", parts.join(" "))
}

/// The ETA as people read it, in the support team's time zone.
pub fn format_eta(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    at.with_timezone(&tz)
        .format("%A, %-d %B %Y, %H:%M %Z")
        .to_string()
}

/// Subject and body of the acknowledgement of `case`.
pub fn ack_text(
    case: &Case,
    eta: DateTime<Utc>,
    config: &Config,
    now: DateTime<Utc>,
) -> (String, String) {
    let tag = format!("[{} #{}]", config.cases.subject_tag, case.id);
    let subject = format!("{tag} Re: {}", case.subject);
    let wait = (eta - now).to_std().unwrap_or(Duration::ZERO);
    let mut v = BTreeMap::new();
    v.insert("case_id", case.id.to_string());
    v.insert("case_tag", tag);
    v.insert(
        "customer_name",
        case.customer_name
            .clone()
            .unwrap_or_else(|| case.customer.clone()),
    );
    v.insert("customer", case.customer.clone());
    v.insert("subject", case.subject.clone());
    v.insert("tier", case.tier.clone());
    v.insert("eta", format_eta(eta, config.calendar.timezone));
    v.insert("eta_in_words", eta_words(wait));
    v.insert(
        "support_name",
        config
            .smtp
            .from_name
            .clone()
            .unwrap_or_else(|| "Support".into()),
    );
    v.insert("support_address", config.smtp.from.clone());
    (subject, config.templates.ack.render(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::parse;
    use std::path::Path;

    fn config() -> Config {
        let text = r#"
[mailbox]
host = "127.0.0.1"
security = "plain"
username = "s"
password = "p"
[smtp]
host = "127.0.0.1"
security = "plain"
from = "Example Support <support@example.test>"
[store]
path = "/tmp/x"
[calendar]
timezone = "Europe/Berlin"
[[tiers]]
name = "Frontline"
first_response = "4h"
"#;
        Config::parse(text, Path::new("/x.toml"), &|_| None).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn new_case_gets_ack_with_first_tier_deadline() {
        let c = config();
        let now = at("2026-11-23T09:00:00Z");
        let m = parse(b"From: Alice <alice@example.org>\r\nCc: bob@example.org, support@example.test\r\nSubject: Re: Printer\r\nMessage-ID: <m1@x>\r\n\r\nhelp\r\n");
        let mut case = open_case(7, &m, &c, now);
        let out = on_message(&mut case, &m, true, None, &c, now);
        assert_eq!(case.due_at, Some(at("2026-11-23T13:00:00Z")));
        assert_eq!(
            out,
            vec![Outgoing::Ack {
                eta: at("2026-11-23T13:00:00Z")
            }]
        );
        assert_eq!(case.subject, "Printer");
        assert_eq!(case.participants, vec!["bob@example.org"]);
        let (subject, body) = ack_text(&case, at("2026-11-23T13:00:00Z"), &c, now);
        assert_eq!(subject, "[Case #7] Re: Printer");
        assert!(body.contains("case #7"), "{body}");
        assert!(body.contains("within 4 hours"), "{body}");
        assert!(
            body.contains("Monday, 23 November 2026, 14:00 CET"),
            "{body}"
        );
        assert!(body.contains("Hello Alice"), "{body}");
    }

    #[test]
    fn suppressed_new_case_gets_no_ack_and_says_why() {
        let c = config();
        let now = at("2026-11-23T09:00:00Z");
        let m = parse(b"From: alice@example.org\r\nAuto-Submitted: auto-replied\r\n\r\nOOO\r\n");
        let mut case = open_case(1, &m, &c, now);
        let s = crate::suppress::classify(&m, &c.support_addresses());
        let out = on_message(&mut case, &m, true, s.as_ref(), &c, now);
        assert!(out.is_empty());
        assert!(matches!(
            case.history.last().unwrap().what,
            EventKind::AckSuppressed { .. }
        ));
    }

    #[test]
    fn words() {
        assert_eq!(eta_words(Duration::from_secs(4 * 3600)), "within 4 hours");
        assert_eq!(eta_words(Duration::from_secs(3600)), "within 1 hour");
        assert_eq!(
            eta_words(Duration::from_secs(90)),
            "within 1 minute 30 seconds"
        );
        assert_eq!(
            eta_words(Duration::from_secs(86_400 + 7200)),
            "within 1 day 2 hours"
        );
        assert_eq!(eta_words(Duration::from_secs(86_400 + 30)), "within 1 day");
        assert_eq!(eta_words(Duration::from_secs(2)), "within 2 seconds");
    }

    #[test]
    fn eta_in_zone_across_dst() {
        let tz: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
        assert_eq!(
            format_eta(at("2026-07-01T12:00:00Z"), tz),
            "Wednesday, 1 July 2026, 14:00 CEST"
        );
        assert_eq!(
            format_eta(at("2026-12-01T12:00:00Z"), tz),
            "Tuesday, 1 December 2026, 13:00 CET"
        );
    }
}
