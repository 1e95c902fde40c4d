//! The store's conformance suite: written once against the interface and
//! run for every engine in [`ENGINES`] (after garage's `db/test.rs`).
//! Adding an engine is one line there.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::*;
use crate::case::{EventKind, Status, TimerKind};
use crate::record::OutboxState;
use crate::stats::Facts;

/// Opens the store of a test (again, when a test reopens it).
type Open<'a> = &'a dyn Fn(&Path) -> Store;

pub(super) fn open_sled(path: &Path) -> Store {
    // A store just dropped may be held a moment by sled's own threads.
    match Store::open_waiting(path, std::time::Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => panic!("open: {}", crate::error_chain(&e)),
    }
}

/// Runs `test` against a store of every engine, each on a private server
/// where it has one (PostgreSQL: a database per test on its own server).
/// Adding an engine is one arm here.
fn each_engine(test: impl Fn(&str, Open<'_>, &Path)) {
    let dir = tempfile::tempdir().unwrap();
    test("sled", &open_sled, &dir.path().join("store"));
    let pg = crate::testing::Postgres::start();
    let url = pg.database("conformance");
    let dir = tempfile::tempdir().unwrap();
    let open_pg = |path: &Path| match Store::open_postgres(&url, PgTls::Plain, 2, path) {
        Ok(s) => s,
        Err(e) => panic!("open: {}", crate::error_chain(&e)),
    };
    test("postgres", &open_pg, &dir.path().join("node"));
}

pub(super) fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

pub(super) fn case(id: CaseId, tier: &str, created: i64) -> Case {
    Case::new(
        id,
        &format!("c{id}@x.org"),
        "s",
        tier,
        &format!("m{id}@x"),
        at(created),
    )
}

pub(super) fn record(seq: u64, case: CaseId, message_id: &str, hash: &str) -> MessageRecord {
    MessageRecord {
        seq,
        case,
        message_id: message_id.into(),
        content_hash: hash.into(),
        from: None,
        to: Vec::new(),
        cc: Vec::new(),
        subject: "s".into(),
        date: None,
        received_at: at(0),
        folder: "INBOX".into(),
        uid: seq as u32,
        attachments: Vec::new(),
        size: 1,
        suppressed: None,
        truncated: false,
        parse_error: None,
        several_from: false,
    }
}

pub(super) fn outbox(id: u64, state: OutboxState) -> OutboxEntry {
    OutboxEntry {
        id,
        case: 1,
        kind: "ack".into(),
        message_id: format!("o{id}@x"),
        from: "s@x".into(),
        to: vec!["c@x".into()],
        subject: "s".into(),
        state,
        attempts: 0,
        created_at: at(id as i64),
        next_attempt_at: at(0),
        sent_at: None,
        last_error: None,
        attempt_at: None,
        attach: Vec::new(),
        attach_nonce: String::new(),
        claimed_by: None,
    }
}

pub(super) fn ok<T>(r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{}", crate::error_chain(&e)),
    }
}

#[test]
fn a_failing_transaction_leaves_nothing() {
    each_engine(|engine, open, path| {
        let s = open(path);
        let r: Result<()> = s.transact(|tx| {
            tx.put_case(&mut case(1, "T1", 0))?;
            tx.put_message(&record(1, 1, "a@x", "h"), b"raw")?;
            tx.next_id(Sequence::Case)?;
            tx.on_commit(|| panic!("a hook of a failed transaction ran"));
            Err(StoreError::Random("the closure failed".into()))
        });
        assert!(r.is_err(), "{engine}");
        assert!(ok(s.case(1)).is_none(), "{engine}");
        assert!(!ok(s.has_message("a@x", "h")), "{engine}");
        assert!(ok(s.open_cases_by_tier()).is_empty(), "{engine}");
        let n = ok(s.transact(|tx| tx.next_id(Sequence::Case)));
        // sled counts in the transaction; PostgreSQL's sequences hand a
        // number out at once (no row for every node to wait on), so a
        // failed transaction leaves a gap. Neither hands one out twice.
        match engine {
            "sled" => assert_eq!(n, 1, "the failed transaction's number is not used up"),
            _ => assert_eq!(n, 2, "{engine}: the next number, after a gap"),
        }
    });
}

