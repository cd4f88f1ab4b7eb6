//! The sweep of idle fair-share queues: a key's queue consumer (`kiln_core::fair`) with nothing
//! queued or running for `fair_share.idle_queue_s` is removed, so a cluster that saw many
//! users keeps consumers for the active ones only; a key's next job makes its consumer again
//! (the API node before enqueueing it, a puller when a re-check finds its subject holding one).
//!
//! One node sweeps: the one that exports the queue gauges ([`crate::queue_gauges::exports`]),
//! every quarter of the idle time (at least every second, at most every minute).

use std::time::Duration;

use kiln_core::nats::{RegistryCache, Resources};
use kiln_core::task::{self, TaskGuard, TaskKind};

/// Starts the sweep of node `me`; it stops when the guard drops. Nothing when `idle_queue_s`
/// is 0 (the queues are kept).
pub fn spawn(resources: Resources, registry: RegistryCache, me: String, idle_queue_s: u64) -> Option<TaskGuard<()>> {
    let idle_after = Duration::from_secs(idle_queue_s);
    if idle_after.is_zero() {
        return None;
    }
    let period = (idle_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    Some(task::spawn(TaskKind::Refresh, "idle queue sweep", async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !crate::queue_gauges::exports(&me, &registry.nodes()) {
                continue;
            }
            match resources.remove_idle_queues(idle_after).await {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(count = removed.len(), consumers = ?removed, "removed idle fair-share queues")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot sweep the idle fair-share queues; trying again later"),
            }
        }
    }))
}
