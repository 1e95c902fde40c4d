//! escalator: an email-driven escalation gateway.
//!
//! # Layout
//!
//! Data flows one way: mailbox → parse → thread → store → policy →
//! outbox → SMTP. Imports follow it: the pure modules (message, thread,
//! policy, ...) import no worker; the store imports only the records and
//! the pure modules it indexes for; the workers (ingest, scheduler,
//! outbox, digest, admin) sit on top and write through
//! [`store::Store::transact`], with [`effects::step`] as the one way a
//! changed case and its mails are written.
//!
//! - [`config`]: the TOML file, validated; errors name their key. Its
//!   queues (`[[mailboxes]]`) each have a mailbox, an address and an
//!   escalation path. A folder: the types (`mod.rs`), the raw TOML
//!   (`raw.rs`), validation one function per section (`validate/`), the
//!   summary (`summary.rs`).
//! - [`mailbox`]: one IMAP watcher per queue (IDLE or polling),
//!   resumable by UID. The fetch planning (`fetch.rs`: chunks, size
//!   rounds, refused and troubled UIDs) works over a `Folder` trait
//!   (`folder.rs`), the IMAP session in the daemon and a folder in
//!   memory in its unit tests.
//! - [`message`]: raw bytes → [`message::InboundMail`] (pure, total).
//! - [`authres`]: which Authentication-Results to trust (pure).
//! - [`suppress`]: which mail must get no automatic answer (pure).
//! - [`bounce`]: delivery-status notifications read into recipients,
//!   statuses and the quoted Message-ID (pure).
//! - [`thread`]: which case a message belongs to (pure).
//! - [`case`]: the case record (its queue, tier, timers) and its history.
//! - [`record`]: the other plain records the store keeps (messages,
//!   outbox entries, quarantine, cursors).
//! - [`policy`]: deadlines, ETAs and what to send (pure).
//! - [`quote`]: where a reply's new text ends; the marker of staff mail (pure).
//! - [`template`]: admin-editable message texts (pure).
//! - [`locale`]: dates and waits in words in each template language (pure).
//! - [`language`]: which language a customer gets, from what is known
//!   of them and their mail (pure).
//! - [`stats`]: KPIs from per-case facts (pure).
//! - [`store`]: one typed interface to everything kept, transactions
//!   included; its engines (sled, PostgreSQL) and their encoding live
//!   inside it.
//! - [`effects`]: the policy's actions as outbox entries, and the case
//!   step every worker uses.
//! - [`mailtext`]: what each mail says (subject and body of every kind).
//! - [`credentials`]: where a login's OAuth 2 access token comes from
//!   (a token file or command, or an identity's grant through
//!   [`credentials::AccessTokens`]); a leaf the mail clients use.
//! - [`oauth`]: OAuth 2 identities (`[oauth2.NAME]`): the logins with
//!   the provider (`flow`), the grants in the store sealed with a key kept
//!   outside it (`vault`), access tokens refreshed ahead of expiry by one
//!   node at a time (`broker`), the daemon's keeper, `auth login`.
//! - [`handle`]: what the workers share (store, config, clock, wake-ups).
//! - [`ingest`]: one message through parse/thread/policy into one store
//!   transaction.
//! - [`scheduler`]: case timers, pruning, and the digest's period.
//! - [`wake`]: the wake-up handles the workers share (a leaf).
//! - [`digest`]: the review digest mail.
//! - [`metrics`]: Prometheus counters and the `/metrics` endpoint.
//! - [`tls`]: the rustls client config IMAP and SMTP share.
//! - [`outbox`]: persisted outgoing mail, sent at most once per entry
//!   mark, retried with backoff.
//! - [`cluster`]: several daemons on one PostgreSQL store: heartbeats,
//!   mailbox leases with fencing tokens, which node watches what.
//! - [`app`]: wires the workers, runs them until shutdown.
//! - [`preflight`]: `check-config --connect`: logs in to every endpoint
//!   the config names, sends nothing, says what to change.
//! - [`admin`]: what the CLI prints and changes (cases, outbox,
//!   quarantine, reports), shared by the CLI and the daemon's control
//!   socket; one function per request, on the workers' [`handle::Handle`].

pub mod admin;
pub mod app;
pub mod authres;
pub mod bounce;
pub mod calendar;
pub mod case;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod credentials;
pub mod digest;
pub mod effects;
pub mod fault;
/// The test config text, shared by the unit tests and the fuzz entry.
#[cfg(any(test, feature = "fuzzing"))]
mod fixture;
/// The fuzz target's entry (fuzz/): built for tests and with the
/// `fuzzing` feature only, not into the daemon.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod handle;
pub mod ingest;
pub mod language;
pub mod locale;
pub mod mailbox;
pub mod mailtext;
pub mod message;
pub mod metrics;
pub mod oauth;
pub mod outbox;
pub mod policy;
pub mod preflight;
pub mod quote;
pub mod record;
pub mod scheduler;
pub mod stats;
pub mod store;
pub mod suppress;
pub mod template;
#[cfg(test)]
pub mod testing;
pub mod thread;
pub mod tls;
pub mod wake;

/// An error with all its causes, "a: b: c", for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// What a caught panic said, for the record kept with the parked work.
pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs blocking work (a store transaction) without holding up the other
/// tasks of a runtime worker: on a multi-thread runtime the worker hands
/// its other tasks over first (a lease renewal must not wait behind an
/// ingest commit); elsewhere (a plain thread, the blocking pool, a
/// single-thread runtime in paused-time tests) it just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
