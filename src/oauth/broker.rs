//! Access tokens on demand for IMAP and SMTP logins, from the grants in
//! the store: refreshed ahead of expiry by one node at a time (a claim
//! in the grant's record), a rotated refresh token stored in the same
//! transaction that records the refresh, and a grant the provider says
//! is gone marked so, with the command that fixes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::flow::{FlowError, Issuer, Tokens};
use super::vault::TokenKey;
use crate::clock::Clock;
use crate::config::oauth::{Flow, Identity, OAuthConfig, TOKEN_KEY_ENV};
use crate::config::{Live, Secret};
use crate::handle::Handle;
use crate::record::OAuthGrant;
use crate::store::{Store, StoreError};

/// How long a node's refresh claim holds: longer than a refresh may
/// take (two HTTP timeouts), so a slow refresh is not done twice.
const CLAIM: Duration = Duration::from_secs(90);
/// How often a node waiting for another's refresh looks again, and for
/// how long at most.
const CLAIM_POLL: Duration = Duration::from_secs(1);
const CLAIM_WAIT_ROUNDS: u32 = 100;
/// Seconds a failed refresh waits before the next, while the current
/// access token still works.
const RETRY_AFTER_FAILURE: i64 = 30;

/// Why no access token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("identity {0:?} has no tokens yet: run escalator auth login {0}")]
    NoGrant(String),
    #[error("the grant of identity {identity:?} is no longer valid ({why}): run escalator auth login {identity}")]
    Dead { identity: String, why: String },
    #[error("no [oauth2.{0}] in the config")]
    Unknown(String),
    /// The token key, the store, the identity's settings.
    #[error("identity {identity:?}: {why}")]
    Broken { identity: String, why: String },
    /// The provider could not be reached or answered nonsense; the
    /// access token we have has run out. Retried.
    #[error("identity {identity:?}: cannot refresh its access token ({why}); retrying")]
    Unavailable { identity: String, why: String },
}

impl GrantError {
    /// True when only an admin's new login helps.
    pub fn needs_login(&self) -> bool {
        matches!(self, GrantError::NoGrant(_) | GrantError::Dead { .. })
    }
}

/// The tokens inside a sealed grant.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sealed {
    access: String,
    #[serde(default)]
    refresh: Option<String>,
}

/// Hands out access tokens for the config's identities.
pub struct Broker {
    store: Arc<Store>,
    config: Arc<Live>,
    clock: Arc<dyn Clock>,
    /// Told when an alert mail was queued.
    wake: Arc<crate::wake::Wakers>,
    /// This process, in refresh claims.
    me: String,
    /// One refresh at a time in this process.
    local: tokio::sync::Mutex<()>,
    issuers: Mutex<HashMap<String, (Identity, Arc<Issuer>)>>,
}

impl Broker {
    pub fn new(handle: &Handle) -> Broker {
        Broker {
            store: handle.store.clone(),
            config: handle.config.clone(),
            clock: handle.clock.clone(),
            wake: handle.wake.clone(),
            me: format!(
                "{}-{}-{:08x}",
                crate::cluster::host_name(),
                std::process::id(),
                rand_u32()
            ),
            local: tokio::sync::Mutex::new(()),
            issuers: Mutex::new(HashMap::new()),
        }
    }

    fn identity(&self, name: &str) -> Result<Identity, GrantError> {
        self.config
            .get()
            .oauth2
            .identities
            .get(name)
            .cloned()
            .ok_or_else(|| GrantError::Unknown(name.to_string()))
    }

