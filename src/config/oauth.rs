//! `[oauth2]`: the identities escalator logs in as on Microsoft 365,
//! Gmail or another OAuth 2 provider, and where the key that seals their
//! tokens comes from. The provider defaults (endpoints, scopes) live
//! here, so the validator only has to say what a provider refuses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::PasswordSource;

/// The environment variable read for the token key when `[oauth2]
/// key_file` is not set.
pub const TOKEN_KEY_ENV: &str = "ESCALATOR_TOKEN_KEY";

/// `[oauth2]` as validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OAuthConfig {
    /// `key_file`; None: the key is read from [`TOKEN_KEY_ENV`].
    pub key_file: Option<PathBuf>,
    /// Who is told by mail when a grant dies (besides the digest).
    pub alert_to: Vec<String>,
    /// `[oauth2.NAME]`, by name.
    pub identities: BTreeMap<String, Identity>,
}

impl OAuthConfig {
    /// Where the token key comes from, for messages: the file or the
    /// environment variable.
    pub fn key_origin(&self) -> String {
        match &self.key_file {
            Some(p) => format!("oauth2.key_file {}", p.display()),
            None => format!("environment variable {TOKEN_KEY_ENV}"),
        }
    }
}

/// Who issues the tokens: decides the defaults and what is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Microsoft,
    Google,
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Microsoft => "microsoft",
            Provider::Google => "google",
            Provider::Generic => "generic",
        }
    }
}

/// How a grant is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// RFC 8628: the admin enters a code on another device.
    Device,
    /// The browser flow with PKCE and a loopback redirect.
    AuthorizationCode,
    /// App-only (no user, no refresh token): a token on demand with the
    /// client's secret.
    ClientCredentials,
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::Device => "device",
            Flow::AuthorizationCode => "authorization_code",
            Flow::ClientCredentials => "client_credentials",
        }
    }
}

impl Identity {
    /// The key its client secret was given with (`client_secret_file`,
    /// `client_secret_env`), for messages.
    pub fn client_secret_key(&self) -> Option<String> {
        self.client_secret
            .as_ref()
            .map(|s| s.key().replace("password", "client_secret"))
    }
}

/// One `[oauth2.NAME]` section, with the provider's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub provider: Provider,
    pub flow: Flow,
    pub client_id: String,
    /// Confidential clients only (`client_secret_file`/`client_secret_env`);
    /// read when a token request needs it.
    pub client_secret: Option<PasswordSource>,
    pub device_authorization_url: Option<String>,
    pub authorization_url: Option<String>,
    pub token_url: String,
    pub scopes: Vec<String>,
    /// The loopback port the browser is sent back to (authorization
    /// code); 0 picks a free one at login.
    pub redirect_port: u16,
    /// Extra CA certificates (PEM) for the provider's endpoints.
    pub ca_file: Option<PathBuf>,
    /// Per request to the provider (default 30 s).
    pub timeout: std::time::Duration,
}

/// The delegated scopes escalator asks Microsoft for: read the mailbox,
/// send as it, and a refresh token.
pub const MICROSOFT_SCOPES: [&str; 3] = [
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
];
/// Microsoft's app-only scope (client credentials).
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Gmail's one scope for IMAP and SMTP.
pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";

/// A provider's endpoints for `tenant` (Microsoft only).
pub struct Defaults {
    pub device_authorization_url: Option<String>,
    pub authorization_url: Option<String>,
    pub token_url: Option<String>,
    pub scopes: Vec<String>,
}

/// What a provider brings when the section leaves the keys out.
pub fn defaults(provider: Provider, flow: Flow, tenant: &str) -> Defaults {
    match provider {
        Provider::Microsoft => {
            let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
            Defaults {
                device_authorization_url: Some(format!("{base}/devicecode")),
                authorization_url: Some(format!("{base}/authorize")),
                token_url: Some(format!("{base}/token")),
                scopes: if flow == Flow::ClientCredentials {
                    vec![MICROSOFT_APP_SCOPE.to_string()]
                } else {
                    MICROSOFT_SCOPES.iter().map(|s| s.to_string()).collect()
                },
            }
        }
        Provider::Google => Defaults {
            device_authorization_url: None,
            authorization_url: Some("https://accounts.google.com/o/oauth2/v2/auth".into()),
            token_url: Some("https://oauth2.googleapis.com/token".into()),
            scopes: vec![GOOGLE_SCOPE.to_string()],
        },
        Provider::Generic => Defaults {
            device_authorization_url: None,
            authorization_url: None,
            token_url: None,
            scopes: Vec::new(),
        },
    }
}

impl super::Config {
    /// Every server's endpoint: each queue's IMAP and SMTP, `[smtp]`.
    pub(crate) fn endpoints(&self) -> impl Iterator<Item = &super::Endpoint> {
        self.queues
            .iter()
            .flat_map(|q| std::iter::once(&q.mailbox.endpoint).chain(q.smtp.as_ref()))
            .chain([&self.smtp.endpoint])
    }

    /// The identities some mailbox or SMTP server logs in as, sorted.
    pub fn identities_in_use(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .endpoints()
            .filter_map(|ep| match &ep.oauth {
                Some(super::TokenSource::Identity(n)) => Some(n.clone()),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The users the servers logging in as `identity` name: the
    /// accounts its tokens must reach.
    pub fn identity_users(&self, identity: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .endpoints()
            .filter(
                |ep| matches!(&ep.oauth, Some(super::TokenSource::Identity(n)) if n == identity),
            )
            .filter_map(|ep| ep.username.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}
