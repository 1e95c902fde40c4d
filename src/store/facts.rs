//! The KPI facts of every case, and the index of unresolved cases.
//!
//! `stats` reads the facts of every case in its window: a million cases
//! in about a second. sled's iterator walks down the tree again for every
//! item (about 2 µs each) and pages every byte in from its log (the page
//! cache is small), so the facts are not one record per case but packed,
//! compressed, in buckets of [`BUCKET`] consecutive cases, `b ++ id /
//! BUCKET`: a million cases are 15,625 records of a few KB. A bucket's
//! header says the opening times it spans, so a window skips the buckets
//! before it without decoding them. A case write rewrites its bucket; a
//! chunk of messages writes each bucket it touched once.
//!
//! `u ++ opening time ++ id` → `queue \0 tier` is present while a case is
//! unresolved: open cases by age without decoding facts. The per-tier
//! open counts (meta `open/<tier>`) are kept in step with it.
//!
//! On PostgreSQL the facts are one row per case, `k ++ id`, with typed
//! columns (`columns.rs`): the KPIs are counted in SQL
//! (`postgres/kpis.rs`), a dashboard reads the same rows, and two nodes
//! writing neighbouring cases never wait on one bucket. There is no
//! unresolved index nor count there: the rows' status column is indexed.
//! A store of an earlier version has its buckets turned into rows when a
//! node opens it ([`per_case_rows`]).

use chrono::{DateTime, Utc};

use super::codec::{self, read_u64, Tree};
use super::engine::Db;
use super::{Result, Store, StoreError, Tx};
use crate::case::{Case, CaseId, Status};
use crate::stats::{self, Facts, OpenCase, Order, Report, Tally};

/// Marks a facts bucket whose cases' facts are to be made again.
pub(super) const LOST_FACTS: &[u8] = b"facts-lost/";

/// Cases per facts bucket.
pub(super) const BUCKET: u64 = 64;
/// Buckets are lz4-compressed after their header: the facts of 64
/// neighbouring cases repeat tier and queue names and nearby times, and
/// `stats` time is mostly sled paging bytes in, so fewer bytes read is
/// what makes it fast. lz4_flex: pure Rust, no unsafe with these
/// features, decompresses at GB/s.
const BUCKET_LZ4: u8 = 2;
/// Most bytes a bucket's entries may claim to decompress to: a corrupt
/// length must not make us allocate gigabytes.
const MAX_BUCKET_BYTES: usize = 8 << 20;

fn bucket_key(case: CaseId) -> Vec<u8> {
    let mut k = b"b".to_vec();
    k.extend_from_slice(&(case / BUCKET).to_be_bytes());
    k
}

/// A case's facts row on PostgreSQL.
pub(super) fn case_key(case: CaseId) -> Vec<u8> {
    let mut k = b"k".to_vec();
    k.extend_from_slice(&case.to_be_bytes());
    k
}

/// A facts record of any earlier layout as the per-case rows PostgreSQL
/// keeps (`k ++ id` → compact facts): a bucket gives its cases, a
/// one-case record of before buckets its case, an unresolved-index entry
/// nothing (the rows' status says it). Used by every way a store reaches
/// PostgreSQL: the conversion of an older store, `store migrate
/// --from-sled`, a store of version 3 opened.
pub(super) fn per_case_rows(key: &[u8], value: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    match key.first() {
        Some(b'b') => decode_bucket(key, value)?
            .into_iter()
            .map(|e| {
                let facts = decode_facts(key, &e.facts)?;
                Ok((case_key(e.id), codec::facts::encode(&facts)))
            })
            .collect(),
        Some(b'c') => {
            let facts = decode_facts(key, value)?;
            Ok(vec![(case_key(facts.id), codec::facts::encode(&facts))])
        }
        Some(b'k') => Ok(vec![(key.to_vec(), value.to_vec())]),
        _ => Ok(Vec::new()),
    }
}

/// One case's entry in a bucket.
struct Entry {
    id: CaseId,
    created_ms: i64,
    /// The facts in their compact encoding ([`codec::facts`]).
    facts: Vec<u8>,
}

