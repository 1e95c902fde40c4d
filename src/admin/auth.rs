//! `auth status`, and the store's side of `auth login` and `auth
//! logout` (the login's conversation with the provider runs in the CLI;
//! what it brings arrives here sealed). Never a token, a secret or a key
//! in what is printed.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Response;
use crate::case::rfc3339;
use crate::config::oauth::Identity;
use crate::effects::EffectsError;
use crate::handle::Handle;
use crate::oauth::broker::{self, Login};
use crate::record::OAuthGrant;
use crate::template::printable;

/// One identity in `auth status --json` (a documented contract).
#[derive(Debug, Serialize)]
pub struct IdentityStatus {
    pub identity: String,
    pub provider: &'static str,
    pub flow: &'static str,
    /// "valid", "needs_login" (dead, logged out, or never logged in).
    pub grant: &'static str,
    pub account: Option<String>,
    pub scopes: Vec<String>,
    pub access_token_expires_at: Option<String>,
    pub refresh_token_age_s: Option<i64>,
    pub logged_in_at: Option<String>,
    pub last_refresh: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub refresh_failures: u64,
}

fn status_of(id: &Identity, g: Option<&OAuthGrant>, now: DateTime<Utc>) -> IdentityStatus {
    let time = |t: Option<DateTime<Utc>>| t.map(rfc3339);
    let valid = OAuthGrant::usable(g, id.flow == crate::config::oauth::Flow::ClientCredentials);
    IdentityStatus {
        identity: id.name.clone(),
        provider: id.provider.as_str(),
        flow: id.flow.as_str(),
        grant: if valid { "valid" } else { "needs_login" },
        account: g.and_then(|g| g.account.clone()),
        scopes: g.map(|g| g.scopes.clone()).unwrap_or_default(),
        access_token_expires_at: time(g.and_then(|g| g.access_expires_at)),
        refresh_token_age_s: g
            .and_then(|g| g.refresh_token_at)
            .map(|t| (now - t).num_seconds()),
        logged_in_at: time(g.and_then(|g| g.logged_in_at)),
        last_refresh: time(g.and_then(|g| g.refreshed_at)),
        last_error: g.and_then(|g| g.last_error.clone()),
        last_error_at: time(g.and_then(|g| g.last_error_at)),
        refresh_failures: g.map_or(0, |g| g.refresh_failures),
    }
}

/// Every identity of the config, with its grant. Exit code 1 when one
/// that a mailbox or server logs in as needs a login (for monitoring).
pub(super) fn status(shared: &Handle, json: bool) -> Result<Response, EffectsError> {
    let config = shared.config.get();
    let now = shared.clock.now();
    let in_use = config.identities_in_use();
    let mut all = Vec::new();
    for id in config.oauth2.identities.values() {
        let g = shared.store.oauth_grant(&id.name)?;
        all.push(status_of(id, g.as_ref(), now));
    }
    let failing = all
        .iter()
        .any(|s| s.grant != "valid" && in_use.contains(&s.identity));
    let output = if json {
        serde_json::to_string_pretty(&all).unwrap_or_default() + "\n"
    } else if all.is_empty() {
        "no [oauth2] identities in the config\n".to_string()
    } else {
        all.iter().map(text).collect()
    };
    Ok(Response {
        code: i32::from(failing),
        output,
    })
}

fn text(s: &IdentityStatus) -> String {
    let opt = |o: &Option<String>| o.as_deref().map(printable).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{}: {} ({} flow), grant {}\n  account: {}\n  scopes: {}\n  access token expires: {}\n  refresh token age: {}\n  logged in: {}\n  last refresh: {}\n  refresh failures: {}\n",
        s.identity,
        s.provider,
        s.flow,
        s.grant.replace('_', " "),
        opt(&s.account),
        if s.scopes.is_empty() { "-".to_string() } else { printable(&s.scopes.join(" ")) },
        opt(&s.access_token_expires_at),
        s.refresh_token_age_s
            .map(|a| humantime::format_duration(std::time::Duration::from_secs(a.max(0) as u64 / 60 * 60)).to_string())
            .unwrap_or_else(|| "-".into()),
        opt(&s.logged_in_at),
        opt(&s.last_refresh),
        s.refresh_failures,
    );
    if let Some(e) = &s.last_error {
        out.push_str(&format!(
            "  last error: {} ({})\n",
            printable(e),
            opt(&s.last_error_at)
        ));
    }
    if s.grant != "valid" {
        out.push_str(&format!("  fix: escalator auth login {}\n", s.identity));
    }
    out
}

/// Stores a login's sealed tokens.
pub(super) fn store(shared: &Handle, login: &Login) -> Result<Response, EffectsError> {
    if !shared
        .config
        .get()
        .oauth2
        .identities
        .contains_key(&login.identity)
    {
        return Ok(Response::fail(format!(
            "no [oauth2.{}] in the daemon's config (reload it: kill -HUP)\n",
            printable(&login.identity)
        )));
    }
    // The CLI sealed them with its key: one this process cannot open
    // would leave every login failing while status says "valid".
    if let Err(why) = broker::opens(&shared.config.get(), login) {
        return Ok(Response::fail(format!(
            "the tokens are not stored: the token key here does not open them ({}); the CLI and the daemon must use the same [oauth2] key_file or ESCALATOR_TOKEN_KEY\n",
            printable(&why)
        )));
    }
    broker::store_login(&shared.store, login, shared.clock.now())?;
    Ok(Response::ok(format!(
        "tokens of {} stored\n",
        login.identity
    )))
}

pub(super) fn logout(shared: &Handle, identity: &str) -> Result<Response, EffectsError> {
    if !shared.config.get().oauth2.identities.contains_key(identity) {
        return Ok(Response::fail(format!(
            "no [oauth2.{}] in the config\n",
            printable(identity)
        )));
    }
    Ok(
        if broker::logout(&shared.store, identity, shared.clock.now())? {
            Response::ok(format!(
            "{identity}: tokens forgotten; its mailboxes wait for escalator auth login {identity} (revoke the grant at the provider too)\n"
        ))
        } else {
            Response::ok(format!("{identity}: no tokens were stored\n"))
        },
    )
}
