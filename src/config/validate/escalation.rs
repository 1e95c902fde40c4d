//! Who answers and when: `[[tiers]]` (their staff, deadlines and
//! reminders), `[repeat_customer]` and `[[triggers]]`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Validator;
use crate::config::raw::{RawRepeat, RawTier, RawTimeline, RawTrigger};
use crate::config::{RepeatConfig, TierConfig, Timeline, TriggerConfig, WarnBefore};

impl Validator<'_> {
    /// `[[tiers]]`, in escalation order: at least one, each name once.
    pub(super) fn tiers(&mut self, raw: Vec<RawTier>) -> Vec<TierConfig> {
        if raw.is_empty() {
            self.problem("tiers", "at least one [[tiers]] is needed");
        }
        let mut tiers = Vec::new();
        let n_tiers = raw.len();
        for (i, t) in raw.into_iter().enumerate() {
            let key = format!("tiers[{i}]");
            if t.name.trim().is_empty() {
                self.problem(&format!("{key}.name"), "must not be empty");
            }
            if tiers.iter().any(|x: &TierConfig| x.name == t.name) {
                self.problem(
                    &format!("{key}.name"),
                    format!("tier {:?} is defined twice", t.name),
                );
            }
            let tier = self.tier(&key, t, i + 1 == n_tiers);
            tiers.push(tier);
        }
        tiers
    }

    /// One tier, under `key`; `top` when it is the last.
    fn tier(&mut self, key: &str, t: RawTier, top: bool) -> TierConfig {
        let first_response = self.duration(&format!("{key}.first_response"), &t.first_response);
        let follow_up = match &t.follow_up {
            Some(f) => self.duration(&format!("{key}.follow_up"), f),
            None => first_response,
        };
        let timeline = Timeline {
            first_response,
            follow_up,
        };
        let priority = self.priority_timelines(key, t.priority, &timeline);
        let staff = self.addresses(&format!("{key}.staff"), &t.staff, true);
        let forward_to = self.addresses(&format!("{key}.forward_to"), &t.forward_to, false);
        let warn_before = t
            .warn_before
            .as_deref()
            .map(|w| self.warn_before(&format!("{key}.warn_before"), w));
        let resolve_within = t
            .resolve_within
            .as_deref()
            .map(|r| self.duration(&format!("{key}.resolve_within"), r));
        let renotify = match &t.renotify {
            Some(r) => self.duration(&format!("{key}.renotify"), r),
            None => first_response,
        };
        if renotify < Duration::from_secs(1) && top {
            self.problem(&format!("{key}.renotify"), "must be at least 1s");
        }
        TierConfig {
            name: t.name,
            staff,
            forward_to,
            timeline,
            priority,
            resolve_within,
            warn_before,
            renotify,
        }
    }

    /// A tier's `priority.NAME` timelines (names lower-cased), each key
    /// left out taken from the tier's own `timeline`.
    fn priority_timelines(
        &mut self,
        key: &str,
        raw: BTreeMap<String, RawTimeline>,
        timeline: &Timeline,
    ) -> BTreeMap<String, Timeline> {
        let mut priority = BTreeMap::new();
        for (name, p) in raw {
            let pk = format!("{key}.priority.{name}");
            let tl = Timeline {
                first_response: match &p.first_response {
                    Some(f) => self.duration(&format!("{pk}.first_response"), f),
                    None => timeline.first_response,
                },
                follow_up: match &p.follow_up {
                    Some(f) => self.duration(&format!("{pk}.follow_up"), f),
                    None => timeline.follow_up,
                },
            };
            priority.insert(name.to_lowercase(), tl);
        }
        priority
    }

    /// `warn_before`: a duration, or a percentage of the wait.
    fn warn_before(&mut self, wk: &str, w: &str) -> WarnBefore {
        match w.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if (1..100).contains(&p) => WarnBefore::Percent(p),
                _ => {
                    self.problem(wk, format!("{w:?}: a percentage from 1% to 99%"));
                    WarnBefore::Percent(80)
                }
            },
            None => WarnBefore::Before(self.duration(wk, w)),
        }
    }

    /// `[repeat_customer]`: None (with a problem) when its tier is not
    /// one of `tiers`.
    pub(super) fn repeat_customer(
        &mut self,
        r: RawRepeat,
        tiers: &[TierConfig],
    ) -> Option<RepeatConfig> {
        let within = self.duration("repeat_customer.within", &r.within);
        if r.cases < 1 {
            self.problem("repeat_customer.cases", "must be at least 1");
        }
        match tiers.iter().position(|t| t.name == r.tier) {
            Some(tier) => Some(RepeatConfig {
                cases: r.cases,
                within,
                tier,
                unanswered: r.unanswered,
            }),
            None => {
                self.problem(
                    "repeat_customer.tier",
                    format!("no tier named {:?}", r.tier),
                );
                None
            }
        }
    }

    /// `[[triggers]]`, in order.
    pub(super) fn triggers(&mut self, raw: Vec<RawTrigger>) -> Vec<TriggerConfig> {
        raw.into_iter()
            .enumerate()
            .map(|(i, t)| self.trigger(&format!("triggers[{i}]"), t))
            .collect()
    }

    /// One trigger: what it matches (phrases, senders, headers) and what
    /// it does (escalate, set a priority).
    fn trigger(&mut self, key: &str, t: RawTrigger) -> TriggerConfig {
        if t.phrases.is_empty() && t.senders.is_empty() && t.headers.is_empty() {
            self.problem(key, "give phrases, senders or headers");
        }
        if !t.escalate && t.priority.is_none() {
            self.problem(
                key,
                "say what it does: escalate = true, or priority = \"...\"",
            );
        }
        let mut headers = Vec::new();
        for (j, h) in t.headers.iter().enumerate() {
            match h.split_once(':') {
                Some((n, v)) if !n.trim().is_empty() => {
                    headers.push((n.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase()))
                }
                _ => self.problem(
                    &format!("{key}.headers[{j}]"),
                    format!("{h:?}: write \"Name: value\", like \"Importance: high\""),
                ),
            }
        }
        if let Some(p) = &t.priority {
            if p.trim().is_empty() {
                self.problem(&format!("{key}.priority"), "must not be empty");
            }
        }
        TriggerConfig {
            phrases: t
                .phrases
                .iter()
                .map(|p| p.to_lowercase())
                .filter(|p| !p.trim().is_empty())
                .collect(),
            senders: self.addresses(&format!("{key}.senders"), &t.senders, true),
            headers,
            escalate: t.escalate,
            priority: t.priority.map(|p| p.to_lowercase()),
        }
    }
}
