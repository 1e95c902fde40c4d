//! The case: one customer's matter, the messages in it and what happened
//! to it. Plain data with serde, so the store can keep it and the CLI can
//! print it; the JSON field names are a contract with admins' scripts.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Case numbers are small integers customers can read out on the phone.
pub type CaseId = u64;

/// The queue of a lone `[mailbox]`, and of cases from before queues.
pub const DEFAULT_QUEUE: &str = "default";

pub fn default_queue() -> String {
    DEFAULT_QUEUE.to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a staff answer; `due_at` says by when.
    Open,
    /// Staff answered; waiting for the customer.
    Answered,
    Resolved,
}

/// A case as stored: the summary of the case; its messages and history
/// are kept as records of their own.
///
/// The store keeps this record in a positional binary encoding: a field
/// added, removed or moved here, or a variant inserted before others in
/// an enum it holds, needs a new record version in `store::codec` (with
/// a reader for the old one). Add enum variants at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub id: CaseId,
    /// Lower-case address; empty for an `unassigned` case whose sender
    /// could not be read.
    pub customer: String,
    pub customer_name: Option<String>,
    /// The subject of the first message, without our tag.
    pub subject: String,
    pub status: Status,
    /// The queue the case belongs to (`[[mailboxes]] name`): its mail
    /// is sent from that queue's address, and it escalates along that
    /// queue's tiers.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// The name of the tier that holds the case.
    pub tier: String,
    pub priority: Option<String>,
    /// People the customer had in To/Cc: their replies join the case.
    pub participants: Vec<String>,
    /// How many messages the case holds. Their keys are kept apart from
    /// the case (`Store::case_messages`), so adding one to a long case
    /// does not rewrite the whole list.
    #[serde(default)]
    pub message_count: u64,
    /// Messages added since the case was read, in arrival order: the
    /// store appends them when it writes the case.
    #[serde(skip)]
    pub new_messages: Vec<u64>,
    pub escalations: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub due_at: Option<DateTime<Utc>>,
    /// The customer's first Message-ID: acknowledgements thread to it.
    pub root_message_id: String,
    /// The customer's latest Message-ID: notices and relays answer it.
    #[serde(default)]
    pub last_message_id: String,
    /// When the customer's current wait began (None when not waiting).
    #[serde(default)]
    pub waiting_since: Option<DateTime<Utc>>,
    /// The next timer and what it does; indexed in the store by time.
    #[serde(default)]
    pub timer: Option<Timer>,
    /// A timer whose firing failed (a panic in the rules): taken out of
    /// the index so it cannot stop the scheduler again, kept here with
    /// the error until a person re-arms it (`escalator cases retry`).
    #[serde(default)]
    pub parked_timer: Option<ParkedTimer>,
    /// The deadline passed at the top tier with no answer.
    #[serde(default)]
    pub breached: bool,
    /// When to remind the tier of the current deadline (None once done).
    #[serde(default)]
    pub warn_at: Option<DateTime<Utc>>,
    /// Business time the case spent open (waiting on staff) before the
    /// current open period, for `resolve_within`.
    #[serde(default)]
    pub open_secs: u64,
    /// When the current open period began.
    #[serde(default)]
    pub open_since: Option<DateTime<Utc>>,
    /// The tier whose `resolve_within` already fired (it fires once).
    #[serde(default)]
    pub resolve_fired: Option<String>,
    /// Customer messages since the last staff answer.
    #[serde(default)]
    pub unanswered: u32,
    #[serde(default)]
    pub first_answer_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub answered_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub resolved_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub survey_sent: bool,
    /// The customer's 1-5 rating after resolution.
    #[serde(default)]
    pub csat: Option<u8>,
    /// The resolved case this one follows on from.
    #[serde(default)]
    pub previous_case: Option<CaseId>,
    /// The customer had `repeat_customer.cases` cases within
    /// `repeat_customer.within` when this one opened.
    #[serde(default)]
    pub repeat_customer: bool,
    /// How many events the case's history holds. Like the messages, the
    /// events are kept apart from the case (`Store::history`).
    #[serde(default)]
    pub event_count: u64,
    /// Events since the case was read, oldest first: the store appends
    /// them to the history when it writes the case, and the metrics
    /// count them once that commits.
    #[serde(skip)]
    pub new_events: Vec<Event>,
    /// The language the customer's mail is in (a normalised tag), and
    /// where it came from ([`crate::language::Source`]: `customer`,
    /// `domain`, `content-language`, `accept-language`, `detected`,
    /// `queue`, `default`). None in cases from before languages were
    /// chosen: their next customer message chooses. (New fields go at
    /// the end: see `store::codec::decode`.)
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub language_source: Option<String>,
}

