//! `store migrate --from-sled`: a sled store copied into PostgreSQL is the
//! same store, also when the copy is interrupted and resumed.

use super::codec::TREES;
use super::tests::{case, ok, open_sled, outbox, pg_store, record};
use super::*;
use crate::record::OutboxState;

#[test]
fn a_sled_store_copied_into_postgresql_is_the_same_store_even_when_the_copy_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let sled = open_sled(&dir.path().join("sled"));
    ok(sled.transact(|tx| {
        for id in 1..=1200 {
            tx.put_case(&mut case(id, "T1", id as i64))?;
        }
        tx.put_message(&record(7, 3, "m@x", "h"), b"raw bytes of message 7")?;
        tx.put_outbox(&outbox(4, OutboxState::Pending), Some(b"the mail"))?;
        tx.next_id(Sequence::Case)?;
        Ok(())
    }));
    let pg = crate::testing::Postgres::start();
    let url = pg.database("migrate");
    let target = match Store::open_postgres(&url, PgTls::Plain, 2, &dir.path().join("node")) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    // Interrupted: only the cases were copied (in three batches).
    ok(sled.copy_tree(&target, Tree::Cases, "cases"));
    let copied = ok(sled.copy_into(&target));
    assert!(!copied.already_done);
    assert_eq!(copied.reconciled, 0, "nothing changed meanwhile");
    assert_eq!(copied.rows["cases"], 1200);
    assert_eq!(copied.rows["raw"], 2, "a message's and a mail's bytes");
    // The same store: its secret, sequences, records and raw bytes.
    drop(target);
    let target = match Store::open_postgres(&url, PgTls::Plain, 2, &dir.path().join("node")) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(target.key(), sled.key(), "our Message-IDs stay verifiable");
    assert_eq!(ok(target.case(600)), ok(sled.case(600)));
    assert_eq!(
        ok(target.raw(7)).as_deref(),
        Some(&b"raw bytes of message 7"[..])
    );
    assert_eq!(ok(target.outbox_pending()).len(), 1);
    assert_eq!(ok(target.each_fact(None, true, |_| ())), 1200);
    // Run again at once: nothing to do, the contents agree.
    assert!(ok(sled.copy_into(&target)).already_done);
    let next = ok(target.transact(|tx| tx.next_id(Sequence::Case)));
    assert_eq!(next, 2, "numbering goes on");
    // Once the target has moved on (a new case), copying is refused.
    ok(target.transact(|tx| tx.put_case(&mut case(1201, "T1", 5))));
    assert!(matches!(
        sled.copy_into(&target),
        Err(StoreError::Migrate(_))
    ));
}

/// Every key and whole value of a key space, without the copy's
/// progress marks.
fn tree_rows(s: &Store, tree: Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
    if matches!(tree, Tree::Facts | Tree::Meta) && s.db.is_local() {
        // sled's buckets as the rows PostgreSQL keeps, one per case (and
        // the index version saying so).
        return s.source_rows(tree, &[]).map(ok).collect();
    }
    let mut rows = Vec::new();
    for r in s.db.range(tree, &[], None) {
        let (k, _) = ok(r);
        if tree == Tree::Meta && k.starts_with(b"migrate/") {
            continue;
        }
        // Through `get`: sled's raw tree holds where the bytes are.
        let v = ok(s.db.get(tree, &k)).unwrap();
        rows.push((k, v));
    }
    rows
}

