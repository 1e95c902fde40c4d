//! `check-config --connect`: what a new user gets wrong in the first hour
//! is mostly the connections (a password, the TLS mode of a port, a CA,
//! a folder name), and a config that parses says nothing about them. This
//! logs in to every endpoint the config names, the way the daemon will,
//! checks the folders, sends nothing, and says per endpoint OK or what
//! failed, with the key to change.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Endpoint, StoreEngine, TokenSource};
use crate::credentials::AccessTokens;
use crate::mailbox::imap::{self, ImapError};
use crate::outbox::smtp::SmtpMailer;

/// The patience for each step here: a port that expects TLS at once
/// answers a plain client with silence, and a new user should not wait
/// the daemon's full timeout to hear so.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// One endpoint's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked: `imap mailbox (imap.example.com:993)`.
    pub what: String,
    /// What worked, or what failed.
    pub outcome: Result<String, Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: String,
    /// The change that most likely fixes it, naming the key.
    pub hint: Option<String>,
}

impl Check {
    pub fn line(&self) -> String {
        match &self.outcome {
            Ok(what) => format!("OK      {}: {what}", self.what),
            Err(f) => {
                let mut s = format!("FAILED  {}: {}", self.what, f.error);
                if let Some(h) = &f.hint {
                    s.push_str(&format!("\n        hint: {h}"));
                }
                s
            }
        }
    }
}

fn patient(ep: &Endpoint) -> Endpoint {
    Endpoint {
        timeout: ep.timeout.min(CHECK_TIMEOUT),
        ..ep.clone()
    }
}

fn place(ep: &Endpoint) -> String {
    format!("{} ({}:{})", ep.section, ep.host, ep.port)
}

/// Every endpoint of `config`, checked one after another (so a server's
/// log reads in order, and a lockout counter sees one attempt each).
pub async fn run(config: &Config, tokens: Option<Arc<dyn AccessTokens>>) -> Vec<Check> {
    let mut out = prove(config, None, tokens).await;
    if let StoreEngine::Postgres { .. } = config.store.engine {
        out.push(Check {
            what: "store (PostgreSQL)".into(),
            outcome: store_check(config).await,
        });
    }
    out
}

/// The IMAP and SMTP servers that log in as `identity` (None: every
/// server), each logged in to once, nothing sent (`auth login`'s proof).
pub async fn prove(
    config: &Config,
    identity: Option<&str>,
    tokens: Option<Arc<dyn AccessTokens>>,
) -> Vec<Check> {
    let chosen = |ep: &Endpoint| match identity {
        None => true,
        Some(name) => matches!(&ep.oauth, Some(TokenSource::Identity(n)) if n == name),
    };
    let mut out = Vec::new();
    for q in config.queues.iter() {
        if !chosen(&q.mailbox.endpoint) {
            continue;
        }
        let ep = patient(&q.mailbox.endpoint);
        out.push(Check {
            what: format!("imap {}", place(&ep)),
            outcome: imap_check(
                &ep,
                &q.mailbox.folder,
                q.mailbox.sent_folder.as_deref(),
                tokens.as_deref(),
            )
            .await,
        });
    }
    let mut smtp = vec![config.smtp.clone()];
    for q in config.queues.iter() {
        if let Some(ep) = &q.smtp {
            smtp.push(crate::config::SmtpConfig {
                endpoint: ep.clone(),
                ..config.smtp.clone()
            });
        }
    }
    for mut s in smtp {
        if !chosen(&s.endpoint) {
            continue;
        }
        s.endpoint = patient(&s.endpoint);
        out.push(Check {
            what: format!("smtp {}", place(&s.endpoint)),
            outcome: smtp_check(&s, tokens.clone()).await,
        });
    }
    out
}

async fn imap_check(
    ep: &Endpoint,
    folder: &str,
    sent: Option<&str>,
    tokens: Option<&dyn AccessTokens>,
) -> Result<String, Failure> {
    let fail = |e: ImapError| Failure {
        hint: e.hint(ep),
        error: crate::error_chain(&e),
    };
    let mut s = imap::connect(ep, tokens).await.map_err(fail)?;
    let result = async {
        let have = imap::folders(ep, &mut s).await?;
        let exists = |f: &str| {
            have.iter()
                .any(|h| h == f || (f.eq_ignore_ascii_case("INBOX") && h.eq_ignore_ascii_case(f)))
        };
        let mut wanted = vec![("folder", folder)];
        wanted.extend(sent.map(|f| ("sent_folder", f)));
        for (key, f) in &wanted {
            if !exists(f) {
                return Err(ImapError::MissingFolder {
                    key: format!("{}.{key}", ep.section),
                    folder: f.to_string(),
                    available: have.clone(),
                });
            }
        }
        let names: Vec<String> = wanted.iter().map(|(_, f)| format!("{f:?}")).collect();
        Ok(format!(
            "logged in as {:?}; {} found",
            ep.username.as_deref().unwrap_or_default(),
            names.join(" and ")
        ))
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), s.logout()).await;
    result.map_err(fail)
}

async fn smtp_check(
    cfg: &crate::config::SmtpConfig,
    tokens: Option<Arc<dyn AccessTokens>>,
) -> Result<String, Failure> {
    let ep = &cfg.endpoint;
    let failure = |e: crate::outbox::smtp::SmtpError| {
        let error = e.to_string();
        // A server that does not answer, or refuses the connection.
        let hint = error.contains("connecting to").then(|| {
            format!(
                "nothing answers at {}:{}: check {s}.host and {s}.port",
                ep.host,
                ep.port,
                s = ep.section
            )
        });
        Failure { error, hint }
    };
    let mut mailer = SmtpMailer::new(cfg).map_err(failure)?;
    if let Some(t) = tokens {
        mailer = mailer.with_tokens(t);
    }
    let login = mailer.check().await.map_err(failure)?;
    Ok(login)
}

/// Connects to the PostgreSQL store without opening it: opening would
/// create or upgrade its schema, which a check beside a running cluster
/// must not do.
async fn store_check(config: &Config) -> Result<String, Failure> {
    let hint = || {
        Some(
            "check store.url (or store.url_env / store.url_file), store.security and store.ca_file"
                .to_string(),
        )
    };
    let (url, tls) = crate::app::postgres_target(config).map_err(|e| Failure {
        error: format!("{e:#}"),
        hint: None,
    })?;
    let schema = match &config.store.engine {
        crate::config::StoreEngine::Postgres { schema, .. } => schema.clone(),
        crate::config::StoreEngine::Sled => crate::store::DEFAULT_SCHEMA.to_string(),
    };
    let probed = tokio::task::spawn_blocking(move || {
        crate::store::Store::probe_postgres(url.expose(), tls, &schema)
    })
    .await;
    match probed {
        Ok(Ok((user, db, table))) => Ok(format!(
            "connected as {user:?} to database {db:?}; {}",
            if table {
                "the store's tables are there"
            } else {
                "no store yet (the daemon creates it at its first start)"
            }
        )),
        Ok(Err(e)) => Err(Failure {
            error: crate::error_chain(&e),
            hint: hint(),
        }),
        Err(e) => Err(Failure {
            error: format!("the check itself failed: {e}"),
            hint: None,
        }),
    }
}
