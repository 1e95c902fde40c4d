//! The `escalator` command: parses the CLI, sets up logging, turns
//! signals into a shutdown future and errors into exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use escalator::admin::{self, Request, Response};
use escalator::clock::SystemClock;
use escalator::config::Config;
use escalator::store::{Store, StoreError};

#[derive(Parser)]
#[command(name = "escalator", version, about = "Email-driven escalation gateway")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The config file.
    #[arg(long, short, env = "ESCALATOR_CONFIG")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (or one cycle with --once).
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Ingest everything new, send the outbox, then exit.
        #[arg(long)]
        once: bool,
        /// This daemon's name in a cluster (default: `[cluster] node`, else
        /// the host name and the pid).
        #[arg(long, env = "ESCALATOR_NODE", value_name = "NAME")]
        node: Option<String>,
        /// Where this daemon's /metrics listens, instead of `[metrics]
        /// listen` (several daemons of a cluster on one machine).
        #[arg(long, env = "ESCALATOR_METRICS_LISTEN", value_name = "ADDR:PORT")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Validate a config file and print a summary.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Also log in to every IMAP and SMTP server (and PostgreSQL) the
        /// config names and check its folders; sends nothing.
        #[arg(long)]
        connect: bool,
    },
    /// Inspect cases.
    Cases {
        #[command(subcommand)]
        command: CasesCommand,
    },
    /// Messages that failed to process.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// KPIs: escalation rates, answer and resolution times, breaches,
    /// satisfaction, open cases, per tier and overall.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// Only cases opened within this long ago ("7d", "24h").
        #[arg(long, value_parser = parse_since)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// The review digest: the last `digest.every` (default 7d) up to now.
    Digest {
        #[command(flatten)]
        config: ConfigArg,
        /// Print it (the only mode: the daemon mails it each period).
        #[arg(long)]
        print: bool,
    },
    /// The mail templates: list, show, export.
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
    /// Customers: the language their mail is in.
    Customers {
        #[command(subcommand)]
        command: CustomersCommand,
    },
    /// Outgoing mail.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// The store itself.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Several daemons on one PostgreSQL store.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// OAuth 2 identities ([oauth2.NAME]): log in, see, forget.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Sign in (device code, browser, or app-only as the identity's flow
    /// says), store the tokens sealed, then log in to every IMAP and
    /// SMTP server that uses the identity and say which account it
    /// reached.
    Login {
        /// The identity: NAME of [oauth2.NAME].
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Per identity: the grant, account, scopes, access-token expiry,
    /// refresh-token age, last refresh and last error. Exits 1 when an
    /// identity in use needs a login.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Forget an identity's tokens (its mailboxes then wait for a login).
    Logout {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum CustomersCommand {
    /// Answer this customer in LANG from now on, whatever their mail
    /// says (their open cases too); `--clear` lets new cases choose from
    /// the customer's mail again (open cases keep their language).
    SetLanguage {
        /// The customer's address.
        address: String,
        /// A language with templates (`de`, `pt-BR`).
        #[arg(required_unless_present = "clear")]
        language: Option<String>,
        #[arg(long, conflicts_with = "language")]
        clear: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// The templates in use and where each comes from (built in, or a
    /// file of `[templates] dir`).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Renders a template as the customer would get it.
    Show {
        /// ack, notice, relay or survey.
        kind: String,
        /// The language to render (`de`, `pt-br`); the fallbacks apply.
        #[arg(long)]
        lang: Option<String>,
        /// The values of this case instead of samples.
        #[arg(long)]
        case: Option<u64>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Writes the built-in templates into DIR, the starting point for
    /// `[templates] dir` (an existing file is left alone).
    Export { dir: PathBuf },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The nodes and when each was last seen, which node holds which
    /// mailbox and until when, the outbox depth, the due timers.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy a sled store into the (empty) PostgreSQL database of the
    /// config's [store]; resumable, and verified key space by key space.
    Migrate {
        /// The sled store's directory (its daemon stopped).
        #[arg(long, value_name = "PATH")]
        from_sled: std::path::PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum CasesCommand {
    /// List all cases.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
        /// Only the cases of this queue (`[[mailboxes]] name`).
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
    },
    /// Show one case with its messages and history.
    Show {
        id: u64,
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Re-arm a case's parked timer (firing it failed; see `cases show`).
    Retry {
        id: u64,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Escalate a case one tier by hand.
    Escalate {
        id: u64,
        /// Why; recorded in the case and told to the next tier.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Resolve a case (the survey goes out if configured).
    Resolve {
        id: u64,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// List quarantined messages with their errors.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Process quarantined messages again (one ID, or all).
    Retry {
        id: Option<u64>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// List unsent and failed mail (--all: sent mail too).
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        all: bool,
    },
    /// Queue a failed mail for sending again.
    Retry {
        id: u64,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show one mail as its recipient reads it: the headers that matter
    /// and the text, decoded (no quoted-printable), attachments listed.
    Show {
        id: u64,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logs = init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("escalator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("escalator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go through a writer thread: ingest logs while it is inside a
/// store transaction, and a stderr nobody reads (a full pipe) must not
/// stop mail from being taken in. If the writer falls behind by its whole
/// buffer, lines are dropped rather than work blocked. The guard flushes
/// what is left when main returns.
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ESCALATOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    // Colour codes only for a person at a terminal: in a file or the
    // journal they are noise (`NO_COLOR` turns them off anyway).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    guard
}

fn parse_since(text: &str) -> Result<std::time::Duration, String> {
    escalator::config::parse_duration(text)
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{}", escalator::error_chain(&e)))
}

// Long: one arm per CLI command, each naming its request or handing off to a function.
async fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    let (config, req) = match cmd {
        Command::Run {
            config,
            once,
            node,
            metrics_listen,
        } => return run(&config, once, node, metrics_listen).await,
        Command::Store {
            command: StoreCommand::Migrate { from_sled, config },
        } => return migrate(&config, from_sled).await,
        Command::CheckConfig { config, connect } => return check_config(&config, connect).await,
        Command::Cases { command } => match command {
            CasesCommand::List {
                config,
                json,
                queue,
            } => (config, Request::CasesList { json, queue }),
            CasesCommand::Show { id, config, json } => (config, Request::CaseShow { id, json }),
            CasesCommand::Escalate { id, reason, config } => {
                (config, Request::CaseEscalate { id, reason })
            }
            CasesCommand::Resolve { id, config } => (config, Request::CaseResolve { id }),
            CasesCommand::Retry { id, config } => (config, Request::CaseRetry { id }),
        },
        Command::Quarantine { command } => match command {
            QuarantineCommand::List { config, json } => (config, Request::QuarantineList { json }),
            QuarantineCommand::Retry { id, config } => (config, Request::QuarantineRetry { id }),
        },
        Command::Stats {
            config,
            since,
            json,
        } => (
            config,
            Request::Stats {
                since_secs: since.map(|d| d.as_secs()),
                json,
            },
        ),
        Command::Digest { config, print: _ } => (config, Request::Digest),
        Command::Templates { command } => match command {
            TemplatesCommand::List { config } => return templates_list(&config),
            TemplatesCommand::Export { dir } => return templates_export(&dir),
            TemplatesCommand::Show {
                kind,
                lang,
                case,
                config,
            } => (config, Request::TemplateShow { kind, lang, case }),
        },
        Command::Customers {
            command:
                CustomersCommand::SetLanguage {
                    address,
                    language,
                    clear: _,
                    config,
                },
        } => (config, Request::CustomerSetLanguage { address, language }),
        Command::Cluster {
            command: ClusterCommand::Status { config, json },
        } => (config, Request::ClusterStatus { json }),
        Command::Auth { command } => match command {
            AuthCommand::Login { name, config } => return auth_login(&config, &name).await,
            AuthCommand::Status { config, json } => (config, Request::AuthStatus { json }),
            AuthCommand::Logout { name, config } => {
                (config, Request::AuthLogout { identity: name })
            }
        },
        Command::Outbox { command } => match command {
            OutboxCommand::List { config, json, all } => {
                (config, Request::OutboxList { json, all })
            }
            OutboxCommand::Retry { id, config } => (config, Request::OutboxRetry { id }),
            OutboxCommand::Show { id, config } => (config, Request::OutboxShow { id }),
        },
    };
    let cfg = load(&config.config)?;
    let resp = admin_request(cfg, &req).await?;
    print!("{}", resp.output);
    Ok(if resp.code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `run`: the daemon, or one pass with `--once`.
async fn run(
    config: &ConfigArg,
    once: bool,
    node: Option<String>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let mut cfg = load(&config.config)?;
    if metrics_listen.is_some() {
        cfg.metrics.listen = metrics_listen;
    }
    if let Some(n) = node {
        escalator::config::check_node_name(&n).map_err(|e| anyhow::anyhow!("--node: {e}"))?;
        cfg.cluster.node = Some(n);
    }
    let mut missing = cfg.secret_problems();
    missing.extend(escalator::oauth::key_problem(&cfg));
    if !missing.is_empty() {
        anyhow::bail!(
            "{}: cannot start without the mail secrets:\n  {}",
            config.config.display(),
            missing.join("\n  ")
        );
    }
    if once {
        escalator::app::run_once(cfg).await?;
    } else {
        escalator::app::run(cfg, shutdown_signal()).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `store migrate --from-sled`: copies a sled store into PostgreSQL.
async fn migrate(config: &ConfigArg, from_sled: PathBuf) -> anyhow::Result<ExitCode> {
    let cfg = load(&config.config)?;
    if matches!(cfg.store.engine, escalator::config::StoreEngine::Sled) {
        anyhow::bail!(
            "store migrate copies into the PostgreSQL database of [store]; {} has engine = \"sled\"",
            config.config.display()
        );
    }
    let copied = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let source = Store::open(&from_sled).with_context(|| {
            format!(
                "cannot open the sled store {} (is its daemon stopped?)",
                from_sled.display()
            )
        })?;
        let target = escalator::app::open_store(&cfg, std::time::Duration::ZERO)?;
        escalator::app::migrate_from_sled(&source, &target)
    })
    .await??;
    if copied.already_done {
        println!("the database holds a finished copy already; counts and contents verified:");
    } else {
        if copied.reconciled > 0 {
            println!(
                "{} records changed in the sled store since the interrupted copy: \
                 brought up to date",
                copied.reconciled
            );
        }
        println!("copied and verified (counts and contents):");
    }
    for (name, n) in &copied.rows {
        println!("  {name:<16} {n}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `templates list`.
fn templates_list(config: &ConfigArg) -> anyhow::Result<ExitCode> {
    let cfg = load(&config.config)?;
    for (name, origin) in cfg.templates.set.list() {
        println!("{name:<20} {origin}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `templates export DIR`.
fn templates_export(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, source) in escalator::template::builtin_files() {
        let path = dir.join(name);
        // An admin's edited copy is never overwritten.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(source.as_bytes())
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                println!("kept {} (it exists)", path.display());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `check-config [--connect]`.
async fn check_config(config: &ConfigArg, connect: bool) -> anyhow::Result<ExitCode> {
    let c = match Config::load(&config.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", escalator::error_chain(&e));
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("{}", c.summary());
    // A secret that cannot be read is fine for commands that
    // only read the store, and an error for `run`.
    let mut missing = c.secret_problems();
    missing.extend(escalator::oauth::key_problem(&c));
    for p in &missing {
        eprintln!(
            "warning: {p} (`run` refuses to start without it; store-only \
             commands such as `cases`, `stats` and `outbox` work)"
        );
    }
    for note in c.templates.set.mixed_hands() {
        eprintln!("note: {note}");
    }
    let mut ok = missing.is_empty();
    if connect {
        println!();
        for check in escalator::preflight::run(&c, grants_for_check(&c)).await {
            println!("{}", check.line());
            ok &= check.outcome.is_ok();
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Tokens for `check-config --connect` when servers log in as `[oauth2]`
/// identities: from a sled store no daemon holds (a refresh it needs is
/// stored as the daemon's would be). Not from PostgreSQL (opening the
/// store there may upgrade its schema beside a running cluster), nor
/// from a store a daemon holds: then each such server's line says to
/// use `auth status`.
fn grants_for_check(c: &Config) -> Option<Arc<dyn escalator::credentials::AccessTokens>> {
    if c.identities_in_use().is_empty()
        || !matches!(c.store.engine, escalator::config::StoreEngine::Sled)
        || !c.store.path.exists()
    {
        return None;
    }
    let store = Store::open(&c.store.path).ok()?;
    let handle = escalator::handle::Handle {
        store: Arc::new(store),
        config: escalator::config::Live::new(c.clone()),
        clock: Arc::new(SystemClock),
        wake: Default::default(),
    };
    Some(Arc::new(escalator::oauth::Broker::new(&handle)))
}

/// `auth login NAME`: the sign-in, the tokens stored (sealed, through
/// a running daemon's socket when it holds the store), then a real login
/// to every server that uses the identity.
async fn auth_login(config: &ConfigArg, name: &str) -> anyhow::Result<ExitCode> {
    let cfg = load(&config.config)?;
    let Some(id) = cfg.oauth2.identities.get(name).cloned() else {
        let known: Vec<&str> = cfg.oauth2.identities.keys().map(String::as_str).collect();
        anyhow::bail!(
            "no [oauth2.{}] in {} (there: {})",
            escalator::template::printable(name),
            cfg.source.display(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        );
    };
    // The key first: a sign-in whose tokens cannot be sealed is wasted.
    escalator::oauth::Broker::key(&cfg.oauth2).map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout();
    let tokens = escalator::oauth::login::obtain(&id, &mut out).await?;
    // XOAUTH2 logs in as the servers' configured user: that is the
    // account the token must reach, and the proof below says if it does.
    let users: Vec<String> = cfg.identity_users(name);
    let account = (!users.is_empty()).then(|| users.join(", "));
    let login = escalator::oauth::broker::seal_login(&cfg, &id, &tokens, account)?;
    let resp = admin_request(cfg.clone(), &Request::AuthStore { login }).await?;
    print!("{}", resp.output);
    if resp.code != 0 {
        return Ok(ExitCode::FAILURE);
    }
    let in_hand: Arc<dyn escalator::credentials::AccessTokens> =
        Arc::new(escalator::credentials::InHand {
            identity: name.to_string(),
            token: tokens.access,
        });
    let checks = escalator::preflight::prove(&cfg, Some(name), Some(in_hand)).await;
    if checks.is_empty() {
        println!(
            "no mailbox or SMTP server uses {name} yet (auth = \"oauth2\", oauth2 = \"{name}\")"
        );
    }
    let mut failed = false;
    for check in checks {
        match check.outcome {
            Ok(what) => println!("ok    {}: {what}", check.what),
            Err(f) => {
                failed = true;
                println!("FAIL  {}: {}", check.what, f.error);
                if let Some(h) = f.hint {
                    println!("      hint: {h}");
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs an admin request on the store, or via the daemon that holds it.
async fn admin_request(cfg: Config, req: &Request) -> anyhow::Result<Response> {
    let path = cfg.store.path.clone();
    if !matches!(cfg.store.engine, escalator::config::StoreEngine::Sled) {
        // The database itself, whatever daemons run: what the CLI commits
        // wakes them through NOTIFY.
        let (c, req) = (cfg.clone(), req.clone());
        return tokio::task::spawn_blocking(move || {
            let store = escalator::app::open_store(&c, std::time::Duration::ZERO)?;
            let shared = escalator::handle::Handle {
                store: Arc::new(store),
                config: escalator::config::Live::new(c),
                clock: Arc::new(SystemClock),
                wake: Default::default(),
            };
            Ok(admin::handle(&shared, &req)?)
        })
        .await?;
    }
    match Store::open(&path) {
        Ok(store) => {
            let shared = escalator::handle::Handle {
                store: Arc::new(store),
                config: escalator::config::Live::new(cfg),
                clock: Arc::new(SystemClock),
                wake: Default::default(),
            };
            let req = req.clone();
            Ok(tokio::task::spawn_blocking(move || admin::handle(&shared, &req)).await??)
        }
        Err(StoreError::Locked(_)) => {
            // A daemon that is starting holds the store a moment before
            // its socket answers.
            let mut tries = 0;
            loop {
                match escalator::control::ask(&path, req).await {
                    Ok(r) => return Ok(r),
                    Err(_) if tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "the store {} is held by another process, and no daemon's control socket answers",
                                path.display()
                            )
                        })
                    }
                }
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the daemon");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
