//! A private PostgreSQL server for tests. Self-contained (std, tempfile,
//! the postgres client), so the integration tests include this same file.

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
    /// A server for tests: fsync off (a crash of the test machine loses
    /// nothing anyone needs).
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// With `durable`, PostgreSQL fsyncs as in production (for the
    /// benchmark's comparison with sled, which does).
    pub fn start_with(durable: bool) -> Postgres {
        Postgres::start_opts(durable, None)
    }

    /// A server that also speaks TLS with this certificate and key (PEM
    /// files; plain connections are still taken, for the tests' own).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Postgres {
        Postgres::start_opts(false, Some((cert, key)))
    }

    // Long: test fixture: initdb, the config lines, start and wait, in order.
    fn start_opts(durable: bool, tls: Option<(&std::path::Path, &std::path::Path)>) -> Postgres {
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
        let mut ssl = String::new();
        if let Some((cert, key)) = tls {
            // The server reads them as itself, and wants its key private.
            let (c, k) = (
                pg.dir.path().join("server.crt"),
                pg.dir.path().join("server.key"),
            );
            for (from, to, mode) in [(cert, &c, 0o644), (key, &k, 0o600)] {
                use std::os::unix::fs::PermissionsExt;
                if let Err(e) = std::fs::copy(from, to) {
                    panic!("{}: {e}", from.display());
                }
                let _ = std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode));
                if pg.as_postgres {
                    run(std::process::Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(to));
                }
            }
            ssl = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                c.display(),
                k.display()
            );
        }
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
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync={}{ssl}",
                pg.dir.path().display(),
                if durable { "on" } else { "off" }
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

    /// Restarts the server (fast shutdown: every connection is cut).
    pub fn restart(&self) {
        self.restart_in("fast");
    }

    /// Kills the server as a power cut would (immediate stop: no
    /// checkpoint, clients cut, recovery from the WAL at start) and
    /// starts it again.
    pub fn crash_restart(&self) {
        self.restart_in("immediate");
    }

    /// `pg_ctl restart` starts the server with the options it ran with
    /// (its port), stopping it in shutdown `mode`.
    fn restart_in(&self, mode: &str) {
        let data = self.dir.path().join("data");
        run(self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            // Its output to the log file: a pipe would be held open by
            // the new server and never end.
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-m", mode, "restart"]));
    }

    /// The URL of database `name`, created on first use. (On a thread of
    /// its own: the blocking client must not run inside a tokio test.)
    pub fn database(&self, name: &str) -> String {
        let admin = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        );
        let db = name.to_string();
        let made = std::thread::spawn(move || -> Result<(), String> {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)
                .map_err(|e| format!("connect: {e}"))?;
            let exists = c
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
                .map_err(|e| e.to_string())?
                .is_some();
            if !exists {
                c.batch_execute(&format!("CREATE DATABASE \"{db}\""))
                    .map_err(|e| format!("create database {db}: {e}"))?;
            }
            Ok(())
        })
        .join();
        match made {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("creating database {name} panicked"),
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
