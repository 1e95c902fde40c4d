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
    /// `case ++ n`: the events one write of a case added, its n-th
    /// event first (a JSON list: read only to show a case). One record
    /// per write, not per event: a new case adds three or four events.
    History,
    /// `case ++ n`: the key of a case's n-th message.
    CaseMessages,
    /// `message_id \0 case`: the cases holding a message that refers to
    /// this Message-ID (In-Reply-To, References), each once: a reply
    /// that arrives before its original is found by the original.
    Referrers,
}

pub(super) const TREES: [(Tree, &str); 17] = [
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
    (Tree::History, "history"),
    (Tree::CaseMessages, "case_messages"),
    (Tree::Referrers, "referrers"),
];

impl Tree {
    /// Does a record of this key space change once written? Those of the
    /// others (indexes, stored mail, history) are written once and then
    /// only removed, so reading one needs no lock against a change.
    pub(super) fn changes_in_place(self) -> bool {
        matches!(
            self,
            Tree::Meta
                | Tree::Cases
                | Tree::Messages
                | Tree::Cursors
                | Tree::Outbox
                | Tree::Quarantine
                | Tree::Facts
        )
    }

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
/// The longest text (an address, a Message-ID) kept as itself at the
/// front of a key. Longer ones, and any holding a NUL (it would end the
/// text early and share a prefix with another's), are kept as a marker
/// byte and their hash: a sender picks these texts, and PostgreSQL's
/// index refuses a key over about 2.7 KB, which failed the whole commit.
/// Real addresses stop at 254 bytes and Message-IDs at a header line.
pub(super) const KEY_TEXT_MAX: usize = 1024;

/// Starts a hashed key text: 0xFF never occurs in UTF-8, so no text kept
/// as itself can look like one.
const HASHED: u8 = 0xFF;

/// How `text` stands at the front of a key (see [`KEY_TEXT_MAX`]).
pub(super) fn key_text(text: &str) -> std::borrow::Cow<'_, [u8]> {
    key_bytes(text.as_bytes())
}

/// [`key_text`] of a text's bytes (an older key's, read back).
pub(super) fn key_bytes(b: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if b.len() <= KEY_TEXT_MAX && !b.contains(&0) {
        return std::borrow::Cow::Borrowed(b);
    }
    let mut k = Vec::with_capacity(33);
    k.push(HASHED);
    k.extend_from_slice(blake3::hash(b).as_bytes());
    std::borrow::Cow::Owned(k)
}

/// An older release's key whose text it kept as itself though it is too
/// long (or holds a NUL): the key [`key_text`] gives it now. The text is
/// everything before the tail, whose length each key space fixes (None:
/// the last NUL starts it, as in `MessageIds`).
pub(super) fn bounded_key(key: &[u8], tail: Option<usize>) -> Option<Vec<u8>> {
    let sep = match tail {
        Some(n) => key.len().checked_sub(n + 1)?,
        None => key.iter().rposition(|b| *b == 0)?,
    };
    let text = &key[..sep];
    if key.get(sep) != Some(&0)
        || text.first() == Some(&HASHED)
        || (text.len() <= KEY_TEXT_MAX && !text.contains(&0))
    {
        return None;
    }
    let mut k = key_bytes(text).into_owned();
    k.extend_from_slice(&key[sep..]);
    Some(k)
}

