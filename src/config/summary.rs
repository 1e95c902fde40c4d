//! The config told to people: `check-config`'s summary. Never prints
//! secrets.

use super::{Config, Endpoint, StoreEngine};

impl Config {
    /// A short summary for `check-config`; never prints secrets.
    pub fn summary(&self) -> String {
        let ep = |e: &Endpoint| {
            format!(
                "{}:{} ({}{})",
                e.host,
                e.port,
                e.security,
                if e.oauth.is_some() {
                    ", xoauth2"
                } else if e.password.is_some() {
                    ", password set"
                } else {
                    ""
                }
            )
        };
        let mut s = format!("config {} is valid\n  queues:", self.source.display());
        for q in self.queues.iter() {
            let path: Vec<&str> = q
                .path
                .iter()
                .map(|&i| self.tiers[i].name.as_str())
                .collect();
            s.push_str(&format!(
                "\n    {}: {} folder {} as {}, from {}, path {}{}",
                q.name,
                ep(&q.mailbox.endpoint),
                q.mailbox.folder,
                q.mailbox.endpoint.username.as_deref().unwrap_or("-"),
                q.address,
                path.join(" → "),
                q.smtp
                    .as_ref()
                    .map(|e| format!(", smtp {}", ep(e)))
                    .unwrap_or_default(),
            ));
        }
        s.push_str(&format!(
            "\n  smtp:    {} from {}\n  store:   {}\n  tiers:   ",
            ep(&self.smtp.endpoint),
            if self.smtp.from.is_empty() {
                "(each queue's address)"
            } else {
                &self.smtp.from
            },
            match &self.store.engine {
                StoreEngine::Sled => format!("sled in {}", self.store.path.display()),
                StoreEngine::Postgres {
                    url,
                    security,
                    pool,
                    ..
                } =>
                    format!(
                    "postgres (url from {}, {security}, {pool} connections), node files in {}\n  \
                     cluster: node {}, lease {}, claim {}",
                    url.key().replace("password", "url"),
                    self.store.path.display(),
                    self.cluster.node.as_deref().unwrap_or("(host name and pid)"),
                    humantime::format_duration(self.cluster.lease),
                    humantime::format_duration(self.cluster.claim),
                ),
            },
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
        s
    }
}
