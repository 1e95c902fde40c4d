//! The config told to people: `check-config`'s summary. Never prints
//! secrets.

use super::{Config, Endpoint, QueueConfig, StoreEngine};

impl Config {
    /// A short summary for `check-config`; never prints secrets.
    pub fn summary(&self) -> String {
        let mut s = format!("config {} is valid\n  queues:", self.source.display());
        for q in self.queues.iter() {
            s.push_str(&queue(self, q));
        }
        s.push_str(&format!(
            "\n  smtp:    {} from {}\n  store:   {}\n  tiers:   ",
            endpoint(&self.smtp.endpoint),
            if self.smtp.from.is_empty() {
                "(each queue's address)"
            } else {
                &self.smtp.from
            },
            store(self),
        ));
        let tiers: Vec<String> = self
            .tiers
            .iter()
            .map(|t| {
                format!(
                    "{} (first response {})",
                    t.name,
                    humantime::format_duration(t.timeline.first_response)
                )
            })
            .collect();
        s.push_str(&tiers.join(" → "));
        s.push_str(&format!("\n  timezone: {}", self.calendar.timezone));
        let l = &self.language;
        let langs: Vec<&str> = self
            .templates
            .set
            .ack_languages()
            .iter()
            .map(String::as_str)
            .collect();
        s.push_str(&format!(
            "\n  languages: customers in {} (default {}, detection {}{}), staff {}",
            langs.join(", "),
            l.default,
            if l.detect { "on" } else { "off" },
            if l.domains.is_empty() {
                String::new()
            } else {
                format!(", {} domain(s)", l.domains.len())
            },
            l.staff
        ));
        if let Some(d) = &self.digest {
            s.push_str(&format!(
                "\n  digest:  every {} to {}",
                humantime::format_duration(d.every),
                d.to.join(", ")
            ));
        }
        if let Some(l) = self.metrics.listen {
            s.push_str(&format!("\n  metrics: http://{l}/metrics"));
        }
        s.push_str(&oauth2(&self.oauth2));
        s
    }
}

/// `host:port (security, how it logs in)`: whether a password is set,
/// never the password.
fn endpoint(e: &Endpoint) -> String {
    let auth = match &e.oauth {
        Some(crate::config::TokenSource::Identity(name)) => format!(", oauth2 identity {name}"),
        Some(_) => ", xoauth2".to_string(),
        None if e.password.is_some() => ", password set".to_string(),
        None => String::new(),
    };
    format!("{}:{} ({}{auth})", e.host, e.port, e.security)
}

/// A queue's line: its mailbox, address, path and own SMTP server.
fn queue(config: &Config, q: &QueueConfig) -> String {
    let path: Vec<&str> = q
        .path
        .iter()
        .map(|&i| config.tiers[i].name.as_str())
        .collect();
    format!(
        "\n    {}: {} folder {} as {}, from {}, path {}{}",
        q.name,
        endpoint(&q.mailbox.endpoint),
        q.mailbox.folder,
        q.mailbox.endpoint.username.as_deref().unwrap_or("-"),
        q.address,
        path.join(" → "),
        q.smtp
            .as_ref()
            .map(|e| format!(", smtp {}", endpoint(e)))
            .unwrap_or_default(),
    )
}

/// The store's engine and where it keeps its files; with PostgreSQL,
/// the cluster settings too.
fn store(config: &Config) -> String {
    match &config.store.engine {
        StoreEngine::Sled => format!("sled in {}", config.store.path.display()),
        StoreEngine::Postgres {
            url,
            security,
            pool,
            schema,
            ..
        } => format!(
            "postgres (url from {}, {security}, {pool} connections, schema {schema}), \
             node files in {}\n  \
             cluster: node {}, lease {}, claim {}",
            url.key().replace("password", "url"),
            config.store.path.display(),
            config
                .cluster
                .node
                .as_deref()
                .unwrap_or("(host name and pid)"),
            humantime::format_duration(config.cluster.lease),
            humantime::format_duration(config.cluster.claim),
        ),
    }
}

/// The identities: provider, flow, client and scopes; whether a secret
/// is configured, never the secret, and where the token key comes from.
fn oauth2(o: &crate::config::oauth::OAuthConfig) -> String {
    if o.identities.is_empty() {
        return String::new();
    }
    let mut s = format!("\n  oauth2: token key from {}", o.key_origin());
    if !o.alert_to.is_empty() {
        s.push_str(&format!(", alerts to {}", o.alert_to.join(", ")));
    }
    for id in o.identities.values() {
        s.push_str(&format!(
            "\n    {}: {} {} flow, client {}{}, scopes {}",
            id.name,
            id.provider.as_str(),
            id.flow.as_str(),
            id.client_id,
            match id.client_secret_key() {
                Some(k) => format!(" (secret from {k})"),
                None => String::new(),
            },
            id.scopes.join(" ")
        ));
    }
    s
}
