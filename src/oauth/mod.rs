//! OAuth 2 identities for mailboxes on Microsoft 365 and Gmail: the
//! logins (device code, authorization code with PKCE, client
//! credentials; [`flow`]), the grants kept in the store with their
//! tokens sealed ([`vault`]), and access tokens handed to IMAP and SMTP
//! logins, refreshed ahead of expiry by one node at a time ([`broker`]).

pub mod broker;
pub mod flow;
pub mod vault;

pub use broker::{Broker, GrantError};

use crate::config::{Secret, TokenSource};

/// An access token for a login through `source`: a token file or
/// command as before, or an identity's grant through `broker` (None
/// where no store is open, which says so).
pub async fn token(source: &TokenSource, broker: Option<&Broker>) -> Result<Secret, String> {
    match (source, broker) {
        (TokenSource::Identity(name), Some(b)) => {
            b.access_token(name).await.map_err(|e| e.to_string())
        }
        _ => source.token().await,
    }
}

#[cfg(test)]
mod tests;