#[test]
fn a_resumed_migration_copies_what_changed_in_the_sled_store_meanwhile() {
    // Issue 17 (A): resumed after the sled daemon had run again, the copy
    // kept a changed case's old value and the old case numbering (so the
    // next new case overwrote one), and the counts-only check passed.
    let dir = tempfile::tempdir().unwrap();
    let sled = open_sled(&dir.path().join("sled"));
    let open_case = |tx: &mut Tx<'_>| -> Result<CaseId> {
        let id = tx.next_id(Sequence::Case)?;
        tx.put_case(&mut case(id, "T1", id as i64))?;
        Ok(id)
    };
    ok(sled.transact(|tx| {
        for _ in 0..3 {
            open_case(tx)?;
        }
        tx.put_message(&record(7, 3, "m@x", "h"), b"raw bytes of message 7")?;
        Ok(())
    }));
    let gone = |v: Option<&[u8]>| {
        let op = (Tree::Meta, b"test/gone".to_vec(), v.map(Arc::from));
        ok(sled.db.commit(&[op], &Default::default(), None));
    };
    gone(Some(b"x"));
    let pg = crate::testing::Postgres::start();
    let target = pg_store(&pg, "resumed", &dir.path().join("node"));
    // Interrupted after the first key spaces: the meta (with the case
    // numbering) and the cases.
    ok(sled.copy_tree(&target, Tree::Meta, "meta"));
    ok(sled.copy_tree(&target, Tree::Cases, "cases"));
    // The sled daemon runs again meanwhile: a case changes, a case opens,
    // a record goes.
    ok(sled.transact(|tx| {
        let mut c = tx.case(2)?.unwrap();
        c.subject = "changed".into();
        tx.put_case(&mut c)?;
        assert_eq!(open_case(tx)?, 4);
        Ok(())
    }));
    gone(None);
    let copied = ok(sled.copy_into(&target));
    assert!(!copied.already_done);
    assert!(copied.reconciled >= 3, "{copied:?}");
    for (tree, name) in TREES {
        assert!(
            tree_rows(&sled, tree) == tree_rows(&target, tree),
            "{name} differs"
        );
    }
    // Run again at once: the contents agree, nothing to do.
    assert!(ok(sled.copy_into(&target)).already_done);
    // The daemon on PostgreSQL goes on: the changed case as changed, and
    // a new case gets a number of its own.
    drop(target);
    let target = pg_store(&pg, "resumed", &dir.path().join("node"));
    assert_eq!(ok(target.case(2)).unwrap().subject, "changed");
    let next = ok(target.transact(|tx| {
        let id = tx.next_id(Sequence::Case)?;
        tx.put_case(&mut case(id, "T2", 50))?;
        Ok(id)
    }));
    assert_eq!(next, 5, "numbering goes on after the sled store's");
    for id in 1..=4 {
        assert_eq!(ok(target.case(id)), ok(sled.case(id)), "case {id}");
    }
    // Now the copy has moved on: refused, nothing overwritten.
    assert!(matches!(
        sled.copy_into(&target),
        Err(StoreError::Migrate(_))
    ));
    assert_eq!(ok(target.case(next)).unwrap().tier, "T2");
}

#[test]
fn a_mail_in_the_sled_sent_journal_is_not_pending_after_store_migrate() {
    // Issue 17 (A): the sled daemon's sent journal (mail the SMTP server
    // accepted just before it stopped) was left behind, so the copy had
    // the mail pending and the daemon on PostgreSQL sent it again.
    let dir = tempfile::tempdir().unwrap();
    let sled = open_sled(&dir.path().join("sled"));
    ok(sled.transact(|tx| {
        tx.put_case(&mut case(1, "T1", 1))?;
        tx.put_outbox(&outbox(4, OutboxState::Pending), Some(b"the mail"))?;
        tx.put_outbox(&outbox(5, OutboxState::Pending), Some(b"another"))
    }));
    let journal = sled.path().join("sent.journal");
    std::fs::write(&journal, "4\n").unwrap();
    let pg = crate::testing::Postgres::start();
    let target = pg_store(&pg, "journal", &dir.path().join("node"));
    if let Err(e) = crate::app::migrate_from_sled(&sled, &target) {
        panic!("{e:#}");
    }
    let pending: Vec<u64> = ok(target.outbox_pending()).iter().map(|e| e.id).collect();
    assert_eq!(pending, [5], "the journaled mail is sent, the other not");
    assert_eq!(
        ok(target.outbox_entry(4)).map(|e| e.state),
        Some(OutboxState::Sent)
    );
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), "");
}
