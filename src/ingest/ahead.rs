//! A chunk's messages parsed before its transaction, so that what
//! threading them will look up is read from a shared store at once
//! ([`crate::store::Lookups`]) and each is parsed once, not again inside
//! the transaction (and again when a conflict runs it a second time).

use std::panic::{catch_unwind, AssertUnwindSafe};

use chrono::{DateTime, Utc};

use super::Item;
use crate::config::Config;
use crate::message::{self, InboundMail};
use crate::store::{Lookups, StoreError, Tx, Window};
use crate::suppress::recipient_key;

/// Each item parsed, where that is worth it: on a shared store, and
/// only for bytes (a refusal has none). A message whose parse panics is
/// left unparsed here; parsed again inside its guarded step, it is
/// quarantined there like any other failure that belongs to it.
pub(super) fn parse_all(items: &[Item<'_>], shared: bool) -> Vec<Option<InboundMail>> {
    items
        .iter()
        .map(|item| match item {
            Item::Bytes { raw, .. } if shared => {
                catch_unwind(AssertUnwindSafe(|| message::parse(raw))).ok()
            }
            _ => None,
        })
        .collect()
}

/// Reads ahead, inside `tx`, what ingesting `mails` will look up, with
/// the auto-reply window an acknowledgement sent `now` checks.
pub(super) fn read_ahead(
    tx: &Tx<'_>,
    mails: &[Option<InboundMail>],
    config: &Config,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let cited: Vec<Vec<&str>> = mails
        .iter()
        .flatten()
        .map(|m| {
            m.in_reply_to
                .iter()
                .chain(m.references.iter().rev())
                .map(String::as_str)
                .collect()
        })
        .collect();
    let senders: Vec<(&str, String)> = mails
        .iter()
        .flatten()
        .map(|m| {
            let sender = m.from.as_ref().map(|a| a.email.as_str()).unwrap_or("");
            (sender, recipient_key(sender))
        })
        .collect();
    let lookups: Vec<Lookups<'_>> = mails
        .iter()
        .flatten()
        .zip(&cited)
        .zip(&senders)
        .map(|((m, cited), (sender, recipient))| Lookups {
            message_id: &m.message_id,
            content_hash: &m.content_hash,
            cited,
            sender,
            recipient,
        })
        .collect();
    let window = chrono::Duration::from_std(config.cases.auto_reply_window)
        .ok()
        .map(|w| Window {
            since: now - w,
            at_most: config.cases.auto_reply_limit as usize,
        });
    tx.read_ahead(&lookups, window)
}
