//! The flows and the broker against the test authorization server on
//! loopback (real HTTP, real store), the clock moved by hand.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};

use super::broker::{due, Broker, GrantError};
use super::flow::{FlowError, Issuer, MAX_LIFETIME, MIN_LIFETIME};
use crate::clock::{Clock, ManualClock};
use crate::config::Live;
use crate::handle::Handle;
use crate::store::Store;
use crate::testing::authserver::{AuthServer, Scripted};

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

struct Setup {
    _dir: tempfile::TempDir,
    server: AuthServer,
    handle: Handle,
    clock: Arc<ManualClock>,
}

async fn setup(flow: &str, extra: &str) -> Setup {
    setup_with(flow, extra, "").await
}

/// `extra`: more keys of `[oauth2]`; `mailbox`: more keys of `[mailbox]`.
async fn setup_with(flow: &str, extra: &str, mailbox: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server = AuthServer::start("support").await;
    std::fs::write(dir.path().join("token.key"), format!("{KEY}\n")).unwrap();
    let rest = format!(
        "[[tiers]]\nname = \"Frontline\"\nfirst_response = \"4h\"\n\
         [oauth2]\nkey_file = \"{}\"\n{extra}\n{}timeout = \"2s\"\n",
        dir.path().join("token.key").display(),
        server.identity_toml("idp", flow),
    );
    let config = crate::testing::config_from(&dir.path().join("store"), mailbox, &rest);
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap(),
    ));
    let handle = Handle {
        store,
        config: Live::new(config),
        clock: clock.clone(),
        wake: Default::default(),
    };
    Setup {
        _dir: dir,
        server,
        handle,
        clock,
    }
}

/// A device login approved at the server: the broker holds its tokens.
async fn logged_in(s: &Setup) -> Broker {
    let broker = Broker::new(&s.handle);
    let issuer = broker.issuer("idp").unwrap();
    let login = issuer.start_device().await.unwrap();
    assert!(s.server.approve(&login.user_code));
    let tokens = issuer.finish_device(&login).await.unwrap();
    assert!(tokens.refresh.is_some());
    let id = s.handle.config.get().oauth2.identities["idp"].clone();
    broker
        .store_login(&id, &tokens, Some("support".into()))
        .unwrap();
    broker
}

#[tokio::test]
async fn a_device_login_waits_for_the_code_and_slows_down_when_told() {
    let s = setup("device", "").await;
    let issuer = Broker::new(&s.handle).issuer("idp").unwrap();
    let login = issuer.start_device().await.unwrap();
    assert!(login.user_code.starts_with("CODE-"));
    s.server.slow_down(1);
    let approve = {
        let code = login.user_code.clone();
        let server_codes = s.server.user_codes();
        assert!(server_codes.contains(&code));
        code
    };
    let started = std::time::Instant::now();
    let (tokens, _) = tokio::join!(issuer.finish_device(&login), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.server.approve(&approve)
    });
    let tokens = tokens.unwrap();
    assert!(tokens.refresh.is_some());
    // Interval 1 s, slow_down adds 5 s (RFC 8628 3.5).
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        s.server
            .grants("urn:ietf:params:oauth:grant-type:device_code"),
        1
    );
}

