//! `[oauth2]`: each identity's provider, flow and endpoints, with what a
//! provider does not allow refused before anyone tries to log in (the
//! reason and the fix in the message), and every `auth = "oauth2"`
//! naming an identity that exists.

use std::collections::BTreeMap;

use super::Validator;
use crate::config::oauth::{defaults, Flow, Identity, OAuthConfig, Provider};
use crate::config::raw::{RawIdentity, RawOAuth};
use crate::config::{Config, PasswordSource, TokenSource};

impl Validator<'_> {
    /// `[oauth2]` and its identities.
    pub(super) fn oauth2(&mut self, raw: RawOAuth) -> OAuthConfig {
        let alert_to = self.addresses("oauth2.alert_to", &raw.alert_to, false);
        let mut identities = BTreeMap::new();
        for (name, value) in raw.rest {
            let key = format!("oauth2.{name}");
            if !value.is_table() {
                self.problem(
                    &key,
                    "unknown key: [oauth2] has key_file and alert_to, and a table per \
                     identity ([oauth2.NAME])",
                );
                continue;
            }
            let r: RawIdentity = match serde_path_to_error::deserialize(value) {
                Ok(r) => r,
                Err(e) => {
                    let path = e.path().to_string();
                    let at = if path == "." {
                        key
                    } else {
                        format!("{key}.{path}")
                    };
                    self.problem(&at, e.into_inner());
                    continue;
                }
            };
            if let Some(id) = self.identity(&name, r) {
                identities.insert(name, id);
            }
        }
        OAuthConfig {
            key_file: raw.key_file.map(|p| self.path(&p)),
            alert_to,
            identities,
        }
    }

    fn identity(&mut self, name: &str, r: RawIdentity) -> Option<Identity> {
        let key = format!("oauth2.{name}");
        if !valid_name(name) {
            self.problem(
                &key,
                "an identity's name is letters, digits, '-' and '_' (at most 64)",
            );
            return None;
        }
        let provider = match r.provider.as_str() {
            "microsoft" => Provider::Microsoft,
            "google" => Provider::Google,
            "generic" => Provider::Generic,
            other => {
                self.problem(
                    &format!("{key}.provider"),
                    format!("unknown {other:?}; write \"microsoft\", \"google\" or \"generic\""),
                );
                return None;
            }
        };
        let flow = match r.flow.as_deref() {
            None if provider == Provider::Google => Flow::AuthorizationCode,
            None | Some("device") => Flow::Device,
            Some("authorization_code") => Flow::AuthorizationCode,
            Some("client_credentials") => Flow::ClientCredentials,
            Some(other) => {
                self.problem(
                    &format!("{key}.flow"),
                    format!(
                        "unknown {other:?}; write \"device\", \"authorization_code\" or \
                         \"client_credentials\""
                    ),
                );
                return None;
            }
        };
        if r.client_id.trim().is_empty() {
            self.problem(
                &format!("{key}.client_id"),
                "must not be empty: the application (client) id from the provider's console",
            );
        }
        let client_secret = self.client_secret(&key, r.client_secret_file, r.client_secret_env);
        let tenant = self.tenant(&key, provider, flow, r.tenant);
        self.allowed(&key, provider, flow, client_secret.is_some());
        let d = defaults(provider, flow, &tenant);
        let (device_authorization_url, authorization_url, token_url) = self.endpoints(
            &key,
            (provider, flow),
            (r.device_authorization_url, r.authorization_url, r.token_url),
            &d,
        );
        let token_url = token_url?;
        let scopes = r.scopes.unwrap_or(d.scopes);
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            self.problem(
                &format!("{key}.scopes"),
                format!("{bad:?} is not a scope (no spaces; one scope per string)"),
            );
        }
        Some(Identity {
            name: name.to_string(),
            provider,
            flow,
            client_id: r.client_id.trim().to_string(),
            client_secret,
            device_authorization_url,
            authorization_url,
            token_url,
            scopes,
            redirect_port: r.redirect_port.unwrap_or(0),
            ca_file: r.ca_file.map(|p| self.path(&p)),
            timeout: self.identity_timeout(&key, r.timeout.as_deref()),
        })
    }

    /// The identity's endpoints: as written, else the provider's; the
    /// one its flow needs must be there, and the token endpoint always.
    #[allow(clippy::type_complexity)]
    fn endpoints(
        &mut self,
        key: &str,
        (provider, flow): (Provider, Flow),
        (device, authorization, token): (Option<String>, Option<String>, Option<String>),
        d: &crate::config::oauth::Defaults,
    ) -> (Option<String>, Option<String>, Option<String>) {
        let device = self.url(
            &format!("{key}.device_authorization_url"),
            device.or(d.device_authorization_url.clone()),
        );
        let authorization = self.url(
            &format!("{key}.authorization_url"),
            authorization.or(d.authorization_url.clone()),
        );
        let token = self.url(&format!("{key}.token_url"), token.or(d.token_url.clone()));
        // A provider's own gaps (Google's device flow) were told by
        // `allowed`, with the fix.
        let needed = match flow {
            _ if provider != Provider::Generic => None,
            Flow::Device => device.is_none().then_some("device_authorization_url"),
            Flow::AuthorizationCode => authorization.is_none().then_some("authorization_url"),
            Flow::ClientCredentials => None,
        };
        if let Some(k) = needed {
            self.problem(
                &format!("{key}.{k}"),
                format!(
                    "flow = \"{}\" needs it (provider \"generic\" has no default)",
                    flow.as_str()
                ),
            );
        }
        if token.is_none() {
            self.problem(
                &format!("{key}.token_url"),
                "needed (provider \"generic\" has no default)",
            );
        }
        (device, authorization, token)
    }

    /// Per request to the provider: 1 s to 2 m (a refresh's claim on the
    /// grant is sized from it), default 30 s.
    fn identity_timeout(&mut self, key: &str, text: Option<&str>) -> std::time::Duration {
        let Some(t) = text else {
            return std::time::Duration::from_secs(30);
        };
        let d = self.duration(&format!("{key}.timeout"), t);
        if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(120) {
            self.problem(&format!("{key}.timeout"), "must be 1s to 2m");
        }
        d
    }

    fn client_secret(
        &mut self,
        key: &str,
        file: Option<std::path::PathBuf>,
        env: Option<String>,
    ) -> Option<PasswordSource> {
        match (file, env) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{key}.client_secret_file"),
                    "give only one of client_secret_file, client_secret_env",
                );
                None
            }
            (Some(f), None) => Some(PasswordSource::File(self.path(&f))),
            (None, Some(e)) if e.trim().is_empty() => {
                self.problem(&format!("{key}.client_secret_env"), "must not be empty");
                None
            }
            (None, Some(e)) => Some(PasswordSource::Env(e)),
            (None, None) => None,
        }
    }

    /// Microsoft's tenant: a directory name or id; app-only tokens need
    /// a real tenant (Microsoft refuses client credentials on `common`).
    fn tenant(
        &mut self,
        key: &str,
        provider: Provider,
        flow: Flow,
        tenant: Option<String>,
    ) -> String {
        let k = format!("{key}.tenant");
        if provider != Provider::Microsoft {
            if tenant.is_some() {
                self.problem(&k, "only provider \"microsoft\" has a tenant");
            }
            return String::new();
        }
        let t = tenant.unwrap_or_else(|| "organizations".into());
        if t.is_empty()
            || t.len() > 128
            || t.starts_with('.')
            || t.contains("..")
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        {
            self.problem(
                &k,
                "a tenant is a domain (contoso.onmicrosoft.com) or a directory id (a GUID)",
            );
        } else if flow == Flow::ClientCredentials
            && matches!(t.as_str(), "common" | "organizations" | "consumers")
        {
            self.problem(
                &k,
                format!(
                    "app-only tokens (flow = \"client_credentials\") need your own tenant, not \
                     {t:?}: write tenant = \"contoso.onmicrosoft.com\" or the directory id"
                ),
            );
        }
        t
    }

    /// What the provider refuses, told here rather than by a login that
    /// fails later.
    fn allowed(&mut self, key: &str, provider: Provider, flow: Flow, has_secret: bool) {
        match (provider, flow) {
            (Provider::Google, Flow::Device) => self.problem(
                &format!("{key}.flow"),
                "Google's device flow does not allow the mail scope (https://mail.google.com/): \
                 write flow = \"authorization_code\" (a Desktop app client; on a server without \
                 a browser, open the printed URL elsewhere and paste the address it ends on)",
            ),
            (Provider::Google, Flow::ClientCredentials) => self.problem(
                &format!("{key}.flow"),
                "Google has no client-credentials grant for Gmail (service accounts sign a JWT \
                 instead): write flow = \"authorization_code\"",
            ),
            (Provider::Google, Flow::AuthorizationCode) if !has_secret => self.problem(
                &format!("{key}.client_secret_file"),
                "Google's Desktop app clients send their client secret with the code: put it in \
                 a file and name it in client_secret_file (or client_secret_env)",
            ),
            (Provider::Microsoft, Flow::Device | Flow::AuthorizationCode) if has_secret => self
                .problem(
                    &format!("{key}.client_secret_file"),
                    "a public client must not send a secret (Microsoft refuses it with \
                     AADSTS700025): remove client_secret_file/client_secret_env, and allow \
                     public client flows in the app registration; or use flow = \
                     \"client_credentials\" for app-only access",
                ),
            (_, Flow::ClientCredentials) if !has_secret => self.problem(
                &format!("{key}.client_secret_file"),
                "flow = \"client_credentials\" logs in with the client's secret: name its file \
                 in client_secret_file (or client_secret_env)",
            ),
            _ => {}
        }
    }

    /// An endpoint address: https, or http only to this machine.
    fn url(&mut self, key: &str, text: Option<String>) -> Option<String> {
        let text = text?;
        let url = match url::Url::parse(&text) {
            Ok(u) => u,
            Err(e) => {
                self.problem(key, format!("{text:?} is not a URL ({e})"));
                return None;
            }
        };
        let local = match url.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            None => false,
        };
        match url.scheme() {
            "https" => {}
            "http" if local => {}
            "http" => {
                self.problem(
                    key,
                    "tokens travel over it: https only (http only to this machine)",
                );
                return None;
            }
            other => {
                self.problem(key, format!("scheme {other:?}: write an https:// address"));
                return None;
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(key, "no user or password in the address");
            return None;
        }
        Some(text)
    }

    /// Every `auth = "oauth2"` names an identity of `[oauth2]`.
    pub(super) fn identities_exist(&mut self, config: &Config) {
        let endpoints = config.endpoints();
        for ep in endpoints {
            if let Some(TokenSource::Identity(name)) = &ep.oauth {
                if !config.oauth2.identities.contains_key(name) {
                    let known: Vec<&str> = config
                        .oauth2
                        .identities
                        .keys()
                        .map(String::as_str)
                        .collect();
                    self.problem(
                        &format!("{}.oauth2", ep.section),
                        format!(
                            "no identity {name:?} in [oauth2] (there: {}); add [oauth2.{name}]",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
            }
        }
    }
}

/// An identity's name: it is a store key and a metric label.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
