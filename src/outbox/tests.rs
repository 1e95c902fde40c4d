//! The outbox worker's unit tests, with a scripted transport ([`Mailer`]) in paused time.

use super::*;
use crate::clock::ManualClock;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Answers with scripted results (then success) and counts sends.
#[derive(Default)]
struct Script {
    results: Mutex<VecDeque<Result<(), SmtpError>>>,
    sent: Mutex<Vec<Vec<u8>>>,
    /// Its config section (default `smtp`).
    server: Option<&'static str>,
    /// A mail holding this text makes the transport panic, as a bug
    /// in it would.
    panic_on: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Mailer for Script {
    async fn send(&self, _: &str, _: &[String], raw: &[u8]) -> Result<(), SmtpError> {
        let panic_on = self.panic_on.lock().unwrap().take();
        if let Some(text) = panic_on {
            if String::from_utf8_lossy(raw).contains(&text) {
                panic!("test-induced failure sending {text}");
            }
            *self.panic_on.lock().unwrap() = Some(text);
        }
        self.sent.lock().unwrap().push(raw.to_vec());
        self.results.lock().unwrap().pop_front().unwrap_or(Ok(()))
    }

    fn server(&self, _: &str) -> String {
        self.server.unwrap_or("smtp").to_string()
    }
}

fn entry(id: u64, now: DateTime<Utc>) -> OutboxEntry {
    OutboxEntry {
        id,
        case: 0,
        kind: "ack".into(),
        message_id: format!("m{id}@example.test"),
        from: "support@example.test".into(),
        to: vec!["alice@example.org".into()],
        subject: "s".into(),
        state: OutboxState::Pending,
        attempts: 0,
        created_at: now,
        next_attempt_at: now,
        sent_at: None,
        last_error: None,
        attempt_at: None,
        attach: Vec::new(),
        attach_nonce: String::new(),
        claimed_by: None,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    outbox: Outbox,
    mailer: Arc<Script>,
    clock: Arc<ManualClock>,
}

fn setup(ids: &[u64], confirm: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let now = DateTime::parse_from_rfc3339("2026-11-23T09:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    store
        .transact(|tx| {
            for id in ids {
                // As composed mail is: its Message-ID in its header.
                let raw = format!("Message-ID: <m{id}@example.test>\r\nSubject: s\r\n\r\nbody\r\n");
                tx.put_outbox(&entry(*id, now), Some(raw.as_bytes()))?;
            }
            Ok::<_, StoreError>(())
        })
        .unwrap();
    let clock = Arc::new(ManualClock::new(now));
    let mailer = Arc::new(Script::default());
    let outbox = Outbox {
        journal: journal::Journal::open(&dir.path().join("store")).unwrap(),
        store,
        mailer: mailer.clone(),
        clock: clock.clone(),
        confirm: confirm.then_some(Duration::from_secs(120)),
        wake: Default::default(),
        claim: None,
        health: Default::default(),
        watched: Vec::new(),
    };
    Setup {
        _dir: dir,
        outbox,
        mailer,
        clock,
    }
}

fn state(s: &Setup, id: u64) -> OutboxState {
    s.outbox.store.outbox_entry(id).unwrap().unwrap().state
}

/// The confirmation copy of entry `id` arrives.
fn settle(s: &Setup, id: u64) {
    let now = s.clock.now();
    s.outbox
        .store
        .transact(|tx| {
            let mut e = tx.outbox_entry(id)?.unwrap();
            journal::mark_sent(tx, &mut e, now)
        })
        .unwrap();
}

fn sends(s: &Setup) -> usize {
    s.mailer.sent.lock().unwrap().len()
}

/// A wrong SMTP password (or a sender the server will not take) is
/// not the mail's fault: the first refusal ends the tries through
/// that server (each would be one more failed login), no mail fails
/// however long the fix takes, the refusal is kept for `stats` and
/// the gauge, the server is left alone until its backoff ends, and
/// the first mail that goes out clears it.
#[tokio::test(start_paused = true)]
async fn a_refused_configuration_keeps_all_mail_queued_and_is_recorded() {
    let s = setup(&[1, 2, 3], false);
    let refusal = "the server refused the login as \"support\": 535 5.7.8 bad credentials";
    let refuse = || {
        s.mailer
            .results
            .lock()
            .unwrap()
            .push_back(Err(SmtpError::Config(refusal.into())))
    };
    refuse();
    let r = s
        .outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert!(r.refused);
    assert_eq!((r.sent, r.failed, r.retrying), (0, 0, 3));
    assert_eq!(sends(&s), 1, "one try: the rest wait for the server");
    for id in [1, 2, 3] {
        assert_eq!(state(&s, id), OutboxState::Pending);
    }
    let problems = s.outbox.store.smtp_problems().unwrap();
    assert_eq!(problems.len(), 1);
    assert_eq!(
        (problems[0].error.as_str(), problems[0].server.as_str()),
        (refusal, "smtp")
    );
    assert_eq!(s.outbox.health.problems(), [refusal]);
    // New mail meanwhile does not make it log in again.
    let r = s
        .outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        (sends(&s), r.refused),
        (1, true),
        "left alone during the backoff"
    );
    assert_eq!(
        s.outbox.next_wake(),
        Some(Duration::from_secs(60)),
        "no busy loop"
    );
    // Days later, still refused: still queued, not given up.
    s.clock.advance(chrono::Duration::days(5));
    refuse();
    let r = s
        .outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert!(r.refused);
    assert_eq!(state(&s, 1), OutboxState::Pending);
    assert_eq!(
        s.outbox.next_wake(),
        Some(Duration::from_secs(120)),
        "the wait doubles"
    );
    // Fixed, and the first try after the fix times out: five days
    // in the queue do not count against the give-up time.
    s.clock.advance(chrono::Duration::minutes(2));
    s.mailer
        .results
        .lock()
        .unwrap()
        .push_back(Err(SmtpError::Transient("timeout".into())));
    s.outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(state(&s, 1), OutboxState::Pending, "not given up");
    // The others went out meanwhile, and this one next.
    let r = s
        .outbox
        .drain(true, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((r.sent, r.refused), (1, false));
    for id in [1, 2, 3] {
        assert_eq!(state(&s, id), OutboxState::Sent);
    }
    assert!(s.outbox.store.smtp_problems().unwrap().is_empty());
    assert!(s.outbox.health.problems().is_empty());
}

/// One queue's server refusing us holds up no other queue's mail.
#[tokio::test(start_paused = true)]
async fn a_refusing_server_holds_up_only_its_own_mail() {
    let s = setup(&[1, 2, 3], false);
    // Entry 1 is from a queue with a server of its own.
    s.outbox
        .store
        .transact(|tx| {
            let mut e = tx.outbox_entry(1)?.unwrap();
            e.from = "billing@example.test".into();
            tx.put_outbox(&e, None)
        })
        .unwrap();
    let refusing = Arc::new(Script {
        server: Some("mailboxes[1].smtp"),
        ..Default::default()
    });
    refusing
        .results
        .lock()
        .unwrap()
        .push_back(Err(SmtpError::Config("535 no".into())));
    let routed = smtp::ByFrom {
        main: s.mailer.clone(),
        routes: vec![(
            "billing@example.test".into(),
            refusing.clone() as Arc<dyn Mailer>,
        )],
    };
    std::fs::create_dir(s._dir.path().join("other")).unwrap();
    let outbox = Outbox {
        mailer: Arc::new(routed),
        journal: journal::Journal::open(&s._dir.path().join("other")).unwrap(),
        store: s.outbox.store.clone(),
        clock: s.clock.clone(),
        confirm: None,
        wake: Default::default(),
        claim: None,
        health: Default::default(),
        watched: Vec::new(),
    };
    let r = outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((r.sent, r.retrying, r.refused), (2, 1, true));
    assert_eq!(state(&s, 1), OutboxState::Pending);
    assert_eq!(state(&s, 2), OutboxState::Sent);
}

#[test]
fn backoff_grows_and_is_capped() {
    assert_eq!(backoff(1), chrono::Duration::seconds(30));
    assert!(backoff(3) > backoff(2));
    assert_eq!(backoff(30), chrono::Duration::seconds(3600));
}

#[tokio::test(start_paused = true)]
async fn a_timeout_after_data_waits_for_the_confirmation_copy() {
    // Input: the connection is cut after the message data went out:
    // the server may have accepted it. It was resent at once (a
    // duplicate); now it waits for the copy like after a crash.
    let s = setup(&[1, 2], true);
    s.mailer.results.lock().unwrap().extend([
        Err(SmtpError::Unknown("timeout".into())),
        Err(SmtpError::Unknown("cut".into())),
    ]);
    let cancel = CancellationToken::new();
    s.outbox.drain(false, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2);
    assert_eq!(state(&s, 1), OutboxState::Sending);
    // A minute later: still waiting, nothing sent again.
    s.clock.advance(chrono::Duration::seconds(60));
    s.outbox.drain(false, &cancel).await.unwrap();
    s.outbox.drain(true, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2, "no resend within confirm_wait");
    // Entry 1's copy arrives: it was accepted, it is never resent.
    settle(&s, 1);
    // Past confirm_wait, entry 2 (no copy: the server never had it)
    // goes out again, once.
    s.clock.advance(chrono::Duration::seconds(61));
    s.outbox.drain(false, &cancel).await.unwrap();
    assert_eq!(sends(&s), 3);
    assert_eq!(state(&s, 1), OutboxState::Sent);
    assert_eq!(state(&s, 2), OutboxState::Sent);
}

#[tokio::test(start_paused = true)]
async fn r17_mail_whose_sent_mark_failed_is_marked_not_sent_again_when_its_claim_expires() {
    // Input (PostgreSQL, no confirmation copies): the connection
    // dropped right after the server's 250, the sent mark failed, the
    // entry stayed `sending`, its claim expired and it went out a
    // second time although the journal held its id.
    let mut s = setup(&[1, 2], false);
    s.outbox.claim = Some(Duration::from_secs(120));
    let now = s.clock.now();
    s.outbox
        .store
        .transact(|tx| {
            let mut e = tx.outbox_entry(1)?.unwrap();
            e.state = OutboxState::Sending;
            e.attempt_at = Some(now);
            tx.put_outbox(&e, None)
        })
        .unwrap();
    // Accepted by the server and journaled; the mark never committed.
    s.outbox.journal.record(1).unwrap();
    // Not emptied while a mark it holds is not in the store.
    s.outbox.journal.clear().unwrap();
    let path = s.outbox.store.path().join("sent.journal");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
    s.clock.advance(chrono::Duration::seconds(130));
    let cancel = CancellationToken::new();
    s.outbox.drain(true, &cancel).await.unwrap();
    assert_eq!(sends(&s), 1, "entry 2 only: entry 1 was marked, not resent");
    assert_eq!(state(&s, 1), OutboxState::Sent);
    assert!(!s.outbox.journal.holds(1));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "",
        "settled, then emptied"
    );
    // The same when the entry is reached through a stale list.
    let mut s = setup(&[3], false);
    s.outbox.claim = Some(Duration::from_secs(120));
    let snapshot = s.outbox.store.outbox_pending().unwrap();
    s.outbox.journal.record(3).unwrap();
    for e in snapshot {
        assert_eq!(
            s.outbox.send_one(e, &Default::default()).await.unwrap(),
            Sending::Done(OutboxState::Sent)
        );
    }
    assert_eq!(sends(&s), 0);
}

/// Sends only after the clock moved on by `delay` (a slow server).
struct Slow(Arc<ManualClock>, chrono::Duration, Arc<Script>);

#[async_trait::async_trait]
impl Mailer for Slow {
    async fn send(&self, from: &str, to: &[String], raw: &[u8]) -> Result<(), SmtpError> {
        self.0.advance(self.1);
        tokio::time::sleep(self.1.to_std().unwrap()).await;
        self.2.send(from, to, raw).await
    }
}

#[tokio::test(start_paused = true)]
async fn r17_a_node_checks_its_own_claim_before_a_send_and_never_cuts_one() {
    // Input: `claim` shorter than a send may take; a live node's slow
    // send was sent again by another node meanwhile. The config now
    // refuses such a claim (config::tests); a node checks its claim
    // before a send begins, and a send that began is never cut (cut
    // after the final dot, it could go out twice).
    let mut s = setup(&[1], false);
    s.outbox.claim = Some(Duration::from_secs(60));
    let slow = Arc::new(Slow(
        s.clock.clone(),
        chrono::Duration::seconds(90),
        s.mailer.clone(),
    ));
    s.outbox.mailer = slow;
    let cancel = CancellationToken::new();
    s.outbox.drain(true, &cancel).await.unwrap();
    assert_eq!(sends(&s), 1, "the slow send finished, once");
    assert_eq!(state(&s, 1), OutboxState::Sent);
    // The claim already over when the send would begin: not sent.
    let claimed_at = s.clock.now();
    s.clock.advance(chrono::Duration::seconds(61));
    assert_eq!(s.outbox.claim_left(claimed_at), Some(Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn mail_another_node_is_sending_is_left_to_it_until_its_claim_expires() {
    // A cluster without confirmation copies: node B read its list
    // while node A had entry 1 `sending`. Without claims B sent it at
    // once: two nodes, one mail, two deliveries.
    let mut s = setup(&[1, 2], false);
    s.outbox.claim = Some(Duration::from_secs(120));
    let now = s.clock.now();
    let snapshot = s.outbox.store.outbox_pending().unwrap();
    s.outbox
        .store
        .transact(|tx| {
            let mut e = tx.outbox_entry(1)?.unwrap();
            e.state = OutboxState::Sending;
            e.attempt_at = Some(now - chrono::Duration::seconds(10));
            tx.put_outbox(&e, None)
        })
        .unwrap();
    // From the stale snapshot too: the claim is read again.
    for e in snapshot {
        s.outbox.send_one(e, &Default::default()).await.unwrap();
    }
    let cancel = CancellationToken::new();
    s.outbox.drain(true, &cancel).await.unwrap();
    assert_eq!(sends(&s), 1, "only entry 2");
    assert_eq!(state(&s, 1), OutboxState::Sending);
    // A died mid-send: once the claim has expired, B sends it, once.
    s.clock.advance(chrono::Duration::seconds(111));
    s.outbox.drain(false, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2);
    assert_eq!(state(&s, 1), OutboxState::Sent);
    s.outbox.drain(true, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2);
}

#[test]
fn daemons_sharing_a_directory_take_journal_slots_and_settle_a_dead_one_s() {
    // Two daemons of a cluster on one machine, one config, one `path`:
    // a shared journal would let one empty the other's lines.
    let s = setup(&[1, 2], true);
    let dir = tempfile::tempdir().unwrap();
    let a = journal::Journal::open_slot(dir.path()).unwrap();
    let b = journal::Journal::open_slot(dir.path()).unwrap();
    assert!(dir.path().join("sent-0.journal").exists());
    assert!(dir.path().join("sent-1.journal").exists(), "a slot each");
    // b had entry 2 accepted by the server, then died.
    b.record(2).unwrap();
    drop(b);
    let now = s.clock.now();
    // a's own slot is held: nothing of it is touched; b's is settled.
    a.record(1).unwrap();
    let settled = journal::Journal::settle_orphans(dir.path(), &s.outbox.store, now).unwrap();
    assert_eq!(settled, 1);
    assert_eq!(state(&s, 2), OutboxState::Sent);
    assert_eq!(
        state(&s, 1),
        OutboxState::Pending,
        "a is alive: its line stays its own"
    );
    // A daemon started now takes the dead one's slot.
    let c = journal::Journal::open_slot(dir.path()).unwrap();
    c.record(7).unwrap();
    let text = std::fs::read_to_string(dir.path().join("sent-1.journal")).unwrap();
    assert_eq!(text, "7\n", "the settled journal was emptied, then reused");
}

#[tokio::test(start_paused = true)]
async fn an_entry_settled_since_the_snapshot_is_not_sent() {
    // Race: the drain read its list, then the confirmation copy marked
    // an entry sent; the drain overwrote that and sent it again.
    let s = setup(&[1], true);
    let snapshot = s.outbox.store.outbox_pending().unwrap();
    settle(&s, 1);
    for e in snapshot {
        assert_eq!(
            s.outbox.send_one(e, &Default::default()).await.unwrap(),
            Sending::Done(OutboxState::Sent)
        );
    }
    assert_eq!(sends(&s), 0, "sent already: not sent again");
    assert_eq!(state(&s, 1), OutboxState::Sent);
}

#[tokio::test(start_paused = true)]
async fn sent_mail_bodies_are_pruned_after_keep_sent_and_metadata_stays() {
    // Input: a store running for months: every sent mail's bytes (and
    // every forward's copy of the originals) were kept forever.
    let s = setup(&[1, 2, 3], true);
    s.outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(sends(&s), 3);
    // A fourth, failed, created at the same time: keeps its bytes.
    let mut failed = entry(4, s.clock.now());
    failed.state = OutboxState::Failed;
    s.outbox
        .store
        .transact(|tx| tx.put_outbox(&failed, Some(b"x")))
        .unwrap();
    let store = &s.outbox.store;
    let has_raw = |id| store.outbox_raw(id).unwrap().is_some();
    // Before the cutoff nothing goes.
    assert_eq!(
        store
            .prune_sent(s.clock.now() - chrono::Duration::days(30), 100)
            .unwrap(),
        0
    );
    assert!(has_raw(1));
    s.clock.advance(chrono::Duration::days(31));
    let cutoff = s.clock.now() - chrono::Duration::days(30);
    assert_eq!(store.prune_sent(cutoff, 100).unwrap(), 3);
    assert!(!has_raw(1) && !has_raw(2) && !has_raw(3));
    assert!(has_raw(4), "unsent mail keeps its bytes");
    let e = store.outbox_entry(2).unwrap().unwrap();
    assert_eq!(e.state, OutboxState::Sent, "the entry itself stays");
    // The walk resumes where it stopped: nothing is looked at twice.
    assert_eq!(store.prune_sent(cutoff, 100).unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panic_while_sending_parks_the_entry_and_the_rest_go_out() {
    // Input: one entry whose sending panics; the worker died with it
    // and, after a restart, the same entry came first again.
    let s = setup(&[1, 902, 3], true);
    *s.mailer.panic_on.lock().unwrap() = Some("<m902@example.test>".into());
    let report = s
        .outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.sent, report.failed), (2, 1));
    assert_eq!(state(&s, 902), OutboxState::Failed);
    let parked = s.outbox.store.outbox_entry(902).unwrap().unwrap();
    assert!(parked
        .last_error
        .unwrap()
        .contains("test-induced failure sending <m902@example.test>"));
    // A person retries it: it goes out.
    retry(&s.outbox.store, 902, s.clock.now()).unwrap();
    s.outbox
        .drain(false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(state(&s, 902), OutboxState::Sent);
    assert_eq!(sends(&s), 3);
}

/// Under a backlog of customer mail, ingest reads the confirmation copy
/// later than `confirm_wait` after it arrived (once a crash test saw an
/// ack go out twice so). An interrupted send from a watched inbox is
/// sent again only once that inbox has been read through past the wait,
/// and, if it cannot be read at all, an hour after it.
#[tokio::test(start_paused = true)]
async fn an_interrupted_send_waits_until_its_inbox_is_read_past_the_wait() {
    let mut s = setup(&[1, 2], true);
    s.outbox.watched = vec!["Support@Example.test".into()];
    s.mailer.results.lock().unwrap().extend([
        Err(SmtpError::Unknown("cut".into())),
        Err(SmtpError::Unknown("cut".into())),
    ]);
    let cancel = CancellationToken::new();
    let began = s.clock.now();
    s.outbox.drain(false, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2);
    // Past confirm_wait (120 s), but the inbox was last read through
    // before the wait ended: the copies may sit unread in it.
    s.clock.advance(chrono::Duration::seconds(200));
    let store = s.outbox.store.clone();
    store
        .set_read_through(
            "support@example.test",
            began + chrono::Duration::seconds(100),
        )
        .unwrap();
    s.outbox.drain(true, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2, "not sent again while the inbox is unread");
    assert_eq!(state(&s, 1), OutboxState::Sending);
    // The next pass finds entry 1's copy (it was accepted) and reads the
    // inbox through: entry 2 never reached the server, and goes out once.
    settle(&s, 1);
    store
        .set_read_through(
            "SUPPORT@example.test",
            began + chrono::Duration::seconds(190),
        )
        .unwrap();
    // A late writer (another node's older pass) never moves it back.
    store
        .set_read_through(
            "support@example.test",
            began + chrono::Duration::seconds(10),
        )
        .unwrap();
    assert_eq!(
        store.read_through("support@example.test").unwrap(),
        Some(began + chrono::Duration::seconds(190))
    );
    s.outbox.drain(false, &cancel).await.unwrap();
    assert_eq!(sends(&s), 3);
    assert_eq!(state(&s, 1), OutboxState::Sent);
    assert_eq!(state(&s, 2), OutboxState::Sent);
}

/// Entry 1 with confirmation copies, the inbox of `watched` read by
/// ingest, and its first send cut off after the data went out.
fn interrupted(watched: &str) -> Setup {
    let mut s = setup(&[1], true);
    s.outbox.watched = vec![watched.into()];
    s.mailer
        .results
        .lock()
        .unwrap()
        .push_back(Err(SmtpError::Unknown("cut".into())));
    s
}

#[tokio::test(start_paused = true)]
async fn an_inbox_that_is_never_read_holds_an_interrupted_send_one_hour() {
    let s = interrupted("support@example.test");
    let cancel = CancellationToken::new();
    s.outbox.drain(false, &cancel).await.unwrap();
    s.clock.advance(chrono::Duration::minutes(50));
    s.outbox.drain(true, &cancel).await.unwrap();
    assert_eq!(sends(&s), 1, "no pass recorded: still waiting");
    s.clock.advance(chrono::Duration::minutes(13));
    s.outbox.drain(false, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2, "past the wait and an hour: sent again");
    assert_eq!(state(&s, 1), OutboxState::Sent);
}

#[tokio::test(start_paused = true)]
async fn mail_from_an_address_no_inbox_reads_waits_only_confirm_wait() {
    let s = interrupted("billing@example.test");
    let cancel = CancellationToken::new();
    s.outbox.drain(false, &cancel).await.unwrap();
    s.clock.advance(chrono::Duration::seconds(121));
    s.outbox.drain(false, &cancel).await.unwrap();
    assert_eq!(sends(&s), 2);
}
