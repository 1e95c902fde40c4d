//! OAuth 2 identities for mailboxes on Microsoft 365 and Gmail: the
//! logins (device code, authorization code with PKCE, client
//! credentials; [`flow`]), the grants kept in the store with their
//! tokens sealed ([`vault`]), and access tokens handed to IMAP and SMTP
//! logins, refreshed ahead of expiry by one node at a time ([`broker`]).

pub mod broker;
pub mod flow;
pub mod keeper;
pub mod login;
pub mod vault;

pub use broker::{Broker, GrantError};

/// Where logins get access tokens: the [`Broker`] (the store's grants)
/// in the daemon, or a token in hand right after `auth login`.
#[async_trait::async_trait]
pub trait AccessTokens: Send + Sync {
    async fn access_token(&self, identity: &str) -> Result<Secret, GrantError>;
    /// A server refused `token` (revoked before its time): the next
    /// [`AccessTokens::access_token`] gets a fresh one rather than it.
    async fn rejected(&self, _identity: &str, _token: &Secret) {}
}

#[async_trait::async_trait]
impl AccessTokens for Broker {
    async fn access_token(&self, identity: &str) -> Result<Secret, GrantError> {
        Broker::access_token(self, identity).await
    }
    async fn rejected(&self, identity: &str, token: &Secret) {
        if let Err(e) = Broker::rejected(self, identity, token) {
            tracing::warn!(identity = %identity, error = %e, "cannot record a refused access token");
        }
    }
}

/// One identity's token, just obtained (the proof of `auth login`).
pub struct InHand {
    pub identity: String,
    pub token: Secret,
}

#[async_trait::async_trait]
impl AccessTokens for InHand {
    async fn access_token(&self, identity: &str) -> Result<Secret, GrantError> {
        if identity == self.identity {
            Ok(self.token.clone())
        } else {
            Err(GrantError::Unknown(identity.to_string()))
        }
    }
}

use crate::config::{Secret, TokenSource};

/// Why a login has no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct TokenError {
    pub why: String,
    /// Only an admin's `escalator auth login` helps (the mail waits).
    pub needs_login: bool,
}

/// An access token for a login through `source`: a token file or
/// command as before, or an identity's grant through `broker` (None
/// where no store is open, which says so).
pub async fn token(
    source: &TokenSource,
    broker: Option<&dyn AccessTokens>,
) -> Result<Secret, TokenError> {
    match (source, broker) {
        (TokenSource::Identity(name), Some(b)) => {
            b.access_token(name).await.map_err(|e| TokenError {
                needs_login: e.needs_login(),
                why: e.to_string(),
            })
        }
        _ => source.token().await.map_err(|why| TokenError {
            why,
            needs_login: false,
        }),
    }
}

#[cfg(test)]
mod tests;
