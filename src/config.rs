//! The one TOML file admins edit: read into `RawConfig` (serde, unknown
//! keys refused), then validated into `Config`, whose types the rest of
//! the daemon can trust. Every error names the key path, so an admin with
//! a typo is told exactly where to look.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::calendar::{self, Calendar};

use crate::template::{Template, TemplateKind};

/// The config in force. A reload (SIGHUP) swaps it whole; each unit of
/// work (a message, a timer) takes one snapshot, so it never sees half of
/// an old config and half of a new one.
#[derive(Debug)]
pub struct Live(std::sync::RwLock<std::sync::Arc<Config>>);

impl Live {
    pub fn new(config: Config) -> std::sync::Arc<Live> {
        std::sync::Arc::new(Live(std::sync::RwLock::new(std::sync::Arc::new(config))))
    }

    pub fn get(&self) -> std::sync::Arc<Config> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, config: Config) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(config);
    }
}

/// Everything the daemon needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages and relative paths.
    pub source: PathBuf,
    /// The queues: a mailbox each, with its address and escalation path.
    /// A lone `[mailbox]` is the queue `default`.
    pub queues: Queues,
    pub smtp: SmtpConfig,
    pub store: StoreConfig,
    pub cases: CasesConfig,
    pub calendar: CalendarConfig,
    /// Tiers in escalation order; validation guarantees at least one.
    pub tiers: Vec<TierConfig>,
    pub repeat_customer: Option<RepeatConfig>,
    pub triggers: Vec<TriggerConfig>,
    pub resolution: ResolutionConfig,
    pub templates: Templates,
    pub digest: Option<DigestConfig>,
    pub metrics: MetricsConfig,
    pub cluster: ClusterConfig,
}

/// `[cluster]`: how the daemons on one PostgreSQL store share the work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This daemon's name (None: the host name and the pid; `run --node`
    /// overrides both).
    pub node: Option<String>,
    /// How long a mailbox lease lasts without renewal: a dead node's
    /// mailboxes are taken over this long after its last renewal.
    pub lease: Duration,
    /// How long a mail whose sending began belongs to the node sending
    /// it: after that, another node settles it (its confirmation copy,
    /// or a resend).
    pub claim: Duration,
}

/// Connections per process on PostgreSQL by default, and at most.
pub const DEFAULT_POOL: usize = 4;
pub const MAX_POOL: usize = 64;

/// Checks a node name: what the cluster's tables, logs and status show.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("give 1 to 64 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
    {
        return Err(format!("{name:?}: use letters, digits and - _ . : @ only"));
    }
    Ok(())
}

/// The periodic review digest of escalated cases.
#[derive(Debug, Clone)]
pub struct DigestConfig {
    pub to: Vec<String>,
    /// The period: one digest per period, covering it.
    pub every: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where the Prometheus endpoint listens (None: off).
    pub listen: Option<std::net::SocketAddr>,
}

/// How the connection to a server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Implicit TLS from the first byte (IMAPS 993, SMTPS 465).
    Tls,
    /// Plain connection upgraded with STARTTLS; refused if the server
    /// does not offer it, so a stripped capability cannot downgrade us.
    Starttls,
    /// No encryption: loopback only unless `allow_insecure` is set.
    Plain,
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::Tls => "tls",
            Security::Starttls => "starttls",
            Security::Plain => "plain",
        })
    }
}

/// A server endpoint with its credentials, shared by IMAP and SMTP.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub security: Security,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    /// Where the password comes from: read only when a connection is
    /// made, so commands that only read the store need no mail secrets.
    pub password: Option<PasswordSource>,
    /// `mailbox`, `mailboxes[1]`, `smtp`...: names the keys in errors.
    pub section: String,
    /// With `auth = "xoauth2"`: where a fresh access token comes from.
    pub oauth: Option<TokenSource>,
    /// Per-command network timeout, so a silent server cannot hang us.
    pub timeout: Duration,
}

/// Where an OAuth 2 access token is read, at every login, so the admin's
/// tooling can refresh it (tokens live about an hour).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    /// Run with `sh -c`; its standard output is the token.
    Command(String),
}

impl Endpoint {
    /// The keys that set this endpoint's password, for hints: the one
    /// in use (`mailbox.password_file`), or all three when none is.
    pub fn password_keys(&self) -> String {
        match &self.password {
            Some(p) => format!("{}.{}", self.section, p.key()),
            None => format!(
                "{0}.password, {0}.password_env or {0}.password_file",
                self.section
            ),
        }
    }

    /// The longest one SMTP send through this endpoint may take: each
    /// step up to the timeout (connect, TLS, greeting, STARTTLS, login,
    /// the mail transaction), and the token command before a login.
    pub fn longest_send(&self) -> Duration {
        let steps =
            3 + u32::from(self.security != Security::Plain) + u32::from(self.username.is_some());
        let token = if self.oauth.is_some() {
            TOKEN_COMMAND_TIMEOUT
        } else {
            Duration::ZERO
        };
        self.timeout * steps + token
    }
}

/// How long the token command may take before it is killed.
pub const TOKEN_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl TokenSource {
    /// A fresh token. The command runs without blocking the runtime and
    /// is killed after [`TOKEN_COMMAND_TIMEOUT`]; what it prints on
    /// stderr goes to the log (it may hold details of the admin's
    /// tooling), never into the error that is stored with a mail.
    pub async fn token(&self) -> Result<Secret, String> {
        let text = match self {
            TokenSource::File(p) => tokio::fs::read_to_string(p)
                .await
                .map_err(|e| format!("cannot read the OAuth token file {}: {e}", p.display()))?,
            TokenSource::Command(c) => {
                let child = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(c)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot run the OAuth token command: {e}"))?;
                let out = tokio::time::timeout(TOKEN_COMMAND_TIMEOUT, child.wait_with_output())
                    .await
                    .map_err(|_| {
                        format!(
                            "the OAuth token command did not finish within {}s; killed",
                            TOKEN_COMMAND_TIMEOUT.as_secs()
                        )
                    })?
                    .map_err(|e| format!("cannot run the OAuth token command: {e}"))?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if !stderr.trim().is_empty() {
                    tracing::warn!(stderr = %stderr.trim(), "the OAuth token command wrote to stderr");
                }
                if !out.status.success() {
                    return Err(format!(
                        "the OAuth token command failed ({}); its stderr is in the log",
                        out.status
                    ));
                }
                String::from_utf8(out.stdout)
                    .map_err(|_| "the OAuth token command printed non-UTF-8".to_string())?
            }
        };
        let t = text.trim();
        if t.is_empty() {
            return Err("the OAuth token is empty".into());
        }
        Ok(Secret::new(t))
    }

    /// The SASL XOAUTH2 initial response (before base64).
    pub fn xoauth2(user: &str, token: &Secret) -> String {
        format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose())
    }
}

/// Where a password is read from (`password`, `password_env`,
/// `password_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    Inline(Secret),
    Env(String),
    File(PathBuf),
}

impl PasswordSource {
    /// The config key this source was given with.
    pub fn key(&self) -> &'static str {
        match self {
            PasswordSource::Inline(_) => "password",
            PasswordSource::Env(_) => "password_env",
            PasswordSource::File(_) => "password_file",
        }
    }

    /// Reads the password now (environment variable or file).
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            PasswordSource::Inline(s) => Ok(s.clone()),
            PasswordSource::Env(name) => std::env::var(name)
                .map(Secret::new)
                .map_err(|_| format!("environment variable {name} is not set")),
            // A trailing newline from `echo pw > file` is not part of it.
            PasswordSource::File(file) => std::fs::read_to_string(file)
                .map(|v| Secret::new(v.trim_end_matches(['\r', '\n'])))
                .map_err(|e| format!("cannot read {}: {e}", file.display())),
        }
    }
}

impl Endpoint {
    /// The password, read now; the error names its key
    /// (`mailbox.password_env: environment variable X is not set`).
    pub fn password(&self) -> Result<Option<Secret>, String> {
        match &self.password {
            None => Ok(None),
            Some(src) => src
                .read()
                .map(Some)
                .map_err(|e| format!("{}.{}: {e}", self.section, src.key())),
        }
    }
}

/// A password that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The only way to read the secret: grep for `expose` to audit uses.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct MailboxConfig {
    pub endpoint: Endpoint,
    /// The folder customers' mail arrives in.
    pub folder: String,
    /// Polling period when IDLE is off or unsupported, and the longest
    /// we wait before re-checking even with IDLE.
    pub poll_interval: Duration,
    pub idle: bool,
    /// Bigger messages are stored as a stub (headers and size only).
    pub max_message_size: u64,
    /// The folder agents' replies from the shared mailbox land in.
    pub sent_folder: Option<String>,
}

/// The queues of a config: never empty (the only constructor says so),
/// so there is always a first one to fall back to.
#[derive(Debug, Clone)]
pub struct Queues(Vec<QueueConfig>);

impl Queues {
    /// None when there is no queue.
    pub fn new(queues: Vec<QueueConfig>) -> Option<Queues> {
        (!queues.is_empty()).then_some(Queues(queues))
    }

    /// The first queue: it sends mail of no queue when `[smtp]` has no
    /// `from`, and handles cases of a queue since removed.
    pub fn main(&self) -> &QueueConfig {
        &self.0[0]
    }
}

impl std::ops::Deref for Queues {
    type Target = [QueueConfig];
    fn deref(&self) -> &[QueueConfig] {
        &self.0
    }
}

/// A queue: one support address with its own mailbox, sender identity
/// and escalation path. Cases remember their queue by name.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// A short id (`support`, `billing`); `default` for `[mailbox]`.
    pub name: String,
    pub mailbox: MailboxConfig,
    /// The From of every mail sent for the queue's cases: the queue's
    /// `address`, or `[smtp] from`.
    pub from_name: Option<String>,
    pub address: String,
    /// The escalation path: indexes into [`Config::tiers`], in order.
    pub path: Vec<usize>,
    /// The server this queue's mail goes through, when not `[smtp]`.
    pub smtp: Option<Endpoint>,
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub endpoint: Endpoint,
    /// Display name of the support address.
    pub from_name: Option<String>,
    /// The support address: sender of all mail, and never a customer.
    pub from: String,
    /// Bcc every mail to the support address, so that after a crash its
    /// copy proves the server accepted it (exactly-once sending).
    pub confirm_copies: bool,
    /// After a crash mid-send, how long to wait for that copy before
    /// sending again.
    pub confirm_wait: Duration,
    /// The name given in EHLO (None: this host's fully qualified name).
    pub helo_name: Option<String>,
    /// Mails sent over one connection before it is closed and a new one
    /// opened: Exim delivers only the first 10 of a connection at once
    /// and queues the rest for its next queue run.
    pub max_per_connection: u32,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled: the store itself. PostgreSQL: this node's own files (the
    /// sent journal, the control socket).
    pub path: PathBuf,
    pub engine: StoreEngine,
    /// Stop writing while this much of the store's disk is still free.
    pub min_free: u64,
    /// How long the bytes of sent mail are kept (the entry stays), and
    /// the automatic-mail records used for the limits.
    pub keep_sent: Duration,
}

