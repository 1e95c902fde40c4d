//! Reading ahead for a chunk of messages on a shared engine: what
//! ingesting them will look up (their Message-IDs, the cases that hold
//! the ones they cite and those cases' rows, their senders' cases,
//! languages and recent automatic mail) is read in one round trip per
//! index before the first is threaded, instead of one round trip per
//! lookup. Profiled on PostgreSQL (bench figure 8): ingest made about
//! nine round trips a message, and the machine sat half idle waiting
//! for them.
//!
//! It only fills the transaction's caches: a key or range it did not
//! guess is read when it is looked up, as before, so what ingest decides
//! never depends on it. The embedded engine reads nothing ahead (a
//! lookup there is a function call).
//!
//! A range read once in a transaction is not read again: a later lookup
//! of the same range, or of a later start in it (the auto-reply window
//! as the clock moves), is answered from what was read, with this
//! transaction's own writes laid over it as before. Ranges are indexes
//! nobody locks, so a read earlier in the transaction sees what a read
//! later would have, but for another node's commit in between; that
//! race was there before (two nodes threading at once), and unique keys
//! settle it at commit.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::codec::{self, Tree};
use super::engine::KeyRange;
use super::tx::Tx;
use super::{id_key, CaseId, Result, MAX_CASES_PER_ID};

/// What one message of a chunk will look up while it is ingested.
#[derive(Debug, Clone, Copy)]
pub struct Lookups<'a> {
    pub message_id: &'a str,
    pub content_hash: &'a str,
    /// The Message-IDs it cites, most recent first (In-Reply-To, then
    /// References backwards), as threading tries them.
    pub cited: &'a [&'a str],
    /// Its sender's address.
    pub sender: &'a str,
    /// Its sender as the automatic-mail limit counts them
    /// ([`crate::suppress::recipient_key`]).
    pub recipient: &'a str,
}

/// The automatic-mail window the chunk's acknowledgements will check:
/// from `since`, up to `at_most` mails a recipient.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub since: DateTime<Utc>,
    pub at_most: usize,
}

/// Cited Message-IDs read ahead per message: threading tries the most
/// recent first and almost always stops there; a hostile References
/// list of thousands is read as it is tried.
const CITED_AHEAD: usize = 8;
/// Cases read ahead per cited Message-ID (the oldest first): one in
/// almost every case, however many a hostile ID is in.
const CASES_AHEAD: usize = 2;
/// A sender's cases read ahead: a customer with more is read when
/// looked up.
const CUSTOMER_CASES_AHEAD: usize = 64;

/// A cached range by its table and end (exclusive; None: the table's).
pub(super) type RangeEnd = (Tree, Option<Vec<u8>>);

/// The keys a range read found from `start`, and how many it asked
/// for (fewer found: every key of the range).
#[derive(Debug)]
pub(super) struct Scanned {
    start: Vec<u8>,
    keys: Vec<Vec<u8>>,
    asked: usize,
}

