//! `[mailbox]` or `[[mailboxes]]`: the queues, each with its mailbox,
//! address, escalation path and SMTP server; and what the queues need
//! of the rest (a sender, somewhere to send escalated cases).

use std::time::Duration;

use super::Validator;
use crate::config::raw::{RawMailbox, RawSmtp};
use crate::config::{
    parse_duration, parse_size, Endpoint, MailboxConfig, QueueConfig, Queues, TierConfig,
};

impl Validator<'_> {
    /// The queues from `[mailbox]` (one, `default`) or `[[mailboxes]]`.
    pub(super) fn queues(
        &mut self,
        single: Option<RawMailbox>,
        several: Option<Vec<RawMailbox>>,
        tiers: &[TierConfig],
        smtp_from: (&Option<String>, &String),
    ) -> Vec<QueueConfig> {
        let mut queues: Vec<QueueConfig> = Vec::new();
        for (key, m) in self.queue_sections(single, several) {
            let q = self.queue(&key, m, tiers, smtp_from);
            self.distinct_queue(&key, &q, &queues);
            queues.push(q);
        }
        queues
    }

    /// The queues' sections with their keys: `mailbox`, or
    /// `mailboxes[i]` each (none when neither or both are given).
    fn queue_sections(
        &mut self,
        single: Option<RawMailbox>,
        several: Option<Vec<RawMailbox>>,
    ) -> Vec<(String, RawMailbox)> {
        match (single, several) {
            (Some(_), Some(_)) => {
                self.problem(
                    "mailboxes",
                    "give either one [mailbox] or [[mailboxes]], not both \
                     ([mailbox] is the same as one [[mailboxes]] named \"default\")",
                );
                Vec::new()
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
                Vec::new()
            }
        }
    }

    /// Queue `q` (under `key`) shares neither its name, nor its address,
    /// nor its folder with one of the `earlier` queues.
    fn distinct_queue(&mut self, key: &str, q: &QueueConfig, earlier: &[QueueConfig]) {
        if earlier.iter().any(|o| o.name == q.name) {
            self.problem(
                &format!("{key}.name"),
                format!("queue {:?} is defined twice", q.name),
            );
        }
        if let Some(o) = earlier
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
        if let Some(o) = earlier.iter().find(|o| same_folder(o)) {
            self.problem(
                key,
                format!(
                    "watches the same folder as queue {:?}: each message would be read twice",
                    o.name
                ),
            );
        }
    }

    /// One queue: its mailbox and what it adds to it.
    fn queue(
        &mut self,
        key: &str,
        mut m: RawMailbox,
        tiers: &[TierConfig],
        (smtp_from_name, smtp_from): (&Option<String>, &String),
    ) -> QueueConfig {
        let name = self.queue_name(key, &m.name);
        let (from_name, address) = match &m.address {
            Some(a) => self.address(&format!("{key}.address"), a),
            None => (smtp_from_name.clone(), smtp_from.clone()),
        };
        let path = match &m.tiers {
            None => (0..tiers.len()).collect(),
            Some(names) => self.queue_path(key, names, tiers),
        };
        let smtp = m.smtp.take().map(|s| self.queue_smtp(key, s));
        let language = m
            .language
            .take()
            .map(|l| self.language(&format!("{key}.language"), &l));
        let mailbox = self.mailbox(key, m);
        QueueConfig {
            name,
            mailbox,
            from_name,
            address,
            path,
            smtp,
            language,
        }
    }

    /// A queue's `name`: `default` for `[mailbox]`, required in
    /// `[[mailboxes]]`.
    fn queue_name(&mut self, key: &str, name: &Option<String>) -> String {
        match (name, key) {
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
        }
    }

    /// A queue's `tiers`: its escalation path, as indexes into `tiers`.
    fn queue_path(&mut self, key: &str, names: &[String], tiers: &[TierConfig]) -> Vec<usize> {
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

    /// A queue's own `smtp` server: connection keys only.
    fn queue_smtp(&mut self, key: &str, mut s: RawSmtp) -> Endpoint {
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
            m.oauth2,
        );
        if endpoint.password.is_none() && endpoint.oauth.is_none() {
            self.problem(
                &format!("{key}.password"),
                "IMAP needs a password (password_env, password_file or password) or auth = \"oauth2\" with an [oauth2] identity",
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

    /// A tier a case can be escalated to (above the first of some
    /// queue's path) needs somewhere to send the case.
    pub(super) fn escalated_tiers_forward(&mut self, queues: &Queues, tiers: &[TierConfig]) {
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
    }

    /// Without `[smtp] from`, every queue sends from its own address.
    pub(super) fn every_queue_has_a_sender(&mut self, queues: &Queues) {
        if queues.iter().any(|q| q.address.is_empty()) {
            self.problem(
                "smtp.from",
                "missing: the From of mail for queues without an address \
                 (write \"Support <support@example.com>\")",
            );
        }
    }
}
