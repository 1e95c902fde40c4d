//! Fetch planning: which UIDs to fetch next, in chunks of how many, and
//! what to do about a message the server will not give. A server that
//! hangs up on one unreadable message must not stop the queue: fetches
//! that broke the connection are remembered ([`Troubles`]) across
//! reconnects, the watcher narrows down to one UID at a time near them,
//! and quarantines the UID that failed alone [`FETCH_ATTEMPTS`] times.
//! Works over any [`Folder`], so all of it is unit-tested in memory.

use std::collections::HashMap;
use std::sync::Mutex;

use super::folder::{refused, Folder, Part};
use super::imap::ImapError;

/// UIDs per FETCH round.
pub const CHUNK: usize = 200;
/// Most bytes fetched in one round.
pub const CHUNK_BYTES: u64 = 32 << 20;
/// Tries at fetching one message the server will not give, before it is
/// quarantined with the server's words (and the cursor may pass it).
pub const FETCH_ATTEMPTS: u32 = 3;

/// The next step over the UIDs left in a pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Fetch the first `n` UIDs.
    Fetch(usize),
    /// The first UID failed alone too often: quarantine it with the error.
    GiveUp(String),
}

/// What a FETCH round brought: bytes (with the real size when only the
/// headers were fetched), and the UIDs the server refused, with its words.
#[derive(Default, Debug)]
pub struct Fetched {
    pub bodies: HashMap<u32, (Vec<u8>, Option<u64>)>,
    pub refused: HashMap<u32, String>,
}

/// Where fetching a folder broke the connection (a message the server
/// cannot read may make it hang up): kept across reconnects, so the
/// watcher narrows down to the message instead of failing forever.
#[derive(Debug, Clone)]
struct Trouble {
    validity: u32,
    /// The first UID of the fetch that failed.
    at: u32,
    /// Up to this UID, fetch one message at a time.
    until: u32,
    /// Failed fetches in a row starting at `at`.
    failures: u32,
    error: String,
}

impl Trouble {
    /// Has fetching `uid` alone failed often enough to give up on it?
    fn stuck_on(&self, uid: u32) -> bool {
        self.at == uid && uid <= self.until && self.failures >= FETCH_ATTEMPTS
    }
}

/// Per folder: where fetching last broke.
#[derive(Debug, Default)]
pub struct Troubles(Mutex<HashMap<String, Trouble>>);

impl Troubles {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Trouble>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn any(&self) -> bool {
        !self.map().is_empty()
    }

    /// What to do with `rest` (sorted, not empty) of `folder`.
    pub fn step(&self, folder: &str, validity: u32, rest: &[u32]) -> Step {
        let map = self.map();
        let trouble = map.get(folder).filter(|t| t.validity == validity);
        match trouble {
            Some(t) if t.stuck_on(rest[0]) => Step::GiveUp(t.error.clone()),
            Some(t) if rest[0] <= t.until => Step::Fetch(1),
            _ => Step::Fetch(CHUNK.min(rest.len())),
        }
    }

    /// Counts a failed fetch of `chunk`. A chunk that failed
    /// [`FETCH_ATTEMPTS`] times is then fetched one UID at a time; a
    /// single UID that failed as often is given up on the next pass.
    pub fn failed(&self, folder: &str, validity: u32, chunk: &[u32], e: &ImapError) {
        let mut map = self.map();
        let first = chunk[0];
        let last = chunk[chunk.len() - 1];
        let t = map.entry(folder.to_string()).or_insert(Trouble {
            validity,
            at: first,
            until: 0,
            failures: 0,
            error: String::new(),
        });
        if t.validity != validity {
            t.validity = validity;
            t.until = 0;
        }
        if t.at != first {
            t.at = first;
            t.failures = 0;
        }
        t.failures += 1;
        t.error = crate::error_chain(e);
        if chunk.len() > 1 && t.failures >= FETCH_ATTEMPTS {
            t.until = t.until.max(last);
            t.failures = 0;
        }
    }

    /// The UID given up on is behind: start counting afresh.
    pub fn gave_up(&self, folder: &str) {
        if let Some(t) = self.map().get_mut(folder) {
            t.failures = 0;
        }
    }

    /// A single UID came through: the failures counted were elsewhere,
    /// and past the troubled range chunks are whole again.
    pub fn fetched(&self, folder: &str, uid: u32) {
        let mut map = self.map();
        if let Some(t) = map.get_mut(folder) {
            if t.at == uid {
                t.failures = 0;
            }
            if uid >= t.until {
                map.remove(folder);
            }
        }
    }
}

