//! A node started in this process, for the benchmarks that run one beside their client
//! (`kiln bench --torchscript`, `kiln bench --http`). The node is the runtime's
//! (`kiln::node::RunningNode`), which this crate cannot name (the `kiln` crate depends on this
//! one): the `kiln` binary implements [`NodeStarter`] and passes it in.

use std::time::Duration;

use futures::future::BoxFuture;
use kiln_core::config::ClusterConfig;

/// Starts a node in this process from its config: connected, its NATS resources made, its
/// actors up.
pub trait NodeStarter: Send + Sync {
    fn start(&self, config: ClusterConfig) -> BoxFuture<'_, Result<Box<dyn StartedNode>, String>>;
}

/// A node a [`NodeStarter`] started.
pub trait StartedNode: Send {
    /// Drains the node and stops it: its running jobs get `grace` to end.
    fn shutdown(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()>;
}
