//! Records: the plain data the store keeps and the workers read and
//! write — a stored message, an outgoing mail, a quarantined message, a
//! folder's cursor. No behaviour beyond what the data itself says; the
//! store imports these and no worker.
//!
//! The store keeps these in a positional binary encoding (as the case:
//! see [`crate::case::Case`]): changing a struct's fields, or inserting
//! an enum variant before others, needs a new record version in
//! `store::codec`. Add enum variants at the end.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::case::CaseId;
use crate::message::{Addr, Attachment};

/// Where a folder's ingestion stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub uid_validity: u32,
    /// Every UID up to this one is in the store (or in quarantine).
    pub last_uid: u32,
}

/// A stored message without its raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageRecord {
    pub seq: u64,
    pub case: CaseId,
    pub message_id: String,
    pub content_hash: String,
    pub from: Option<Addr>,
    pub to: Vec<Addr>,
    pub cc: Vec<Addr>,
    pub subject: String,
    pub date: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub folder: String,
    pub uid: u32,
    pub attachments: Vec<Attachment>,
    pub size: usize,
    /// Why this needs no automatic answer, if it needs none.
    pub suppressed: Option<String>,
    /// Set when only the headers were kept (over `max_message_size`).
    pub truncated: bool,
    pub parse_error: Option<String>,
    /// The message had more than one `From:` field; `from` is the first.
    #[serde(default)]
    pub several_from: bool,
}

impl MessageRecord {
    /// The message's text, read from its stored bytes (`raw`) rather than
    /// kept twice: for a message over the size limit (headers only), a
    /// note saying so.
    pub fn text(&self, raw: Option<&[u8]>) -> String {
        if self.truncated {
            return format!(
                "[This message is {} bytes, over mailbox.max_message_size: only its \
                 headers were stored. Read it in the support mailbox.]",
                self.size
            );
        }
        match raw {
            Some(raw) => crate::message::parse(raw).text,
            None => "[the message's bytes are missing from the store]".into(),
        }
    }
}

/// A message that failed to process, kept with its error for a person.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub id: u64,
    /// The queue whose mailbox the message is in.
    #[serde(default = "crate::case::default_queue")]
    pub queue: String,
    pub folder: String,
    pub uid_validity: u32,
    pub uid: u32,
    pub error: String,
    pub at: DateTime<Utc>,
    pub attempts: u32,
    /// The message came from the support mailbox's Sent folder: a retry
    /// must ingest it as an agent's mail again.
    #[serde(default)]
    pub sent: bool,
    /// The server would not give the message: no bytes are kept, and a
    /// retry rewinds the folder's cursor so the watcher fetches it again.
    #[serde(default)]
    pub unfetched: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxState {
    Pending,
    /// Handed to SMTP; not yet known to be accepted.
    Sending,
    Sent,
    /// Refused for good (or retried past the outbox's give-up time).
    Failed,
    /// Accepted by the SMTP server, then returned: a delivery-status
    /// notification quoting its Message-ID reported a recipient failed
    /// (`last_error` says who and why). Never sent again by itself.
    Bounced,
}

impl OutboxState {
    /// Still to be sent (or settled by its confirmation copy).
    pub fn is_pending(self) -> bool {
        matches!(self, OutboxState::Pending | OutboxState::Sending)
    }
}

/// One outgoing mail. Its bytes are kept beside it in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub id: u64,
    pub case: CaseId,
    /// What the mail is: ack, notice, forward...
    pub kind: String,
    pub message_id: String,
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub state: OutboxState,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// When the current attempt began (for an entry left `sending`).
    #[serde(default)]
    pub attempt_at: Option<DateTime<Utc>>,
    /// Stored messages attached by reference (forwards): their bytes are
    /// put in at sending, so a forward does not copy the originals.
    #[serde(default)]
    pub attach: Vec<u64>,
    /// Makes the placeholders of `attach` impossible to guess or to write
    /// into a customer's text.
    #[serde(default)]
    pub attach_nonce: String,
    /// The node that claimed it last (sending it now, or the one that
    /// sent it or gave up); None with the embedded store and for mail
    /// not tried yet. Added at the end: a record written before it is
    /// read with None (`codec::FIELDS_ADDED`).
    #[serde(default)]
    pub claimed_by: Option<String>,
}

/// Why a node's SMTP server refuses its mail (a wrong password, a sender
/// it will not take): kept in the store until a send works again, so
/// `stats` shows it to an admin who is not reading the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmtpProblem {
    /// The node (empty with the embedded store: there is one).
    pub node: String,
    /// The server's config section: `smtp`, or a queue's
    /// `mailboxes[N].smtp`.
    pub server: String,
    pub error: String,
    /// When the server first refused.
    pub since: DateTime<Utc>,
}

/// An OAuth 2 identity's grant as the store keeps it: what `auth status`
/// shows in the clear, and the tokens sealed with the token key (which
/// is never in the store; see `crate::oauth::vault`). One record per
/// identity, shared by every node of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthGrant {
    pub identity: String,
    /// The account the login reached (the token's user), when known.
    #[serde(default)]
    pub account: Option<String>,
    /// The scopes granted (as the token endpoint said, else as asked).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The access and refresh tokens, sealed (hexadecimal).
    #[serde(default)]
    pub sealed: Option<String>,
    #[serde(default)]
    pub access_expires_at: Option<DateTime<Utc>>,
    /// When `auth login` stored the grant.
    #[serde(default)]
    pub logged_in_at: Option<DateTime<Utc>>,
    /// When the refresh token in `sealed` was issued (a rotation renews
    /// it): its age is what providers expire (Microsoft 90 days idle).
    #[serde(default)]
    pub refresh_token_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub refreshed_at: Option<DateTime<Utc>>,
    /// Bumped by every write of new tokens: a refresh stores its result
    /// only over the tokens it started from.
    #[serde(default)]
    pub generation: u64,
    /// The node refreshing now and until when its claim holds.
    #[serde(default)]
    pub refreshing: Option<(String, DateTime<Utc>)>,
    /// False once the provider said the grant is gone (`invalid_grant`):
    /// only `auth login` makes it valid again.
    #[serde(default)]
    pub valid: bool,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at: Option<DateTime<Utc>>,
    /// Failed refreshes, every node's, since the store began.
    #[serde(default)]
    pub refresh_failures: u64,
    /// When a server last refused a token of this grant before its end
    /// (such refusals force a refresh at most this often).
    #[serde(default)]
    pub rejected_at: Option<DateTime<Utc>>,
}

impl OAuthGrant {
    /// Whether an identity with this grant (None: none stored) gets
    /// tokens without an admin: a valid grant holding tokens, or an
    /// app-only identity (`app_only`), which fetches its first on demand.
    /// What `auth status`, the digest and `/metrics` call "valid".
    pub fn usable(grant: Option<&OAuthGrant>, app_only: bool) -> bool {
        match grant {
            Some(g) => g.valid && g.sealed.is_some(),
            None => app_only,
        }
    }
}
