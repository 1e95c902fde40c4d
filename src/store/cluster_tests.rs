//! The cluster on PostgreSQL: mailbox leases and their fencing, node
//! heartbeats, and migrations that exclude the daemons.

use super::tests::{at, case, ok, open_sled, outbox, pg_store, record};
use super::*;

#[test]
fn a_lease_has_one_holder_until_it_expires_and_each_new_holder_a_higher_token() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        pg_store(&pg, "leases", &dir.path().join("a")),
        pg_store(&pg, "leases", &dir.path().join("b")),
    );
    let lease = std::time::Duration::from_millis(800);
    let t1 = ok(a.acquire_lease("sales", "node-a", lease)).expect("free: taken");
    assert_eq!(ok(b.acquire_lease("sales", "node-b", lease)), None, "held");
    assert!(ok(a.renew_lease("sales", "node-a", t1, lease)));
    assert!(!ok(b.renew_lease("sales", "node-b", t1, lease)), "not b's");
    // Expired: b takes it with a higher token, and a can no longer renew.
    std::thread::sleep(std::time::Duration::from_millis(900));
    let t2 = ok(b.acquire_lease("sales", "node-b", lease)).expect("expired: taken");
    assert!(t2 > t1, "{t2} > {t1}");
    assert!(!ok(a.renew_lease("sales", "node-a", t1, lease)));
    // Released: free at once, for a new token again.
    ok(b.release_lease("sales", "node-b", t2));
    let t3 = ok(a.acquire_lease("sales", "node-a", lease)).expect("released: taken");
    assert!(t3 > t2);
    let leases = ok(a.leases());
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].holder.as_str(), leases[0].token), ("node-a", t3));
    // The embedded store has no cluster: said, not pretended.
    let sled = open_sled(&dir.path().join("sled"));
    assert!(matches!(
        sled.acquire_lease("sales", "x", lease),
        Err(StoreError::NotShared)
    ));
}

#[test]
fn a_write_fenced_by_a_lost_lease_writes_nothing() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        pg_store(&pg, "fence", &dir.path().join("a")),
        pg_store(&pg, "fence", &dir.path().join("b")),
    );
    let lease = std::time::Duration::from_millis(500);
    let old = ok(a.acquire_lease("sales", "node-a", lease)).unwrap();
    let fence = |holder: &str, token| Fence {
        mailbox: "sales".into(),
        holder: holder.into(),
        token,
    };
    // Held: the fenced write commits.
    ok(a.transact(|tx| {
        tx.fence(fence("node-a", old));
        tx.set_cursor("sales", "INBOX", &cursor(7, 10))
    }));
    // a pauses past its lease; b takes the mailbox over.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let new = ok(b.acquire_lease("sales", "node-b", lease)).unwrap();
    // a wakes and commits what it fetched: refused, nothing written.
    let r = a.transact(|tx| {
        tx.fence(fence("node-a", old));
        tx.set_cursor("sales", "INBOX", &cursor(7, 99))?;
        tx.put_case(&mut case(1, "T1", 5))
    });
    assert!(
        matches!(r, Err(StoreError::Fenced(ref m)) if m == "sales"),
        "{r:?}"
    );
    assert_eq!(ok(b.cursor("sales", "INBOX")).map(|c| c.last_uid), Some(10));
    assert!(ok(b.case(1)).is_none());
    // The same holder name with the old token is refused too (a node
    // restarted under a fixed name is a new holder).
    let r = b.transact(|tx| {
        tx.fence(fence("node-b", old));
        tx.set_cursor("sales", "INBOX", &cursor(7, 99))
    });
    assert!(matches!(r, Err(StoreError::Fenced(_))), "{r:?}");
    ok(b.transact(|tx| {
        tx.fence(fence("node-b", new));
        tx.set_cursor("sales", "INBOX", &cursor(7, 11))
    }));
    assert_eq!(ok(a.cursor("sales", "INBOX")).map(|c| c.last_uid), Some(11));
}

