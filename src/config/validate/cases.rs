//! How cases are told apart, timed, closed and reported: `[cases]`,
//! `[calendar]`, `[resolution]`, `[templates]`, `[digest]`, `[metrics]`.

use std::time::Duration;

use super::Validator;
use crate::calendar::{self, Calendar};
use crate::config::raw::{
    RawCalendar, RawCases, RawDigest, RawLanguage, RawMetrics, RawResolution, RawTemplates,
};
use crate::config::{
    parse_mailbox, CalendarConfig, CasesConfig, DigestConfig, LanguageConfig, MetricsConfig,
    ResolutionConfig, Templates,
};

impl Validator<'_> {
    /// `[cases]`, with `instance` as given: its default (the main
    /// address) is known once the queues are, and is filled in then.
    pub(super) fn cases(&mut self, c: RawCases) -> (CasesConfig, Option<String>) {
        if c.subject_tag.trim().is_empty()
            || !c
                .subject_tag
                .chars()
                .all(|ch| ch.is_alphanumeric() || ch == '-' || ch == '_')
        {
            self.problem(
                "cases.subject_tag",
                "must be a single word of letters, digits, - or _",
            );
        }
        let mut support_addresses = Vec::new();
        for (i, a) in c.support_addresses.iter().enumerate() {
            match parse_mailbox(a) {
                Some((_, addr)) => support_addresses.push(addr),
                None => self.problem(
                    &format!("cases.support_addresses[{i}]"),
                    format!("{a:?} is not an address"),
                ),
            }
        }
        let auto_reply_window = self.duration("cases.auto_reply_window", &c.auto_reply_window);
        let instance = c.instance.clone();
        let authserv_id = self.authserv_id(&c);
        if instance
            .as_deref()
            .is_some_and(|i| i.chars().any(|ch| ch.is_control()))
        {
            self.problem("cases.instance", "must not contain control characters");
        }
        let cases = CasesConfig {
            subject_tag: c.subject_tag,
            support_addresses,
            auto_reply_limit: c.auto_reply_limit,
            auto_reply_global_limit: c.auto_reply_global_limit,
            auto_reply_window,
            instance: String::new(),
            require_dkim_pass: c.require_dkim_pass,
            authserv_id,
        };
        (cases, instance)
    }

    /// `cases.authserv_id` (lower-cased), required by
    /// `cases.require_dkim_pass`.
    fn authserv_id(&mut self, c: &RawCases) -> Option<String> {
        let authserv_id = c
            .authserv_id
            .as_deref()
            .map(|a| a.trim().to_ascii_lowercase())
            .filter(|a| !a.is_empty());
        if let Some(a) = &authserv_id {
            if a.contains(|ch: char| ch.is_whitespace() || ch == ';') {
                self.problem(
                    "cases.authserv_id",
                    format!("{a:?} is not an authserv-id (one token, like \"mx.example.com\")"),
                );
            }
        }
        if c.require_dkim_pass && authserv_id.is_none() {
            self.problem(
                "cases.authserv_id",
                "required when cases.require_dkim_pass = true: the authserv-id your receiving \
                 server writes in its Authentication-Results headers (often its host name); \
                 results from anyone else are not trusted",
            );
        }
        authserv_id
    }

    /// `[calendar]`: the time zone, business hours and holidays.
    pub(super) fn calendar(&mut self, raw: &RawCalendar) -> CalendarConfig {
        let timezone = match raw.timezone.as_deref() {
            None => chrono_tz::UTC,
            Some(name) => match name.parse::<chrono_tz::Tz>() {
                Ok(tz) => tz,
                Err(_) => {
                    self.problem(
                        "calendar.timezone",
                        format!(
                            "unknown time zone {name:?}; use an IANA name like \"Europe/Berlin\""
                        ),
                    );
                    chrono_tz::UTC
                }
            },
        };
        let mut business = Calendar::always(timezone);
        if !raw.hours.is_empty() {
            let mut week: [Vec<(chrono::NaiveTime, chrono::NaiveTime)>; 7] = Default::default();
            for (i, h) in raw.hours.iter().enumerate() {
                match calendar::parse_hours(h) {
                    Ok((days, ranges)) => {
                        for d in days {
                            week[d].extend(ranges.iter().copied());
                        }
                    }
                    Err(e) => self.problem(&format!("calendar.hours[{i}]"), e),
                }
            }
            business.hours = Some(week);
        }
        for (i, d) in raw.holidays.iter().enumerate() {
            match d.parse::<chrono::NaiveDate>() {
                Ok(d) => {
                    business.holidays.insert(d);
                }
                Err(_) => self.problem(
                    &format!("calendar.holidays[{i}]"),
                    format!("{d:?} is not a date; write YYYY-MM-DD"),
                ),
            }
        }
        CalendarConfig { timezone, business }
    }

    /// `[resolution]`: when cases close, reopen, and ask for a rating.
    pub(super) fn resolution(&mut self, res: RawResolution) -> ResolutionConfig {
        ResolutionConfig {
            auto_resolve_after: res
                .auto_resolve_after
                .as_deref()
                .map(|d| self.duration("resolution.auto_resolve_after", d)),
            reopen_within: self.duration("resolution.reopen_within", &res.reopen_within),
            survey: res.survey,
        }
    }

    /// `[templates]`: the built-in set overlaid with the files of `dir`
    /// (and the older `ack` key's body-only file), each checked now by
    /// rendering it with sample values.
    pub(super) fn templates(&mut self, raw: RawTemplates) -> Templates {
        let dir = raw.dir.map(|d| self.path(&d));
        let ack = raw.ack.map(|a| self.path(&a));
        match crate::template::Templates::load(dir.as_deref(), ack.as_deref()) {
            Ok(set) => Templates {
                dir,
                set: std::sync::Arc::new(set),
            },
            Err(problems) => {
                for (key, p) in problems {
                    self.problem(key, p);
                }
                Templates::default()
            }
        }
    }

    /// `[language]`: default, detect, staff, domains.
    pub(super) fn languages(&mut self, raw: RawLanguage) -> LanguageConfig {
        let mut out = LanguageConfig::default();
        if let Some(l) = raw.default {
            out.default = self.language("language.default", &l);
        }
        if let Some(l) = raw.staff {
            out.staff = self.language("language.staff", &l);
        }
        out.detect = raw.detect.unwrap_or(true);
        for (domain, tag) in raw.domains {
            let key = format!("language.domains.{domain:?}");
            let name = domain.trim().trim_start_matches('@').to_ascii_lowercase();
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                self.problem(&key, "not a domain name such as \"example.de\"");
                continue;
            }
            let lang = self.language(&key, &tag);
            out.domains.insert(name, lang);
        }
        out
    }

    /// A language tag (`de`, `pt-BR`), normalised as template files
    /// name it.
    pub(super) fn language(&mut self, key: &str, tag: &str) -> String {
        match crate::template::exact_lang(tag) {
            Some(l) => l,
            None => {
                self.problem(
                    key,
                    format!(
                        "{:?} is not a language tag such as \"de\" or \"pt-BR\"",
                        crate::template::printable(tag)
                    ),
                );
                "en".into()
            }
        }
    }

    /// `[digest]`: to whom, how often.
    pub(super) fn digest(&mut self, d: RawDigest) -> DigestConfig {
        let to = self.addresses("digest.to", &d.to, false);
        if d.to.is_empty() {
            self.problem("digest.to", "give at least one address");
        }
        let every = self.duration("digest.every", &d.every);
        if every < Duration::from_secs(60) && !every.is_zero() {
            self.problem("digest.every", "must be at least 1m");
        }
        DigestConfig { to, every }
    }

    /// `[metrics]`: where the Prometheus endpoint listens, if anywhere.
    pub(super) fn metrics(&mut self, raw: &RawMetrics) -> MetricsConfig {
        MetricsConfig {
            listen: match raw.listen.as_deref() {
                None | Some("") => None,
                Some(text) => match text.parse::<std::net::SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.problem(
                            "metrics.listen",
                            format!("{text:?} is not an address:port such as \"127.0.0.1:9187\""),
                        );
                        None
                    }
                },
            },
        }
    }
}
