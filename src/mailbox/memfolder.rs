//! A [`Folder`] in memory for the fetch planning's unit tests: messages
//! by UID, and the two ways a server fails on one message, refusing it
//! (NO, the session goes on) or hanging up on it (the session is gone).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::folder::{Folder, Part, Selected};
use super::imap::ImapError;

#[derive(Default)]
pub struct MemFolder {
    pub validity: u32,
    pub messages: BTreeMap<u32, Vec<u8>>,
    /// FETCH (and RFC822.SIZE) of a set holding one of these gets NO.
    pub refuse: HashSet<u32>,
    /// FETCH of a set holding one of these breaks the connection.
    pub hang_up: HashSet<u32>,
    /// Each FETCH as `what uids`, each search as `SEARCH start`.
    pub log: Vec<String>,
    /// Broken by a hang-up: every later command fails.
    pub closed: bool,
}

impl MemFolder {
    pub fn with(n: u32, size: usize) -> MemFolder {
        let messages = (1..=n)
            .map(|uid| (uid, super::tests::mail_of_size(uid, size)))
            .collect();
        MemFolder {
            validity: 7,
            messages,
            ..MemFolder::default()
        }
    }

    /// The FETCHes of message bytes, as `(part, uids)`.
    pub fn fetches(&self) -> Vec<(String, Vec<u32>)> {
        self.log
            .iter()
            .filter(|l| l.starts_with("FETCH"))
            .map(|l| {
                let mut words = l.split(' ').skip(1);
                let part = words.next().unwrap_or_default().to_string();
                let uids = words.map(|w| w.parse().unwrap_or(0)).collect();
                (part, uids)
            })
            .collect()
    }

    fn check(&self, uids: &[u32]) -> Result<(), ImapError> {
        if self.closed {
            return Err(ImapError::Closed);
        }
        if uids.iter().any(|u| self.refuse.contains(u)) {
            return Err(ImapError::Protocol(
                "UID FETCH",
                async_imap::error::Error::No("[SERVERBUG] cannot read message".into()),
            ));
        }
        Ok(())
    }
}

impl Folder for MemFolder {
    async fn select(&mut self, _folder: &str, _key: &str) -> Result<Selected, ImapError> {
        self.closed = false; // a new session
        Ok(Selected {
            exists: self.messages.len() as u32,
            uid_validity: self.validity,
        })
    }

    async fn uids_from(&mut self, start: u32) -> Result<Vec<u32>, ImapError> {
        self.log.push(format!("SEARCH {start}"));
        let mut found: Vec<u32> = self.messages.range(start..).map(|(u, _)| *u).collect();
        // RFC 9051: `n:*` holds the last message even when n is past it.
        if let Some((last, _)) = self.messages.last_key_value() {
            found.push(*last);
        }
        Ok(found)
    }

    async fn contains(&mut self, uid: u32) -> Result<bool, ImapError> {
        Ok(self.messages.contains_key(&uid))
    }

    async fn sizes(&mut self, uids: &[u32]) -> Result<HashMap<u32, u32>, ImapError> {
        self.check(uids)?;
        Ok(uids
            .iter()
            .filter_map(|u| Some((*u, self.messages.get(u)?.len() as u32)))
            .collect())
    }

    async fn fetch(&mut self, uids: &[u32], part: Part) -> Result<Vec<(u32, Vec<u8>)>, ImapError> {
        let words: Vec<String> = uids.iter().map(|u| u.to_string()).collect();
        self.log.push(format!("FETCH {part:?} {}", words.join(" ")));
        if uids.iter().any(|u| self.hang_up.contains(u)) {
            self.closed = true;
        }
        self.check(uids)?;
        Ok(uids
            .iter()
            .filter_map(|u| {
                let raw = self.messages.get(u)?;
                let raw = match part {
                    Part::Whole => raw.clone(),
                    Part::Header => {
                        let end = raw
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .map_or(raw.len(), |p| p + 4);
                        raw[..end].to_vec()
                    }
                };
                Some((*u, raw))
            })
            .collect())
    }
}
