//! Where a login's OAuth 2 access token comes from, for the IMAP and
//! SMTP clients: a token file or command (`auth = "xoauth2"`), or an
//! identity's grant through [`AccessTokens`] (the store's broker in the
//! daemon, a token in hand after `auth login`). A leaf beside the
//! config, so the mail clients need not know the OAuth machinery.

use crate::config::{Secret, TokenSource};

/// Why a login has no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct TokenError {
    pub why: String,
    /// Only an admin's `escalator auth login` helps (the mail waits).
    pub needs_login: bool,
}

/// Where logins get access tokens for `[oauth2]` identities.
#[async_trait::async_trait]
pub trait AccessTokens: Send + Sync {
    async fn access_token(&self, identity: &str) -> Result<Secret, TokenError>;
    /// A server refused `token` (revoked before its time): the next
    /// [`AccessTokens::access_token`] gets a fresh one rather than it.
    async fn rejected(&self, _identity: &str, _token: &Secret) {}
}

/// One identity's token, just obtained (the proof of `auth login`).
pub struct InHand {
    pub identity: String,
    pub token: Secret,
}

#[async_trait::async_trait]
impl AccessTokens for InHand {
    async fn access_token(&self, identity: &str) -> Result<Secret, TokenError> {
        if identity == self.identity {
            Ok(self.token.clone())
        } else {
            Err(TokenError {
                why: format!("no token for identity {identity:?} in hand"),
                needs_login: false,
            })
        }
    }
}

/// An access token for a login through `source`: a token file or
/// command as before, or an identity's grant through `tokens` (None
/// where no store is open, which says so).
pub async fn token(
    source: &TokenSource,
    tokens: Option<&dyn AccessTokens>,
) -> Result<Secret, TokenError> {
    match (source, tokens) {
        (TokenSource::Identity(name), Some(t)) => t.access_token(name).await,
        _ => source.token().await.map_err(|why| TokenError {
            why,
            needs_login: false,
        }),
    }
}