#[test]
fn a_transaction_reads_its_own_writes_and_rolls_back_to_a_savepoint() {
    each_engine(|engine, open, path| {
        let s = open(path);
        ok(s.transact(|tx| {
            tx.put_message(&record(1, 4, "a@x", "h1"), b"one")?;
            assert_eq!(tx.cases_with_message_id("a@x")?, vec![4], "{engine}");
            assert!(tx.has_message("a@x", "h1")?);
            let sp = tx.savepoint();
            tx.put_message(&record(2, 2, "a@x", "h2"), b"two")?;
            tx.put_case(&mut case(2, "T1", 0))?;
            assert_eq!(tx.cases_with_message_id("a@x")?, vec![2, 4]);
            tx.rollback(sp);
            assert_eq!(tx.cases_with_message_id("a@x")?, vec![4]);
            assert!(tx.case(2)?.is_none());
            Ok(())
        }));
        assert_eq!(ok(s.cases_with_message_id("a@x")), vec![4], "{engine}");
        assert_eq!(ok(s.raw(1)).as_deref(), Some(&b"one"[..]));
        assert!(ok(s.raw(2)).is_none());
        assert!(
            ok(s.open_cases_by_tier()).is_empty(),
            "{engine}: rolled back"
        );
    });
}

#[test]
fn a_message_is_stored_once_by_id_and_content() {
    each_engine(|engine, open, path| {
        let s = open(path);
        let big = vec![b'x'; 100_000];
        ok(s.transact(|tx| tx.put_message(&record(1, 1, "a@x", "h"), &big)));
        assert!(ok(s.has_message("a@x", "h")), "{engine}");
        assert!(!ok(s.has_message("a@x", "other")), "{engine}");
        assert_eq!(
            ok(s.raw(1)),
            Some(big),
            "{engine}: big bytes come back whole"
        );
        assert_eq!(ok(s.message(1)).map(|m| m.case), Some(1));
    });
}

#[test]
fn messages_sharing_a_message_id_are_both_kept_cases_oldest_first() {
    each_engine(|engine, open, path| {
        let s = open(path);
        ok(s.transact(|tx| {
            tx.put_message(&record(1, 9, "shared@x", "0000"), b"a")?;
            tx.put_message(&record(2, 3, "shared@x", "ffff"), b"b")?;
            tx.put_message(&record(3, 9, "shared@x", "0001"), b"c")?;
            tx.index_message_id("shared@x", "out", 7, 1);
            Ok(())
        }));
        assert!(ok(s.has_message("shared@x", "0000")) && ok(s.has_message("shared@x", "ffff")));
        assert_eq!(
            ok(s.cases_with_message_id("shared@x")),
            vec![3, 7, 9],
            "{engine}"
        );
        assert!(ok(s.cases_with_message_id("shared@")).is_empty());
    });
}

#[test]
fn timers_come_due_in_deadline_order_within_the_limit() {
    each_engine(|engine, open, path| {
        let s = open(path);
        ok(s.transact(|tx| {
            for (id, due) in [(1, 300), (2, 100), (3, 200), (4, 10_000)] {
                let mut c = case(id, "T1", 0);
                c.timer = Some(Timer {
                    at: at(due),
                    kind: TimerKind::Due,
                });
                tx.put_case(&mut c)?;
            }
            Ok(())
        }));
        assert_eq!(ok(s.due_timers(at(1000), 10)), vec![2, 3, 1], "{engine}");
        assert_eq!(ok(s.due_timers(at(1000), 2)), vec![2, 3], "{engine}");
        assert_eq!(ok(s.next_timer()), Some(at(100)));
        // Moving a timer moves its index entry; clearing it removes it.
        ok(s.transact(|tx| {
            let mut c = tx.case(2)?.unwrap();
            c.timer = Some(Timer {
                at: at(5000),
                kind: TimerKind::Due,
            });
            tx.put_case(&mut c)?;
            let mut c = tx.case(3)?.unwrap();
            c.timer = None;
            tx.put_case(&mut c)
        }));
        assert_eq!(ok(s.due_timers(at(1000), 10)), vec![1], "{engine}");
        assert_eq!(ok(s.next_timer()), Some(at(300)));
    });
}

