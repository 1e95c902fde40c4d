//! Where the state lives and how nodes share it: `[store]` (sled or
//! PostgreSQL) and `[cluster]`, with the claim on a mail being sent that
//! must outlast the longest send.

use std::time::Duration;

use super::Validator;
use crate::config::raw::{RawCluster, RawStore};
use crate::config::{
    check_node_name, parse_duration, parse_size, ClusterConfig, Config, PasswordSource, Secret,
    Security, StoreConfig, StoreEngine, CLAIM_MARGIN, DEFAULT_CLAIM, DEFAULT_POOL, MAX_POOL,
};

impl Validator<'_> {
    /// `[store]`: its folder, engine, and the disk and retention limits.
    pub(super) fn store(&mut self, s: &RawStore) -> StoreConfig {
        StoreConfig {
            path: self.path(&s.path),
            engine: self.store_engine(s),
            min_free: match parse_size(&s.min_free) {
                Ok(n) => n,
                Err(e) => {
                    self.problem("store.min_free", e);
                    0
                }
            },
            keep_sent: {
                let d = self.duration("store.keep_sent", &s.keep_sent);
                if d < Duration::from_secs(3600) && parse_duration(&s.keep_sent).is_ok() {
                    self.problem("store.keep_sent", "must be at least 1h");
                }
                d
            },
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
            ("schema", s.schema.is_some()),
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
            "postgres" => self.postgres(s),
            other => {
                self.problem(
                    "store.engine",
                    format!("{other:?} is not an engine: \"sled\" (the default) or \"postgres\""),
                );
                StoreEngine::Sled
            }
        }
    }

    /// `engine = "postgres"`: the connection string (a secret), its TLS
    /// and the pool.
    fn postgres(&mut self, s: &RawStore) -> StoreEngine {
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
        let schema = s
            .schema
            .clone()
            .unwrap_or_else(|| crate::store::DEFAULT_SCHEMA.to_string());
        if !crate::store::valid_schema(&schema) {
            self.problem(
                "store.schema",
                format!(
                    "{schema:?} is not a schema name escalator takes: lower-case letters, \
                     digits and _, not starting with a digit or pg_, at most 63 characters, \
                     and not public or information_schema (other software keeps its tables \
                     there); the default is \"escalator\""
                ),
            );
        }
        StoreEngine::Postgres {
            url,
            security: s.security.unwrap_or(Security::Tls),
            allow_insecure: s.allow_insecure,
            ca_file,
            pool,
            schema,
        }
    }

    /// A mail being sent belongs to its node for `cluster.claim`: it
    /// must outlast the longest a send may take, or another node sends it
    /// too while the first is still at it. Unset, it is that long (and
    /// at least two minutes); set shorter, it is refused.
    pub(super) fn claim_covers_a_send(&mut self, raw: &RawCluster, config: &mut Config) {
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
    pub(super) fn cluster(&mut self, c: &RawCluster) -> ClusterConfig {
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
