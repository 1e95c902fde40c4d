//! What the workers share: the store, the live config, the clock and the
//! wake-up handles. Ingest, the scheduler and the admin commands each
//! take one of these instead of four fields of their own; a leaf above
//! the store, below every worker.

use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Live;
use crate::store::Store;
use crate::wake::Wakers;

#[derive(Clone)]
pub struct Handle {
    pub store: Arc<Store>,
    pub config: Arc<Live>,
    pub clock: Arc<dyn Clock>,
    /// Wakes the outbox and the scheduler after a change.
    pub wake: Arc<Wakers>,
}
