//! `[oauth2]`: provider defaults, refusals with their reasons, and the
//! endpoints that name an identity.

use super::*;
use crate::config::oauth::{Flow, Provider, GOOGLE_SCOPE, MICROSOFT_APP_SCOPE, MICROSOFT_SCOPES};

/// GOOD with its mailbox and SMTP logging in as identity `m365`.
fn with_identity(identity: &str) -> String {
    GOOD.replace(
        "password = \"pw\"",
        "auth = \"oauth2\"\noauth2 = \"m365\"",
    )
    .replace(
        "from = \"Example Support <support@example.test>\"",
        "from = \"Example Support <support@example.test>\"\nusername = \"support@example.test\"\nauth = \"oauth2\"\noauth2 = \"m365\"",
    ) + identity
}

#[test]
fn microsoft_defaults_fill_the_endpoints_and_scopes() {
    let c = parse(&with_identity(
        "[oauth2]\nkey_file = \"token.key\"\n[oauth2.m365]\nprovider = \"microsoft\"\n\
         tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"abc\"\n",
    ))
    .unwrap();
    let id = &c.oauth2.identities["m365"];
    assert_eq!(id.provider, Provider::Microsoft);
    assert_eq!(id.flow, Flow::Device);
    assert_eq!(
        id.token_url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(
        id.device_authorization_url.as_deref(),
        Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode")
    );
    assert_eq!(id.scopes, MICROSOFT_SCOPES.map(String::from).to_vec());
    assert_eq!(
        c.oauth2.key_file.as_deref(),
        Some(Path::new("/etc/token.key"))
    );
    assert_eq!(
        c.queues.iter().next().unwrap().mailbox.endpoint.oauth,
        Some(TokenSource::Identity("m365".into()))
    );
    assert_eq!(
        c.smtp.endpoint.oauth,
        Some(TokenSource::Identity("m365".into()))
    );
    let summary = c.summary();
    assert!(summary.contains("oauth2 identity m365"), "{summary}");
    assert!(
        summary.contains("m365: microsoft device flow, client abc"),
        "{summary}"
    );
}

#[test]
fn app_only_and_google_get_their_own_defaults() {
    let c = parse(&with_identity(
        "[oauth2.m365]\nprovider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\n\
         client_id = \"abc\"\nflow = \"client_credentials\"\nclient_secret_env = \"M365_SECRET\"\n\
         [oauth2.gmail]\nprovider = \"google\"\nclient_id = \"g\"\nclient_secret_file = \"g.secret\"\n",
    ))
    .unwrap();
    assert_eq!(
        c.oauth2.identities["m365"].scopes,
        vec![MICROSOFT_APP_SCOPE]
    );
    let g = &c.oauth2.identities["gmail"];
    assert_eq!(g.flow, Flow::AuthorizationCode, "Google's default flow");
    assert_eq!(g.scopes, vec![GOOGLE_SCOPE]);
    assert_eq!(g.token_url, "https://oauth2.googleapis.com/token");
    let summary = c.summary();
    assert!(
        summary.contains("(secret from client_secret_env)"),
        "{summary}"
    );
    assert!(
        !summary.contains("M365_SECRET"),
        "the variable's name is enough: {summary}"
    );
}

#[test]
fn what_a_provider_does_not_allow_is_refused_with_the_reason_and_the_fix() {
    let cases = [
        (
            "[oauth2.m365]\nprovider = \"google\"\nclient_id = \"g\"\nflow = \"device\"\nclient_secret_env = \"X\"\n",
            "oauth2.m365.flow: Google's device flow does not allow the mail scope",
        ),
        (
            "[oauth2.m365]\nprovider = \"google\"\nclient_id = \"g\"\n",
            "oauth2.m365.client_secret_file: Google's Desktop app clients send their client secret",
        ),
        (
            "[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\nclient_secret_env = \"S\"\n",
            "oauth2.m365.client_secret_file: a public client must not send a secret",
        ),
        (
            "[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\nflow = \"client_credentials\"\nclient_secret_env = \"S\"\n",
            "oauth2.m365.tenant: app-only tokens (flow = \"client_credentials\") need your own tenant",
        ),
        (
            "[oauth2.m365]\nprovider = \"microsoft\"\ntenant = \"t.example\"\nclient_id = \"a\"\nflow = \"client_credentials\"\n",
            "oauth2.m365.client_secret_file: flow = \"client_credentials\" logs in with the client's secret",
        ),
        (
            "[oauth2.m365]\nprovider = \"generic\"\nclient_id = \"a\"\n",
            "oauth2.m365.device_authorization_url: flow = \"device\" needs it",
        ),
        (
            "[oauth2.m365]\nprovider = \"generic\"\nclient_id = \"a\"\nflow = \"authorization_code\"\nauthorization_url = \"http://idp.example/auth\"\ntoken_url = \"https://idp.example/token\"\n",
            "oauth2.m365.authorization_url: tokens travel over it: https only",
        ),
        (
            "[oauth2.m365]\nprovider = \"okta\"\nclient_id = \"a\"\n",
            "oauth2.m365.provider: unknown \"okta\"",
        ),
        (
            "[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\nscopes = [\"a b\"]\n",
            "oauth2.m365.scopes: \"a b\" is not a scope",
        ),
        (
            "[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\ntenant = \"x/../evil\"\n",
            "oauth2.m365.tenant: a tenant is a domain",
        ),
        (
            "[oauth2.other]\nprovider = \"microsoft\"\nclient_id = \"a\"\n",
            "mailbox.oauth2: no identity \"m365\" in [oauth2] (there: other)",
        ),
    ];
    for (section, want) in cases {
        let p = problems(&with_identity(section));
        assert!(p.contains(want), "{section}\n→ {p}");
    }
    // A loopback http endpoint is fine (the tests' authorization server).
    parse(&with_identity(
        "[oauth2.m365]\nprovider = \"generic\"\nclient_id = \"a\"\n\
         device_authorization_url = \"http://127.0.0.1:9/device\"\ntoken_url = \"http://localhost:9/token\"\n",
    ))
    .unwrap();
}

#[test]
fn auth_oauth2_needs_its_identity_and_nothing_else() {
    let p = problems(&GOOD.replace("password = \"pw\"", "auth = \"oauth2\""));
    assert!(
        p.contains("mailbox.oauth2: auth = \"oauth2\" needs the identity's name"),
        "{p}"
    );
    let p = problems(&GOOD.replace("password = \"pw\"", "password = \"pw\"\noauth2 = \"m365\""));
    assert!(
        p.contains("mailbox.oauth2: names an identity: write auth = \"oauth2\""),
        "{p}"
    );
    let p = problems(&GOOD.replace(
        "password = \"pw\"",
        "auth = \"oauth2\"\noauth2 = \"m365\"\noauth_token_file = \"t\"",
    ));
    assert!(
        p.contains("mailbox.auth: auth = \"oauth2\" takes its tokens from [oauth2]"),
        "{p}"
    );
    // A misspelt key of [oauth2] itself is refused, naming it.
    let p = problems(&(GOOD.to_string() + "[oauth2]\nkey_fil = \"k\"\n"));
    assert!(p.contains("oauth2.key_fil"), "{p}");
}

#[test]
fn an_identity_s_unknown_key_is_named() {
    let p = problems(&with_identity(
        "[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\nclient_secret = \"inline!\"\n",
    ));
    assert!(p.contains("oauth2.m365"), "{p}");
    assert!(p.contains("unknown field `client_secret`"), "{p}");
    assert!(
        !p.contains("inline!"),
        "a secret written inline is not repeated: {p}"
    );
}

#[test]
fn a_token_key_that_cannot_be_read_is_a_problem_naming_the_key() {
    let c = parse(&with_identity(
        "[oauth2]\nkey_file = \"/nonexistent/token.key\"\n[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\n",
    ))
    .unwrap();
    let p = crate::oauth::key_problem(&c).unwrap_or_default();
    assert!(p.contains("oauth2.key_file /nonexistent/token.key"), "{p}");
    // A file that is not a key is refused as well, naming it.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("k");
    std::fs::write(&bad, "not a key").unwrap();
    let c = parse(&with_identity(&format!(
        "[oauth2]\nkey_file = \"{}\"\n[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\n",
        bad.display()
    )))
    .unwrap();
    let p = crate::oauth::key_problem(&c).unwrap_or_default();
    assert!(p.contains("a token key is 32 bytes"), "{p}");
    // An identity nobody logs in as needs no key.
    let c = parse(&(GOOD.to_string()
        + "[oauth2]\nkey_file = \"/nonexistent/token.key\"\n[oauth2.m365]\nprovider = \"microsoft\"\nclient_id = \"a\"\n"))
    .unwrap();
    assert!(crate::oauth::key_problem(&c).is_none());
}
