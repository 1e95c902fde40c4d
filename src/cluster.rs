//! The cluster: several daemons on one PostgreSQL store. Each node says
//! it is alive every third of the lease, and watches the mailboxes whose
//! leases it holds — at most its share (the mailboxes over the live
//! nodes, rounded up), so the work spreads and a node that joins gets
//! some. A lease is renewed every third of its length; a node that
//! cannot renew stops watching before the lease could have expired by
//! its own clock, and every ingest commit checks the lease's fencing
//! token in the database (see [`crate::store::Tx::fence`]), so a paused
//! or cut-off node that wakes up writes nothing for a mailbox it lost.
//!
//! Outbox and timers need no owner: each node claims work in store
//! transactions, which the database serialises (see `outbox`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::{Fence, NodeInfo, Store, StoreError};
use crate::template::printable;

/// This node's name: `run --node` (or `ESCALATOR_NODE`), else `[cluster]
/// node`, else the host name and the pid (unique on a machine, new after
/// a restart).
pub fn node_name(flag: Option<&str>, configured: Option<&str>) -> String {
    if let Some(n) = flag.or(configured) {
        return n.to_string();
    }
    format!("{}-{}", host_name(), std::process::id())
}

/// The machine's name, made safe for a node name.
pub fn host_name() -> String {
    let raw = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .take(48)
        .collect();
    if clean.is_empty() {
        "host".into()
    } else {
        clean
    }
}

/// How many mailboxes a node may hold while `live` nodes are alive.
pub fn share(mailboxes: usize, live: usize) -> usize {
    mailboxes.div_ceil(live.max(1))
}

/// How long before its lease could expire a node stops watching when
/// renewals fail: a fifth of the lease, for clocks that run at slightly
/// different rates and a renewal's answer that took its time.
pub fn safety_margin(lease: Duration) -> Duration {
    lease / 5
}

/// Starts a watcher for a mailbox under its fence; its task ends with
/// the watcher (cancelled, or failed).
pub type Spawn =
    Arc<dyn Fn(&str, Fence, CancellationToken) -> JoinHandle<Result<(), StoreError>> + Send + Sync>;

/// A mailbox this node holds.
struct Held {
    fence: Fence,
    /// By this node's clock, the lease lasts at least until here (the
    /// database set its expiry from a later moment than we measured).
    until: Instant,
    stop: CancellationToken,
    task: JoinHandle<Result<(), StoreError>>,
}

/// The node's part in the cluster.
pub struct Membership {
    pub store: Arc<Store>,
    pub me: NodeInfo,
    pub lease: Duration,
    /// Every queue of the config, in its order.
    pub queues: Vec<String>,
    pub spawn: Spawn,
}

