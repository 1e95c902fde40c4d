//! The conversations with a provider's token endpoint, through the
//! `oauth2` crate (device code per RFC 8628, authorization code with
//! PKCE, client credentials, refresh): one HTTP client on the project's
//! rustls/ring stack that never follows a redirect, reads at most
//! [`MAX_BODY`] and gives up after the identity's `timeout`. Every error is put
//! in words an admin can act on, and never holds a token or a secret:
//! a body that is not a token answer is described, not quoted.

use std::time::Duration;

use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, EndpointMaybeSet, EndpointNotSet, HttpRequest, HttpResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardDeviceAuthorizationResponse, StandardErrorResponse, TokenResponse, TokenUrl,
};

use crate::config::oauth::Identity;
use crate::config::Secret;

/// The most a token endpoint's answer may be (a token answer is a few
/// KB; Microsoft's with an id token under 10 KB).
pub const MAX_BODY: usize = 1024 * 1024;
/// Believed lifetime of an access token whose answer names none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// A token is never taken to live shorter (an `expires_in` of 0 would
/// make every use a refresh) or longer (a refresh at least daily keeps a
/// dead grant from going unnoticed) than these.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

type Client = BasicClient<
    EndpointMaybeSet,
    EndpointMaybeSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
>;

/// Tokens as a provider gave them.
#[derive(Debug)]
pub struct Tokens {
    pub access: Secret,
    /// None: the answer had none (client credentials; or a refresh that
    /// did not rotate, so the old one stays).
    pub refresh: Option<Secret>,
    /// As the provider said, held within [`MIN_LIFETIME`]..[`MAX_LIFETIME`].
    pub lifetime: Duration,
    /// The lifetime the provider said, when it was outside those bounds.
    pub lifetime_said: Option<Duration>,
    pub scopes: Vec<String>,
}

/// Why a request to the provider failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The grant is gone (`invalid_grant`, consent revoked, password
    /// reset, a client secret expired or wrong): only a new login helps.
    #[error("{0}")]
    Dead(String),
    /// The admin said no, or the code ran out, during a login.
    #[error("{0}")]
    Login(String),
    /// Network, timeouts, a 5xx, a body that is not a token answer: try
    /// again later with the same grant.
    #[error("{0}")]
    Transient(String),
    /// The identity's settings or secret file.
    #[error("{0}")]
    Config(String),
}

/// What to show the admin for a device login.
pub struct DeviceLogin {
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_in: Duration,
    details: StandardDeviceAuthorizationResponse,
}

/// A browser login begun: the URL to open and what checks its answer.
pub struct BrowserLogin {
    pub url: String,
    pub redirect_uri: String,
    state: CsrfToken,
    verifier: PkceCodeVerifier,
}

impl BrowserLogin {
    /// The state the provider must send back (checked before anything
    /// else in the answer).
    pub fn state(&self) -> &str {
        self.state.secret()
    }
}

/// The HTTP side of the flows for one identity.
pub struct Issuer {
    id: Identity,
    client: Client,
    http: Http,
}

/// The HTTP client the oauth2 crate calls (a named type: a closure over
/// `&self` would make the futures not `Send` for every lifetime).
struct Http(reqwest::Client);

impl<'c> oauth2::AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>,
    >;
    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(&self.0, request))
    }
}