/// The new UIDs of a search from `start`, sorted (`n:*` matches the last
/// message even when n is past it).
pub fn new_uids(found: Vec<u32>, start: u32) -> Vec<u32> {
    let mut uids: Vec<u32> = found.into_iter().filter(|u| *u >= start).collect();
    uids.sort_unstable();
    uids.dedup();
    uids
}

/// Sizes, then bytes of one chunk: whole messages in rounds of at most
/// [`CHUNK_BYTES`], and only the header of one over `max` bytes.
pub async fn chunk<F: Folder>(f: &mut F, chunk: &[u32], max: u64) -> Result<Fetched, ImapError> {
    let sizes = match f.sizes(chunk).await {
        // The server refused the sizes of this chunk (a message it cannot
        // read): take them one by one; one it refuses counts as small and
        // meets the same refusal when fetched.
        Err(e) if refused(&e).is_some() => {
            let mut each = HashMap::new();
            for &uid in chunk {
                match f.sizes(&[uid]).await {
                    Ok(one) => each.extend(one),
                    Err(e) if refused(&e).is_some() => {}
                    Err(e) => return Err(e),
                }
            }
            each
        }
        other => other?,
    };
    let size = |uid| sizes.get(&uid).copied().unwrap_or(0) as u64;
    let mut got = Fetched::default();
    for group in rounds(
        chunk
            .iter()
            .map(|&u| (u, size(u)))
            .filter(|&(_, s)| s <= max),
    ) {
        each(f, &group, Part::Whole, None, &mut got).await?;
    }
    for &uid in chunk {
        if size(uid) > max {
            each(f, &[uid], Part::Header, Some(size(uid)), &mut got).await?;
        }
    }
    Ok(got)
}

/// Groups UIDs with their sizes into rounds of at most [`CHUNK_BYTES`]
/// (a single bigger message makes a round of its own).
fn rounds(sized: impl Iterator<Item = (u32, u64)>) -> Vec<Vec<u32>> {
    let mut groups = Vec::new();
    let mut group: Vec<u32> = Vec::new();
    let mut bytes = 0u64;
    for (uid, size) in sized {
        if !group.is_empty() && bytes + size > CHUNK_BYTES {
            groups.push(std::mem::take(&mut group));
            bytes = 0;
        }
        bytes += size;
        group.push(uid);
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

/// Fetches `uids` into `got`. When the server refuses the set, or
/// answers without a message's bytes, each missing UID is fetched on its
/// own, up to [`FETCH_ATTEMPTS`] times; one it still will not give (and
/// has not expunged) goes to `got.refused` with its words. Connection
/// trouble is returned as an error: the pass is retried.
async fn each<F: Folder>(
    f: &mut F,
    uids: &[u32],
    part: Part,
    truncated: Option<u64>,
    got: &mut Fetched,
) -> Result<(), ImapError> {
    let mut why = "the server's FETCH answer held no message".to_string();
    match f.fetch(uids, part).await {
        Ok(v) => got
            .bodies
            .extend(v.into_iter().map(|(u, raw)| (u, (raw, truncated)))),
        Err(e) => match refused(&e) {
            Some(words) => {
                why = words.to_string();
                tracing::warn!(uids = uids.len(), error = %why, "the server refused a FETCH; fetching one message at a time");
            }
            None => return Err(e),
        },
    }
    for &uid in uids {
        if got.bodies.contains_key(&uid) {
            continue;
        }
        let mut body = None;
        for _ in 0..FETCH_ATTEMPTS {
            match f.fetch(&[uid], part).await {
                Ok(mut v) if !v.is_empty() => {
                    body = v.pop().map(|(_, raw)| raw);
                    break;
                }
                Ok(_) => {}
                Err(e) => match refused(&e) {
                    Some(words) => why = words.to_string(),
                    None => return Err(e),
                },
            }
        }
        match body {
            Some(raw) => {
                got.bodies.insert(uid, (raw, truncated));
            }
            None if f.contains(uid).await? => {
                tracing::error!(uid, error = %why, "the server will not give this message; quarantined");
                got.refused
                    .insert(uid, format!("the server would not FETCH uid {uid}: {why}"));
            }
            None => {} // expunged meanwhile
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