pub(super) fn pair_key(text: &str, tail: &[u8]) -> Vec<u8> {
    let mut k = key_text(text).into_owned();
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

/// The first key after every key starting with `prefix` (None: no end).
pub(super) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The language set for a customer, by address lower-cased as ingest
/// keeps it.
pub(super) fn customer_language_key(email: &str) -> Vec<u8> {
    [
        b"customer_language/".as_slice(),
        email.to_lowercase().as_bytes(),
    ]
    .concat()
}

/// The store's key for the cursor of a queue's folder: the folder alone
/// for the queue `default` (as before queues), else queue and folder
/// apart by a NUL, which no IMAP folder name holds.
pub(super) fn cursor_key(queue: &str, folder: &str) -> Vec<u8> {
    if queue == crate::case::DEFAULT_QUEUE {
        folder.as_bytes().to_vec()
    } else {
        format!("{queue}\0{folder}").into_bytes()
    }
}

/// `c` ++ opening time ++ id: where a case's facts were kept before
/// they went into buckets (index version 7); tests write old stores.
#[cfg(test)]
pub(super) fn facts_key(at: DateTime<Utc>, case: CaseId) -> Vec<u8> {
    let mut k = b"c".to_vec();
    k.extend(deadline_key(at, case));
    k
}

/// `u` ++ opening time ++ id: present while the case is unresolved, its
/// value the tier holding it. In opening order, so the unresolved cases
/// opened before a window are one range.
pub(super) fn unresolved_key(at: DateTime<Utc>, case: CaseId) -> Vec<u8> {
    let mut k = b"u".to_vec();
    k.extend(deadline_key(at, case));
    k
}

/// An unresolved-index value: `queue \0 tier`.
pub(super) fn unresolved_entry_value(case: &crate::case::Case) -> Vec<u8> {
    pair_key(&case.queue, case.tier.as_bytes())
}

/// The queue and tier of an unresolved-index value.
pub(super) fn unresolved_value(v: &[u8]) -> (String, String) {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match v.iter().position(|b| *b == 0) {
        Some(i) => (text(&v[..i]), text(&v[i + 1..])),
        None => (crate::case::default_queue(), text(v)),
    }
}

/// An unresolved-index entry: the case's opening time and its value.
pub(super) fn unresolved_entry<'v>(k: &[u8], v: &'v [u8]) -> Option<(DateTime<Utc>, &'v [u8])> {
    Some((deadline_at(k.get(1..)?)?, v))
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

/// `case ++ n`: the n-th item of a case's list (history, messages).
pub(super) fn item_key(case: CaseId, n: u64) -> Vec<u8> {
    let mut k = id_key(case).to_vec();
    k.extend_from_slice(&id_key(n));
    k
}

/// Case records: compact (see [`encode`]). Cases written as JSON by
/// older releases (their history and messages inline) are converted
/// when the store opens: this tells them apart.
pub(super) fn is_legacy_case(value: &[u8]) -> bool {
    value.first() == Some(&b'{')
}

/// The version byte of records in postcard. JSON records (from older
/// releases, and the history's lists of events) start with `{` or `[`.
const COMPACT_V1: u8 = 1;

/// The fields a record gained at its end since the compact encoding
/// began, each None in postcard's one zero byte: the case's `language`
/// and `language_source`, the outgoing mail's `claimed_by`. A record
/// written before them is read with those bytes added; an older release
/// reading a newer record ignores the bytes after the fields it knows
/// (postcard reads no further), so nodes of two releases can share a
/// store while a cluster is upgraded (a case an older node writes loses
/// its language: the customer's next mail chooses it again).
fn fields_added(tree: Tree) -> usize {
    match tree {
        Tree::Cases => 2,
        Tree::Outbox => 1,
        _ => 0,
    }
}

/// A record in the compact encoding: [`COMPACT_V1`], then postcard.
pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(value, vec![COMPACT_V1])
        .map_err(|e| StoreError::EncodeBinary(e.to_string()))
}

/// A record as JSON: for the history's events, whose kinds are told
/// apart by name (postcard cannot read a tagged enum).
pub(super) fn encode_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
}

/// A record in either encoding.
pub(super) fn decode<T: DeserializeOwned>(
    tree: Tree,
    key: &[u8],
    value: &[u8],
) -> Result<T, StoreError> {
    let name = || format!("{tree:?}/{}", printable_key(key));
    match value.split_first() {
        Some((&COMPACT_V1, rest)) => match postcard::from_bytes(rest) {
            Ok(v) => Ok(v),
            // A record from before its last fields: exactly those read
            // as None; any other short record is malformed, never a
            // default.
            Err(postcard::Error::DeserializeUnexpectedEnd) if fields_added(tree) > 0 => {
                let mut padded = rest.to_vec();
                padded.resize(rest.len() + fields_added(tree), 0);
                match postcard::take_from_bytes(&padded) {
                    Ok((v, [])) => Ok(v),
                    _ => Err(StoreError::Malformed { key: name() }),
                }
            }
            Err(_) => Err(StoreError::Malformed { key: name() }),
        },
        Some((b'{' | b'[', _)) => {
            serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
                key: name(),
                source,
            })
        }
        _ => Err(StoreError::Malformed { key: name() }),
    }
}

