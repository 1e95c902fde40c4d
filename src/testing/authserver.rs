//! An OAuth 2 authorization server for the tests, on a free loopback
//! port: device authorization (RFC 8628), authorization code with PKCE,
//! client credentials, refresh with rotation, and token introspection
//! (RFC 7662) for Dovecot's `passdb { driver = oauth2 }`. Tests approve
//! device codes, revoke grants, expire tokens and script the token
//! endpoint's next answers (errors, HTML, huge bodies, hangs).
//! Shared by the unit tests and the integration tests (tests/it).

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

/// The client every test config uses.
pub const CLIENT_ID: &str = "escalator-test";
/// The secret of the confidential client (client credentials).
pub const CLIENT_SECRET: &str = "test-client-secret";

/// A scripted answer of the token endpoint, used once, before the
/// normal handling.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// `{"error": code}` with HTTP 400.
    Error(&'static str),
    /// HTTP 500 with an HTML page.
    Html500,
    /// HTTP 200, JSON content type, this many bytes.
    Huge(usize),
    /// No answer for this long.
    Hang(Duration),
    /// A token answer with this `expires_in`.
    ExpiresIn(i64),
    /// A refresh answered without a new refresh token.
    NoRotation,
    /// Handled as usual (to aim the next entry at a later request).
    Pass,
}

#[derive(Default)]
struct Device {
    user_code: String,
    approved: bool,
    denied: bool,
    expires: Option<Instant>,
    /// `slow_down` answers still to give.
    slow_downs: u32,
    polls: u32,
}

#[derive(Default)]
struct Inner {
    devices: HashMap<String, Device>,
    /// code → (PKCE challenge, redirect URI)
    codes: HashMap<String, (String, String)>,
    /// access token → (user, valid until)
    access: HashMap<String, (String, Instant)>,
    /// refresh token → user
    refresh: HashMap<String, String>,
    rotate: bool,
    expires_in: i64,
    device_lifetime: u64,
    script: VecDeque<Scripted>,
    /// Counts by grant type.
    grants: HashMap<String, u64>,
    introspections: u64,
    user: String,
    counter: u64,
}

impl Inner {
    fn next(&mut self, prefix: &str) -> String {
        self.counter += 1;
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        format!("{prefix}-{}-{:016x}", self.counter, u64::from_le_bytes(r))
    }

    fn issue(&mut self, refresh: bool, expires_in: i64) -> serde_json::Value {
        let at = self.next("at");
        let life = Duration::from_secs(expires_in.max(0) as u64);
        self.access
            .insert(at.clone(), (self.user.clone(), Instant::now() + life));
        let mut body = json!({
            "access_token": at,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "scope": "https://mail.test/imap https://mail.test/smtp",
        });
        if refresh {
            let rt = self.next("rt");
            self.refresh.insert(rt.clone(), self.user.clone());
            body["refresh_token"] = json!(rt);
        }
        body
    }
}

