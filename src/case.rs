//! The case: one customer's matter, the messages in it and what happened
//! to it. Plain data with serde, so the store can keep it and the CLI can
//! print it; the JSON field names are a contract with admins' scripts.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Case numbers are small integers customers can read out on the phone.
pub type CaseId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a staff answer; `due_at` says by when.
    Open,
    /// Staff answered; waiting for the customer.
    Answered,
    Resolved,
}

/// A case as stored.
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
    /// The name of the tier that holds the case.
    pub tier: String,
    pub priority: Option<String>,
    /// People the customer had in To/Cc: their replies join the case.
    pub participants: Vec<String>,
    /// Keys of the stored messages, in arrival order.
    pub messages: Vec<u64>,
    pub escalations: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub due_at: Option<DateTime<Utc>>,
    /// The customer's first Message-ID: acknowledgements thread to it.
    pub root_message_id: String,
    pub history: Vec<Event>,
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
    Created { message_id: String, from: String },
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
    AckSuppressed { reason: String },
    /// The outbox handed a mail to the SMTP server.
    MailSent {
        outbox_id: u64,
        mail: String,
        to: String,
    },
    /// The SMTP server refused a mail for good.
    MailFailed {
        outbox_id: u64,
        mail: String,
        error: String,
    },
}

impl Case {
    pub fn is_participant(&self, addr: &str) -> bool {
        !addr.is_empty() && (self.customer == addr || self.participants.iter().any(|p| p == addr))
    }

    pub fn push(&mut self, at: DateTime<Utc>, what: EventKind) {
        self.updated_at = at;
        self.history.push(Event { at, what });
    }

    /// The JSON view printed by `cases list --json`: the contract fields.
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "customer": self.customer,
            "customer_name": self.customer_name,
            "subject": self.subject,
            "status": self.status,
            "tier": self.tier,
            "priority": self.priority,
            "messages": self.messages.len(),
            "escalations": self.escalations,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "due_at": self.due_at.map(rfc3339),
            "participants": self.participants,
            "unassigned": self.customer.is_empty(),
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
        let mut c = Case {
            id: 42,
            customer: "a@example.org".into(),
            customer_name: None,
            subject: "Help".into(),
            status: Status::Open,
            tier: "Frontline".into(),
            priority: None,
            participants: vec![],
            messages: vec![1, 2],
            escalations: 0,
            created_at: at,
            updated_at: at,
            due_at: Some(at),
            root_message_id: "m@x".into(),
            history: vec![],
        };
        c.push(at, EventKind::AckSuppressed { reason: "x".into() });
        let j = c.summary_json();
        assert_eq!(j["id"], 42);
        assert_eq!(j["status"], "open");
        assert_eq!(j["messages"], 2);
        assert_eq!(j["due_at"], "2026-01-01T10:00:00Z");
        let e = serde_json::to_value(&c.history[0]).unwrap();
        assert_eq!(e["kind"], "ack_suppressed");
        assert_eq!(e["reason"], "x");
    }
}
