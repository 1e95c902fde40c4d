//! The IMAP connection: TCP, TLS or STARTTLS, login. Every network step
//! has a timeout, so a server that stops answering is a reconnect, not a
//! hang.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_imap::{Client, Session};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Endpoint, Security};
use crate::credentials::AccessTokens;

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
    /// A configured folder the server does not have: the key to change
    /// and the folders it does have, so the fix is in the message.
    #[error("{key} {folder:?} does not exist; the server has: {}", .available.join(", "))]
    MissingFolder {
        key: String,
        folder: String,
        available: Vec<String>,
    },
    #[error("the server closed the connection")]
    Closed,
    /// The password could not be read (variable unset, file unreadable).
    #[error("cannot read the IMAP password: {0}")]
    Secret(String),
    /// No OAuth 2 access token (a dead grant, the provider down).
    #[error("no OAuth 2 token for the login: {0}")]
    Token(#[source] crate::credentials::TokenError),
}

impl ImapError {
    /// Wrong credentials: worth a longer pause and an error-level log.
    pub fn is_auth(&self) -> bool {
        matches!(self, ImapError::Auth { .. } | ImapError::Secret(_))
            || matches!(self, ImapError::Token(t) if t.needs_login)
    }

    /// A mistake in the config (credentials, a folder name) rather than
    /// the network: it will not go away by itself.
    pub fn is_config(&self) -> bool {
        self.is_auth() || matches!(self, ImapError::MissingFolder { .. })
    }

    /// What the admin should change, when the error says it (see
    /// [`crate::tls::hint`]).
    pub fn hint(&self, ep: &Endpoint) -> Option<String> {
        let key = |k: &str| format!("{}.{k}", ep.section);
        match self {
            ImapError::Auth { .. } if ep.oauth.is_some() => Some(format!(
                "the server refused the OAuth 2 token: check {} and where the token comes from",
                key("username")
            )),
            ImapError::Auth { .. } => Some(format!(
                "the server refused the login: check {} and {}",
                key("username"),
                ep.password_keys()
            )),
            ImapError::Secret(_) => Some(format!("check {}", ep.password_keys())),
            ImapError::Timeout("greeting") if ep.security != Security::Tls => Some(format!(
                "the server sent no greeting: it may expect TLS at once on port {}: try {} = \"tls\"",
                ep.port,
                key("security")
            )),
            ImapError::Tls(_, e) => crate::tls::hint(e, ep),
            ImapError::Connect(..) => Some(format!(
                "nothing answers at {}:{}: check {} and {}",
                ep.host,
                ep.port,
                key("host"),
                key("port")
            )),
            ImapError::NoStarttls => Some(format!(
                "if the port expects TLS at once, set {} = \"tls\"",
                key("security")
            )),
            ImapError::MissingFolder { key: k, .. } => Some(format!(
                "set {k} to one of the folders the server has"
            )),
            _ => None,
        }
    }
}

/// Plain or TLS, behind one type so the session code is shared.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// A scripted server in the same process (unit tests).
    #[cfg(test)]
    Fake(tokio::io::DuplexStream),
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
            #[cfg(test)]
            Stream::Fake(s) => Pin::new(s).poll_read(cx, buf),
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
            #[cfg(test)]
            Stream::Fake(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(test)]
            Stream::Fake(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(test)]
            Stream::Fake(s) => Pin::new(s).poll_shutdown(cx),
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
pub async fn connect(
    ep: &Endpoint,
    tokens: Option<&dyn AccessTokens>,
) -> Result<ImapSession, ImapError> {
    login(ep, secure(ep).await?, tokens).await
}

/// Connects and secures: a client that has had the server's greeting.
async fn secure(ep: &Endpoint) -> Result<Client<Stream>, ImapError> {
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
    Ok(client)
}

/// A session on a scripted server (unit tests): its greeting, then login.
#[cfg(test)]
pub async fn connect_fake(
    ep: &Endpoint,
    stream: tokio::io::DuplexStream,
) -> Result<ImapSession, ImapError> {
    connect_fake_with(ep, stream, None).await
}

/// The same, logging in with tokens from `tokens`.
#[cfg(test)]
pub async fn connect_fake_with(
    ep: &Endpoint,
    stream: tokio::io::DuplexStream,
    tokens: Option<&dyn AccessTokens>,
) -> Result<ImapSession, ImapError> {
    let mut c = Client::new(Stream::Fake(stream));
    greeting(ep, &mut c).await?;
    login(ep, c, tokens).await
}

/// Logs in with the endpoint's password or OAuth token.
async fn login(
    ep: &Endpoint,
    client: Client<Stream>,
    tokens: Option<&dyn AccessTokens>,
) -> Result<ImapSession, ImapError> {
    let user = ep.username.clone().unwrap_or_default();
    if let Some(source) = &ep.oauth {
        return oauth_login(ep, client, source, tokens).await;
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
            why: server_words(&e),
        }),
    }
}

