//! The queue gauges, for dashboards and autoscalers: per model `kiln_queue_depth{model,lane}`,
//! `kiln_queue_oldest_wait_seconds`, `kiln_model_running`, `kiln_model_slots` and
//! `kiln_model_desired_slots` (names in `kiln_core::metrics`), from the same snapshot as
//! `kiln.api.queue` (`Resources::queue_snapshot`), refreshed every `autoscale.refresh_ms`.
//!
//! The figures are the cluster's, not the node's, so one node reads them: the live node whose
//! name sorts first ([`exports`]). Every node reading them would cost the server the same
//! requests once per node (a few per model per refresh) for the same numbers. When another node
//! takes over (a node with a smaller name joins) this one sets its gauges to 0, and when the
//! exporter dies the next one starts within a registry TTL; so a query takes `max by (model)`
//! over the nodes, and an autoscaler keeps at least one node (the exporter is a node). The
//! choice ignores `node.metrics_addr`: a first node that serves no `/metrics` exports into
//! nothing, so give every node of a cluster scraped for these one (the shipped files do).

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_core::config::AutoscaleConfig;
use kiln_core::metrics as m;
use kiln_core::nats::Lane;
use kiln_core::nats::{RegistryCache, Resources};
use kiln_core::protocol::{ModelDecl, ModelQueue, NodeEntry};
use kiln_core::task::{self, TaskGuard, TaskKind};

/// Whether `me` exports the gauges among the `live` nodes: the one whose name sorts first.
pub fn exports(me: &str, live: &[NodeEntry]) -> bool {
    live.iter().map(|n| n.node.as_str()).min() == Some(me)
}

/// Starts the refresh loop of node `me`; it stops when the guard drops.
pub fn spawn(resources: Resources, registry: RegistryCache, me: String, autoscale: AutoscaleConfig) -> TaskGuard<()> {
    task::spawn(TaskKind::Refresh, "queue gauges", async move {
        let mut tick = tokio::time::interval(Duration::from_millis(autoscale.refresh_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The models this node has set gauges for: zeroed when it stops exporting them.
        let mut exported: BTreeSet<String> = BTreeSet::new();
        loop {
            tick.tick().await;
            let live = registry.nodes();
            if !exports(&me, &live) {
                for model in std::mem::take(&mut exported) {
                    zero(&model);
                }
                continue;
            }
            let models: Vec<ModelDecl> = kiln_core::models::cluster_models(&live).into_values().map(|m| m.decl).collect();
            match resources.queue_snapshot(&models, autoscale.target_wait_s).await {
                Ok(snapshot) => {
                    let names: BTreeSet<String> = models.iter().map(|m| m.name.clone()).collect();
                    for gone in exported.difference(&names) {
                        zero(gone);
                    }
                    exported = names;
                    for queue in &snapshot.models {
                        set(queue);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the queue for its gauges; trying again at the next refresh"),
            }
        }
    })
}

fn set(q: &ModelQueue) {
    for lane in &q.lanes {
        metrics::gauge!(m::QUEUE_DEPTH, "model" => q.model.clone(), "lane" => lane.lane.clone()).set(lane.queued as f64);
    }
    metrics::gauge!(m::QUEUE_OLDEST_WAIT_SECONDS, "model" => q.model.clone()).set(q.oldest_wait_ms.unwrap_or(0) as f64 / 1000.0);
    metrics::gauge!(m::MODEL_RUNNING, "model" => q.model.clone()).set(q.running as f64);
    metrics::gauge!(m::MODEL_SLOTS, "model" => q.model.clone()).set(q.slots as f64);
    metrics::gauge!(m::MODEL_DESIRED_SLOTS, "model" => q.model.clone()).set(q.desired_slots as f64);
}

fn zero(model: &str) {
    for lane in Lane::ALL {
        metrics::gauge!(m::QUEUE_DEPTH, "model" => model.to_string(), "lane" => lane.as_str()).set(0.0);
    }
    for name in [m::QUEUE_OLDEST_WAIT_SECONDS, m::MODEL_RUNNING, m::MODEL_SLOTS, m::MODEL_DESIRED_SLOTS] {
        metrics::gauge!(name, "model" => model.to_string()).set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeEntry {
        NodeEntry {
            node: name.into(),
            version: "0".into(),
            slots: vec![],
            started_ms: 0,
            heartbeat_ms: 0,
            running_jobs: 0,
            peers: vec![],
            models: vec![],
        }
    }

    #[test]
    fn the_live_node_whose_name_sorts_first_exports() {
        let live = [node("n2"), node("n1"), node("n3")];
        assert!(exports("n1", &live));
        assert!(!exports("n2", &live));
        assert!(!exports("n0", &live), "not yet in the registry: not yet");
        assert!(!exports("n1", &[]));
    }
}