/// A key as text for an error: numbers as numbers.
fn printable_key(key: &[u8]) -> String {
    match read_u64(key) {
        Some(n) => n.to_string(),
        None => String::from_utf8_lossy(key).into_owned(),
    }
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

/// The per-case facts are read a million at a time by `stats`: they are
/// kept in a compact binary form written by hand (dates as milliseconds;
/// postcard would keep chrono's dates as text, slower to read back).
/// Version 2 adds the queue at the end, version 3 the bounce count after
/// it; versions 1 (no queue: `default`) and 2 (no bounces: 0) and facts
/// written as JSON by older releases are still read.
pub(super) mod facts {
    use chrono::{DateTime, Utc};

    use crate::case::{Reason, Status};
    use crate::stats::{Facts, Stint};

    const V1: u8 = 1;
    const V2: u8 = 2;
    const V3: u8 = 3;

    struct Writer(Vec<u8>);

    impl Writer {
        fn u8(&mut self, v: u8) {
            self.0.push(v);
        }
        fn u64(&mut self, v: u64) {
            self.0.extend_from_slice(&v.to_be_bytes());
        }
        fn time(&mut self, t: DateTime<Utc>) {
            self.0
                .extend_from_slice(&t.timestamp_millis().to_be_bytes());
        }
        fn opt_time(&mut self, t: Option<DateTime<Utc>>) {
            match t {
                Some(t) => {
                    self.u8(1);
                    self.time(t);
                }
                None => self.u8(0),
            }
        }
        fn str(&mut self, s: &str) {
            // Longer texts are cut at a character boundary: facts hold
            // names and short subjects.
            let mut end = s.len().min(u16::MAX as usize);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.0.extend_from_slice(&(end as u16).to_be_bytes());
            self.0.extend_from_slice(&s.as_bytes()[..end]);
        }
        fn count(&mut self, n: usize) {
            self.0
                .extend_from_slice(&(n.min(u16::MAX as usize) as u16).to_be_bytes());
        }
    }

    pub(in crate::store) fn encode(f: &Facts) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(128));
        w.u8(V3);
        w.u64(f.id);
        w.str(&f.customer);
        w.str(&f.subject);
        w.time(f.created_at);
        w.u8(match f.status {
            Status::Open => 0,
            Status::Answered => 1,
            Status::Resolved => 2,
        });
        w.str(&f.tier);
        w.u8(f.repeat_customer as u8);
        w.opt_time(f.first_answer_at);
        w.opt_time(f.resolved_at);
        w.u8(f.csat.unwrap_or(0));
        let stints = &f.stints[..f.stints.len().min(u16::MAX as usize)];
        w.count(stints.len());
        for s in stints {
            w.str(&s.tier);
            w.time(s.from);
            w.opt_time(s.first_answer);
            match s.left {
                Some((at, reason)) => {
                    w.u8(1);
                    w.time(at);
                    w.u8(match reason {
                        Reason::Stale => 0,
                        Reason::RepeatCustomer => 1,
                        Reason::Trigger => 2,
                        Reason::Manual => 3,
                    });
                }
                None => w.u8(0),
            }
            w.u8(s.deadline_missed as u8);
        }
        let triggers = &f.triggers[..f.triggers.len().min(u16::MAX as usize)];
        w.count(triggers.len());
        for t in triggers {
            w.str(t);
        }
        w.str(&f.queue);
        w.0.extend_from_slice(&f.bounces.to_be_bytes());
        w.0
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
            self.0 = rest;
            Some(head)
        }
        fn u8(&mut self) -> Option<u8> {
            self.take(1).map(|b| b[0])
        }
        fn u16(&mut self) -> Option<usize> {
            Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize)
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
        }
        fn time(&mut self) -> Option<DateTime<Utc>> {
            let ms = i64::from_be_bytes(self.take(8)?.try_into().ok()?);
            DateTime::from_timestamp_millis(ms)
        }
        fn opt_time(&mut self) -> Option<Option<DateTime<Utc>>> {
            match self.u8()? {
                0 => Some(None),
                1 => Some(Some(self.time()?)),
                _ => None,
            }
        }
        fn skip_str(&mut self) -> Option<()> {
            let n = self.u16()?;
            self.take(n).map(|_| ())
        }
        fn str_into(&mut self, s: &mut String) -> Option<()> {
            let n = self.u16()?;
            let text = std::str::from_utf8(self.take(n)?).ok()?;
            s.clear();
            s.push_str(text);
            Some(())
        }
    }

    /// None when the bytes are not facts of version 1, 2 or 3.
    pub(in crate::store) fn decode(bytes: &[u8]) -> Option<Facts> {
        let mut f = empty();
        decode_into(bytes, &mut f, false)?;
        Some(f)
    }

    /// Facts to decode into ([`decode_into`] overwrites every field).
    pub(in crate::store) fn empty() -> Facts {
        Facts {
            id: 0,
            queue: String::new(),
            customer: String::new(),
            subject: String::new(),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            status: Status::Open,
            tier: String::new(),
            repeat_customer: false,
            first_answer_at: None,
            resolved_at: None,
            csat: None,
            stints: Vec::new(),
            triggers: Vec::new(),
            bounces: 0,
        }
    }

    /// Decodes into `f`, reusing its strings and lists: `stats` decodes
    /// a million facts, and allocating each anew was a third of its time.
    /// With `kpis_only`, the customer and subject (which no KPI reads)
    /// are skipped and left empty.
    // Long: one field after another in the encoded order, kept in one loop body because it is the hot path of `stats` over a million cases.
    pub(in crate::store) fn decode_into(
        bytes: &[u8],
        f: &mut Facts,
        kpis_only: bool,
    ) -> Option<()> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if !matches!(version, V1 | V2 | V3) {
            return None;
        }
        f.id = r.u64()?;
        if kpis_only {
            r.skip_str()?;
            r.skip_str()?;
        } else {
            r.str_into(&mut f.customer)?;
            r.str_into(&mut f.subject)?;
        }
        f.created_at = r.time()?;
        f.status = match r.u8()? {
            0 => Status::Open,
            1 => Status::Answered,
            2 => Status::Resolved,
            _ => return None,
        };
        r.str_into(&mut f.tier)?;
        f.repeat_customer = r.u8()? != 0;
        f.first_answer_at = r.opt_time()?;
        f.resolved_at = r.opt_time()?;
        f.csat = Some(r.u8()?).filter(|v| *v != 0);
        let n = r.u16()?;
        f.stints.truncate(n);
        for i in 0..n {
            if i == f.stints.len() {
                f.stints.push(Stint {
                    tier: String::new(),
                    from: DateTime::<Utc>::UNIX_EPOCH,
                    first_answer: None,
                    left: None,
                    deadline_missed: false,
                });
            }
            let s = &mut f.stints[i];
            r.str_into(&mut s.tier)?;
            s.from = r.time()?;
            s.first_answer = r.opt_time()?;
            s.left = match r.u8()? {
                0 => None,
                1 => {
                    let at = r.time()?;
                    let reason = match r.u8()? {
                        0 => Reason::Stale,
                        1 => Reason::RepeatCustomer,
                        2 => Reason::Trigger,
                        3 => Reason::Manual,
                        _ => return None,
                    };
                    Some((at, reason))
                }
                _ => return None,
            };
            s.deadline_missed = r.u8()? != 0;
        }
        let n = r.u16()?;
        f.triggers.truncate(n);
        for i in 0..n {
            if i == f.triggers.len() {
                f.triggers.push(String::new());
            }
            r.str_into(&mut f.triggers[i])?;
        }
        match version {
            V1 => {
                f.queue.clear();
                f.queue.push_str(crate::case::DEFAULT_QUEUE);
            }
            _ => r.str_into(&mut f.queue)?,
        }
        f.bounces = match version {
            V3 => u32::from_be_bytes(r.take(4)?.try_into().ok()?),
            _ => 0,
        };
        r.0.is_empty().then_some(())
    }
}
