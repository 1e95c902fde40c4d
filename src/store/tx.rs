//! The store's transaction: reads see the store plus the transaction's
//! own writes (its overlay), writes are committed together by
//! [`Store::transact`], and a savepoint undoes part of them.

use super::*;

/// Meta key: the end of the last review digest period sent.
const DIGEST_SENT_UNTIL: &str = "digest_sent_until";

/// A transaction: reads see the store plus this transaction's own
/// writes; writes are committed together by [`Store::transact`].
pub struct Tx<'s> {
    pub(super) store: &'s Store,
    pub(super) _guard: MutexGuard<'s, ()>,
    /// This transaction's writes by key, for reading them back.
    pub(super) overlay: BTreeMap<(Tree, Vec<u8>), Written>,
    /// The timer each case had when this transaction first read it: a
    /// write moves its index entry from there.
    pub(super) timers: HashMap<CaseId, Option<Timer>>,
    pub(super) on_commit: Vec<Box<dyn FnOnce() + Send + 's>>,
    /// What each change replaced, newest last: a rollback to a savepoint
    /// undoes them.
    pub(super) undo: Vec<Undo>,
    /// The mailbox lease this transaction's writes depend on.
    pub(super) fence: Option<Fence>,
    /// On a shared engine, values read from the store in this
    /// transaction (see [`Tx::get_bytes`]).
    pub(super) reads: std::cell::RefCell<HashMap<(Tree, Vec<u8>), Written>>,
    /// On a shared engine, the keys read and found missing: written only
    /// if still missing at commit (see [`engine::Db::commit`]).
    pub(super) absent: std::cell::RefCell<std::collections::HashSet<(Tree, Vec<u8>)>>,
    /// On a shared engine, key ranges read in this transaction or ahead
    /// of it (see [`super::read_ahead`]).
    pub(super) scans: std::cell::RefCell<HashMap<read_ahead::RangeEnd, read_ahead::Scanned>>,
}

/// What a transaction wrote under a key: a value, or None for removed.
pub(super) type Written = Option<Arc<[u8]>>;

pub(super) enum Undo {
    Key((Tree, Vec<u8>), Option<Written>),
    Timer(CaseId, Option<Option<Timer>>),
}

/// A point in a transaction to roll back to (see [`Tx::rollback`]).
#[derive(Debug, Clone, Copy)]
pub struct Savepoint {
    pub(super) undo: usize,
    hooks: usize,
}

impl<'s> Tx<'s> {
    /// Makes this transaction's commit depend on `fence`'s lease: if its
    /// node no longer holds the mailbox with that token when the
    /// transaction commits, nothing is written and the commit fails with
    /// [`StoreError::Fenced`]. (The embedded store has one process and no
    /// leases: nothing to check.)
    pub fn fence(&mut self, fence: Fence) {
        self.fence = Some(fence);
    }

    // ------------------------------------------------------ internals

    pub(super) fn put(&mut self, t: Tree, key: Vec<u8>, value: Vec<u8>) {
        self.set(t, key, Some(value));
    }

    pub(super) fn remove(&mut self, t: Tree, key: Vec<u8>) {
        self.set(t, key, None);
    }

    pub(super) fn set(&mut self, t: Tree, key: Vec<u8>, value: Option<Vec<u8>>) {
        let value: Option<Arc<[u8]>> = value.map(Arc::from);
        let k = (t, key);
        let before = self.overlay.insert(k.clone(), value);
        self.undo.push(Undo::Key(k, before));
    }

    pub(super) fn remember_timer(&mut self, id: CaseId, timer: Option<Timer>) {
        let before = self.timers.insert(id, timer);
        self.undo.push(Undo::Timer(id, before));
    }

    /// Where this transaction stands now.
    pub fn savepoint(&self) -> Savepoint {
        Savepoint {
            undo: self.undo.len(),
            hooks: self.on_commit.len(),
        }
    }

