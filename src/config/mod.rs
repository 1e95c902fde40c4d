//! The one TOML file admins edit: read into `RawConfig` (serde, unknown
//! keys refused), then validated into `Config`, whose types the rest of
//! the daemon can trust. Every error names the key path, so an admin with
//! a typo is told exactly where to look.
//!
//! What lives where:
//! - `mod.rs` (here): the validated types the daemon uses (`Config`, its
//!   sections, `Endpoint`, `Secret`, `PasswordSource`, `TokenSource`,
//!   `Live`), their small methods, [`Config::load`] / [`Config::parse`],
//!   and the value parsers other modules share (`parse_duration`,
//!   `parse_size`, `parse_mailbox`, `is_loopback`, `check_node_name`).
//! - `raw.rs`: the serde structs that mirror the TOML (`RawConfig`,
//!   `RawSmtp`, `RawStore`, ...), their defaults, and how a TOML error is
//!   told.
//! - `validate/`: the `Validator`, turning a `RawConfig` into a `Config`
//!   one section at a time and collecting every problem: `mod.rs` calls
//!   the sections in order; `servers.rs` checks `[smtp]` and what every
//!   server shares, `queues.rs` the mailboxes, `escalation.rs` the tiers,
//!   repeat customers and triggers, `cases.rs` `[cases]`, `[calendar]`,
//!   `[resolution]`, `[templates]`, `[digest]` and `[metrics]`, and
//!   `store.rs` `[store]` and `[cluster]`.
//! - `summary.rs`: [`Config::summary`], the config told to people.
//! - `tests.rs`: the unit tests.

pub mod oauth;
mod raw;
mod summary;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::calendar::Calendar;

use raw::{toml_problem, RawConfig};

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
    /// `[language]`: which language customers and staff get.
    pub language: LanguageConfig,
    pub digest: Option<DigestConfig>,
    pub metrics: MetricsConfig,
    pub cluster: ClusterConfig,
    /// `[oauth2]`: identities for Microsoft 365, Gmail and others.
    pub oauth2: oauth::OAuthConfig,
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

/// The shortest claim when none is set, and what an unset claim adds to
/// the longest send.
const DEFAULT_CLAIM: Duration = Duration::from_secs(120);
const CLAIM_MARGIN: Duration = Duration::from_secs(30);

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
    /// `auth = "oauth2"`: an `[oauth2.NAME]` identity whose tokens
    /// escalator keeps (and refreshes) in its store; see the `oauth` module.
    Identity(String),
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
                    // The admin's tooling has no use for the key that
                    // seals escalator's own tokens.
                    .env_remove(oauth::TOKEN_KEY_ENV)
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
            TokenSource::Identity(name) => {
                return Err(format!(
                    "the tokens of identity {name:?} are in the store; this command does not \
                     open it (escalator auth status shows them)"
                ))
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

/// `[language]`. Every tag is normalised (see
/// [`crate::template::normal_lang`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanguageConfig {
    /// The language of customer mail when nothing closer says which
    /// (`en` unless set).
    pub default: String,
    /// Detect the language of a customer's own text (default true).
    pub detect: bool,
    /// The language of staff mail (`en` unless set).
    pub staff: String,
    /// Customer domain (lower case) → language; a domain also covers
    /// its subdomains.
    pub domains: BTreeMap<String, String>,
}

impl Default for LanguageConfig {
    fn default() -> Self {
        LanguageConfig {
            default: "en".into(),
            detect: true,
            staff: "en".into(),
            domains: BTreeMap::new(),
        }
    }
}

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
    /// The language of its customers' mail (normalised tag), when set.
    pub language: Option<String>,
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
        /// The PostgreSQL schema holding the store's tables.
        schema: String,
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

/// `[templates]`: the mail templates in use, the built-in set overlaid
/// with the files of `dir` (see [`crate::template`]).
#[derive(Debug, Clone, Default)]
pub struct Templates {
    pub dir: Option<PathBuf>,
    pub set: std::sync::Arc<crate::template::Templates>,
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
        validate::config(raw, path).map_err(invalid)
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
mod tests;
