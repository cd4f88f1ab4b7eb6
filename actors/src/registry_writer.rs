//! RegistryWriter: owns this node's entries in the cluster registry (one per GPU slot, one for
//! the node, and the deliveries it holds in `kiln_held`) and keeps them fresh.
//!
//! The node entry, which every node watches, is written with each heartbeat and when the
//! node's sessions change, never per job: a write per job would reach every node of the
//! cluster. The held deliveries, which change with every job, go to their own bucket that
//! nobody watches.
//!
//! Other actors send partial updates ([`GpuUpdate`]); the writer merges them into the entry,
//! writes it right after the updates already in its mailbox (one put per changed slot, however
//! many changes a burst brought; a mere busy/idle flip within 100 ms, so back-to-back jobs cost
//! no put each), and rewrites every entry each heartbeat so the per-key TTL never lapses
//! while the node lives. A slot marked `dead` stays dead: a late `idle` from a job actor that
//! finished after the quarantine must not resurrect it. Likewise, once the node drains, its
//! slots stay `draining` until the entries are removed.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_core::metrics as m;
use kiln_core::protocol::{GpuEntry, GpuState, HeldJobs, NodeEntry};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::context::NodeContext;

pub struct RegistryWriter;

pub struct RegistryWriterState {
    ctx: NodeContext,
    gpus: BTreeMap<String, GpuEntry>,
    /// Per slot: the state without the loading overlay, and whether a model is loading.
    base: BTreeMap<String, (GpuState, bool)>,
    node: NodeEntry,
    /// The deliveries this node holds now, and whether that changed since the last write.
    held: Vec<kiln_core::protocol::HeldJob>,
    held_dirty: bool,
    /// A `FlushHeld` is queued to run at once (not after the coalescing delay).
    held_flush_queued: bool,
    /// Set when the node starts a graceful leave: slots show `draining` from then on.
    draining: bool,
    /// Set after a graceful leave: heartbeats stop so the entries stay gone.
    removed: bool,
    /// The node entry changed since it was last written.
    node_dirty: bool,
    /// Slots whose entry changed since the last `FlushGpus`, and whether one is queued at
    /// once or after [`BUSY_IDLE_COALESCE`].
    gpus_dirty: std::collections::BTreeSet<String>,
    gpu_flush_queued: bool,
    gpu_flush_delayed: bool,
    /// Job actors waiting for the held entry that lists their delivery to be stored.
    listing_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The stall generation and NATS connect count the last standing check was made at.
    standing_checked: (u64, u64),
}

/// A change to one slot's entry; `None` fields are left as they are.
#[derive(Debug, Default, Clone)]
pub struct GpuUpdate {
    /// Idle/busy (from the dispatcher), restarting/dead (from the supervisor).
    pub state: Option<GpuState>,
    /// Set while the inference actor loads a model: shown as `loading` over idle/busy.
    pub loading: Option<bool>,
    pub current_job: Option<Option<String>>,
    pub warm_models: Option<Vec<String>>,
    /// The resident models and their bytes (from the inference actor, with the warm list).
    pub resident: Option<Vec<kiln_core::protocol::ResidentModel>>,
    pub restarts: Option<u32>,
    pub last_error: Option<Option<String>>,
    /// The slots of the multi-GPU group holding this slot, primary first (empty: none); set
    /// by the dispatcher with the busy/idle flip of the group's job.
    pub group: Option<Vec<String>>,
}

impl GpuUpdate {
    pub fn state(state: GpuState) -> Self {
        GpuUpdate { state: Some(state), ..Default::default() }
    }

    /// Only the busy/idle flip of a job starting or ending (and its current job): written
    /// within [`BUSY_IDLE_COALESCE`], not at once.
    fn is_busy_or_idle_only(&self) -> bool {
        matches!(self.state, Some(GpuState::Busy | GpuState::Idle))
            && self.loading.is_none()
            && self.warm_models.is_none()
            && self.resident.is_none()
            && self.restarts.is_none()
            && self.last_error.is_none()
    }
}

/// How long a slot's busy/idle change may wait to be written. A slot running short jobs back
/// to back flips busy and idle twice per job: written at once, that was two registry puts per
/// job (the busiest writes a node made). The entry only informs people (`kiln cluster`, the
/// console); placement reads the node's own state, and a lost node is found by its TTL.
const BUSY_IDLE_COALESCE: Duration = Duration::from_millis(100);