/// A case's next timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub at: DateTime<Utc>,
    pub kind: TimerKind,
}

/// A timer set aside because firing it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedTimer {
    pub timer: Timer,
    pub error: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// Remind the tier before the deadline.
    Warn,
    /// The deadline: escalate, or at the top tier mark breached.
    Due,
    /// The tier's `resolve_within` ran out.
    ResolveDue,
    /// Re-notify the top tier about a breached case.
    Renotify,
    /// Resolve after customer silence following an answer.
    AutoResolve,
}

/// Why a case moved up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Stale,
    RepeatCustomer,
    Trigger,
    Manual,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Stale => "stale",
            Reason::RepeatCustomer => "repeat_customer",
            Reason::Trigger => "trigger",
            Reason::Manual => "manual",
        }
    }
}

/// One thing that happened to a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub what: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// The case was opened by a message.
    Created {
        message_id: String,
        from: String,
    },
    /// A message joined the case.
    Message {
        message_id: String,
        from: String,
        /// How it was matched: reference, tag or own_reference.
        via: String,
        /// Set when the message was automatic (and so did not count as
        /// the customer writing).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        automatic: Option<String>,
    },
    /// An acknowledgement was queued in the outbox.
    AckQueued {
        outbox_id: u64,
        to: String,
        eta: DateTime<Utc>,
    },
    /// No automatic answer was sent, and why.
    AckSuppressed {
        reason: String,
        /// Which automatic-mail limit held it back (`recipient` or
        /// `global`), when a limit did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
    },
    /// The outbox handed a mail to the SMTP server.
    MailSent {
        outbox_id: u64,
        mail: String,
        to: String,
    },
    /// Any other mail was queued (notice, forward, relay, warning...).
    MailQueued {
        outbox_id: u64,
        mail: String,
        to: String,
    },
    /// The case moved up a tier.
    Escalated {
        from: String,
        to: String,
        reason: Reason,
        detail: String,
    },
    /// A staff member answered; the clock stopped.
    StaffAnswer {
        from: String,
        message_id: String,
    },
    /// A staff reply was passed on to the customer.
    Relayed {
        from: String,
        outbox_id: u64,
    },
    /// An internal note (`#note`), kept from the customer.
    Note {
        from: String,
        message_id: String,
    },
    Resolved {
        by: String,
    },
    Reopened {
        message_id: String,
    },
    /// A tier was reminded of a coming deadline.
    Warned {
        tier: String,
    },
    /// The deadline passed at the top tier.
    Breached {
        tier: String,
    },
    Renotified {
        tier: String,
    },
    SurveySent {
        outbox_id: u64,
    },
    Csat {
        score: u8,
    },
    /// Priority set by a trigger.
    Priority {
        priority: String,
        why: String,
    },
    /// A message claiming a staff address without proof (no reference
    /// to a forward): stored, but nothing it says is obeyed or relayed.
    UnverifiedStaff {
        from: String,
        message_id: String,
    },
    /// The SMTP server refused a mail for good.
    MailFailed {
        outbox_id: u64,
        mail: String,
        error: String,
    },
    /// Firing the case's timer failed; it is parked until a person
    /// re-arms it.
    TimerParked {
        error: String,
    },
    /// A staff reply was not passed on: it still held part of the
    /// forward (its marker or summary), which the customer must not see.
    RelayBlocked {
        from: String,
        message_id: String,
        reason: String,
    },
    /// A person re-armed a parked timer.
    TimerRearmed {
        by: String,
    },
    /// A mail of the case bounced: a delivery-status notification that
    /// quotes its Message-ID reports that the recipient's server refused
    /// it for good. The notification is stored among the case's messages.
    Bounced {
        outbox_id: u64,
        /// What the mail was: ack, forward, relay...
        mail: String,
        recipient: String,
        /// The status code (`5.1.1`).
        status: String,
        /// The server's words, for people (capped, one line).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diagnostic: Option<String>,
        /// The notification's own Message-ID.
        message_id: String,
    },
    /// A mail of the case is not delivered yet and still being tried
    /// (a delay warning): recorded, not counted as a bounce.
    DeliveryDelayed {
        outbox_id: u64,
        mail: String,
        recipient: String,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diagnostic: Option<String>,
        message_id: String,
    },
}

