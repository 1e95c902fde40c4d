//! SMTP: hands composed mail to the server with lettre's SMTP client
//! over one kept connection (TCP_NODELAY, our own TLS for port 465).
//! lettre does not retry; we classify its errors so the outbox can
//! retry what is transient, give up on what the server refused, and hold
//! everything while the server refuses us (a wrong password). Every
//! session ends with QUIT and a TLS close_notify: after `max_per_connection`
//! mails, after `MAX_IDLE` without one, and when the daemon stops.

use std::time::Duration;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Security, SmtpConfig};

/// How a send failed, for the outbox's retry decision.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// 4xx, connection trouble, timeouts: try again later.
    #[error("temporary SMTP failure: {0}")]
    Transient(String),
    /// 5xx: the server refused for good; its words are kept.
    #[error("SMTP server refused the mail: {0}")]
    Permanent(String),
    #[error("cannot set up SMTP: {0}")]
    Setup(String),
    /// The message data went out but the server's answer to it did not
    /// come back (timeout, connection cut): it may have accepted the
    /// mail. Like a crash mid-send, this waits for the confirmation copy.
    #[error("SMTP server's answer to the message data was lost: {0}")]
    Unknown(String),
    /// The server refuses us, not this mail (the login, the sender
    /// address, an untrusted certificate): every mail would meet the
    /// same answer. The admin's to fix; all mail stays queued.
    #[error("SMTP refuses this configuration: {0}")]
    Config(String),
}

/// Sends raw mail; a trait so the outbox worker can be tested without a
/// network (the real server is used in tests/).
#[async_trait::async_trait]
pub trait Mailer: Send + Sync {
    async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError>;
    /// Ends any kept session cleanly (QUIT), before the process exits.
    async fn close(&self) {}
    /// The config section of the server mail from `from` goes through
    /// (`smtp`, `mailboxes[1].smtp`): a refusal blocks that server only.
    fn server(&self, _from: &str) -> String {
        "smtp".to_string()
    }
}

/// Sends each mail through the server of the queue whose address it is
/// from (a queue's own `smtp`), the rest through `main` (`[smtp]`).
pub struct ByFrom {
    pub main: Arc<dyn Mailer>,
    /// Lower-case From address → that queue's server.
    pub routes: Vec<(String, Arc<dyn Mailer>)>,
}

impl ByFrom {
    fn route(&self, from: &str) -> &Arc<dyn Mailer> {
        self.routes
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(from))
            .map(|(_, m)| m)
            .unwrap_or(&self.main)
    }
}

#[async_trait::async_trait]
impl Mailer for ByFrom {
    async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError> {
        self.route(from).send(from, to, raw).await
    }

    fn server(&self, from: &str) -> String {
        self.route(from).server(from)
    }

    async fn close(&self) {
        self.main.close().await;
        for (_, m) in &self.routes {
            m.close().await;
        }
    }
}

pub struct SmtpMailer {
    cfg: SmtpConfig,
    /// For STARTTLS (lettre upgrades its own stream).
    starttls: Option<TlsParameters>,
    /// For implicit TLS (we wrap the stream before lettre sees it).
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// `helo_name`, or this host's fully qualified name; None: neither is
    /// known, and the address literal of our end of each connection is
    /// used (RFC 5321 4.1.4).
    hello: Option<ClientId>,
    /// One kept connection (the outbox sends one mail at a time), with
    /// when it was last used; shared with the task that closes it when
    /// it has been idle too long.
    conn: Arc<tokio::sync::Mutex<Option<Kept>>>,
    /// Access tokens for `auth = "oauth2"`.
    tokens: Option<Arc<dyn crate::credentials::AccessTokens>>,
    /// Sessions being ended in the background (awaited by `close`), so
    /// the mail just accepted is journaled without waiting for QUIT.
    closing: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct Kept {
    conn: AsyncSmtpConnection,
    used: Instant,
    /// Mails sent over it.
    sent: u32,
}

/// Ends a session as RFC 5321 asks: QUIT, then (lettre's `abort` closes
/// the stream) a TLS close_notify, so the server logs a clean end.
async fn end(mut k: Kept) {
    let _ = tokio::time::timeout(Duration::from_secs(5), k.conn.abort()).await;
}

/// This host's fully qualified name, as `hostname -f` finds it (the
/// canonical name of the host name), if it has a dot.
pub fn local_fqdn() -> Option<String> {
    // Looked up once a process: a reload builds new mailers, and a slow
    // resolver must not stall the runtime each time.
    static FQDN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FQDN.get_or_init(lookup_fqdn).clone()
}

fn lookup_fqdn() -> Option<String> {
    let host = hostname::get().ok()?.into_string().ok()?;
    if host.contains('.') {
        return Some(host);
    }
    let hints = dns_lookup::AddrInfoHints {
        flags: libc_ai_canonname(),
        ..Default::default()
    };
    let canon = dns_lookup::getaddrinfo(Some(&host), None, Some(hints))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|a| a.canonname)?;
    canon.contains('.').then_some(canon)
}