/// The running server; stopped when dropped.
pub struct AuthServer {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl AuthServer {
    /// Starts on 127.0.0.1, tokens for `user` (the login Dovecot sees),
    /// living an hour, refresh tokens rotated at each use.
    pub async fn start(user: &str) -> AuthServer {
        let inner = Arc::new(Mutex::new(Inner {
            rotate: true,
            expires_in: 3600,
            device_lifetime: 300,
            user: user.to_string(),
            ..Default::default()
        }));
        let app = Router::new()
            .route("/device", post(device))
            .route("/token", post(token))
            .route("/authorize", get(authorize))
            .route("/introspect", post(introspect))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the authorization server");
        let addr = listener.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        AuthServer { addr, inner, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The `[oauth2.NAME]` keys for this server (provider "generic").
    pub fn identity_toml(&self, name: &str, flow: &str) -> String {
        let secret = if flow == "client_credentials" {
            "client_secret_env = \"TEST_CLIENT_SECRET\"\n"
        } else {
            ""
        };
        format!(
            "[oauth2.{name}]\nprovider = \"generic\"\nclient_id = \"{CLIENT_ID}\"\nflow = \"{flow}\"\n\
             device_authorization_url = \"{}\"\nauthorization_url = \"{}\"\ntoken_url = \"{}\"\n\
             scopes = [\"https://mail.test/imap\", \"https://mail.test/smtp\", \"offline_access\"]\n{secret}",
            self.url("/device"),
            self.url("/authorize"),
            self.url("/token"),
        )
    }

    /// Approves every device code, now and from now on once asked for.
    pub fn approve_all(&self) {
        for d in lock(&self.inner).devices.values_mut() {
            d.approved = true;
        }
    }

    /// The user codes handed out so far.
    pub fn user_codes(&self) -> Vec<String> {
        lock(&self.inner)
            .devices
            .values()
            .map(|d| d.user_code.clone())
            .collect()
    }

    pub fn approve(&self, user_code: &str) -> bool {
        let mut g = lock(&self.inner);
        let mut found = false;
        for d in g.devices.values_mut() {
            if d.user_code == user_code {
                d.approved = true;
                found = true;
            }
        }
        found
    }

    pub fn deny_all(&self) {
        for d in lock(&self.inner).devices.values_mut() {
            d.denied = true;
        }
    }

    /// The next device codes answer `slow_down` this many times first.
    pub fn slow_down(&self, times: u32) {
        for d in lock(&self.inner).devices.values_mut() {
            d.slow_downs = times;
        }
    }

    /// Device codes handed out from now live this long.
    pub fn set_device_lifetime(&self, secs: u64) {
        lock(&self.inner).device_lifetime = secs;
    }

    /// Access tokens issued from now live this long.
    pub fn set_expires_in(&self, secs: i64) {
        lock(&self.inner).expires_in = secs;
    }

    pub fn set_rotation(&self, on: bool) {
        lock(&self.inner).rotate = on;
    }

    pub fn script(&self, answer: Scripted) {
        lock(&self.inner).script.push_back(answer);
    }

    /// Every refresh token and access token stops working (a password
    /// reset, a revoked consent).
    pub fn revoke_all(&self) {
        let mut g = lock(&self.inner);
        g.refresh.clear();
        g.access.clear();
    }

    /// Every access token issued so far is expired (refresh tokens stay).
    pub fn expire_access_tokens(&self) {
        for (_, until) in lock(&self.inner).access.values_mut() {
            *until = Instant::now();
        }
    }

    /// How many token requests of `grant_type` were answered with tokens.
    pub fn grants(&self, grant_type: &str) -> u64 {
        lock(&self.inner)
            .grants
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }

    pub fn introspections(&self) -> u64 {
        lock(&self.inner).introspections
    }

    /// The valid refresh tokens (a test checks the store holds none in
    /// the clear).
    pub fn refresh_tokens(&self) -> Vec<String> {
        lock(&self.inner).refresh.keys().cloned().collect()
    }

    pub fn access_tokens(&self) -> Vec<String> {
        lock(&self.inner).access.keys().cloned().collect()
    }
}

fn html500() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/html")],
        "<html><body>Service unavailable</body></html>",
    )
        .into_response()
}

fn oauth_error(code: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": code, "error_description": format!("test server: {code}")})),
    )
        .into_response()
}

async fn device(State(s): State<Shared>, Form(f): Form<HashMap<String, String>>) -> Response {
    let scripted = lock(&s).script.pop_front();
    match scripted {
        Some(Scripted::Error(code)) => return oauth_error(code),
        Some(Scripted::Html500) => return html500(),
        Some(Scripted::Hang(d)) => tokio::time::sleep(d).await,
        _ => {}
    }
    if f.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return oauth_error("invalid_client");
    }
    let mut g = lock(&s);
    let device_code = g.next("dc");
    let n = g.counter;
    let user_code = format!("CODE-{n:04}");
    let life = g.device_lifetime;
    g.devices.insert(
        device_code.clone(),
        Device {
            user_code: user_code.clone(),
            expires: Some(Instant::now() + Duration::from_secs(life)),
            ..Default::default()
        },
    );
    Json(json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": "http://127.0.0.1/verify",
        "expires_in": life,
        "interval": 1,
    }))
    .into_response()
}

