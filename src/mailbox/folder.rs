//! The IMAP commands the fetch planning needs, as a trait: the watcher
//! plans over any [`Folder`], the daemon's is an IMAP session
//! ([`ImapFolder`]), and the unit tests' is a folder in memory
//! (`mailbox::fetch::tests`), so cursors, chunks and troubled UIDs are
//! tested without a server.

use std::collections::HashMap;

use futures::TryStreamExt;

use super::imap::{self, timed, ImapError, ImapSession};
use crate::config::Endpoint;

/// A folder as SELECT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    pub exists: u32,
    pub uid_validity: u32,
}

/// Which bytes of a message to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// Only the header: the message is over `max_message_size`.
    Header,
}

impl Part {
    fn item(self) -> &'static str {
        match self {
            Part::Whole => "BODY.PEEK[]",
            Part::Header => "BODY.PEEK[HEADER]",
        }
    }
}

/// An IMAP session as the fetch planning sees it. An error that is a
/// refusal (the server's NO or BAD: see [`refused`]) leaves the session
/// usable; any other error ends it.
// Only used with generics inside the crate, so the futures' Send bound
// is the caller's to see.
#[allow(async_fn_in_trait)]
pub trait Folder {
    /// Opens `folder` read-write; `key` is the config key that names it.
    async fn select(&mut self, folder: &str, key: &str) -> Result<Selected, ImapError>;
    /// The UIDs from `start` on (the server may add the last one below it).
    async fn uids_from(&mut self, start: u32) -> Result<Vec<u32>, ImapError>;
    /// Is `uid` still in the folder?
    async fn contains(&mut self, uid: u32) -> Result<bool, ImapError>;
    /// RFC822.SIZE of each of `uids` the server knows.
    async fn sizes(&mut self, uids: &[u32]) -> Result<HashMap<u32, u32>, ImapError>;
    /// The bytes of each of `uids` the server gives (only those asked for).
    async fn fetch(&mut self, uids: &[u32], part: Part) -> Result<Vec<(u32, Vec<u8>)>, ImapError>;
}

/// The server answered NO or BAD: it refuses this command, the
/// connection itself is fine.
pub fn refused(e: &ImapError) -> Option<&async_imap::error::Error> {
    match e {
        ImapError::Protocol(
            _,
            e @ (async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_)),
        ) => Some(e),
        _ => None,
    }
}

/// The daemon's [`Folder`]: a logged-in IMAP session, every command
/// under the endpoint's timeout.
pub struct ImapFolder<'a> {
    pub ep: &'a Endpoint,
    pub session: &'a mut ImapSession,
}

impl Folder for ImapFolder<'_> {
    async fn select(&mut self, folder: &str, key: &str) -> Result<Selected, ImapError> {
        let m = imap::select(self.ep, self.session, folder, key).await?;
        Ok(Selected {
            exists: m.exists,
            uid_validity: m.uid_validity.unwrap_or(0),
        })
    }

    async fn uids_from(&mut self, start: u32) -> Result<Vec<u32>, ImapError> {
        let found = timed(
            self.ep,
            "UID SEARCH",
            self.session.uid_search(format!("UID {start}:*")),
            |e| ImapError::Protocol("UID SEARCH", e),
        )
        .await?;
        Ok(found.into_iter().collect())
    }

    async fn contains(&mut self, uid: u32) -> Result<bool, ImapError> {
        let found = timed(
            self.ep,
            "UID SEARCH",
            self.session.uid_search(format!("UID {uid}")),
            |e| ImapError::Protocol("UID SEARCH", e),
        )
        .await?;
        Ok(found.contains(&uid))
    }

    async fn sizes(&mut self, uids: &[u32]) -> Result<HashMap<u32, u32>, ImapError> {
        let set = uid_set(uids);
        let session = &mut *self.session;
        let fetches = timed(
            self.ep,
            "UID FETCH",
            async {
                session
                    .uid_fetch(&set, "(UID RFC822.SIZE)")
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            },
            |e| ImapError::Protocol("UID FETCH", e),
        )
        .await?;
        Ok(fetches
            .iter()
            .filter_map(|f| Some((f.uid?, f.size.unwrap_or(0))))
            .collect())
    }

    async fn fetch(&mut self, uids: &[u32], part: Part) -> Result<Vec<(u32, Vec<u8>)>, ImapError> {
        let set = uid_set(uids);
        let query = format!("(UID {})", part.item());
        let session = &mut *self.session;
        // Drain the whole response before the next command.
        let fetches = timed(
            self.ep,
            "UID FETCH",
            async {
                session
                    .uid_fetch(&set, &query)
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            },
            |e| ImapError::Protocol("UID FETCH", e),
        )
        .await?;
        let wanted: std::collections::HashSet<u32> = uids.iter().copied().collect();
        Ok(fetches
            .iter()
            .filter_map(|f| {
                let uid = f.uid?;
                if !wanted.contains(&uid) {
                    return None;
                }
                let raw = f.body().or_else(|| f.header())?;
                Some((uid, raw.to_vec()))
            })
            .collect())
    }
}

/// `1,3,5:9` from sorted UIDs.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}