/// `AI_CANONNAME`: 2 on Linux and the BSDs.
const fn libc_ai_canonname() -> i32 {
    2
}

/// Servers drop idle clients after a minute or so; past this, reconnect
/// rather than find out mid-transaction.
const MAX_IDLE: Duration = Duration::from_secs(30);

impl SmtpMailer {
    pub fn new(cfg: &SmtpConfig) -> Result<SmtpMailer, SmtpError> {
        let ep = &cfg.endpoint;
        let (starttls, tls) = match ep.security {
            Security::Starttls => {
                let mut b = TlsParameters::builder(ep.host.clone());
                if let Some(ca) = &ep.ca_file {
                    let pem = std::fs::read(ca).map_err(|e| {
                        SmtpError::Setup(format!("cannot read {}: {e}", ca.display()))
                    })?;
                    let cert = Certificate::from_pem(&pem)
                        .map_err(|e| SmtpError::Setup(format!("{}: {e}", ca.display())))?;
                    b = b.add_root_certificate(cert);
                }
                let p = b
                    .build_rustls()
                    .map_err(|e| SmtpError::Setup(e.to_string()))?;
                (Some(p), None)
            }
            Security::Tls => {
                let c =
                    crate::tls::client_config(ep.ca_file.as_deref()).map_err(SmtpError::Setup)?;
                (None, Some(c))
            }
            Security::Plain => (None, None),
        };
        let hello = match &cfg.helo_name {
            Some(name) => Some(ClientId::Domain(name.clone())),
            None => local_fqdn().map(ClientId::Domain),
        };
        Ok(SmtpMailer {
            cfg: cfg.clone(),
            starttls,
            tls,
            hello,
            conn: Arc::new(tokio::sync::Mutex::new(None)),
            closing: std::sync::Mutex::default(),
            tokens: None,
        })
    }

    /// Logs in with tokens from `broker` where the server says
    /// `auth = "oauth2"`.
    pub fn with_tokens(mut self, broker: Arc<dyn crate::credentials::AccessTokens>) -> SmtpMailer {
        self.tokens = Some(broker);
        self
    }

    /// The OAuth 2 token for a new login (None: a password login). A
    /// grant that needs an admin's login is a configuration problem (all
    /// mail waits, the server's backoff applies); a provider that cannot
    /// be reached is transient.
    async fn token(&self) -> Result<Option<String>, SmtpError> {
        let Some(source) = &self.cfg.endpoint.oauth else {
            return Ok(None);
        };
        match crate::credentials::token(source, self.tokens.as_deref()).await {
            Ok(t) => Ok(Some(t.expose().to_string())),
            Err(e) if e.needs_login => Err(SmtpError::Config(format!(
                "no OAuth 2 token for the login: {e}"
            ))),
            Err(e) if matches!(source, crate::config::TokenSource::Identity(_)) => Err(
                SmtpError::Transient(format!("no OAuth 2 token for the login: {e}")),
            ),
            Err(e) => Err(SmtpError::Config(format!(
                "no OAuth 2 token for the login: {e}"
            ))),
        }
    }

    /// Connects and logs in with `token` (None: the password). A token of
    /// the store's grant that the server refuses is reported, so the next
    /// login gets a fresh one (revoked before its end), and tried once
    /// more at once with it.
    async fn sign_in(&self, token: Option<String>) -> Result<AsyncSmtpConnection, SmtpError> {
        let first = self.connect(token.as_deref()).await;
        let (
            Err(SmtpError::Config(why)),
            Some(t),
            Some(crate::config::TokenSource::Identity(name)),
        ) = (&first, &self.tokens, &self.cfg.endpoint.oauth)
        else {
            return first;
        };
        // Only the login's refusal, not TLS or a greeting: those are
        // not the token's fault.
        if !why.starts_with("the server refused the login") {
            return first;
        }
        let Some(used) = token else {
            return first;
        };
        t.rejected(name, &crate::config::Secret::new(used.clone()))
            .await;
        match self.token().await? {
            Some(fresh) if fresh != used => self.connect(Some(&fresh)).await,
            _ => first,
        }
    }