#[test]
fn sequence_numbers_are_never_handed_out_twice_across_a_reopen() {
    each_engine(|engine, open, path| {
        let first = {
            let s = open(path);
            let a = ok(s.transact(|tx| tx.next_id(Sequence::Case)));
            let b = ok(s.transact(|tx| tx.next_id(Sequence::Case)));
            assert!(b > a, "{engine}");
            ok(s.flush());
            b
        };
        let s = open(path);
        let again = ok(s.transact(|tx| tx.next_id(Sequence::Case)));
        assert!(again > first, "{engine}: {again} after {first}");
        // Sequences are independent.
        assert_eq!(ok(s.transact(|tx| tx.next_id(Sequence::Outbox))), 1);
    });
}

#[test]
fn what_is_read_ahead_answers_every_lookup_as_a_fresh_read_would() {
    each_engine(|engine, open, path| {
        let s = open(path);
        ok(s.transact(|tx| {
            for t in 1..=6 {
                tx.record_auto_reply("a@x.org", at(t * 100), t as u64);
            }
            tx.put_message(&record(1, 4, "cited@x", "h1"), b"one")?;
            tx.put_message(&record(2, 5, "cited@x", "h2"), b"two")?;
            tx.set_customer_language("a@x.org", Some("de"));
            Ok(())
        }));
        let cited = ["cited@x", "none@x"];
        let ahead = [crate::store::Lookups {
            message_id: "new@x",
            content_hash: "h9",
            cited: &cited,
            sender: "a@x.org",
            recipient: "a@x.org",
        }];
        // Windows read ahead from 250 (complete) and from 150 with room
        // for only two mails (not every mail of the window).
        for (since, room) in [(250, 10), (150, 2)] {
            let window = crate::store::Window {
                since: at(since),
                at_most: room,
            };
            for asked_since in [100, 150, 250, 350, 650] {
                for at_most in [1, 2, 3, 10] {
                    let fresh =
                        ok(s.transact(|tx| {
                            tx.auto_replies_since("a@x.org", at(asked_since), at_most)
                        }));
                    let read_ahead = ok(s.transact(|tx| {
                        tx.read_ahead(&ahead, Some(window))?;
                        tx.auto_replies_since("a@x.org", at(asked_since), at_most)
                    }));
                    assert_eq!(
                        read_ahead, fresh,
                        "{engine}: since {asked_since}, at most {at_most}, ahead {since}/{room}"
                    );
                }
            }
        }
        let looked_up = |ahead: bool| {
            ok(s.transact(|tx| {
                if ahead {
                    tx.read_ahead(&ahead_of(&cited), None)?;
                }
                Ok((
                    tx.cases_with_message_id("cited@x")?,
                    tx.cases_with_message_id("none@x")?,
                    tx.has_message("cited@x", "h2")?,
                    tx.customer_language("a@x.org")?,
                    tx.customer_cases("a@x.org")?,
                ))
            }))
        };
        let fresh = looked_up(false);
        assert_eq!(fresh.0, vec![4, 5], "{engine}");
        assert_eq!(looked_up(true), fresh, "{engine}");
    });
}

