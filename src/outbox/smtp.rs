//! SMTP: hands composed mail to the server with lettre's SMTP client
//! over one kept connection (TCP_NODELAY, our own TLS for port 465).
//! lettre does not retry; we classify its errors so the outbox can
//! retry what is transient and give up on what the server refused.

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
}

/// Sends raw mail; a trait so the outbox worker can be tested without a
/// network (the real server is used in tests/).
#[async_trait::async_trait]
pub trait Mailer: Send + Sync {
    async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError>;
}

/// Sends each mail through the server of the queue whose address it is
/// from (a queue's own `smtp`), the rest through `main` (`[smtp]`).
pub struct ByFrom {
    pub main: Arc<dyn Mailer>,
    /// Lower-case From address → that queue's server.
    pub routes: Vec<(String, Arc<dyn Mailer>)>,
}

#[async_trait::async_trait]
impl Mailer for ByFrom {
    async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError> {
        let route = self
            .routes
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(from))
            .map(|(_, m)| m)
            .unwrap_or(&self.main);
        route.send(from, to, raw).await
    }
}

pub struct SmtpMailer {
    cfg: SmtpConfig,
    /// For STARTTLS (lettre upgrades its own stream).
    starttls: Option<TlsParameters>,
    /// For implicit TLS (we wrap the stream before lettre sees it).
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    hello: ClientId,
    /// One kept connection (the outbox sends one mail at a time), with
    /// when it was last used and the OAuth token it logged in with.
    conn: tokio::sync::Mutex<Option<Kept>>,
}

struct Kept {
    conn: AsyncSmtpConnection,
    used: Instant,
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
        Ok(SmtpMailer {
            cfg: cfg.clone(),
            starttls,
            tls,
            hello: ClientId::default(),
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// Connects, secures and logs in.
    async fn connect(&self, token: Option<&str>) -> Result<AsyncSmtpConnection, SmtpError> {
        let ep = &self.cfg.endpoint;
        let transient = |what: &str, e: &dyn std::fmt::Display| {
            SmtpError::Transient(format!("{what} {}:{}: {e}", ep.host, ep.port))
        };
        let tcp = tokio::time::timeout(ep.timeout, TcpStream::connect((ep.host.as_str(), ep.port)))
            .await
            .map_err(|e| transient("connecting to", &e))?
            .map_err(|e| transient("connecting to", &e))?;
        // lettre writes the body and the final dot separately: with Nagle
        // on, the dot waits for the server's delayed ACK (40 ms a mail).
        tcp.set_nodelay(true)
            .map_err(|e| transient("socket option for", &e))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.tls {
            Some(config) => {
                let name = ServerName::try_from(ep.host.clone())
                    .map_err(|e| SmtpError::Setup(format!("bad host name {:?}: {e}", ep.host)))?;
                let tls = tokio::time::timeout(
                    ep.timeout,
                    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
                )
                .await
                .map_err(|e| transient("TLS with", &e))?
                .map_err(|e| transient("TLS with", &e))?;
                Box::new(TlsTcp(tls))
            }
            None => Box::new(tcp),
        };
        let step = |e: lettre::transport::smtp::Error| classify(&e);
        let mut conn = tokio::time::timeout(
            ep.timeout,
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
        )
        .await
        .map_err(|e| transient("greeting from", &e))?
        .map_err(step)?;
        if let Some(params) = &self.starttls {
            if !conn.can_starttls() {
                return Err(SmtpError::Transient(format!(
                    "{}:{} does not offer STARTTLS; refusing to send unencrypted",
                    ep.host, ep.port
                )));
            }
            tokio::time::timeout(ep.timeout, conn.starttls(params.clone(), &self.hello))
                .await
                .map_err(|e| transient("STARTTLS with", &e))?
                .map_err(step)?;
        }
        // Read at every connection: a rotated password file is picked up,
        // and an unreadable one is the admin's to fix (kept, retried).
        let password = ep
            .password()
            .map_err(|e| SmtpError::Transient(format!("cannot read the SMTP password: {e}")))?;
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
                .map_err(|e| transient("login at", &e))?
                .map_err(|e| match classify(&e) {
                    // A refused login is the admin's to fix; keep the
                    // mail and retry with backoff rather than fail it.
                    SmtpError::Permanent(why) => {
                        SmtpError::Transient(format!("login refused: {why}"))
                    }
                    other => other,
                })?;
        }
        Ok(conn)
    }
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

fn classify(e: &lettre::transport::smtp::Error) -> SmtpError {
    if e.is_permanent() {
        SmtpError::Permanent(error_text(e))
    } else {
        SmtpError::Transient(error_text(e))
    }
}

#[async_trait::async_trait]
impl Mailer for SmtpMailer {
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
            if let Some(mut k) = slot.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), k.conn.quit()).await;
            }
        }
        let mut kept = match slot.take() {
            Some(k) => k,
            None => {
                // A token only for a new login: the command is not run
                // for every mail.
                let token = match &self.cfg.endpoint.oauth {
                    Some(source) => Some(
                        source
                            .token()
                            .await
                            .map_err(SmtpError::Transient)?
                            .expose()
                            .to_string(),
                    ),
                    None => None,
                };
                Kept {
                    conn: self.connect(token.as_deref()).await?,
                    used: Instant::now(),
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
                *slot = Some(kept);
                Ok(())
            }
            // Any error leaves the connection in an unknown state: drop it.
            Ok(Err(e)) => match classify(&e) {
                SmtpError::Transient(why) if after_data => Err(SmtpError::Unknown(why)),
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
}

/// MAIL, RCPT, DATA, then the message: lettre's `send`, split so that we
/// know whether a failure came before the data went out (the server has
/// nothing) or after (it may have accepted the mail).
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    raw: &[u8],
    data_sent: &std::sync::atomic::AtomicBool,
) -> Result<(), lettre::transport::smtp::Error> {
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
        .await?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new())).await?;
    }
    conn.command(Data).await?;
    data_sent.store(true, std::sync::atomic::Ordering::SeqCst);
    conn.message(raw).await?;
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