pub enum RegistryWriterMsg {
    Gpu {
        slot: String,
        update: GpuUpdate,
    },
    /// The deliveries the node holds now. Written within 100 ms, coalesced; at once when
    /// `listed` waits for it (a new delivery, not claimed before it is listed).
    RunningJobs {
        jobs: Vec<kiln_core::protocol::HeldJob>,
        listed: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// The peers with an actor-cluster session now (written with the next coalesced write).
    Peers(Vec<String>),
    /// Writes the node entry if it changed since the last write.
    FlushNode,
    /// Writes the held deliveries if they changed since the last write.
    FlushHeld,
    /// Writes the slot entries changed since the last flush.
    FlushGpus,
    /// The node is leaving: every live slot shows `draining`.
    Draining,
    Heartbeat,
    /// Removes this node's entries (graceful leave) and replies when done.
    Remove(ractor::RpcReplyPort<()>),
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for RegistryWriterMsg {}

pub struct RegistryWriterArgs {
    pub ctx: NodeContext,
}

impl Actor for RegistryWriter {
    type Msg = RegistryWriterMsg;
    type State = RegistryWriterState;
    type Arguments = RegistryWriterArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let ctx = args.ctx;
        let now = kiln_core::now_ms();
        let gpus = ctx
            .config
            .node
            .slots
            .iter()
            .map(|slot| {
                let entry = GpuEntry {
                    node: ctx.node.clone(),
                    slot: slot.clone(),
                    state: GpuState::Idle,
                    models: ctx.config.models_for_slot(slot),
                    warm_models: vec![],
                    current_job: None,
                    restarts: 0,
                    last_error: None,
                    heartbeat_ms: now,
                    group: vec![],
                    memory_budget_bytes: ctx.config.node.slot_memory_bytes,
                    resident: vec![],
                };
                (slot.clone(), entry)
            })
            .collect();
        let node = NodeEntry {
            node: ctx.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            slots: ctx.config.node.slots.clone(),
            started_ms: now,
            heartbeat_ms: now,
            running_jobs: 0,
            peers: vec![],
            models: ctx.config.model_decls(),
        };
        myself.send_interval(Duration::from_millis(ctx.config.node.heartbeat_ms), || RegistryWriterMsg::Heartbeat);
        let base = ctx.config.node.slots.iter().map(|s| (s.clone(), (GpuState::Idle, false))).collect();
        let standing_checked = standing_epoch(&ctx);
        Ok(RegistryWriterState {
            ctx,
            gpus,
            base,
            node,
            held: vec![],
            held_dirty: false,
            held_flush_queued: false,
            draining: false,
            removed: false,
            node_dirty: false,
            gpus_dirty: Default::default(),
            gpu_flush_queued: false,
            gpu_flush_delayed: false,
            listing_waiters: vec![],
            standing_checked,
        })
    }

    async fn post_start(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        state.write_all().await;
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            RegistryWriterMsg::Gpu { slot, update } => {
                let busy_or_idle_only = update.is_busy_or_idle_only();
                state.on_gpu_update(&slot, update);
                if busy_or_idle_only {
                    if !state.gpu_flush_delayed && !state.gpu_flush_queued {
                        state.gpu_flush_delayed = true;
                        myself.send_after(BUSY_IDLE_COALESCE, || RegistryWriterMsg::FlushGpus);
                    }
                } else if !state.gpu_flush_queued {
                    state.gpu_flush_queued = true;
                    let _ = myself.cast(RegistryWriterMsg::FlushGpus);
                }
            }
            RegistryWriterMsg::FlushGpus => state.flush_gpus().await,
            RegistryWriterMsg::RunningJobs { jobs, listed } => {
                // Shown in the node entry from the next heartbeat on.
                state.node.running_jobs = jobs.len() as u32;
                state.held = jobs;
                match listed {
                    // A job waits to be listed before it claims: write at once. Every
                    // RunningJobs already in the mailbox is folded into that one write, so a
                    // burst of starts costs one put. (Coalescing alone left a job started in
                    // the last ~1 s before a SIGKILL unlisted: it waited out the ack wait.)
                    Some(waiter) => {
                        state.listing_waiters.push(waiter);
                        state.held_dirty = true;
                        if !state.held_flush_queued {
                            state.held_flush_queued = true;
                            let _ = myself.cast(RegistryWriterMsg::FlushHeld);
                        }
                    }
                    // Jobs that ended: at most one write per 100 ms however many end; a
                    // survivor may NAK a delivery already acked, which JetStream ignores.
                    None if !state.held_dirty => {
                        state.held_dirty = true;
                        myself.send_after(Duration::from_millis(100), || RegistryWriterMsg::FlushHeld);
                    }
                    None => {}
                }
            }
            RegistryWriterMsg::Peers(peers) => {
                state.node.peers = peers;
                if !state.node_dirty {
                    state.node_dirty = true;
                    myself.send_after(Duration::from_millis(100), || RegistryWriterMsg::FlushNode);
                }
            }
            RegistryWriterMsg::FlushNode => state.flush_node().await,
            RegistryWriterMsg::FlushHeld => state.flush_held().await,
            RegistryWriterMsg::Heartbeat => state.write_all().await,
            RegistryWriterMsg::Draining => {
                state.draining = true;
                for entry in state.gpus.values_mut() {
                    if entry.state != GpuState::Dead {
                        entry.state = GpuState::Draining;
                    }
                }
                state.write_all().await;
            }
            RegistryWriterMsg::Remove(reply) => {
                let slots: Vec<String> = state.gpus.keys().cloned().collect();
                if let Err(e) = state.ctx.resources.delete_node_entries(&state.ctx.node, &slots).await {
                    tracing::warn!(error = %e, "cannot remove registry entries");
                }
                state.gpus.clear();
                state.removed = true;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

impl RegistryWriterState {
    fn on_gpu_update(&mut self, slot: &str, update: GpuUpdate) {
        let Some(entry) = self.gpus.get_mut(slot) else { return };
        let base = self.base.entry(slot.to_string()).or_insert((GpuState::Idle, false));
        if let Some(state) = update.state {
            base.0 = state;
        }
        if let Some(loading) = update.loading {
            base.1 = loading;
        }
        // Dead is final; draining holds until the entries are removed; loading shows over
        // idle or busy while a model loads.
        if entry.state != GpuState::Dead {
            entry.state = match *base {
                (GpuState::Dead, _) => GpuState::Dead,
                _ if self.draining => GpuState::Draining,
                (GpuState::Idle | GpuState::Busy, true) => GpuState::Loading,
                (state, _) => state,
            };
        }
        if let Some(job) = update.current_job {
            entry.current_job = job;
        }
        if let Some(warm) = update.warm_models {
            entry.warm_models = warm;
        }
        if let Some(resident) = update.resident {
            entry.resident = resident;
        }
        if let Some(r) = update.restarts {
            entry.restarts = r;
        }
        if let Some(g) = update.group {
            entry.group = g;
        }
        if let Some(e) = update.last_error {
            // A worker's stderr can end up here: bounded like an event message.
            entry.last_error = e.map(|e| kiln_core::protocol::truncate_utf8(e, kiln_core::protocol::MAX_EVENT_MESSAGE_BYTES));
        }
        for s in [GpuState::Idle, GpuState::Loading, GpuState::Busy, GpuState::Restarting, GpuState::Draining, GpuState::Dead] {
            metrics::gauge!(m::GPU_STATE, "slot" => slot.to_string(), "state" => s.as_str()).set(if s == entry.state { 1.0 } else { 0.0 });
        }
        metrics::gauge!(m::GPU_MEMORY_BUDGET_BYTES, "slot" => slot.to_string()).set(entry.memory_budget_bytes as f64);
        let resident: u64 = entry.resident.iter().map(|r| r.bytes).sum();
        metrics::gauge!(m::GPU_MEMORY_RESIDENT_BYTES, "slot" => slot.to_string()).set(resident as f64);
        self.gpus_dirty.insert(slot.to_string());
    }

    /// Writes every slot entry changed since the last flush. Queued right behind the updates
    /// already in the mailbox, so a burst of busy/idle changes (a job start or end each) costs
    /// one put per slot, not one per change: with a job's claim waiting for the node entry
    /// that this actor also writes, a backlog of single puts slowed every claim.
    async fn flush_gpus(&mut self) {
        self.gpu_flush_queued = false;
        self.gpu_flush_delayed = false;
        for slot in std::mem::take(&mut self.gpus_dirty) {
            if let Some(entry) = self.gpus.get(&slot) {
                self.write_gpu(entry.clone()).await;
            }
        }
    }

    async fn write_gpu(&self, mut entry: GpuEntry) {
        entry.heartbeat_ms = kiln_core::now_ms();
        if let Err(e) = self.ctx.resources.put_gpu(&entry).await {
            tracing::warn!(slot = %entry.slot, error = %e, "registry write failed");
        }
    }

    async fn flush_node(&mut self) {
        if !self.node_dirty {
            return; // a heartbeat wrote the change already
        }
        self.node_dirty = false;
        if !self.removed {
            self.check_standing().await;
            self.node.heartbeat_ms = kiln_core::now_ms();
            if let Err(e) = self.ctx.resources.put_node(&self.node).await {
                tracing::warn!(error = %e, "node registry write failed");
            }
        }
    }

    async fn flush_held(&mut self) {
        self.held_flush_queued = false;
        if !self.held_dirty && self.listing_waiters.is_empty() {
            return; // a delayed flush whose change an immediate one wrote already
        }
        self.held_dirty = false;
        if !self.removed {
            self.check_standing().await;
            self.write_held().await;
        }
        // Released even when the write failed: NATS is unreachable, and the claim that
        // follows fails the same way (the delivery then comes back after the ack wait).
        for waiter in self.listing_waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    async fn write_held(&self) {
        let held = HeldJobs { node: self.node.node.clone(), started_ms: self.node.started_ms, jobs: self.held.clone() };
        if let Err(e) = self.ctx.resources.put_held(&held).await {
            tracing::warn!(error = %e, "held-jobs registry write failed");
        }
    }

    /// After this process stood still or its NATS connection was re-made (a cut link looks
    /// the same from outside), before anything is written: was this node declared lost
    /// meanwhile? Then a survivor has handed its jobs back (their attempts are fenced out
    /// by the records) and holds the claim on this life (`_lost.<node>.<started_ms>`), so that
    /// life can never be declared lost again: the node rejoins as a new life (a new
    /// `started_ms`), which a later loss can be declared for.
    async fn check_standing(&mut self) {
        let epoch = standing_epoch(&self.ctx);
        if epoch == self.standing_checked {
            return;
        }
        let claim = kiln_core::nats::lost_claim_key(&self.node.node, self.node.started_ms);
        match self.ctx.resources.claim_exists(&claim).await {
            Ok(true) => {
                let life = kiln_core::now_ms().max(self.node.started_ms + 1);
                tracing::warn!(
                    stalled_ms = self.ctx.stall.last_stall_ms(),
                    old_life = self.node.started_ms,
                    new_life = life,
                    "this node was declared lost while it stood still; its jobs were handed back; rejoining as a new life"
                );
                self.node.started_ms = life;
            }
            Ok(false) => {}
            Err(e) => {
                // Look again at the next write.
                tracing::warn!(error = %e, "cannot check whether this node was declared lost");
                return;
            }
        }
        self.standing_checked = epoch;
    }

    /// A heartbeat: every entry rewritten with the time. Each put is awaited for at most one
    /// heartbeat interval: a put the stream never acknowledges (sent while it had no leader)
    /// would otherwise hold this actor for the client's 5 s ack timeout, twice, and a live
    /// node would look silent to its peers for that long after the stream is back (issue 23,
    /// seen on three servers). A put given up on is still sent; the next heartbeat follows it.
    async fn write_all(&mut self) {
        if self.removed {
            return;
        }
        self.check_standing().await;
        let now = kiln_core::now_ms();
        for entry in self.gpus.values_mut() {
            entry.heartbeat_ms = now;
        }
        let patience = heartbeat_write_patience(self.ctx.config.node.heartbeat_ms);
        for entry in self.gpus.values() {
            if tokio::time::timeout(patience, self.write_gpu(entry.clone())).await.is_err() {
                tracing::warn!(slot = %entry.slot, waited_ms = patience.as_millis() as u64, "registry write not acknowledged in a heartbeat");
            }
        }
        self.node.heartbeat_ms = now;
        self.node_dirty = false;
        match tokio::time::timeout(patience, self.ctx.resources.put_node(&self.node)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "node registry write failed"),
            Err(_) => tracing::warn!(waited_ms = patience.as_millis() as u64, "node registry write not acknowledged in a heartbeat"),
        }
        // Refreshed while any are held, so they expire with the node entry, not before it.
        // (The write a claim waits for is `flush_held`'s, awaited in full.)
        if !self.held.is_empty() && tokio::time::timeout(patience, self.write_held()).await.is_err() {
            tracing::warn!(waited_ms = patience.as_millis() as u64, "held-jobs registry write not acknowledged in a heartbeat");
        }
    }
}

/// How long a heartbeat awaits each of its puts: one heartbeat interval (the next heartbeat
/// is due then anyway), never under 100 ms.
fn heartbeat_write_patience(heartbeat_ms: u64) -> Duration {
    Duration::from_millis(heartbeat_ms.max(100))
}

/// Changes when this process stood still or reconnected to NATS: then what the others think
/// of this node may have changed without it noticing.
fn standing_epoch(ctx: &NodeContext) -> (u64, u64) {
    (ctx.stall.generation(), ctx.resources.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed))
}
