//! Whether each SMTP server takes this node's mail. A refusal of the
//! configuration (the login, the sender address, TLS) would meet every
//! mail through that server alike, so it is not any mail's fault: it is
//! logged when it begins or changes, recorded in the store for `stats`
//! (per server and node), shown by the gauge `escalator_smtp_refused`,
//! and that server is left alone until its backoff ends (1 minute,
//! doubling to 15: a wrong password must not get the account locked).
//! Mail through the other servers goes on; nothing is failed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::record::SmtpProblem;
use crate::store::{Store, StoreError};

#[derive(Default)]
pub struct SmtpHealth {
    /// This node's name in the records (empty with the embedded store).
    node: String,
    /// By server (its config section: `smtp`, `mailboxes[1].smtp`).
    servers: Mutex<HashMap<String, Health>>,
}

#[derive(Clone)]
enum Health {
    /// Mail went out since this process started.
    Fine,
    Refused {
        why: String,
        since: DateTime<Utc>,
        /// Refusals in a row.
        times: u32,
        /// Not tried again before this.
        retry_at: DateTime<Utc>,
    },
}

/// The wait after the `times`-th refusal in a row.
fn backoff(times: u32) -> Duration {
    Duration::from_secs((60u64 << times.saturating_sub(1).min(4)).min(900))
}

impl SmtpHealth {
    /// This node's name (empty with the embedded store).
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn new(node: String) -> SmtpHealth {
        SmtpHealth {
            node,
            servers: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Health>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Until when `server` is left alone (it refused us, and its
    /// backoff has not ended).
    pub fn blocked(&self, server: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.lock().get(server) {
            Some(Health::Refused { retry_at, .. }) if *retry_at > now => Some(*retry_at),
            _ => None,
        }
    }

    /// Each refusing server's words, for `run --once`'s error.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .lock()
            .values()
            .filter_map(|h| match h {
                Health::Refused { why, .. } => Some(why.clone()),
                Health::Fine => None,
            })
            .collect();
        out.sort();
        out
    }

    fn gauge(map: &HashMap<String, Health>) {
        let refused = map.values().any(|h| matches!(h, Health::Refused { .. }));
        crate::metrics::METRICS
            .smtp_refused
            .store(refused as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Notes a refusal by `server`; until when it is left alone. Changes
    /// only memory: the caller records the mail first, then calls
    /// [`SmtpHealth::record`].
    pub fn refused(&self, server: &str, why: &str, now: DateTime<Utc>) -> DateTime<Utc> {
        let mut map = self.lock();
        let (since, times, changed) = match map.get(server) {
            Some(Health::Refused {
                why: old,
                since,
                times,
                ..
            }) => (*since, times + 1, old != why),
            _ => (now, 1, true),
        };
        let retry_at = now + chrono::Duration::from_std(backoff(times)).unwrap_or_default();
        map.insert(
            server.to_string(),
            Health::Refused {
                why: why.to_string(),
                since,
                times,
                retry_at,
            },
        );
        Self::gauge(&map);
        if changed {
            tracing::error!(server, error = %why, "the SMTP server refuses this configuration; its mail stays queued until it is fixed");
        }
        retry_at
    }

    /// Writes `server`'s refusal to the store (each time: another node's
    /// success may have cleared it).
    pub fn record(&self, store: &Store, server: &str) -> Result<(), StoreError> {
        let problem = match self.lock().get(server) {
            Some(Health::Refused { why, since, .. }) => SmtpProblem {
                node: self.node.clone(),
                server: server.to_string(),
                error: why.clone(),
                since: *since,
            },
            _ => return Ok(()),
        };
        store.set_smtp_problem(&problem)
    }

    /// Mail went out through `server`: its refusal, if any, is over, for
    /// every node (one that still fails records it again at its next
    /// try). The first success of a process also clears what an earlier
    /// run left.
    pub fn works(&self, store: &Store, server: &str) -> Result<(), StoreError> {
        let before = self.lock().get(server).cloned();
        if matches!(before, Some(Health::Fine)) {
            return Ok(());
        }
        store.clear_smtp_problems(server)?;
        if matches!(before, Some(Health::Refused { .. })) {
            tracing::info!(server, "the SMTP server accepts mail again");
        }
        let mut map = self.lock();
        map.insert(server.to_string(), Health::Fine);
        Self::gauge(&map);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_from_a_minute_to_fifteen() {
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480, 900, 900, 900]);
    }

    #[test]
    fn a_refusal_blocks_only_its_own_server_until_its_backoff_ends() {
        let h = SmtpHealth::new(String::new());
        let now = DateTime::parse_from_rfc3339("2026-12-04T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let until = h.refused("mailboxes[1].smtp", "535 bad credentials", now);
        assert_eq!(until, now + chrono::Duration::seconds(60));
        assert_eq!(h.blocked("mailboxes[1].smtp", now), Some(until));
        assert_eq!(h.blocked("smtp", now), None, "other servers go on");
        assert_eq!(
            h.blocked("mailboxes[1].smtp", until),
            None,
            "tried again then"
        );
        let later = h.refused("mailboxes[1].smtp", "535 bad credentials", until);
        assert_eq!(later, until + chrono::Duration::seconds(120));
        assert_eq!(h.problems(), ["535 bad credentials"]);
    }
}