fn ahead_of<'a>(cited: &'a [&'a str]) -> Vec<crate::store::Lookups<'a>> {
    vec![crate::store::Lookups {
        message_id: "cited@x",
        content_hash: "h2",
        cited,
        sender: "a@x.org",
        recipient: "a@x.org",
    }]
}

#[test]
fn automatic_mail_is_counted_by_window_and_recipient() {
    each_engine(|engine, open, path| {
        let s = open(path);
        ok(s.transact(|tx| {
            for (i, t) in [100, 200, 300].iter().enumerate() {
                tx.record_auto_reply("a@x.org", at(*t), i as u64);
            }
            tx.record_auto_reply("a@x.orgg", at(300), 9);
            // In the same transaction, the new records count.
            assert_eq!(tx.auto_replies_since("a@x.org", at(150), 10)?, 2);
            Ok(())
        }));
        let count = |since, at_most| {
            ok(s.transact(|tx| tx.auto_replies_since("a@x.org", at(since), at_most)))
        };
        assert_eq!(count(150, 10), 2, "{engine}");
        assert_eq!(count(150, 1), 1, "{engine}");
        assert_eq!(count(0, 10), 3);
        assert_eq!(ok(s.prune_auto_replies(at(250))), 2);
        assert_eq!(count(0, 10), 1);
    });
}

#[test]
fn open_case_counts_follow_tier_changes_and_resolution() {
    each_engine(|engine, open, path| {
        let s = open(path);
        let write = |c: &mut Case| ok(s.transact(|tx| tx.put_case(c)));
        let mut a = case(1, "T1", 1000);
        let mut b = case(2, "T1", 1000);
        write(&mut a);
        write(&mut b);
        write(&mut a);
        let counts = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        assert_eq!(ok(s.open_cases_by_tier()), counts(&[("T1", 2)]), "{engine}");
        a.tier = "T2".into();
        write(&mut a);
        assert_eq!(ok(s.open_cases_by_tier()), counts(&[("T1", 1), ("T2", 1)]));
        a.status = Status::Resolved;
        write(&mut a);
        assert_eq!(ok(s.open_cases_by_tier()), counts(&[("T1", 1)]));
        assert_eq!(s.unresolved(None).count(), 1);
        a.status = Status::Open;
        write(&mut a);
        assert_eq!(ok(s.open_cases_by_tier()), counts(&[("T1", 1), ("T2", 1)]));
    });
}

#[test]
fn outbox_entries_leave_the_pending_list_when_settled() {
    each_engine(|engine, open, path| {
        let s = open(path);
        ok(s.transact(|tx| {
            for id in 1..=3 {
                tx.put_outbox(&outbox(id, OutboxState::Pending), Some(b"mail"))?;
            }
            Ok(())
        }));
        assert_eq!(ok(s.outbox_depth()), 3, "{engine}");
        ok(s.transact(|tx| {
            let mut e = tx.outbox_entry(2)?.unwrap();
            e.state = OutboxState::Sending;
            tx.put_outbox(&e, None)?;
            let mut e = tx.outbox_entry(1)?.unwrap();
            e.state = OutboxState::Sent;
            tx.put_outbox(&e, None)?;
            let mut e = tx.outbox_entry(3)?.unwrap();
            e.state = OutboxState::Failed;
            tx.put_outbox(&e, None)
        }));
        let pending: Vec<u64> = ok(s.outbox_pending()).iter().map(|e| e.id).collect();
        assert_eq!(pending, vec![2], "{engine}: sending stays pending");
        assert_eq!(ok(s.outbox_depth()), 1);
        assert_eq!(ok(s.outbox_raw(1)).as_deref(), Some(&b"mail"[..]));
        assert_eq!(s.outbox().count(), 3);
    });
}

#[test]
fn a_cursor_keeps_its_uidvalidity() {
    each_engine(|engine, open, path| {
        let s = open(path);
        assert!(ok(s.cursor("default", "INBOX")).is_none(), "{engine}");
        let c = Cursor {
            uid_validity: 9,
            last_uid: 3,
        };
        ok(s.transact(|tx| tx.set_cursor("default", "INBOX", &c)));
        assert_eq!(ok(s.cursor("default", "INBOX")), Some(c), "{engine}");
        assert!(ok(s.cursor("default", "Sent")).is_none());
    });
}

#[test]
fn quarantine_keeps_the_entry_and_its_bytes_until_removed() {
    each_engine(|engine, open, path| {
        let s = open(path);
        let entry = QuarantineEntry {
            queue: "default".into(),
            id: 1,
            folder: "Sent".into(),
            uid_validity: 1,
            uid: 5,
            error: "boom".into(),
            at: at(0),
            attempts: 1,
            sent: true,
            unfetched: false,
        };
        ok(s.transact(|tx| tx.put_quarantine(&entry, b"raw bytes")));
        let listed: Vec<QuarantineEntry> = s.quarantined().map(ok).collect();
        assert_eq!(listed.len(), 1, "{engine}: the bytes are not an entry");
        assert!(listed[0].sent);
        assert_eq!(ok(s.quarantine_raw(1)).as_deref(), Some(&b"raw bytes"[..]));
        ok(s.transact(|tx| {
            tx.remove_quarantine(1);
            Ok(())
        }));
        assert_eq!(s.quarantined().count(), 0);
        assert!(ok(s.quarantine_raw(1)).is_none());
    });
}

#[test]
fn facts_are_chosen_by_opening_time() {
    each_engine(|engine, open, path| {
        let s = open(path);
        ok(s.transact(|tx| {
            for (id, created) in [(1, 500), (2, 100), (3, 300)] {
                tx.put_case(&mut case(id, "T1", created))?;
            }
            Ok(())
        }));
        let ids =
            |since| -> Vec<CaseId> { ok(s.facts_since(since)).iter().map(|f| f.id).collect() };
        assert_eq!(ids(None), vec![1, 2, 3], "{engine}: case order");
        assert_eq!(ids(Some(at(200))), vec![1, 3], "{engine}");
        let open: Vec<CaseId> = ok(s.unresolved_facts()).iter().map(|f| f.id).collect();
        assert_eq!(open, vec![2, 3, 1], "{engine}: by opening time");
        // The unresolved cases opened before a window, by opening time.
        let before =
            |t| -> Vec<DateTime<Utc>> { s.unresolved(t).map(|r| ok(r).created_at).collect() };
        assert_eq!(before(Some(at(400))), vec![at(100), at(300)], "{engine}");
        assert_eq!(before(None).len(), 3, "{engine}");
    });
}

#[test]
fn a_case_keeps_its_messages_and_history_in_order_however_it_is_written() {
    each_engine(|engine, open, path| {
        let s = open(path);
        let mut c = case(1, "T1", 0);
        let event = |n: i64| Event {
            at: at(n),
            what: EventKind::Reopened {
                message_id: format!("m{n}"),
            },
        };
        c.new_messages = vec![10, 11];
        c.new_events = vec![event(1), event(2)];
        ok(s.transact(|tx| tx.put_case(&mut c)));
        assert!(c.new_messages.is_empty() && c.new_events.is_empty());
        // Two writes of the case in one transaction (a chunk with two
        // replies), each from a fresh read, and one more later.
        ok(s.transact(|tx| {
            for seq in [12, 13] {
                let mut c = tx.case(1)?.expect("stored");
                c.new_messages.push(seq);
                c.new_events.push(event(seq as i64));
                assert_eq!(tx.case_messages(&c)?.last(), Some(&seq), "{engine}");
                tx.put_case(&mut c)?;
            }
            Ok(())
        }));
        // A write rolled back leaves no item behind.
        let _ = s.transact(|tx| {
            let mut c = tx.case(1)?.expect("stored");
            c.new_messages.push(99);
            tx.put_case(&mut c)?;
            Err::<(), _>(StoreError::Malformed { key: "x".into() })
        });
        let stored = ok(s.case(1)).unwrap();
        assert_eq!(
            (stored.message_count, stored.event_count),
            (4, 4),
            "{engine}"
        );
        assert_eq!(ok(s.case_messages(1)), vec![10, 11, 12, 13], "{engine}");
        let at_: Vec<i64> = ok(s.history(1)).iter().map(|e| e.at.timestamp()).collect();
        assert_eq!(at_, vec![1, 2, 12, 13], "{engine}");
        // Another case's lists are its own.
        ok(s.transact(|tx| tx.put_case(&mut case(2, "T1", 0))));
        assert!(ok(s.case_messages(2)).is_empty() && ok(s.history(2)).is_empty());
    });
}

#[test]
fn concurrent_transactions_on_one_case_lose_no_update() {
    each_engine(|engine, open, path| {
        let s = Arc::new(open(path));
        ok(s.transact(|tx| tx.put_case(&mut case(1, "T1", 0))));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        ok(s.transact(|tx| {
                            let mut c = tx.case(1)?.unwrap();
                            c.push(
                                at(0),
                                EventKind::Note {
                                    from: format!("t{t}"),
                                    message_id: format!("{i}"),
                                },
                            );
                            tx.put_case(&mut c)
                        }));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ok(s.history(1)).len(), 8 * 25, "{engine}");
        assert_eq!(ok(s.case(1)).unwrap().event_count, 8 * 25, "{engine}");
    });
}

