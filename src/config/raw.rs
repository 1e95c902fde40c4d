//! The TOML as written: serde structs that mirror it key for key
//! (unknown keys refused), with the defaults of the keys left out. The
//! validator (`validate.rs`) turns these into the `Config` types.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::Security;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) mailbox: Option<RawMailbox>,
    pub(super) mailboxes: Option<Vec<RawMailbox>>,
    pub(super) smtp: RawSmtp,
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) cases: RawCases,
    #[serde(default)]
    pub(super) calendar: RawCalendar,
    pub(super) tiers: Vec<RawTier>,
    pub(super) repeat_customer: Option<RawRepeat>,
    #[serde(default)]
    pub(super) triggers: Vec<RawTrigger>,
    #[serde(default)]
    pub(super) resolution: RawResolution,
    #[serde(default)]
    pub(super) templates: RawTemplates,
    #[serde(default)]
    pub(super) language: RawLanguage,
    pub(super) digest: Option<RawDigest>,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) cluster: RawCluster,
    #[serde(default)]
    pub(super) oauth2: RawOAuth,
}

/// `[oauth2]`: its own keys, and a table per identity (`[oauth2.m365]`).
/// The identities are read by the validator from `rest` (serde's
/// `flatten` cannot refuse unknown keys and would lose the key's name
/// from its errors): a misspelt key of `[oauth2]` is refused by name.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawOAuth {
    pub(super) key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) alert_to: Vec<String>,
    #[serde(flatten)]
    pub(super) rest: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) provider: String,
    pub(super) tenant: Option<String>,
    pub(super) client_id: String,
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) client_secret_env: Option<String>,
    pub(super) flow: Option<String>,
    pub(super) device_authorization_url: Option<String>,
    pub(super) authorization_url: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) redirect_port: Option<u16>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) node: Option<String>,
    #[serde(default = "default_lease")]
    pub(super) lease: String,
    pub(super) claim: Option<String>,
}

impl Default for RawCluster {
    fn default() -> Self {
        RawCluster {
            node: None,
            lease: default_lease(),
            claim: None,
        }
    }
}

fn default_lease() -> String {
    "15s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDigest {
    pub(super) to: Vec<String>,
    #[serde(default = "default_digest_every")]
    pub(super) every: String,
}

