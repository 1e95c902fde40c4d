//! Exim 4, the SMTP server Debian installs by default, as a private
//! instance: unpacked by ./scripts/test beside Postfix (their packages
//! conflict), started on a free loopback port in a temp dir, relaying to
//! the test stack's Postfix, stopped by its own pid file. Its habits
//! (messages past the 10th of a connection wait for a queue run; a TLS
//! session without close_notify is logged as an error) are what
//! `[smtp] max_per_connection` and the clean session end are for.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

pub struct Exim {
    pub port: u16,
    dir: tempfile::TempDir,
    pid: PathBuf,
}

fn binary() -> PathBuf {
    let path = std::env::var_os("ESCALATOR_TEST_EXIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-servers/exim/usr/sbin/exim4")
        });
    assert!(
        path.exists(),
        "Exim is not unpacked at {}: run ./scripts/test (it unpacks exim4-daemon-light \
         beside Postfix)",
        path.display()
    );
    path
}

fn chown_mail(p: &Path) {
    let ok = Command::new("chown")
        .arg("-R")
        .arg("mail:mail")
        .arg(p)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "chown {}", p.display());
}

impl Exim {
    /// Exim relaying everything to `relay_port` (the stack's Postfix);
    /// with `tls`, STARTTLS with that certificate and key.
    pub fn start(relay_port: u16, tls: Option<(&Path, &Path)>) -> Exim {
        let exe = binary();
        let dir = tempfile::Builder::new()
            .prefix("exim-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for sub in ["spool", "log"] {
            std::fs::create_dir(d.join(sub)).unwrap();
            chown_mail(&d.join(sub));
        }
        let port = free_port();
        let tls_lines = match tls {
            None => "tls_advertise_hosts =\n".to_string(),
            Some((cert, key)) => {
                // Read by the receiving process, which runs as `mail`.
                std::fs::copy(cert, d.join("cert.pem")).unwrap();
                std::fs::copy(key, d.join("key.pem")).unwrap();
                chown_mail(&d.join("cert.pem"));
                chown_mail(&d.join("key.pem"));
                format!(
                    "tls_advertise_hosts = *\ntls_certificate = {0}/cert.pem\ntls_privatekey = {0}/key.pem\n",
                    d.display()
                )
            }
        };
        let conf = format!(
            r#"exim_path = {exe}
exim_user = mail
exim_group = mail
never_users =
keep_environment =
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
primary_hostname = exim.example.test
local_interfaces = 127.0.0.1
acl_smtp_rcpt = acl_check_rcpt
host_lookup =
rfc1413_hosts =
log_selector = +smtp_connection
{tls_lines}
begin acl
acl_check_rcpt:
  accept

begin routers
to_postfix:
  driver = manualroute
  transport = remote_smtp
  route_list = * 127.0.0.1::{relay_port}
  self = send

begin transports
remote_smtp:
  driver = smtp
  allow_localhost
  hosts_avoid_tls = *

begin retry
*   *   F,1h,1m
"#,
            d = d.display(),
            exe = exe.display()
        );
        let conf_path = d.join("exim.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let pid = d.join("exim.pid");
        // No `-q`: no queue runner, so a message Exim queues instead of
        // delivering at once stays queued, visibly.
        let status = Command::new(&exe)
            .arg("-C")
            .arg(&conf_path)
            .arg("-bd")
            .arg("-oX")
            .arg(port.to_string())
            .arg("-oP")
            .arg(&pid)
            .status()
            .expect("cannot run exim");
        assert!(
            status.success(),
            "exim did not start: {}",
            Exim::read(d, "paniclog")
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "exim does not listen: {}",
                Exim::read(d, "mainlog")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Exim { port, dir, pid }
    }

    fn read(d: &Path, log: &str) -> String {
        std::fs::read_to_string(d.join("log").join(log)).unwrap_or_default()
    }

    /// Exim's main log.
    pub fn mainlog(&self) -> String {
        Exim::read(self.dir.path(), "mainlog")
    }

    /// Every log Exim wrote (main, reject, panic).
    pub fn logs(&self) -> String {
        ["mainlog", "rejectlog", "paniclog"]
            .iter()
            .map(|l| Exim::read(self.dir.path(), l))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        // Only the daemon this test started, by its own pid file.
        let Ok(text) = std::fs::read_to_string(&self.pid) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A config whose `[smtp]` is the private Exim (plain on loopback, or
/// STARTTLS with `ca`), with `extra` lines in `[smtp]`.
fn via_exim(
    stack: &MailStack,
    exim: &Exim,
    store: &Path,
    extra: &str,
    ca: Option<&Path>,
) -> String {
    let text = stack.config("support", store, "");
    let old = format!(
        "host = \"127.0.0.1\"\nport = {}\nsecurity = \"plain\"",
        stack.smtp_port
    );
    assert!(text.contains(&old));
    let new = match ca {
        None => format!(
            "host = \"127.0.0.1\"\nport = {}\nsecurity = \"plain\"\n{extra}",
            exim.port
        ),
        Some(ca) => format!(
            "host = \"127.0.0.1\"\nport = {}\nsecurity = \"starttls\"\nca_file = {:?}\n{extra}",
            exim.port,
            ca.display().to_string()
        ),
    };
    text.replacen(&old, &new, 1)
}

fn customer_mail(user: &str) -> Vec<u8> {
    mail(
        &MailStack::addr(user),
        &MailStack::addr("support"),
        &format!("Help for {user}"),
        &format!("{user}-1@example.org"),
        "",
        "Hello, nothing works.",
    )
}

/// Fifteen acks in one burst through Exim with its defaults: with
/// `max_per_connection` at its default (10) every one is delivered at
/// once; at 20 (as before the setting existed), Exim queues the five
/// past the tenth of the connection for a queue run that, on Debian,
/// may be 30 minutes away.
#[tokio::test(flavor = "multi_thread")]
async fn exim_delivers_a_burst_of_acks_at_once() {
    let first: Vec<String> = (1..=15).map(|n| format!("a{n}")).collect();
    let second: Vec<String> = (1..=15).map(|n| format!("b{n}")).collect();
    let mut users = vec!["support", "tier2"];
    users.extend(first.iter().chain(&second).map(String::as_str));
    let stack = MailStack::start(&users);
    let exim = Exim::start(stack.smtp_port, None);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let store = dir.path().join("store");
    std::fs::write(&cfg, via_exim(&stack, &exim, &store, "", None)).unwrap();
    for u in &first {
        stack.deliver_maildir("support", &customer_mail(u), 1);
    }
    escalator_ok(&["run", "--once", "--config", cfg.to_str().unwrap()]);
    for u in &first {
        let got = stack.wait_for(u, 1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1, "{u} got the ack at once:\n{}", exim.mainlog());
    }
    let log = exim.mainlog();
    assert!(!log.contains("no immediate delivery"), "{log}");

    // The control: one connection for all fifteen.
    std::fs::write(
        &cfg,
        via_exim(&stack, &exim, &store, "max_per_connection = 20", None),
    )
    .unwrap();
    for u in &second {
        stack.deliver_maildir("support", &customer_mail(u), 2);
    }
    escalator_ok(&["run", "--once", "--config", cfg.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while exim.mainlog().matches("no immediate delivery").count() < 5
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = exim.mainlog();
    assert_eq!(
        log.matches("no immediate delivery").count(),
        5,
        "Exim held back the mails past the tenth of the connection:\n{log}"
    );
}

/// Over STARTTLS, Exim logs no TLS error for escalator's sessions (it
/// did for each one without QUIT and close_notify), and shows the EHLO
/// name escalator gave.
#[tokio::test(flavor = "multi_thread")]
async fn exim_sees_clean_tls_sessions_and_the_helo_name() {
    let (_certs, ca, (cert, key)) = crate::reliability::certificates();
    let stack = MailStack::start(&["support", "tier2", "f1", "f2", "f3"]);
    let exim = Exim::start(stack.smtp_port, Some((&cert, &key)));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        via_exim(
            &stack,
            &exim,
            &dir.path().join("store"),
            "helo_name = \"helo.escalator.test\"\nmax_per_connection = 2",
            Some(&ca.0),
        ),
    )
    .unwrap();
    for u in ["f1", "f2", "f3"] {
        stack.deliver_maildir("support", &customer_mail(u), 1);
    }
    escalator_ok(&["run", "--once", "--config", cfg.to_str().unwrap()]);
    for u in ["f1", "f2", "f3"] {
        let got = stack.wait_for(u, 1, Duration::from_secs(20)).await.len();
        assert_eq!(got, 1, "{u}:\n{}", exim.logs());
    }
    // Exim logs a session's TLS trouble when it ends: wait for the ends
    // (escalator closed its last session before run --once returned).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while exim.mainlog().matches("closed by QUIT").count() < 2
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = exim.logs();
    let received: Vec<&str> = logs.lines().filter(|l| l.contains(" <= ")).collect();
    assert_eq!(received.len(), 3, "{logs}");
    for l in &received {
        assert!(l.contains("X=TLS"), "over TLS: {l}");
        assert!(
            l.contains("H=(helo.escalator.test)")
                || l.contains("H=localhost (helo.escalator.test)"),
            "{l}"
        );
    }
    assert_eq!(
        logs.matches("closed by QUIT").count(),
        2,
        "three mails, two a session, each session ended by QUIT:\n{logs}"
    );
    assert!(!logs.contains("TLS error"), "{logs}");
    assert!(!logs.contains("unexpected disconnection"), "{logs}");
}
