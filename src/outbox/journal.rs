//! The sent journal: shrinks the window between "the SMTP server said
//! 250" and "the store knows it" from a store flush (an fsync, milliseconds)
//! to one `write(2)` (microseconds). Right after the 250 the outbox
//! appends the entry's id here; the data is then in the kernel, so a
//! killed process loses nothing. On start-up the journal is replayed into
//! the store and emptied. (Power loss inside the window can still lose a
//! line; the entry is then sent again with the same Message-ID.)

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::{OutboxEntry, OutboxState};
use crate::case::EventKind;
use crate::store::{Store, StoreError, Tx};

/// Why replaying the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot empty the sent journal")]
    Io(#[source] std::io::Error),
}

pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
    /// Ids journaled whose sent mark the store may not hold yet (the mark
    /// failed, a database blip): consulted before any send, so such mail
    /// is marked, never sent again, and the journal is not emptied while
    /// one is left.
    unsettled: Mutex<std::collections::BTreeSet<u64>>,
    /// A slot's lock (see [`Journal::open_slot`]), held while we live.
    _slot: Option<File>,
}

/// Most daemons of one cluster on one machine sharing a directory.
const SLOTS: usize = 256;

impl Journal {
    /// The journal of the one process the embedded store allows.
    pub fn open(store_dir: &Path) -> std::io::Result<Journal> {
        Journal::at(store_dir.join("sent.journal"), None)
    }

    fn at(path: PathBuf, slot: Option<File>) -> std::io::Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Journal {
            path,
            file: Mutex::new(file),
            unsettled: Mutex::new(Default::default()),
            _slot: slot,
        })
    }

    /// For a node of a cluster, where several daemons on one machine may
    /// share the directory: the journal of the first free slot
    /// (`sent-N.journal`, held by a lock on `sent-N.lock` for the life of
    /// the process). A slot is free only when its last daemon has exited,
    /// so a restarted daemon takes over (and replays) the journal its
    /// predecessor left.
    pub fn open_slot(dir: &Path) -> std::io::Result<Journal> {
        use fs2::FileExt;
        for n in 0..SLOTS {
            let lock = slot_lock(dir, n)?;
            if lock.try_lock_exclusive().is_ok() {
                return Journal::at(dir.join(format!("sent-{n}.journal")), Some(lock));
            }
        }
        Err(std::io::Error::other(format!(
            "{SLOTS} daemons hold journals in {} already",
            dir.display()
        )))
    }

    /// Replays the journals of slots no daemon holds (their daemons died
    /// and none has started since): what they had sent is marked sent.
    pub fn settle_orphans(
        dir: &Path,
        store: &Store,
        now: DateTime<Utc>,
    ) -> Result<usize, JournalError> {
        use fs2::FileExt;
        let mut settled = 0;
        for n in 0..SLOTS {
            let journal = dir.join(format!("sent-{n}.journal"));
            if !journal.exists() {
                continue;
            }
            let lock = slot_lock(dir, n).map_err(JournalError::Io)?;
            if lock.try_lock_exclusive().is_ok() {
                settled += Journal::at(journal, Some(lock))
                    .map_err(JournalError::Io)?
                    .replay(store, now)?;
            }
        }
        Ok(settled)
    }

    /// Records that the server accepted entry `id`: one write call. The
    /// id stays unsettled until [`Journal::settled`].
    pub fn record(&self, id: u64) -> std::io::Result<()> {
        self.unsettled_ids().insert(id);
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(format!("{id}\n").as_bytes())
    }

    fn unsettled_ids(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.unsettled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store committed entry `id`'s sent mark.
    pub fn settled(&self, id: u64) {
        self.unsettled_ids().remove(&id);
    }

    /// Did the server accept entry `id` while its mark is not committed
    /// yet? Then it must be marked, not sent again.
    pub fn holds(&self, id: u64) -> bool {
        self.unsettled_ids().contains(&id)
    }

    /// Commits the sent marks this journal holds that the store missed
    /// (a mark whose commit failed); returns how many are left unsettled.
    pub fn settle_pending(&self, store: &Store, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let ids: Vec<u64> = self.unsettled_ids().iter().copied().collect();
        for id in ids {
            store.transact(|tx| {
                if let Some(mut e) = tx.outbox_entry(id)? {
                    if e.state.is_pending() {
                        mark_sent(tx, &mut e, now)?;
                    }
                }
                Ok::<_, StoreError>(())
            })?;
            self.settled(id);
        }
        Ok(self.unsettled_ids().len())
    }

    /// Empties the journal, once the store holds every mark it records
    /// durably (after a flush that follows them): not while a mark is
    /// still unsettled.
    pub fn clear(&self) -> std::io::Result<()> {
        if !self.unsettled_ids().is_empty() {
            return Ok(());
        }
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.set_len(0)
    }

    /// Marks every journaled entry sent in the store, then empties the
    /// journal. Returns how many entries it settled.
    pub fn replay(&self, store: &Store, now: DateTime<Utc>) -> Result<usize, JournalError> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut settled = 0;
        for id in text.lines().filter_map(|l| l.trim().parse::<u64>().ok()) {
            let done = store.transact(|tx| {
                let Some(mut e) = tx.outbox_entry(id)? else {
                    return Ok::<_, StoreError>(false);
                };
                if !e.state.is_pending() {
                    return Ok(false);
                }
                mark_sent(tx, &mut e, now)?;
                Ok(true)
            })?;
            settled += done as usize;
        }
        store.flush()?;
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.set_len(0).map_err(JournalError::Io)?;
        if settled > 0 {
            tracing::info!(
                settled,
                "outbox: mail accepted before the last stop is marked sent, not sent again"
            );
        }
        Ok(settled)
    }
}

fn slot_lock(dir: &Path, n: usize) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(format!("sent-{n}.lock")))
}

/// Marks an entry sent and records it in its case.
pub fn mark_sent(
    tx: &mut Tx<'_>,
    e: &mut OutboxEntry,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if let Some(stored) = tx.outbox_entry(e.id)? {
        if matches!(stored.state, OutboxState::Sent | OutboxState::Bounced) {
            // Already settled (by its confirmation copy, or by its bounce
            // arriving before this mark): once only, and a bounce stays.
            *e = stored;
            return Ok(());
        }
    }
    e.state = OutboxState::Sent;
    e.sent_at = Some(now);
    e.last_error = None;
    tx.put_outbox(e, None)?;
    if let Some(mut c) = tx.case(e.case)? {
        c.push(
            now,
            EventKind::MailSent {
                outbox_id: e.id,
                mail: e.kind.clone(),
                to: e.to.join(", "),
            },
        );
        tx.put_case(&mut c)?;
    }
    Ok(())
}