    /// The identity's issuer, made again when its settings changed (a
    /// reload).
    pub fn issuer(&self, name: &str) -> Result<Arc<Issuer>, GrantError> {
        let id = self.identity(name)?;
        let mut map = self.issuers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, issuer)) = map.get(name) {
            if *known == id {
                return Ok(issuer.clone());
            }
        }
        let issuer = Arc::new(Issuer::new(&id).map_err(|e| broken(name, e))?);
        map.insert(name.to_string(), (id, issuer.clone()));
        Ok(issuer)
    }

    /// A valid access token for `identity`: the stored one while it has
    /// time left, else a fresh one.
    pub async fn access_token(&self, identity: &str) -> Result<Secret, GrantError> {
        let id = self.identity(identity)?;
        for _ in 0..CLAIM_WAIT_ROUNDS {
            let grant = self.read(identity)?;
            let grant = match grant {
                Some(g) => g,
                None if id.flow == Flow::ClientCredentials => OAuthGrant {
                    identity: identity.to_string(),
                    valid: true,
                    ..Default::default()
                },
                None => return Err(GrantError::NoGrant(identity.to_string())),
            };
            if !grant.valid {
                return Err(GrantError::Dead {
                    identity: identity.to_string(),
                    why: grant
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "logged out".into()),
                });
            }
            let now = self.clock.now();
            let sealed = self.open(&grant)?;
            let expires = grant.access_expires_at;
            if let (Some(s), Some(exp)) = (&sealed, expires) {
                if now < due(grant.refreshed_at.or(grant.logged_in_at), exp) {
                    return Ok(Secret::new(s.access.clone()));
                }
            }
            // After a failed refresh, the current token serves a while
            // before the next try (logins are frequent, the provider may
            // be down).
            if let (Some(s), Some(exp), Some(failed)) = (&sealed, expires, grant.last_error_at) {
                if now < exp && now - failed < chrono::Duration::seconds(RETRY_AFTER_FAILURE) {
                    return Ok(Secret::new(s.access.clone()));
                }
            }
            match self.claim(&grant, now)? {
                Claim::Changed => continue,
                Claim::Busy => {
                    // Another node refreshes: its result is ours in a
                    // moment; the current token while it still works.
                    if let (Some(s), Some(exp)) = (&sealed, expires) {
                        if now < exp {
                            return Ok(Secret::new(s.access.clone()));
                        }
                    }
                    tokio::time::sleep(CLAIM_POLL).await;
                    continue;
                }
                Claim::Ours(grant) => return self.refresh(&id, *grant, sealed, now).await,
            }
        }
        Err(GrantError::Unavailable {
            identity: identity.to_string(),
            why: "another node's refresh did not finish".into(),
        })
    }

    fn read(&self, identity: &str) -> Result<Option<OAuthGrant>, GrantError> {
        self.store
            .oauth_grant(identity)
            .map_err(|e| store_broken(identity, e))
    }

    /// The token key, read now (from the file or the environment).
    pub fn key(config: &OAuthConfig) -> Result<TokenKey, String> {
        let origin = config.key_origin();
        let text = match &config.key_file {
            Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{origin}: {e}"))?,
            None => std::env::var(TOKEN_KEY_ENV).map_err(|_| {
                format!(
                    "no token key: set {TOKEN_KEY_ENV} or [oauth2] key_file (64 hex digits; \
                     make one with: openssl rand -hex 32)"
                )
            })?,
        };
        TokenKey::parse(&text, &origin).map_err(|e| e.to_string())
    }

    fn open(&self, grant: &OAuthGrant) -> Result<Option<Sealed>, GrantError> {
        let Some(hex) = &grant.sealed else {
            return Ok(None);
        };
        let key = Broker::key(&self.config.get().oauth2).map_err(|why| GrantError::Broken {
            identity: grant.identity.clone(),
            why,
        })?;
        let bytes = from_hex(hex).ok_or_else(|| GrantError::Broken {
            identity: grant.identity.clone(),
            why: "its sealed tokens are damaged in the store".into(),
        })?;
        let plain = key
            .open(&grant.identity, &bytes)
            .map_err(|e| broken(&grant.identity, e))?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|_| GrantError::Broken {
                identity: grant.identity.clone(),
                why: "its sealed tokens do not read".into(),
            })
    }

    fn seal(&self, identity: &str, s: &Sealed) -> Result<String, GrantError> {
        let key = Broker::key(&self.config.get().oauth2).map_err(|why| GrantError::Broken {
            identity: identity.to_string(),
            why,
        })?;
        let plain = serde_json::to_vec(s).map_err(|e| broken(identity, e))?;
        let sealed = key
            .seal(identity, &plain)
            .map_err(|e| broken(identity, e))?;
        Ok(to_hex(&sealed))
    }

    /// Takes the refresh for this process, if the grant is still the one
    /// read and no other node holds a live claim.
    fn claim(&self, read: &OAuthGrant, now: DateTime<Utc>) -> Result<Claim, GrantError> {
        let me = self.me.clone();
        let until = now + chrono::Duration::from_std(CLAIM).unwrap_or_default();
        self.store
            .transact(|tx| -> Result<Claim, StoreError> {
                let current = tx.oauth_grant(&read.identity)?;
                let mut g = match current {
                    Some(g) if g.generation != read.generation || !g.valid => {
                        return Ok(Claim::Changed)
                    }
                    Some(g) => g,
                    // Client credentials before their first token.
                    None if read.generation == 0 => read.clone(),
                    None => return Ok(Claim::Changed),
                };
                if let Some((node, held)) = &g.refreshing {
                    if *node != me && *held > now {
                        return Ok(Claim::Busy);
                    }
                }
                g.refreshing = Some((me.clone(), until));
                tx.set_oauth_grant(&g)?;
                Ok(Claim::Ours(Box::new(g)))
            })
            .map_err(|e| store_broken(&read.identity, e))
    }

    async fn refresh(
        &self,
        id: &Identity,
        grant: OAuthGrant,
        sealed: Option<Sealed>,
        now: DateTime<Utc>,
    ) -> Result<Secret, GrantError> {
        let _one = self.local.lock().await;
        let issuer = self.issuer(&id.name)?;
        let old_refresh = sealed.as_ref().and_then(|s| s.refresh.clone());
        let result = match (old_refresh.clone(), id.flow) {
            (_, Flow::ClientCredentials) => issuer.client_credentials().await,
            (Some(rt), _) => issuer.refresh(Secret::new(rt)).await,
            (None, _) => Err(FlowError::Dead(
                "the provider gave no refresh token at login (for Microsoft, ask for \
                 offline_access)"
                    .into(),
            )),
        };
        let done = self.clock.now();
        match result {
            Ok(t) => self.store_refresh(id, grant, t, old_refresh, done),
            Err(e) => {
                let dead = matches!(e, FlowError::Dead(_) | FlowError::Config(_));
                let why = e.to_string();
                let identity = id.name.clone();
                let me = self.me.clone();
                let why_stored = why.clone();
                let config = self.config.get();
                let alerted = self
                    .store
                    .transact(|tx| -> Result<Option<u64>, crate::effects::EffectsError> {
                        let mut alert = None;
                        if let Some(mut g) = tx.oauth_grant(&identity)? {
                            if g.generation == grant.generation {
                                if dead && g.valid {
                                    g.valid = false;
                                    // Once per death: in the transaction
                                    // that records it.
                                    alert = queue_alert(tx, &config, &identity, &why_stored, done)?;
                                }
                                g.last_error = Some(why_stored.clone());
                                g.last_error_at = Some(done);
                                g.refresh_failures += 1;
                                if g.refreshing.as_ref().is_some_and(|(n, _)| *n == me) {
                                    g.refreshing = None;
                                }
                                tx.set_oauth_grant(&g)?;
                            }
                        }
                        Ok(alert)
                    })
                    .map_err(|e| broken(&identity, e))?;
                if let Some(id) = alerted {
                    tracing::info!(identity = %identity, outbox_id = id, "alert queued to [oauth2] alert_to");
                    self.wake.outbox.notify_one();
                }
                if dead {
                    return Err(GrantError::Dead { identity, why });
                }
                // Not on failure: the token we have serves until it ends.
                match (sealed, grant.access_expires_at) {
                    (Some(s), Some(exp)) if now < exp => {
                        tracing::warn!(identity = %identity, error = %why, expires = %exp,
                            "cannot refresh the access token yet; the current one still works");
                        Ok(Secret::new(s.access))
                    }
                    _ => Err(GrantError::Unavailable { identity, why }),
                }
            }
        }
    }

    /// Writes what a refresh brought, with the rotated refresh token (or
    /// the old one when none came), in one transaction, over the grant
    /// it started from only.
    fn store_refresh(
        &self,
        id: &Identity,
        grant: OAuthGrant,
        t: Tokens,
        old_refresh: Option<String>,
        done: DateTime<Utc>,
    ) -> Result<Secret, GrantError> {
        if let Some(said) = t.lifetime_said {
            tracing::warn!(identity = %id.name, said_s = said.as_secs(), used_s = t.lifetime.as_secs(),
                "the provider's token lifetime is out of bounds; using the bound");
        }
        let rotated = t.refresh.is_some();
        let sealed = Sealed {
            access: t.access.expose().to_string(),
            refresh: t
                .refresh
                .as_ref()
                .map(|r| r.expose().to_string())
                .or(old_refresh),
        };
        let hex = self.seal(&id.name, &sealed)?;
        let me = self.me.clone();
        let expires = done + chrono::Duration::from_std(t.lifetime).unwrap_or_default();
        let stored = self
            .store
            .transact(|tx| -> Result<bool, StoreError> {
                let mut g = match tx.oauth_grant(&id.name)? {
                    Some(g) => g,
                    None if grant.generation == 0 => grant.clone(),
                    None => return Ok(false),
                };
                if g.generation != grant.generation {
                    return Ok(false);
                }
                g.sealed = Some(hex.clone());
                g.access_expires_at = Some(expires);
                g.refreshed_at = Some(done);
                if rotated {
                    g.refresh_token_at = Some(done);
                }
                g.scopes = t.scopes.clone();
                g.generation += 1;
                g.last_error = None;
                g.valid = true;
                if g.refreshing.as_ref().is_some_and(|(n, _)| *n == me) {
                    g.refreshing = None;
                }
                tx.set_oauth_grant(&g)?;
                Ok(true)
            })
            .map_err(|e| store_broken(&id.name, e))?;
        if !stored {
            // A login (or another node past our claim) wrote newer
            // tokens meanwhile: use those.
            tracing::info!(identity = %id.name, "newer tokens were stored during the refresh");
        }
        tracing::info!(identity = %id.name, rotated, expires = %expires, "access token refreshed");
        Ok(t.access)
    }

    /// Stores the tokens of a new login (`auth login`): a new grant,
    /// valid, whatever was there before.
    pub fn store_login(
        &self,
        id: &Identity,
        t: &Tokens,
        account: Option<String>,
    ) -> Result<(), GrantError> {
        let login = seal_login(&self.config.get(), id, t, account)?;
        store_login(&self.store, &login, self.clock.now()).map_err(|e| store_broken(&id.name, e))
    }

    /// A server refused this access token before its end (revoked, a
    /// password reset): it is taken as ended, so the next request
    /// refreshes, which also tells whether the grant itself is gone. Only
    /// when it is still the stored token (a refresh may have replaced it).
    pub fn rejected(&self, identity: &str, token: &Secret) -> Result<(), GrantError> {
        let Some(grant) = self.read(identity)? else {
            return Ok(());
        };
        let Some(sealed) = self.open(&grant)? else {
            return Ok(());
        };
        if sealed.access != token.expose() {
            return Ok(());
        }
        let now = self.clock.now();
        self.store
            .transact(|tx| -> Result<(), StoreError> {
                if let Some(mut g) = tx.oauth_grant(identity)? {
                    if g.generation == grant.generation {
                        g.access_expires_at = Some(now);
                        tx.set_oauth_grant(&g)?;
                    }
                }
                Ok(())
            })
            .map_err(|e| store_broken(identity, e))
    }

    /// Records the account a login reached (after it was proven).
    pub fn set_account(&self, identity: &str, account: &str) -> Result<(), GrantError> {
        self.store
            .transact(|tx| -> Result<(), StoreError> {
                if let Some(mut g) = tx.oauth_grant(identity)? {
                    g.account = Some(account.to_string());
                    tx.set_oauth_grant(&g)?;
                }
                Ok(())
            })
            .map_err(|e| store_broken(identity, e))
    }
}