    /// Forgets everything written since `sp` (a step that failed half
    /// way), keeping what came before.
    pub fn rollback(&mut self, sp: Savepoint) {
        self.on_commit.truncate(sp.hooks);
        while self.undo.len() > sp.undo {
            match self.undo.pop() {
                Some(Undo::Key(k, Some(v))) => {
                    self.overlay.insert(k, v);
                }
                Some(Undo::Key(k, None)) => {
                    self.overlay.remove(&k);
                }
                Some(Undo::Timer(id, Some(t))) => {
                    self.timers.insert(id, t);
                }
                Some(Undo::Timer(id, None)) => {
                    self.timers.remove(&id);
                }
                None => break,
            }
        }
    }

    pub(super) fn get_bytes(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let k = (t, key.to_vec());
        if let Some(v) = self.overlay.get(&k) {
            return Ok(v.as_deref().map(<[u8]>::to_vec));
        }
        if self.store.db.is_local() {
            return self.store.db.get(t, key);
        }
        // A shared engine: a read is a round trip, and a message's work
        // reads some keys twice. A row read is locked until this
        // transaction ends, so a value read once stays; a key found
        // missing is remembered, and written at commit only if no other
        // node has written it meanwhile.
        if let Some(v) = self.reads.borrow().get(&k) {
            return Ok(v.as_deref().map(<[u8]>::to_vec));
        }
        let v = self.store.db.get_for_update(t, key)?;
        self.remember(k, v.as_deref());
        Ok(v)
    }

    /// Keeps what a read on a shared engine found: the value (locked,
    /// so it stays) for the next read, or the key as missing, to be
    /// written at commit only if still missing.
    pub(super) fn remember(&self, k: (Tree, Vec<u8>), v: Option<&[u8]>) {
        if v.is_none() {
            self.absent.borrow_mut().insert(k.clone());
        }
        self.reads.borrow_mut().insert(k, v.map(Arc::from));
    }

    pub(super) fn get<T: DeserializeOwned>(&self, t: Tree, key: &[u8]) -> Result<Option<T>> {
        match self.get_bytes(t, key)? {
            None => Ok(None),
            Some(v) => codec::decode(t, key, &v).map(Some),
        }
    }

    pub(super) fn put_record<T: serde::Serialize>(
        &mut self,
        t: Tree,
        key: Vec<u8>,
        v: &T,
    ) -> Result<()> {
        let bytes = codec::encode(v)?;
        self.put(t, key, bytes);
        Ok(())
    }

    /// The keys under `prefix`, stored and written here, in key order
    /// (at most `limit` from the store).
    pub(super) fn prefix_keys(&self, t: Tree, prefix: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        let end = codec::prefix_end(prefix);
        let mut keys: BTreeMap<Vec<u8>, bool> = self
            .scan(t, prefix, end.as_deref(), limit)?
            .into_iter()
            .map(|k| (k, true))
            .collect();
        let from = (t, prefix.to_vec());
        for ((tree, k), v) in self.overlay.range(from..) {
            if *tree != t || !k.starts_with(prefix) {
                break;
            }
            keys.insert(k.clone(), v.is_some());
        }
        Ok(keys
            .into_iter()
            .filter(|(_, live)| *live)
            .map(|(k, _)| k)
            .collect())
    }

    pub(super) fn meta_u64(&self, name: &str) -> Result<Option<u64>> {
        Ok(self
            .get_bytes(Tree::Meta, name.as_bytes())?
            .and_then(|v| codec::read_u64(&v)))
    }

    pub(super) fn set_meta_u64(&mut self, name: &str, v: u64) {
        self.put(
            Tree::Meta,
            name.as_bytes().to_vec(),
            v.to_be_bytes().to_vec(),
        );
    }

    // ---------------------------------------------------------- reads

    /// The store's secret (for our Message-IDs).
    pub fn key(&self) -> &[u8; 32] {
        self.store.key()
    }

    /// A case's summary, as [`Store::case`] (this transaction's writes
    /// included).
    pub fn case(&mut self, id: CaseId) -> Result<Option<Case>> {
        let c = self.read_case(id)?;
        if let Some(c) = &c {
            if !self.timers.contains_key(&id) {
                self.remember_timer(id, c.timer);
            }
        }
        Ok(c)
    }

    pub(super) fn read_case(&self, id: CaseId) -> Result<Option<Case>> {
        match self.get_bytes(Tree::Cases, &id_key(id))? {
            None => Ok(None),
            Some(v) => codec::decode(Tree::Cases, &id_key(id), &v).map(Some),
        }
    }

