//! A private Dovecot (IMAP + LMTP) and Postfix (SMTP → LMTP) on free
//! loopback ports in a temp dir, for the integration tests; plus helpers
//! to send mail in, read mailboxes back over IMAP, and run the escalator
//! binary. Each stack stops its own processes by their pid files when
//! dropped (never by name: other stacks may run beside it).

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde_json::Value;

pub const DOMAIN: &str = "example.test";
/// Mail to this domain is accepted by the test stack and then bounced
/// (5.1.1) back to its envelope sender as a delivery-status notification:
/// use local parts that are not users of the stack.
pub const BOUNCE_DOMAIN: &str = "bounce.test";
const MAIL_UID: u32 = 8;
const MAIL_GID: u32 = 8;

pub struct MailStack {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub imap_port: u16,
    /// IMAP over implicit TLS, when started with a certificate.
    pub imaps_port: Option<u16>,
    tls: Option<(PathBuf, PathBuf)>,
    pub smtp_port: u16,
    /// SMTP over implicit TLS, when started with a certificate (Postfix
    /// also offers STARTTLS on `smtp_port` then).
    pub smtps_port: Option<u16>,
    /// With OAuth: the port of the token introspection server Dovecot
    /// asks (Postfix's SMTP AUTH goes through Dovecot too).
    oauth: Option<u16>,
    pub users: Vec<String>,
}

fn need(cmd: &str) {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists());
    assert!(
        found,
        "`{cmd}` is not installed. The integration tests need a real Dovecot and Postfix: \
         run ./scripts/test (it installs them), or \
         `apt-get install -y dovecot-imapd dovecot-lmtpd postfix`"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn run(cmd: &mut Command) {
    // Daemons fork and keep inherited pipes open, so `output()` would wait
    // forever: their words go to a file instead.
    let log = tempfile::NamedTempFile::new().unwrap();
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        status.success(),
        "{cmd:?} failed: {}",
        fs::read_to_string(log.path()).unwrap_or_default()
    );
}

fn backdate(p: &Path) {
    // Postfix naps while main.cf or a map is younger than ~2 s.
    run(Command::new("touch").arg("-d").arg("@1000000000").arg(p));
}

fn mkdir(p: &Path, mode: u32, owner: Option<(u32, u32)>) {
    fs::create_dir_all(p).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    if let Some((u, g)) = owner {
        chown(p, Some(u), Some(g)).unwrap();
    }
}

fn ids(name: &str) -> (u32, u32) {
    let out = Command::new("id").arg("-u").arg(name).output().unwrap();
    let u = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let out = Command::new("id").arg("-g").arg(name).output().unwrap();
    let g = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (u, g)
}

