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
/// take (two requests' timeouts and the store's retries), so a slow
/// refresh is not done twice.
fn claim_for(id: &Identity) -> Duration {
    // Two requests, then up to four store attempts (each may wait for
    // PostgreSQL's lock, 20 s) and their pauses.
    id.timeout * 2 + Duration::from_secs(4 * 25 + 30)
}
/// How often a node waiting for another's refresh looks again, and for
/// how long at most.
const CLAIM_POLL: Duration = Duration::from_secs(1);
const CLAIM_WAIT_ROUNDS: u32 = 100;
/// Seconds a failed refresh waits before the next, while the current
/// access token still works.
const RETRY_AFTER_FAILURE: i64 = 30;
/// Seconds between refreshes forced by a server refusing a token.
const REJECT_PACE: i64 = 300;

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
    /// True when only an admin helps: a new login, or (Broken) the
    /// token key or the identity's settings; waiting will not.
    pub fn needs_login(&self) -> bool {
        matches!(
            self,
            GrantError::NoGrant(_) | GrantError::Dead { .. } | GrantError::Broken { .. }
        )
    }
}

/// The tokens inside a sealed grant.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sealed {
    access: String,
    #[serde(default)]
    refresh: Option<String>,
}

/// Hands out access tokens for the config's identities. Cheap to clone
/// (shared parts): a refresh runs in a task of its own that owns a clone,
/// so a caller that gives up (a watcher stopping) cannot cut a refresh
/// between the provider's answer and the store.
#[derive(Clone)]
pub struct Broker {
    store: Arc<Store>,
    config: Arc<Live>,
    clock: Arc<dyn Clock>,
    /// Told when an alert mail was queued.
    wake: Arc<crate::wake::Wakers>,
    /// This process, in refresh claims.
    me: String,
    /// Per identity: one refresh at a time in this process, held from
    /// reading the grant to storing what the refresh brought (so no two
    /// tasks spend one refresh token).
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Tokens a refresh brought that the store would not take yet (the
    /// provider has spent the old refresh token: these must not be
    /// lost); written before anything else is done for the identity.
    unsaved: Arc<Mutex<HashMap<String, Unsaved>>>,
}

/// A refresh's result, sealed, and the grant generation it replaces.
#[derive(Clone)]
struct Unsaved {
    base: OAuthGrant,
    hex: String,
    access: Secret,
    expires: DateTime<Utc>,
    done: DateTime<Utc>,
    rotated: bool,
    scopes: Vec<String>,
}

/// Where a grant stands for a caller.
enum Current {
    /// A token with time left.
    Fresh(Secret),
    /// Due (or without a token): the grant as read and its tokens.
    Due(Box<OAuthGrant>, Option<Sealed>),
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
            locks: Arc::default(),
            unsaved: Arc::default(),
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

    /// The identity's issuer, made for each use: its client secret is
    /// read anew (an admin may have replaced an expired one in place).
    pub fn issuer(&self, name: &str) -> Result<Issuer, GrantError> {
        let id = self.identity(name)?;
        Issuer::new(&id).map_err(|e| broken(name, e))
    }

    fn lock_for(&self, identity: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(identity.to_string())
            .or_default()
            .clone()
    }

