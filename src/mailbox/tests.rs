//! The watcher against a scripted server ([`super::fake`]) in paused
//! time: the behaviours of servers the test stack's Dovecot does not have.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::fake::FakeServer;
use super::imap::ImapError;
use super::{WatchError, Watcher};
use crate::clock::ManualClock;
use crate::config::Config;
use crate::ingest::Ingestor;
use crate::store::Store;

fn config(dir: &Path, mailbox: &str) -> Config {
    let tier = "[[tiers]]\nname = \"Frontline\"\nfirst_response = \"4h\"\nstaff = [\"agent@example.test\"]";
    crate::testing::config_from(&dir.join("store"), mailbox, tier)
}

fn watcher(dir: &Path, mailbox: &str, server: &FakeServer) -> Watcher {
    let config = config(dir, mailbox);
    let clock = Arc::new(ManualClock::new(
        DateTime::parse_from_rfc3339("2026-11-23T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    ));
    let store = Arc::new(Store::open(&config.store.path).unwrap());
    let queue = config.queues.first().unwrap().name.clone();
    let ingestor = Arc::new(Ingestor::new(crate::handle::Handle {
        store,
        config: crate::config::Live::new(config.clone()),
        clock,
        wake: Default::default(),
    }));
    let mut w = Watcher::new(Arc::new(config), &queue, ingestor, Default::default());
    w.fake = Some(server.clone());
    w
}

/// Waits until `done`, for at most 20 s of real time (sled flushes on
/// threads of its own, and paused time runs ahead while they work, so a
/// bound in paused time would not wait for them); how much paused time
/// it took.
async fn until(mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    let real = std::time::Instant::now();
    while real.elapsed() < Duration::from_secs(20) {
        if done() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Message `n` with its body padded to about `size` bytes.
pub(super) fn mail_of_size(n: u32, size: usize) -> Vec<u8> {
    let mut raw = mail(n);
    while raw.len() < size {
        raw.extend_from_slice(b"padding padding padding padding padding padding padding.\r\n");
    }
    raw
}

fn mail(n: u32) -> Vec<u8> {
    format!(
        "From: customer{n}@example.org\r\nTo: support@example.test\r\nSubject: question {n}\r\n\
         Message-ID: <q{n}@example.org>\r\nDate: Mon, 23 Nov 2026 09:00:00 +0000\r\n\r\nhello {n}\r\n"
    )
    .into_bytes()
}

/// Cyrus without idled and Courier without gamin say nothing to an
/// idling client: the folder must still be looked at every
/// poll_interval, not once a minute.
#[tokio::test(start_paused = true)]
async fn while_idling_the_folder_is_rechecked_every_poll_interval() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::new(&["INBOX"]);
    server.deliver("INBOX", &mail(1));
    let w = watcher(dir.path(), "poll_interval = \"5s\"\nidle = true", &server);
    let ingestor = w.ingestor.clone();
    let count = || ingestor.store.cases().filter(|c| c.is_ok()).count();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(w.run(cancel.clone()));
    until(|| server.count("IDLE") == 1)
        .await
        .expect("the watcher idles after its first pass");
    assert_eq!(count(), 1, "the first pass took the first mail");
    server.deliver("INBOX", &mail(2));
    // The server never notifies: only the re-check can find the mail,
    // within poll_interval (not the 60 s it used to take). Timed to the
    // re-check's SELECT: nothing touches the store before it.
    let took = until(|| server.count("SELECT") == 2)
        .await
        .expect("the folder is looked at again");
    assert!(
        took <= Duration::from_millis(5100),
        "re-checked at poll_interval (5s), after {took:?}"
    );
    until(|| count() == 2)
        .await
        .expect("the re-check takes the mail");
    until(|| server.count("IDLE") >= 2)
        .await
        .expect("idling again after the re-check");
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// A server that tells of new mail while idling: taken at once, long
/// before the re-check.
#[tokio::test(start_paused = true)]
async fn a_server_that_notifies_gets_new_mail_taken_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::new(&["INBOX"]);
    server.state().idle_notifies = true;
    let w = watcher(dir.path(), "poll_interval = \"10m\"\nidle = true", &server);
    let ingestor = w.ingestor.clone();
    let count = || ingestor.store.cases().filter(|c| c.is_ok()).count();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(w.run(cancel.clone()));
    until(|| server.count("IDLE") == 1)
        .await
        .expect("the watcher idles");
    server.deliver("INBOX", &mail(1));
    let took = until(|| server.count("SELECT") == 2)
        .await
        .expect("the server's notice ends the IDLE");
    assert!(took < Duration::from_secs(1), "at once, after {took:?}");
    until(|| count() == 1).await.expect("taken");
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Courier gives every session that only EXAMINEs a folder a new
/// UIDVALIDITY: with EXAMINE each pass fetched the whole folder again.
/// The watcher SELECTs (reading with BODY.PEEK, so nothing is marked
/// read), and a second pass with nothing new fetches nothing.
#[tokio::test(start_paused = true)]
async fn a_server_renumbering_every_examine_is_not_downloaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::new(&["INBOX"]);
    server.state().examine_renumbers = true;
    for n in 1..=5 {
        server.deliver("INBOX", &mail(n));
    }
    let w = watcher(dir.path(), "idle = false", &server);
    let cancel = CancellationToken::new();
    let first = w.once(&cancel).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!((first.report.fetched, first.report.new_cases), (5, 5));
    let bodies = server.count("UID FETCH");
    let second = w.once(&cancel).await;
    assert!(second.error.is_none(), "{:?}", second.error);
    assert_eq!(second.report.fetched, 0, "nothing new: nothing fetched");
    assert_eq!(
        server.count("UID FETCH"),
        bodies,
        "no FETCH on the second pass"
    );
    assert_eq!(server.count("EXAMINE"), 0);
    let st = server.state();
    assert!(
        st.commands
            .iter()
            .filter(|c| c.starts_with("UID FETCH"))
            .all(|c| !c.contains("BODY[]")),
        "messages are read with BODY.PEEK only: {:?}",
        st.commands
    );
}

/// A sent_folder the server does not have: the inbox is still read, the
/// summary counts what was stored, and the error names the key and the
/// folders the server has.
#[tokio::test(start_paused = true)]
async fn a_missing_sent_folder_names_the_key_and_the_server_s_folders() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::new(&["INBOX", "INBOX.Sent", "INBOX.Trash"]);
    server.deliver("INBOX", &mail(1));
    server.deliver("INBOX", &mail(2));
    let w = watcher(dir.path(), "sent_folder = \"Sent\"\nidle = false", &server);
    let out = w.once(&CancellationToken::new()).await;
    assert_eq!(
        (out.report.stored, out.report.new_cases),
        (2, 2),
        "the inbox pass counts"
    );
    let Some(WatchError::Imap(e @ ImapError::MissingFolder { .. })) = &out.error else {
        panic!("expected a missing folder, got {:?}", out.error);
    };
    assert_eq!(
        e.to_string(),
        "mailbox.sent_folder \"Sent\" does not exist; the server has: INBOX, INBOX.Sent, INBOX.Trash"
    );
    assert!(e.is_config());
    assert_eq!(
        e.hint(&w.mailbox().endpoint).as_deref(),
        Some("set mailbox.sent_folder to one of the folders the server has")
    );
    // The inbox is selected again afterwards (for IDLE).
    assert_eq!(
        server.state().commands.last().map(String::as_str),
        Some("LOGOUT")
    );
    assert!(server.count("SELECT \"INBOX\"") >= 2);
}

/// The daemon reads the inbox although the sent folder is missing, and
/// says so once, not at every pass.
#[tokio::test(start_paused = true)]
async fn the_daemon_goes_on_reading_the_inbox_without_its_sent_folder() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::new(&["INBOX"]);
    let w = watcher(
        dir.path(),
        "sent_folder = \"Sent\"\nidle = false\npoll_interval = \"2s\"",
        &server,
    );
    let ingestor = w.ingestor.clone();
    let count = || ingestor.store.cases().filter(|c| c.is_ok()).count();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(w.run(cancel.clone()));
    until(|| server.count("SELECT \"Sent\"") == 1)
        .await
        .expect("the sent folder was tried");
    server.deliver("INBOX", &mail(1));
    until(|| count() == 1)
        .await
        .expect("the inbox is read on the next poll");
    assert_eq!(
        server.count("LOGIN"),
        1,
        "one session: no reconnect for a missing folder"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// One real renumbering of both folders (a server migration) is not
/// taken for a server that renumbers every session: counted per folder.
#[tokio::test(start_paused = true)]
async fn one_renumbering_of_two_folders_is_not_a_renumbering_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::new(&["INBOX", "Sent"]);
    server.deliver("INBOX", &mail(1));
    server.deliver("Sent", &mail(2));
    let w = watcher(dir.path(), "sent_folder = \"Sent\"\nidle = false", &server);
    let cancel = CancellationToken::new();
    assert!(w.once(&cancel).await.error.is_none());
    {
        let mut st = server.state();
        st.validity.insert("INBOX".into(), 7);
        st.validity.insert("Sent".into(), 7);
    }
    let out = w.once(&cancel).await;
    assert!(out.error.is_none());
    assert_eq!(
        (out.report.fetched, out.report.stored),
        (2, 0),
        "re-scanned, nothing new"
    );
    let counts = w.renumbered.lock().unwrap().clone();
    assert_eq!(counts.get("INBOX"), Some(&1));
    assert_eq!(counts.get("Sent"), Some(&1));
    // The next pass, with the UIDs kept: the count starts again.
    let out = w.once(&cancel).await;
    assert_eq!(out.report.fetched, 0);
    assert!(w.renumbered.lock().unwrap().values().all(|n| *n < 2));
}

#[test]
fn uid_sets() {
    assert_eq!(super::folder::uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
    assert_eq!(super::folder::uid_set(&[4]), "4");
}

/// The whole planning over a folder in memory: a server that hangs up
/// whenever message 250 is in a FETCH. The daemon reconnects and passes
/// again; within a few passes the chunk is narrowed to single UIDs, 250
/// is quarantined with the server's words, and every other message is
/// stored once, with the cursor past the last.
#[tokio::test]
async fn a_message_that_breaks_the_connection_is_narrowed_down_and_set_aside() {
    use super::memfolder::MemFolder;
    let dir = tempfile::tempdir().unwrap();
    let w = watcher(dir.path(), "", &FakeServer::new(&["INBOX"]));
    let mut f = MemFolder::with(450, 300);
    f.hang_up.insert(250);
    let cancel = CancellationToken::new();
    let mut report = super::PassReport::default();
    let mut passes = 0;
    loop {
        passes += 1;
        assert!(passes <= 20, "still failing after 20 passes: {:?}", f.log);
        match w
            .pass_folder(&mut f, "INBOX", false, &cancel, &mut report)
            .await
        {
            Ok(()) => break,
            Err(WatchError::Imap(ImapError::Closed)) => {
                // A pass that broke off read nothing through: the outbox
                // must not take a missing confirmation copy as absent.
                let address = &w.config.queue(&w.queue).address;
                assert_eq!(w.ingestor.store.read_through(address).unwrap(), None);
                continue;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let address = &w.config.queue(&w.queue).address;
    assert_eq!(
        w.ingestor.store.read_through(address).unwrap(),
        Some(w.ingestor.clock.now()),
        "the pass that went through every message records when it began"
    );
    let fetches = f.fetches();
    let chunks: Vec<usize> = fetches.iter().map(|(_, u)| u.len()).collect();
    assert_eq!(chunks[0], 200, "a first whole chunk");
    // 201..=400 failed whole three times, then went one at a time.
    let whole_second = fetches
        .iter()
        .filter(|(_, u)| u.first() == Some(&201) && u.len() == 200)
        .count();
    assert_eq!(whole_second, 3, "{chunks:?}");
    let alone_250 = fetches.iter().filter(|(_, u)| u == &vec![250]).count();
    assert_eq!(alone_250, 3, "{chunks:?}");
    for uid in (201..=249).chain(251..=400) {
        assert!(fetches.iter().any(|(_, u)| u == &vec![uid]), "{uid} alone");
    }
    assert_eq!(
        fetches.last().map(|(_, u)| (u[0], u.len())),
        Some((401, 50)),
        "whole chunks again after the troubled range"
    );
    assert_eq!(report.stored, 449);
    assert_eq!(report.quarantined, 1);
    let store = &w.ingestor.store;
    assert_eq!(store.cases().filter(|c| c.is_ok()).count(), 449);
    let q: Vec<_> = store.quarantined().collect::<Result<_, _>>().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].uid, 250);
    assert!(
        q[0].error.contains("uid 250") && q[0].error.contains("closed the connection"),
        "{:?}",
        q[0].error
    );
    assert_eq!(
        store
            .cursor("default", "INBOX")
            .unwrap()
            .map(|c| c.last_uid),
        Some(450)
    );
    // The next pass asks only for what is past the cursor.
    f.log.clear();
    w.pass_folder(&mut f, "INBOX", false, &cancel, &mut report)
        .await
        .unwrap();
    assert_eq!(f.log, vec!["SEARCH 451".to_string()]);
}

/// Tokens for the fake server's logins: `old` until it is reported
/// refused, then `new`.
struct Rotating {
    rejected: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl crate::credentials::AccessTokens for Rotating {
    async fn access_token(
        &self,
        _identity: &str,
    ) -> Result<crate::config::Secret, crate::credentials::TokenError> {
        let refused = !self.rejected.lock().unwrap().is_empty();
        Ok(crate::config::Secret::new(if refused {
            "new"
        } else {
            "old"
        }))
    }
    async fn rejected(&self, _identity: &str, token: &crate::config::Secret) {
        self.rejected
            .lock()
            .unwrap()
            .push(token.expose().to_string());
    }
}

fn oauth_endpoint(dir: &Path) -> crate::config::Endpoint {
    let mut ep = config(dir, "")
        .queues
        .first()
        .unwrap()
        .mailbox
        .endpoint
        .clone();
    ep.oauth = Some(crate::config::TokenSource::Identity("idp".into()));
    ep
}

fn fake_with(mechs: &[&str], tokens: &[&str]) -> FakeServer {
    let server = FakeServer::new(&["INBOX"]);
    {
        let mut st = server.state();
        st.auth_mechs = mechs.iter().map(|m| m.to_string()).collect();
        st.tokens = tokens.iter().map(|t| t.to_string()).collect();
    }
    server
}

#[tokio::test]
async fn a_token_the_server_refuses_is_reported_and_a_fresh_one_logs_in_on_the_same_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ep = oauth_endpoint(dir.path());
    let server = fake_with(&["XOAUTH2", "OAUTHBEARER"], &["new"]);
    let tokens = Rotating {
        rejected: Default::default(),
    };
    let s = super::imap::connect_fake_with(&ep, server.accept(), Some(&tokens)).await;
    assert!(s.is_ok(), "{:?}", s.err());
    assert_eq!(*tokens.rejected.lock().unwrap(), vec!["old"]);
    let st = server.state();
    // XOAUTH2 (offered beside OAUTHBEARER), the empty answer to the error
    // challenge, then the fresh token.
    assert_eq!(st.auth_responses.len(), 3, "{:?}", st.auth_responses);
    let user = ep.username.clone().unwrap();
    assert!(st.auth_responses[0].starts_with(&format!("user={user}\u{1}auth=Bearer old")));
    assert_eq!(st.auth_responses[1], "");
    assert!(st.auth_responses[2].contains("auth=Bearer new"));
    assert_eq!(
        st.commands
            .iter()
            .filter(|c| c.starts_with("AUTHENTICATE"))
            .count(),
        2
    );
}

#[tokio::test]
async fn a_refused_token_names_the_server_s_json_cleaned_and_a_server_that_refuses_what_follows_is_no_login(
) {
    let dir = tempfile::tempdir().unwrap();
    let ep = oauth_endpoint(dir.path());
    // Refused twice (the fresh token too): the server's own words.
    let server = fake_with(&["XOAUTH2"], &[]);
    let tokens = Rotating {
        rejected: Default::default(),
    };
    let e = super::imap::connect_fake_with(&ep, server.accept(), Some(&tokens))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("XOAUTH2: [AUTHENTICATIONFAILED] Invalid credentials"),
        "{e}"
    );
    assert!(e.contains("\"status\":\"401\""), "{e}");
    assert!(!e.contains('\u{202e}'), "bidi from the server escaped: {e}");
    assert!(!e.contains("Bearer"), "no token in the error: {e}");

    // AUTHENTICATE taken, the next command refused: not a login.
    let server = fake_with(&["XOAUTH2"], &["old"]);
    server.state().refuse_after_auth = true;
    let tokens = Rotating {
        rejected: Default::default(),
    };
    let e = super::imap::connect_fake_with(&ep, server.accept(), Some(&tokens))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("took the token but refused the next command"),
        "{e}: {:?}",
        server.state().commands
    );
}

#[tokio::test]
async fn a_server_that_offers_only_oauthbearer_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let ep = oauth_endpoint(dir.path());
    let server = fake_with(&["OAUTHBEARER"], &["old"]);
    let tokens = Rotating {
        rejected: Default::default(),
    };
    let s = super::imap::connect_fake_with(&ep, server.accept(), Some(&tokens)).await;
    assert!(s.is_ok(), "{:?}", s.err());
    let st = server.state();
    assert!(
        st.commands
            .contains(&"AUTHENTICATE OAUTHBEARER".to_string()),
        "{:?}",
        st.commands
    );
    assert_eq!(
        st.auth_responses[0],
        format!(
            "n,a={},\u{1}host=127.0.0.1\u{1}port={}\u{1}auth=Bearer old\u{1}\u{1}",
            ep.username.clone().unwrap(),
            ep.port
        )
    );
}