    /// Connects and logs in as a send would, then ends the session
    /// (`check-config --connect`): what the server said who it is and
    /// who we are.
    pub async fn check(&self) -> Result<String, SmtpError> {
        let token = self.token().await?;
        let conn = self.sign_in(token).await?;
        let server = conn.server_info().name().to_string();
        let who = match &self.cfg.endpoint.username {
            Some(u) => format!("logged in as {u:?}"),
            None => "connected (no login configured)".to_string(),
        };
        end(Kept {
            conn,
            used: Instant::now(),
            sent: 0,
        })
        .await;
        Ok(format!("{who} at {server}; nothing sent"))
    }

    /// The EHLO name for a connection whose local end is `local`.
    fn hello_for(&self, local: Option<std::net::IpAddr>) -> ClientId {
        match (&self.hello, local) {
            (Some(h), _) => h.clone(),
            (None, Some(std::net::IpAddr::V4(ip))) => ClientId::Ipv4(ip),
            (None, Some(std::net::IpAddr::V6(ip))) => ClientId::Ipv6(ip),
            (None, None) => ClientId::default(),
        }
    }

    /// Closes the kept connection once it has been idle `MAX_IDLE`, so
    /// the server sees a QUIT rather than a client that went away.
    fn close_when_idle(&self) {
        let slot = Arc::downgrade(&self.conn);
        tokio::spawn(async move {
            tokio::time::sleep(MAX_IDLE).await;
            let Some(slot) = slot.upgrade() else { return };
            let mut kept = slot.lock().await;
            if kept.as_ref().is_some_and(|k| k.used.elapsed() >= MAX_IDLE) {
                if let Some(k) = kept.take() {
                    end(k).await;
                }
            }
        });
    }

    /// Connects, secures and logs in.
    async fn connect(&self, token: Option<&str>) -> Result<AsyncSmtpConnection, SmtpError> {
        let ep = &self.cfg.endpoint;
        let tcp = tokio::time::timeout(ep.timeout, TcpStream::connect((ep.host.as_str(), ep.port)))
            .await
            .map_err(|e| transient(ep, "connecting to", &e))?
            .map_err(|e| transient(ep, "connecting to", &e))?;
        let hello = self.hello_for(tcp.local_addr().ok().map(|a| a.ip()));
        // lettre writes the body and the final dot separately: with Nagle
        // on, the dot waits for the server's delayed ACK (40 ms a mail).
        tcp.set_nodelay(true)
            .map_err(|e| transient(ep, "socket option for", &e))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.tls {
            Some(config) => {
                let name = ServerName::try_from(ep.host.clone())
                    .map_err(|e| SmtpError::Setup(format!("bad host name {:?}: {e}", ep.host)))?;
                let tls = tokio::time::timeout(
                    ep.timeout,
                    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
                )
                .await
                .map_err(|e| transient(ep, "TLS with", &e))?
                .map_err(|e| tls_error(ep, &e))?;
                Box::new(TlsTcp(tls))
            }
            None => Box::new(tcp),
        };
        let mut conn = tokio::time::timeout(
            ep.timeout,
            AsyncSmtpConnection::connect_with_transport(stream, &hello),
        )
        .await
        .map_err(|_| {
            let hint = if self.tls.is_none() {
                format!(
                    " (the port may expect TLS at once: try {}.security = \"tls\")",
                    ep.section
                )
            } else {
                String::new()
            };
            SmtpError::Transient(format!(
                "no greeting from {}:{} within {:?}{hint}",
                ep.host, ep.port, ep.timeout
            ))
        })?
        .map_err(|e| {
            // Our TLS spoke to a server speaking plain text.
            if self.tls.is_some() {
                if let Some(h) = crate::tls::hint(&e, ep) {
                    return SmtpError::Config(format!(
                        "TLS with {}:{} failed: {h}",
                        ep.host, ep.port
                    ));
                }
            }
            session_refused(ep, e)
        })?;
        self.starttls(&mut conn, &hello).await?;
        self.login(&mut conn, token, &hello).await?;
        Ok(conn)
    }