/// Queues the alert that `identity` needs a login to `[oauth2]
/// alert_to` (None: nobody to tell).
fn queue_alert(
    tx: &mut crate::store::Tx<'_>,
    config: &crate::config::Config,
    identity: &str,
    why: &str,
    at: DateTime<Utc>,
) -> Result<Option<u64>, crate::effects::EffectsError> {
    if config.oauth2.alert_to.is_empty() {
        return Ok(None);
    }
    let text = crate::mailtext::alert(config, identity, why, at, &config.identity_users(identity));
    let mut effects = crate::effects::Effects::new(config, at);
    effects
        .alert(tx, config.oauth2.alert_to.clone(), &text)
        .map(Some)
}

/// A login's result as the store takes it: the tokens already sealed,
/// so they cross the control socket to a running daemon only so.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Login {
    pub identity: String,
    pub sealed: String,
    pub lifetime_s: u64,
    pub has_refresh: bool,
    pub scopes: Vec<String>,
    pub account: Option<String>,
}

/// Seals `t` for `id` with the token key `config` names.
pub fn seal_login(
    config: &crate::config::Config,
    id: &Identity,
    t: &Tokens,
    account: Option<String>,
) -> Result<Login, GrantError> {
    let key = Broker::key(&config.oauth2).map_err(|why| broken(&id.name, why))?;
    let sealed = Sealed {
        access: t.access.expose().to_string(),
        refresh: t.refresh.as_ref().map(|r| r.expose().to_string()),
    };
    let plain = serde_json::to_vec(&sealed).map_err(|e| broken(&id.name, e))?;
    let bytes = key
        .seal(&id.name, &plain)
        .map_err(|e| broken(&id.name, e))?;
    Ok(Login {
        identity: id.name.clone(),
        sealed: to_hex(&bytes),
        lifetime_s: t.lifetime.as_secs(),
        has_refresh: t.refresh.is_some(),
        scopes: t.scopes.clone(),
        account,
    })
}