/// XOAUTH2 with the token `source` gives. A token of the store's grant
/// that the server refuses is reported to the broker and, once, a fresh
/// one is tried on the same connection (revoked before its end); a grant
/// that is gone then says so with the command that fixes it.
async fn oauth_login(
    ep: &Endpoint,
    mut client: Client<Stream>,
    source: &crate::config::TokenSource,
    tokens: Option<&dyn AccessTokens>,
) -> Result<ImapSession, ImapError> {
    let user = ep.username.clone().unwrap_or_default();
    let identity = match source {
        crate::config::TokenSource::Identity(name) => tokens.map(|t| (name.as_str(), t)),
        _ => None,
    };
    let bearer = Mechanism::choose(&mechanisms(ep, &mut client).await?);
    let mut tried_fresh = false;
    loop {
        let token = crate::credentials::token(source, tokens)
            .await
            .map_err(ImapError::Token)?;
        let said = Arc::new(Mutex::new(None));
        let auth = XOAuth2 {
            response: bearer.initial(ep, &user, &token),
            after_error: bearer.after_error(),
            sent: false,
            said: said.clone(),
        };
        let mut session = match tokio::time::timeout(
            ep.timeout,
            client.authenticate(bearer.name(), auth),
        )
        .await
        {
            Err(_) => return Err(ImapError::Timeout("AUTHENTICATE")),
            Ok(Ok(s)) => s,
            Ok(Err((e, back))) => {
                if let (Some((name, t)), false) = (identity, tried_fresh) {
                    t.rejected(name, &token).await;
                    tried_fresh = true;
                    client = back;
                    continue;
                }
                let detail = said
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|s: String| format!(" (the server said {s})"))
                    .unwrap_or_default();
                return Err(ImapError::Auth {
                    user,
                    why: format!("{}: {}{detail}", bearer.name(), server_words(&e)),
                });
            }
        };
        // A server may take AUTHENTICATE and refuse what follows (a
        // token for the wrong mailbox): one command before trusting it.
        // (async-imap's `noop` takes any answer as success: checked here.)
        return match tokio::time::timeout(ep.timeout, session.run_command_and_check_ok("NOOP"))
            .await
        {
            Err(_) => Err(ImapError::Timeout("NOOP after AUTHENTICATE")),
            Ok(Ok(())) => Ok(session),
            Ok(Err(e)) => Err(ImapError::Auth {
                user,
                why: format!(
                    "the server took the token but refused the next command: {}",
                    server_words(&e)
                ),
            }),
        };
    }
}

/// The server's own words of a NO or BAD (its response code included,
/// `[AUTHENTICATIONFAILED] Authentication failed.`), else the error.
pub fn server_words(e: &async_imap::error::Error) -> String {
    match e {
        async_imap::error::Error::No(w) | async_imap::error::Error::Bad(w) => undebug(w),
        other => other.to_string(),
    }
}

/// async-imap writes a NO's text as Rust debug output (`code: None,
/// info: Some("[AUTHENTICATIONFAILED] Authentication failed.")`): the
/// text inside, unescaped, for an admin to read.
fn undebug(w: &str) -> String {
    let Some(start) = w.find("info: Some(\"") else {
        return w.to_string();
    };
    let inner = &w[start + "info: Some(\"".len()..];
    let inner = inner.strip_suffix("\")").unwrap_or(inner);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push(' '),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
#[test]
fn a_no_response_reads_as_the_server_wrote_it() {
    let e = async_imap::error::Error::No(
        "code: None, info: Some(\"[AUTHENTICATIONFAILED] Authentication \\\"failed\\\".\")".into(),
    );
    assert_eq!(
        server_words(&e),
        "[AUTHENTICATIONFAILED] Authentication \"failed\"."
    );
}

/// The SASL mechanisms the server offers before login (its CAPABILITY
/// answer's `AUTH=`), upper-case; empty when it lists none.
async fn mechanisms(ep: &Endpoint, client: &mut Client<Stream>) -> Result<Vec<String>, ImapError> {
    use async_imap::imap_proto::{Capability, RequestId, Response};
    use tokio::io::AsyncWriteExt;
    // async-imap sends tagged commands only after login; before it, the
    // command goes on the stream with a tag of our own (its tags are
    // A0001, ...), and the answers are read through the client.
    const TAG: &str = "CAP0";
    let stream = client.get_mut();
    timed(
        ep,
        "CAPABILITY",
        async {
            stream
                .write_all(format!("{TAG} CAPABILITY\r\n").as_bytes())
                .await?;
            stream.flush().await
        },
        |e| ImapError::Connect(ep.host.clone(), e),
    )
    .await?;
    let id = RequestId(TAG.to_string());
    let mut out = Vec::new();
    loop {
        let resp = timed(ep, "CAPABILITY", client.read_response(), |e| {
            ImapError::Connect(ep.host.clone(), e)
        })
        .await?
        .ok_or(ImapError::Closed)?;
        match resp.parsed() {
            Response::Capabilities(caps) => out.extend(caps.iter().filter_map(|c| match c {
                Capability::Auth(m) => Some(m.to_ascii_uppercase()),
                _ => None,
            })),
            Response::Done { tag, .. } if *tag == id => return Ok(out),
            _ => {}
        }
    }
}

/// The bearer-token SASL mechanism of a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    XOAuth2,
    /// RFC 7628, where a server offers only it.
    OAuthBearer,
}