impl Case {
    /// A new open case with nothing in it yet.
    pub fn new(
        id: CaseId,
        customer: &str,
        subject: &str,
        tier: &str,
        root: &str,
        now: DateTime<Utc>,
    ) -> Case {
        Case {
            id,
            customer: customer.to_string(),
            customer_name: None,
            subject: subject.to_string(),
            status: Status::Open,
            queue: default_queue(),
            tier: tier.to_string(),
            priority: None,
            participants: Vec::new(),
            message_count: 0,
            new_messages: Vec::new(),
            escalations: 0,
            created_at: now,
            updated_at: now,
            due_at: None,
            root_message_id: root.to_string(),
            last_message_id: root.to_string(),
            waiting_since: Some(now),
            timer: None,
            parked_timer: None,
            breached: false,
            warn_at: None,
            open_secs: 0,
            open_since: Some(now),
            resolve_fired: None,
            unanswered: 0,
            first_answer_at: None,
            answered_at: None,
            resolved_at: None,
            survey_sent: false,
            csat: None,
            previous_case: None,
            repeat_customer: false,
            event_count: 0,
            new_events: Vec::new(),
            language: None,
            language_source: None,
        }
    }

    pub fn is_participant(&self, addr: &str) -> bool {
        !addr.is_empty() && (self.customer == addr || self.participants.iter().any(|p| p == addr))
    }

    pub fn push(&mut self, at: DateTime<Utc>, what: EventKind) {
        self.updated_at = at;
        self.new_events.push(Event { at, what });
    }

    /// The JSON view printed by `cases list --json`: the contract fields.
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "customer": self.customer,
            "customer_name": self.customer_name,
            "subject": self.subject,
            "status": self.status,
            "queue": self.queue,
            "tier": self.tier,
            "priority": self.priority,
            "messages": self.message_count + self.new_messages.len() as u64,
            "escalations": self.escalations,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "due_at": self.due_at.map(rfc3339),
            "participants": self.participants,
            "unassigned": self.customer.is_empty(),
            "csat": self.csat,
            "breached": self.breached,
            "previous_case": self.previous_case,
            "repeat_customer": self.repeat_customer,
            "resolved_at": self.resolved_at.map(rfc3339),
            "timer_error": self.parked_timer.as_ref().map(|p| p.error.clone()),
        })
    }
}

/// RFC 3339 in UTC to the second: what scripts parse most easily.
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_contract_fields() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut c = Case::new(42, "a@example.org", "Help", "Frontline", "m@x", at);
        c.message_count = 1;
        c.new_messages = vec![2];
        c.due_at = Some(at);
        c.push(
            at,
            EventKind::AckSuppressed {
                reason: "x".into(),
                limit: None,
            },
        );
        let j = c.summary_json();
        assert_eq!(j["id"], 42);
        assert_eq!(j["status"], "open");
        assert_eq!(j["messages"], 2);
        assert_eq!(j["due_at"], "2026-01-01T10:00:00Z");
        let e = serde_json::to_value(&c.new_events[0]).unwrap();
        assert_eq!(e["kind"], "ack_suppressed");
        assert_eq!(e["reason"], "x");
    }
}
