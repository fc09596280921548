//! The boundary between the network layer and the ledger engine.
//!
//! The server knows the engine only through `Backend`. Every method is non-blocking: writes and
//! non-balance reads complete through a callback that the engine calls from its own thread once
//! the answer exists (for writes: once the batch is durable). The server never waits on the
//! engine from a network task, and the engine never waits on a socket.
//!
//! What must never happen here: a callback that blocks, or a reply before durability (that
//! ordering is the engine's job; the server only forwards what `done` receives).

use crate::layout::{CommandRecord, QueryRecord, ReplyRecord};
pub use crate::protocol::QueryAnswer;

/// Called exactly once with one reply per submitted command, in submission order.
pub type ReplyCallback = Box<dyn FnOnce(Vec<ReplyRecord>) + Send>;
/// Called exactly once with the answer to one query.
pub type AnswerCallback = Box<dyn FnOnce(QueryAnswer) + Send>;

/// Command kinds at or above this code are operator actions; only admin connections may send them.
pub const ADMIN_KIND_MIN: u8 = 200;

/// The ledger engine as the server sees it.
pub trait Backend: Send + Sync + 'static {
    /// Submits write commands (timestamps are assigned by the engine; the wire carries 0).
    ///
    /// `done` is called exactly once, from an engine thread, with one `ReplyRecord` per command
    /// in the same order, after they are durable. Must not block: when a queue is full the engine
    /// answers `busy` in the replies instead. If `done` is dropped without being called (a bug),
    /// the server answers the frame with an `internal` error so the client is never left hanging.
    fn submit(&self, commands: Vec<CommandRecord>, done: ReplyCallback);

    /// Lock-free committed balance read, answered inline: status ok/not_found, value = balance.
    fn balance(&self, account: u64) -> ReplyRecord;

    /// Any other read (history, lookup, top-up status). `done` is called exactly once.
    ///
    /// For history, the server has already clamped `query.limit` to what fits in one answer
    /// frame (a `limit` of 0 is replaced by that maximum); the engine returns at most `limit`
    /// entries, newest first, and sets the next-page cursor in the answer.
    fn query(&self, query: QueryRecord, done: AnswerCallback);

    /// Whether a command kind is an operator action. Client-role connections that send one get a
    /// `forbidden` error for the whole frame and nothing of it is submitted.
    fn is_admin_kind(&self, kind: u8) -> bool {
        kind >= ADMIN_KIND_MIN
    }

    /// The event feed, if this backend has one (`Watch` frames are refused otherwise).
    fn feed(&self) -> Option<std::sync::Arc<crate::feed::Feed>> {
        None
    }
}