impl Mechanism {
    /// XOAUTH2 (Gmail's, Microsoft's) unless the server offers
    /// OAUTHBEARER and not XOAUTH2.
    fn choose(offered: &[String]) -> Mechanism {
        let has = |m: &str| offered.iter().any(|o| o == m);
        if has("OAUTHBEARER") && !has("XOAUTH2") {
            Mechanism::OAuthBearer
        } else {
            Mechanism::XOAuth2
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    fn initial(self, ep: &Endpoint, user: &str, token: &crate::config::Secret) -> String {
        match self {
            Mechanism::XOAuth2 => crate::config::TokenSource::xoauth2(user, token),
            // The GS2 header's authzid escapes ',' and '=' (RFC 5801).
            Mechanism::OAuthBearer => format!(
                "n,a={},\x01host={}\x01port={}\x01auth=Bearer {}\x01\x01",
                user.replace('=', "=3D").replace(',', "=2C"),
                ep.host,
                ep.port,
                token.expose()
            ),
        }
    }

    /// What the client answers to the server's error challenge.
    fn after_error(self) -> &'static str {
        match self {
            Mechanism::XOAuth2 => "",
            Mechanism::OAuthBearer => "\x01",
        }
    }
}

/// SASL XOAUTH2 or OAUTHBEARER: the initial response, then (on failure
/// the server sends a JSON error as a challenge) the answer the
/// mechanism requires, so the server's NO follows.
struct XOAuth2 {
    response: String,
    after_error: &'static str,
    sent: bool,
    /// The server's error challenge (Gmail's and Dovecot's JSON: status,
    /// schemes, scope), for the error message.
    said: Arc<Mutex<Option<String>>>,
}

impl async_imap::Authenticator for XOAuth2 {
    type Response = String;
    fn process(&mut self, challenge: &[u8]) -> String {
        if std::mem::replace(&mut self.sent, true) {
            let text: String = crate::template::printable(&String::from_utf8_lossy(challenge))
                .chars()
                .take(300)
                .collect();
            if !text.trim().is_empty() {
                *self.said.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
            }
            self.after_error.to_string()
        } else {
            self.response.clone()
        }
    }
}

/// Most folder names an error lists.
const MAX_FOLDERS_SHOWN: usize = 50;

/// The folders the server has (LIST "" "*"), sorted, for error messages.
pub async fn folders(ep: &Endpoint, s: &mut ImapSession) -> Result<Vec<String>, ImapError> {
    use futures::TryStreamExt;
    let names = timed(
        ep,
        "LIST",
        async {
            s.list(Some(""), Some("*"))
                .await?
                .try_collect::<Vec<_>>()
                .await
        },
        |e| ImapError::Protocol("LIST", e),
    )
    .await?;
    let mut out: Vec<String> = names.iter().map(|n| n.name().to_string()).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Opens `folder` read-write (SELECT) and names `key` when it does not
/// exist. Read-write because some servers (Courier) keep a folder's UIDs
/// only for sessions that SELECT it, and give every EXAMINE a new
/// UIDVALIDITY; nothing is changed anyway: messages are read with
/// BODY.PEEK, so their \Seen flag stays as it was.
pub async fn select(
    ep: &Endpoint,
    s: &mut ImapSession,
    folder: &str,
    key: &str,
) -> Result<async_imap::types::Mailbox, ImapError> {
    match timed(ep, "SELECT", s.select(folder), |e| {
        ImapError::Folder(folder.to_string(), e)
    })
    .await
    {
        Ok(m) => Ok(m),
        Err(ImapError::Folder(f, async_imap::error::Error::No(why))) => {
            // NO: the server refuses this folder. Missing, most often:
            // say which ones it has (a second round trip only now).
            let mut available = folders(ep, s).await?;
            if available.iter().any(|a| a == &f) {
                return Err(ImapError::Folder(f, async_imap::error::Error::No(why)));
            }
            // A server with thousands of shared folders: the first ones.
            if available.len() > MAX_FOLDERS_SHOWN {
                let more = available.len() - MAX_FOLDERS_SHOWN;
                available.truncate(MAX_FOLDERS_SHOWN);
                available.push(format!("... and {more} more"));
            }
            Err(ImapError::MissingFolder {
                key: key.to_string(),
                folder: f,
                available,
            })
        }
        Err(e) => Err(e),
    }
}