/// Where the store lives.
#[derive(Debug, Clone)]
pub enum StoreEngine {
    /// Embedded, in `path` (the default).
    Sled,
    /// A PostgreSQL database, shared by the nodes of a cluster.
    Postgres {
        /// The connection string (`postgres://...` or `host=... dbname=...`),
        /// a secret read only when connecting.
        url: PasswordSource,
        security: Security,
        allow_insecure: bool,
        ca_file: Option<PathBuf>,
        /// Connections per process: one runs the store's transactions,
        /// the others reads, leases and heartbeats.
        pool: usize,
    },
}

#[derive(Debug, Clone)]
pub struct CasesConfig {
    /// The word in `[Case #42]`.
    pub subject_tag: String,
    /// Addresses that reach the support mailbox besides `smtp.from`;
    /// never treated as customers or participants.
    pub support_addresses: Vec<String>,
    /// At most this many automatic mails per recipient per window: the
    /// last defence against a loop with another robot.
    pub auto_reply_limit: u32,
    pub auto_reply_window: Duration,
    /// At most this many automatic mails per hour to everyone together
    /// (0: no such limit): a flood from many forged senders must not turn
    /// us into a backscatter source. Acks to new cases stop first.
    pub auto_reply_global_limit: u32,
    /// Names this instance in the loop header of every mail we send.
    pub instance: String,
    /// Staff mail must also carry `dkim=pass` for the staff domain in the
    /// receiving server's Authentication-Results.
    pub require_dkim_pass: bool,
    /// The receiving server's authserv-id (RFC 8601), lower-cased: only
    /// Authentication-Results it wrote are read. Required with
    /// `require_dkim_pass`.
    pub authserv_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CalendarConfig {
    pub timezone: chrono_tz::Tz,
    /// Business hours and holidays; 24/7 when no hours are given.
    pub business: Calendar,
}

#[derive(Debug, Clone)]
pub struct TierConfig {
    pub name: String,
    /// Addresses (`agent@x`) and domains (`@x`) whose mail is this
    /// tier's answers.
    pub staff: Vec<String>,
    /// Where escalated cases are forwarded (not needed for the first tier,
    /// whose staff read the support mailbox).
    pub forward_to: Vec<String>,
    /// The default timeline; `priority` overrides it per priority.
    pub timeline: Timeline,
    pub priority: BTreeMap<String, Timeline>,
    /// Total time to resolution, waiting on the customer excluded.
    pub resolve_within: Option<Duration>,
    /// A reminder to the tier this long before the deadline.
    pub warn_before: Option<WarnBefore>,
    /// At the top tier, how often a breached case is re-notified.
    pub renotify: Duration,
}

impl TierConfig {
    /// The timeline for a case of `priority`.
    pub fn timeline(&self, priority: Option<&str>) -> &Timeline {
        priority
            .and_then(|p| self.priority.get(p))
            .unwrap_or(&self.timeline)
    }

    /// Is `addr` one of this tier's staff?
    pub fn is_staff(&self, addr: &str) -> bool {
        let domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        self.staff.iter().any(|s| match s.strip_prefix('@') {
            Some(d) => d == domain,
            None => s == addr,
        })
    }
}

/// How long a case may wait for a staff answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeline {
    /// A new or newly escalated case.
    pub first_response: Duration,
    /// A customer's later message.
    pub follow_up: Duration,
}

/// When to remind a tier of a coming deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarnBefore {
    /// This long before the deadline.
    Before(Duration),
    /// When this percentage of the wait has passed.
    Percent(u8),
}

/// A customer with many cases, or many unanswered messages, starts at
/// (or jumps to) a higher tier.
#[derive(Debug, Clone)]
pub struct RepeatConfig {
    /// The customer's Nth case within `within` ...
    pub cases: u32,
    pub within: Duration,
    /// ... starts at this tier (an index into `tiers`).
    pub tier: usize,
    /// A case with this many customer messages unanswered jumps there.
    pub unanswered: Option<u32>,
}

/// Phrases, senders or headers that escalate a case or set its priority.
#[derive(Debug, Clone)]
pub struct TriggerConfig {
    /// Lower-case phrases, matched in the subject and the new text.
    pub phrases: Vec<String>,
    /// Addresses or `@domains` (VIPs).
    pub senders: Vec<String>,
    /// (lower-case header name, lower-case value) pairs.
    pub headers: Vec<(String, String)>,
    pub escalate: bool,
    pub priority: Option<String>,
}

/// When cases close and what happens after.
#[derive(Debug, Clone)]
pub struct ResolutionConfig {
    /// Resolve after this much customer silence following a staff answer.
    pub auto_resolve_after: Option<Duration>,
    /// A customer reply within this reopens the case; later, a new case.
    pub reopen_within: Duration,
    /// Ask for a 1-5 rating after resolution.
    pub survey: bool,
}

/// The message templates in use, built-in or from files.
#[derive(Debug, Clone)]
pub struct Templates {
    pub ack: Template,
}

/// Everything wrong with a config file, each naming its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {}", .problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

// ---------------------------------------------------------------- raw

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mailbox: Option<RawMailbox>,
    mailboxes: Option<Vec<RawMailbox>>,
    smtp: RawSmtp,
    store: RawStore,
    #[serde(default)]
    cases: RawCases,
    #[serde(default)]
    calendar: RawCalendar,
    tiers: Vec<RawTier>,
    repeat_customer: Option<RawRepeat>,
    #[serde(default)]
    triggers: Vec<RawTrigger>,
    #[serde(default)]
    resolution: RawResolution,
    #[serde(default)]
    templates: RawTemplates,
    digest: Option<RawDigest>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    cluster: RawCluster,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    node: Option<String>,
    #[serde(default = "default_lease")]
    lease: String,
    claim: Option<String>,
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
/// The shortest claim when none is set, and what an unset claim adds to
/// the longest send.
const DEFAULT_CLAIM: Duration = Duration::from_secs(120);
const CLAIM_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDigest {
    to: Vec<String>,
    #[serde(default = "default_digest_every")]
    every: String,
}

