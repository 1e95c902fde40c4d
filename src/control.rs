//! The control socket: while the daemon owns the store (the embedded store allows one
//! process), the CLI asks the daemon instead. A Unix socket inside the
//! store directory, which is mode 0700, so only the store's owner can
//! connect. One JSON request line in, one JSON response line out.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Request, Response};
use crate::handle::Handle;

pub fn socket_path(store: &Path) -> PathBuf {
    store.join("control.sock")
}

/// Binds the socket and returns the task that serves it.
pub fn serve(
    shared: Handle,
    cancel: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let path = socket_path(shared.store.path());
    // A socket left by a killed daemon; we hold the store lock, so no
    // other daemon can be using it.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let ing = shared.clone();
                        tokio::spawn(async move {
                            if let Err(e) = answer(ing, stream).await {
                                tracing::warn!(error = %e, "control request failed");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    })
}

async fn answer(shared: Handle, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response {
            code: 2,
            output: format!("bad request: {e}\n"),
        },
        Ok(req) => tokio::task::spawn_blocking(move || admin::handle(&shared, &req))
            .await
            .map_err(std::io::Error::other)?
            .unwrap_or_else(|e| Response {
                code: 1,
                output: format!("error: {}\n", crate::error_chain(&e)),
            }),
    };
    let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// Sends a request to a running daemon.
pub async fn ask(store: &Path, req: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket_path(store)).await?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut resp = String::new();
    BufReader::new(r).read_line(&mut resp).await?;
    serde_json::from_str(&resp).map_err(std::io::Error::other)
}