/// Bucket: version, earliest and latest opening time (ms), count, then
/// compressed: per case, id, opening time, length, facts. Entries in
/// case order.
fn encode_bucket(entries: &[Entry]) -> Vec<u8> {
    let min = entries.iter().map(|e| e.created_ms).min().unwrap_or(0);
    let max = entries.iter().map(|e| e.created_ms).max().unwrap_or(0);
    let size: usize = entries.iter().map(|e| 20 + e.facts.len()).sum();
    let mut body = Vec::with_capacity(size);
    for e in entries {
        body.extend_from_slice(&e.id.to_be_bytes());
        body.extend_from_slice(&e.created_ms.to_be_bytes());
        body.extend_from_slice(&(e.facts.len() as u32).to_be_bytes());
        body.extend_from_slice(&e.facts);
    }
    let packed = lz4_flex::block::compress_prepend_size(&body);
    let mut v = Vec::with_capacity(19 + packed.len());
    v.push(BUCKET_LZ4);
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    v.extend_from_slice(&packed);
    v
}

/// Calls `f(id, opening ms, facts bytes)` for each entry opened at or
/// after `since_ms`; None when the bucket is malformed. `buf` holds the
/// decompressed entries (reused from bucket to bucket).
fn each_entry(
    v: &[u8],
    since_ms: i64,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(CaseId, i64, &[u8]) -> Result<()>,
) -> Option<Result<()>> {
    let (&version, rest) = v.split_first()?;
    if version != BUCKET_LZ4 {
        return None;
    }
    let max = i64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    if max < since_ms {
        return Some(Ok(()));
    }
    let n = u16::from_be_bytes(rest.get(16..18)?.try_into().ok()?);
    let packed = rest.get(18..)?;
    let claimed = u32::from_le_bytes(packed.get(..4)?.try_into().ok()?) as usize;
    if claimed > MAX_BUCKET_BYTES {
        return None;
    }
    buf.clear();
    buf.resize(claimed, 0);
    let got = lz4_flex::block::decompress_into(packed.get(4..)?, buf).ok()?;
    let body = buf.get(..got)?;
    let mut at = 0;
    for _ in 0..n {
        let id = read_u64(body.get(at..at + 8)?)?;
        let created = i64::from_be_bytes(body.get(at + 8..at + 16)?.try_into().ok()?);
        let len = u32::from_be_bytes(body.get(at + 16..at + 20)?.try_into().ok()?) as usize;
        let facts = body.get(at + 20..at + 20 + len)?;
        at += 20 + len;
        if created >= since_ms {
            if let Err(e) = f(id, created, facts) {
                return Some(Err(e));
            }
        }
    }
    (at == body.len()).then_some(Ok(()))
}

fn decode_bucket(key: &[u8], v: &[u8]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let ok = each_entry(v, i64::MIN, &mut buf, |id, created_ms, facts| {
        out.push(Entry {
            id,
            created_ms,
            facts: facts.to_vec(),
        });
        Ok(())
    });
    match ok {
        Some(r) => r.map(|()| out),
        None => Err(malformed(key)),
    }
}

fn malformed(key: &[u8]) -> StoreError {
    StoreError::Malformed {
        key: format!("Facts/{}", String::from_utf8_lossy(key)),
    }
}

/// Facts in the compact form, or as JSON from an older release.
pub(super) fn decode_facts(key: &[u8], value: &[u8]) -> Result<Facts> {
    if value.first() == Some(&b'{') {
        return codec::decode(Tree::Facts, key, value);
    }
    codec::facts::decode(value).ok_or_else(|| malformed(key))
}

impl Store {
    /// Calls `f` with the facts of every case opened at or after `since`
    /// (all with None), in case order; returns how many. The facts are
    /// decoded into one value that is reused: copy what must outlive
    /// the call. With `kpis_only`, `customer` and `subject` are left
    /// empty (`stats` reads neither).
    pub fn each_fact(
        &self,
        since: Option<DateTime<Utc>>,
        kpis_only: bool,
        mut f: impl FnMut(&Facts),
    ) -> Result<usize> {
        let mut facts = codec::facts::empty();
        let mut n = 0;
        if let Db::Postgres(pg) = &self.db {
            let mut after = b"k".to_vec();
            loop {
                let page = pg.facts_page((since, None), after.clone())?;
                let Some((last, _)) = page.last() else {
                    return Ok(n);
                };
                after = last.clone();
                for (k, v) in &page {
                    codec::facts::decode_into(v, &mut facts, kpis_only)
                        .ok_or_else(|| malformed(k))?;
                    f(&facts);
                    n += 1;
                }
            }
        }
        let since_ms = since.map_or(i64::MIN, |t| t.timestamp_millis());
        let mut buf = Vec::new();
        for r in self.db.prefix(Tree::Facts, b"b") {
            let (k, v) = r?;
            let done = each_entry(&v, since_ms, &mut buf, |_, _, bytes| {
                codec::facts::decode_into(bytes, &mut facts, kpis_only)
                    .ok_or_else(|| malformed(&k))?;
                f(&facts);
                n += 1;
                Ok(())
            });
            done.ok_or_else(|| malformed(&k))??;
        }
        Ok(n)
    }