fn default_digest_every() -> String {
    "7d".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepeat {
    cases: u32,
    within: String,
    tier: String,
    unanswered: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    #[serde(default)]
    phrases: Vec<String>,
    #[serde(default)]
    senders: Vec<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    escalate: bool,
    priority: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResolution {
    auto_resolve_after: Option<String>,
    #[serde(default = "default_reopen")]
    reopen_within: String,
    #[serde(default = "default_true")]
    survey: bool,
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
struct RawTimeline {
    first_response: Option<String>,
    follow_up: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMailbox {
    host: String,
    port: Option<u16>,
    #[serde(default = "default_security")]
    security: Security,
    #[serde(default)]
    allow_insecure: bool,
    ca_file: Option<PathBuf>,
    username: String,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    /// "password" (default) or "xoauth2".
    #[serde(default)]
    auth: Option<String>,
    oauth_token_file: Option<PathBuf>,
    oauth_token_command: Option<String>,
    #[serde(default = "default_folder")]
    folder: String,
    #[serde(default = "default_poll")]
    poll_interval: String,
    #[serde(default = "default_true")]
    idle: bool,
    #[serde(default = "default_timeout")]
    timeout: String,
    #[serde(default = "default_max_size")]
    max_message_size: String,
    sent_folder: Option<String>,
    /// Only in `[[mailboxes]]`: the queue's id, From address, escalation
    /// path and SMTP server.
    name: Option<String>,
    address: Option<String>,
    tiers: Option<Vec<String>>,
    smtp: Option<RawSmtp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    host: String,
    port: Option<u16>,
    #[serde(default = "default_security")]
    security: Security,
    #[serde(default)]
    allow_insecure: bool,
    ca_file: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    /// "password" (default) or "xoauth2".
    #[serde(default)]
    auth: Option<String>,
    oauth_token_file: Option<PathBuf>,
    oauth_token_command: Option<String>,
    /// Required in `[smtp]` unless every queue has an address; refused
    /// in a queue's `smtp` (the queue's address is its From).
    from: Option<String>,
    #[serde(default = "default_timeout")]
    timeout: String,
    /// Only in `[smtp]`.
    confirm_copies: Option<bool>,
    confirm_wait: Option<String>,
    helo_name: Option<String>,
    max_per_connection: Option<u32>,
}

/// A name an SMTP server takes in EHLO: a domain name or an address
/// literal (RFC 5321 4.1.3).
fn valid_helo_name(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return match inner.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => inner.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn default_confirm_wait() -> String {
    "5m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: PathBuf,
    /// "sled" (default) or "postgres".
    engine: Option<String>,
    url: Option<String>,
    url_env: Option<String>,
    url_file: Option<PathBuf>,
    security: Option<Security>,
    #[serde(default)]
    allow_insecure: bool,
    ca_file: Option<PathBuf>,
    pool: Option<usize>,
    #[serde(default = "default_min_free")]
    min_free: String,
    #[serde(default = "default_keep_sent")]
    keep_sent: String,
}

fn default_min_free() -> String {
    "64MB".into()
}
fn default_keep_sent() -> String {
    "30d".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCases {
    #[serde(default = "default_tag")]
    subject_tag: String,
    #[serde(default)]
    support_addresses: Vec<String>,
    #[serde(default = "default_limit")]
    auto_reply_limit: u32,
    #[serde(default = "default_window")]
    auto_reply_window: String,
    #[serde(default = "default_global_limit")]
    auto_reply_global_limit: u32,
    instance: Option<String>,
    #[serde(default)]
    require_dkim_pass: bool,
    authserv_id: Option<String>,
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
struct RawCalendar {
    timezone: Option<String>,
    #[serde(default)]
    hours: Vec<String>,
    #[serde(default)]
    holidays: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    name: String,
    #[serde(default)]
    staff: Vec<String>,
    #[serde(default)]
    forward_to: Vec<String>,
    first_response: String,
    follow_up: Option<String>,
    resolve_within: Option<String>,
    warn_before: Option<String>,
    renotify: Option<String>,
    #[serde(default)]
    priority: BTreeMap<String, RawTimeline>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplates {
    ack: Option<PathBuf>,
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

// ---------------------------------------------------------- loading

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; `path` anchors relative paths and messages.
    /// Secrets are not read here: see [`Config::secret_problems`].
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |problems: Vec<String>| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        };
        let raw: RawConfig = {
            let de = toml::Deserializer::parse(text)
                .map_err(|e| invalid(vec![toml_problem(text, "", &e)]))?;
            serde_path_to_error::deserialize(de)
                .map_err(|e| {
                    let key = e.path().to_string();
                    vec![toml_problem(text, &key, e.inner())]
                })
                .map_err(invalid)?
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let mut v = Validator {
            problems: Vec::new(),
            base,
        };
        let config = v.config(raw, path);
        match config {
            Some(c) if v.problems.is_empty() => Ok(c),
            _ => Err(invalid(v.problems)),
        }
    }

    /// Secrets that cannot be read now (unset variables, unreadable
    /// files), each naming its key. `run` refuses to start with any;
    /// commands that only read the store never need them.
    pub fn secret_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let endpoints = self
            .queues
            .iter()
            .flat_map(|q| std::iter::once(&q.mailbox.endpoint).chain(q.smtp.as_ref()))
            .chain([&self.smtp.endpoint]);
        if let StoreEngine::Postgres { url, .. } = &self.store.engine {
            if let Err(e) = url.read() {
                let key = match url {
                    PasswordSource::Inline(_) => "url",
                    PasswordSource::Env(_) => "url_env",
                    PasswordSource::File(_) => "url_file",
                };
                out.push(format!("store.{key}: {e}"));
            }
        }
        for ep in endpoints {
            if let Err(e) = ep.password() {
                out.push(e);
            }
            if let Some(TokenSource::File(p)) = &ep.oauth {
                if let Err(e) = std::fs::metadata(p) {
                    out.push(format!(
                        "{}.oauth_token_file: cannot read {}: {e}",
                        ep.section,
                        p.display()
                    ));
                }
            }
        }
        out
    }

    /// Every support address (each queue's, `[smtp] from`, the
    /// aliases), lower-case: never a customer, never a participant.
    pub fn support_addresses(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        let own = self
            .queues
            .iter()
            .map(|q| q.address.as_str())
            .chain([self.smtp.from.as_str()]);
        for a in own.chain(self.cases.support_addresses.iter().map(String::as_str)) {
            let a = a.to_lowercase();
            if !a.is_empty() && !all.contains(&a) {
                all.push(a);
            }
        }
        all
    }

    /// The names of the tiers and of the queues, in config order.
    pub fn names(&self) -> (Vec<String>, Vec<String>) {
        (
            self.tiers.iter().map(|t| t.name.clone()).collect(),
            self.queues.iter().map(|q| q.name.clone()).collect(),
        )
    }

    /// Is this one of the queues' own addresses (the From of our mail)?
    pub fn is_queue_address(&self, addr: &str) -> bool {
        self.queues
            .iter()
            .any(|q| q.address.eq_ignore_ascii_case(addr))
    }

    /// The longest one mail may take to send, through any queue's SMTP
    /// server, with the wait for its confirmation copy when copies are
    /// on (see `cluster.claim`).
    pub fn longest_send(&self) -> Duration {
        let servers = std::iter::once(&self.smtp.endpoint)
            .chain(self.queues.iter().filter_map(|q| q.smtp.as_ref()));
        let send = servers
            .map(Endpoint::longest_send)
            .max()
            .unwrap_or_default();
        if self.smtp.confirm_copies {
            send + self.smtp.confirm_wait
        } else {
            send
        }
    }

    /// The queue a case of queue `name` is handled by: the first queue
    /// when the config no longer has one of that name.
    pub fn queue(&self, name: &str) -> &QueueConfig {
        self.queues
            .iter()
            .find(|q| q.name == name)
            .unwrap_or_else(|| self.queues.main())
    }

    /// The address mail not of any queue (the digest) is sent from.
    pub fn main_sender(&self) -> (Option<&str>, &str) {
        if self.smtp.from.is_empty() {
            let q = self.queues.main();
            (q.from_name.as_deref(), &q.address)
        } else {
            (self.smtp.from_name.as_deref(), &self.smtp.from)
        }
    }

    /// The domain of the main address, for our Message-IDs.
    pub fn support_domain(&self) -> &str {
        self.main_sender()
            .1
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or("localhost")
    }

    /// A short summary for `check-config`; never prints secrets.
    pub fn summary(&self) -> String {
        let ep = |e: &Endpoint| {
            format!(
                "{}:{} ({}{})",
                e.host,
                e.port,
                e.security,
                if e.oauth.is_some() {
                    ", xoauth2"
                } else if e.password.is_some() {
                    ", password set"
                } else {
                    ""
                }
            )
        };
        let mut s = format!("config {} is valid\n  queues:", self.source.display());
        for q in self.queues.iter() {
            let path: Vec<&str> = q
                .path
                .iter()
                .map(|&i| self.tiers[i].name.as_str())
                .collect();
            s.push_str(&format!(
                "\n    {}: {} folder {} as {}, from {}, path {}{}",
                q.name,
                ep(&q.mailbox.endpoint),
                q.mailbox.folder,
                q.mailbox.endpoint.username.as_deref().unwrap_or("-"),
                q.address,
                path.join(" → "),
                q.smtp
                    .as_ref()
                    .map(|e| format!(", smtp {}", ep(e)))
                    .unwrap_or_default(),
            ));
        }
        s.push_str(&format!(
            "\n  smtp:    {} from {}\n  store:   {}\n  tiers:   ",
            ep(&self.smtp.endpoint),
            if self.smtp.from.is_empty() {
                "(each queue's address)"
            } else {
                &self.smtp.from
            },
            match &self.store.engine {
                StoreEngine::Sled => format!("sled in {}", self.store.path.display()),
                StoreEngine::Postgres {
                    url,
                    security,
                    pool,
                    ..
                } =>
                    format!(
                    "postgres (url from {}, {security}, {pool} connections), node files in {}\n  \
                     cluster: node {}, lease {}, claim {}",
                    url.key().replace("password", "url"),
                    self.store.path.display(),
                    self.cluster.node.as_deref().unwrap_or("(host name and pid)"),
                    humantime::format_duration(self.cluster.lease),
                    humantime::format_duration(self.cluster.claim),
                ),
            },
        ));
        let tiers: Vec<String> = self
            .tiers
            .iter()
            .map(|t| {
                format!(
                    "{} (first response {})",
                    t.name,
                    humantime::format_duration(t.timeline.first_response)
                )
            })
            .collect();
        s.push_str(&tiers.join(" → "));
        s.push_str(&format!("\n  timezone: {}", self.calendar.timezone));
        if let Some(d) = &self.digest {
            s.push_str(&format!(
                "\n  digest:  every {} to {}",
                humantime::format_duration(d.every),
                d.to.join(", ")
            ));
        }
        if let Some(l) = self.metrics.listen {
            s.push_str(&format!("\n  metrics: http://{l}/metrics"));
        }
        s
    }
}

/// Renders a toml/serde error as "key: message (line L, column C)".
fn toml_problem(text: &str, key: &str, e: &toml::de::Error) -> String {
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

struct Validator<'a> {
    problems: Vec<String>,
    base: &'a Path,
}

impl Validator<'_> {
    fn problem(&mut self, key: &str, msg: impl fmt::Display) {
        self.problems.push(format!("{key}: {msg}"));
    }

    fn duration(&mut self, key: &str, text: &str) -> Duration {
        match parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.problem(key, e);
                Duration::ZERO
            }
        }
    }

    /// Lower-cased addresses; with `domains`, `@domain` entries too.
    fn addresses(&mut self, key: &str, list: &[String], domains: bool) -> Vec<String> {
        let mut out = Vec::new();
        for (i, a) in list.iter().enumerate() {
            let a = a.trim();
            if domains && a.starts_with('@') && a.len() > 1 && !a[1..].contains('@') {
                out.push(a.to_lowercase());
                continue;
            }
            match parse_mailbox(a) {
                Some((_, addr)) => out.push(addr),
                None => self.problem(&format!("{key}[{i}]"), format!("{a:?} is not an address")),
            }
        }
        out
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn endpoint(
        &mut self,
        section: &str,
        host: String,
        port: Option<u16>,
        security: Security,
        allow_insecure: bool,
        ca_file: Option<PathBuf>,
        username: Option<String>,
        secret: (Option<String>, Option<String>, Option<PathBuf>),
        timeout: &str,
        default_ports: (u16, u16),
    ) -> Endpoint {
        if host.trim().is_empty() {
            self.problem(&format!("{section}.host"), "must not be empty");
        }
        if security == Security::Plain && !allow_insecure && !is_loopback(&host) {
            self.problem(
                &format!("{section}.security"),
                format!(
                    "\"plain\" sends passwords and mail unencrypted; refused for \
                     non-loopback host {host:?} unless {section}.allow_insecure = true"
                ),
            );
        }
        let ca_file = ca_file.map(|p| self.path(&p));
        if let Some(p) = &ca_file {
            if !p.is_file() {
                self.problem(
                    &format!("{section}.ca_file"),
                    format!("no such file {}", p.display()),
                );
            }
        }
        let password = self.secret(section, secret);
        let port = port.unwrap_or(match security {
            Security::Tls => default_ports.0,
            _ => default_ports.1,
        });
        Endpoint {
            host,
            port,
            security,
            ca_file,
            username,
            password,
            section: section.to_string(),
            oauth: None,
            timeout: self.duration(&format!("{section}.timeout"), timeout),
        }
    }

    /// Checks `auth` and the OAuth token source of a section.
    fn oauth(
        &mut self,
        section: &str,
        mut ep: Endpoint,
        auth: Option<String>,
        file: Option<PathBuf>,
        command: Option<String>,
    ) -> Endpoint {
        let source = match (file, command) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{section}.oauth_token_file"),
                    "give only one of oauth_token_file, oauth_token_command",
                );
                None
            }
            (Some(f), None) => Some(TokenSource::File(self.path(&f))),
            (None, Some(c)) if !c.trim().is_empty() => Some(TokenSource::Command(c)),
            (None, Some(_)) => {
                self.problem(
                    &format!("{section}.oauth_token_command"),
                    "must not be empty",
                );
                None
            }
            (None, None) => None,
        };
        match auth.as_deref().unwrap_or("password") {
            "password" => {
                if source.is_some() {
                    self.problem(
                        &format!("{section}.auth"),
                        "an OAuth token source is set: write auth = \"xoauth2\"",
                    );
                }
            }
            "xoauth2" => {
                if ep.username.is_none() {
                    self.problem(&format!("{section}.username"), "XOAUTH2 needs the username");
                }
                match source {
                    Some(s) => ep.oauth = Some(s),
                    None => self.problem(
                        &format!("{section}.auth"),
                        "xoauth2 needs oauth_token_file or oauth_token_command",
                    ),
                }
            }
            other => self.problem(
                &format!("{section}.auth"),
                format!("unknown {other:?}; write \"password\" or \"xoauth2\""),
            ),
        }
        ep
    }

    fn secret(
        &mut self,
        section: &str,
        (plain, env_name, file): (Option<String>, Option<String>, Option<PathBuf>),
    ) -> Option<PasswordSource> {
        let given = [plain.is_some(), env_name.is_some(), file.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if given > 1 {
            self.problem(
                &format!("{section}.password"),
                "give only one of password, password_env, password_file",
            );
            return None;
        }
        if let Some(p) = plain {
            return Some(PasswordSource::Inline(Secret::new(p)));
        }
        if let Some(name) = env_name {
            if name.trim().is_empty() {
                self.problem(&format!("{section}.password_env"), "must not be empty");
            }
            return Some(PasswordSource::Env(name));
        }
        file.map(|f| PasswordSource::File(self.path(&f)))
    }

    /// An SMTP server's connection keys (`[smtp]`, or a queue's `smtp`).
    fn smtp_endpoint(&mut self, section: &str, s: RawSmtp) -> Endpoint {
        let ep = self.endpoint(
            section,
            s.host,
            s.port,
            s.security,
            s.allow_insecure,
            s.ca_file,
            s.username,
            (s.password, s.password_env, s.password_file),
            &s.timeout,
            (465, 587),
        );
        self.oauth(
            section,
            ep,
            s.auth,
            s.oauth_token_file,
            s.oauth_token_command,
        )
    }

    /// `"Name <addr>"` or `addr` under `key`.
    fn address(&mut self, key: &str, text: &str) -> (Option<String>, String) {
        match parse_mailbox(text) {
            Some(x) => x,
            None => {
                self.problem(
                    key,
                    format!("{text:?} is not an address; write \"Support <support@example.com>\""),
                );
                (None, String::new())
            }
        }
    }

    /// `[store] engine` and its connection keys.
    fn store_engine(&mut self, s: &RawStore) -> StoreEngine {
        let postgres_only = [
            ("url", s.url.is_some()),
            ("url_env", s.url_env.is_some()),
            ("url_file", s.url_file.is_some()),
            ("security", s.security.is_some()),
            ("ca_file", s.ca_file.is_some()),
            ("allow_insecure", s.allow_insecure),
            ("pool", s.pool.is_some()),
        ];
        match s.engine.as_deref().unwrap_or("sled") {
            "sled" => {
                for (k, set) in postgres_only {
                    if set {
                        self.problem(&format!("store.{k}"), "only with engine = \"postgres\"");
                    }
                }
                StoreEngine::Sled
            }
            "postgres" => {
                let given = [s.url.is_some(), s.url_env.is_some(), s.url_file.is_some()]
                    .iter()
                    .filter(|b| **b)
                    .count();
                if given != 1 {
                    self.problem(
                        "store.url",
                        "engine = \"postgres\" needs exactly one of url_env (an environment \
                         variable), url_file (a file holding it) or url",
                    );
                }
                let url = match (&s.url, &s.url_env, &s.url_file) {
                    (_, Some(env), _) => PasswordSource::Env(env.clone()),
                    (_, _, Some(file)) => PasswordSource::File(self.path(file)),
                    (Some(u), _, _) => PasswordSource::Inline(Secret::new(u.clone())),
                    _ => PasswordSource::Env(String::new()),
                };
                let ca_file = s.ca_file.as_ref().map(|p| self.path(p));
                if let Some(p) = &ca_file {
                    if !p.is_file() {
                        self.problem("store.ca_file", format!("no such file {}", p.display()));
                    }
                }
                let pool = s.pool.unwrap_or(DEFAULT_POOL);
                if !(crate::store::MIN_POOL..=MAX_POOL).contains(&pool) {
                    self.problem(
                        "store.pool",
                        format!(
                            "{pool} connections: give {} to {MAX_POOL} (one runs the store's \
                             transactions, the others reads and the cluster's leases)",
                            crate::store::MIN_POOL
                        ),
                    );
                }
                StoreEngine::Postgres {
                    url,
                    security: s.security.unwrap_or(Security::Tls),
                    allow_insecure: s.allow_insecure,
                    ca_file,
                    pool,
                }
            }
            other => {
                self.problem(
                    "store.engine",
                    format!("{other:?} is not an engine: \"sled\" (the default) or \"postgres\""),
                );
                StoreEngine::Sled
            }
        }
    }

    /// The queues from `[mailbox]` (one, `default`) or `[[mailboxes]]`.
    fn queues(
        &mut self,
        single: Option<RawMailbox>,
        several: Option<Vec<RawMailbox>>,
        tiers: &[TierConfig],
        smtp_from: (&Option<String>, &String),
    ) -> Vec<QueueConfig> {
        let raw: Vec<(String, RawMailbox)> = match (single, several) {
            (Some(_), Some(_)) => {
                self.problem(
                    "mailboxes",
                    "give either one [mailbox] or [[mailboxes]], not both \
                     ([mailbox] is the same as one [[mailboxes]] named \"default\")",
                );
                return Vec::new();
            }
            (Some(m), None) => {
                let only_in_list = [
                    ("name", m.name.is_some()),
                    ("address", m.address.is_some()),
                    ("tiers", m.tiers.is_some()),
                    ("smtp", m.smtp.is_some()),
                ];
                for (k, set) in only_in_list {
                    if set {
                        self.problem(
                            &format!("mailbox.{k}"),
                            "only in [[mailboxes]]: [mailbox] is the one queue \"default\", \
                             sending from [smtp] from",
                        );
                    }
                }
                vec![("mailbox".to_string(), m)]
            }
            (None, Some(list)) => {
                if list.is_empty() {
                    self.problem("mailboxes", "at least one [[mailboxes]] is needed");
                }
                list.into_iter()
                    .enumerate()
                    .map(|(i, m)| (format!("mailboxes[{i}]"), m))
                    .collect()
            }
            (None, None) => {
                self.problem(
                    "mailbox",
                    "missing: give [mailbox], or one [[mailboxes]] per support address",
                );
                return Vec::new();
            }
        };
        let mut queues: Vec<QueueConfig> = Vec::new();
        for (key, m) in raw {
            let q = self.queue(&key, m, tiers, smtp_from);
            if queues.iter().any(|o| o.name == q.name) {
                self.problem(
                    &format!("{key}.name"),
                    format!("queue {:?} is defined twice", q.name),
                );
            }
            if let Some(o) = queues
                .iter()
                .find(|o| !q.address.is_empty() && o.address.eq_ignore_ascii_case(&q.address))
            {
                self.problem(
                    &format!("{key}.address"),
                    format!("{} is already the address of queue {:?}", q.address, o.name),
                );
            }
            let same_folder = |o: &QueueConfig| {
                let (a, b) = (&o.mailbox, &q.mailbox);
                a.endpoint.host.eq_ignore_ascii_case(&b.endpoint.host)
                    && a.endpoint.port == b.endpoint.port
                    && a.endpoint.username == b.endpoint.username
                    && a.folder == b.folder
            };
            if let Some(o) = queues.iter().find(|o| same_folder(o)) {
                self.problem(
                    &key,
                    format!(
                        "watches the same folder as queue {:?}: each message would be read twice",
                        o.name
                    ),
                );
            }
            queues.push(q);
        }
        queues
    }

    /// One queue: its mailbox and what it adds to it.
    fn queue(
        &mut self,
        key: &str,
        mut m: RawMailbox,
        tiers: &[TierConfig],
        (smtp_from_name, smtp_from): (&Option<String>, &String),
    ) -> QueueConfig {
        let name = match (&m.name, key) {
            (_, "mailbox") => "default".to_string(),
            (None, _) => {
                self.problem(
                    &format!("{key}.name"),
                    "missing: a short id for the queue, like \"billing\"",
                );
                String::new()
            }
            (Some(n), _) => {
                let ok = !n.is_empty()
                    && n.len() <= 32
                    && n.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
                    });
                if !ok {
                    self.problem(
                        &format!("{key}.name"),
                        format!("{n:?}: use up to 32 lower-case letters, digits, - or _"),
                    );
                }
                n.clone()
            }
        };
        let (from_name, address) = match &m.address {
            Some(a) => self.address(&format!("{key}.address"), a),
            None => (smtp_from_name.clone(), smtp_from.clone()),
        };
        let path = match &m.tiers {
            None => (0..tiers.len()).collect(),
            Some(names) => {
                if names.is_empty() {
                    self.problem(&format!("{key}.tiers"), "name at least one tier");
                }
                let mut path = Vec::new();
                for (j, n) in names.iter().enumerate() {
                    match tiers.iter().position(|t| &t.name == n) {
                        Some(i) if path.contains(&i) => self.problem(
                            &format!("{key}.tiers[{j}]"),
                            format!("tier {n:?} is named twice"),
                        ),
                        Some(i) => path.push(i),
                        None => {
                            let known: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
                            self.problem(
                                &format!("{key}.tiers[{j}]"),
                                format!(
                                    "no tier named {n:?} (the [[tiers]] are: {})",
                                    known.join(", ")
                                ),
                            );
                        }
                    }
                }
                path
            }
        };
        let smtp = m.smtp.take().map(|mut s| {
            let k = format!("{key}.smtp");
            for (field, set) in [
                ("from", s.from.take().is_some()),
                ("confirm_copies", s.confirm_copies.is_some()),
                ("confirm_wait", s.confirm_wait.is_some()),
                ("helo_name", s.helo_name.is_some()),
                ("max_per_connection", s.max_per_connection.is_some()),
            ] {
                if set {
                    self.problem(
                        &format!("{k}.{field}"),
                        "not here: the queue's address is its From, and \
                         confirmation copies and the SMTP session settings \
                         are set in [smtp] for every server",
                    );
                }
            }
            self.smtp_endpoint(&k, s)
        });
        let mailbox = self.mailbox(key, m);
        QueueConfig {
            name,
            mailbox,
            from_name,
            address,
            path,
            smtp,
        }
    }

    /// A queue's IMAP settings.
    fn mailbox(&mut self, key: &str, m: RawMailbox) -> MailboxConfig {
        let endpoint = self.endpoint(
            key,
            m.host,
            m.port,
            m.security,
            m.allow_insecure,
            m.ca_file,
            Some(m.username),
            (m.password, m.password_env, m.password_file),
            &m.timeout,
            (993, 143),
        );
        let endpoint = self.oauth(
            key,
            endpoint,
            m.auth,
            m.oauth_token_file,
            m.oauth_token_command,
        );
        if endpoint.password.is_none() && endpoint.oauth.is_none() {
            self.problem(
                &format!("{key}.password"),
                "IMAP needs a password (password_env, password_file or password) or auth = \"xoauth2\" with a token source",
            );
        }
        let poll_interval = self.duration(&format!("{key}.poll_interval"), &m.poll_interval);
        if poll_interval < Duration::from_secs(1) && parse_duration(&m.poll_interval).is_ok() {
            self.problem(&format!("{key}.poll_interval"), "must be at least 1s");
        }
        let max_message_size = match parse_size(&m.max_message_size) {
            Ok(n) => n,
            Err(e) => {
                self.problem(&format!("{key}.max_message_size"), e);
                0
            }
        };
        MailboxConfig {
            endpoint,
            folder: m.folder,
            poll_interval,
            idle: m.idle,
            max_message_size,
            sent_folder: m.sent_folder,
        }
    }

    fn config(&mut self, raw: RawConfig, source: &Path) -> Option<Config> {
        let mut s = raw.smtp;
        let confirm_copies = s.confirm_copies.unwrap_or(true);
        let confirm_wait = self.duration(
            "smtp.confirm_wait",
            &s.confirm_wait.clone().unwrap_or_else(default_confirm_wait),
        );
        let raw_from = s.from.take();
        let helo_name = s.helo_name.take();
        if let Some(h) = &helo_name {
            if !valid_helo_name(h) {
                self.problem(
                    "smtp.helo_name",
                    format!(
                        "{h:?} is not a host name (letters, digits, '-' and '.', like \
                         \"mail.example.com\") or an address literal (\"[192.0.2.1]\")"
                    ),
                );
            }
        }
        let max_per_connection = s.max_per_connection.unwrap_or(10);
        if max_per_connection == 0 {
            self.problem("smtp.max_per_connection", "must be at least 1");
        }
        let smtp_endpoint = self.smtp_endpoint("smtp", s);
        let (from_name, from) = match &raw_from {
            Some(f) => self.address("smtp.from", f),
            None => (None, String::new()),
        };

        let c = raw.cases;
        if c.subject_tag.trim().is_empty()
            || !c
                .subject_tag
                .chars()
                .all(|ch| ch.is_alphanumeric() || ch == '-' || ch == '_')
        {
            self.problem(
                "cases.subject_tag",
                "must be a single word of letters, digits, - or _",
            );
        }
        let mut support_addresses = Vec::new();
        for (i, a) in c.support_addresses.iter().enumerate() {
            match parse_mailbox(a) {
                Some((_, addr)) => support_addresses.push(addr),
                None => self.problem(
                    &format!("cases.support_addresses[{i}]"),
                    format!("{a:?} is not an address"),
                ),
            }
        }
        let auto_reply_window = self.duration("cases.auto_reply_window", &c.auto_reply_window);
        let instance = c.instance.clone();
        let authserv_id = c
            .authserv_id
            .as_deref()
            .map(|a| a.trim().to_ascii_lowercase())
            .filter(|a| !a.is_empty());
        if let Some(a) = &authserv_id {
            if a.contains(|ch: char| ch.is_whitespace() || ch == ';') {
                self.problem(
                    "cases.authserv_id",
                    format!("{a:?} is not an authserv-id (one token, like \"mx.example.com\")"),
                );
            }
        }
        if c.require_dkim_pass && authserv_id.is_none() {
            self.problem(
                "cases.authserv_id",
                "required when cases.require_dkim_pass = true: the authserv-id your receiving \
                 server writes in its Authentication-Results headers (often its host name); \
                 results from anyone else are not trusted",
            );
        }
        if instance
            .as_deref()
            .is_some_and(|i| i.chars().any(|ch| ch.is_control()))
        {
            self.problem("cases.instance", "must not contain control characters");
        }

        let timezone = match raw.calendar.timezone.as_deref() {
            None => chrono_tz::UTC,
            Some(name) => {
                match name.parse::<chrono_tz::Tz>() {
                    Ok(tz) => tz,
                    Err(_) => {
                        self.problem(
                        "calendar.timezone",
                        format!("unknown time zone {name:?}; use an IANA name like \"Europe/Berlin\""),
                    );
                        chrono_tz::UTC
                    }
                }
            }
        };

        let mut business = Calendar::always(timezone);
        if !raw.calendar.hours.is_empty() {
            let mut week: [Vec<(chrono::NaiveTime, chrono::NaiveTime)>; 7] = Default::default();
            for (i, h) in raw.calendar.hours.iter().enumerate() {
                match calendar::parse_hours(h) {
                    Ok((days, ranges)) => {
                        for d in days {
                            week[d].extend(ranges.iter().copied());
                        }
                    }
                    Err(e) => self.problem(&format!("calendar.hours[{i}]"), e),
                }
            }
            business.hours = Some(week);
        }
        for (i, d) in raw.calendar.holidays.iter().enumerate() {
            match d.parse::<chrono::NaiveDate>() {
                Ok(d) => {
                    business.holidays.insert(d);
                }
                Err(_) => self.problem(
                    &format!("calendar.holidays[{i}]"),
                    format!("{d:?} is not a date; write YYYY-MM-DD"),
                ),
            }
        }
        if raw.tiers.is_empty() {
            self.problem("tiers", "at least one [[tiers]] is needed");
        }
        let mut tiers = Vec::new();
        let n_tiers = raw.tiers.len();
        for (i, t) in raw.tiers.into_iter().enumerate() {
            let key = format!("tiers[{i}]");
            if t.name.trim().is_empty() {
                self.problem(&format!("{key}.name"), "must not be empty");
            }
            if tiers.iter().any(|x: &TierConfig| x.name == t.name) {
                self.problem(
                    &format!("{key}.name"),
                    format!("tier {:?} is defined twice", t.name),
                );
            }
            let first_response = self.duration(&format!("{key}.first_response"), &t.first_response);
            let follow_up = match &t.follow_up {
                Some(f) => self.duration(&format!("{key}.follow_up"), f),
                None => first_response,
            };
            let timeline = Timeline {
                first_response,
                follow_up,
            };
            let mut priority = BTreeMap::new();
            for (name, p) in t.priority {
                let pk = format!("{key}.priority.{name}");
                let tl = Timeline {
                    first_response: match &p.first_response {
                        Some(f) => self.duration(&format!("{pk}.first_response"), f),
                        None => timeline.first_response,
                    },
                    follow_up: match &p.follow_up {
                        Some(f) => self.duration(&format!("{pk}.follow_up"), f),
                        None => timeline.follow_up,
                    },
                };
                priority.insert(name.to_lowercase(), tl);
            }
            let staff = self.addresses(&format!("{key}.staff"), &t.staff, true);
            let forward_to = self.addresses(&format!("{key}.forward_to"), &t.forward_to, false);
            let warn_before = t.warn_before.as_deref().map(|w| {
                let wk = format!("{key}.warn_before");
                match w.trim().strip_suffix('%') {
                    Some(p) => match p.trim().parse::<u8>() {
                        Ok(p) if (1..100).contains(&p) => WarnBefore::Percent(p),
                        _ => {
                            self.problem(&wk, format!("{w:?}: a percentage from 1% to 99%"));
                            WarnBefore::Percent(80)
                        }
                    },
                    None => WarnBefore::Before(self.duration(&wk, w)),
                }
            });
            let resolve_within = t
                .resolve_within
                .as_deref()
                .map(|r| self.duration(&format!("{key}.resolve_within"), r));
            let renotify = match &t.renotify {
                Some(r) => self.duration(&format!("{key}.renotify"), r),
                None => first_response,
            };
            if renotify < Duration::from_secs(1) && i + 1 == n_tiers {
                self.problem(&format!("{key}.renotify"), "must be at least 1s");
            }
            tiers.push(TierConfig {
                name: t.name,
                staff,
                forward_to,
                timeline,
                priority,
                resolve_within,
                warn_before,
                renotify,
            });
        }
        let tier_index = |name: &str| tiers.iter().position(|t| t.name == name);
        let repeat_customer = match raw.repeat_customer {
            None => None,
            Some(r) => {
                let within = self.duration("repeat_customer.within", &r.within);
                if r.cases < 1 {
                    self.problem("repeat_customer.cases", "must be at least 1");
                }
                match tier_index(&r.tier) {
                    Some(tier) => Some(RepeatConfig {
                        cases: r.cases,
                        within,
                        tier,
                        unanswered: r.unanswered,
                    }),
                    None => {
                        self.problem(
                            "repeat_customer.tier",
                            format!("no tier named {:?}", r.tier),
                        );
                        None
                    }
                }
            }
        };
        let digest = match raw.digest {
            None => None,
            Some(d) => {
                let to = self.addresses("digest.to", &d.to, false);
                if d.to.is_empty() {
                    self.problem("digest.to", "give at least one address");
                }
                let every = self.duration("digest.every", &d.every);
                if every < Duration::from_secs(60) && !every.is_zero() {
                    self.problem("digest.every", "must be at least 1m");
                }
                Some(DigestConfig { to, every })
            }
        };
        let metrics = MetricsConfig {
            listen: match raw.metrics.listen.as_deref() {
                None | Some("") => None,
                Some(text) => match text.parse::<std::net::SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.problem(
                            "metrics.listen",
                            format!("{text:?} is not an address:port such as \"127.0.0.1:9187\""),
                        );
                        None
                    }
                },
            },
        };
        let cluster = self.cluster(&raw.cluster);
        let mut triggers = Vec::new();
        for (i, t) in raw.triggers.into_iter().enumerate() {
            let key = format!("triggers[{i}]");
            if t.phrases.is_empty() && t.senders.is_empty() && t.headers.is_empty() {
                self.problem(&key, "give phrases, senders or headers");
            }
            if !t.escalate && t.priority.is_none() {
                self.problem(
                    &key,
                    "say what it does: escalate = true, or priority = \"...\"",
                );
            }
            let mut headers = Vec::new();
            for (j, h) in t.headers.iter().enumerate() {
                match h.split_once(':') {
                    Some((n, v)) if !n.trim().is_empty() => {
                        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase()))
                    }
                    _ => self.problem(
                        &format!("{key}.headers[{j}]"),
                        format!("{h:?}: write \"Name: value\", like \"Importance: high\""),
                    ),
                }
            }
            if let Some(p) = &t.priority {
                if p.trim().is_empty() {
                    self.problem(&format!("{key}.priority"), "must not be empty");
                }
            }
            triggers.push(TriggerConfig {
                phrases: t
                    .phrases
                    .iter()
                    .map(|p| p.to_lowercase())
                    .filter(|p| !p.trim().is_empty())
                    .collect(),
                senders: self.addresses(&format!("{key}.senders"), &t.senders, true),
                headers,
                escalate: t.escalate,
                priority: t.priority.map(|p| p.to_lowercase()),
            });
        }
        let res = raw.resolution;
        let resolution = ResolutionConfig {
            auto_resolve_after: res
                .auto_resolve_after
                .as_deref()
                .map(|d| self.duration("resolution.auto_resolve_after", d)),
            reopen_within: self.duration("resolution.reopen_within", &res.reopen_within),
            survey: res.survey,
        };

        let ack = match raw.templates.ack {
            None => Template::builtin(TemplateKind::Ack),
            Some(p) => {
                let p = self.path(&p);
                match std::fs::read_to_string(&p) {
                    Ok(text) => match Template::parse(TemplateKind::Ack, &text) {
                        Ok(t) => t,
                        Err(e) => {
                            self.problem("templates.ack", format!("{}: {e}", p.display()));
                            Template::builtin(TemplateKind::Ack)
                        }
                    },
                    Err(e) => {
                        self.problem("templates.ack", format!("cannot read {}: {e}", p.display()));
                        Template::builtin(TemplateKind::Ack)
                    }
                }
            }
        };

        let queues = self.queues(raw.mailbox, raw.mailboxes, &tiers, (&from_name, &from));
        // None (no queue) was refused above, naming the key.
        let queues = Queues::new(queues)?;
        // A tier a case can be escalated to (above the first of some
        // queue's path) needs somewhere to send the case.
        let mut reached: Vec<usize> = queues
            .iter()
            .flat_map(|q| q.path.iter().skip(1).copied())
            .collect();
        reached.sort_unstable();
        reached.dedup();
        for i in reached {
            if tiers[i].forward_to.is_empty() {
                self.problem(
                    &format!("tiers[{i}].forward_to"),
                    "a tier above the first needs forward_to: where its escalated cases are sent",
                );
            }
        }
        if raw_from.is_none() && queues.iter().any(|q| q.address.is_empty()) {
            self.problem(
                "smtp.from",
                "missing: the From of mail for queues without an address \
                 (write \"Support <support@example.com>\")",
            );
        }
        // The loop header names this installation: the main address by
        // default.
        let instance = instance
            .or_else(|| Some(from.clone()).filter(|f| !f.is_empty()))
            .unwrap_or_else(|| queues.main().address.clone());

        let mut config = Config {
            source: source.to_owned(),
            queues,
            smtp: SmtpConfig {
                endpoint: smtp_endpoint,
                from_name,
                from,
                confirm_copies,
                confirm_wait,
                helo_name,
                max_per_connection,
            },
            store: StoreConfig {
                path: self.path(&raw.store.path),
                engine: self.store_engine(&raw.store),
                min_free: match parse_size(&raw.store.min_free) {
                    Ok(n) => n,
                    Err(e) => {
                        self.problem("store.min_free", e);
                        0
                    }
                },
                keep_sent: {
                    let d = self.duration("store.keep_sent", &raw.store.keep_sent);
                    if d < Duration::from_secs(3600) && parse_duration(&raw.store.keep_sent).is_ok()
                    {
                        self.problem("store.keep_sent", "must be at least 1h");
                    }
                    d
                },
            },
            cases: CasesConfig {
                subject_tag: c.subject_tag,
                support_addresses,
                auto_reply_limit: c.auto_reply_limit,
                auto_reply_global_limit: c.auto_reply_global_limit,
                auto_reply_window,
                instance,
                require_dkim_pass: c.require_dkim_pass,
                authserv_id,
            },
            calendar: CalendarConfig { timezone, business },
            tiers,
            repeat_customer,
            triggers,
            resolution,
            templates: Templates { ack },
            digest,
            metrics,
            cluster,
        };
        self.claim_covers_a_send(&raw.cluster, &mut config);
        Some(config)
    }

    /// A mail being sent belongs to its node for `cluster.claim`: it
    /// must outlast the longest a send may take, or another node sends it
    /// too while the first is still at it. Unset, it is that long (and
    /// at least two minutes); set shorter, it is refused.
    fn claim_covers_a_send(&mut self, raw: &RawCluster, config: &mut Config) {
        let longest = config.longest_send();
        match &raw.claim {
            None => config.cluster.claim = (longest + CLAIM_MARGIN).max(DEFAULT_CLAIM),
            Some(text) if parse_duration(text).is_ok() && config.cluster.claim < longest => {
                self.problem(
                    "cluster.claim",
                    format!(
                        "must be at least {} here: the longest an SMTP send may take \
                         (connect, TLS, login and data, each up to its timeout{}), or a node \
                         still sending a mail sees another send it too",
                        humantime::format_duration(longest),
                        if config.smtp.confirm_copies {
                            ", then smtp.confirm_wait for the confirmation copy"
                        } else {
                            ""
                        }
                    ),
                );
            }
            Some(_) => {}
        }
    }

    /// `[cluster]`: read whatever the engine (a sled store has one
    /// process and ignores it).
    fn cluster(&mut self, c: &RawCluster) -> ClusterConfig {
        if let Some(n) = &c.node {
            if let Err(e) = check_node_name(n) {
                self.problem("cluster.node", e);
            }
        }
        let lease = self.duration("cluster.lease", &c.lease);
        if parse_duration(&c.lease).is_ok()
            && !(Duration::from_secs(3)..=Duration::from_secs(600)).contains(&lease)
        {
            self.problem(
                "cluster.lease",
                "give 3s to 10m (renewed every third of it; a dead node's mailboxes wait this long)",
            );
        }
        let text = c.claim.as_deref().unwrap_or("0s");
        let claim = self.duration("cluster.claim", text);
        if c.claim.is_some() && parse_duration(text).is_ok() && claim < Duration::from_secs(30) {
            self.problem(
                "cluster.claim",
                "must be at least 30s: a mail being sent must not be taken over mid-send",
            );
        }
        ClusterConfig {
            node: c.node.clone(),
            lease,
            claim,
        }
    }
}

pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The addresses of a PostgreSQL connection string that are not on this
/// machine: each `host` (key=value or URI form, lists too) and each
/// `hostaddr`, which is where the client connects when given, whatever
/// `host` says. A socket directory (a path) is local. `security =
/// "plain"` sends the password in clear to every one of them.
pub fn postgres_remote_addresses(url: &postgres::Config) -> Vec<String> {
    let hosts = url.get_hosts().iter().filter_map(|h| match h {
        postgres::config::Host::Tcp(h) => Some(h.clone()),
        postgres::config::Host::Unix(_) => None,
    });
    let addrs = url.get_hostaddrs().iter().map(IpAddr::to_string);
    hosts.chain(addrs).filter(|h| !is_loopback(h)).collect()
}

/// The longest duration any setting or option takes: ten years. Longer
/// ones are typing mistakes, and deadlines computed from them would
/// overflow the calendar.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Parses `90s`, `15m`, `4h`, `2d`, `1h 30m` (at most [`MAX_DURATION`]).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration; write e.g. \"90s\", \"15m\", \"4h\", \"2d\"".into());
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write e.g. \"90s\", \"15m\", \"4h\", \"2d\"")
    })?;
    if d > MAX_DURATION {
        return Err(format!("{text:?} is too long: at most 3650d (ten years)"));
    }
    Ok(d)
}

