//! The wake-up handles the workers share: ingest and the CLI's changes
//! tell the outbox and the scheduler that there is work, so neither
//! polls. A leaf: every worker may use it, it uses none.

use std::time::Duration;

use tokio::sync::Notify;

/// How often workers look at a store other processes write to, in case
/// a notification of their work was lost.
pub const SHARED_POLL: Duration = Duration::from_secs(15);

/// Wakes the workers when there is something for them.
#[derive(Debug, Default)]
pub struct Wakers {
    /// New outbox entries.
    pub outbox: Notify,
    /// Timers changed.
    pub timers: Notify,
}

impl Wakers {
    pub fn both(&self) {
        self.outbox.notify_one();
        self.timers.notify_one();
    }
}
