//! What the nodes of a cluster share besides the store: who is alive
//! (`nodes`) and who watches which mailbox (`leases`,
//! with the fencing token every dependent write checks). Only a shared
//! engine has a cluster; the embedded store has one process, so these
//! calls answer [`StoreError::NotShared`] there. Every time is the
//! database's clock.

use chrono::{DateTime, Utc};

use super::engine::Db;
use super::{Result, Store, StoreError};

/// A daemon of the cluster as last seen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeRow {
    pub node: String,
    pub host: String,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Seen within the lease: counted when mailboxes are shared out.
    pub alive: bool,
}

/// A mailbox's lease.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeaseRow {
    pub mailbox: String,
    pub holder: String,
    pub token: i64,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Milliseconds until it expires by the database's clock (negative:
    /// expired or released).
    pub remaining_ms: i64,
}

/// A node's own facts for its heartbeat.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: String,
    pub host: String,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
}

/// Milliseconds, as the SQL below takes them.
fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    fn pg(&self) -> Result<&super::postgres::PgDb> {
        match &self.db {
            Db::Postgres(pg) => Ok(pg),
            Db::Sled(_) => Err(StoreError::NotShared),
        }
    }

    /// Records that `me` is alive now; forgets nodes unseen for a day.
    /// Returns how many nodes were seen within `lease` (this one too).
    pub fn heartbeat(&self, me: &NodeInfo, lease: std::time::Duration) -> Result<usize> {
        let me = me.clone();
        let lease = ms(lease);
        let pg = self.pg()?;
        let t = pg.tables();
        pg.call_outside(move |c| {
            c.execute(
                &format!(
                    "INSERT INTO {t}.nodes (node, host, pid, started_at, last_seen) \
                 VALUES ($1, $2, $3, $4, now()) \
                 ON CONFLICT (node) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, \
                 started_at = EXCLUDED.started_at, last_seen = now()"
                ),
                &[&me.node, &me.host, &me.pid, &me.started_at],
            )?;
            c.execute(
                &format!("DELETE FROM {t}.nodes WHERE last_seen < now() - interval '1 day'"),
                &[],
            )?;
            let n: i64 = c
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {t}.nodes \
                     WHERE last_seen > now() - $1::bigint * interval '1 millisecond'"
                    ),
                    &[&lease],
                )?
                .get(0);
            Ok(usize::try_from(n).unwrap_or(0))
        })
    }

    /// Removes `node` from the cluster (a clean stop): it counts as gone
    /// at once, not a lease later.
    pub fn leave(&self, node: &str) -> Result<()> {
        let node = node.to_string();
        let pg = self.pg()?;
        let t = pg.tables();
        pg.call_outside(move |c| {
            c.execute(&format!("DELETE FROM {t}.nodes WHERE node = $1"), &[&node])?;
            Ok(())
        })
    }

    /// The nodes, alive (seen within `lease`) first, by name.
    pub fn nodes(&self, lease: std::time::Duration) -> Result<Vec<NodeRow>> {
        let lease = ms(lease);
        let pg = self.pg()?;
        let t = pg.tables();
        pg.call_outside(move |c| {
            let rows = c.query(
                &format!(
                    "SELECT node, host, pid, started_at, last_seen, \
                 last_seen > now() - $1::bigint * interval '1 millisecond' AS alive \
                 FROM {t}.nodes ORDER BY alive DESC, node"
                ),
                &[&lease],
            )?;
            Ok(rows
                .iter()
                .map(|r| NodeRow {
                    node: r.get(0),
                    host: r.get(1),
                    pid: r.get(2),
                    started_at: r.get(3),
                    last_seen: r.get(4),
                    alive: r.get(5),
                })
                .collect())
        })
    }

    /// Takes `mailbox`'s lease for `holder` if nobody holds it (never
    /// held, expired or released): the new token, or None.
    pub fn acquire_lease(
        &self,
        mailbox: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<Option<i64>> {
        let (mailbox, holder, lease) = (mailbox.to_string(), holder.to_string(), ms(lease));
        let pg = self.pg()?;
        let t = pg.tables();
        pg.call_outside(move |c| {
            let row = c.query_opt(
                &format!("INSERT INTO {t}.leases AS l (mailbox, holder, token, acquired_at, expires_at) \
                 VALUES ($1, $2, nextval('{t}.lease_tokens'), now(), \
                         now() + $3::bigint * interval '1 millisecond') \
                 ON CONFLICT (mailbox) DO UPDATE SET holder = EXCLUDED.holder, \
                 token = EXCLUDED.token, acquired_at = EXCLUDED.acquired_at, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE l.expires_at <= now() \
                 RETURNING token"),
                &[&mailbox, &holder, &lease],
            )?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// Extends a lease still held with `token`: false when it was lost
    /// (expired, or another node holds it now).
    pub fn renew_lease(
        &self,
        mailbox: &str,
        holder: &str,
        token: i64,
        lease: std::time::Duration,
    ) -> Result<bool> {
        let (mailbox, holder, lease) = (mailbox.to_string(), holder.to_string(), ms(lease));
        let pg = self.pg()?;
        let t = pg.tables();
        pg.call_outside(move |c| {
            let n = c.execute(
                &format!(
                    "UPDATE {t}.leases \
                 SET expires_at = now() + $4::bigint * interval '1 millisecond' \
                 WHERE mailbox = $1 AND holder = $2 AND token = $3 AND expires_at > now()"
                ),
                &[&mailbox, &holder, &token, &lease],
            )?;
            Ok(n == 1)
        })
    }

    /// Gives a lease up at once (a clean stop, or a node holding more than
    /// its share): the next node to look takes it with a new token.
    pub fn release_lease(&self, mailbox: &str, holder: &str, token: i64) -> Result<()> {
        let (mailbox, holder) = (mailbox.to_string(), holder.to_string());
        let pg = self.pg()?;
        let t = pg.tables();
        pg.call_outside(move |c| {
            c.execute(
                &format!(
                    "UPDATE {t}.leases SET expires_at = now() \
                 WHERE mailbox = $1 AND holder = $2 AND token = $3 AND expires_at > now()"
                ),
                &[&mailbox, &holder, &token],
            )?;
            Ok(())
        })
    }

    /// Every lease, by mailbox.
    pub fn leases(&self) -> Result<Vec<LeaseRow>> {
        let pg = self.pg()?;
        let t = pg.tables();
        pg.call_outside(move |c| {
            let rows = c.query(
                &format!(
                    "SELECT mailbox, holder, token, acquired_at, expires_at, \
                 (extract(epoch FROM (expires_at - now())) * 1000)::bigint \
                 FROM {t}.leases ORDER BY mailbox"
                ),
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| LeaseRow {
                    mailbox: r.get(0),
                    holder: r.get(1),
                    token: r.get(2),
                    acquired_at: r.get(3),
                    expires_at: r.get(4),
                    remaining_ms: r.get(5),
                })
                .collect())
        })
    }
}