/// Writes a login's grant: new tokens, valid, a new generation (so a
/// refresh under way does not overwrite it), the failure count kept.
pub fn store_login(store: &Store, login: &Login, now: DateTime<Utc>) -> Result<(), StoreError> {
    store.transact(|tx| -> Result<(), StoreError> {
        let old = tx.oauth_grant(&login.identity)?;
        let g = OAuthGrant {
            identity: login.identity.clone(),
            account: login
                .account
                .clone()
                .or_else(|| old.as_ref().and_then(|o| o.account.clone())),
            scopes: login.scopes.clone(),
            sealed: Some(login.sealed.clone()),
            access_expires_at: Some(now + chrono::Duration::seconds(login.lifetime_s as i64)),
            logged_in_at: Some(now),
            refresh_token_at: login.has_refresh.then_some(now),
            refreshed_at: None,
            generation: old.as_ref().map_or(0, |o| o.generation) + 1,
            refreshing: None,
            valid: true,
            last_error: None,
            last_error_at: None,
            refresh_failures: old.as_ref().map_or(0, |o| o.refresh_failures),
        };
        tx.set_oauth_grant(&g)
    })
}

/// Forgets a grant's tokens (`auth logout`); the record stays, invalid,
/// so status and metrics go on saying the identity needs a login.
/// False: there was nothing to forget.
pub fn logout(store: &Store, identity: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
    store.transact(|tx| -> Result<bool, StoreError> {
        let Some(mut g) = tx.oauth_grant(identity)? else {
            return Ok(false);
        };
        let had = g.sealed.is_some();
        g.sealed = None;
        g.access_expires_at = None;
        g.valid = false;
        g.generation += 1;
        g.refreshing = None;
        g.last_error = Some("logged out (escalator auth logout)".into());
        g.last_error_at = Some(now);
        tx.set_oauth_grant(&g)?;
        Ok(had)
    })
}

