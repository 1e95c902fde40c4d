//! What a store transaction hands an engine when it commits: its writes
//! ([`Op`]) and the mailbox lease they depend on ([`Fence`]). Both engines
//! take these, so they depend on this module and never on each other.

use std::sync::Arc;

use super::codec::Tree;

/// One write: a put (Some) or a remove (None). Values are shared with
/// the transaction's read-back overlay, not copied.
pub(super) type Op = (Tree, Vec<u8>, Option<Arc<[u8]>>);

/// A write's claim to a mailbox: committed only while `holder` holds the
/// mailbox's lease with this `token` (see [`super::Tx::fence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub mailbox: String,
    pub holder: String,
    pub token: i64,
}
