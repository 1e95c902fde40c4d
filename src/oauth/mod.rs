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

pub use crate::credentials::{AccessTokens, InHand, TokenError};
pub use broker::{Broker, GrantError};

use crate::config::Secret;

#[async_trait::async_trait]
impl AccessTokens for Broker {
    async fn access_token(&self, identity: &str) -> Result<Secret, TokenError> {
        Broker::access_token(self, identity)
            .await
            .map_err(|e| TokenError {
                needs_login: e.needs_login(),
                why: e.to_string(),
            })
    }
    async fn rejected(&self, identity: &str, token: &Secret) {
        if let Err(e) = Broker::rejected(self, identity, token) {
            tracing::warn!(identity = %identity, error = %e, "cannot record a refused access token");
        }
    }
}

/// Why `run` and `check-config` cannot use the token key, when some
/// server logs in as an identity (None: fine, or nobody needs it).
pub fn key_problem(config: &crate::config::Config) -> Option<String> {
    if config.identities_in_use().is_empty() {
        return None;
    }
    Broker::key(&config.oauth2).err()
}

#[cfg(test)]
mod tests;
