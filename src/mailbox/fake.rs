//! A scripted IMAP server for the watcher's unit tests: just enough of
//! RFC 9051 for what the watcher sends (LOGIN, CAPABILITY, SELECT,
//! EXAMINE, LIST, UID SEARCH, UID FETCH, IDLE, LOGOUT), over an in-memory
//! pipe so the tests run in paused time. It can behave as the servers the
//! real stack cannot: one that tells an idling client nothing (Cyrus
//! without idled), one that gives every EXAMINE a new UIDVALIDITY
//! (Courier without write access).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

#[derive(Default)]
pub struct State {
    /// Folder → (UID → message).
    pub folders: BTreeMap<String, BTreeMap<u32, Vec<u8>>>,
    /// Folder → UIDVALIDITY as SELECT reports it.
    pub validity: BTreeMap<String, u32>,
    /// Every EXAMINE reports a new UIDVALIDITY (SELECT keeps it).
    pub examine_renumbers: bool,
    /// IDLE gets `* n EXISTS` when mail arrives (else nothing, ever).
    pub idle_notifies: bool,
    /// Every command received, without its tag.
    pub commands: Vec<String>,
    /// SASL mechanisms announced by CAPABILITY (`AUTH=...`).
    pub auth_mechs: Vec<String>,
    /// Tokens AUTHENTICATE takes (XOAUTH2/OAUTHBEARER); others get the
    /// JSON error challenge, then NO.
    pub tokens: Vec<String>,
    /// After a successful AUTHENTICATE, every further command gets NO.
    pub refuse_after_auth: bool,
    /// The decoded initial responses AUTHENTICATE received.
    pub auth_responses: Vec<String>,
    next_validity: u32,
}

#[derive(Clone, Default)]
pub struct FakeServer(pub Arc<Mutex<State>>);