impl Membership {
    /// Runs until `cancel`: heartbeats, leases, watchers. A watcher that
    /// fails in a way that is not about its lease ends the node (the
    /// error is returned), as a lone daemon's would.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StoreError> {
        let mut held: BTreeMap<String, Held> = BTreeMap::new();
        let mut live = 1;
        tracing::info!(node = %self.me.node, lease = ?self.lease, "joining the cluster");
        let result = loop {
            if let Err(e) = self.reap(&mut held).await {
                break Err(e);
            }
            match self.call(|s, me, lease| s.heartbeat(me, lease)).await {
                Ok(n) => live = n.max(1),
                Err(e) => tracing::warn!(error = %crate::error_chain(&e), "heartbeat failed"),
            }
            self.renew(&mut held).await;
            self.rebalance(&mut held, live).await;
            let wait = self.next_look(&held).await;
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        };
        // A clean stop hands the mailboxes over at once.
        for (queue, h) in std::mem::take(&mut held) {
            self.give_back(&queue, h).await;
        }
        let node = self.me.node.clone();
        if let Err(e) = self.call(move |s, _, _| s.leave(&node)).await {
            tracing::warn!(error = %crate::error_chain(&e), "cannot leave the cluster's node list; it ages out");
        }
        result
    }

    /// Runs a blocking store call off the async threads.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, &NodeInfo, Duration) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (store, me, lease) = (self.store.clone(), self.me.clone(), self.lease);
        tokio::task::spawn_blocking(move || f(&store, &me, lease))
            .await
            .map_err(|e| StoreError::Engine(Box::new(e)))?
    }

    /// Forgets watchers that ended: a lost lease is let go; any other
    /// failure ends the node.
    async fn reap(&self, held: &mut BTreeMap<String, Held>) -> Result<(), StoreError> {
        let ended: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(q, _)| q.clone())
            .collect();
        for queue in ended {
            let Some(h) = held.remove(&queue) else {
                continue;
            };
            match h.task.await {
                Ok(Err(StoreError::Fenced(_))) => {
                    crate::metrics::inc(&crate::metrics::METRICS.fenced);
                    tracing::warn!(queue, token = h.fence.token, "another node holds this mailbox now; our write was refused and we stepped back");
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(())) | Err(_) => {
                    // Stopped by itself: let another node have it.
                    self.release(&h.fence).await;
                }
            }
        }
        Ok(())
    }

    /// Renews every held lease; stops watching a mailbox whose lease was
    /// lost or could expire before the next renewal could succeed.
    async fn renew(&self, held: &mut BTreeMap<String, Held>) {
        let margin = safety_margin(self.lease);
        let queues: Vec<String> = held.keys().cloned().collect();
        for queue in queues {
            let Some(h) = held.get_mut(&queue) else {
                continue;
            };
            let asked = Instant::now();
            let fence = h.fence.clone();
            let renewed = self
                .call(move |s, _, lease| {
                    s.renew_lease(&fence.mailbox, &fence.holder, fence.token, lease)
                })
                .await;
            match renewed {
                Ok(true) => h.until = asked + self.lease,
                Ok(false) => {
                    tracing::warn!(
                        queue,
                        token = h.fence.token,
                        "lease lost (expired or taken over); stopping this mailbox's watcher"
                    );
                    if let Some(h) = held.remove(&queue) {
                        h.stop.cancel();
                    }
                }
                Err(e) if Instant::now() + margin >= h.until => {
                    tracing::error!(queue, error = %crate::error_chain(&e), "cannot renew the lease before it could expire; stopping this mailbox's watcher");
                    if let Some(h) = held.remove(&queue) {
                        h.stop.cancel();
                    }
                }
                Err(e) => {
                    tracing::warn!(queue, error = %crate::error_chain(&e), "cannot renew the lease; trying again")
                }
            }
        }
    }

    /// Takes free mailboxes up to this node's share, and gives back what
    /// is over it (a node joined).
    async fn rebalance(&self, held: &mut BTreeMap<String, Held>, live: usize) {
        let share = share(self.queues.len(), live);
        while held.len() > share {
            // The last in config order: nodes agree on which to keep.
            let Some(queue) = self
                .queues
                .iter()
                .rev()
                .find(|q| held.contains_key(*q))
                .cloned()
            else {
                break;
            };
            if let Some(h) = held.remove(&queue) {
                tracing::info!(
                    queue,
                    live,
                    share,
                    "handing a mailbox over to a node with fewer"
                );
                self.give_back(&queue, h).await;
            }
        }
        for queue in &self.queues {
            if held.len() >= share {
                break;
            }
            if held.contains_key(queue) {
                continue;
            }
            let asked = Instant::now();
            let q = queue.clone();
            let got = self
                .call(move |s, me, lease| s.acquire_lease(&q, &me.node, lease))
                .await;
            match got {
                Ok(Some(token)) => {
                    let fence = Fence {
                        mailbox: queue.clone(),
                        holder: self.me.node.clone(),
                        token,
                    };
                    tracing::info!(queue, token, "lease taken; watching the mailbox");
                    let stop = CancellationToken::new();
                    let task = (self.spawn)(queue, fence.clone(), stop.clone());
                    held.insert(
                        queue.clone(),
                        Held {
                            fence,
                            until: asked + self.lease,
                            stop,
                            task,
                        },
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(queue, error = %crate::error_chain(&e), "cannot take the lease")
                }
            }
        }
    }

    /// Stops a watcher, waits a little for its current transaction, then
    /// releases its lease (a commit after that is fenced anyway).
    async fn give_back(&self, queue: &str, h: Held) {
        h.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(10), h.task)
            .await
            .is_err()
        {
            tracing::warn!(queue, "the watcher did not stop in 10s; releasing its lease anyway (its writes are fenced)");
        }
        self.release(&h.fence).await;
    }

    async fn release(&self, fence: &Fence) {
        let f = fence.clone();
        if let Err(e) = self
            .call(move |s, _, _| s.release_lease(&f.mailbox, &f.holder, f.token))
            .await
        {
            tracing::warn!(queue = %fence.mailbox, error = %crate::error_chain(&e), "cannot release the lease; it expires by itself");
        }
    }

    /// When to look again: a third of the lease, sooner when a lease we
    /// could take expires earlier (a dead node's mailbox is taken over as
    /// soon as its lease runs out), or when one of ours needs stopping.
    async fn next_look(&self, held: &BTreeMap<String, Held>) -> Duration {
        let mut wait = self.lease / 3;
        let now = Instant::now();
        for h in held.values() {
            let stop_at = h
                .until
                .checked_sub(safety_margin(self.lease))
                .unwrap_or(now);
            wait = wait.min(stop_at.saturating_duration_since(now));
        }
        if held.len() < self.queues.len() {
            if let Ok(leases) = self.call(|s, _, _| s.leases()).await {
                let me = &self.me.node;
                for l in leases
                    .iter()
                    .filter(|l| &l.holder != me && l.remaining_ms >= 0)
                {
                    let ms = u64::try_from(l.remaining_ms).unwrap_or(0) + 50;
                    wait = wait.min(Duration::from_millis(ms));
                }
            }
        }
        wait.max(Duration::from_millis(50))
    }
}