    /// The facts of the cases opened at or after `since`, in case order
    /// (for small windows; `stats` uses [`Store::each_fact`]).
    pub fn facts_since(&self, since: Option<DateTime<Utc>>) -> Result<Vec<Facts>> {
        let mut out = Vec::new();
        self.each_fact(since, false, |f| out.push(f.clone()))?;
        Ok(out)
    }

    /// Facts of every unresolved case, oldest first.
    pub fn unresolved_facts(&self) -> Result<Vec<Facts>> {
        if let Db::Postgres(pg) = &self.db {
            return pg
                .unresolved_rows(None)?
                .iter()
                .map(|(k, v)| decode_facts(k, v))
                .collect();
        }
        let mut out = Vec::new();
        for r in self.db.prefix(Tree::Facts, b"u") {
            let (k, _) = r?;
            let Some(id) = k.get(9..17).and_then(read_u64) else {
                continue;
            };
            let key = bucket_key(id);
            let Some(v) = self.db.get(Tree::Facts, &key)? else {
                continue;
            };
            if let Some(e) = decode_bucket(&key, &v)?.into_iter().find(|e| e.id == id) {
                out.push(decode_facts(&key, &e.facts)?);
            }
        }
        Ok(out)
    }

    /// The queue, tier and opening time of every unresolved case opened
    /// before `before` (all with None), oldest first, without decoding
    /// facts.
    pub fn unresolved(
        &self,
        before: Option<DateTime<Utc>>,
    ) -> Box<dyn Iterator<Item = Result<OpenCase>> + '_> {
        if let Db::Postgres(pg) = &self.db {
            return match pg.unresolved_cases(before) {
                Ok(open) => Box::new(open.into_iter().map(Ok)),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
        }
        let end = match before {
            Some(t) => codec::unresolved_key(t, 0),
            None => b"v".to_vec(),
        };
        let rows = self
            .db
            .range(Tree::Facts, b"u", Some(&end))
            .filter_map(|r| {
                let (k, v) = match r {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(e)),
                };
                let (created_at, value) = codec::unresolved_entry(&k, &v)?;
                let (queue, tier) = codec::unresolved_value(value);
                Some(Ok(OpenCase {
                    queue,
                    tier,
                    created_at,
                }))
            });
        Box::new(rows)
    }

    /// The KPI report of the cases opened in [`since`, `until`) (None: no
    /// bound), open cases by age at `now`: on sled counted from the
    /// facts here, on PostgreSQL in SQL.
    pub fn report(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        order: &Order<'_>,
    ) -> Result<Report> {
        // Opening times are kept to the millisecond: a bound finer than
        // that would split one millisecond's cases between the window
        // and the rest differently in SQL and here.
        let ms =
            |t: DateTime<Utc>| DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t);
        let (since, until) = (since.map(ms), until.map(ms));
        if let Db::Postgres(pg) = &self.db {
            let sets = pg.kpi_sets((since, until), now)?;
            return Ok(stats::assemble(sets, order, since, now));
        }
        self.tally(since, until, now)
            .map(|t| t.finish(order, since))
    }

    /// The report counted here from the facts, on either engine (the
    /// PostgreSQL report is tested against it).
    pub(super) fn tally(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Tally> {
        let in_window =
            |t: DateTime<Utc>| since.is_none_or(|s| t >= s) && until.is_none_or(|u| t < u);
        // Streamed: a million cases' facts never sit in memory at once.
        let mut tally = Tally::new(now);
        self.each_fact(since, true, |f| {
            if in_window(f.created_at) {
                tally.add(f)
            }
        })?;
        // The window's own unresolved cases came with its facts; the
        // others are read from the unresolved index.
        let before = if until.is_none() { since } else { None };
        if since.is_some() || until.is_some() {
            for o in self.unresolved(before) {
                let o = o?;
                if !in_window(o.created_at) {
                    tally.add_open(&o);
                }
            }
        }
        Ok(tally)
    }

    /// The facts of the cases whose facts record could not be read when
    /// the database was brought up to date (`postgres/upgrade.rs` marks
    /// each such bucket, `facts-lost/` ++ bucket number): made again from
    /// each case's whole history, so they are neither missing from the
    /// KPIs nor started afresh by the case's next write.
    pub(super) fn rebuild_lost_facts(&self) -> Result<()> {
        let marks: Vec<Vec<u8>> = self
            .db
            .prefix(Tree::Meta, LOST_FACTS)
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<_>>()?;
        for mark in marks {
            let Some(bucket) = mark.get(LOST_FACTS.len()..).and_then(read_u64) else {
                continue;
            };
            let ids =
                bucket.saturating_mul(BUCKET)..bucket.saturating_add(1).saturating_mul(BUCKET);
            // One transaction a bucket, holding its mark: a node that
            // opens the store meanwhile finds it gone, or waits, and never
            // writes facts over those made here from a later history.
            // Each case is read under its lock, so its history is whole.
            let rebuilt = self.transact(|tx| {
                if tx.get_bytes(Tree::Meta, &mark)?.is_none() {
                    return Ok(0);
                }
                let mut rebuilt = 0;
                for id in ids.clone() {
                    let case = tx.case(id).and_then(|c| match c {
                        Some(mut c) => self.history(id).map(|h| {
                            c.new_events = h;
                            Some(c)
                        }),
                        None => Ok(None),
                    });
                    match case {
                        Ok(Some(case)) => {
                            tx.forget_facts(id)?;
                            tx.write_facts(&Facts::of(&case))?;
                            rebuilt += 1;
                        }
                        Ok(None) => {}
                        // A case that cannot be read has no facts to
                        // make; it must not keep every node from opening.
                        Err(e) if !e.is_transient() => {
                            tracing::error!(case_id = id, error = %e, "a case whose KPI facts were lost cannot be read; it is left out of the KPIs");
                        }
                        Err(e) => return Err(e),
                    }
                }
                tx.remove(Tree::Meta, mark.clone());
                Ok::<_, StoreError>(rebuilt)
            })?;
            if rebuilt > 0 {
                tracing::warn!(
                    cases = rebuilt,
                    "KPI facts made again from the cases' history"
                );
            }
        }
        Ok(())
    }

    /// Index version 7: facts kept one record per case (`c ++ opening
    /// time ++ id`, compact or JSON) move into buckets.
    pub(super) fn bucket_old_facts(&self) -> Result<()> {
        loop {
            let old: Vec<(Vec<u8>, Vec<u8>)> = self
                .db
                .prefix(Tree::Facts, b"c")
                .take(2000)
                .collect::<Result<_>>()?;
            if old.is_empty() {
                return Ok(());
            }
            self.transact(|tx| {
                for (k, v) in old {
                    let facts = decode_facts(&k, &v)?;
                    tx.write_facts(&facts)?;
                    tx.remove(Tree::Facts, k);
                }
                Ok::<_, StoreError>(())
            })?;
        }
    }
}