    /// STARTTLS when the config asks for it; a server that does not offer
    /// it is refused, never used in plain text.
    async fn starttls(
        &self,
        conn: &mut AsyncSmtpConnection,
        hello: &ClientId,
    ) -> Result<(), SmtpError> {
        let ep = &self.cfg.endpoint;
        if let Some(params) = &self.starttls {
            if !conn.can_starttls() {
                return Err(SmtpError::Config(format!(
                    "{}:{} does not offer STARTTLS; refusing to send unencrypted \
                 (if the port expects TLS at once, set {}.security = \"tls\")",
                    ep.host, ep.port, ep.section
                )));
            }
            tokio::time::timeout(ep.timeout, conn.starttls(params.clone(), hello))
                .await
                .map_err(|e| transient(ep, "STARTTLS with", &e))?
                .map_err(|e| match crate::tls::hint(&e, ep) {
                    Some(h) => SmtpError::Config(format!(
                        "STARTTLS with {}:{} failed: {}: {h}",
                        ep.host,
                        ep.port,
                        error_text(&e)
                    )),
                    None => session_refused(ep, e),
                })?;
        }
        Ok(())
    }

    /// AUTH with the token (XOAUTH2) or the password (PLAIN, LOGIN), when
    /// a username is set.
    async fn login(
        &self,
        conn: &mut AsyncSmtpConnection,
        token: Option<&str>,
        hello: &ClientId,
    ) -> Result<(), SmtpError> {
        let ep = &self.cfg.endpoint;
        if let (Some(user), Some(t)) = (&ep.username, token) {
            if !conn
                .server_info()
                .supports_auth_mechanism(Mechanism::Xoauth2)
                && offers_oauthbearer(conn, hello, ep).await?
            {
                return oauthbearer(conn, ep, user, t).await;
            }
        }
        // Read at every connection: a rotated password file is picked up,
        // and an unreadable one is the admin's to fix (kept, retried).
        let password = ep.password().map_err(|e| {
            SmtpError::Config(format!(
                "cannot read the SMTP password: {e} (check {})",
                ep.password_keys()
            ))
        })?;
        let login = match (&ep.username, token, &password) {
            (Some(u), Some(t), _) => Some((
                Credentials::new(u.clone(), t.to_string()),
                vec![Mechanism::Xoauth2],
            )),
            (Some(u), None, Some(pw)) => Some((
                Credentials::new(u.clone(), pw.expose().to_string()),
                vec![Mechanism::Plain, Mechanism::Login],
            )),
            _ => None,
        };
        if let Some((creds, mechs)) = login {
            tokio::time::timeout(ep.timeout, conn.auth(&mechs, &creds))
                .await
                .map_err(|e| transient(ep, "login at", &e))?
                .map_err(|e| match classify(&e) {
                    // lettre's XOAUTH2 fails on the server's error
                    // challenge (a 334 with its JSON) without its words:
                    // the token was refused.
                    _ if e.is_client()
                        && mechs == [Mechanism::Xoauth2]
                        && error_text(&e).contains("challenge") =>
                    {
                        SmtpError::Config(format!(
                            "the server refused the login as {:?} with the OAuth 2 token (XOAUTH2)",
                            ep.username.as_deref().unwrap_or_default(),
                        ))
                    }
                    // No mechanism in common: often AUTH is offered only
                    // after STARTTLS.
                    _ if e.is_client() => SmtpError::Config(format!(
                        "{}:{} offers no login mechanism escalator can use ({}): servers \
                     often offer AUTH only over TLS: check {}.security",
                        ep.host,
                        ep.port,
                        error_text(&e),
                        ep.section
                    )),
                    // A refused login is the admin's to fix; keep the
                    // mail and retry with backoff rather than fail it.
                    SmtpError::Permanent(why) => SmtpError::Config(format!(
                        "the server refused the login as {:?}: {why} (check {}.username and {})",
                        ep.username.as_deref().unwrap_or_default(),
                        ep.section,
                        ep.password_keys()
                    )),
                    other => other,
                })?;
        }
        Ok(())
    }
}