/// For `run --once` on a shared store: takes each queue's lease that is
/// free (a queue another node watches is skipped, with a note) and keeps
/// them renewed until [`OnceLeases::release`]. A cycle does not join the
/// node list: counted as a live node, it would make the daemons hand
/// mailboxes over for the seconds it runs.
pub async fn leases_for_once(
    store: Arc<Store>,
    me: NodeInfo,
    lease: Duration,
    queues: &[String],
) -> Result<OnceLeases, StoreError> {
    let mut fences = BTreeMap::new();
    {
        let (store, node) = (store.clone(), me.clone());
        let queues = queues.to_vec();
        let got = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            for q in queues {
                got.push((q.clone(), store.acquire_lease(&q, &node.node, lease)?));
            }
            Ok::<_, StoreError>(got)
        })
        .await
        .map_err(|e| StoreError::Engine(Box::new(e)))??;
        for (q, token) in got {
            match token {
                Some(token) => {
                    fences.insert(
                        q.clone(),
                        Fence {
                            mailbox: q,
                            holder: me.node.clone(),
                            token,
                        },
                    );
                }
                None => tracing::warn!(queue = q, "another node watches this mailbox; skipped"),
            }
        }
    }
    let stop = CancellationToken::new();
    let keeper = {
        let (store, fences, stop) = (store.clone(), fences.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(lease / 3) => {}
                }
                let (store, fences) = (store.clone(), fences.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    for f in fences.values() {
                        if let Err(e) = store.renew_lease(&f.mailbox, &f.holder, f.token, lease) {
                            tracing::warn!(queue = %f.mailbox, error = %crate::error_chain(&e), "cannot renew the lease");
                        }
                    }
                })
                .await;
            }
        })
    };
    Ok(OnceLeases {
        store,
        fences,
        stop,
        keeper: Some(keeper),
    })
}

/// The leases of one `run --once`.
pub struct OnceLeases {
    store: Arc<Store>,
    pub fences: BTreeMap<String, Fence>,
    stop: CancellationToken,
    keeper: Option<JoinHandle<()>>,
}

impl OnceLeases {
    /// Releases every lease.
    pub async fn release(mut self) {
        self.stop.cancel();
        if let Some(k) = self.keeper.take() {
            let _ = k.await;
        }
        let (store, fences) = (self.store.clone(), std::mem::take(&mut self.fences));
        let _ = tokio::task::spawn_blocking(move || {
            for f in fences.values() {
                let _ = store.release_lease(&f.mailbox, &f.holder, f.token);
            }
        })
        .await;
    }
}

/// What `escalator cluster status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// "postgres", or "sled" (one daemon, no cluster).
    pub engine: &'static str,
    pub nodes: Vec<crate::store::NodeRow>,
    /// One per queue of the config (and any other lease in the database),
    /// held or not.
    pub mailboxes: Vec<MailboxStatus>,
    pub outbox_depth: usize,
    /// Case timers due now (not yet fired).
    pub due_timers: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct MailboxStatus {
    pub mailbox: String,
    /// Whose lease is live now (None: nobody watches it this moment).
    pub holder: Option<String>,
    pub token: Option<i64>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// In the config of this CLI (a lease of a queue since removed shows
    /// as false).
    pub configured: bool,
}

