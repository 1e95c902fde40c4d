//! The parse → thread → policy path as one function over arbitrary bytes,
//! for `cargo fuzz` (fuzz/) and for the smoke run in the test suite. It
//! must never panic, whatever the bytes.

use std::collections::HashMap;
use std::path::Path;

use chrono::DateTime;

use crate::case::{Case, CaseId};
use crate::config::Config;
use crate::policy::{self, Ctx, Role};
use crate::thread::{self, Lookup, Parties};

/// Appended to the loopback connections of [`crate::fixture`].
const CONFIG: &str = r#"
[calendar]
timezone = "Europe/Berlin"
hours = ["mon-fri 09:00-17:30"]
[[tiers]]
name = "Frontline"
staff = ["agent@example.test"]
first_response = "4h"
warn_before = "50%"
[[tiers]]
name = "Tier 2"
forward_to = ["tier2@example.test"]
first_response = "8h"
[repeat_customer]
cases = 2
within = "30d"
tier = "Tier 2"
unanswered = 3
[[triggers]]
phrases = ["supervisor", "lawyer"]
escalate = true
[[triggers]]
headers = ["X-Priority: 1"]
priority = "urgent"
[tiers.priority.urgent]
first_response = "1h"
"#;

/// A store stand-in that remembers one earlier message.
struct Memory {
    ids: HashMap<String, CaseId>,
    cases: HashMap<CaseId, Case>,
}

impl Lookup for Memory {
    type Error = std::convert::Infallible;
    fn is_stored(&self, _: &str, _: &str) -> Result<bool, Self::Error> {
        Ok(false)
    }
    fn cases_with_message_id(&self, id: &str) -> Result<Vec<CaseId>, Self::Error> {
        Ok(self.ids.get(id).copied().into_iter().collect())
    }
    fn cases_referring_to(&self, _: &str) -> Result<Vec<CaseId>, Self::Error> {
        Ok(Vec::new())
    }
    fn case(&self, id: CaseId) -> Result<Option<Case>, Self::Error> {
        Ok(self.cases.get(&id).cloned())
    }
}

/// Runs `data` through parse, thread and policy, twice: as a first
/// message and as a reply in the case the first one opened.
pub fn parse_thread(data: &[u8]) {
    let Ok(config) = Config::parse(
        &crate::fixture::config_text(Path::new("/nonexistent"), "", CONFIG),
        Path::new("/fuzz.toml"),
    ) else {
        return;
    };
    let now = DateTime::from_timestamp(1_795_000_000, 0).unwrap_or_default();
    let key = [3u8; 32];
    let support = config.support_addresses();
    let is_staff = |a: &str| config.tiers.iter().any(|t| t.is_staff(a));
    let parties = Parties {
        support: &support,
        is_staff: &is_staff,
    };
    let mail = crate::message::parse(data);
    let mut memory = Memory {
        ids: HashMap::new(),
        cases: HashMap::new(),
    };
    let _ = thread::decide(&mail, &memory, &parties, "Case", &key);
    let suppressed = crate::suppress::classify(&mail, &support);
    let ctx = Ctx {
        config: &config,
        now,
    };
    let mut case = policy::open_case(1, &mail, &config, "default", now);
    let _ = policy::on_new_case(&mut case, &mail, suppressed.as_ref(), 2, &ctx);
    memory.ids.insert(mail.message_id.clone(), 1);
    memory.cases.insert(1, case.clone());
    let _ = thread::decide(&mail, &memory, &parties, "Case", &key);
    for role in [Role::Customer, Role::Staff, Role::SupportAgent] {
        let mut c = case.clone();
        let _ = policy::on_message(&mut c, &mail, role, suppressed.as_ref(), &ctx);
        let _ = policy::on_timer(
            &mut c,
            &Ctx {
                config: &config,
                now: now + chrono::Duration::days(30),
            },
        );
    }
    let _ = crate::outbox::compose::compose(
        &crate::outbox::compose::Envelope {
            from_name: Some(&mail.subject),
            from: "support@example.test",
            to_name: mail.from.as_ref().and_then(|a| a.name.as_deref()),
            to: &case.customer,
            subject: &mail.subject,
            message_id: &mail.message_id,
            in_reply_to: Some(&mail.message_id),
            references: mail.references.clone(),
            auto_submitted: Some("auto-replied"),
            reply_to: None,
            attachments: vec![data.to_vec()],
            instance: "fuzz",
            case_id: 1,
            date: now,
            // Hostile text where a language tag goes, and as HTML.
            language: Some(&mail.subject),
            html: Some(&mail.text),
        },
        &mail.text,
    );
}

#[cfg(test)]
mod tests {
    /// The fuzz target's smoke run: the corpus (when present), every
    /// corpus file cut and bit-flipped by a seeded generator, and noise.
    #[test]
    fn fuzz_smoke_parse_thread_never_panics() {
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            } else if p.extension().is_some_and(|e| e == "eml") {
                if let Ok(b) = std::fs::read(&p) {
                    inputs.push(b);
                }
            }
        }
        inputs.push(
            b"From: a@b.c\r\nSubject: [Case #1] supervisor\r\nX-Priority: 1\r\n\r\nhi\r\n".to_vec(),
        );
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = inputs.clone();
        for _ in 0..3000 {
            let mut m = base[(next() as usize) % base.len()].clone();
            for _ in 0..(next() % 8) {
                if m.is_empty() {
                    break;
                }
                let i = (next() as usize) % m.len();
                match next() % 4 {
                    0 => m[i] ^= 1 << (next() % 8),
                    1 => m.truncate(i),
                    2 => m.insert(i, (next() % 256) as u8),
                    _ => {
                        let j = (next() as usize) % m.len();
                        let chunk: Vec<u8> = m[i.min(j)..i.max(j)].to_vec();
                        m.splice(i..i, chunk);
                    }
                }
            }
            inputs.push(m);
        }
        for _ in 0..200 {
            let len = (next() % 2000) as usize;
            inputs.push((0..len).map(|_| (next() % 256) as u8).collect());
        }
        for input in &inputs {
            super::parse_thread(input);
        }
        assert!(inputs.len() > 3000);
    }
}
