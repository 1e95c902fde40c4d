//! How records and keys are laid out: the trees, the key of every index
//! (big-endian numbers, so range scans come out in order), and the record
//! encoding. Only the store's modules read this.

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Serialize};

use super::StoreError;
use crate::case::CaseId;

/// The key spaces, one sled tree each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Tree {
    Meta,
    Cases,
    Messages,
    Raw,
    MessageIds,
    Cursors,
    Outbox,
    Quarantine,
    Customers,
    AutoReplies,
    Deadlines,
    /// Ids of outbox entries still to send, so a drain never scans the
    /// whole (mostly sent) outbox.
    OutboxPending,
    /// Compact per-case facts for KPIs, keyed by opening time, and the
    /// set of unresolved cases: `stats` reads these, never whole cases.
    Facts,
    /// `message_id \0 case`: the cases holding a Message-ID in case
    /// (= age) order, each once, whatever the messages' contents.
    MessageCases,
}

pub(super) const TREES: [(Tree, &str); 14] = [
    (Tree::Meta, "meta"),
    (Tree::Cases, "cases"),
    (Tree::Messages, "messages"),
    (Tree::Raw, "raw"),
    (Tree::MessageIds, "message_ids"),
    (Tree::Cursors, "cursors"),
    (Tree::Outbox, "outbox"),
    (Tree::Quarantine, "quarantine"),
    (Tree::Customers, "customers"),
    (Tree::AutoReplies, "auto_replies"),
    (Tree::Deadlines, "deadlines"),
    (Tree::OutboxPending, "outbox_pending"),
    (Tree::Facts, "facts"),
    (Tree::MessageCases, "message_cases"),
];

impl Tree {
    pub(super) fn index(self) -> usize {
        TREES.iter().position(|(t, _)| *t == self).unwrap_or(0)
    }
}

/// Meta keys `open/<tier>`: how many unresolved cases the tier holds.
pub(super) const OPEN_PREFIX: &[u8] = b"open/";

pub(super) fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub(super) fn read_u64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

/// `text \0 bytes`: a text key with something after it.
pub(super) fn pair_key(text: &str, tail: &[u8]) -> Vec<u8> {
    let mut k = text.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(tail);
    k
}

/// Index key of a message ID; the suffix tells copies apart.
pub(super) fn message_id_key(message_id: &str, suffix: &str) -> Vec<u8> {
    pair_key(message_id, suffix.as_bytes())
}

pub(super) fn customer_key(email: &str, case: CaseId) -> Vec<u8> {
    pair_key(email, &id_key(case))
}

/// Deadline index key: time first, so a range scan is in time order.
pub(super) fn deadline_key(at: DateTime<Utc>, case: CaseId) -> Vec<u8> {
    let mut k = at.timestamp_millis().to_be_bytes().to_vec();
    // Flip the sign bit so negative times still sort first.
    k[0] ^= 0x80;
    k.extend_from_slice(&id_key(case));
    k
}

/// The time of a deadline key.
pub(super) fn deadline_at(k: &[u8]) -> Option<DateTime<Utc>> {
    let mut b = <[u8; 8]>::try_from(k.get(..8)?).ok()?;
    b[0] ^= 0x80;
    DateTime::from_timestamp_millis(i64::from_be_bytes(b))
}

pub(super) fn auto_reply_key(email: &str, at: DateTime<Utc>, outbox: u64) -> Vec<u8> {
    let mut k = pair_key(email, &at.timestamp_millis().to_be_bytes());
    k.extend_from_slice(&id_key(outbox));
    k
}

/// `c` ++ opening time ++ id: a window of cases is one range.
pub(super) fn facts_key(at: DateTime<Utc>, case: CaseId) -> Vec<u8> {
    let mut k = b"c".to_vec();
    k.extend(deadline_key(at, case));
    k
}

/// `u` ++ id: present while the case is unresolved.
pub(super) fn unresolved_key(case: CaseId) -> Vec<u8> {
    let mut k = b"u".to_vec();
    k.extend_from_slice(&id_key(case));
    k
}

/// An unresolved-index entry: the case's opening time and id.
pub(super) fn unresolved_entry(k: &[u8], v: &[u8]) -> Option<(DateTime<Utc>, CaseId)> {
    let id = read_u64(k.get(1..9)?)?;
    let ms = i64::from_be_bytes(<[u8; 8]>::try_from(v.get(..8)?).ok()?);
    Some((DateTime::from_timestamp_millis(ms)?, id))
}

pub(super) fn quarantine_raw_key(id: u64) -> Vec<u8> {
    let mut k = id_key(id).to_vec();
    k.extend_from_slice(b"raw");
    k
}

/// Where an outgoing mail's bytes are, in the raw tree.
pub(super) fn outbox_raw_key(id: u64) -> Vec<u8> {
    let mut k = b"out".to_vec();
    k.extend_from_slice(&id_key(id));
    k
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
}

pub(super) fn decode<T: DeserializeOwned>(
    tree: Tree,
    key: &[u8],
    value: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: format!("{tree:?}/{}", String::from_utf8_lossy(key)),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_keys_sort_by_time() {
        let a = DateTime::from_timestamp(1_000, 0).unwrap();
        let b = DateTime::from_timestamp(2_000, 0).unwrap();
        let early = DateTime::from_timestamp(-5, 0).unwrap();
        assert!(deadline_key(a, 99) < deadline_key(b, 1));
        assert!(deadline_key(early, 99) < deadline_key(a, 1));
        assert_eq!(deadline_at(&deadline_key(early, 3)), Some(early));
    }
}