/// Whether the server's EHLO lists AUTH OAUTHBEARER (lettre keeps only
/// the mechanisms it implements, so the EHLO is sent again and read).
async fn offers_oauthbearer(
    conn: &mut AsyncSmtpConnection,
    hello: &ClientId,
    ep: &crate::config::Endpoint,
) -> Result<bool, SmtpError> {
    let r = tokio::time::timeout(ep.timeout, conn.command(format!("EHLO {hello}\r\n")))
        .await
        .map_err(|e| transient(ep, "EHLO at", &e))?
        .map_err(|e| transient(ep, "EHLO at", &e))?;
    let offered = r.message().any(|line| {
        let mut words = line.split([' ', '=']);
        words.next().is_some_and(|w| w.eq_ignore_ascii_case("AUTH"))
            && words.any(|m| m.eq_ignore_ascii_case("OAUTHBEARER"))
    });
    Ok(offered)
}

/// SASL OAUTHBEARER (RFC 7628) for a server that offers it and not
/// XOAUTH2: the initial response; on the server's error challenge the
/// `%x01` answer the mechanism requires, then its refusal.
async fn oauthbearer(
    conn: &mut AsyncSmtpConnection,
    ep: &crate::config::Endpoint,
    user: &str,
    token: &str,
) -> Result<(), SmtpError> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let initial = format!(
        "n,a={},\x01host={}\x01port={}\x01auth=Bearer {token}\x01\x01",
        user.replace('=', "=3D").replace(',', "=2C"),
        ep.host,
        ep.port
    );
    let refused = |why: String| {
        SmtpError::Config(format!(
            "the server refused the login as {user:?} with the OAuth 2 token (OAUTHBEARER): {why}"
        ))
    };
    let r = tokio::time::timeout(
        ep.timeout,
        conn.command(format!("AUTH OAUTHBEARER {}\r\n", b64.encode(initial))),
    )
    .await
    .map_err(|e| transient(ep, "login at", &e))?
    .map_err(|e| refused(error_text(&e)))?;
    if r.code().to_string() == "235" {
        return Ok(());
    }
    // 334: the error, as JSON in base64; answered, then the 535.
    let said = r
        .message()
        .next()
        .and_then(|m| b64.decode(m.trim()).ok())
        .map(|j| crate::template::printable(&String::from_utf8_lossy(&j)))
        .unwrap_or_default();
    let end = tokio::time::timeout(ep.timeout, conn.command("AQ==\r\n"))
        .await
        .map_err(|e| transient(ep, "login at", &e))?;
    let words = match end {
        Ok(r) => r.message().collect::<Vec<_>>().join(" "),
        Err(e) => error_text(&e),
    };
    Err(refused(format!(
        "{} (the server said {})",
        crate::template::printable(&words),
        said.chars().take(300).collect::<String>()
    )))
}

/// A 5xx before any mail (the greeting, EHLO, STARTTLS) refuses us, not
/// a mail: every mail would meet it.
fn session_refused(ep: &crate::config::Endpoint, e: lettre::transport::smtp::Error) -> SmtpError {
    match classify(&e) {
        SmtpError::Permanent(why) => SmtpError::Config(format!(
            "{}:{} refused the session: {why}",
            ep.host, ep.port
        )),
        other => other,
    }
}

/// A network step that failed or timed out: tried again later.
fn transient(ep: &crate::config::Endpoint, what: &str, e: &dyn std::fmt::Display) -> SmtpError {
    SmtpError::Transient(format!("{what} {}:{}: {e}", ep.host, ep.port))
}