impl Tx<'_> {
    /// Reads ahead what `mails` will look up (see the module), and the
    /// auto-reply `window` of each sender. An error is the store's, as
    /// the lookups' own would be.
    pub fn read_ahead(&self, mails: &[Lookups<'_>], window: Option<Window>) -> Result<()> {
        if self.store.db.is_local() || mails.is_empty() {
            return Ok(());
        }
        let stored = mails
            .iter()
            .map(|m| codec::message_id_key(m.message_id, m.content_hash));
        self.read_keys_ahead(Tree::MessageIds, stored.collect())?;
        let senders = mails.iter().filter(|m| !m.sender.is_empty());
        let languages = senders
            .clone()
            .map(|m| codec::customer_language_key(m.sender));
        self.read_keys_ahead(Tree::Meta, languages.collect())?;
        let customers = senders.map(|m| codec::pair_key(m.sender, &[]));
        self.scan_prefixes_ahead(Tree::Customers, customers.collect(), CUSTOMER_CASES_AHEAD)?;
        let referred = mails.iter().map(|m| codec::pair_key(m.message_id, &[]));
        let mut candidates =
            self.scan_prefixes_ahead(Tree::Referrers, referred.collect(), MAX_CASES_PER_ID)?;
        let cited = mails
            .iter()
            .flat_map(|m| m.cited.iter().take(CITED_AHEAD))
            .map(|id| codec::pair_key(id, &[]));
        candidates.extend(self.scan_prefixes_ahead(
            Tree::MessageCases,
            cited.collect(),
            MAX_CASES_PER_ID,
        )?);
        self.read_cases_ahead(candidates)?;
        if let Some(w) = window {
            self.scan_windows_ahead(mails, w)?;
        }
        Ok(())
    }

    /// Point keys into the read cache: found, or known missing.
    fn read_keys_ahead(&self, t: Tree, keys: Vec<Vec<u8>>) -> Result<()> {
        let mut seen = HashSet::new();
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|k| {
                let at = (t, k.clone());
                seen.insert(k.clone())
                    && !self.overlay.contains_key(&at)
                    && !self.reads.borrow().contains_key(&at)
            })
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let found: HashMap<Vec<u8>, Vec<u8>> = self
            .store
            .db
            .get_many(t, keys.clone())?
            .into_iter()
            .collect();
        for k in keys {
            let v = found.get(&k).map(Vec::as_slice);
            self.remember((t, k), v);
        }
        Ok(())
    }

    /// Prefix scans of a `message_id \0 case` style index into the range
    /// cache, each up to `limit` keys; returns the first
    /// [`CASES_AHEAD`] case ids each found.
    fn scan_prefixes_ahead(
        &self,
        t: Tree,
        prefixes: Vec<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<CaseId>> {
        let mut seen = HashSet::new();
        let ranges: Vec<KeyRange> = prefixes
            .into_iter()
            .filter(|p| seen.insert(p.clone()))
            .map(|p| {
                let end = codec::prefix_end(&p);
                (p, end)
            })
            .filter(|(p, end)| self.cached(t, p, end.as_deref(), limit).is_none())
            .collect();
        let mut cases = Vec::new();
        for ((start, end), keys) in self.scan_ranges_ahead(t, ranges, limit)? {
            cases.extend(
                keys.iter()
                    .take(CASES_AHEAD)
                    .filter_map(|k| codec::read_u64(&k[start.len()..])),
            );
            self.keep(t, start, end, keys, limit);
        }
        Ok(cases)
    }

    /// Reads `ranges` in one round trip: each with the keys it holds.
    fn scan_ranges_ahead(
        &self,
        t: Tree,
        ranges: Vec<KeyRange>,
        limit: usize,
    ) -> Result<Vec<(KeyRange, Vec<Vec<u8>>)>> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.store.db.ranges(t, ranges.clone(), limit)?;
        Ok(ranges
            .into_iter()
            .zip(rows)
            .map(|(r, rows)| (r, rows.into_iter().map(|(k, _)| k).collect()))
            .collect())
    }

    /// The cases threading will look at, and their facts, read (and
    /// locked, as changing them would) into the read cache: the case a
    /// reply joins is almost always the one that holds what it cites.
    fn read_cases_ahead(&self, ids: Vec<CaseId>) -> Result<()> {
        let cases = ids.iter().map(|id| id_key(*id).to_vec());
        self.read_keys_ahead(Tree::Cases, cases.collect())?;
        let facts = ids.iter().map(|id| super::facts::case_key(*id));
        self.read_keys_ahead(Tree::Facts, facts.collect())
    }

    /// Each sender's automatic mails since the window's start.
    fn scan_windows_ahead(&self, mails: &[Lookups<'_>], w: Window) -> Result<()> {
        let mut seen = HashSet::new();
        let ranges = mails
            .iter()
            .filter(|m| !m.recipient.is_empty() && seen.insert(m.recipient))
            .map(|m| auto_reply_range(m.recipient, w.since))
            .map(|(start, end)| (start, Some(end)))
            .collect();
        for ((start, end), keys) in self.scan_ranges_ahead(Tree::AutoReplies, ranges, w.at_most)? {
            self.keep(Tree::AutoReplies, start, end, keys, w.at_most);
        }
        Ok(())
    }

    /// The keys from `start` to `end` (at most `limit`, in key order)
    /// as the store holds them, read once a transaction on a shared
    /// engine (see the module).
    pub(super) fn scan(
        &self,
        t: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        if let Some(keys) = self.cached(t, start, end, limit) {
            return Ok(keys);
        }
        let keys = self
            .store
            .db
            .range(t, start, end)
            .take(limit)
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<Vec<_>>>()?;
        if !self.store.db.is_local() {
            self.keep(
                t,
                start.to_vec(),
                end.map(<[u8]>::to_vec),
                keys.clone(),
                limit,
            );
        }
        Ok(keys)
    }

    fn keep(
        &self,
        t: Tree,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        keys: Vec<Vec<u8>>,
        asked: usize,
    ) {
        self.scans
            .borrow_mut()
            .insert((t, end), Scanned { start, keys, asked });
    }

    /// A range's keys from what was read of it, if that answers a read
    /// from `start` of up to `limit` keys: read from the same or an
    /// earlier start, and either every key of the range or at least
    /// `limit` from `start` on.
    fn cached(
        &self,
        t: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Option<Vec<Vec<u8>>> {
        let scans = self.scans.borrow();
        let s = scans.get(&(t, end.map(<[u8]>::to_vec)))?;
        if s.start.as_slice() > start {
            return None;
        }
        let from: Vec<Vec<u8>> = s
            .keys
            .iter()
            .filter(|k| k.as_slice() >= start)
            .take(limit)
            .cloned()
            .collect();
        (s.keys.len() < s.asked || from.len() >= limit).then_some(from)
    }
}

/// The auto-reply index's range of `recipient`'s mails since `since`.
pub(super) fn auto_reply_range(recipient: &str, since: DateTime<Utc>) -> (Vec<u8>, Vec<u8>) {
    let from = codec::pair_key(recipient, &since.timestamp_millis().to_be_bytes());
    let mut end = codec::key_text(recipient).into_owned();
    end.push(1);
    (from, end)
}