#[test]
fn on_commit_runs_after_the_commit() {
    each_engine(|engine, open, path| {
        let s = Arc::new(open(path));
        let seen = Arc::new(std::sync::Mutex::new(None));
        let (s2, seen2) = (s.clone(), seen.clone());
        ok(s.transact(move |tx| {
            tx.put_case(&mut case(1, "T1", 0))?;
            tx.on_commit(move || {
                *seen2.lock().unwrap() = Some(s2.case(1).map(|c| c.is_some()).unwrap_or(false));
            });
            Ok(())
        }));
        assert_eq!(*seen.lock().unwrap(), Some(true), "{engine}");
    });
}

#[test]
fn store_dir_is_private_and_the_key_survives_reopening() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("db");
    let s = open_sled(&p);
    let mode = std::fs::metadata(&p).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let key = *s.key();
    // sled locks per process with flock: a second open in the same
    // process is not refused by the OS, so the refusal between
    // processes is tested end to end in tests/.
    drop(s);
    assert_eq!(*open_sled(&p).key(), key);
}

#[test]
fn a_store_from_before_the_case_index_is_upgraded() {
    // A store written by an older release has Message-IDs indexed by
    // content only and cases as JSON with their history and messages
    // inline; opening it builds the by-case index once, the open counts
    // from the cases, and moves each case's lists out of its record.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let mut old = case(4, "T1", 0);
    old.push(
        at(5),
        EventKind::Reopened {
            message_id: "x".into(),
        },
    );
    {
        let s = open_sled(&path);
        let mut v = id_key(4).to_vec();
        v.extend_from_slice(&id_key(40));
        let mut legacy = serde_json::to_value(&old).unwrap();
        legacy["history"] = serde_json::to_value(&old.new_events).unwrap();
        legacy["messages"] = serde_json::json!([40, 41]);
        let legacy = serde_json::to_vec(&legacy).unwrap();
        let ops: Vec<super::write::Op> = vec![
            (
                Tree::MessageIds,
                codec::message_id_key("old@example.org", "hash"),
                Some(v.into()),
            ),
            (Tree::Meta, b"indexes".to_vec(), Some(b"4".to_vec().into())),
            (Tree::Cases, id_key(4).to_vec(), Some(legacy.into())),
        ];
        ok(s.db.commit(&ops, &Default::default(), None));
        ok(s.flush());
    }
    let s = open_sled(&path);
    assert_eq!(ok(s.cases_with_message_id("old@example.org")), vec![4]);
    assert_eq!(ok(s.open_cases_by_tier()).get("T1"), Some(&1));
    assert_eq!(ok(s.case_messages(4)), vec![40, 41]);
    let history = ok(s.history(4));
    assert_eq!(history, old.new_events);
    let c = ok(s.case(4)).unwrap();
    assert_eq!((c.message_count, c.event_count), (2, 1));
    // Once: opening again changes nothing.
    drop(s);
    let s = open_sled(&path);
    assert_eq!(ok(s.case_messages(4)), vec![40, 41]);
    assert_eq!(ok(s.history(4)), old.new_events);
}