/// A TLS stream lettre can use: its trait is foreign, so a newtype.
#[derive(Debug)]
struct TlsTcp(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for TlsTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for TlsTcp {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

/// A failed TLS handshake: the admin's to fix when the error says what
/// to change (wrong `security` for the port, an unknown CA).
fn tls_error(ep: &crate::config::Endpoint, e: &std::io::Error) -> SmtpError {
    let text = format!("TLS with {}:{}: {e}", ep.host, ep.port);
    match crate::tls::hint(e, ep) {
        Some(h) => SmtpError::Config(format!("{text}: {h}")),
        None => SmtpError::Transient(text),
    }
}

fn classify(e: &lettre::transport::smtp::Error) -> SmtpError {
    if e.is_permanent() {
        SmtpError::Permanent(error_text(e))
    } else {
        SmtpError::Transient(error_text(e))
    }
}

#[async_trait::async_trait]
impl Mailer for SmtpMailer {
    // Long: the life of a kept connection around one mail: reuse, reconnect, MAIL/RCPT/DATA, the count towards max_per_connection, each answer classified where it is read.
    async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError> {
        let parse = |a: &str| {
            a.parse::<lettre::Address>()
                .map_err(|e| SmtpError::Permanent(format!("invalid address {a:?}: {e}")))
        };
        let rcpt = to.iter().map(|a| parse(a)).collect::<Result<Vec<_>, _>>()?;
        let envelope = Envelope::new(Some(parse(from)?), rcpt)
            .map_err(|e| SmtpError::Permanent(e.to_string()))?;
        let mut slot = self.conn.lock().await;
        let stale = slot
            .as_ref()
            .is_some_and(|k| k.conn.has_broken() || k.used.elapsed() > MAX_IDLE);
        if stale {
            if let Some(k) = slot.take() {
                end(k).await;
            }
        }
        let mut kept = match slot.take() {
            Some(k) => k,
            None => {
                // A token only for a new login: the command is not run
                // for every mail.
                let token = self.token().await?;
                Kept {
                    conn: self.sign_in(token).await?,
                    used: Instant::now(),
                    sent: 0,
                }
            }
        };
        // Enough time for a large forward on a slow link.
        let limit = self.cfg.endpoint.timeout + Duration::from_secs(raw.len() as u64 / 50_000);
        let data_sent = std::sync::atomic::AtomicBool::new(false);
        let result = tokio::time::timeout(
            limit,
            transaction(&mut kept.conn, &envelope, raw, &data_sent),
        )
        .await;
        let after_data = data_sent.load(std::sync::atomic::Ordering::SeqCst);
        match result {
            Ok(Ok(())) => {
                kept.used = Instant::now();
                kept.sent += 1;
                if kept.sent >= self.cfg.max_per_connection {
                    let task = tokio::spawn(end(kept));
                    let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
                    closing.retain(|t| !t.is_finished());
                    closing.push(task);
                } else {
                    *slot = Some(kept);
                    self.close_when_idle();
                }
                Ok(())
            }
            // Any error leaves the connection in an unknown state: drop it.
            Ok(Err((step, e))) => match classify(&e) {
                SmtpError::Transient(why) if after_data => Err(SmtpError::Unknown(why)),
                // The server refuses our sender address: so it will
                // every mail. (Microsoft 365 says so after the data:
                // 5.2.252 SendAsDenied, 5.7.60.)
                SmtpError::Permanent(why)
                    if step == Step::MailFrom
                        || why.contains("SendAsDenied")
                        || why.contains("5.7.60")
                        || why.contains("5.2.252") =>
                {
                    Err(SmtpError::Config(format!(
                        "the server refused the sender {from}: {why} (the account in \
                         {}.username may not send as this address)",
                        self.cfg.endpoint.section
                    )))
                }
                other => Err(other),
            },
            Err(_) => {
                let why = format!("no answer from {} within {limit:?}", self.cfg.endpoint.host);
                Err(if after_data {
                    SmtpError::Unknown(why)
                } else {
                    SmtpError::Transient(why)
                })
            }
        }
    }

    async fn close(&self) {
        if let Some(k) = self.conn.lock().await.take() {
            end(k).await;
        }
        let closing = std::mem::take(&mut *self.closing.lock().unwrap_or_else(|p| p.into_inner()));
        for task in closing {
            let _ = tokio::time::timeout(Duration::from_secs(6), task).await;
        }
    }

    fn server(&self, _from: &str) -> String {
        self.cfg.endpoint.section.clone()
    }
}

/// The step of a mail transaction that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    MailFrom,
    Rest,
}

/// MAIL, RCPT, DATA, then the message: lettre's `send`, split so that we
/// know whether a failure came before the data went out (the server has
/// nothing) or after (it may have accepted the mail), and whether it
/// was our sender the server refused.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    raw: &[u8],
    data_sent: &std::sync::atomic::AtomicBool,
) -> Result<(), (Step, lettre::transport::smtp::Error)> {
    let rest = |e| (Step::Rest, e);
    use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
    use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
    let mut options = Vec::new();
    let non_ascii = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii && conn.server_info().supports_feature(Extension::SmtpUtfEight) {
        options.push(MailParameter::SmtpUtfEight);
    }
    if !raw.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), options))
        .await
        .map_err(|e| (Step::MailFrom, e))?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new()))
            .await
            .map_err(rest)?;
    }
    conn.command(Data).await.map_err(rest)?;
    data_sent.store(true, std::sync::atomic::Ordering::SeqCst);
    conn.message(raw).await.map_err(rest)?;
    Ok(())
}

/// The error with its causes, as one line for the outbox record.
fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
#[path = "smtp_tests.rs"]
mod tests;
