//! The daemon's OAuth 2 keeper: refreshes each identity's access token
//! ahead of its expiry (so a login never waits for a refresh, and a
//! dying grant is seen before mail needs it), and says once an hour
//! which identity needs `escalator auth login` while its mail waits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::config::Live;

/// How often the keeper looks (under the one minute a token is at least
/// refreshed before its end).
pub const EVERY: Duration = Duration::from_secs(30);
/// How often a dead grant's error is logged again.
pub const TELL_EVERY: Duration = Duration::from_secs(3600);

/// Runs until cancelled.
pub async fn keep(broker: Arc<Broker>, config: Arc<Live>, cancel: CancellationToken) {
    let mut told: HashMap<String, Instant> = HashMap::new();
    loop {
        for name in config.get().identities_in_use() {
            look(&broker, &name, &mut told).await;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One identity: a token fetched (refreshed when due), or the reason
/// why not, told at most once per [`TELL_EVERY`] when only a login helps.
pub async fn look(broker: &Broker, name: &str, told: &mut HashMap<String, Instant>) -> bool {
    match broker.access_token(name).await {
        Ok(_) => {
            if told.remove(name).is_some() {
                tracing::info!(identity = %name, "the OAuth 2 identity logs in again; waiting mail is fetched and sent");
            }
            true
        }
        Err(e) if e.needs_login() => {
            let due = told.get(name).is_none_or(|t| t.elapsed() >= TELL_EVERY);
            if due {
                tracing::error!(
                    identity = %name,
                    error = %e,
                    fix = %format!("escalator auth login {name}"),
                    "an OAuth 2 identity cannot log in: the mail of its mailboxes waits there (nothing is lost) and its outgoing mail stays queued until an admin logs in again"
                );
                told.insert(name.to_string(), Instant::now());
            }
            false
        }
        Err(e) => {
            tracing::warn!(identity = %name, error = %e, retry_in = ?EVERY, "cannot refresh an OAuth 2 access token yet");
            false
        }
    }
}