// Long: the scripted answers first, then one arm per grant type (RFC 6749, 7636, 8628).
async fn token(State(s): State<Shared>, Form(f): Form<HashMap<String, String>>) -> Response {
    let scripted = lock(&s).script.pop_front();
    let mut expires_override = None;
    let mut no_rotation = false;
    match scripted {
        Some(Scripted::Error(code)) => return oauth_error(code),
        Some(Scripted::Html500) => return html500(),
        Some(Scripted::Huge(n)) => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                format!("{{\"access_token\":\"{}\"}}", "x".repeat(n)),
            )
                .into_response()
        }
        Some(Scripted::Hang(d)) => tokio::time::sleep(d).await,
        Some(Scripted::ExpiresIn(e)) => expires_override = Some(e),
        Some(Scripted::NoRotation) => no_rotation = true,
        Some(Scripted::Pass) | None => {}
    }
    let mut g = lock(&s);
    let expires_in = expires_override.unwrap_or(g.expires_in);
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    let client_ok = f.get("client_id").map(String::as_str) == Some(CLIENT_ID);
    let body = match grant.as_str() {
        "urn:ietf:params:oauth:grant-type:device_code" => {
            if !client_ok {
                return oauth_error("invalid_client");
            }
            let code = f.get("device_code").cloned().unwrap_or_default();
            let Some(d) = g.devices.get_mut(&code) else {
                return oauth_error("invalid_grant");
            };
            d.polls += 1;
            if d.expires.is_some_and(|e| Instant::now() > e) {
                return oauth_error("expired_token");
            }
            if d.denied {
                return oauth_error("access_denied");
            }
            if d.slow_downs > 0 {
                d.slow_downs -= 1;
                return oauth_error("slow_down");
            }
            if !d.approved {
                return oauth_error("authorization_pending");
            }
            g.devices.remove(&code);
            g.issue(true, expires_in)
        }
        "authorization_code" => {
            if !client_ok {
                return oauth_error("invalid_client");
            }
            let code = f.get("code").cloned().unwrap_or_default();
            let Some((challenge, redirect)) = g.codes.remove(&code) else {
                return oauth_error("invalid_grant");
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            if s256(&verifier) != challenge
                || f.get("redirect_uri").map(String::as_str) != Some(redirect.as_str())
            {
                return oauth_error("invalid_grant");
            }
            g.issue(true, expires_in)
        }
        "refresh_token" => {
            if !client_ok {
                return oauth_error("invalid_client");
            }
            let rt = f.get("refresh_token").cloned().unwrap_or_default();
            if !g.refresh.contains_key(&rt) {
                return oauth_error("invalid_grant");
            }
            let rotate = g.rotate && !no_rotation;
            if rotate {
                g.refresh.remove(&rt);
            }
            g.issue(rotate, expires_in)
        }
        "client_credentials" => {
            if !client_ok || f.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET) {
                return oauth_error("invalid_client");
            }
            g.issue(false, expires_in)
        }
        _ => return oauth_error("unsupported_grant_type"),
    };
    *g.grants.entry(grant).or_default() += 1;
    Json(body).into_response()
}

/// The "browser": approves at once and sends the user back with a code.
async fn authorize(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (Some(redirect), Some(state), Some(challenge)) = (
        q.get("redirect_uri"),
        q.get("state"),
        q.get("code_challenge"),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            "missing redirect_uri, state or code_challenge",
        )
            .into_response();
    };
    if q.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return (StatusCode::BAD_REQUEST, "PKCE S256 required").into_response();
    }
    let mut g = lock(&s);
    let code = g.next("code");
    g.codes
        .insert(code.clone(), (challenge.clone(), redirect.clone()));
    let to = format!(
        "{redirect}?code={}&state={}",
        urlencode(&code),
        urlencode(state)
    );
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

async fn introspect(State(s): State<Shared>, Form(f): Form<HashMap<String, String>>) -> Response {
    let mut g = lock(&s);
    g.introspections += 1;
    let token = f.get("token").cloned().unwrap_or_default();
    match g.access.get(&token) {
        Some((user, until)) if Instant::now() < *until => {
            Json(json!({"active": true, "username": user})).into_response()
        }
        _ => Json(json!({"active": false})).into_response(),
    }
}

fn s256(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64url(digest.as_ref())
}

fn base64url(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &x)| n | u32::from(x) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