impl FakeServer {
    pub fn new(folders: &[&str]) -> FakeServer {
        let s = FakeServer::default();
        {
            let mut st = s.state();
            st.next_validity = 100;
            for f in folders {
                st.folders.insert(f.to_string(), BTreeMap::new());
                st.validity.insert(f.to_string(), 1);
            }
        }
        s
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a message into `folder` with the next UID.
    pub fn deliver(&self, folder: &str, raw: &[u8]) {
        let mut st = self.state();
        let f = st.folders.entry(folder.to_string()).or_default();
        let uid = f.keys().next_back().copied().unwrap_or(0) + 1;
        f.insert(uid, raw.to_vec());
    }

    /// The commands received so far that start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.state()
            .commands
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    /// A new connection: the client's end; the server runs on a task.
    pub fn accept(&self) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.serve(server).await;
        });
        client
    }

    // Long: one branch per IMAP command the scripted server answers.
    async fn serve(self, io: DuplexStream) -> std::io::Result<()> {
        let (r, mut w) = tokio::io::split(io);
        let mut r = BufReader::new(r);
        w.write_all(b"* OK [CAPABILITY IMAP4rev1 IDLE] fake ready\r\n")
            .await?;
        let mut selected: Option<String> = None;
        let mut authenticated = false;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let text = line.trim_end().to_string();
            let Some((tag, cmd)) = text.split_once(' ') else {
                continue;
            };
            self.state().commands.push(cmd.to_string());
            let upper = cmd.to_ascii_uppercase();
            if authenticated && self.state().refuse_after_auth {
                w.write_all(format!("{tag} NO [UNAVAILABLE] account disabled\r\n").as_bytes())
                    .await?;
                continue;
            }
            let out = if upper == "CAPABILITY" {
                let auth: String = self
                    .state()
                    .auth_mechs
                    .iter()
                    .map(|m| format!(" AUTH={m}"))
                    .collect();
                format!("* CAPABILITY IMAP4rev1 IDLE{auth}\r\n{tag} OK done\r\n")
            } else if let Some(mech) = upper.strip_prefix("AUTHENTICATE ") {
                authenticated = self.authenticate(&mut r, &mut w, tag, mech.trim()).await?;
                continue;
            } else if upper.starts_with("LOGIN") {
                format!("{tag} OK logged in\r\n")
            } else if upper == "LOGOUT" {
                w.write_all(format!("* BYE\r\n{tag} OK bye\r\n").as_bytes())
                    .await?;
                return Ok(());
            } else if upper.starts_with("SELECT") || upper.starts_with("EXAMINE") {
                let name = unquote(cmd.split_once(' ').map(|x| x.1).unwrap_or(""));
                self.open(tag, &name, upper.starts_with("EXAMINE"), &mut selected)
            } else if upper.starts_with("LIST") {
                let st = self.state();
                let mut out = String::new();
                for f in st.folders.keys() {
                    out.push_str(&format!("* LIST () \".\" \"{f}\"\r\n"));
                }
                out + &format!("{tag} OK listed\r\n")
            } else if upper.starts_with("UID SEARCH") {
                let set = cmd.rsplit(' ').next().unwrap_or("");
                let uids = self.uids(selected.as_deref(), set);
                let list: Vec<String> = uids.iter().map(|u| u.to_string()).collect();
                format!("* SEARCH {}\r\n{tag} OK searched\r\n", list.join(" "))
            } else if upper.starts_with("UID FETCH") {
                let mut parts = cmd.splitn(4, ' ');
                let set = parts.nth(2).unwrap_or("");
                let body = upper.contains("BODY.PEEK[]");
                let mut out = Vec::new();
                for (seq, uid, raw) in self.messages(selected.as_deref(), set) {
                    if body {
                        out.extend(
                            format!("* {seq} FETCH (UID {uid} BODY[] {{{}}}\r\n", raw.len())
                                .as_bytes(),
                        );
                        out.extend(&raw);
                        out.extend(b")\r\n");
                    } else {
                        out.extend(
                            format!("* {seq} FETCH (UID {uid} RFC822.SIZE {})\r\n", raw.len())
                                .as_bytes(),
                        );
                    }
                }
                out.extend(format!("{tag} OK fetched\r\n").as_bytes());
                w.write_all(&out).await?;
                continue;
            } else if upper == "IDLE" {
                w.write_all(b"+ idling\r\n").await?;
                self.idle(&mut r, &mut w, tag, selected.as_deref()).await?;
                continue;
            } else if upper == "NOOP" {
                format!("{tag} OK noop\r\n")
            } else {
                format!("{tag} BAD unknown command\r\n")
            };
            w.write_all(out.as_bytes()).await?;
        }
    }

    /// SASL XOAUTH2 or OAUTHBEARER: the initial response after `+`, the
    /// token checked; a refusal sends Gmail's JSON error challenge
    /// (with a bidi override in it, as hostile as a server can be) and
    /// wants the client's answer before the NO.
    async fn authenticate<R, W>(
        &self,
        r: &mut R,
        w: &mut W,
        tag: &str,
        mech: &str,
    ) -> std::io::Result<bool>
    where
        R: tokio::io::AsyncBufRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        if !self.state().auth_mechs.iter().any(|m| m == mech) {
            w.write_all(format!("{tag} NO unsupported mechanism\r\n").as_bytes())
                .await?;
            return Ok(false);
        }
        w.write_all(b"+ \r\n").await?;
        let mut line = String::new();
        r.read_line(&mut line).await?;
        let response =
            String::from_utf8_lossy(&b64.decode(line.trim()).unwrap_or_default()).into_owned();
        self.state().auth_responses.push(response.clone());
        let token = response
            .split('\x01')
            .find_map(|p| p.strip_prefix("auth=Bearer "))
            .unwrap_or("")
            .to_string();
        if self.state().tokens.contains(&token) {
            w.write_all(format!("{tag} OK authenticated\r\n").as_bytes())
                .await?;
            return Ok(true);
        }
        let json = "{\"status\":\"401\",\"schemes\":\"bearer\u{202e}\",\"scope\":\"https://mail.google.com/\"}";
        w.write_all(format!("+ {}\r\n", b64.encode(json)).as_bytes())
            .await?;
        line.clear();
        r.read_line(&mut line).await?;
        self.state().auth_responses.push(
            String::from_utf8_lossy(&b64.decode(line.trim()).unwrap_or_default()).into_owned(),
        );
        w.write_all(format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n").as_bytes())
            .await?;
        Ok(false)
    }

    fn open(&self, tag: &str, name: &str, examine: bool, selected: &mut Option<String>) -> String {
        let mut st = self.state();
        let Some(n) = st.folders.get(name).map(|f| f.len()) else {
            *selected = None;
            return format!("{tag} NO [NONEXISTENT] Mailbox does not exist\r\n");
        };
        let validity = if examine && st.examine_renumbers {
            st.next_validity += 1;
            st.next_validity
        } else {
            st.validity.get(name).copied().unwrap_or(1)
        };
        *selected = Some(name.to_string());
        let mode = if examine { "READ-ONLY" } else { "READ-WRITE" };
        format!(
            "* FLAGS (\\Seen)\r\n* {n} EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY {validity}] ok\r\n{tag} OK [{mode}] opened\r\n"
        )
    }

    /// Waits for DONE; tells of new mail when `idle_notifies`.
    async fn idle<R, W>(
        &self,
        r: &mut BufReader<R>,
        w: &mut W,
        tag: &str,
        folder: Option<&str>,
    ) -> std::io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let count = |me: &FakeServer| {
            let st = me.state();
            folder
                .and_then(|f| st.folders.get(f))
                .map(|f| f.len())
                .unwrap_or(0)
        };
        let start = count(self);
        let mut line = String::new();
        loop {
            tokio::select! {
                n = r.read_line(&mut line) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    w.write_all(format!("{tag} OK idle done\r\n").as_bytes()).await?;
                    return Ok(());
                }
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    let now = count(self);
                    if self.state().idle_notifies && now != start {
                        w.write_all(format!("* {now} EXISTS\r\n").as_bytes()).await?;
                    }
                }
            }
        }
    }

    fn uids(&self, folder: Option<&str>, set: &str) -> Vec<u32> {
        self.messages(folder, set)
            .into_iter()
            .map(|(_, u, _)| u)
            .collect()
    }

    /// (sequence number, UID, bytes) of the messages in a UID set.
    fn messages(&self, folder: Option<&str>, set: &str) -> Vec<(usize, u32, Vec<u8>)> {
        let st = self.state();
        let Some(f) = folder.and_then(|f| st.folders.get(f)) else {
            return Vec::new();
        };
        let last = f.keys().next_back().copied().unwrap_or(0);
        let ranges: Vec<(u32, u32)> = set
            .split(',')
            .filter_map(|r| {
                let num = |x: &str| if x == "*" { Some(last) } else { x.parse().ok() };
                match r.split_once(':') {
                    Some((a, b)) => {
                        let (a, b) = (num(a)?, num(b)?);
                        Some((a.min(b), a.max(b)))
                    }
                    None => num(r).map(|a| (a, a)),
                }
            })
            .collect();
        f.iter()
            .enumerate()
            .filter(|(_, (u, _))| ranges.iter().any(|(a, b)| (a..=b).contains(u)))
            .map(|(i, (u, raw))| (i + 1, *u, raw.clone()))
            .collect()
    }
}

fn unquote(s: &str) -> String {
    s.trim().trim_matches('"').to_string()
}