#[test]
fn facts_round_trip_compactly_and_old_json_facts_are_read() {
    use crate::case::Reason;
    let mut c = case(7, "T1", 1000);
    c.push(
        at(1500),
        EventKind::Escalated {
            from: "T1".into(),
            to: "T2".into(),
            reason: Reason::Trigger,
            detail: "phrase \"supervisor\"".into(),
        },
    );
    c.tier = "T2".into();
    c.csat = Some(4);
    c.subject = "İade talebi ✓".into();
    let facts = Facts::of(&c);
    let bytes = codec::facts::encode(&facts);
    assert_eq!(codec::facts::decode(&bytes), Some(facts.clone()));
    assert!(
        bytes.len() < serde_json::to_vec(&facts).unwrap().len() / 2,
        "compact"
    );
    assert!(
        codec::facts::decode(&bytes[..bytes.len() - 1]).is_none(),
        "cut short"
    );
    // Facts an older release wrote, one record per case as JSON or
    // compact (version 1, without a queue), move into buckets on open.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    // Version 2: no bounce count (4 bytes at the end), read as none.
    let mut counted = facts.clone();
    counted.bounces = 3;
    let mut v2_bytes = codec::facts::encode(&counted);
    v2_bytes[0] = 2;
    v2_bytes.truncate(v2_bytes.len() - 4);
    assert_eq!(codec::facts::decode(&v2_bytes), Some(facts.clone()));
    assert_eq!(
        codec::facts::decode(&codec::facts::encode(&counted)).map(|f| f.bounces),
        Some(3)
    );
    let mut v1 = facts.clone();
    v1.id = 8;
    let mut v1_bytes = codec::facts::encode(&v1);
    v1_bytes[0] = 1;
    let queue_len = 2 + v1.queue.len() + 4;
    v1_bytes.truncate(v1_bytes.len() - queue_len);
    {
        let s = open_sled(&path);
        let ops: Vec<super::write::Op> = vec![
            (
                Tree::Facts,
                codec::facts_key(facts.created_at, facts.id),
                Some(serde_json::to_vec(&facts).unwrap().into()),
            ),
            (
                Tree::Facts,
                codec::facts_key(v1.created_at, v1.id),
                Some(v1_bytes.into()),
            ),
            (Tree::Meta, b"indexes".to_vec(), Some(b"6".to_vec().into())),
        ];
        ok(s.db.commit(&ops, &Default::default(), None));
        ok(s.flush());
    }
    let s = open_sled(&path);
    let read = ok(s.facts_since(None));
    assert_eq!(read, vec![facts, v1]);
    assert_eq!(
        s.db.prefix(Tree::Facts, b"c").count(),
        0,
        "moved, not copied"
    );
}

