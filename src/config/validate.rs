//! From the TOML's `RawConfig` to a `Config`: each section checked in
//! turn, every problem collected (naming its key), so one run of
//! `check-config` lists them all.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::*;
use crate::calendar;
use crate::template::TemplateKind;

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

/// The shortest claim when none is set, and what an unset claim adds to
/// the longest send.
pub(super) const DEFAULT_CLAIM: Duration = Duration::from_secs(120);
pub(super) const CLAIM_MARGIN: Duration = Duration::from_secs(30);

/// A name an SMTP server takes in EHLO: a domain name or an address
/// literal (RFC 5321 4.1.3).
fn valid_helo_name(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return match inner.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => inner.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

struct Validator<'a> {
    problems: Vec<String>,
    base: &'a Path,
}

impl Validator<'_> {
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

    #[allow(clippy::too_many_arguments)]
    fn endpoint(
        &mut self,
        section: &str,
        host: String,
        port: Option<u16>,
        security: Security,
        allow_insecure: bool,
        ca_file: Option<PathBuf>,
        username: Option<String>,
        secret: (Option<String>, Option<String>, Option<PathBuf>),
        timeout: &str,
        default_ports: (u16, u16),
    ) -> Endpoint {
        if host.trim().is_empty() {
            self.problem(&format!("{section}.host"), "must not be empty");
        }
        if security == Security::Plain && !allow_insecure && !is_loopback(&host) {
            self.problem(
                &format!("{section}.security"),
                format!(
                    "\"plain\" sends passwords and mail unencrypted; refused for \
                     non-loopback host {host:?} unless {section}.allow_insecure = true"
                ),
            );
        }
        let ca_file = ca_file.map(|p| self.path(&p));
        if let Some(p) = &ca_file {
            if !p.is_file() {
                self.problem(
                    &format!("{section}.ca_file"),
                    format!("no such file {}", p.display()),
                );
            }
        }
        let password = self.secret(section, secret);
        let port = port.unwrap_or(match security {
            Security::Tls => default_ports.0,
            _ => default_ports.1,
        });
        Endpoint {
            host,
            port,
            security,
            ca_file,
            username,
            password,
            section: section.to_string(),
            oauth: None,
            timeout: self.duration(&format!("{section}.timeout"), timeout),
        }
    }

    /// Checks `auth` and the OAuth token source of a section.
    fn oauth(
        &mut self,
        section: &str,
        mut ep: Endpoint,
        auth: Option<String>,
        file: Option<PathBuf>,
        command: Option<String>,
    ) -> Endpoint {
        let source = match (file, command) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{section}.oauth_token_file"),
                    "give only one of oauth_token_file, oauth_token_command",
                );
                None
            }
            (Some(f), None) => Some(TokenSource::File(self.path(&f))),
            (None, Some(c)) if !c.trim().is_empty() => Some(TokenSource::Command(c)),
            (None, Some(_)) => {
                self.problem(
                    &format!("{section}.oauth_token_command"),
                    "must not be empty",
                );
                None
            }
            (None, None) => None,
        };
        match auth.as_deref().unwrap_or("password") {
            "password" => {
                if source.is_some() {
                    self.problem(
                        &format!("{section}.auth"),
                        "an OAuth token source is set: write auth = \"xoauth2\"",
                    );
                }
            }
            "xoauth2" => {
                if ep.username.is_none() {
                    self.problem(&format!("{section}.username"), "XOAUTH2 needs the username");
                }
                match source {
                    Some(s) => ep.oauth = Some(s),
                    None => self.problem(
                        &format!("{section}.auth"),
                        "xoauth2 needs oauth_token_file or oauth_token_command",
                    ),
                }
            }
            other => self.problem(
                &format!("{section}.auth"),
                format!("unknown {other:?}; write \"password\" or \"xoauth2\""),
            ),
        }
        ep
    }

    fn secret(
        &mut self,
        section: &str,
        (plain, env_name, file): (Option<String>, Option<String>, Option<PathBuf>),
    ) -> Option<PasswordSource> {
        let given = [plain.is_some(), env_name.is_some(), file.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if given > 1 {
            self.problem(
                &format!("{section}.password"),
                "give only one of password, password_env, password_file",
            );
            return None;
        }
        if let Some(p) = plain {
            return Some(PasswordSource::Inline(Secret::new(p)));
        }
        if let Some(name) = env_name {
            if name.trim().is_empty() {
                self.problem(&format!("{section}.password_env"), "must not be empty");
            }
            return Some(PasswordSource::Env(name));
        }
        file.map(|f| PasswordSource::File(self.path(&f)))
    }

    /// An SMTP server's connection keys (`[smtp]`, or a queue's `smtp`).
    fn smtp_endpoint(&mut self, section: &str, s: RawSmtp) -> Endpoint {
        let ep = self.endpoint(
            section,
            s.host,
            s.port,
            s.security,
            s.allow_insecure,
            s.ca_file,
            s.username,
            (s.password, s.password_env, s.password_file),
            &s.timeout,
            (465, 587),
        );
        self.oauth(
            section,
            ep,
            s.auth,
            s.oauth_token_file,
            s.oauth_token_command,
        )
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

    /// `[store] engine` and its connection keys.
    fn store_engine(&mut self, s: &RawStore) -> StoreEngine {
        let postgres_only = [
            ("url", s.url.is_some()),
            ("url_env", s.url_env.is_some()),
            ("url_file", s.url_file.is_some()),
            ("security", s.security.is_some()),
            ("ca_file", s.ca_file.is_some()),
            ("allow_insecure", s.allow_insecure),
            ("pool", s.pool.is_some()),
        ];
        match s.engine.as_deref().unwrap_or("sled") {
            "sled" => {
                for (k, set) in postgres_only {
                    if set {
                        self.problem(&format!("store.{k}"), "only with engine = \"postgres\"");
                    }
                }
                StoreEngine::Sled
            }
            "postgres" => {
                let given = [s.url.is_some(), s.url_env.is_some(), s.url_file.is_some()]
                    .iter()
                    .filter(|b| **b)
                    .count();
                if given != 1 {
                    self.problem(
                        "store.url",
                        "engine = \"postgres\" needs exactly one of url_env (an environment \
                         variable), url_file (a file holding it) or url",
                    );
                }
                let url = match (&s.url, &s.url_env, &s.url_file) {
                    (_, Some(env), _) => PasswordSource::Env(env.clone()),
                    (_, _, Some(file)) => PasswordSource::File(self.path(file)),
                    (Some(u), _, _) => PasswordSource::Inline(Secret::new(u.clone())),
                    _ => PasswordSource::Env(String::new()),
                };
                let ca_file = s.ca_file.as_ref().map(|p| self.path(p));
                if let Some(p) = &ca_file {
                    if !p.is_file() {
                        self.problem("store.ca_file", format!("no such file {}", p.display()));
                    }
                }
                let pool = s.pool.unwrap_or(DEFAULT_POOL);
                if !(crate::store::MIN_POOL..=MAX_POOL).contains(&pool) {
                    self.problem(
                        "store.pool",
                        format!(
                            "{pool} connections: give {} to {MAX_POOL} (one runs the store's \
                             transactions, the others reads and the cluster's leases)",
                            crate::store::MIN_POOL
                        ),
                    );
                }
                StoreEngine::Postgres {
                    url,
                    security: s.security.unwrap_or(Security::Tls),
                    allow_insecure: s.allow_insecure,
                    ca_file,
                    pool,
                }
            }
            other => {
                self.problem(
                    "store.engine",
                    format!("{other:?} is not an engine: \"sled\" (the default) or \"postgres\""),
                );
                StoreEngine::Sled
            }
        }
    }

    /// The queues from `[mailbox]` (one, `default`) or `[[mailboxes]]`.
    fn queues(
        &mut self,
        single: Option<RawMailbox>,
        several: Option<Vec<RawMailbox>>,
        tiers: &[TierConfig],
        smtp_from: (&Option<String>, &String),
    ) -> Vec<QueueConfig> {
        let raw: Vec<(String, RawMailbox)> = match (single, several) {
            (Some(_), Some(_)) => {
                self.problem(
                    "mailboxes",
                    "give either one [mailbox] or [[mailboxes]], not both \
                     ([mailbox] is the same as one [[mailboxes]] named \"default\")",
                );
                return Vec::new();
            }
            (Some(m), None) => {
                let only_in_list = [
                    ("name", m.name.is_some()),
                    ("address", m.address.is_some()),
                    ("tiers", m.tiers.is_some()),
                    ("smtp", m.smtp.is_some()),
                ];
                for (k, set) in only_in_list {
                    if set {
                        self.problem(
                            &format!("mailbox.{k}"),
                            "only in [[mailboxes]]: [mailbox] is the one queue \"default\", \
                             sending from [smtp] from",
                        );
                    }
                }
                vec![("mailbox".to_string(), m)]
            }
            (None, Some(list)) => {
                if list.is_empty() {
                    self.problem("mailboxes", "at least one [[mailboxes]] is needed");
                }
                list.into_iter()
                    .enumerate()
                    .map(|(i, m)| (format!("mailboxes[{i}]"), m))
                    .collect()
            }
            (None, None) => {
                self.problem(
                    "mailbox",
                    "missing: give [mailbox], or one [[mailboxes]] per support address",
                );
                return Vec::new();
            }
        };
        let mut queues: Vec<QueueConfig> = Vec::new();
        for (key, m) in raw {
            let q = self.queue(&key, m, tiers, smtp_from);
            if queues.iter().any(|o| o.name == q.name) {
                self.problem(
                    &format!("{key}.name"),
                    format!("queue {:?} is defined twice", q.name),
                );
            }
            if let Some(o) = queues
                .iter()
                .find(|o| !q.address.is_empty() && o.address.eq_ignore_ascii_case(&q.address))
            {
                self.problem(
                    &format!("{key}.address"),
                    format!("{} is already the address of queue {:?}", q.address, o.name),
                );
            }
            let same_folder = |o: &QueueConfig| {
                let (a, b) = (&o.mailbox, &q.mailbox);
                a.endpoint.host.eq_ignore_ascii_case(&b.endpoint.host)
                    && a.endpoint.port == b.endpoint.port
                    && a.endpoint.username == b.endpoint.username
                    && a.folder == b.folder
            };
            if let Some(o) = queues.iter().find(|o| same_folder(o)) {
                self.problem(
                    &key,
                    format!(
                        "watches the same folder as queue {:?}: each message would be read twice",
                        o.name
                    ),
                );
            }
            queues.push(q);
        }
        queues
    }

    /// One queue: its mailbox and what it adds to it.
    fn queue(
        &mut self,
        key: &str,
        mut m: RawMailbox,
        tiers: &[TierConfig],
        (smtp_from_name, smtp_from): (&Option<String>, &String),
    ) -> QueueConfig {
        let name = match (&m.name, key) {
            (_, "mailbox") => "default".to_string(),
            (None, _) => {
                self.problem(
                    &format!("{key}.name"),
                    "missing: a short id for the queue, like \"billing\"",
                );
                String::new()
            }
            (Some(n), _) => {
                let ok = !n.is_empty()
                    && n.len() <= 32
                    && n.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
                    });
                if !ok {
                    self.problem(
                        &format!("{key}.name"),
                        format!("{n:?}: use up to 32 lower-case letters, digits, - or _"),
                    );
                }
                n.clone()
            }
        };
        let (from_name, address) = match &m.address {
            Some(a) => self.address(&format!("{key}.address"), a),
            None => (smtp_from_name.clone(), smtp_from.clone()),
        };
        let path = match &m.tiers {
            None => (0..tiers.len()).collect(),
            Some(names) => {
                if names.is_empty() {
                    self.problem(&format!("{key}.tiers"), "name at least one tier");
                }
                let mut path = Vec::new();
                for (j, n) in names.iter().enumerate() {
                    match tiers.iter().position(|t| &t.name == n) {
                        Some(i) if path.contains(&i) => self.problem(
                            &format!("{key}.tiers[{j}]"),
                            format!("tier {n:?} is named twice"),
                        ),
                        Some(i) => path.push(i),
                        None => {
                            let known: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
                            self.problem(
                                &format!("{key}.tiers[{j}]"),
                                format!(
                                    "no tier named {n:?} (the [[tiers]] are: {})",
                                    known.join(", ")
                                ),
                            );
                        }
                    }
                }
                path
            }
        };
        let smtp = m.smtp.take().map(|mut s| {
            let k = format!("{key}.smtp");
            for (field, set) in [
                ("from", s.from.take().is_some()),
                ("confirm_copies", s.confirm_copies.is_some()),
                ("confirm_wait", s.confirm_wait.is_some()),
                ("helo_name", s.helo_name.is_some()),
                ("max_per_connection", s.max_per_connection.is_some()),
            ] {
                if set {
                    self.problem(
                        &format!("{k}.{field}"),
                        "not here: the queue's address is its From, and \
                         confirmation copies and the SMTP session settings \
                         are set in [smtp] for every server",
                    );
                }
            }
            self.smtp_endpoint(&k, s)
        });
        let mailbox = self.mailbox(key, m);
        QueueConfig {
            name,
            mailbox,
            from_name,
            address,
            path,
            smtp,
        }
    }

    /// A queue's IMAP settings.
    fn mailbox(&mut self, key: &str, m: RawMailbox) -> MailboxConfig {
        let endpoint = self.endpoint(
            key,
            m.host,
            m.port,
            m.security,
            m.allow_insecure,
            m.ca_file,
            Some(m.username),
            (m.password, m.password_env, m.password_file),
            &m.timeout,
            (993, 143),
        );
        let endpoint = self.oauth(
            key,
            endpoint,
            m.auth,
            m.oauth_token_file,
            m.oauth_token_command,
        );
        if endpoint.password.is_none() && endpoint.oauth.is_none() {
            self.problem(
                &format!("{key}.password"),
                "IMAP needs a password (password_env, password_file or password) or auth = \"xoauth2\" with a token source",
            );
        }
        let poll_interval = self.duration(&format!("{key}.poll_interval"), &m.poll_interval);
        if poll_interval < Duration::from_secs(1) && parse_duration(&m.poll_interval).is_ok() {
            self.problem(&format!("{key}.poll_interval"), "must be at least 1s");
        }
        let max_message_size = match parse_size(&m.max_message_size) {
            Ok(n) => n,
            Err(e) => {
                self.problem(&format!("{key}.max_message_size"), e);
                0
            }
        };
        MailboxConfig {
            endpoint,
            folder: m.folder,
            poll_interval,
            idle: m.idle,
            max_message_size,
            sent_folder: m.sent_folder,
        }
    }

    fn config(&mut self, raw: RawConfig, source: &Path) -> Option<Config> {
        let mut s = raw.smtp;
        let confirm_copies = s.confirm_copies.unwrap_or(true);
        let confirm_wait = self.duration(
            "smtp.confirm_wait",
            &s.confirm_wait.clone().unwrap_or_else(default_confirm_wait),
        );
        let raw_from = s.from.take();
        let helo_name = s.helo_name.take();
        if let Some(h) = &helo_name {
            if !valid_helo_name(h) {
                self.problem(
                    "smtp.helo_name",
                    format!(
                        "{h:?} is not a host name (letters, digits, '-' and '.', like \
                         \"mail.example.com\") or an address literal (\"[192.0.2.1]\")"
                    ),
                );
            }
        }
        let max_per_connection = s.max_per_connection.unwrap_or(10);
        if max_per_connection == 0 {
            self.problem("smtp.max_per_connection", "must be at least 1");
        }
        let smtp_endpoint = self.smtp_endpoint("smtp", s);
        let (from_name, from) = match &raw_from {
            Some(f) => self.address("smtp.from", f),
            None => (None, String::new()),
        };

        let c = raw.cases;
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
        if instance
            .as_deref()
            .is_some_and(|i| i.chars().any(|ch| ch.is_control()))
        {
            self.problem("cases.instance", "must not contain control characters");
        }

        let timezone = match raw.calendar.timezone.as_deref() {
            None => chrono_tz::UTC,
            Some(name) => {
                match name.parse::<chrono_tz::Tz>() {
                    Ok(tz) => tz,
                    Err(_) => {
                        self.problem(
                        "calendar.timezone",
                        format!("unknown time zone {name:?}; use an IANA name like \"Europe/Berlin\""),
                    );
                        chrono_tz::UTC
                    }
                }
            }
        };

        let mut business = Calendar::always(timezone);
        if !raw.calendar.hours.is_empty() {
            let mut week: [Vec<(chrono::NaiveTime, chrono::NaiveTime)>; 7] = Default::default();
            for (i, h) in raw.calendar.hours.iter().enumerate() {
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
        for (i, d) in raw.calendar.holidays.iter().enumerate() {
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
        if raw.tiers.is_empty() {
            self.problem("tiers", "at least one [[tiers]] is needed");
        }
        let mut tiers = Vec::new();
        let n_tiers = raw.tiers.len();
        for (i, t) in raw.tiers.into_iter().enumerate() {
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
            let first_response = self.duration(&format!("{key}.first_response"), &t.first_response);
            let follow_up = match &t.follow_up {
                Some(f) => self.duration(&format!("{key}.follow_up"), f),
                None => first_response,
            };
            let timeline = Timeline {
                first_response,
                follow_up,
            };
            let mut priority = BTreeMap::new();
            for (name, p) in t.priority {
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
            let staff = self.addresses(&format!("{key}.staff"), &t.staff, true);
            let forward_to = self.addresses(&format!("{key}.forward_to"), &t.forward_to, false);
            let warn_before = t.warn_before.as_deref().map(|w| {
                let wk = format!("{key}.warn_before");
                match w.trim().strip_suffix('%') {
                    Some(p) => match p.trim().parse::<u8>() {
                        Ok(p) if (1..100).contains(&p) => WarnBefore::Percent(p),
                        _ => {
                            self.problem(&wk, format!("{w:?}: a percentage from 1% to 99%"));
                            WarnBefore::Percent(80)
                        }
                    },
                    None => WarnBefore::Before(self.duration(&wk, w)),
                }
            });
            let resolve_within = t
                .resolve_within
                .as_deref()
                .map(|r| self.duration(&format!("{key}.resolve_within"), r));
            let renotify = match &t.renotify {
                Some(r) => self.duration(&format!("{key}.renotify"), r),
                None => first_response,
            };
            if renotify < Duration::from_secs(1) && i + 1 == n_tiers {
                self.problem(&format!("{key}.renotify"), "must be at least 1s");
            }
            tiers.push(TierConfig {
                name: t.name,
                staff,
                forward_to,
                timeline,
                priority,
                resolve_within,
                warn_before,
                renotify,
            });
        }
        let tier_index = |name: &str| tiers.iter().position(|t| t.name == name);
        let repeat_customer = match raw.repeat_customer {
            None => None,
            Some(r) => {
                let within = self.duration("repeat_customer.within", &r.within);
                if r.cases < 1 {
                    self.problem("repeat_customer.cases", "must be at least 1");
                }
                match tier_index(&r.tier) {
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
        };
        let digest = match raw.digest {
            None => None,
            Some(d) => {
                let to = self.addresses("digest.to", &d.to, false);
                if d.to.is_empty() {
                    self.problem("digest.to", "give at least one address");
                }
                let every = self.duration("digest.every", &d.every);
                if every < Duration::from_secs(60) && !every.is_zero() {
                    self.problem("digest.every", "must be at least 1m");
                }
                Some(DigestConfig { to, every })
            }
        };
        let metrics = MetricsConfig {
            listen: match raw.metrics.listen.as_deref() {
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
        };
        let cluster = self.cluster(&raw.cluster);
        let mut triggers = Vec::new();
        for (i, t) in raw.triggers.into_iter().enumerate() {
            let key = format!("triggers[{i}]");
            if t.phrases.is_empty() && t.senders.is_empty() && t.headers.is_empty() {
                self.problem(&key, "give phrases, senders or headers");
            }
            if !t.escalate && t.priority.is_none() {
                self.problem(
                    &key,
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
            triggers.push(TriggerConfig {
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
            });
        }
        let res = raw.resolution;
        let resolution = ResolutionConfig {
            auto_resolve_after: res
                .auto_resolve_after
                .as_deref()
                .map(|d| self.duration("resolution.auto_resolve_after", d)),
            reopen_within: self.duration("resolution.reopen_within", &res.reopen_within),
            survey: res.survey,
        };

        let ack = match raw.templates.ack {
            None => Template::builtin(TemplateKind::Ack),
            Some(p) => {
                let p = self.path(&p);
                match std::fs::read_to_string(&p) {
                    Ok(text) => match Template::parse(TemplateKind::Ack, &text) {
                        Ok(t) => t,
                        Err(e) => {
                            self.problem("templates.ack", format!("{}: {e}", p.display()));
                            Template::builtin(TemplateKind::Ack)
                        }
                    },
                    Err(e) => {
                        self.problem("templates.ack", format!("cannot read {}: {e}", p.display()));
                        Template::builtin(TemplateKind::Ack)
                    }
                }
            }
        };

        let queues = self.queues(raw.mailbox, raw.mailboxes, &tiers, (&from_name, &from));
        // None (no queue) was refused above, naming the key.
        let queues = Queues::new(queues)?;
        // A tier a case can be escalated to (above the first of some
        // queue's path) needs somewhere to send the case.
        let mut reached: Vec<usize> = queues
            .iter()
            .flat_map(|q| q.path.iter().skip(1).copied())
            .collect();
        reached.sort_unstable();
        reached.dedup();
        for i in reached {
            if tiers[i].forward_to.is_empty() {
                self.problem(
                    &format!("tiers[{i}].forward_to"),
                    "a tier above the first needs forward_to: where its escalated cases are sent",
                );
            }
        }
        if raw_from.is_none() && queues.iter().any(|q| q.address.is_empty()) {
            self.problem(
                "smtp.from",
                "missing: the From of mail for queues without an address \
                 (write \"Support <support@example.com>\")",
            );
        }
        // The loop header names this installation: the main address by
        // default.
        let instance = instance
            .or_else(|| Some(from.clone()).filter(|f| !f.is_empty()))
            .unwrap_or_else(|| queues.main().address.clone());

        let mut config = Config {
            source: source.to_owned(),
            queues,
            smtp: SmtpConfig {
                endpoint: smtp_endpoint,
                from_name,
                from,
                confirm_copies,
                confirm_wait,
                helo_name,
                max_per_connection,
            },
            store: StoreConfig {
                path: self.path(&raw.store.path),
                engine: self.store_engine(&raw.store),
                min_free: match parse_size(&raw.store.min_free) {
                    Ok(n) => n,
                    Err(e) => {
                        self.problem("store.min_free", e);
                        0
                    }
                },
                keep_sent: {
                    let d = self.duration("store.keep_sent", &raw.store.keep_sent);
                    if d < Duration::from_secs(3600) && parse_duration(&raw.store.keep_sent).is_ok()
                    {
                        self.problem("store.keep_sent", "must be at least 1h");
                    }
                    d
                },
            },
            cases: CasesConfig {
                subject_tag: c.subject_tag,
                support_addresses,
                auto_reply_limit: c.auto_reply_limit,
                auto_reply_global_limit: c.auto_reply_global_limit,
                auto_reply_window,
                instance,
                require_dkim_pass: c.require_dkim_pass,
                authserv_id,
            },
            calendar: CalendarConfig { timezone, business },
            tiers,
            repeat_customer,
            triggers,
            resolution,
            templates: Templates { ack },
            digest,
            metrics,
            cluster,
        };
        self.claim_covers_a_send(&raw.cluster, &mut config);
        Some(config)
    }

    /// A mail being sent belongs to its node for `cluster.claim`: it
    /// must outlast the longest a send may take, or another node sends it
    /// too while the first is still at it. Unset, it is that long (and
    /// at least two minutes); set shorter, it is refused.
    fn claim_covers_a_send(&mut self, raw: &RawCluster, config: &mut Config) {
        let longest = config.longest_send();
        match &raw.claim {
            None => config.cluster.claim = (longest + CLAIM_MARGIN).max(DEFAULT_CLAIM),
            Some(text) if parse_duration(text).is_ok() && config.cluster.claim < longest => {
                self.problem(
                    "cluster.claim",
                    format!(
                        "must be at least {} here: the longest an SMTP send may take \
                         (connect, TLS, login and data, each up to its timeout{}), or a node \
                         still sending a mail sees another send it too",
                        humantime::format_duration(longest),
                        if config.smtp.confirm_copies {
                            ", then smtp.confirm_wait for the confirmation copy"
                        } else {
                            ""
                        }
                    ),
                );
            }
            Some(_) => {}
        }
    }

    /// `[cluster]`: read whatever the engine (a sled store has one
    /// process and ignores it).
    fn cluster(&mut self, c: &RawCluster) -> ClusterConfig {
        if let Some(n) = &c.node {
            if let Err(e) = check_node_name(n) {
                self.problem("cluster.node", e);
            }
        }
        let lease = self.duration("cluster.lease", &c.lease);
        if parse_duration(&c.lease).is_ok()
            && !(Duration::from_secs(3)..=Duration::from_secs(600)).contains(&lease)
        {
            self.problem(
                "cluster.lease",
                "give 3s to 10m (renewed every third of it; a dead node's mailboxes wait this long)",
            );
        }
        let text = c.claim.as_deref().unwrap_or("0s");
        let claim = self.duration("cluster.claim", text);
        if c.claim.is_some() && parse_duration(text).is_ok() && claim < Duration::from_secs(30) {
            self.problem(
                "cluster.claim",
                "must be at least 30s: a mail being sent must not be taken over mid-send",
            );
        }
        ClusterConfig {
            node: c.node.clone(),
            lease,
            claim,
        }
    }
}