#[test]
fn a_released_or_expired_lease_fences_its_old_holder() {
    // Issue 17 (C): the fence checked holder and token only, so after a
    // clean hand-back (or an expiry nobody has taken over yet) the old
    // holder's commit still went through.
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let a = pg_store(&pg, "released", &dir.path().join("a"));
    let fence = |mailbox: &str, token| Fence {
        mailbox: mailbox.into(),
        holder: "node-a".into(),
        token,
    };
    let long = std::time::Duration::from_secs(60);
    let released = ok(a.acquire_lease("sales", "node-a", long)).unwrap();
    ok(a.transact(|tx| {
        tx.fence(fence("sales", released));
        tx.set_cursor("sales", "INBOX", &cursor(7, 10))
    }));
    ok(a.release_lease("sales", "node-a", released));
    let r = a.transact(|tx| {
        tx.fence(fence("sales", released));
        tx.set_cursor("sales", "INBOX", &cursor(7, 99))?;
        tx.put_case(&mut case(1, "T1", 5))
    });
    assert!(
        matches!(r, Err(StoreError::Fenced(ref m)) if m == "sales"),
        "released: {r:?}"
    );
    assert_eq!(ok(a.cursor("sales", "INBOX")).map(|c| c.last_uid), Some(10));
    assert!(ok(a.case(1)).is_none());

    let short = std::time::Duration::from_millis(300);
    let expired = ok(a.acquire_lease("support", "node-a", short)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let r = a.transact(|tx| {
        tx.fence(fence("support", expired));
        tx.set_cursor("support", "INBOX", &cursor(7, 99))?;
        tx.put_case(&mut case(2, "T1", 5))
    });
    assert!(
        matches!(r, Err(StoreError::Fenced(ref m)) if m == "support"),
        "expired: {r:?}"
    );
    assert!(ok(a.cursor("support", "INBOX")).is_none());
    assert!(ok(a.case(2)).is_none());
}

#[test]
fn nodes_are_alive_while_they_beat_and_a_clean_stop_leaves_at_once() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let s = pg_store(&pg, "nodes", &dir.path().join("a"));
    let info = |n: &str| NodeInfo {
        node: n.into(),
        host: "h".into(),
        pid: 1,
        started_at: at(0),
    };
    let lease = std::time::Duration::from_millis(700);
    assert_eq!(ok(s.heartbeat(&info("a"), lease)), 1);
    assert_eq!(ok(s.heartbeat(&info("b"), lease)), 2);
    std::thread::sleep(std::time::Duration::from_millis(800));
    // Only a beats again: b counts as gone, and is listed as such.
    assert_eq!(ok(s.heartbeat(&info("a"), lease)), 1);
    let nodes = ok(s.nodes(lease));
    let seen: Vec<(&str, bool)> = nodes.iter().map(|n| (n.node.as_str(), n.alive)).collect();
    assert_eq!(seen, [("a", true), ("b", false)]);
    ok(s.leave("a"));
    assert_eq!(ok(s.nodes(lease)).len(), 1);
}

fn cursor(uid_validity: u32, last_uid: u32) -> Cursor {
    Cursor {
        uid_validity,
        last_uid,
    }
}

#[test]
fn a_migration_and_daemons_exclude_each_other_and_daemons_share() {
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let open = |n: &str| pg_store(&pg, "locks", &dir.path().join(n));
    let (a, b) = (open("a"), open("b"));
    // Two daemons of a cluster: both run.
    ok(a.lock_for_daemon());
    ok(b.lock_for_daemon());
    // `store migrate` into that database is refused while they run...
    let migrate = open("m");
    assert!(matches!(migrate.lock_out_daemons(), Err(StoreError::InUse)));
    drop((a, b));
    // ...and takes it once they are gone (their sessions end a moment
    // after the connections close); a daemon starting then is refused
    // until the copy is done.
    let until = |f: &dyn Fn() -> Result<()>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match f() {
                Err(StoreError::InUse) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                r => return r,
            }
        }
    };
    ok(until(&|| migrate.lock_out_daemons()));
    let late = open("c");
    assert!(matches!(late.lock_for_daemon(), Err(StoreError::InUse)));
    drop(migrate);
    ok(until(&|| late.lock_for_daemon()));
}

#[test]
fn r17_keys_an_older_release_made_of_long_texts_are_found_after_the_upgrade() {
    // Before issue 17 an address or Message-ID went into its keys as it
    // was, however long; such keys are rewritten once at open, so the
    // customer's cases and the message are still found.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let long = format!("{}@example.org", "a".repeat(3000));
    {
        let s = open_sled(&path);
        ok(s.transact(|tx| {
            let mut legacy = long.as_bytes().to_vec();
            legacy.push(0);
            legacy.extend_from_slice(&id_key(7));
            tx.put(Tree::Customers, legacy.clone(), Vec::new());
            tx.put(Tree::MessageCases, legacy, Vec::new());
            let mut mid = long.as_bytes().to_vec();
            mid.push(0);
            mid.extend_from_slice(b"hash");
            tx.put(Tree::MessageIds, mid, [id_key(7), id_key(1)].concat());
            tx.remove(Tree::Meta, b"key_texts".to_vec());
            Ok::<_, StoreError>(())
        }));
    }
    let s = open_sled(&path);
    assert_eq!(ok(s.transact(|tx| tx.customer_cases(&long))), vec![7]);
    assert_eq!(ok(s.cases_with_message_id(&long)), vec![7]);
    assert!(ok(s.has_message(&long, "hash")));
    // Nothing is left under a key of the old shape.
    let longest =
        s.db.range(Tree::Customers, &[], None)
            .map(|r| r.unwrap().0.len())
            .max()
            .unwrap();
    assert!(longest < 64, "{longest}");
}