/// Parses `500KB`, `25MB`, `1GB` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_uppercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("GB") {
        (n, 1u64 << 30)
    } else if let Some(n) = t.strip_suffix("MB") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("KB") {
        (n, 1 << 10)
    } else {
        (t.strip_suffix('B').unwrap_or(&t), 1)
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n.saturating_mul(mult))
        .map_err(|_| format!("{text:?} is not a size; write e.g. \"25MB\""))
}

/// Splits `Name <addr@host>` or `addr@host` into (name, lower-case addr).
pub fn parse_mailbox(text: &str) -> Option<(Option<String>, String)> {
    let t = text.trim();
    let (name, addr) = match (t.rfind('<'), t.rfind('>')) {
        (Some(l), Some(r)) if l < r => {
            let name = t[..l].trim().trim_matches('"').trim();
            (
                (!name.is_empty()).then(|| name.to_string()),
                t[l + 1..r].trim(),
            )
        }
        _ => (None, t),
    };
    let (local, domain) = addr.rsplit_once('@')?;
    let ok = !local.is_empty()
        && domain.contains('.') | (domain == "localhost")
        && !addr
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>(),;\"".contains(c));
    ok.then(|| (name, addr.to_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[mailbox]
host = "127.0.0.1"
port = 1143
security = "plain"
username = "support"
password = "pw"

[smtp]
host = "127.0.0.1"
port = 2525
security = "plain"
from = "Example Support <support@example.test>"

[store]
path = "/tmp/x"

[[tiers]]
name = "Frontline"
first_response = "4h"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/escalator.toml"))
    }

    fn problems(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config should be refused"),
            Err(e) => e.to_string(),
        }
    }

    /// Two queues: support (all tiers) and billing (its own path, its
    /// own From and SMTP account).
    const QUEUES: &str = r#"
