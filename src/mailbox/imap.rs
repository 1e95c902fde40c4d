//! The IMAP connection: TCP, TLS or STARTTLS, login. Every network step
//! has a timeout, so a server that stops answering is a reconnect, not a
//! hang.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_imap::{Client, Session};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Endpoint, Security};

/// Why talking to the IMAP server failed.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("TLS with {0} failed")]
    Tls(String, #[source] std::io::Error),
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("the server does not offer STARTTLS; refusing to continue unencrypted")]
    NoStarttls,
    #[error("login as {user} refused by the server: {why}")]
    Auth { user: String, why: String },
    #[error("IMAP {0} timed out")]
    Timeout(&'static str),
    #[error("IMAP {0} failed")]
    Protocol(&'static str, #[source] async_imap::error::Error),
    #[error("folder {0:?} cannot be opened")]
    Folder(String, #[source] async_imap::error::Error),
    #[error("the server closed the connection")]
    Closed,
    /// The password could not be read (variable unset, file unreadable).
    #[error("cannot read the IMAP password: {0}")]
    Secret(String),
}

impl ImapError {
    /// Wrong credentials: worth a longer pause and an error-level log.
    pub fn is_auth(&self) -> bool {
        matches!(self, ImapError::Auth { .. } | ImapError::Secret(_))
    }
}

/// Plain or TLS, behind one type so the session code is shared.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub type ImapSession = Session<Stream>;

/// Runs `fut` with the endpoint's timeout.
pub async fn timed<T, E>(
    ep: &Endpoint,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
    map: impl FnOnce(E) -> ImapError,
) -> Result<T, ImapError> {
    match tokio::time::timeout(ep.timeout, fut).await {
        Ok(r) => r.map_err(map),
        Err(_) => Err(ImapError::Timeout(what)),
    }
}

async fn tls_wrap(ep: &Endpoint, tcp: TcpStream) -> Result<Stream, ImapError> {
    let config = crate::tls::client_config(ep.ca_file.as_deref()).map_err(ImapError::TlsSetup)?;
    let name = rustls_pki_types::ServerName::try_from(ep.host.clone())
        .map_err(|e| ImapError::TlsSetup(format!("bad host name {:?}: {e}", ep.host)))?;
    let tls = timed(
        ep,
        "TLS handshake",
        TlsConnector::from(config).connect(name, tcp),
        |e| ImapError::Tls(ep.host.clone(), e),
    )
    .await?;
    Ok(Stream::Tls(Box::new(tls)))
}

async fn greeting(ep: &Endpoint, client: &mut Client<Stream>) -> Result<(), ImapError> {
    match timed(ep, "greeting", client.read_response(), |e| {
        ImapError::Connect(ep.host.clone(), e)
    })
    .await?
    {
        Some(_) => Ok(()),
        None => Err(ImapError::Closed),
    }
}

/// Connects, secures and logs in.
pub async fn connect(ep: &Endpoint) -> Result<ImapSession, ImapError> {
    let addr = format!("{}:{}", ep.host, ep.port);
    let tcp = timed(ep, "connect", TcpStream::connect(&addr), |e| {
        ImapError::Connect(addr.clone(), e)
    })
    .await?;
    let _ = tcp.set_nodelay(true);
    let client = match ep.security {
        Security::Tls => {
            let mut c = Client::new(tls_wrap(ep, tcp).await?);
            greeting(ep, &mut c).await?;
            c
        }
        Security::Plain => {
            let mut c = Client::new(Stream::Plain(tcp));
            greeting(ep, &mut c).await?;
            c
        }
        Security::Starttls => {
            let mut c = Client::new(Stream::Plain(tcp));
            greeting(ep, &mut c).await?;
            timed(
                ep,
                "STARTTLS",
                c.run_command_and_check_ok("STARTTLS", None),
                |_| ImapError::NoStarttls,
            )
            .await?;
            let Stream::Plain(tcp) = c.into_inner() else {
                return Err(ImapError::NoStarttls);
            };
            Client::new(tls_wrap(ep, tcp).await?)
        }
    };
    let user = ep.username.clone().unwrap_or_default();
    if let Some(source) = &ep.oauth {
        let token = source.token().await.map_err(|why| ImapError::Auth {
            user: user.clone(),
            why,
        })?;
        let auth = XOAuth2 {
            response: crate::config::TokenSource::xoauth2(&user, &token),
            sent: false,
        };
        return match tokio::time::timeout(ep.timeout, client.authenticate("XOAUTH2", auth)).await {
            Err(_) => Err(ImapError::Timeout("AUTHENTICATE")),
            Ok(Ok(s)) => Ok(s),
            Ok(Err((e, _))) => Err(ImapError::Auth {
                user,
                why: format!("XOAUTH2: {e}"),
            }),
        };
    }
    let pass = ep
        .password()
        .map_err(ImapError::Secret)?
        .map(|p| p.expose().to_string())
        .unwrap_or_default();
    match tokio::time::timeout(ep.timeout, client.login(&user, &pass)).await {
        Err(_) => Err(ImapError::Timeout("login")),
        Ok(Ok(s)) => Ok(s),
        Ok(Err((e, _))) => Err(ImapError::Auth {
            user,
            why: e.to_string(),
        }),
    }
}

/// SASL XOAUTH2: the initial response, then (on failure the server sends
/// a JSON error as a challenge) an empty line, as the mechanism requires.
struct XOAuth2 {
    response: String,
    sent: bool,
}

impl async_imap::Authenticator for XOAuth2 {
    type Response = String;
    fn process(&mut self, _challenge: &[u8]) -> String {
        if std::mem::replace(&mut self.sent, true) {
            String::new()
        } else {
            self.response.clone()
        }
    }
}
