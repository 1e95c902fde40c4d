//! `escalator auth login NAME`: the conversation with the admin. The
//! device flow prints a URL and a code and waits; the browser flow
//! prints a URL and takes the answer from the browser's redirect to a
//! loopback port, or from the address the admin pastes back (a server
//! without a browser: the admin signs in elsewhere, and that browser's
//! redirect to 127.0.0.1 fails, showing the address to copy).

use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::flow::{FlowError, Issuer, Tokens};
use crate::config::oauth::{Flow, Identity};

/// The longest a browser login waits for the admin.
pub const BROWSER_WAIT: Duration = Duration::from_secs(15 * 60);

/// Runs the identity's login and returns its tokens; what the admin
/// must do goes to `out`.
pub async fn obtain(id: &Identity, out: &mut (dyn Write + Send)) -> Result<Tokens, FlowError> {
    let issuer = Issuer::new(id)?;
    match id.flow {
        Flow::Device => {
            let login = issuer.start_device().await?;
            // The provider's words reach the admin's terminal: escaped.
            let p = crate::template::printable;
            let _ = writeln!(
                out,
                "To sign in as the mailbox's account, open {} in a browser (on any device) and enter the code {}",
                p(&login.verification_uri),
                p(&login.user_code)
            );
            if let Some(full) = &login.verification_uri_complete {
                let _ = writeln!(out, "(or open {}, which carries the code)", p(full));
            }
            let _ = writeln!(
                out,
                "Waiting for the sign-in (the code expires in {} minutes)...",
                login.expires_in.as_secs().div_ceil(60)
            );
            let _ = out.flush();
            issuer.finish_device(&login).await
        }
        Flow::AuthorizationCode => browser(&issuer, id, out).await,
        Flow::ClientCredentials => {
            let _ = writeln!(
                out,
                "App-only access (client credentials): asking for a token with the client's secret"
            );
            issuer.client_credentials().await
        }
    }
}

async fn browser(
    issuer: &Issuer,
    id: &Identity,
    out: &mut (dyn Write + Send),
) -> Result<Tokens, FlowError> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", id.redirect_port))
        .await
        .map_err(|e| {
            FlowError::Config(format!(
                "cannot listen on 127.0.0.1:{} for the browser's return: {e} (oauth2.{}.redirect_port)",
                id.redirect_port, id.name
            ))
        })?;
    let port = listener
        .local_addr()
        .map_err(|e| FlowError::Config(e.to_string()))?
        .port();
    let redirect = format!("http://127.0.0.1:{port}/");
    let login = issuer.start_browser(&redirect)?;
    let _ = writeln!(
        out,
        "Open this address in a browser and sign in as the mailbox's account:\n\n  {}\n",
        login.url
    );
    let _ = writeln!(
        out,
        "This machine receives the answer on {redirect}. If the browser runs elsewhere, its last page fails to load: copy that page's whole address (it starts with {redirect}) and paste it here, then press Enter."
    );
    let _ = out.flush();
    let returned = tokio::time::timeout(BROWSER_WAIT, async {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        tokio::select! {
            r = redirected(&listener, login.state()) => Ok(r),
            line = stdin.next_line() => match line {
                Ok(Some(l)) if !l.trim().is_empty() => Ok(l),
                _ => Err(FlowError::Login("nothing was pasted back".into())),
            },
        }
    })
    .await
    .map_err(|_| {
        FlowError::Login(format!(
            "no answer within {} minutes; run escalator auth login {} again",
            BROWSER_WAIT.as_secs() / 60,
            id.name
        ))
    })??;
    issuer.finish_browser(login, &returned).await
}

/// Waits for the browser's request to the loopback port that carries
/// this login's `state` and answers it with a short page; returns the
/// request's path with its query. Anything else (a favicon, a probe, a
/// web page that points an image at the port) is answered and ignored,
/// so it cannot end the login.
async fn redirected(listener: &tokio::net::TcpListener, state: &str) -> String {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let mut buf = vec![0u8; 8192];
        let n = match tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => continue,
        };
        let head = String::from_utf8_lossy(&buf[..n]);
        let Some(target) = head
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
        else {
            continue;
        };
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let ours =
            url::form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "state" && v == state);
        if !ours {
            let _ = sock
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            continue;
        }
        let page = "escalator received the sign-in; you can close this window.";
        let _ = sock
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                )
                .as_bytes(),
            )
            .await;
        return target.to_string();
    }
}