fn group(name: &str) -> u32 {
    let out = Command::new("getent")
        .arg("group")
        .arg(name)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

impl MailStack {
    /// Starts a stack whose users (local parts at example.test) are
    /// `users`; each user's password is its name.
    pub fn start(users: &[&str]) -> MailStack {
        MailStack::start_with(users, None, None)
    }

    /// Starts a stack whose IMAP and SMTP also take XOAUTH2 logins,
    /// checked by POSTing the token to `http://127.0.0.1:{introspect}/`.
    pub fn start_oauth(users: &[&str], introspect: u16) -> MailStack {
        MailStack::start_with(users, None, Some(introspect))
    }

    /// Starts a stack whose IMAP also listens with TLS, using `cert` and
    /// `key` (PEM files).
    pub fn start_tls(users: &[&str], cert: &Path, key: &Path) -> MailStack {
        MailStack::start_with(users, Some((cert.to_owned(), key.to_owned())), None)
    }

    fn start_with(
        users: &[&str],
        tls: Option<(PathBuf, PathBuf)>,
        oauth: Option<u16>,
    ) -> MailStack {
        need("dovecot");
        need("postfix");
        let tmp = tempfile::Builder::new()
            .prefix("esc-")
            .tempdir_in("/tmp")
            .unwrap();
        let dir = tmp.path().to_path_buf();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let imap_port = free_port();
        let mut smtp_port = free_port();
        while smtp_port == imap_port {
            smtp_port = free_port();
        }
        let users: Vec<String> = users.iter().map(|u| u.to_string()).collect();
        let imaps_port = tls.as_ref().map(|_| {
            let mut p = free_port();
            while p == imap_port || p == smtp_port {
                p = free_port();
            }
            p
        });
        let smtps_port = tls.as_ref().map(|_| loop {
            let p = free_port();
            if Some(p) != imaps_port && p != imap_port && p != smtp_port {
                break p;
            }
        });
        let stack = MailStack {
            dir,
            _tmp: tmp,
            imap_port,
            imaps_port,
            tls,
            smtp_port,
            smtps_port,
            oauth,
            users,
        };
        stack.start_dovecot();
        stack.start_postfix();
        stack.wait_ready();
        stack
    }

    fn start_dovecot(&self) {
        let d = &self.dir;
        for sub in ["run", "state", "log"] {
            mkdir(&d.join(sub), 0o755, None);
        }
        mkdir(&d.join("mail"), 0o755, Some((MAIL_UID, MAIL_GID)));
        let passwd: String = self
            .users
            .iter()
            .map(|u| format!("{u}:{{PLAIN}}{u}\n"))
            .collect();
        fs::write(d.join("passwd"), passwd).unwrap();
        let conf = format!(
            r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/log/dovecot.log
info_log_path = {d}/log/dovecot.log
instance_name = mailstack-{imap}
protocols = imap lmtp
listen = 127.0.0.1
{ssl}
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 8
first_valid_gid = 8
disable_plaintext_auth = no
auth_mechanisms = plain login{oauth_mechs}
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {d}/passwd
}}
{oauth}
userdb {{
  driver = static
  args = uid=8 gid=8 home={d}/mail/%n
}}
mail_location = maildir:~/Maildir
mail_fsync = never
mailbox_idle_check_interval = 1 secs
namespace inbox {{
  inbox = yes
  mailbox Sent {{
    special_use = \Sent
    auto = subscribe
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
protocol lmtp {{
  postmaster_address = postmaster@{DOMAIN}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"#,
            d = d.display(),
            imap = self.imap_port,
            imaps = self.imaps_port.unwrap_or(0),
            oauth_mechs = if self.oauth.is_some() { " xoauth2 oauthbearer" } else { "" },
            // Postfix checks SMTP logins against Dovecot (SASL), so a
            // wrong SMTP password is refused as a real server refuses it.
            oauth = match self.oauth {
                None => "service auth {\n  unix_listener auth-client {\n    mode = 0666\n  }\n}\n"
                    .to_string(),
                Some(_) => format!(
                    "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}/oauth2.conf\n}}\nservice auth {{\n  unix_listener auth-client {{\n    mode = 0666\n  }}\n}}\n",
                    d.display()
                ),
            },
            ssl = match &self.tls {
                None => "ssl = no".to_string(),
                Some((c, k)) => format!(
                    "ssl = yes\nssl_cert = <{}\nssl_key = <{}",
                    c.display(),
                    k.display()
                ),
            },
        );
        fs::write(d.join("dovecot.conf"), conf).unwrap();
        if let Some(port) = self.oauth {
            fs::write(
                d.join("oauth2.conf"),
                format!(
                    "introspection_mode = post\nintrospection_url = http://127.0.0.1:{port}/introspect\nforce_introspection = yes\nusername_attribute = username\nactive_attribute = active\nactive_value = true\n"
                ),
            )
            .unwrap();
        }
        run(Command::new("dovecot")
            .arg("-c")
            .arg(d.join("dovecot.conf")));
    }

    fn start_postfix(&self) {
        let d = &self.dir;
        let pf = d.join("postfix");
        mkdir(&pf, 0o755, None);
        let spool = d.join("spool");
        mkdir(&spool, 0o755, None);
        let (pu, pg) = ids("postfix");
        let postdrop = group("postdrop");
        for sub in [
            "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
            "private", "saved", "trace",
        ] {
            mkdir(&spool.join(sub), 0o700, Some((pu, pg)));
        }
        mkdir(&spool.join("maildrop"), 0o730, Some((pu, postdrop)));
        mkdir(&spool.join("public"), 0o710, Some((pu, postdrop)));
        mkdir(&spool.join("pid"), 0o755, None);
        mkdir(&d.join("postfix-data"), 0o700, Some((pu, pg)));
        let vmailbox: String = self
            .users
            .iter()
            .map(|u| format!("{u}@{DOMAIN} OK\n"))
            .collect();
        fs::write(pf.join("vmailbox"), vmailbox).unwrap();
        fs::write(pf.join("access"), "").unwrap();
        backdate(&pf.join("access"));
        // Mail to the domain `bounce.test` is accepted (a relay domain
        // with no recipient list), then handed to Dovecot, which has no
        // such users and refuses it (550 5.1.1): Postfix returns it to its
        // sender as a real delivery-status notification (issue 18). (An
        // `error:` transport would be refused at RCPT already.)
        fs::write(
            pf.join("transport"),
            format!("{BOUNCE_DOMAIN} lmtp:unix:{}/run/lmtp\n", d.display()),
        )
        .unwrap();
        backdate(&pf.join("transport"));
        let main = format!(
            r#"compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/postfix-data
maillog_file = {d}/log/postfix.log
maillog_file_prefixes = {d}/log
syslog_name = postfix-test-{port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.{DOMAIN}
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = texthash:{d}/postfix/vmailbox
virtual_transport = lmtp:unix:{d}/run/lmtp
relay_domains = {BOUNCE_DOMAIN}
transport_maps = texthash:{d}/postfix/transport
default_transport = error:5.7.1 test stack does not relay
relay_transport = error:5.7.1 test stack does not relay
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access texthash:{d}/postfix/access
smtpd_reject_unlisted_recipient = yes
smtputf8_enable = no
smtpd_peername_lookup = no
smtpd_error_sleep_time = 0s
in_flow_delay = 0s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
message_size_limit = 104857600
{tls}
{sasl}
"#,
            d = d.display(),
            port = self.smtp_port,
            sasl = "smtpd_sasl_auth_enable = yes\nsmtpd_sasl_type = dovecot\nsmtpd_sasl_path = {d}/run/auth-client"
                .replace("{d}", &d.display().to_string()),
            tls = match &self.tls {
                None => String::new(),
                Some((c, k)) => format!(
                    "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\nsmtpd_tls_loglevel = 1",
                    c.display(),
                    k.display()
                ),
            }
        );
        fs::write(pf.join("main.cf"), main).unwrap();
        let master = format!(
            "127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
{smtps}",
            port = self.smtp_port,
            smtps = match self.smtps_port {
                None => String::new(),
                Some(p) =>
                    format!("127.0.0.1:{p} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes\n"),
            }
        );
        fs::write(pf.join("master.cf"), master).unwrap();
        for f in ["main.cf", "master.cf", "vmailbox"] {
            backdate(&pf.join(f));
        }
        run(Command::new("postfix").arg("-c").arg(&pf).arg("start"));
    }

    /// Stops Postfix (SMTP refuses connections until `start_smtp`).
    pub fn stop_smtp(&self) {
        self.stop_pidfile(&self.dir.join("spool/pid/master.pid"));
        let _ = fs::remove_file(self.dir.join("spool/pid/master.pid"));
    }

    pub fn start_smtp(&self) {
        run(Command::new("postfix")
            .arg("-c")
            .arg(self.dir.join("postfix"))
            .arg("start"));
        self.wait_ready();
    }

    /// Stops Dovecot (IMAP and delivery) until `start_imap`.
    pub fn stop_imap(&self) {
        self.stop_pidfile(&self.dir.join("run/master.pid"));
    }

    pub fn start_imap(&self) {
        run(Command::new("dovecot")
            .arg("-c")
            .arg(self.dir.join("dovecot.conf")));
        self.wait_ready();
    }

    /// Sets Postfix's recipient access map (lines like
    /// `alice@example.test 450 4.7.1 try later`) and reloads Postfix.
    pub fn recipient_access(&self, map: &str) {
        let p = self.dir.join("postfix/access");
        fs::write(&p, map).unwrap();
        backdate(&p);
        run(Command::new("postfix")
            .arg("-c")
            .arg(self.dir.join("postfix"))
            .arg("reload"));
        // Let the old smtpd processes finish.
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Restarts Dovecot: every IMAP connection is cut.
    pub fn restart_imap(&self) {
        self.stop_pidfile(&self.dir.join("run/master.pid"));
        run(Command::new("dovecot")
            .arg("-c")
            .arg(self.dir.join("dovecot.conf")));
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in [Some(self.imap_port), Some(self.smtp_port), self.imaps_port]
            .into_iter()
            .flatten()
        {
            loop {
                if Some(port) == self.imaps_port && TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    break;
                }
                if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                    let mut line = String::new();
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    if BufReader::new(s).read_line(&mut line).is_ok() && !line.is_empty() {
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "mail stack did not start on port {port}; logs in {}",
                    self.dir.join("log").display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn addr(user: &str) -> String {
        format!("{user}@{DOMAIN}")
    }

    /// Submits raw mail over SMTP; returns the server's final reply.
    pub fn send(&self, from: &str, to: &[&str], raw: &[u8]) -> Result<(), String> {
        smtp_send(self.smtp_port, from, to, raw)
    }

    /// Puts a message straight into a user's Maildir (fast seeding).
    pub fn deliver_maildir(&self, user: &str, raw: &[u8], n: usize) {
        self.deliver_maildir_folder(user, None, raw, n)
    }

    /// Same, into a folder other than INBOX (e.g. the Sent folder).
    pub fn deliver_maildir_folder(&self, user: &str, folder: Option<&str>, raw: &[u8], n: usize) {
        let mut md = self.dir.join("mail").join(user).join("Maildir");
        if let Some(f) = folder {
            let root = md.clone();
            for p in [root.clone(), root.join(format!(".{f}"))] {
                if !p.exists() {
                    mkdir(&p, 0o700, Some((MAIL_UID, MAIL_GID)));
                }
            }
            md = root.join(format!(".{f}"));
        }
        for sub in ["", "new", "cur", "tmp"] {
            let p = md.join(sub);
            if !p.exists() {
                mkdir(&p, 0o700, Some((MAIL_UID, MAIL_GID)));
            }
        }
        // Unique even for calls with the same `n` in the same second.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!(
            "{}.M{}P{}N{n}.seed",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::process::id()
        );
        let p = md.join("new").join(name);
        fs::write(&p, raw).unwrap();
        match chown(&p, Some(MAIL_UID), Some(MAIL_GID)) {
            // Dovecot, woken by the new file, moved it to cur/ already.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r.unwrap(),
        }
    }

    /// All messages in a user's folder, read over IMAP (BODY.PEEK[]).
    pub async fn fetch(&self, user: &str, folder: &str) -> Vec<Vec<u8>> {
        self.flags(user, folder)
            .await
            .into_iter()
            .map(|(m, _)| m)
            .collect()
    }

    /// Every message of a folder with its flags, over IMAP.
    pub async fn flags(&self, user: &str, folder: &str) -> Vec<(Vec<u8>, String)> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.imap_port))
            .await
            .unwrap();
        let mut client = async_imap::Client::new(tcp);
        client.read_response().await.unwrap();
        let mut s = client.login(user, user).await.map_err(|(e, _)| e).unwrap();
        let mbox = s.examine(folder).await.unwrap();
        let mut out = Vec::new();
        if mbox.exists > 0 {
            let fetches: Vec<_> = s
                .fetch("1:*", "(FLAGS BODY.PEEK[])")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            for f in fetches {
                let flags: Vec<String> = f.flags().map(|fl| format!("{fl:?}")).collect();
                if let Some(b) = f.body() {
                    out.push((b.to_vec(), flags.join(" ")));
                }
            }
        }
        let _ = s.logout().await;
        out
    }

    /// Waits until a user's INBOX holds at least `n` messages.
    pub async fn wait_for(&self, user: &str, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.fetch(user, "INBOX").await;
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until Postfix's queue is empty (everything delivered).
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("postqueue")
                .arg("-c")
                .arg(self.dir.join("postfix"))
                .arg("-j")
                .output();
            let empty = out
                .map(|o| o.status.success() && o.stdout.iter().all(|b| b.is_ascii_whitespace()))
                .unwrap_or(true);
            if empty || Instant::now() > deadline {
                // Delivery into the Maildir has happened once the queue
                // is empty; give Dovecot's index a moment.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A config for escalator against this stack, watching `support`.
    pub fn config(&self, support: &str, store: &Path, extra: &str) -> String {
        self.config_head(support, store)
            + &format!(
                r#"
[[tiers]]
name = "Frontline"
first_response = "4h"

[[tiers]]
name = "Tier 2"
staff = ["tier2@{DOMAIN}"]
forward_to = ["tier2@{DOMAIN}"]
first_response = "8h"
{extra}
"#
            )
    }

    /// A `[[mailboxes]]` entry: queue `name` watching `user`'s INBOX
    /// (password: the user's name), with `extra` keys (address, tiers).
    pub fn queue(&self, name: &str, user: &str, extra: &str) -> String {
        format!(
            r#"
[[mailboxes]]
name = "{name}"
host = "127.0.0.1"
port = {imap}
security = "plain"
username = "{user}"
password = "{user}"
poll_interval = "1s"
timeout = "20s"
{extra}
"#,
            imap = self.imap_port,
        )
    }

    /// `[smtp]` (from `support`) and `[store]`, for configs with queues.
    pub fn smtp_and_store(&self, store: &Path) -> String {
        format!(
            r#"
[smtp]
host = "127.0.0.1"
port = {smtp}
security = "plain"
from = "Example Support <support@{DOMAIN}>"

[store]
path = "{store}"
"#,
            smtp = self.smtp_port,
            store = store.display()
        )
    }

    /// The connection and store part of a config, without tiers.
    pub fn config_head(&self, support: &str, store: &Path) -> String {
        format!(
            r#"[mailbox]
host = "127.0.0.1"
port = {imap}
security = "plain"
username = "{support}"
password = "{support}"
poll_interval = "1s"
timeout = "20s"

[smtp]
host = "127.0.0.1"
port = {smtp}
security = "plain"
from = "Example Support <{support}@{DOMAIN}>"

[store]
path = "{store}"
"#,
            imap = self.imap_port,
            smtp = self.smtp_port,
            store = store.display()
        )
    }

    fn stop_pidfile(&self, pidfile: &Path) {
        let Ok(text) = fs::read_to_string(pidfile) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            // A zombie is gone for our purposes.
            if fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MailStack {
    fn drop(&mut self) {
        self.stop_pidfile(&self.dir.join("spool/pid/master.pid"));
        self.stop_pidfile(&self.dir.join("run/master.pid"));
    }
}

/// A stack, a store and a config file for one test.
pub struct Setup {
    pub stack: MailStack,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    pub fn new(users: &[&str], extra: &str) -> Setup {
        Setup::build(users, |stack, store| stack.config("support", store, extra))
    }

    /// A setup whose tiers (and anything after them) are `tail`.
    pub fn with_tiers(users: &[&str], tail: &str) -> Setup {
        Setup::build(users, |stack, store| {
            stack.config_head("support", store) + tail
        })
    }

    /// A setup whose whole config is `text(stack, store path)`.
    pub fn build(users: &[&str], text: impl FnOnce(&MailStack, &Path) -> String) -> Setup {
        let stack = MailStack::start(users);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("escalator.toml");
        std::fs::write(&config, text(&stack, &dir.path().join("store"))).unwrap();
        Setup {
            stack,
            config,
            _dir: dir,
        }
    }

    /// Adds lines to the [mailbox] section of the config.
    pub fn with_mailbox(self, lines: &str) -> Setup {
        let text = std::fs::read_to_string(&self.config).unwrap().replacen(
            "[smtp]",
            &format!("{lines}\n\n[smtp]"),
            1,
        );
        std::fs::write(&self.config, text).unwrap();
        self
    }

    pub fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    pub fn once(&self) {
        let out = escalator(&["run", "--once", "--config", self.cfg()]);
        assert!(
            out.status.success(),
            "run --once failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn cases(&self) -> Vec<Value> {
        let out = escalator(&["cases", "list", "--json", "--config", self.cfg()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn show(&self, id: u64) -> Value {
        let out = escalator(&[
            "cases",
            "show",
            &id.to_string(),
            "--json",
            "--config",
            self.cfg(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn send(&self, from_user: &str, raw: &[u8]) {
        self.stack
            .send(
                &MailStack::addr(from_user),
                &[&MailStack::addr("support")],
                raw,
            )
            .unwrap();
    }

    /// Starts the daemon; its log goes to a file (a pipe nobody reads
    /// would fill up and block it).
    pub fn daemon(&self) -> Daemon {
        self.daemon_with(&[], "")
    }

    /// Starts a daemon of a cluster named `node` (the same config as the
    /// others), its log in a file of its own.
    pub fn node(&self, node: &str) -> Daemon {
        self.daemon_with(&["--node", node], node)
    }

    /// The same with its /metrics on `listen` (`run --metrics-listen`).
    pub fn node_with_metrics(&self, node: &str, listen: &str) -> Daemon {
        self.daemon_with(&["--node", node, "--metrics-listen", listen], node)
    }

    fn daemon_with(&self, args: &[&str], tag: &str) -> Daemon {
        let log = self
            .config
            .with_extension(format!("{}{tag}.log", std::process::id()));
        Daemon::start(self.cfg(), args, log)
    }
}

/// A running daemon, stopped (SIGTERM) when dropped.
pub struct Daemon(Option<Child>, PathBuf);

impl Daemon {
    /// `escalator run --config cfg ARGS`, its log in `log`.
    pub fn start(cfg: &str, args: &[&str], log: PathBuf) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_escalator"))
            .args(["run", "--config", cfg])
            .args(args)
            .env("ESCALATOR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon(Some(child), log)
    }

    /// Sends a signal ("HUP", "TERM"...) to the daemon.
    pub fn signal(&self, sig: &str) {
        let pid = self.0.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// SIGKILL, as a crash or power cut would; waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Is the daemon still running?
    pub fn alive(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// Waits until the log shows `needle` `n` times; returns the log.
    pub async fn wait_log(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, wait; the exit status and the daemon's log (as stderr).
    pub fn stop(&mut self) -> std::process::Output {
        let mut child = self.0.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let status = child.wait().unwrap();
        std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: fs::read(&self.1).unwrap_or_default(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

/// A minimal SMTP client: the tests control every byte they submit.
pub fn smtp_send(port: u16, from: &str, to: &[&str], raw: &[u8]) -> Result<(), String> {
    let mut c = SmtpClient::connect(port)?;
    c.send(from, to, raw)?;
    c.quit();
    Ok(())
}

/// A plain SMTP client on one connection: what tests and the benchmark
/// send with. TCP_NODELAY, and each message with its final dot in one
/// write, so no mail waits on a delayed ACK.
pub struct SmtpClient {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl SmtpClient {
    pub fn connect(port: u16) -> Result<SmtpClient, String> {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        s.set_nodelay(true).ok();
        let mut c = SmtpClient {
            w: s.try_clone().map_err(|e| e.to_string())?,
            r: BufReader::new(s),
        };
        c.expect('2')?;
        c.cmd("EHLO test.example.test", '2')?;
        Ok(c)
    }

    /// Reads one (multi-line) reply; an error unless it starts with `code`.
    fn expect(&mut self, code: char) -> Result<(), String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Err("connection closed".into());
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                break;
            }
        }
        if all.starts_with(code) {
            Ok(())
        } else {
            Err(all)
        }
    }

    fn cmd(&mut self, c: &str, code: char) -> Result<(), String> {
        self.w
            .write_all(format!("{c}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        self.expect(code)
    }

    pub fn send(&mut self, from: &str, to: &[&str], raw: &[u8]) -> Result<(), String> {
        self.cmd(&format!("MAIL FROM:<{from}>"), '2')?;
        for t in to {
            self.cmd(&format!("RCPT TO:<{t}>"), '2')?;
        }
        self.cmd("DATA", '3')?;
        let mut data = Vec::with_capacity(raw.len() + 16);
        for line in raw.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        if !data.ends_with(b"\n") {
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        self.w.write_all(&data).map_err(|e| e.to_string())?;
        self.expect('2')
    }

    pub fn quit(mut self) {
        let _ = self.cmd("QUIT", '2');
    }
}

/// Runs the escalator binary with `args`.
/// Runs the CLI and asserts it succeeded (its stderr in the failure).
pub fn escalator_ok(args: &[&str]) -> Output {
    let out = escalator(args);
    assert!(
        out.status.success(),
        "escalator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn escalator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_escalator"))
        .args(args)
        .env("ESCALATOR_LOG", "info")
        .output()
        .expect("cannot run escalator")
}

/// Sum of a Prometheus metric's samples at `port` (None: no answer).
pub fn scrape(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    Some(
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.strip_prefix(name))
            .filter(|rest| rest.starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// A simple customer mail.
pub fn mail(from: &str, to: &str, subject: &str, msgid: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{msgid}>\r\n\
Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n{extra}\r\n{body}\r\n"
    )
    .into_bytes()
}

/// Header value of a raw message (first occurrence, unfolded).
pub fn header(raw: &[u8], name: &str) -> Option<String> {
    escalator::message::header_fields(raw)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// A private CA in `dir`: (cert, key).
pub fn private_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("ca.crt");
    let key = dir.join("ca.key");
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=escalator test CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    fs::set_permissions(&cert, fs::Permissions::from_mode(0o644)).unwrap();
    (cert, key)
}

/// A server certificate for `names` (DNS names or IPs) signed by `ca`:
/// (cert, key) in `dir`.
pub fn server_cert(
    dir: &Path,
    stem: &str,
    names: &[&str],
    ca: &(PathBuf, PathBuf),
) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    let csr = dir.join(format!("{stem}.csr"));
    let ext = dir.join(format!("{stem}.ext"));
    let san: Vec<String> = names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect();
    fs::write(
        &ext,
        format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
            san.join(",")
        ),
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj"])
        .arg(format!("/CN={}", names[0]))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca.0)
        .arg("-CAkey")
        .arg(&ca.1)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    fs::set_permissions(&cert, fs::Permissions::from_mode(0o644)).unwrap();
    (cert, key)
}

/// Tiers with a 2 s first response at the Frontline.
pub fn tiers(extra: &str) -> String {
    format!(
        r#"
[[tiers]]
name = "Frontline"
staff = ["agent@example.test"]
first_response = "2s"
follow_up = "2s"

[[tiers]]
name = "Tier 2"
staff = ["tier2@example.test"]
forward_to = ["tier2@example.test"]
first_response = "1h"
renotify = "1h"
{extra}
"#
    )
}