#[tokio::test]
async fn a_refused_or_expired_device_code_says_what_to_do() {
    let s = setup("device", "").await;
    let issuer = Broker::new(&s.handle).issuer("idp").unwrap();
    let login = issuer.start_device().await.unwrap();
    s.server.deny_all();
    let e = issuer.finish_device(&login).await.unwrap_err();
    assert!(matches!(e, FlowError::Login(_)), "{e:?}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(e.to_string().contains("escalator auth login idp"), "{e}");

    s.server.set_device_lifetime(2);
    let login = issuer.start_device().await.unwrap();
    let e = issuer.finish_device(&login).await.unwrap_err();
    assert!(matches!(e, FlowError::Login(_)), "{e:?}");
    assert!(e.to_string().contains("expired"), "{e}");
}

#[tokio::test]
async fn the_stored_token_serves_until_it_is_due_then_one_refresh_rotates_it() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    let first = broker.access_token("idp").await.unwrap();
    assert_eq!(
        s.server.grants("refresh_token"),
        0,
        "a fresh token is used as it is"
    );
    // An hour's token is refreshed in its last quarter (10 min at most).
    s.clock.advance(chrono::Duration::minutes(49));
    assert_eq!(
        broker.access_token("idp").await.unwrap().expose(),
        first.expose()
    );
    s.clock.advance(chrono::Duration::minutes(2));
    let second = broker.access_token("idp").await.unwrap();
    assert_ne!(second.expose(), first.expose());
    assert_eq!(s.server.grants("refresh_token"), 1);
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    assert_eq!(g.refresh_token_at, Some(s.clock.now()), "rotated");
    assert_eq!(g.generation, 2);
    // The rotated refresh token was stored: the next refresh works (the
    // old one is void at the server).
    s.clock.advance(chrono::Duration::minutes(55));
    let third = broker.access_token("idp").await.unwrap();
    assert_ne!(third.expose(), second.expose());
    assert_eq!(s.server.grants("refresh_token"), 2);
}

#[tokio::test]
async fn a_refresh_without_a_new_refresh_token_keeps_the_old_one() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    s.server.script(Scripted::NoRotation);
    s.clock.advance(chrono::Duration::minutes(55));
    broker.access_token("idp").await.unwrap();
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    assert_ne!(g.refresh_token_at, Some(s.clock.now()), "not rotated");
    s.clock.advance(chrono::Duration::minutes(55));
    broker.access_token("idp").await.unwrap();
    assert_eq!(
        s.server.grants("refresh_token"),
        2,
        "the kept refresh token still works"
    );
}

#[tokio::test]
async fn a_dead_grant_is_marked_and_names_the_command_that_fixes_it() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    s.server.revoke_all();
    s.clock.advance(chrono::Duration::minutes(55));
    let e = broker.access_token("idp").await.unwrap_err();
    assert!(e.needs_login(), "{e:?}");
    assert!(e.to_string().contains("invalid_grant"), "{e}");
    assert!(
        e.to_string().contains("run escalator auth login idp"),
        "{e}"
    );
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    assert!(!g.valid);
    assert_eq!(g.refresh_failures, 1);
    // No request per login once dead.
    let again = broker.access_token("idp").await.unwrap_err();
    assert!(matches!(again, GrantError::Dead { .. }));
    assert_eq!(
        s.handle
            .store
            .oauth_grant("idp")
            .unwrap()
            .unwrap()
            .refresh_failures,
        1
    );
    // A new login brings it back.
    let broker = logged_in(&s).await;
    assert!(broker.access_token("idp").await.is_ok());
    assert!(s.handle.store.oauth_grant("idp").unwrap().unwrap().valid);
}

#[tokio::test]
async fn a_provider_that_answers_nonsense_is_retried_and_the_current_token_serves() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    let current = broker.access_token("idp").await.unwrap();
    s.clock.advance(chrono::Duration::minutes(52));
    for (answer, words) in [
        (Scripted::Html500, "not JSON (HTTP 500"),
        (Scripted::Huge(2 * 1024 * 1024), "larger than 1024 KB"),
        (Scripted::Hang(Duration::from_secs(5)), "no answer in time"),
        (
            Scripted::Error("temporarily_unavailable"),
            "temporarily_unavailable",
        ),
    ] {
        s.server.script(answer);
        // Before the token ends: the current one, the failure recorded.
        let t = broker.access_token("idp").await.unwrap();
        assert_eq!(t.expose(), current.expose());
        let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
        let err = g.last_error.clone().unwrap_or_default();
        assert!(err.contains(words), "{words}: {err}");
        assert!(!err.contains(current.expose()), "no token in errors");
        assert!(g.valid, "not a dead grant");
        // The next try waits RETRY_AFTER_FAILURE.
        s.clock.advance(chrono::Duration::seconds(31));
    }
    // Past its end with the provider still failing: an error, retried.
    s.clock.advance(chrono::Duration::minutes(10));
    s.server.script(Scripted::Html500);
    let e = broker.access_token("idp").await.unwrap_err();
    assert!(matches!(e, GrantError::Unavailable { .. }), "{e:?}");
    assert!(!e.needs_login());
    // And when the provider is back, a refresh.
    s.clock.advance(chrono::Duration::seconds(31));
    assert_ne!(
        broker.access_token("idp").await.unwrap().expose(),
        current.expose()
    );
}

