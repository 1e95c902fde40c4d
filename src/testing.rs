//! Test fixtures shared by the unit tests of several modules: one small
//! config, and a panic point a test can aim at one piece of work.

use std::path::Path;
use std::sync::Mutex;

use crate::config::Config;

/// A config on loopback with a store in `dir`: `[cases]` gets `cases`
/// appended, and `tiers` follows the first tier ("Frontline", staff
/// `agent@example.test`) for tests that need more.
pub fn config(dir: &Path, cases: &str, tiers: &str) -> Config {
    let text = format!(
        r#"
[mailbox]
host = "127.0.0.1"
security = "plain"
username = "s"
password = "p"
[smtp]
host = "127.0.0.1"
security = "plain"
from = "Support <support@example.test>"
[store]
path = "{}"
[cases]
{cases}
[[tiers]]
name = "Frontline"
first_response = "4h"
staff = ["agent@example.test"]
{tiers}
"#,
        dir.join("store").display()
    );
    match Config::parse(&text, Path::new("/x.toml")) {
        Ok(c) => c,
        Err(e) => panic!("test config: {e}"),
    }
}

/// Makes the work on one id panic once (a timer's case, an outbox entry).
#[derive(Default)]
pub struct PanicPoint(Mutex<Option<u64>>);

impl PanicPoint {
    /// For a `static` (where `Default` cannot be called).
    pub const fn new() -> PanicPoint {
        PanicPoint(Mutex::new(None))
    }

    /// The next work on `id` panics.
    pub fn aim(&self, id: u64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// Called where the work begins; panics if aimed at `id`.
    pub fn reach(&self, id: u64, what: &str) {
        let hit = {
            let mut p = self.0.lock().unwrap_or_else(|p| p.into_inner());
            (*p == Some(id)).then(|| p.take())
        };
        if hit.is_some() {
            panic!("test-induced failure {what} {id}");
        }
    }
}

/// A private PostgreSQL server for one test: `initdb` and `pg_ctl` from
/// `/usr/lib/postgresql/*/bin`, in a temp dir (owned by the `postgres`
/// user when the tests run as root: PostgreSQL refuses root), on a free
/// loopback port, stopped and removed when dropped. Never the machine's
/// own cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                let mut v: Vec<_> = d.flatten().map(|e| e.path().join("bin")).collect();
                v.sort();
                v.pop()
            })
            .filter(|b| b.join("initdb").exists())
            .unwrap_or_else(|| {
                panic!("PostgreSQL's server is not installed (./scripts/test installs it)")
            });
        let dir = match tempfile::Builder::new()
            .prefix("escalator-pg")
            .tempdir_in("/tmp")
        {
            Ok(d) => d,
            Err(e) => panic!("temp dir: {e}"),
        };
        // Root (PostgreSQL refuses it): the effective uid, from /proc.
        let as_postgres = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
            })
            .unwrap_or(false);
        if as_postgres {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
            run(std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let pg = Postgres {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = pg.dir.path().join("data");
        run(pg
            .cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data));
        run(pg
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-w", "-l"])
            .arg(pg.dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off",
                pg.dir.path().display()
            ))
            .arg("start"));
        pg
    }

    fn cmd(&self, program: &str) -> std::process::Command {
        let exe = self.bin.join(program);
        if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        }
    }

    /// The URL of database `name`, created on first use.
    pub fn database(&self, name: &str) -> String {
        let admin = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        );
        let mut c = match postgres::Client::connect(&admin, postgres::NoTls) {
            Ok(c) => c,
            Err(e) => panic!("connect: {e}"),
        };
        let exists = c
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .map(|r| r.is_some())
            .unwrap_or(false);
        if !exists {
            if let Err(e) = c.batch_execute(&format!("CREATE DATABASE \"{name}\"")) {
                panic!("create database {name}: {e}");
            }
        }
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={name}",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn run(cmd: &mut std::process::Command) {
    match cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("{cmd:?}: {e}"),
    }
}
