//! LossDetector: notices when another node goes silent and hands its jobs back at once.
//!
//! Every tick it reads the registry (the local, watch-fed cache), remembering the last entry of
//! each other node. A node whose heartbeat is older than `node.loss_after_ms` is lost (SIGKILL,
//! a cut link, a dead machine). The survivors race to create a claim key for that node's life
//! (`_lost.<node>.<started_ms>`); the one that wins:
//! - NAKs every delivery the lost node held (from the `jobs` of its last entry), so JetStream
//!   redelivers them now instead of after the ack wait; the next attempt's compare-and-set on
//!   the job record fences out anything the lost node still writes;
//! - marks the lost node's GPUs `dead` in the registry (they expire with their TTL) and
//!   removes its node entry.
//!
//! Without it, a lost node's jobs still come back, after `nats.ack_wait_ms`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kiln_core::protocol::{GpuState, NodeEntry};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::context::NodeContext;

/// How often the registry is checked: a fraction of the loss threshold.
const TICK: Duration = Duration::from_millis(250);

pub struct LossDetector;

pub struct LossDetectorState {
    ctx: NodeContext,
    /// The last entry seen of each other node (kept after the server expires it).
    last_seen: HashMap<String, NodeEntry>,
    /// Lives already declared lost: (node, started_ms).
    declared: HashSet<(String, u64)>,
    /// Since when this node's own NATS connection is up. Others' heartbeats look stale to a
    /// node that was cut off itself (or while the server restarted); it judges nobody until
    /// it has been connected for a whole loss threshold.
    connected_since: Option<u64>,
}

pub enum LossDetectorMsg {
    Tick,
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for LossDetectorMsg {}

impl Actor for LossDetector {
    type Msg = LossDetectorMsg;
    type State = LossDetectorState;
    type Arguments = NodeContext;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, ctx: NodeContext) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(TICK, || LossDetectorMsg::Tick);
        Ok(LossDetectorState { ctx, last_seen: HashMap::new(), declared: HashSet::new(), connected_since: None })
    }

    async fn handle(&self, _myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            LossDetectorMsg::Tick => state.on_tick().await,
        }
        Ok(())
    }
}

impl LossDetectorState {
    async fn on_tick(&mut self) {
        let now = kiln_core::now_ms();
        let loss_after = self.ctx.config.node.loss_after_ms;
        if self.ctx.resources.client.connection_state() != async_nats::connection::State::Connected {
            self.connected_since = None;
            return;
        }
        let since = *self.connected_since.get_or_insert(now);
        if now.saturating_sub(since) < loss_after {
            return;
        }
        let present: HashSet<String> = self.ctx.registry.nodes_including_stale().into_iter().map(|e| e.node).collect();
        // Gone from the registry while its heartbeat was still fresh: it left cleanly (drain,
        // SIGTERM) and removed its own entries. Forget it rather than declare it lost later.
        self.last_seen.retain(|node, e| present.contains(node) || now.saturating_sub(e.heartbeat_ms) > loss_after);
        for entry in self.ctx.registry.nodes_including_stale() {
            if entry.node == self.ctx.node {
                continue;
            }
            let newer = self
                .last_seen
                .get(&entry.node)
                .is_none_or(|seen| (entry.started_ms, entry.heartbeat_ms) >= (seen.started_ms, seen.heartbeat_ms));
            if newer {
                self.last_seen.insert(entry.node.clone(), entry);
            }
        }
        let lost: Vec<NodeEntry> = self
            .last_seen
            .values()
            .filter(|e| now.saturating_sub(e.heartbeat_ms) > loss_after && !self.declared.contains(&(e.node.clone(), e.started_ms)))
            .cloned()
            .collect();
        for entry in lost {
            self.declared.insert((entry.node.clone(), entry.started_ms));
            self.on_lost(entry, now).await;
        }
        // Forget lost nodes once handled and gone from the registry.
        self.last_seen.retain(|node, e| present.contains(node) || !self.declared.contains(&(node.clone(), e.started_ms)));
    }

    async fn on_lost(&mut self, entry: NodeEntry, now: u64) {
        let silent_ms = now.saturating_sub(entry.heartbeat_ms);
        let claim = format!("_lost.{}.{}", entry.node, entry.started_ms);
        match self.ctx.resources.claim_once(&claim).await {
            Ok(true) => {}
            Ok(false) => return, // another survivor handles it
            Err(e) => {
                tracing::warn!(node = %entry.node, error = %e, "cannot claim the hand-back of a lost node");
                return;
            }
        }
        tracing::warn!(node = %entry.node, silent_ms, jobs = entry.jobs.len(), "node lost; handing its jobs back");
        metrics::counter!(kiln_core::metrics::NODES_LOST).increment(1);
        let client = &self.ctx.resources.client;
        for job in &entry.jobs {
            if job.ack_subject.is_empty() {
                continue;
            }
            // "-NAK" on the delivery's ack subject: JetStream redelivers the message now.
            if let Err(e) = client.publish(job.ack_subject.clone(), "-NAK".into()).await {
                tracing::warn!(job_id = %job.job_id, error = %e, "cannot hand back a lost node's job; it returns after the ack wait");
            } else {
                tracing::info!(job_id = %job.job_id, node = %entry.node, "handed back");
            }
        }
        let _ = client.flush().await;
        for mut gpu in self.ctx.registry.gpus_of(&entry.node) {
            gpu.state = GpuState::Dead;
            gpu.current_job = None;
            gpu.last_error = Some(format!("node lost: no heartbeat for {silent_ms} ms"));
            gpu.heartbeat_ms = kiln_core::now_ms();
            if let Err(e) = self.ctx.resources.put_gpu(&gpu).await {
                tracing::warn!(error = %e, "cannot mark a lost node's GPU dead");
            }
        }
        if let Err(e) = self.ctx.resources.delete_node_entry(&entry.node).await {
            tracing::warn!(error = %e, "cannot remove a lost node's entry");
        }
    }
}
