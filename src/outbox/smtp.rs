//! SMTP: hands composed mail to the server with lettre (pooled, async).
//! lettre does not retry; we classify its errors so the outbox can
//! retry what is transient and give up on what the server refused.

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

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
}

/// Sends raw mail; a trait so the outbox worker can be tested without a
/// network (the real server is used in tests/).
#[async_trait::async_trait]
pub trait Mailer: Send + Sync {
    async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError>;
}

pub struct SmtpMailer {
    cfg: SmtpConfig,
    /// The pooled transport, and the OAuth token it was built with: a
    /// new token (the admin's tooling refreshed it) builds a new one.
    transport: tokio::sync::Mutex<Option<(Option<String>, AsyncSmtpTransport<Tokio1Executor>)>>,
}

impl SmtpMailer {
    pub fn new(cfg: &SmtpConfig) -> Result<SmtpMailer, SmtpError> {
        let mailer = SmtpMailer {
            cfg: cfg.clone(),
            transport: tokio::sync::Mutex::new(None),
        };
        if cfg.endpoint.oauth.is_none() {
            // Catch TLS set-up errors at start, not at the first mail.
            let t = mailer.build(None)?;
            mailer
                .transport
                .try_lock()
                .map_err(|e| SmtpError::Setup(e.to_string()))?
                .replace((None, t));
        }
        Ok(mailer)
    }

    fn build(&self, token: Option<&str>) -> Result<AsyncSmtpTransport<Tokio1Executor>, SmtpError> {
        let ep = &self.cfg.endpoint;
        let tls_params = || -> Result<TlsParameters, SmtpError> {
            let mut b = TlsParameters::builder(ep.host.clone());
            if let Some(ca) = &ep.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| SmtpError::Setup(format!("cannot read {}: {e}", ca.display())))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| SmtpError::Setup(format!("{}: {e}", ca.display())))?;
                b = b.add_root_certificate(cert);
            }
            b.build_rustls()
                .map_err(|e| SmtpError::Setup(e.to_string()))
        };
        let tls = match ep.security {
            Security::Tls => Tls::Wrapper(tls_params()?),
            Security::Starttls => Tls::Required(tls_params()?),
            Security::Plain => Tls::None,
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(ep.host.clone())
            .port(ep.port)
            .tls(tls)
            .timeout(Some(ep.timeout))
            .pool_config(
                PoolConfig::new()
                    .max_size(4)
                    .idle_timeout(Duration::from_secs(30)),
            );
        if let (Some(user), Some(token)) = (&ep.username, token) {
            b = b
                .credentials(Credentials::new(user.clone(), token.to_string()))
                .authentication(vec![Mechanism::Xoauth2]);
        } else if let (Some(user), Some(pw)) = (&ep.username, &ep.password) {
            b = b.credentials(Credentials::new(user.clone(), pw.expose().to_string()));
        }
        Ok(b.build())
    }

    /// The transport to send with, rebuilt when the OAuth token changed.
    async fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, SmtpError> {
        let token = match &self.cfg.endpoint.oauth {
            Some(source) => Some(
                source
                    .token()
                    .map_err(SmtpError::Transient)?
                    .expose()
                    .to_string(),
            ),
            None => None,
        };
        let mut slot = self.transport.lock().await;
        if let Some((t, transport)) = &*slot {
            if *t == token {
                return Ok(transport.clone());
            }
        }
        let transport = self.build(token.as_deref())?;
        *slot = Some((token, transport.clone()));
        Ok(transport)
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
        let transport = self.transport().await?;
        match transport.send_raw(&envelope, raw).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SmtpError::Permanent(error_text(&e))),
            Err(e) => Err(SmtpError::Transient(error_text(&e))),
        }
    }
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
