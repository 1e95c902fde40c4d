//! `[smtp]`, and what every server section (`[mailbox]`,
//! `[[mailboxes]]`, a queue's `smtp`, `[smtp]`) shares: host, port,
//! security, CA file, password and OAuth token source.

use std::path::PathBuf;

use super::Validator;
use crate::config::raw::{default_confirm_wait, RawSmtp};
use crate::config::{
    is_loopback, Endpoint, PasswordSource, Secret, Security, SmtpConfig, TokenSource,
};

impl Validator<'_> {
    /// `[smtp]`: the main SMTP server and the session settings, with
    /// whether `from` was given (queues without an address need it).
    pub(super) fn smtp(&mut self, mut s: RawSmtp) -> (SmtpConfig, bool) {
        let confirm_copies = s.confirm_copies.unwrap_or(true);
        let confirm_wait = self.duration(
            "smtp.confirm_wait",
            &s.confirm_wait.clone().unwrap_or_else(default_confirm_wait),
        );
        let raw_from = s.from.take();
        let helo_name = s.helo_name.take();
        if let Some(h) = &helo_name {
            if !valid_helo_name(h) {
                self.problem(
                    "smtp.helo_name",
                    format!(
                        "{h:?} is not a host name (letters, digits, '-' and '.', like \
                         \"mail.example.com\") or an address literal (\"[192.0.2.1]\")"
                    ),
                );
            }
        }
        let max_per_connection = s.max_per_connection.unwrap_or(10);
        if max_per_connection == 0 {
            self.problem("smtp.max_per_connection", "must be at least 1");
        }
        let endpoint = self.smtp_endpoint("smtp", s);
        let (from_name, from) = match &raw_from {
            Some(f) => self.address("smtp.from", f),
            None => (None, String::new()),
        };
        let smtp = SmtpConfig {
            endpoint,
            from_name,
            from,
            confirm_copies,
            confirm_wait,
            helo_name,
            max_per_connection,
        };
        (smtp, raw_from.is_some())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn endpoint(
        &mut self,
        section: &str,
        host: String,
        port: Option<u16>,
        security: Security,
        allow_insecure: bool,
        ca_file: Option<PathBuf>,
        username: Option<String>,
        secret: (Option<String>, Option<String>, Option<PathBuf>),
        timeout: &str,
        default_ports: (u16, u16),
    ) -> Endpoint {
        if host.trim().is_empty() {
            self.problem(&format!("{section}.host"), "must not be empty");
        }
        if security == Security::Plain && !allow_insecure && !is_loopback(&host) {
            self.problem(
                &format!("{section}.security"),
                format!(
                    "\"plain\" sends passwords and mail unencrypted; refused for \
                     non-loopback host {host:?} unless {section}.allow_insecure = true"
                ),
            );
        }
        let ca_file = ca_file.map(|p| self.path(&p));
        if let Some(p) = &ca_file {
            if !p.is_file() {
                self.problem(
                    &format!("{section}.ca_file"),
                    format!("no such file {}", p.display()),
                );
            }
        }
        let password = self.secret(section, secret);
        let port = port.unwrap_or(match security {
            Security::Tls => default_ports.0,
            _ => default_ports.1,
        });
        Endpoint {
            host,
            port,
            security,
            ca_file,
            username,
            password,
            section: section.to_string(),
            oauth: None,
            timeout: self.duration(&format!("{section}.timeout"), timeout),
        }
    }

    /// Checks `auth` and the OAuth token source of a section.
    pub(super) fn oauth(
        &mut self,
        section: &str,
        mut ep: Endpoint,
        auth: Option<String>,
        file: Option<PathBuf>,
        command: Option<String>,
        identity: Option<String>,
    ) -> Endpoint {
        let source = match (file, command) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{section}.oauth_token_file"),
                    "give only one of oauth_token_file, oauth_token_command",
                );
                None
            }
            (Some(f), None) => Some(TokenSource::File(self.path(&f))),
            (None, Some(c)) if !c.trim().is_empty() => Some(TokenSource::Command(c)),
            (None, Some(_)) => {
                self.problem(
                    &format!("{section}.oauth_token_command"),
                    "must not be empty",
                );
                None
            }
            (None, None) => None,
        };
        let auth = auth.as_deref().unwrap_or("password");
        if identity.is_some() && auth != "oauth2" {
            self.problem(
                &format!("{section}.oauth2"),
                "names an identity: write auth = \"oauth2\" beside it",
            );
        }
        match auth {
            "oauth2" => {
                ep.oauth = self.identity_auth(section, &ep, source.is_some(), identity);
            }
            "password" => {
                if source.is_some() {
                    self.problem(
                        &format!("{section}.auth"),
                        "an OAuth token source is set: write auth = \"xoauth2\"",
                    );
                }
            }
            "xoauth2" => {
                if ep.username.is_none() {
                    self.problem(&format!("{section}.username"), "XOAUTH2 needs the username");
                }
                match source {
                    Some(s) => ep.oauth = Some(s),
                    None => self.problem(
                        &format!("{section}.auth"),
                        "xoauth2 needs oauth_token_file or oauth_token_command",
                    ),
                }
            }
            other => self.problem(
                &format!("{section}.auth"),
                format!("unknown {other:?}; write \"password\", \"xoauth2\" or \"oauth2\""),
            ),
        }
        ep
    }

    /// `auth = "oauth2"`: the identity named by `oauth2`, and nothing
    /// that belongs to the other ways.
    fn identity_auth(
        &mut self,
        section: &str,
        ep: &Endpoint,
        has_token_source: bool,
        identity: Option<String>,
    ) -> Option<TokenSource> {
        if ep.username.is_none() {
            self.problem(
                &format!("{section}.username"),
                "OAuth 2 logins name the mailbox: set username",
            );
        }
        if has_token_source {
            self.problem(
                &format!("{section}.auth"),
                "auth = \"oauth2\" takes its tokens from [oauth2]: remove \
                 oauth_token_file/oauth_token_command, or write auth = \"xoauth2\"",
            );
        }
        if identity.is_none() {
            self.problem(
                &format!("{section}.oauth2"),
                "auth = \"oauth2\" needs the identity's name (oauth2 = \"m365\" for [oauth2.m365])",
            );
        }
        identity.map(TokenSource::Identity)
    }

    pub(super) fn secret(
        &mut self,
        section: &str,
        (plain, env_name, file): (Option<String>, Option<String>, Option<PathBuf>),
    ) -> Option<PasswordSource> {
        let given = [plain.is_some(), env_name.is_some(), file.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if given > 1 {
            self.problem(
                &format!("{section}.password"),
                "give only one of password, password_env, password_file",
            );
            return None;
        }
        if let Some(p) = plain {
            return Some(PasswordSource::Inline(Secret::new(p)));
        }
        if let Some(name) = env_name {
            if name.trim().is_empty() {
                self.problem(&format!("{section}.password_env"), "must not be empty");
            }
            return Some(PasswordSource::Env(name));
        }
        file.map(|f| PasswordSource::File(self.path(&f)))
    }

    /// An SMTP server's connection keys (`[smtp]`, or a queue's `smtp`).
    pub(super) fn smtp_endpoint(&mut self, section: &str, s: RawSmtp) -> Endpoint {
        let ep = self.endpoint(
            section,
            s.host,
            s.port,
            s.security,
            s.allow_insecure,
            s.ca_file,
            s.username,
            (s.password, s.password_env, s.password_file),
            &s.timeout,
            (465, 587),
        );
        self.oauth(
            section,
            ep,
            s.auth,
            s.oauth_token_file,
            s.oauth_token_command,
            s.oauth2,
        )
    }
}

/// A name an SMTP server takes in EHLO: a domain name or an address
/// literal (RFC 5321 4.1.3).
fn valid_helo_name(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return match inner.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => inner.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}