fn default_digest_every() -> String {
    "7d".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRepeat {
    pub(super) cases: u32,
    pub(super) within: String,
    pub(super) tier: String,
    pub(super) unanswered: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrigger {
    #[serde(default)]
    pub(super) phrases: Vec<String>,
    #[serde(default)]
    pub(super) senders: Vec<String>,
    #[serde(default)]
    pub(super) headers: Vec<String>,
    #[serde(default)]
    pub(super) escalate: bool,
    pub(super) priority: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResolution {
    pub(super) auto_resolve_after: Option<String>,
    #[serde(default = "default_reopen")]
    pub(super) reopen_within: String,
    #[serde(default = "default_true")]
    pub(super) survey: bool,
}

impl Default for RawResolution {
    fn default() -> Self {
        RawResolution {
            auto_resolve_after: None,
            reopen_within: default_reopen(),
            survey: true,
        }
    }
}

fn default_reopen() -> String {
    "14d".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeline {
    pub(super) first_response: Option<String>,
    pub(super) follow_up: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMailbox {
    pub(super) host: String,
    pub(super) port: Option<u16>,
    #[serde(default = "default_security")]
    pub(super) security: Security,
    #[serde(default)]
    pub(super) allow_insecure: bool,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) username: String,
    pub(super) password: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    /// "password" (default), "xoauth2" (a token file or command) or
    /// "oauth2" (an `[oauth2.NAME]` identity).
    #[serde(default)]
    pub(super) auth: Option<String>,
    pub(super) oauth_token_file: Option<PathBuf>,
    pub(super) oauth_token_command: Option<String>,
    /// With `auth = "oauth2"`: the identity's name.
    pub(super) oauth2: Option<String>,
    #[serde(default = "default_folder")]
    pub(super) folder: String,
    #[serde(default = "default_poll")]
    pub(super) poll_interval: String,
    #[serde(default = "default_true")]
    pub(super) idle: bool,
    #[serde(default = "default_timeout")]
    pub(super) timeout: String,
    #[serde(default = "default_max_size")]
    pub(super) max_message_size: String,
    pub(super) sent_folder: Option<String>,
    /// Only in `[[mailboxes]]`: the queue's id, From address, escalation
    /// path and SMTP server.
    pub(super) name: Option<String>,
    pub(super) address: Option<String>,
    pub(super) tiers: Option<Vec<String>>,
    pub(super) smtp: Option<RawSmtp>,
    /// The queue's language: its customers' mail when nothing closer
    /// says which.
    pub(super) language: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSmtp {
    pub(super) host: String,
    pub(super) port: Option<u16>,
    #[serde(default = "default_security")]
    pub(super) security: Security,
    #[serde(default)]
    pub(super) allow_insecure: bool,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    /// "password" (default), "xoauth2" (a token file or command) or
    /// "oauth2" (an `[oauth2.NAME]` identity).
    #[serde(default)]
    pub(super) auth: Option<String>,
    pub(super) oauth_token_file: Option<PathBuf>,
    pub(super) oauth_token_command: Option<String>,
    /// With `auth = "oauth2"`: the identity's name.
    pub(super) oauth2: Option<String>,
    /// Required in `[smtp]` unless every queue has an address; refused
    /// in a queue's `smtp` (the queue's address is its From).
    pub(super) from: Option<String>,
    #[serde(default = "default_timeout")]
    pub(super) timeout: String,
    /// Only in `[smtp]`.
    pub(super) confirm_copies: Option<bool>,
    pub(super) confirm_wait: Option<String>,
    pub(super) helo_name: Option<String>,
    pub(super) max_per_connection: Option<u32>,
}

pub(super) fn default_confirm_wait() -> String {
    "5m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) path: PathBuf,
    /// "sled" (default) or "postgres".
    pub(super) engine: Option<String>,
    pub(super) url: Option<String>,
    pub(super) url_env: Option<String>,
    pub(super) url_file: Option<PathBuf>,
    pub(super) security: Option<Security>,
    #[serde(default)]
    pub(super) allow_insecure: bool,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) pool: Option<usize>,
    pub(super) schema: Option<String>,
    #[serde(default = "default_min_free")]
    pub(super) min_free: String,
    #[serde(default = "default_keep_sent")]
    pub(super) keep_sent: String,
}

fn default_min_free() -> String {
    "64MB".into()
}
fn default_keep_sent() -> String {
    "30d".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCases {
    #[serde(default = "default_tag")]
    pub(super) subject_tag: String,
    #[serde(default)]
    pub(super) support_addresses: Vec<String>,
    #[serde(default = "default_limit")]
    pub(super) auto_reply_limit: u32,
    #[serde(default = "default_window")]
    pub(super) auto_reply_window: String,
    #[serde(default = "default_global_limit")]
    pub(super) auto_reply_global_limit: u32,
    pub(super) instance: Option<String>,
    #[serde(default)]
    pub(super) require_dkim_pass: bool,
    pub(super) authserv_id: Option<String>,
}

impl Default for RawCases {
    fn default() -> Self {
        RawCases {
            subject_tag: default_tag(),
            support_addresses: Vec::new(),
            auto_reply_limit: default_limit(),
            auto_reply_window: default_window(),
            auto_reply_global_limit: default_global_limit(),
            instance: None,
            require_dkim_pass: false,
            authserv_id: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCalendar {
    pub(super) timezone: Option<String>,
    #[serde(default)]
    pub(super) hours: Vec<String>,
    #[serde(default)]
    pub(super) holidays: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTier {
    pub(super) name: String,
    #[serde(default)]
    pub(super) staff: Vec<String>,
    #[serde(default)]
    pub(super) forward_to: Vec<String>,
    pub(super) first_response: String,
    pub(super) follow_up: Option<String>,
    pub(super) resolve_within: Option<String>,
    pub(super) warn_before: Option<String>,
    pub(super) renotify: Option<String>,
    #[serde(default)]
    pub(super) priority: BTreeMap<String, RawTimeline>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLanguage {
    pub(super) default: Option<String>,
    pub(super) detect: Option<bool>,
    pub(super) staff: Option<String>,
    /// Customer domain → language.
    #[serde(default)]
    pub(super) domains: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTemplates {
    pub(super) dir: Option<PathBuf>,
    pub(super) ack: Option<PathBuf>,
}

fn default_security() -> Security {
    Security::Tls
}
fn default_folder() -> String {
    "INBOX".into()
}
fn default_poll() -> String {
    "60s".into()
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> String {
    "60s".into()
}
fn default_max_size() -> String {
    "25MB".into()
}
fn default_tag() -> String {
    "Case".into()
}
fn default_limit() -> u32 {
    3
}
fn default_window() -> String {
    "1h".into()
}
fn default_global_limit() -> u32 {
    2000
}

/// Renders a toml/serde error as "key: message (line L, column C)".
pub(super) fn toml_problem(text: &str, key: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end().to_string();
    let at = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!(" (line {line}, column {col})")
        })
        .unwrap_or_default();
    if key.is_empty() || key == "." {
        format!("{msg}{at}")
    } else {
        format!("{key}: {msg}{at}")
    }
}