#[test]
fn a_store_written_by_the_previous_release_opens_with_everything_in_it() {
    // tests/fixtures/store-662af45: the demo's store as release 662af45
    // (before the store interface, the by-case Message-ID index and the
    // compact facts) left it: 3 cases, 5 messages, 4 mails sent, timers.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-662af45");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    std::fs::create_dir_all(&path).unwrap();
    for f in std::fs::read_dir(&fixture).unwrap().flatten() {
        if f.path().is_file() {
            std::fs::copy(f.path(), path.join(f.file_name())).unwrap();
        }
    }
    let s = open_sled(&path);
    let cases: Vec<Case> = s.cases().map(ok).collect();
    let customers: Vec<&str> = cases.iter().map(|c| c.customer.as_str()).collect();
    assert_eq!(
        customers,
        [
            "alice@example.test",
            "carol@example.test",
            "dave@example.test"
        ]
    );
    let lists: Vec<Vec<u64>> = cases.iter().map(|c| ok(s.case_messages(c.id))).collect();
    assert_eq!(lists[0].len(), 3, "alice's thread with bob's reply");
    assert_eq!(lists.iter().map(Vec::len).sum::<usize>(), 5);
    for (c, list) in cases.iter().zip(&lists) {
        assert_eq!(c.message_count as usize, list.len());
        for seq in list {
            let raw = ok(s.raw(*seq)).expect("every message's bytes");
            assert!(!raw.is_empty());
            assert_eq!(ok(s.message(*seq)).expect("its record").case, c.id);
        }
        // The history moved out of the case record, every event of it.
        let history = ok(s.history(c.id));
        assert_eq!(history.len() as u64, c.event_count);
        assert!(
            matches!(history[0].what, EventKind::Created { .. }),
            "{history:?}"
        );
    }
    // Threading finds the old messages through the index built on open.
    assert_eq!(
        ok(s.cases_with_message_id("demo-1@alice.example.test")),
        vec![1]
    );
    // Every waiting case has its timer; every mail was sent.
    let far = Utc::now() + chrono::Duration::days(365);
    assert_eq!(ok(s.due_timers(far, 10)).len(), 3);
    assert_eq!(s.outbox().count(), 4);
    assert!(ok(s.outbox_pending()).is_empty());
    assert!(ok(s.cursor("default", "INBOX")).is_some());
    // The KPIs read the facts the old release wrote (JSON) and the counts
    // rebuilt from the cases.
    assert_eq!(ok(s.facts_since(None)).len(), 3);
    let open = ok(s.open_cases_by_tier());
    assert_eq!(open.get("Frontline"), Some(&2), "{open:?}");
    assert_eq!(open.get("Tier 2"), Some(&1), "{open:?}");
    // And it takes new writes.
    let n = ok(s.transact(|tx| tx.next_id(Sequence::Case)));
    assert_eq!(n, 4, "case numbers go on where the old release stopped");
}