enum Claim {
    /// The grant changed since it was read: read again.
    Changed,
    /// Another node refreshes now.
    Busy,
    Ours(Box<OAuthGrant>),
}

/// When a token issued at `issued` (None: unknown) and ending at
/// `expires` is refreshed: when a quarter of its life is left, at least
/// a minute and at most ten minutes before its end.
pub fn due(issued: Option<DateTime<Utc>>, expires: DateTime<Utc>) -> DateTime<Utc> {
    let life = issued.map_or(chrono::Duration::hours(1), |i| expires - i);
    let ahead = (life / 4).clamp(chrono::Duration::minutes(1), chrono::Duration::minutes(10));
    expires - ahead
}

fn broken(identity: &str, e: impl std::fmt::Display) -> GrantError {
    GrantError::Broken {
        identity: identity.to_string(),
        why: e.to_string(),
    }
}

/// A store failure reads as an error, never as "no grant".
fn store_broken(identity: &str, e: StoreError) -> GrantError {
    GrantError::Broken {
        identity: identity.to_string(),
        why: format!("the store: {e}"),
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The watcher and the outbox await tokens inside spawned tasks: this
/// stops compiling if the future stops being `Send`.
#[allow(dead_code)]
fn access_token_is_send(b: &Broker) {
    fn is_send<T: Send>(_: T) {}
    is_send(b.access_token("x"));
}
