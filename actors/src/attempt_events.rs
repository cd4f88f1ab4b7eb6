//! Where the work of one attempt reports: the sink the [`pipeline`](crate::pipeline) is given.
//!
//! The pipeline writes its events (stage progress, a stage's retry note) into an
//! [`AttemptEvents`] and never sees what stores them; the [`delivery`](crate::delivery), which
//! owns the attempt's history (its order, its de-duplication ids, the flush before the
//! outcome), implements it. So the job's walk goes one way: the job actor hands the pipeline
//! a sink, and the pipeline calls nothing above it.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use futures::future::{BoxFuture, Shared};
use kiln_core::protocol::Event;
use kiln_core::store::JobStore;

/// The events of one claimed attempt.
pub(crate) trait AttemptEvents: Send {
    /// Publishes one event of the attempt (labelled, its stage shown under the name clients
    /// know), stored after the attempt's `running` event and before its outcome.
    fn event(&mut self, event: Event) -> impl Future<Output = ()> + Send;

    /// What the engine's progress, forwarded by a task of its own while the engine runs,
    /// must keep to: see [`ProgressOrder`].
    fn progress_order(&self) -> ProgressOrder;
}

/// Where the engine's progress events go, and how they keep their place in the attempt's
/// history.
pub(crate) struct ProgressOrder {
    /// The store the attempt's events go to (the delivery's).
    pub(crate) store: Arc<dyn JobStore>,
    /// Resolves once the attempt's `running` event is stored: no progress event goes before.
    pub(crate) running_stored: Shared<BoxFuture<'static, ()>>,
    /// The stream sequence of the attempt's newest stored event; each stored progress event
    /// raises it (the artifact events chain onto it).
    pub(crate) last_seq: Arc<AtomicU64>,
}