impl Tx<'_> {
    /// The stored facts of a case (this transaction's writes included).
    pub(super) fn read_facts(&self, id: CaseId) -> Result<Option<Facts>> {
        if !self.store.db.is_local() {
            let key = case_key(id);
            return match self.get_bytes(Tree::Facts, &key)? {
                Some(v) => decode_facts(&key, &v).map(Some),
                None => Ok(None),
            };
        }
        let key = bucket_key(id);
        let Some(v) = self.get_bytes(Tree::Facts, &key)? else {
            return Ok(None);
        };
        match decode_bucket(&key, &v)?.into_iter().find(|e| e.id == id) {
            Some(e) => decode_facts(&key, &e.facts).map(Some),
            None => Ok(None),
        }
    }

    /// Writes a case's facts into its bucket.
    pub(super) fn write_facts(&mut self, facts: &Facts) -> Result<()> {
        if !self.store.db.is_local() {
            self.put(Tree::Facts, case_key(facts.id), codec::facts::encode(facts));
            return Ok(());
        }
        let key = bucket_key(facts.id);
        let mut entries = match self.get_bytes(Tree::Facts, &key)? {
            Some(v) => decode_bucket(&key, &v)?,
            None => Vec::new(),
        };
        let entry = Entry {
            id: facts.id,
            created_ms: facts.created_at.timestamp_millis(),
            facts: codec::facts::encode(facts),
        };
        match entries.binary_search_by_key(&facts.id, |e| e.id) {
            Ok(i) => entries[i] = entry,
            Err(i) => entries.insert(i, entry),
        }
        self.put(Tree::Facts, key, encode_bucket(&entries));
        Ok(())
    }

    /// Drops a case's facts (a legacy case about to be recomputed).
    pub(super) fn forget_facts(&mut self, id: CaseId) -> Result<()> {
        if !self.store.db.is_local() {
            self.remove(Tree::Facts, case_key(id));
            return Ok(());
        }
        let key = bucket_key(id);
        if let Some(v) = self.get_bytes(Tree::Facts, &key)? {
            let mut entries = decode_bucket(&key, &v)?;
            entries.retain(|e| e.id != id);
            self.put(Tree::Facts, key, encode_bucket(&entries));
        }
        Ok(())
    }

    /// A case's facts (updated by its new events), unresolved entry and
    /// open count.
    pub(super) fn case_indexes(&mut self, case: &Case) -> Result<()> {
        let prev = self.read_facts(case.id)?;
        self.write_facts(&Facts::update(prev, case))?;
        // On PostgreSQL the rows' status is indexed and the cases table
        // counted (a count row every new case bumped would have every
        // node's commits wait for it).
        if !self.store.db.is_local() {
            return Ok(());
        }
        let ukey = codec::unresolved_key(case.created_at, case.id);
        let old_tier = self
            .get_bytes(Tree::Facts, &ukey)?
            .map(|v| codec::unresolved_value(&v).1.into_bytes());
        let new_tier = (case.status != Status::Resolved).then(|| case.tier.as_bytes().to_vec());
        if case.status == Status::Resolved {
            self.remove(Tree::Facts, ukey);
        } else {
            // Opening time (key), queue and tier: enough to count open
            // cases by age without decoding anything.
            self.put(Tree::Facts, ukey, codec::unresolved_entry_value(case));
        }
        if old_tier != new_tier {
            for (tier, delta) in [(old_tier, -1i64), (new_tier, 1)] {
                if let Some(t) = tier {
                    let mut key = codec::OPEN_PREFIX.to_vec();
                    key.extend_from_slice(&t);
                    let n = self
                        .get_bytes(Tree::Meta, &key)?
                        .and_then(|v| read_u64(&v))
                        .unwrap_or(0)
                        .saturating_add_signed(delta);
                    if n == 0 {
                        self.remove(Tree::Meta, key);
                    } else {
                        self.put(Tree::Meta, key, n.to_be_bytes().to_vec());
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: CaseId) -> Entry {
        Entry {
            id,
            created_ms: id as i64 * 1000,
            facts: vec![7; 40],
        }
    }

    #[test]
    fn a_corrupt_bucket_is_an_error_naming_it_never_a_huge_allocation() {
        let good = encode_bucket(&[entry(1), entry(2)]);
        assert_eq!(decode_bucket(b"b1", &good).unwrap().len(), 2);
        // A decompressed size of 4 GiB claimed by a damaged record.
        let mut huge = good.clone();
        huge[19..23].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_bucket(b"b1", &huge).err().expect("refused");
        assert!(matches!(err, StoreError::Malformed { .. }), "{err}");
        // Cut short, or a count larger than its entries.
        assert!(decode_bucket(b"b1", &good[..good.len() - 3]).is_err());
        let mut more = good.clone();
        more[17..19].copy_from_slice(&3u16.to_be_bytes());
        assert!(decode_bucket(b"b1", &more).is_err());
        // A window after the bucket's last opening skips it unread.
        let mut buf = Vec::new();
        let mut seen = 0;
        each_entry(&good, 10_000, &mut buf, |_, _, _| {
            seen += 1;
            Ok(())
        })
        .expect("well formed")
        .expect("no error");
        assert_eq!(seen, 0);
    }
}