#[test]
fn a_node_stuck_while_holding_a_cases_row_holds_up_that_case_only_and_only_for_a_while() {
    // r17: a node paused mid-transaction held the store's one lock, and
    // so every node's writes (issue 22: each case has its own row lock).
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database("stuck");
    let store = pg_store(&pg, "stuck", dir.path());
    ok(store.transact(|tx| tx.put_case(&mut case(1, "T1", 5))));
    let mut stuck = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    stuck
        .batch_execute("BEGIN; SELECT 1 FROM escalator.cases WHERE id = 1 FOR UPDATE")
        .unwrap();
    // Another case is written at once.
    let started = std::time::Instant::now();
    ok(store.transact(|tx| tx.put_case(&mut case(2, "T1", 6))));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The stuck one's case waits, then fails in a way that is retried.
    let started = std::time::Instant::now();
    let e = store
        .transact(|tx| {
            let mut c = tx.case(1)?.expect("stored");
            c.tier = "T2".into();
            tx.put_case(&mut c)
        })
        .unwrap_err();
    let waited = started.elapsed();
    assert!(e.is_transient(), "retried, not fatal: {e}");
    assert!(!e.stops_a_watcher());
    assert!(waited < std::time::Duration::from_secs(30), "{waited:?}");
    assert!(waited >= postgres::LOCK_WAIT / 2, "{waited:?}");
    stuck.batch_execute("ROLLBACK").unwrap();
    // The same connection goes on at once.
    ok(store.transact(|tx| {
        let mut c = tx.case(1)?.expect("stored");
        c.tier = "T2".into();
        tx.put_case(&mut c)
    }));
    assert_eq!(ok(store.case(1)).unwrap().tier, "T2");
    assert_eq!(
        ok(store.open_cases_by_tier()),
        [("T1".to_string(), 1), ("T2".to_string(), 1)].into()
    );
}

#[test]
fn two_nodes_storing_one_message_at_once_store_it_once_and_the_other_sees_it() {
    // Issue 22: with no store-wide lock, two nodes may both find a
    // Message-ID missing (a message delivered to two queues' mailboxes)
    // and both store it. The unique key lets one commit; the other's
    // commit fails as a conflict, writes nothing, and its retry finds the
    // message stored.
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let a = pg_store(&pg, "race", &dir.path().join("a"));
    let b = pg_store(&pg, "race", &dir.path().join("b"));
    let both_read = std::sync::Barrier::new(2);
    let store_once = |s: &Store, case_id: CaseId| {
        s.transact(|tx| {
            let stored = tx.has_message("same@x", "h")?;
            both_read.wait();
            if !stored {
                let id = tx.next_id(Sequence::Message)?;
                tx.put_case(&mut case(case_id, "T1", 5))?;
                tx.put_message(&record(id, case_id, "same@x", "h"), b"raw")?;
            }
            Ok::<_, StoreError>(stored)
        })
    };
    let (ra, rb) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| store_once(&a, 1));
        let tb = sc.spawn(|| store_once(&b, 2));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let (won, lost) = match (&ra, &rb) {
        (Ok(false), Err(e)) => (1, e),
        (Err(e), Ok(false)) => (2, e),
        other => panic!("one commits, one conflicts: {other:?}"),
    };
    assert!(matches!(lost, StoreError::Conflict(_)), "{lost}");
    assert!(lost.is_transient(), "retried");
    // Nothing of the loser was written: only the winner's case.
    assert_eq!(ok(a.counts()), (1, 1));
    assert!(ok(a.case(won)).is_some());
    // Its retry sees the message stored.
    let retry = a.transact(|tx| tx.has_message("same@x", "h"));
    assert!(ok(retry));
}

#[test]
fn a_mail_another_node_is_claiming_is_left_to_it_without_waiting() {
    // Issue 22: outbox claims skip a row another transaction holds
    // (SKIP LOCKED) instead of waiting for it.
    let pg = crate::testing::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database("claims");
    let store = pg_store(&pg, "claims", dir.path());
    ok(store.transact(|tx| {
        tx.put_outbox(&outbox(1, crate::record::OutboxState::Pending), Some(b"m"))?;
        tx.put_outbox(&outbox(2, crate::record::OutboxState::Pending), Some(b"m"))
    }));
    let mut other = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    other
        .batch_execute("BEGIN; SELECT 1 FROM escalator.outbox WHERE id = 1 FOR UPDATE")
        .unwrap();
    let started = std::time::Instant::now();
    let (one, two) = ok(store.transact(|tx| {
        Ok((
            tx.outbox_entry_unless_held(1)?.map(|e| e.map(|e| e.id)),
            tx.outbox_entry_unless_held(2)?.map(|e| e.map(|e| e.id)),
        ))
    }));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!((one, two), (Err(()), Ok(Some(2))));
    other.batch_execute("ROLLBACK").unwrap();
    let one = ok(store.transact(|tx| tx.outbox_entry_unless_held(1)));
    assert_eq!(one.map(|e| e.map(|e| e.id)), Ok(Some(1)));
    // A missing entry is missing, not held.
    let none = ok(store.transact(|tx| tx.outbox_entry_unless_held(9)));
    assert!(matches!(none, Ok(None)));
}