#[tokio::test]
async fn lifetimes_out_of_bounds_are_held_within_them() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    s.clock.advance(chrono::Duration::minutes(55));
    s.server.script(Scripted::ExpiresIn(0));
    broker.access_token("idp").await.unwrap();
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    let life = g.access_expires_at.unwrap() - s.clock.now();
    assert_eq!(life.num_seconds() as u64, MIN_LIFETIME.as_secs());
    // Used at once again: no refresh (a minute's token is refreshed in
    // its second half, not at every use).
    let before = s.server.grants("refresh_token");
    broker.access_token("idp").await.unwrap();
    assert_eq!(s.server.grants("refresh_token"), before);
    s.clock.advance(chrono::Duration::seconds(31));
    s.server.script(Scripted::ExpiresIn(10 * 365 * 24 * 3600));
    broker.access_token("idp").await.unwrap();
    assert_eq!(s.server.grants("refresh_token"), before + 1);
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    let life = g.access_expires_at.unwrap() - s.clock.now();
    assert_eq!(life.num_seconds() as u64, MAX_LIFETIME.as_secs());
    broker.access_token("idp").await.unwrap();
    assert_eq!(s.server.grants("refresh_token"), before + 1);
}

#[tokio::test]
async fn two_nodes_on_one_store_refresh_once() {
    let s = setup("device", "").await;
    let a = logged_in(&s).await;
    let b = Broker::new(&s.handle);
    s.clock.advance(chrono::Duration::minutes(55));
    let (ta, tb) = tokio::join!(a.access_token("idp"), b.access_token("idp"));
    let (ta, tb) = (ta.unwrap(), tb.unwrap());
    assert_eq!(s.server.grants("refresh_token"), 1, "one refresh for both");
    // The one that waited got the old token (still valid) or the new one.
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    assert!(g.refreshing.is_none(), "the claim is released");
    assert!(
        ta.expose() == tb.expose() || s.server.access_tokens().contains(&tb.expose().to_string())
    );
}

#[tokio::test]
async fn client_credentials_need_no_login_and_fetch_on_demand() {
    std::env::set_var(
        "TEST_CLIENT_SECRET",
        crate::testing::authserver::CLIENT_SECRET,
    );
    let s = setup("client_credentials", "").await;
    let broker = Broker::new(&s.handle);
    let t = broker.access_token("idp").await.unwrap();
    assert!(s.server.access_tokens().contains(&t.expose().to_string()));
    assert_eq!(
        broker.access_token("idp").await.unwrap().expose(),
        t.expose()
    );
    assert_eq!(s.server.grants("client_credentials"), 1);
}

#[tokio::test]
async fn the_store_holds_no_usable_token_and_another_key_opens_nothing() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    broker.access_token("idp").await.unwrap();
    s.handle.store.flush().unwrap();
    let mut secrets = s.server.refresh_tokens();
    secrets.extend(s.server.access_tokens());
    assert!(!secrets.is_empty());
    let record = serde_json::to_string(&s.handle.store.oauth_grant("idp").unwrap()).unwrap();
    for dir_entry in walk(&s._dir.path().join("store")) {
        let bytes = std::fs::read(&dir_entry).unwrap();
        for t in &secrets {
            assert!(
                !contains(&bytes, t.as_bytes()),
                "{t} in {}",
                dir_entry.display()
            );
            assert!(!record.contains(t.as_str()));
        }
    }
    // Another key: the grant does not open; an error, not "no grant".
    let other = "ff".repeat(32);
    let path = s._dir.path().join("token.key");
    std::fs::write(&path, other).unwrap();
    s.clock.advance(chrono::Duration::minutes(55));
    let e = Broker::new(&s.handle)
        .access_token("idp")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not open with this token key"),
        "{e}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_refresh_is_due_in_the_last_quarter_within_one_and_ten_minutes() {
    let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap();
    let hour = t0 + chrono::Duration::hours(1);
    assert_eq!(due(Some(t0), hour), hour - chrono::Duration::minutes(10));
    let short = t0 + chrono::Duration::minutes(20);
    assert_eq!(due(Some(t0), short), short - chrono::Duration::minutes(5));
    let minute = t0 + chrono::Duration::minutes(1);
    assert_eq!(due(Some(t0), minute), t0 + chrono::Duration::seconds(30));
    let _ = Issuer::new;
}