/// Reads the cluster's state.
pub fn status(
    store: &Store,
    config: &crate::config::Config,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Status, StoreError> {
    let outbox_depth = store.outbox_depth()?;
    let due_timers = store.due_timers(now, usize::MAX)?.len();
    if !store.is_shared() {
        return Ok(Status {
            engine: "sled",
            nodes: Vec::new(),
            mailboxes: Vec::new(),
            outbox_depth,
            due_timers,
        });
    }
    let nodes = store.nodes(config.cluster.lease)?;
    let leases = store.leases()?;
    let mut mailboxes: Vec<MailboxStatus> = config
        .queues
        .iter()
        .map(|q| MailboxStatus {
            mailbox: q.name.clone(),
            holder: None,
            token: None,
            expires_at: None,
            configured: true,
        })
        .collect();
    for l in leases {
        let live = l.remaining_ms > 0;
        let i = match mailboxes.iter().position(|m| m.mailbox == l.mailbox) {
            Some(i) => i,
            None => {
                mailboxes.push(MailboxStatus {
                    mailbox: l.mailbox.clone(),
                    holder: None,
                    token: None,
                    expires_at: None,
                    configured: false,
                });
                mailboxes.len() - 1
            }
        };
        if live {
            let m = &mut mailboxes[i];
            m.holder = Some(l.holder);
            m.token = Some(l.token);
            m.expires_at = Some(l.expires_at);
        }
    }
    Ok(Status {
        engine: "postgres",
        nodes,
        mailboxes,
        outbox_depth,
        due_timers,
    })
}

impl Status {
    /// The text a person reads (names from the database escaped, as all
    /// stored text is in the CLI's human output).
    pub fn text(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if self.engine == "sled" {
            let _ = writeln!(
                out,
                "engine: sled (one daemon on this machine; a cluster needs engine = \"postgres\")"
            );
        } else {
            let _ = writeln!(out, "engine: postgres");
            let _ = writeln!(out, "nodes:");
            if self.nodes.is_empty() {
                let _ = writeln!(out, "  (none running)");
            }
            for n in &self.nodes {
                let ago = (now - n.last_seen).num_milliseconds().max(0) as f64 / 1000.0;
                let _ = writeln!(
                    out,
                    "  {:<24} {:<5} last seen {ago:.1}s ago  (host {}, pid {}, since {})",
                    printable(&n.node),
                    if n.alive { "alive" } else { "gone" },
                    printable(&n.host),
                    n.pid,
                    crate::case::rfc3339(n.started_at),
                );
            }
            let _ = writeln!(out, "mailboxes:");
            for m in &self.mailboxes {
                let extra = if m.configured {
                    ""
                } else {
                    "  (not in this config)"
                };
                match (&m.holder, m.expires_at) {
                    (Some(h), Some(until)) => {
                        let _ = writeln!(
                            out,
                            "  {:<24} held by {} until {} (token {}){extra}",
                            printable(&m.mailbox),
                            printable(h),
                            crate::case::rfc3339(until),
                            m.token.unwrap_or_default(),
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            out,
                            "  {:<24} not watched by any node{extra}",
                            printable(&m.mailbox)
                        );
                    }
                }
            }
        }
        let _ = writeln!(out, "outbox depth: {}", self.outbox_depth);
        let _ = writeln!(out, "due timers: {}", self.due_timers);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes_spread_over_the_live_nodes() {
        // Two mailboxes, three nodes: one each, the third idle.
        assert_eq!(share(2, 3), 1);
        assert_eq!(share(2, 1), 2);
        assert_eq!(share(3, 2), 2);
        assert_eq!(share(8, 3), 3);
        // Nobody seen (the heartbeat failed): take everything rather than
        // nothing, the fencing keeps it safe.
        assert_eq!(share(2, 0), 2);
    }

    #[test]
    fn a_node_stops_well_before_its_lease_could_expire() {
        let lease = Duration::from_secs(15);
        let m = safety_margin(lease);
        // Renewals come every third of the lease: the margin leaves two
        // tries before stopping.
        assert!(m < lease / 3 && m > Duration::ZERO, "{m:?}");
    }

    #[test]
    fn status_text_names_holders_and_escapes_what_the_database_holds() {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let status = Status {
            engine: "postgres",
            nodes: vec![crate::store::NodeRow {
                node: "eu-1\x1b[31m".into(),
                host: "h".into(),
                pid: 7,
                started_at: at,
                last_seen: at,
                alive: true,
            }],
            mailboxes: vec![
                MailboxStatus {
                    mailbox: "sales".into(),
                    holder: Some("eu-1".into()),
                    token: Some(4),
                    expires_at: Some(at),
                    configured: true,
                },
                MailboxStatus {
                    mailbox: "old".into(),
                    holder: None,
                    token: None,
                    expires_at: None,
                    configured: false,
                },
            ],
            outbox_depth: 3,
            due_timers: 2,
        };
        let text = status.text(at + chrono::Duration::seconds(2));
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("alive last seen 2.0s ago"), "{text}");
        assert!(
            text.contains("sales") && text.contains("held by eu-1 until"),
            "{text}"
        );
        assert!(text.contains("(token 4)"), "{text}");
        assert!(
            text.contains("not watched by any node  (not in this config)"),
            "{text}"
        );
        assert!(
            text.contains("outbox depth: 3") && text.contains("due timers: 2"),
            "{text}"
        );
    }

    #[test]
    fn node_names_prefer_the_flag_then_the_config() {
        assert_eq!(node_name(Some("a"), Some("b")), "a");
        assert_eq!(node_name(None, Some("b")), "b");
        let default = node_name(None, None);
        assert!(
            default.ends_with(&format!("-{}", std::process::id())),
            "{default}"
        );
        assert!(
            crate::config::check_node_name(&default).is_ok(),
            "{default}"
        );
    }
}