impl Issuer {
    pub fn new(id: &Identity) -> Result<Issuer, FlowError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            FlowError::Config(format!("oauth2.{}.{what}: {e}", id.name))
        };
        let mut client = BasicClient::new(ClientId::new(id.client_id.clone()))
            // Every provider takes the client's id (and secret) in the
            // form; Microsoft's public clients take nothing else.
            .set_auth_type(AuthType::RequestBody)
            .set_auth_uri_option(
                id.authorization_url
                    .clone()
                    .map(AuthUrl::new)
                    .transpose()
                    .map_err(|e| bad("authorization_url", &e))?,
            )
            .set_token_uri_option(Some(
                TokenUrl::new(id.token_url.clone()).map_err(|e| bad("token_url", &e))?,
            ))
            .set_device_authorization_url_option(
                id.device_authorization_url
                    .clone()
                    .map(DeviceAuthorizationUrl::new)
                    .transpose()
                    .map_err(|e| bad("device_authorization_url", &e))?,
            );
        if let Some(src) = &id.client_secret {
            let secret = src.read().map_err(|e| {
                FlowError::Config(format!(
                    "oauth2.{}.{}: {e}",
                    id.name,
                    id.client_secret_key().unwrap_or_default()
                ))
            })?;
            client = client.set_client_secret(ClientSecret::new(secret.expose().to_string()));
        }
        let mut http = reqwest::Client::builder()
            // A token endpoint that redirects could send the code or the
            // secret elsewhere (the oauth2 crate's own advice).
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(id.timeout)
            .user_agent(concat!("escalator/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &id.ca_file {
            let pem = std::fs::read(ca).map_err(|e| bad("ca_file", &e))?;
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad("ca_file", &e))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .map_err(|e| FlowError::Config(format!("cannot set up HTTPS: {e}")))?;
        Ok(Issuer {
            id: id.clone(),
            client,
            http: Http(http),
        })
    }

    fn scopes(&self) -> impl Iterator<Item = Scope> + '_ {
        self.id.scopes.iter().map(|s| Scope::new(s.clone()))
    }

    /// Asks for a device code (the first step of a device login).
    pub async fn start_device(&self) -> Result<DeviceLogin, FlowError> {
        let req = self
            .client
            .exchange_device_code()
            .map_err(|e| FlowError::Config(e.to_string()))?
            .add_scopes(self.scopes());
        let details: StandardDeviceAuthorizationResponse = req
            .request_async(&self.http)
            .await
            .map_err(|e| explain(e, "device authorization endpoint"))?;
        Ok(DeviceLogin {
            verification_uri: details.verification_uri().to_string(),
            verification_uri_complete: details
                .verification_uri_complete()
                .map(|u| u.secret().to_string()),
            user_code: details.user_code().secret().to_string(),
            expires_in: details.expires_in(),
            details,
        })
    }

    /// Polls until the admin has entered the code (the interval as the
    /// provider says, longer after each `slow_down`), it was refused, or
    /// it expired.
    pub async fn finish_device(&self, login: &DeviceLogin) -> Result<Tokens, FlowError> {
        let req = self
            .client
            .exchange_device_access_token(&login.details)
            .map_err(|e| FlowError::Config(e.to_string()))?;
        let t = req
            .request_async(&self.http, tokio::time::sleep, Some(login.expires_in))
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => {
                    use oauth2::DeviceCodeErrorResponseType as T;
                    let said = server_said(&r);
                    match r.error() {
                        T::AccessDenied => FlowError::Login(format!(
                            "the login was refused at the provider ({said}); run escalator auth login {} again",
                            self.id.name
                        )),
                        T::ExpiredToken => FlowError::Login(format!(
                            "the code expired before it was entered ({said}); run escalator auth login {} again",
                            self.id.name
                        )),
                        _ => FlowError::Login(format!("the provider refused the login: {said}")),
                    }
                }
                RequestTokenError::Other(s) if s.contains("timed out") || s.contains("expired") => {
                    FlowError::Login(format!(
                        "the code expired before it was entered; run escalator auth login {} again",
                        self.id.name
                    ))
                }
                other => explain_any(other, "token endpoint"),
            })?;
        Ok(tokens(&t, &self.id.scopes))
    }

    /// The browser login's URL, with PKCE and a state to check, sent
    /// back to `redirect_uri` (a loopback address).
    pub fn start_browser(&self, redirect_uri: &str) -> Result<BrowserLogin, FlowError> {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = self.client.clone().set_redirect_uri(
            RedirectUrl::new(redirect_uri.to_string())
                .map_err(|e| FlowError::Config(e.to_string()))?,
        );
        let (url, state) = client
            .authorize_url(CsrfToken::new_random)
            .map_err(|e| FlowError::Config(e.to_string()))?
            .add_scopes(self.scopes())
            .set_pkce_challenge(challenge)
            // Google gives a refresh token only with these two.
            .add_extra_param("access_type", "offline")
            .add_extra_param("prompt", "consent")
            .url();
        Ok(BrowserLogin {
            url: url.to_string(),
            redirect_uri: redirect_uri.to_string(),
            state,
            verifier,
        })
    }

    /// Ends a browser login with the address the browser was sent back
    /// to (or just its query): checks the state, trades the code.
    pub async fn finish_browser(
        &self,
        login: BrowserLogin,
        returned: &str,
    ) -> Result<Tokens, FlowError> {
        let query = returned.trim();
        let query = query.split_once('?').map_or(query, |(_, q)| q);
        let query = query.split('#').next().unwrap_or("");
        let mut code = None;
        let mut state = None;
        let mut error = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "code" => code = Some(v.into_owned()),
                "state" => state = Some(v.into_owned()),
                "error" => error = Some(v.into_owned()),
                _ => {}
            }
        }
        if let Some(e) = error {
            return Err(FlowError::Login(format!(
                "the provider sent back error {:?} instead of a code",
                printable(&e)
            )));
        }
        if state.as_deref() != Some(login.state.secret().as_str()) {
            return Err(FlowError::Login(
                "the address pasted back does not belong to this login (its state differs): \
                 open the URL printed above and paste the address the browser ends on"
                    .into(),
            ));
        }
        let code = code
            .ok_or_else(|| FlowError::Login("the address pasted back has no code in it".into()))?;
        let client = self.client.clone().set_redirect_uri(
            RedirectUrl::new(login.redirect_uri).map_err(|e| FlowError::Config(e.to_string()))?,
        );
        let t = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| FlowError::Config(e.to_string()))?
            .set_pkce_verifier(login.verifier)
            .request_async(&self.http)
            .await
            .map_err(|e| explain(e, "token endpoint"))?;
        Ok(tokens(&t, &self.id.scopes))
    }

    /// App-only tokens (client credentials).
    pub async fn client_credentials(&self) -> Result<Tokens, FlowError> {
        let t = self
            .client
            .exchange_client_credentials()
            .map_err(|e| FlowError::Config(e.to_string()))?
            .add_scopes(self.scopes())
            .request_async(&self.http)
            .await
            .map_err(|e| explain(e, "token endpoint"))?;
        Ok(tokens(&t, &self.id.scopes))
    }

    /// New tokens for a refresh token (a rotated refresh token in the
    /// answer, or None when the provider keeps the old one).
    pub async fn refresh(&self, refresh: Secret) -> Result<Tokens, FlowError> {
        let rt = RefreshToken::new(refresh.expose().to_string());
        let t = self
            .client
            .exchange_refresh_token(&rt)
            .map_err(|e| FlowError::Config(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(|e| explain(e, "token endpoint"))?;
        Ok(tokens(&t, &self.id.scopes))
    }
}

/// One request: no redirects, at most [`MAX_BODY`] read, and an answer
/// that is not JSON turned into an error naming its status (a proxy's
/// HTML page, a 500).
async fn send(http: &reqwest::Client, request: HttpRequest) -> Result<HttpResponse, HttpError> {
    let (parts, body) = request.into_parts();
    let mut req = http.request(parts.method, parts.uri.to_string()).body(body);
    for (name, value) in &parts.headers {
        req = req.header(name, value);
    }
    let mut resp = req.send().await.map_err(|e| HttpError(describe(&e)))?;
    let status = resp.status();
    let json = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    if !json {
        return Err(HttpError(format!(
            "the answer is not JSON (HTTP {status}{})",
            match resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
            {
                Some(ct) => format!(", {}", printable(ct)),
                None => String::new(),
            }
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| HttpError(describe(&e)))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(HttpError(format!(
                "the answer is larger than {} KB (HTTP {status}); not read further",
                MAX_BODY / 1024
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let mut out = HttpResponse::new(body);
    *out.status_mut() = status;
    out.headers_mut().insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    Ok(out)
}

/// An HTTP failure in words (no URL query, no body).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "no answer in time (oauth2.NAME.timeout)".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else if e.is_redirect() {
        "it redirects elsewhere (not followed)".to_string()
    } else {
        "the request failed".to_string()
    };
    // reqwest's source chain says why (DNS, TLS, refused) without the
    // request's body; the URL it names has no secret in it.
    let mut why = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        why = s.to_string();
        src = s.source();
    }
    if why.is_empty() {
        what
    } else {
        format!("{what}: {}", printable(&why))
    }
}

fn tokens(t: &impl TokenResponse, asked: &[String]) -> Tokens {
    let said = t.expires_in();
    let lifetime = said
        .unwrap_or(DEFAULT_LIFETIME)
        .clamp(MIN_LIFETIME, MAX_LIFETIME);
    Tokens {
        access: Secret::new(t.access_token().secret().clone()),
        refresh: t.refresh_token().map(|r| Secret::new(r.secret().clone())),
        lifetime,
        lifetime_said: said.filter(|s| *s != lifetime),
        scopes: t
            .scopes()
            .map(|s| s.iter().map(|s| s.to_string()).collect())
            .unwrap_or_else(|| asked.to_vec()),
    }
}

/// The provider's error code and description, cut and cleaned.
fn server_said<T: oauth2::ErrorResponseType + std::fmt::Display>(
    r: &StandardErrorResponse<T>,
) -> String {
    let mut s = r.error().to_string();
    if let Some(d) = r.error_description() {
        let d: String = printable(d).chars().take(300).collect();
        s.push_str(": ");
        s.push_str(&d);
    }
    s
}

/// A token endpoint's refusal of a refresh, code or credentials.
fn explain(
    e: RequestTokenError<HttpError, StandardErrorResponse<BasicErrorResponseType>>,
    endpoint: &str,
) -> FlowError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let said = server_said(&r);
            match r.error() {
                BasicErrorResponseType::InvalidGrant
                | BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient => FlowError::Dead(said),
                BasicErrorResponseType::InvalidScope
                | BasicErrorResponseType::InvalidRequest
                | BasicErrorResponseType::UnsupportedGrantType => {
                    FlowError::Config(format!("the provider refused the request: {said}"))
                }
                // Microsoft's and OpenID's: a person must sign in again
                // (new MFA, Conditional Access, consent withdrawn).
                BasicErrorResponseType::Extension(code)
                    if matches!(
                        code.as_str(),
                        "interaction_required"
                            | "consent_required"
                            | "login_required"
                            | "invalid_resource"
                    ) =>
                {
                    FlowError::Dead(said)
                }
                _ => FlowError::Transient(format!("the provider answered {said}")),
            }
        }
        other => explain_any(other, endpoint),
    }
}

fn explain_any<T: oauth2::ErrorResponse>(
    e: RequestTokenError<HttpError, T>,
    endpoint: &str,
) -> FlowError {
    match e {
        RequestTokenError::Request(h) => FlowError::Transient(format!("{endpoint}: {h}")),
        RequestTokenError::Parse(_, body) => FlowError::Transient(format!(
            "{endpoint}: the answer is not a token answer ({} bytes of JSON that do not fit)",
            body.len()
        )),
        RequestTokenError::Other(s) => {
            FlowError::Transient(format!("{endpoint}: {}", printable(&s)))
        }
        // (Each caller reads the provider's refusals itself.)
        RequestTokenError::ServerResponse(_) => {
            FlowError::Transient(format!("{endpoint} refused the request"))
        }
    }
}

/// Text from a provider, safe for one log line: controls and bidi
/// overrides out.
fn printable(s: &str) -> String {
    crate::template::printable(s)
}