[[mailboxes]]
name = "support"
host = "127.0.0.1"
port = 1143
security = "plain"
username = "support"
password = "pw"

[[mailboxes]]
name = "billing"
address = "Acme Billing <billing@example.test>"
tiers = ["Billing", "Finance"]
host = "127.0.0.1"
port = 1143
security = "plain"
username = "billing-login"
password = "pw"
[mailboxes.smtp]
host = "127.0.0.1"
port = 2526
security = "plain"
username = "billing-login"
password = "pw2"

[smtp]
host = "127.0.0.1"
port = 2525
security = "plain"
from = "Example Support <support@example.test>"

[store]
path = "/tmp/x"

[[tiers]]
name = "Frontline"
first_response = "4h"

[[tiers]]
name = "Finance"
first_response = "8h"
forward_to = ["fin@example.test"]

[[tiers]]
name = "Billing"
first_response = "2h"
forward_to = ["bill@example.test"]
"#;

    #[test]
    fn smtp_session_settings_are_checked_and_have_defaults() {
        let c = parse(QUEUES).unwrap();
        assert_eq!(c.smtp.max_per_connection, 10, "Exim's default batch");
        assert_eq!(c.smtp.helo_name, None, "None: the host's FQDN");
        let with = |extra: &str| QUEUES.replacen("[smtp]\n", &format!("[smtp]\n{extra}\n"), 1);
        let c = parse(&with(
            "helo_name = \"mx1.example.com\"\nmax_per_connection = 3",
        ))
        .unwrap();
        assert_eq!(c.smtp.helo_name.as_deref(), Some("mx1.example.com"));
        assert_eq!(c.smtp.max_per_connection, 3);
        assert!(parse(&with("helo_name = \"[192.0.2.1]\"")).is_ok());
        assert!(parse(&with("helo_name = \"[IPv6:2001:db8::1]\"")).is_ok());
        assert!(
            parse(&with("helo_name = \"[2001:db8::1]\"")).is_err(),
            "RFC 5321: IPv6: tag"
        );
        // An EHLO line is protocol: no spaces, no line breaks in it.
        let e = problems(&with("helo_name = \"mx.example.com\\r\\nMAIL FROM:<x@y>\""));
        assert!(e.contains("smtp.helo_name"), "{e}");
        let e = problems(&with("helo_name = \"my host\""));
        assert!(e.contains("smtp.helo_name"), "{e}");
        let e = problems(&with("max_per_connection = 0"));
        assert!(e.contains("smtp.max_per_connection"), "{e}");
    }

    #[test]
    fn queues_have_their_own_address_path_and_smtp() {
        let c = parse(QUEUES).unwrap();
        let names: Vec<&str> = c.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["support", "billing"]);
        let (sup, bil) = (&c.queues[0], &c.queues[1]);
        // A queue without an address sends from [smtp] from.
        assert_eq!(sup.address, "support@example.test");
        assert_eq!(sup.path, vec![0, 1, 2], "all tiers in config order");
        assert!(sup.smtp.is_none());
        assert_eq!(bil.address, "billing@example.test");
        assert_eq!(bil.from_name.as_deref(), Some("Acme Billing"));
        assert_eq!(bil.path, vec![2, 1], "Billing, then Finance");
        assert_eq!(
            bil.mailbox.endpoint.username.as_deref(),
            Some("billing-login")
        );
        assert_eq!(bil.smtp.as_ref().map(|e| e.port), Some(2526));
        // Every queue's address is a support address; unknown queue
        // names (cases of a queue since removed) go to the first.
        let support = c.support_addresses();
        assert!(support.contains(&"billing@example.test".to_string()));
        assert!(c.is_queue_address("Billing@Example.test"));
        assert_eq!(c.queue("gone").name, "support");
        let summary = c.summary();
        assert!(
            summary.contains("billing: 127.0.0.1:1143") && summary.contains("Billing → Finance"),
            "{summary}"
        );
        // A lone [mailbox] is the queue `default`, from [smtp] from.
        let one = parse(GOOD).unwrap();
        assert_eq!(one.queues.len(), 1);
        assert_eq!(one.queues[0].name, "default");
        assert_eq!(one.queues[0].address, "support@example.test");
    }

    #[test]
    fn bad_queues_are_refused_naming_the_key() {
        let e = problems(&QUEUES.replace(
            r#"tiers = ["Billing", "Finance"]"#,
            r#"tiers = ["Billing", "Finanse"]"#,
        ));
        assert!(
            e.contains("mailboxes[1].tiers[1]: no tier named \"Finanse\""),
            "{e}"
        );
        let both =
            format!("{QUEUES}\n[mailbox]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n");
        let e = problems(&both);
        assert!(
            e.contains("mailboxes: give either one [mailbox] or [[mailboxes]], not both"),
            "{e}"
        );
        let e = problems(&QUEUES.replace(r#"name = "billing""#, r#"name = "support""#));
        assert!(
            e.contains("mailboxes[1].name: queue \"support\" is defined twice"),
            "{e}"
        );
        let e = problems(&QUEUES.replace(r#"name = "billing""#, r#"name = "Billing Team""#));
        assert!(e.contains("mailboxes[1].name"), "{e}");
        let e = problems(&QUEUES.replace(
            "billing-login\"\npassword = \"pw\"\n[mailboxes.smtp]",
            "support\"\npassword = \"pw\"\n[mailboxes.smtp]",
        ));
        assert!(
            e.contains("mailboxes[1]: watches the same folder as queue \"support\""),
            "{e}"
        );
        let e = problems(&QUEUES.replace(
            "Acme Billing <billing@example.test>",
            "support@example.test",
        ));
        assert!(
            e.contains("mailboxes[1].address: support@example.test is already"),
            "{e}"
        );
        let e = problems(&QUEUES.replace("port = 2526", "port = 2526\nfrom = \"x@example.test\""));
        assert!(e.contains("mailboxes[1].smtp.from: not here"), "{e}");
        let e = problems(&GOOD.replace(
            "password = \"pw\"",
            "password = \"pw\"\naddress = \"b@example.test\"",
        ));
        assert!(e.contains("mailbox.address: only in [[mailboxes]]"), "{e}");
        let e = problems(&QUEUES.replace("from = \"Example Support <support@example.test>\"", ""));
        assert!(e.contains("smtp.from: missing"), "{e}");
        // With an address on every queue, [smtp] needs no from: the
        // first queue's is the main one (the digest's sender).
        let own = QUEUES
            .replace("from = \"Example Support <support@example.test>\"", "")
            .replace(
                "\nname = \"support\"\n",
                "\nname = \"support\"\naddress = \"help@example.test\"\n",
            );
        let c = parse(&own).unwrap();
        assert_eq!(c.main_sender().1, "help@example.test");
        assert_eq!(c.support_domain(), "example.test");
        assert_eq!(c.cases.instance, "help@example.test");
        let none = GOOD.replace("[mailbox]", "[unused]");
        assert!(
            problems(&none).contains("unknown field"),
            "typo'd section names are refused"
        );
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.queues[0].mailbox.folder, "INBOX");
        assert_eq!(c.queues[0].mailbox.poll_interval, Duration::from_secs(60));
        assert!(c.queues[0].mailbox.idle);
        assert_eq!(c.smtp.from, "support@example.test");
        assert_eq!(c.smtp.from_name.as_deref(), Some("Example Support"));
        assert_eq!(c.cases.subject_tag, "Case");
        assert_eq!(
            c.tiers[0].timeline.first_response,
            Duration::from_secs(4 * 3600)
        );
        assert_eq!(c.calendar.timezone, chrono_tz::UTC);
        assert_eq!(c.support_domain(), "example.test");
    }

    #[test]
    fn r17_a_claim_shorter_than_a_send_may_take_is_refused() {
        // Input: `claim = "30s"` with the default 60 s per SMTP step was
        // accepted; a send still running after 30 s was sent again by
        // another node.
        let short = format!("{GOOD}\n[cluster]\nclaim = \"30s\"\n");
        let e = problems(&short);
        assert!(
            e.contains("cluster.claim") && e.contains("longest an SMTP send"),
            "{e}"
        );
        let longest = parse(GOOD).unwrap().longest_send();
        let enough = format!("{GOOD}\n[cluster]\nclaim = \"{}s\"\n", longest.as_secs());
        assert_eq!(parse(&enough).unwrap().cluster.claim, longest);
        // Shorter timeouts and no copies allow a shorter claim.
        let quick = GOOD.replacen(
            "[smtp]\n",
            "[smtp]\ntimeout = \"5s\"\nconfirm_copies = false\n",
            1,
        );
        let quick = format!("{quick}\n[cluster]\nclaim = \"30s\"\n");
        let c = parse(&quick).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.longest_send() <= Duration::from_secs(30),
            "{:?}",
            c.longest_send()
        );
    }

    #[test]
    fn cluster_keys_have_defaults_and_bad_ones_are_named() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.cluster.lease, Duration::from_secs(15));
        // Unset, the claim outlasts the longest send (here: steps of 60 s
        // and the 5 minutes' wait for a confirmation copy).
        assert_eq!(c.cluster.claim, c.longest_send() + CLAIM_MARGIN);
        assert!(c.cluster.claim >= DEFAULT_CLAIM);
        assert_eq!(c.cluster.node, None);
        let pg = GOOD.replacen(
            "[store]\n",
            "[store]\nengine = \"postgres\"\nurl_env = \"PGURL\"\n",
            1,
        );
        match &parse(&pg).unwrap().store.engine {
            StoreEngine::Postgres { pool, .. } => assert_eq!(*pool, DEFAULT_POOL),
            other => panic!("{other:?}"),
        }
        for (tail, key) in [
            ("[cluster]\nlease = \"1s\"\n", "cluster.lease"),
            ("[cluster]\nlease = \"soon\"\n", "cluster.lease"),
            ("[cluster]\nclaim = \"5s\"\n", "cluster.claim"),
            // A name is shown in tables and logs: no spaces, no controls.
            ("[cluster]\nnode = \"a b\\n\"\n", "cluster.node"),
            ("[cluster]\nnode = \"\"\n", "cluster.node"),
            ("[cluster]\nnodes = \"x\"\n", "cluster.nodes"),
        ] {
            let e = problems(&format!("{pg}{tail}"));
            assert!(e.contains(key), "{tail}: {e}");
        }
        let e = problems(&pg.replace("url_env = \"PGURL\"\n", "url_env = \"PGURL\"\npool = 1\n"));
        assert!(e.contains("store.pool"), "{e}");
        let e = problems(&GOOD.replacen("[store]\n", "[store]\npool = 4\n", 1));
        assert!(e.contains("store.pool: only with engine"), "{e}");
        let named = parse(&format!("{GOOD}[cluster]\nnode = \"eu-1\"\n")).unwrap();
        assert_eq!(named.cluster.node.as_deref(), Some("eu-1"));
    }

    #[test]
    fn plain_postgresql_checks_every_host_and_hostaddr() {
        // Issue 17 (B): only `host` was checked, so `host=localhost
        // hostaddr=192.0.2.2` sent the password in clear off the machine.
        let remote = |url: &str| match url.parse::<postgres::Config>() {
            Ok(c) => postgres_remote_addresses(&c),
            Err(e) => panic!("{url}: {e}"),
        };
        let none: [&str; 0] = [];
        for (url, want) in [
            (
                "host=localhost hostaddr=192.0.2.2 dbname=e",
                vec!["192.0.2.2"],
            ),
            (
                "host=127.0.0.1,db.example.com dbname=e",
                vec!["db.example.com"],
            ),
            (
                "host=localhost,localhost hostaddr=127.0.0.1,192.0.2.3",
                vec!["192.0.2.3"],
            ),
            (
                "postgresql://localhost/e?hostaddr=192.0.2.2",
                vec!["192.0.2.2"],
            ),
            ("postgresql://u:pw@localhost:5432,db2:5433/e", vec!["db2"]),
            ("postgres://u@db.example.com/e", vec!["db.example.com"]),
        ] {
            assert_eq!(remote(url), want, "{url}");
        }
        for url in [
            "host=/var/run/postgresql dbname=e",
            "postgresql://%2Fvar%2Frun%2Fpostgresql/e",
            "host=localhost hostaddr=127.0.0.1 password=pw",
            "host=::1 dbname=e",
            "postgresql://[::1]:5432,127.0.0.2/e",
            "postgresql://u:pw@localhost/e",
        ] {
            assert_eq!(remote(url), none, "{url}");
        }
    }

    #[test]
    fn plain_postgresql_to_a_remote_hostaddr_is_refused_before_connecting() {
        let pg = GOOD.replacen(
            "[store]\n",
            "[store]\nengine = \"postgres\"\nsecurity = \"plain\"\n\
             url = \"host=localhost hostaddr=192.0.2.2 dbname=e password=hunter2\"\n",
            1,
        );
        let c = parse(&pg).unwrap();
        let e = match crate::app::open_store(&c, Duration::ZERO) {
            Ok(_) => panic!("a remote hostaddr in clear was accepted"),
            Err(e) => format!("{e:#}"),
        };
        for want in ["store.security", "store.allow_insecure", "192.0.2.2"] {
            assert!(e.contains(want), "{e}");
        }
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_its_path_and_line() {
        let text = GOOD.replace("password = \"pw\"", "password = \"pw\"\npasword = \"x\"");
        let e = problems(&text);
        assert!(e.contains("mailbox.pasword"), "{e}");
        assert!(e.contains("line 8"), "{e}");
    }

    #[test]
    fn dkim_without_authserv_id_is_refused() {
        // Input: require_dkim_pass without naming the receiving server,
        // which would trust Authentication-Results any sender can write.
        let e = problems(&format!("{GOOD}[cases]\nrequire_dkim_pass = true\n"));
        assert!(e.contains("cases.authserv_id"), "{e}");
        let with = format!(
            "{}\n[cases]\nrequire_dkim_pass = true\nauthserv_id = \"MX.example.test\"\n",
            GOOD
        );
        // `[cases]` after `[[tiers]]` is still its own table in TOML.
        let c = parse(&with).unwrap();
        assert_eq!(c.cases.authserv_id.as_deref(), Some("mx.example.test"));
        let e = problems(&with.replace("MX.example.test", "mx; dkim=pass"));
        assert!(e.contains("cases.authserv_id"), "{e}");
    }

    #[test]
    fn a_huge_duration_is_a_clear_config_error() {
        // Input: `renotify = "1000000d"`: deadlines computed from it
        // overflowed and killed the scheduler.
        let e = problems(&format!("{GOOD}renotify = \"1000000d\"\n"));
        assert!(e.contains("tiers[0].renotify"), "{e}");
        assert!(e.contains("too long"), "{e}");
        assert!(parse_duration("3650d").is_ok());
    }

    #[test]
    fn unknown_key_in_tier_is_named() {
        let e = problems(&format!("{GOOD}frist_response = \"1h\"\n"));
        assert!(e.contains("tiers[0].frist_response"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = problems(&GOOD.replace("\"4h\"", "\"4 hourz\""));
        assert!(e.contains("tiers[0].first_response"), "{e}");
    }

    #[test]
    fn plain_to_remote_host_is_refused_unless_allowed() {
        let text = GOOD.replacen("host = \"127.0.0.1\"", "host = \"imap.example.com\"", 1);
        let e = problems(&text);
        assert!(e.contains("mailbox.security"), "{e}");
        assert!(e.contains("allow_insecure"), "{e}");
        let text = text.replacen(
            "security = \"plain\"",
            "security = \"plain\"\nallow_insecure = true",
            1,
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn password_from_env_and_missing_env_named() {
        std::env::set_var("ESCALATOR_CONFIG_TEST_PW", "from-env");
        let c = parse(&GOOD.replace(
            "password = \"pw\"",
            "password_env = \"ESCALATOR_CONFIG_TEST_PW\"",
        ))
        .unwrap();
        assert_eq!(
            c.queues[0]
                .mailbox
                .endpoint
                .password()
                .unwrap()
                .unwrap()
                .expose(),
            "from-env"
        );
        assert!(c.secret_problems().is_empty());
        let c = parse(&GOOD.replace("password = \"pw\"", "password_env = \"NOPE_UNSET\"")).unwrap();
        let e = c.secret_problems().join("\n");
        assert!(
            e.contains("mailbox.password_env") && e.contains("NOPE_UNSET"),
            "{e}"
        );
    }

    #[test]
    fn store_only_use_needs_no_mail_secret() {
        // Input: `stats`/`cases list` on a config whose password variable
        // is not set (an admin or cron job that only reads the store).
        // Loading succeeds; only a connection needs the secret.
        let c = parse(&GOOD.replace("password = \"pw\"", "password_env = \"UNSET_FOR_STATS\""));
        let c = c.expect("a config with an unset password variable loads");
        assert_eq!(c.secret_problems().len(), 1);
        assert!(c.queues[0].mailbox.endpoint.password().is_err());
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let text = GOOD.replace(
            "password = \"pw\"",
            &format!("password_file = {:?}", f.display().to_string()),
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.queues[0]
                .mailbox
                .endpoint
                .password()
                .unwrap()
                .unwrap()
                .expose(),
            "s3cret"
        );
    }

    #[test]
    fn secrets_never_print() {
        let c = parse(GOOD).unwrap();
        assert!(!format!("{c:?}").contains("\"pw\""));
        assert!(!c.summary().contains("pw\n"));
        assert!(c.summary().contains("password set"));
    }

    #[test]
    fn several_problems_are_all_reported() {
        let text = GOOD
            .replace("\"4h\"", "\"soon\"")
            .replace("Example Support <support@example.test>", "nobody");
        let e = problems(&(text + "[calendar]\ntimezone = \"Mars/Olympus\"\n"));
        assert!(e.contains("tiers[0].first_response"), "{e}");
        assert!(e.contains("smtp.from"), "{e}");
        assert!(e.contains("calendar.timezone"), "{e}");
    }

    #[test]
    fn no_tiers_is_refused() {
        let text = "tiers = []\n".to_string() + GOOD.split("[[tiers]]").next().unwrap();
        let e = problems(&text);
        assert!(e.contains("tiers: at least one"), "{e}");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("").is_err());
        assert_eq!(parse_size("25MB").unwrap(), 25 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn mailbox_parsing() {
        assert_eq!(
            parse_mailbox("\"A B\" <A@X.org>"),
            Some((Some("A B".into()), "a@x.org".into()))
        );
        assert_eq!(parse_mailbox("a@x.org"), Some((None, "a@x.org".into())));
        assert_eq!(parse_mailbox("nobody"), None);
        assert_eq!(parse_mailbox("a b@x.org"), None);
    }

    #[test]
    fn shipped_example_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["escalator.toml", "demo.toml"] {
            let path = root.join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            let r = Config::parse(&text, &path);
            assert!(r.is_ok(), "{name}: {}", r.err().unwrap());
        }
    }

    #[tokio::test]
    async fn oauth_token_command_stderr_is_not_in_the_error() {
        // Input: a token command that fails and prints details of the
        // admin's tooling on stderr; that text went into the outbox's
        // `last_error` (shown by `outbox list`, kept in the store).
        let e = TokenSource::Command("echo 'vault token s.XYZ expired' >&2; exit 3".into())
            .token()
            .await
            .unwrap_err();
        assert!(e.contains("failed") && !e.contains("s.XYZ"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_oauth_token_command_times_out() {
        // Input: a token command that never returns; it ran synchronously
        // on the runtime with no timeout.
        let e = TokenSource::Command("sleep 100000".into())
            .token()
            .await
            .unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
    }

    #[tokio::test]
    async fn xoauth2_needs_a_token_source_and_reads_a_fresh_token_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("token");
        std::fs::write(&tok, "ya29.first\n").unwrap();
        let text = GOOD.replace(
            "password = \"pw\"",
            &format!(
                "auth = \"xoauth2\"\noauth_token_file = \"{}\"",
                tok.display()
            ),
        );
        let c = parse(&text).unwrap();
        let source = c.queues[0].mailbox.endpoint.oauth.clone().unwrap();
        assert_eq!(source.token().await.unwrap().expose(), "ya29.first");
        std::fs::write(&tok, "ya29.second").unwrap();
        assert_eq!(source.token().await.unwrap().expose(), "ya29.second");
        assert_eq!(
            TokenSource::xoauth2("support@x.org", &Secret::new("t0k")),
            "user=support@x.org\x01auth=Bearer t0k\x01\x01"
        );
        let cmd = TokenSource::Command("printf 'from-cmd\\n'".into());
        assert_eq!(cmd.token().await.unwrap().expose(), "from-cmd");
        assert!(TokenSource::Command("exit 3".into())
            .token()
            .await
            .unwrap_err()
            .contains("failed"));

        let e = problems(&GOOD.replace("password = \"pw\"", "auth = \"xoauth2\""));
        assert!(
            e.contains("mailbox.auth: xoauth2 needs oauth_token_file"),
            "{e}"
        );
        let e = problems(&GOOD.replace("password = \"pw\"", "auth = \"oauth\""));
        assert!(e.contains("mailbox.auth: unknown \"oauth\""), "{e}");
        let e = problems(&text.replace("[smtp]", "oauth_token_command = \"x\"\n[smtp]"));
        assert!(
            e.contains("give only one of oauth_token_file, oauth_token_command"),
            "{e}"
        );
    }
}
