//! From the TOML's `RawConfig` to a `Config`: each section checked in
//! turn, every problem collected (naming its key), so one run of
//! `check-config` lists them all.
//!
//! [`Validator::config`] calls one function per section; they live in:
//! - `servers.rs`: `[smtp]` and what every server section shares (host,
//!   port, security, password, OAuth);
//! - `queues.rs`: `[mailbox]` / `[[mailboxes]]`, each queue's mailbox,
//!   address, escalation path and SMTP server;
//! - `escalation.rs`: `[[tiers]]`, `[repeat_customer]`, `[[triggers]]`;
//! - `cases.rs`: `[cases]`, `[calendar]`, `[resolution]`, `[templates]`,
//!   `[digest]`, `[metrics]`;
//! - `oauth.rs`: `[oauth2]`, its identities and what each provider
//!   refuses;
//! - `store.rs`: `[store]` and `[cluster]`, with the claim that must
//!   cover the longest send.

mod cases;
mod escalation;
mod oauth;
mod queues;
mod servers;
mod store;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::RawConfig;
use super::{parse_duration, parse_mailbox, CasesConfig, Config, Queues, SmtpConfig};

/// Validates `raw`, read from `source` (relative paths are taken from
/// its folder): the config, or every problem found.
pub(super) fn config(raw: RawConfig, source: &Path) -> Result<Config, Vec<String>> {
    let base = source.parent().unwrap_or(Path::new("."));
    let mut v = Validator {
        problems: Vec::new(),
        base,
    };
    let config = v.config(raw, source);
    match config {
        Some(c) if v.problems.is_empty() => Ok(c),
        _ => Err(v.problems),
    }
}

/// Collects the problems of one config file, section by section.
struct Validator<'a> {
    problems: Vec<String>,
    /// The config file's folder: relative paths are taken from it.
    base: &'a Path,
}

impl Validator<'_> {
    /// The whole config, one section after the other. Problems are
    /// listed in the order of these calls: the queues come after the
    /// tiers (they name them), the store after the queues (with no queue
    /// at all, that is the one problem told after the queues'), and the
    /// cluster's claim last (it must cover the longest send, through any
    /// queue's server).
    fn config(&mut self, raw: RawConfig, source: &Path) -> Option<Config> {
        let (smtp, from_given) = self.smtp(raw.smtp);
        let (cases, instance) = self.cases(raw.cases);
        let calendar = self.calendar(&raw.calendar);
        let tiers = self.tiers(raw.tiers);
        let repeat_customer = raw
            .repeat_customer
            .and_then(|r| self.repeat_customer(r, &tiers));
        let digest = raw.digest.map(|d| self.digest(d));
        let metrics = self.metrics(&raw.metrics);
        let cluster = self.cluster(&raw.cluster);
        let triggers = self.triggers(raw.triggers);
        let resolution = self.resolution(raw.resolution);
        let templates = self.templates(raw.templates);
        let language = self.languages(raw.language);
        let oauth2 = self.oauth2(raw.oauth2);

        let queues = self.queues(
            raw.mailbox,
            raw.mailboxes,
            &tiers,
            (&smtp.from_name, &smtp.from),
        );
        // None (no queue) was refused above, naming the key.
        let queues = Queues::new(queues)?;
        self.escalated_tiers_forward(&queues, &tiers);
        if !from_given {
            self.every_queue_has_a_sender(&queues);
        }
        let instance = default_instance(instance, &smtp, &queues);

        let mut config = Config {
            source: source.to_owned(),
            queues,
            smtp,
            store: self.store(&raw.store),
            cases: CasesConfig { instance, ..cases },
            calendar,
            tiers,
            repeat_customer,
            triggers,
            resolution,
            templates,
            language,
            digest,
            metrics,
            cluster,
            oauth2,
        };
        self.identities_exist(&config);
        self.claim_covers_a_send(&raw.cluster, &mut config);
        Some(config)
    }

    fn problem(&mut self, key: &str, msg: impl fmt::Display) {
        self.problems.push(format!("{key}: {msg}"));
    }

    fn duration(&mut self, key: &str, text: &str) -> Duration {
        match parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.problem(key, e);
                Duration::ZERO
            }
        }
    }

    /// Lower-cased addresses; with `domains`, `@domain` entries too.
    fn addresses(&mut self, key: &str, list: &[String], domains: bool) -> Vec<String> {
        let mut out = Vec::new();
        for (i, a) in list.iter().enumerate() {
            let a = a.trim();
            if domains && a.starts_with('@') && a.len() > 1 && !a[1..].contains('@') {
                out.push(a.to_lowercase());
                continue;
            }
            match parse_mailbox(a) {
                Some((_, addr)) => out.push(addr),
                None => self.problem(&format!("{key}[{i}]"), format!("{a:?} is not an address")),
            }
        }
        out
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    /// `"Name <addr>"` or `addr` under `key`.
    fn address(&mut self, key: &str, text: &str) -> (Option<String>, String) {
        match parse_mailbox(text) {
            Some(x) => x,
            None => {
                self.problem(
                    key,
                    format!("{text:?} is not an address; write \"Support <support@example.com>\""),
                );
                (None, String::new())
            }
        }
    }
}

/// The loop header names this installation: `cases.instance`, or else
/// the main address (`[smtp] from`, or the first queue's).
fn default_instance(given: Option<String>, smtp: &SmtpConfig, queues: &Queues) -> String {
    given
        .or_else(|| Some(smtp.from.clone()).filter(|f| !f.is_empty()))
        .unwrap_or_else(|| queues.main().address.clone())
}