#[tokio::test]
async fn a_browser_login_checks_the_state_and_trades_the_code_with_pkce() {
    let s = setup("authorization_code", "").await;
    let issuer = Broker::new(&s.handle).issuer("idp").unwrap();
    let login = issuer.start_browser("http://127.0.0.1:9/").unwrap();
    assert!(
        login.url.contains("code_challenge_method=S256"),
        "{}",
        login.url
    );
    assert!(login.url.contains("access_type=offline"), "{}", login.url);
    // The "browser": the server approves and redirects to the loopback
    // address; that address (pasted back) ends the login.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let back = http.get(&login.url).send().await.unwrap();
    let location = back.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with("http://127.0.0.1:9/?code="),
        "{location}"
    );
    // Another login's address is refused (its state differs).
    let other = issuer.start_browser("http://127.0.0.1:9/").unwrap();
    let e = issuer
        .finish_browser(other, &location)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("does not belong to this login"), "{e}");
    let tokens = issuer.finish_browser(login, &location).await.unwrap();
    assert!(tokens.refresh.is_some());
    assert_eq!(s.server.grants("authorization_code"), 1);
    // An error sent back instead of a code is told, in the provider's
    // word, cleaned.
    let login = issuer.start_browser("http://127.0.0.1:9/").unwrap();
    let e = issuer
        .finish_browser(
            login,
            "http://127.0.0.1:9/?error=access_denied\u{202e}x&state=s",
        )
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("access_denied"), "{e}");
    assert!(!e.contains('\u{202e}'), "{e}");
}

/// The digest's report at the clock's now.
fn digest_now(s: &Setup) -> String {
    let now = s.clock.now();
    crate::digest::text(&s.handle.store, &s.handle.config.get(), now, now, now)
        .unwrap()
        .0
}

/// The alert mails queued so far.
fn alerts(s: &Setup) -> Vec<crate::record::OutboxEntry> {
    s.handle
        .store
        .outbox()
        .map(|e| e.unwrap())
        .filter(|e| e.kind == "alert")
        .collect()
}

#[tokio::test]
async fn a_dying_grant_alerts_once_by_mail_and_the_digest_names_it() {
    let s = setup_with(
        "device",
        "alert_to = [\"it@example.test\"]",
        "auth = \"oauth2\"\noauth2 = \"idp\"",
    )
    .await;
    let config = s.handle.config.get();
    assert_eq!(config.identities_in_use(), vec!["idp"]);
    // Never logged in: the digest says so, no alert (nothing died).
    let report = digest_now(&s);
    assert!(
        report.contains("idp: never logged in; fix: escalator auth login idp"),
        "{report}"
    );
    let broker = logged_in(&s).await;
    let report = digest_now(&s);
    assert!(!report.contains("OAuth 2 login"), "{report}");
    s.server.revoke_all();
    s.clock.advance(chrono::Duration::minutes(55));
    for _ in 0..3 {
        assert!(broker.access_token("idp").await.unwrap_err().needs_login());
    }
    let queued = alerts(&s);
    assert_eq!(queued.len(), 1, "once per death");
    assert_eq!(queued[0].to, vec!["it@example.test"]);
    let raw = String::from_utf8_lossy(&s.handle.store.outbox_raw(queued[0].id).unwrap().unwrap())
        .into_owned();
    assert!(raw.contains("escalator auth login idp"), "{raw}");
    assert!(raw.contains("invalid_grant"), "{raw}");
    for t in s
        .server
        .refresh_tokens()
        .iter()
        .chain(s.server.access_tokens().iter())
    {
        assert!(!raw.contains(t.as_str()));
    }
    let report = digest_now(&s);
    assert!(report.contains("idp: invalid_grant"), "{report}");
    // A new login, then another death: one more alert.
    let broker = logged_in(&s).await;
    s.server.revoke_all();
    s.clock.advance(chrono::Duration::minutes(55));
    assert!(broker.access_token("idp").await.is_err());
    assert_eq!(alerts(&s).len(), 2);
}