    /// A valid access token for `identity`: the stored one while it has
    /// time left, else a fresh one.
    // Long: the stored token, the refusal pacing and the refresh hand-off are one decision under the identity's lock.
    pub async fn access_token(&self, identity: &str) -> Result<Secret, GrantError> {
        let id = self.identity(identity)?;
        if self.unsaved_of(identity).is_none() {
            if let Current::Fresh(t) = self.current(&id)? {
                return Ok(t);
            }
        }
        let lock = self.lock_for(identity);
        let one = lock.lock_owned().await;
        if let Some(t) = self.save_unsaved(identity)? {
            return Ok(t);
        }
        // What a refresh needs, before any claim: a fault of this node
        // (no key, an unreadable secret) must not block the others.
        let key = self.this_key(identity)?;
        let issuer = self.issuer(identity)?;
        for _ in 0..CLAIM_WAIT_ROUNDS {
            // Read again under the lock: another task may have refreshed.
            let (grant, sealed) = match self.current(&id)? {
                Current::Fresh(t) => return Ok(t),
                Current::Due(g, s) => (*g, s),
            };
            let now = self.clock.now();
            let usable = sealed
                .as_ref()
                .zip(grant.access_expires_at)
                .filter(|(_, exp)| now < *exp)
                .map(|(s, _)| Secret::new(s.access.clone()));
            // After a failed refresh, wait before the next try (logins
            // are frequent, the provider may be down): the current token
            // serves meanwhile, if it still can.
            if let Some(failed) = grant.last_error_at {
                if now - failed < chrono::Duration::seconds(RETRY_AFTER_FAILURE) {
                    return usable.ok_or_else(|| GrantError::Unavailable {
                        identity: identity.to_string(),
                        why: grant.last_error.clone().unwrap_or_default(),
                    });
                }
            }
            match self.claim(&grant, now)? {
                Claim::Changed => continue,
                Claim::Busy => {
                    // Another node refreshes: its result is ours in a
                    // moment; the current token while it still works.
                    if let Some(t) = usable {
                        return Ok(t);
                    }
                    tokio::time::sleep(CLAIM_POLL).await;
                    continue;
                }
                Claim::Ours(grant) => {
                    // In a task of its own, holding this identity's lock:
                    // it ends (and stores what the provider gave) even if
                    // this caller is dropped.
                    let me = self.clone();
                    let task_id = id.clone();
                    let task = tokio::spawn(async move {
                        let _one = one;
                        me.refresh(&task_id, key, issuer, *grant, sealed, now).await
                    });
                    return match task.await {
                        Ok(Ok(Some(t))) => Ok(t),
                        // The grant changed under the refresh (a login,
                        // a logout): what it is now decides.
                        Ok(Ok(None)) => match self.current(&id)? {
                            Current::Fresh(t) => Ok(t),
                            Current::Due(..) => Err(GrantError::Unavailable {
                                identity: identity.to_string(),
                                why: "the grant changed during a refresh".into(),
                            }),
                        },
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(broken(identity, format!("the refresh failed: {e}"))),
                    };
                }
            }
        }
        Err(GrantError::Unavailable {
            identity: identity.to_string(),
            why: "another node's refresh did not finish".into(),
        })
    }

    /// The grant as stored: a token with time left, or what is due.
    fn current(&self, id: &Identity) -> Result<Current, GrantError> {
        let grant = match self.read(&id.name)? {
            Some(g) => g,
            None if id.flow == Flow::ClientCredentials => OAuthGrant {
                identity: id.name.clone(),
                valid: true,
                ..Default::default()
            },
            None => return Err(GrantError::NoGrant(id.name.clone())),
        };
        if !grant.valid {
            return Err(GrantError::Dead {
                identity: id.name.clone(),
                why: grant
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "logged out".into()),
            });
        }
        let sealed = self.open(&grant)?;
        if let (Some(s), Some(exp)) = (&sealed, grant.access_expires_at) {
            if self.clock.now() < due(grant.refreshed_at.or(grant.logged_in_at), exp) {
                return Ok(Current::Fresh(Secret::new(s.access.clone())));
            }
        }
        Ok(Current::Due(Box::new(grant), sealed))
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

    fn this_key(&self, identity: &str) -> Result<TokenKey, GrantError> {
        Broker::key(&self.config.get().oauth2).map_err(|why| broken(identity, why))
    }

    fn open(&self, grant: &OAuthGrant) -> Result<Option<Sealed>, GrantError> {
        let Some(hex) = &grant.sealed else {
            return Ok(None);
        };
        open_sealed(&self.this_key(&grant.identity)?, &grant.identity, hex).map(Some)
    }

    /// Takes the refresh for this process, if the grant is still the one
    /// read and no other node holds a live claim.
    fn claim(&self, read: &OAuthGrant, now: DateTime<Utc>) -> Result<Claim, GrantError> {
        let me = self.me.clone();
        let until = now
            + chrono::Duration::from_std(claim_for(&self.identity(&read.identity)?))
                .unwrap_or_default();
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

    /// One refresh under our claim. None: stored nothing, the grant
    /// changed meanwhile.
    async fn refresh(
        &self,
        id: &Identity,
        key: TokenKey,
        issuer: Issuer,
        grant: OAuthGrant,
        sealed: Option<Sealed>,
        now: DateTime<Utc>,
    ) -> Result<Option<Secret>, GrantError> {
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
            Ok(t) => {
                let u = self.sealed_refresh(&key, id, grant, t, old_refresh, done)?;
                self.store_refresh(&id.name, u).await
            }
            Err(e) => self.failed(id, grant, sealed, now, done, e).map(Some),
        }
    }