    /// The keys of a case's messages in arrival order: the stored ones,
    /// then those added to `case` since it was read.
    pub fn case_messages(&self, case: &Case) -> Result<Vec<u64>> {
        let prefix = id_key(case.id);
        let mut out = Vec::new();
        for k in self.prefix_keys(Tree::CaseMessages, &prefix, usize::MAX)? {
            let v = self.get_bytes(Tree::CaseMessages, &k)?;
            out.push(v.as_deref().and_then(codec::read_u64).ok_or_else(|| {
                StoreError::Malformed {
                    key: format!("CaseMessages/{}", String::from_utf8_lossy(&k)),
                }
            })?);
        }
        out.extend_from_slice(&case.new_messages);
        Ok(out)
    }

    pub fn message(&self, seq: u64) -> Result<Option<MessageRecord>> {
        self.get(Tree::Messages, &id_key(seq))
    }

    /// A stored message's bytes (this transaction's included).
    pub fn raw(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.get_bytes(Tree::Raw, &id_key(seq))
    }

    /// Where reading `folder` of queue `queue` got to.
    pub fn cursor(&self, queue: &str, folder: &str) -> Result<Option<Cursor>> {
        self.get(Tree::Cursors, &codec::cursor_key(queue, folder))
    }

    pub fn outbox_entry(&self, id: u64) -> Result<Option<OutboxEntry>> {
        self.get(Tree::Outbox, &id_key(id))
    }

    /// An outbox entry to claim, unless another node's transaction holds
    /// it right now (`Err(())`: it is being claimed or settled there, so
    /// this node goes on with other mail instead of waiting).
    pub fn outbox_entry_unless_held(
        &self,
        id: u64,
    ) -> Result<std::result::Result<Option<OutboxEntry>, ()>> {
        let key = id_key(id);
        Ok(match self.bytes_unless_held(Tree::Outbox, &key)? {
            Err(()) => Err(()),
            Ok(v) => Ok(v
                .map(|v| codec::decode(Tree::Outbox, &key, &v))
                .transpose()?),
        })
    }

    /// A case to work on, unless another node's transaction holds it
    /// right now (`Err(())`): a due timer there is that node's to fire,
    /// or this node's at its next pass, never a reason to wait.
    pub fn case_unless_held(
        &mut self,
        id: CaseId,
    ) -> Result<std::result::Result<Option<Case>, ()>> {
        let key = id_key(id);
        let case: Option<Case> = match self.bytes_unless_held(Tree::Cases, &key)? {
            Err(()) => return Ok(Err(())),
            Ok(v) => v
                .map(|v| codec::decode(Tree::Cases, &key, &v))
                .transpose()?,
        };
        if let Some(c) = &case {
            if !self.timers.contains_key(&id) {
                self.remember_timer(id, c.timer);
            }
        }
        Ok(Ok(case))
    }

    /// A row's bytes read and locked for this transaction, or `Err(())`
    /// when another transaction holds it (PostgreSQL's `SKIP LOCKED`).
    fn bytes_unless_held(
        &self,
        t: Tree,
        key: &[u8],
    ) -> Result<std::result::Result<Option<Vec<u8>>, ()>> {
        let k = (t, key.to_vec());
        if self.overlay.contains_key(&k) || self.reads.borrow().contains_key(&k) {
            return self.get_bytes(t, key).map(Ok);
        }
        let v = match self.store.db.get_unless_held(t, key)? {
            Err(()) => return Ok(Err(())),
            Ok(v) => v,
        };
        if !self.store.db.is_local() {
            self.remember(k, v.as_deref());
        }
        Ok(Ok(v))
    }

    /// See [`Store::has_message`].
    pub fn has_message(&self, message_id: &str, content_hash: &str) -> Result<bool> {
        let key = codec::message_id_key(message_id, content_hash);
        Ok(self.get_bytes(Tree::MessageIds, &key)?.is_some())
    }

    /// See [`Store::cases_with_message_id`].
    pub fn cases_with_message_id(&self, message_id: &str) -> Result<Vec<CaseId>> {
        self.cases_by_message_id(Tree::MessageCases, message_id)
    }