#[tokio::test]
async fn many_callers_in_one_process_spend_the_refresh_token_once() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    s.clock.advance(chrono::Duration::minutes(55));
    // The watchers, the outbox and the keeper at once after a restart.
    let calls: Vec<_> = (0..6).map(|_| broker.access_token("idp")).collect();
    let tokens = futures::future::join_all(calls).await;
    for t in &tokens {
        assert!(t.is_ok(), "{t:?}");
    }
    assert_eq!(s.server.grants("refresh_token"), 1);
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    assert!(g.valid && g.last_error.is_none(), "{g:?}");
}

#[tokio::test]
async fn a_login_sealed_with_another_key_is_not_stored() {
    let s = setup("device", "").await;
    let broker = Broker::new(&s.handle);
    let issuer = broker.issuer("idp").unwrap();
    let login = issuer.start_device().await.unwrap();
    s.server.approve(&login.user_code);
    let tokens = issuer.finish_device(&login).await.unwrap();
    // The CLI's config names another key than the daemon's.
    let mut cli = (*s.handle.config.get()).clone();
    let other = s._dir.path().join("other.key");
    std::fs::write(&other, "ab".repeat(32)).unwrap();
    cli.oauth2.key_file = Some(other);
    let id = cli.oauth2.identities["idp"].clone();
    let sealed = super::broker::seal_login(&cli, &id, &tokens, None).unwrap();
    let r = crate::admin::handle(
        &s.handle,
        &crate::admin::Request::AuthStore { login: sealed },
    )
    .unwrap();
    assert_eq!(r.code, 1, "{}", r.output);
    assert!(r.output.contains("must use the same"), "{}", r.output);
    assert!(s.handle.store.oauth_grant("idp").unwrap().is_none());
}

#[tokio::test]
async fn a_caller_that_gives_up_mid_refresh_does_not_cut_it() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    s.clock.advance(chrono::Duration::minutes(55));
    s.server.script(Scripted::Hang(Duration::from_millis(800)));
    // A watcher stopping while its login waits for the refresh.
    let cut = tokio::time::timeout(Duration::from_millis(200), broker.access_token("idp")).await;
    assert!(cut.is_err(), "the caller gave up");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.server.grants("refresh_token"), 1);
    let g = s.handle.store.oauth_grant("idp").unwrap().unwrap();
    assert_eq!(g.generation, 2, "the rotated tokens were stored: {g:?}");
    assert!(g.refreshing.is_none());
    // And they work: the next refresh uses the rotated refresh token.
    s.clock.advance(chrono::Duration::minutes(55));
    assert!(broker.access_token("idp").await.is_ok());
    assert_eq!(s.server.grants("refresh_token"), 2);
}

#[tokio::test]
async fn a_server_refusing_every_token_forces_a_refresh_at_most_every_five_minutes() {
    let s = setup("device", "").await;
    let broker = logged_in(&s).await;
    for _ in 0..5 {
        let t = broker.access_token("idp").await.unwrap();
        broker.rejected("idp", &t).unwrap();
    }
    // The first refusal forced a refresh; the rest within 5 minutes not.
    let t = broker.access_token("idp").await.unwrap();
    assert_eq!(s.server.grants("refresh_token"), 1);
    s.clock.advance(chrono::Duration::minutes(6));
    broker.rejected("idp", &t).unwrap();
    broker.access_token("idp").await.unwrap();
    assert_eq!(s.server.grants("refresh_token"), 2);
}
