//! The fetch planning over a folder in memory.

use super::super::memfolder::MemFolder;
use super::*;

fn block<T>(fut: impl std::future::Future<Output = T>) -> T {
    match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => panic!("runtime: {e}"),
    }
}

#[test]
fn new_uids_are_sorted_and_start_at_the_cursor() {
    // `5:*` on a folder whose last UID is 3 answers 3.
    assert_eq!(new_uids(vec![3], 5), Vec::<u32>::new());
    assert_eq!(new_uids(vec![9, 5, 7, 9], 5), vec![5, 7, 9]);
}

#[test]
fn a_message_over_the_size_limit_is_fetched_as_its_header_with_its_size() {
    let mut f = MemFolder::with(3, 200);
    f.messages
        .insert(2, super::super::tests::mail_of_size(2, 5000));
    let got = block(chunk(&mut f, &[1, 2, 3], 1000)).unwrap();
    assert_eq!(
        f.fetches(),
        vec![
            ("Whole".to_string(), vec![1, 3]),
            ("Header".to_string(), vec![2])
        ]
    );
    let (raw, truncated) = &got.bodies[&2];
    assert_eq!(*truncated, Some(f.messages[&2].len() as u64));
    assert!(
        raw.ends_with(b"\r\n\r\n") && raw.len() < 400,
        "only the header"
    );
    assert_eq!(got.bodies[&1].1, None);
    assert!(got.refused.is_empty());
}

#[test]
fn rounds_hold_at_most_chunk_bytes_and_a_bigger_message_goes_alone() {
    let mb = 1 << 20;
    let sized = [(1, 20 * mb), (2, 20 * mb), (3, 40 * mb), (4, 1), (5, 1)];
    assert_eq!(
        rounds(sized.into_iter()),
        vec![vec![1], vec![2], vec![3], vec![4, 5]]
    );
    assert_eq!(rounds(std::iter::empty()), Vec::<Vec<u32>>::new());
}

#[test]
fn a_refused_message_is_tried_alone_then_set_aside_and_the_rest_are_fetched() {
    let mut f = MemFolder::with(5, 100);
    f.refuse.insert(3);
    let got = block(chunk(&mut f, &[1, 2, 3, 4, 5], 1 << 20)).unwrap();
    let mut fetched: Vec<u32> = got.bodies.keys().copied().collect();
    fetched.sort_unstable();
    assert_eq!(fetched, vec![1, 2, 4, 5]);
    assert!(
        got.refused[&3].contains("cannot read message"),
        "{:?}",
        got.refused
    );
    let alone = f.fetches().iter().filter(|(_, u)| u == &vec![3]).count();
    assert_eq!(alone, FETCH_ATTEMPTS as usize, "{:?}", f.log);
}

#[test]
fn a_refused_message_that_was_expunged_meanwhile_is_not_quarantined() {
    let mut f = MemFolder::with(2, 100);
    f.refuse.insert(2);
    // The server refuses it, and by the time it is asked it is gone.
    f.messages.remove(&2);
    let got = block(chunk(&mut f, &[1, 2], 1 << 20)).unwrap();
    assert!(got.refused.is_empty());
    assert_eq!(got.bodies.len(), 1);
}

#[test]
fn a_hang_up_is_returned_not_hidden() {
    let mut f = MemFolder::with(3, 100);
    f.hang_up.insert(2);
    let e = block(chunk(&mut f, &[1, 2, 3], 1 << 20)).unwrap_err();
    assert!(matches!(e, ImapError::Closed), "{e:?}");
}

#[test]
fn chunks_that_keep_failing_narrow_to_one_uid_and_the_uid_is_given_up() {
    let t = Troubles::default();
    let uids: Vec<u32> = (1..=500).collect();
    assert_eq!(t.step("INBOX", 7, &uids), Step::Fetch(CHUNK));
    let chunk: Vec<u32> = (1..=200).collect();
    for _ in 0..FETCH_ATTEMPTS {
        assert_eq!(t.step("INBOX", 7, &uids), Step::Fetch(CHUNK));
        t.failed("INBOX", 7, &chunk, &ImapError::Closed);
    }
    // Within the chunk that failed: one at a time.
    assert_eq!(t.step("INBOX", 7, &uids), Step::Fetch(1));
    assert_eq!(t.step("INBOX", 7, &uids[199..]), Step::Fetch(1));
    assert_eq!(t.step("INBOX", 7, &uids[200..]), Step::Fetch(CHUNK));
    // Another folder, or the folder renumbered: not affected.
    assert_eq!(t.step("Sent", 7, &uids), Step::Fetch(CHUNK));
    assert_eq!(t.step("INBOX", 8, &uids), Step::Fetch(CHUNK));
    // UID 1 alone fails as often: given up, with the error.
    for _ in 0..FETCH_ATTEMPTS {
        t.failed("INBOX", 7, &[1], &ImapError::Closed);
    }
    match t.step("INBOX", 7, &uids) {
        Step::GiveUp(e) => assert!(e.contains("closed the connection"), "{e}"),
        other => panic!("{other:?}"),
    }
    t.gave_up("INBOX");
    assert_eq!(t.step("INBOX", 7, &uids[1..]), Step::Fetch(1));
    // Fetched past the troubled range: whole chunks again.
    t.fetched("INBOX", 200);
    assert!(!t.any());
    assert_eq!(t.step("INBOX", 7, &uids[200..]), Step::Fetch(CHUNK));
}

#[test]
fn a_failure_elsewhere_starts_the_count_again() {
    let t = Troubles::default();
    let uids: Vec<u32> = (1..=10).collect();
    t.failed("INBOX", 7, &uids, &ImapError::Closed);
    t.failed("INBOX", 7, &uids, &ImapError::Closed);
    // A failure starting at another UID: the count restarts there.
    t.failed("INBOX", 7, &uids[5..], &ImapError::Closed);
    t.failed("INBOX", 7, &uids, &ImapError::Closed);
    assert_eq!(
        t.step("INBOX", 7, &uids),
        Step::Fetch(10),
        "not narrowed yet"
    );
}