    /// The cases under `message_id` in a `message_id \0 case` index.
    fn cases_by_message_id(&self, t: Tree, message_id: &str) -> Result<Vec<CaseId>> {
        let prefix = codec::pair_key(message_id, &[]);
        Ok(self
            .prefix_keys(t, &prefix, MAX_CASES_PER_ID)?
            .iter()
            .filter_map(|k| codec::read_u64(&k[prefix.len()..]))
            .take(MAX_CASES_PER_ID)
            .collect())
    }

    /// See [`Lookup::cases_referring_to`].
    pub fn cases_referring_to(&self, message_id: &str) -> Result<Vec<CaseId>> {
        self.cases_by_message_id(Tree::Referrers, message_id)
    }

    /// Cases of a customer, oldest first (this transaction's included).
    pub fn customer_cases(&self, email: &str) -> Result<Vec<CaseId>> {
        let prefix = codec::pair_key(email, &[]);
        Ok(self
            .prefix_keys(Tree::Customers, &prefix, usize::MAX)?
            .iter()
            .filter_map(|k| codec::read_u64(&k[prefix.len()..]))
            .collect())
    }

    /// Recent automatic mails to `recipient` since `since`, this
    /// transaction's included, counted up to `at_most` (the limit being
    /// checked: a flood's records are not all counted for every mail).
    /// `recipient` is a key from [`crate::suppress::recipient_key`], or
    /// [`ALL_RECIPIENTS`]. Reads only the window, however many older
    /// records there are.
    pub fn auto_replies_since(
        &self,
        recipient: &str,
        since: DateTime<Utc>,
        at_most: usize,
    ) -> Result<usize> {
        let (from, end) = read_ahead::auto_reply_range(recipient, since);
        let mut keys: BTreeMap<Vec<u8>, bool> = self
            .scan(Tree::AutoReplies, &from, Some(&end), at_most)?
            .into_iter()
            .map(|k| (k, true))
            .collect();
        let start = (Tree::AutoReplies, from);
        let stop = (Tree::AutoReplies, end);
        for ((_, k), v) in self.overlay.range(start..stop) {
            keys.insert(k.clone(), v.is_some());
        }
        Ok(keys.values().filter(|live| **live).take(at_most).count())
    }

    /// The next number of a sequence, never handed out twice. On sled it
    /// is used up when this transaction commits; on PostgreSQL at once
    /// (a sequence: a transaction that fails leaves a gap).
    pub fn next_id(&mut self, s: Sequence) -> Result<u64> {
        if let Some(n) = self.store.db.next_id(s)? {
            if s == Sequence::Case {
                // A number the sequence just handed out names no stored
                // case: its rows are known missing without a round trip
                // each (and still written at commit only if missing).
                self.remember((Tree::Cases, id_key(n).to_vec()), None);
                self.remember((Tree::Facts, super::facts::case_key(n)), None);
            }
            return Ok(n);
        }
        let n = self.meta_u64(s.key())?.unwrap_or(1);
        self.set_meta_u64(s.key(), n + 1);
        Ok(n)
    }

    /// The end of the last review digest's period sent, in seconds.
    pub fn digest_sent_until(&self) -> Result<Option<i64>> {
        Ok(self.meta_u64(DIGEST_SENT_UNTIL)?.map(|v| v as i64))
    }

    pub fn set_digest_sent_until(&mut self, at: i64) {
        self.set_meta_u64(DIGEST_SENT_UNTIL, at as u64);
    }