    /// Records a failed refresh (a dead grant: marked, and the alert
    /// queued in the same transaction); the current token while it works.
    fn failed(
        &self,
        id: &Identity,
        grant: OAuthGrant,
        sealed: Option<Sealed>,
        now: DateTime<Utc>,
        done: DateTime<Utc>,
        e: FlowError,
    ) -> Result<Secret, GrantError> {
        let dead = matches!(e, FlowError::Dead(_) | FlowError::Config(_));
        let why = e.to_string();
        let identity = id.name.clone();
        let me = self.me.clone();
        let config = self.config.get();
        let alerted = self
            .store
            .transact(|tx| -> Result<Option<u64>, crate::effects::EffectsError> {
                let mut alert = None;
                if let Some(mut g) = tx.oauth_grant(&identity)? {
                    if g.generation == grant.generation {
                        if dead && g.valid {
                            g.valid = false;
                            // Once per death: in the transaction that
                            // records it.
                            alert = queue_alert(tx, &config, &identity, &why, done)?;
                        }
                        g.last_error = Some(why.clone());
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

    /// What a refresh brought, sealed: the rotated refresh token, or the
    /// old one when none came.
    fn sealed_refresh(
        &self,
        key: &TokenKey,
        id: &Identity,
        base: OAuthGrant,
        t: Tokens,
        old_refresh: Option<String>,
        done: DateTime<Utc>,
    ) -> Result<Unsaved, GrantError> {
        if let Some(said) = t.lifetime_said {
            tracing::warn!(identity = %id.name, said_s = said.as_secs(), used_s = t.lifetime.as_secs(),
                "the provider's token lifetime is out of bounds; using the bound");
        }
        let sealed = Sealed {
            access: t.access.expose().to_string(),
            refresh: t
                .refresh
                .as_ref()
                .map(|r| r.expose().to_string())
                .or(old_refresh),
        };
        Ok(Unsaved {
            base,
            hex: seal_with(key, &id.name, &sealed)?,
            access: t.access,
            expires: done + chrono::Duration::from_std(t.lifetime).unwrap_or_default(),
            done,
            rotated: t.refresh.is_some(),
            scopes: t.scopes,
        })
    }

    /// Stores a refresh's result in one transaction, over the grant it
    /// started from only; a store that refuses is tried again a few
    /// times, then the result is kept in memory (the provider has spent
    /// the old refresh token) and written before the next use.
    async fn store_refresh(
        &self,
        identity: &str,
        u: Unsaved,
    ) -> Result<Option<Secret>, GrantError> {
        // In memory first: whatever happens next, the new refresh token
        // is not only in a future that may be dropped.
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(identity.to_string(), u.clone());
        let mut wait = Duration::from_millis(250);
        for attempt in 0..4 {
            match self.write_refresh(identity, &u) {
                Ok(stored) => {
                    self.unsaved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(identity);
                    if !stored {
                        // A login or logout wrote meanwhile: it decides.
                        tracing::info!(identity = %identity, "the grant changed during the refresh; its result is dropped");
                        return Ok(None);
                    }
                    tracing::info!(identity = %identity, rotated = u.rotated, expires = %u.expires, "access token refreshed");
                    return Ok(Some(u.access));
                }
                Err(e) if attempt < 3 => {
                    tracing::warn!(identity = %identity, error = %e, "cannot store the refreshed tokens yet; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 4;
                }
                Err(e) => {
                    tracing::error!(identity = %identity, error = %e, "cannot store the refreshed tokens; kept in memory and written before the next use");
                }
            }
        }
        Ok(Some(u.access))
    }

    fn write_refresh(&self, identity: &str, u: &Unsaved) -> Result<bool, StoreError> {
        let me = self.me.clone();
        self.store.transact(|tx| -> Result<bool, StoreError> {
            let mut g = match tx.oauth_grant(identity)? {
                Some(g) => g,
                None if u.base.generation == 0 => u.base.clone(),
                None => return Ok(false),
            };
            // Another login/logout, or a death recorded meanwhile (this
            // node's claim ran out): not overwritten, not revived.
            if g.generation != u.base.generation || !g.valid {
                return Ok(false);
            }
            g.sealed = Some(u.hex.clone());
            g.access_expires_at = Some(u.expires);
            g.refreshed_at = Some(u.done);
            if u.rotated {
                g.refresh_token_at = Some(u.done);
            }
            g.scopes = u.scopes.clone();
            g.generation += 1;
            g.last_error = None;
            g.last_error_at = None;
            g.valid = true;
            if g.refreshing.as_ref().is_some_and(|(n, _)| *n == me) {
                g.refreshing = None;
            }
            tx.set_oauth_grant(&g)?;
            Ok(true)
        })
    }

    fn unsaved_of(&self, identity: &str) -> Option<Unsaved> {
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(identity)
            .cloned()
    }

    /// Writes a refresh's result the store refused before. Some(token):
    /// it still cannot be written, and its access token serves.
    fn save_unsaved(&self, identity: &str) -> Result<Option<Secret>, GrantError> {
        let Some(u) = self.unsaved_of(identity) else {
            return Ok(None);
        };
        match self.write_refresh(identity, &u) {
            Ok(stored) => {
                if !stored {
                    tracing::info!(identity = %identity, "the grant changed before the refreshed tokens could be stored; they are dropped");
                }
                self.unsaved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(identity);
                Ok(None)
            }
            Err(e) if self.clock.now() < u.expires => {
                tracing::warn!(identity = %identity, error = %e, "the refreshed tokens are still not stored");
                Ok(Some(u.access))
            }
            Err(e) => Err(GrantError::Unavailable {
                identity: identity.to_string(),
                why: format!("the refreshed tokens cannot be stored: {e}"),
            }),
        }
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
        let now = self.clock.now();
        if let Some(u) = self
            .unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(identity)
        {
            // Not stored yet: it stops serving; its refresh token waits
            // for the store (the stored one is spent).
            if u.access.expose() == token.expose() {
                u.expires = now;
                return Ok(());
            }
        }
        let Some(grant) = self.read(identity)? else {
            return Ok(());
        };
        // A server that refuses every token (a wrong username, a missing
        // permission) must not make every login a refresh.
        if grant
            .rejected_at
            .is_some_and(|t| now - t < chrono::Duration::seconds(REJECT_PACE))
        {
            tracing::warn!(identity = %identity, "a server refused the access token again; not refreshing before {REJECT_PACE} s have passed");
            return Ok(());
        }
        let Some(sealed) = self.open(&grant)? else {
            return Ok(());
        };
        if sealed.access != token.expose() {
            return Ok(());
        }
        self.store
            .transact(|tx| -> Result<(), StoreError> {
                if let Some(mut g) = tx.oauth_grant(identity)? {
                    if g.generation == grant.generation {
                        g.access_expires_at = Some(now);
                        g.rejected_at = Some(now);
                        tx.set_oauth_grant(&g)?;
                    }
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
    Ok(Login {
        identity: id.name.clone(),
        sealed: seal_with(&key, &id.name, &sealed)?,
        lifetime_s: t.lifetime.as_secs(),
        has_refresh: t.refresh.is_some(),
        scopes: t.scopes.clone(),
        account,
    })
}

/// `s` sealed for `identity` with `key`, as hexadecimal.
fn seal_with(key: &TokenKey, identity: &str, s: &Sealed) -> Result<String, GrantError> {
    let plain = serde_json::to_vec(s).map_err(|e| broken(identity, e))?;
    let sealed = key
        .seal(identity, &plain)
        .map_err(|e| broken(identity, e))?;
    Ok(to_hex(&sealed))
}

/// The tokens `hex` holds for `identity`.
fn open_sealed(key: &TokenKey, identity: &str, hex: &str) -> Result<Sealed, GrantError> {
    let bytes = from_hex(hex)
        .ok_or_else(|| broken(identity, "its sealed tokens are damaged in the store"))?;
    let plain = key
        .open(identity, &bytes)
        .map_err(|e| broken(identity, e))?;
    serde_json::from_slice(&plain).map_err(|_| broken(identity, "its sealed tokens do not read"))
}

/// Whether the token key `config` names opens a login's tokens (the
/// daemon checks what a CLI with perhaps another key sealed).
pub fn opens(config: &crate::config::Config, login: &Login) -> Result<(), String> {
    let key = Broker::key(&config.oauth2)?;
    open_sealed(&key, &login.identity, &login.sealed)
        .map(|_| ())
        .map_err(|e| e.to_string())
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
            rejected_at: None,
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
/// a minute and at most ten minutes before its end, but never in the
/// first half of its life (a minute's token is not refreshed at once).
pub fn due(issued: Option<DateTime<Utc>>, expires: DateTime<Utc>) -> DateTime<Utc> {
    let life = issued.map_or(chrono::Duration::hours(1), |i| expires - i);
    let ahead = (life / 4)
        .clamp(chrono::Duration::minutes(1), chrono::Duration::minutes(10))
        .min(life / 2);
    expires - ahead
}

fn broken(identity: &str, e: impl std::fmt::Display) -> GrantError {
    GrantError::Broken {
        identity: identity.to_string(),
        why: e.to_string(),
    }
}

/// A store failure reads as an error, never as "no grant"; a passing
/// one (a lock wait, a lost connection) as one to wait out, not one
/// that needs an admin.
fn store_broken(identity: &str, e: StoreError) -> GrantError {
    if e.is_transient() {
        return GrantError::Unavailable {
            identity: identity.to_string(),
            why: format!("the store: {e}"),
        };
    }
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