#[test]
fn records_are_compact_and_older_json_records_still_read() {
    let mut e = outbox(3, OutboxState::Sent);
    e.attach = vec![7, 8];
    let compact = codec::encode(&e).unwrap();
    let json = serde_json::to_vec(&e).unwrap();
    assert_eq!(compact[0], 1, "version byte");
    assert!(
        compact.len() * 2 < json.len(),
        "{} vs {}",
        compact.len(),
        json.len()
    );
    for bytes in [&compact, &json] {
        let back: OutboxEntry = codec::decode(Tree::Outbox, b"k", bytes).unwrap();
        assert_eq!((back.id, back.attach.clone()), (3, vec![7, 8]));
    }
    let mut c = case(9, "T1", 5);
    c.language = Some("de".into());
    c.language_source = Some("content-language".into());
    let bytes = codec::encode(&c).unwrap();
    let back: Case = codec::decode(Tree::Cases, b"k", &bytes).unwrap();
    assert_eq!(back, c);
    // A case written before cases had a language: it reads with none,
    // all else intact; one byte shorter still is malformed.
    let mut old = c.clone();
    old.language = None;
    old.language_source = None;
    let mut before = codec::encode(&old).unwrap();
    before.truncate(before.len() - 2); // the two trailing Nones
    let back: Case = codec::decode(Tree::Cases, b"k", &before).unwrap();
    assert_eq!(back, old);
    before.pop();
    let err = codec::decode::<Case>(Tree::Cases, b"k", &before).unwrap_err();
    assert!(matches!(err, StoreError::Malformed { .. }), "{err}");
    // An outgoing mail written before it named its claiming node.
    let mut sent = outbox(4, OutboxState::Sent);
    sent.claimed_by = Some("eu-1".into());
    let back: OutboxEntry =
        codec::decode(Tree::Outbox, b"k", &codec::encode(&sent).unwrap()).unwrap();
    assert_eq!(back.claimed_by.as_deref(), Some("eu-1"));
    sent.claimed_by = None;
    let mut before = codec::encode(&sent).unwrap();
    before.pop(); // the trailing None
    let back: OutboxEntry = codec::decode(Tree::Outbox, b"k", &before).unwrap();
    assert_eq!(
        (back.id, back.state, back.claimed_by),
        (4, OutboxState::Sent, None)
    );
    // Bytes of neither kind are an error naming the record, never a
    // default value.
    let err = codec::decode::<OutboxEntry>(Tree::Outbox, &id_key(3), b"\x09junk").unwrap_err();
    assert!(err.to_string().contains("Outbox/3"), "{err}");
    let err = codec::decode::<OutboxEntry>(Tree::Outbox, &id_key(3), &compact[..10]).unwrap_err();
    assert!(matches!(err, StoreError::Malformed { .. }), "{err}");
}

#[test]
fn facts_of_many_cases_are_each_read_once_and_kept_up_to_date() {
    each_engine(|engine, open, path| {
        let s = open(path);
        // 300 cases over several buckets, written in two transactions
        // out of order; case 150 written twice in one.
        ok(s.transact(|tx| {
            for id in (151..=300).rev() {
                tx.put_case(&mut case(id, "T1", id as i64))?;
            }
            Ok(())
        }));
        ok(s.transact(|tx| {
            for id in 1..=150 {
                tx.put_case(&mut case(id, "T1", id as i64))?;
            }
            let mut c = tx.case(150)?.expect("just written");
            c.push(
                at(1000),
                EventKind::Escalated {
                    from: "T1".into(),
                    to: "T2".into(),
                    reason: crate::case::Reason::Manual,
                    detail: String::new(),
                },
            );
            c.tier = "T2".into();
            tx.put_case(&mut c)
        }));
        let mut seen = Vec::new();
        let n = ok(s.each_fact(Some(at(101)), true, |f| seen.push((f.id, f.stints.len()))));
        assert_eq!(n, 200, "{engine}");
        let ids: Vec<CaseId> = seen.iter().map(|x| x.0).collect();
        assert_eq!(
            ids,
            (101..=300).collect::<Vec<_>>(),
            "{engine}: each once, in order"
        );
        assert_eq!(
            seen[49],
            (150, 2),
            "{engine}: the escalation is in its facts"
        );
        assert_eq!(ok(s.each_fact(None, true, |_| ())), 300);
        assert_eq!(ok(s.each_fact(Some(at(301)), true, |_| ())), 0);
    });
}

/// A store on database `db` of the private server `pg`.
/// Makes `c` look like a running daemon of an older release: it holds
/// the daemon lock shared, as every daemon does.
pub(super) fn hold_daemon_lock_shared(c: &mut ::postgres::Client) {
    let held: bool = c
        .query_one(
            "SELECT pg_try_advisory_lock_shared($1)",
            &[&0x6573_636e_i64],
        )
        .unwrap()
        .get(0);
    assert!(held);
}

pub(super) fn pg_store(pg: &crate::testing::Postgres, db: &str, dir: &Path) -> Store {
    match Store::open_postgres(&pg.database(db), PgTls::Plain, 2, dir) {
        Ok(s) => s,
        Err(e) => panic!("{}", crate::error_chain(&e)),
    }
}