    /// The language set for a customer (`customers set-language`).
    pub fn customer_language(&self, email: &str) -> Result<Option<String>> {
        let key = codec::customer_language_key(email);
        Ok(self
            .get_bytes(Tree::Meta, &key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Sets (or with None clears) the language of a customer.
    pub fn set_customer_language(&mut self, email: &str, language: Option<&str>) {
        let key = codec::customer_language_key(email);
        self.set(Tree::Meta, key, language.map(|l| l.as_bytes().to_vec()));
    }

    // --------------------------------------------------------- writes

    /// Writes a case with everything kept in step with it: its new
    /// messages and events appended to its lists (and moved out of
    /// `case`), its timer's index entry, its facts, the unresolved index
    /// and the open counts. Costs the same for a case of 5,000 messages
    /// as for a new one: nothing already stored is rewritten.
    pub fn put_case(&mut self, case: &mut Case) -> Result<()> {
        let before = match self.timers.get(&case.id) {
            Some(t) => *t,
            None => self.read_case(case.id)?.and_then(|c| c.timer),
        };
        if before != case.timer {
            if let Some(t) = before {
                self.remove(Tree::Deadlines, codec::deadline_key(t.at, case.id));
            }
            if let Some(t) = case.timer {
                self.put(
                    Tree::Deadlines,
                    codec::deadline_key(t.at, case.id),
                    Vec::new(),
                );
            }
        }
        self.remember_timer(case.id, case.timer);
        self.case_indexes(case)?;
        for seq in std::mem::take(&mut case.new_messages) {
            let key = codec::item_key(case.id, case.message_count);
            self.put(Tree::CaseMessages, key, id_key(seq).to_vec());
            case.message_count += 1;
        }
        let events = std::mem::take(&mut case.new_events);
        if !events.is_empty() {
            let key = codec::item_key(case.id, case.event_count);
            self.put(Tree::History, key, codec::encode_json(&events)?);
            case.event_count += events.len() as u64;
        }
        self.put_record(Tree::Cases, id_key(case.id).to_vec(), case)
    }

    /// Version 6: a case of an older release (JSON, its history and
    /// messages inline) becomes a summary with its lists beside it, and
    /// its facts are computed afresh from its whole history.
    pub(super) fn convert_legacy_case(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut v: serde_json::Value = codec::decode(Tree::Cases, key, value)?;
        let take = |v: &mut serde_json::Value, field: &str| {
            v.as_object_mut()
                .and_then(|o| o.remove(field))
                .filter(|v| !v.is_null())
                .unwrap_or_else(|| serde_json::Value::Array(Vec::new()))
        };
        let history = take(&mut v, "history");
        let messages = take(&mut v, "messages");
        let corrupt = |source| StoreError::Corrupt {
            key: format!("Cases/{}", codec::read_u64(key).unwrap_or(0)),
            source,
        };
        let mut case: Case = serde_json::from_value(v).map_err(corrupt)?;
        case.new_events = serde_json::from_value(history).map_err(corrupt)?;
        case.new_messages = serde_json::from_value(messages).map_err(corrupt)?;
        case.event_count = 0;
        case.message_count = 0;
        // Its timer is indexed already; its facts start from nothing.
        self.remember_timer(case.id, case.timer);
        self.forget_facts(case.id)?;
        self.put_case(&mut case)
    }

    /// Adds a case to its customer's list (once, when it opens).
    pub fn add_customer_case(&mut self, email: &str, case: CaseId) {
        self.put(
            Tree::Customers,
            codec::customer_key(email, case),
            Vec::new(),
        );
    }

    /// Stores a message with its bytes and indexes it by Message-ID.
    pub fn put_message(&mut self, record: &MessageRecord, raw: &[u8]) -> Result<()> {
        self.put_record(Tree::Messages, id_key(record.seq).to_vec(), record)?;
        self.put(Tree::Raw, id_key(record.seq).to_vec(), raw.to_vec());
        self.index_message_id(
            &record.message_id,
            &record.content_hash,
            record.case,
            record.seq,
        );
        Ok(())
    }

    /// Indexes a Message-ID (of a message, or of our own mail with
    /// `suffix` "out"): by content for duplicates, by case for threading.
    pub fn index_message_id(&mut self, message_id: &str, suffix: &str, case: CaseId, seq: u64) {
        let mut v = id_key(case).to_vec();
        v.extend_from_slice(&id_key(seq));
        self.put(
            Tree::MessageIds,
            codec::message_id_key(message_id, suffix),
            v,
        );
        self.put(
            Tree::MessageCases,
            codec::pair_key(message_id, &id_key(case)),
            Vec::new(),
        );
    }

    /// Records that `case` holds a message referring to each of `ids`.
    pub fn index_references<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a String>,
        case: CaseId,
    ) {
        for id in ids {
            self.put(
                Tree::Referrers,
                codec::pair_key(id, &id_key(case)),
                Vec::new(),
            );
        }
    }

    /// Writes an outbox entry (and its bytes, when given) with its
    /// pending-index entry.
    pub fn put_outbox(&mut self, entry: &OutboxEntry, raw: Option<&[u8]>) -> Result<()> {
        self.put_record(Tree::Outbox, id_key(entry.id).to_vec(), entry)?;
        self.outbox_index(entry);
        if let Some(raw) = raw {
            self.put(Tree::Raw, codec::outbox_raw_key(entry.id), raw.to_vec());
        }
        Ok(())
    }

    pub(super) fn outbox_index(&mut self, entry: &OutboxEntry) {
        let key = id_key(entry.id).to_vec();
        if entry.state.is_pending() {
            self.put(Tree::OutboxPending, key, Vec::new());
        } else {
            self.remove(Tree::OutboxPending, key);
        }
    }

    /// Counts an automatic mail to `recipient` (a limit key).
    pub fn record_auto_reply(&mut self, recipient: &str, at: DateTime<Utc>, outbox_id: u64) {
        self.put(
            Tree::AutoReplies,
            codec::auto_reply_key(recipient, at, outbox_id),
            Vec::new(),
        );
    }

    pub fn set_cursor(&mut self, queue: &str, folder: &str, cursor: &Cursor) -> Result<()> {
        self.put_record(Tree::Cursors, codec::cursor_key(queue, folder), cursor)
    }

    pub fn put_quarantine(&mut self, entry: &QuarantineEntry, raw: &[u8]) -> Result<()> {
        self.put_record(Tree::Quarantine, id_key(entry.id).to_vec(), entry)?;
        self.put(
            Tree::Quarantine,
            codec::quarantine_raw_key(entry.id),
            raw.to_vec(),
        );
        Ok(())
    }

    pub fn remove_quarantine(&mut self, id: u64) {
        self.remove(Tree::Quarantine, id_key(id).to_vec());
        self.remove(Tree::Quarantine, codec::quarantine_raw_key(id));
    }

    /// Removes timer index entries of `case` at or before `now` that its
    /// record no longer has.
    pub fn drop_stale_timers(&mut self, case: CaseId, now: DateTime<Utc>) -> Result<()> {
        let end = codec::deadline_key(now, u64::MAX);
        let stale: Vec<Vec<u8>> = self
            .store
            .db
            .range(Tree::Deadlines, &[], Some(&end))
            .filter_map(|r| match r {
                Ok((k, _)) => (k.len() == 16 && k[8..] == id_key(case)).then_some(Ok(k)),
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_>>()?;
        for k in stale {
            self.remove(Tree::Deadlines, k);
        }
        Ok(())
    }

    /// Runs `f` after this transaction commits (never if it does not).
    pub fn on_commit(&mut self, f: impl FnOnce() + Send + 's) {
        self.on_commit.push(Box::new(f));
    }
}

impl Lookup for Tx<'_> {
    type Error = StoreError;
    fn is_stored(&self, message_id: &str, content_hash: &str) -> Result<bool> {
        self.has_message(message_id, content_hash)
    }
    fn cases_with_message_id(&self, message_id: &str) -> Result<Vec<CaseId>> {
        Tx::cases_with_message_id(self, message_id)
    }
    fn cases_referring_to(&self, message_id: &str) -> Result<Vec<CaseId>> {
        Tx::cases_referring_to(self, message_id)
    }
    /// A candidate case threading looks at, read without locking it:
    /// only the case a message joins is read again (locked) to change.
    fn case(&self, id: CaseId) -> Result<Option<Case>> {
        let k = (Tree::Cases, id_key(id).to_vec());
        let cached = self
            .overlay
            .get(&k)
            .cloned()
            .or_else(|| self.reads.borrow().get(&k).cloned());
        let bytes = match cached {
            Some(v) => v.as_deref().map(<[u8]>::to_vec),
            None => self.store.db.get(Tree::Cases, &k.1)?,
        };
        bytes
            .map(|v| codec::decode(Tree::Cases, &k.1, &v))
            .transpose()
    }
}
