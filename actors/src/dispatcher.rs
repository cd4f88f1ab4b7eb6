//! Dispatcher: pulls jobs from JetStream only while a slot that serves the job's model is free,
//! and spawns one [`JobActor`](crate::job) per delivery.
//!
//! A busy cluster therefore leaves jobs in the durable queue, not in any node's memory: a node
//! holds at most one delivered job per slot, or up to `max_batch` jobs of one model on a slot
//! whose TorchScript model batches. For each model a puller task loops:
//!
//! ```text
//! Reserve free slots for the model (RPC; parked in FIFO order until a slot frees up)
//!      ▼
//! fetch (no wait) from the `high` lane, then the `normal` lane, up to the reserved count
//!      ▼ nothing there: release every reservation, sleep until a job is published for the
//!      ▼ model (a core-NATS subscription on its lanes) or 250 ms pass, and start again
//! Dispatch(slot, message) for each message; Release the reservations left over
//! ```
//!
//! An idle model holds no slot while it waits. (It used to keep one and long-poll: on a node
//! whose slots serve several models, the idle models' pollers then held the slots the busy
//! model needed, and a 500-job batch of one model ran at 4 jobs/s.) The 250 ms re-check
//! catches what publishes nothing: a redelivery after the ack wait, or a retry's delayed NAK.
//!
//! Parked reservations are served oldest first whenever a slot frees up, so models that share
//! a slot take turns: a puller that just gave a slot back queues behind the others.
//!
//! The dispatcher supervises the job actors it spawns (overriding ractor's default, which
//! would stop the dispatcher when a child exits) and frees their slot when they stop, however
//! they stop. It also routes cancel notices to the job running locally.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream;
use futures::{FutureExt, StreamExt};
use kiln_core::nats::Lane;
use kiln_core::policy::Backoff;
use kiln_core::protocol::HeldJob;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio_util::sync::CancellationToken;

use crate::compression_pool::CompressionHandle;
use crate::context::NodeContext;
use crate::inference::InferenceMsg;
use crate::job::{JobActor, JobArgs};
use crate::registry_writer::{GpuUpdate, RegistryWriterMsg};
use kiln_core::protocol::GpuState;

/// How often an idle puller looks again without being woken (redeliveries publish nothing).
const IDLE_RECHECK: Duration = Duration::from_millis(250);
/// Most messages one pull asks for (bounded by the free slots anyway).
const MAX_PULL: usize = 256;

pub struct Dispatcher;

pub struct DispatcherArgs {
    pub ctx: NodeContext,
    pub registry: ActorRef<RegistryWriterMsg>,
    pub compression: CompressionHandle,
}

struct Slot {
    models: Vec<String>,
    inference: Option<ActorRef<InferenceMsg>>,
    /// The model whose jobs hold the slot now (reserved or running); `None` when free. Only
    /// one model at a time: a batch is of one model.
    model: Option<String>,
    /// Places held by pullers while they fetch.
    reserved: usize,
    /// Jobs running on the slot: 1 at most, or up to the model's `max_batch` when it batches.
    running: usize,
    dead: bool,
}

impl Slot {
    fn held(&self) -> usize {
        self.reserved + self.running
    }
    /// How many more jobs of `model` the slot can take now.
    fn room_for(&self, model: &str, batch_limit: usize) -> usize {
        if self.inference.is_none() || self.dead || !self.models.iter().any(|m| m == model) {
            return 0;
        }
        match &self.model {
            None => batch_limit,
            Some(m) if m == model => batch_limit.saturating_sub(self.held()),
            Some(_) => 0,
        }
    }
}

struct Running {
    /// `None` once the model is done and only post-processing stages remain (the slot is free).
    slot: Option<String>,
    cancel: CancellationToken,
    /// The delivery's JetStream ack subject, published in the node's registry entry so that
    /// a survivor can hand the job back at once if this node is lost.
    ack_subject: String,
}

pub struct DispatcherState {
    ctx: NodeContext,
    registry: ActorRef<RegistryWriterMsg>,
    slots: BTreeMap<String, Slot>,
    running: HashMap<String, Running>,
    job_of_actor: HashMap<ActorId, String>,
    /// Reservations waiting for a free slot, oldest first: (model, max, reply). At most one
    /// per model (each puller waits for its reply), so this is bounded by the model count.
    parked: VecDeque<(String, usize, RpcReplyPort<Vec<String>>)>,
    draining: bool,
    drain_waiters: Vec<RpcReplyPort<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    retry_backoff: Backoff,
    compression: CompressionHandle,
}

pub enum DispatcherMsg {
    /// A slot's inference actor is (again) ready.
    SlotUp {
        slot: String,
        inference: ActorRef<InferenceMsg>,
    },
    /// A slot's inference actor is gone; `dead` when quarantined for good.
    SlotDown {
        slot: String,
        dead: bool,
    },
    Reserve {
        model: String,
        max: usize,
        reply: RpcReplyPort<Vec<String>>,
    },
    Release {
        slot: String,
    },
    Dispatch {
        slot: String,
        delivery: Box<jetstream::Message>,
    },
    /// Stops the job if it runs here; replies whether it did.
    Cancel {
        job_id: String,
        reply: RpcReplyPort<bool>,
    },
    /// The job's model is done and its post-processing stages run off the slot: free it.
    ModelDone {
        job_id: String,
    },
    /// Stop pulling; reply once no job runs here.
    Drain(RpcReplyPort<()>),
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for DispatcherMsg {}

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherState;
    type Arguments = DispatcherArgs;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let ctx = args.ctx;
        let slots = ctx
            .config
            .node
            .slots
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    Slot { models: ctx.config.models_for_slot(s), inference: None, model: None, reserved: 0, running: 0, dead: false },
                )
            })
            .collect();
        Ok(DispatcherState {
            retry_backoff: Backoff::from(&ctx.config.retry),
            compression: args.compression,
            ctx,
            registry: args.registry,
            slots,
            running: HashMap::new(),
            job_of_actor: HashMap::new(),
            parked: VecDeque::new(),
            draining: false,
            drain_waiters: vec![],
            tasks: vec![],
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let served: std::collections::BTreeSet<String> = state.slots.values().flat_map(|s| s.models.clone()).collect();
        for model in served {
            state.tasks.push(tokio::spawn(pull_loop(state.ctx.clone(), model, myself.clone())));
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        for t in &state.tasks {
            t.abort();
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            DispatcherMsg::SlotUp { slot, inference } => state.on_slot_up(slot, inference),
            DispatcherMsg::SlotDown { slot, dead } => state.on_slot_down(&slot, dead),
            DispatcherMsg::Reserve { model, max, reply } => state.on_reserve(model, max, reply),
            DispatcherMsg::Release { slot } => state.release(&slot),
            DispatcherMsg::ModelDone { job_id } => {
                if let Some(slot) = state.running.get_mut(&job_id).and_then(|r| r.slot.take()) {
                    state.free_slot(&slot);
                    state.serve_parked();
                }
            }
            DispatcherMsg::Dispatch { slot, delivery } => state.dispatch(&myself, slot, *delivery).await,
            DispatcherMsg::Cancel { job_id, reply } => {
                let running = state.running.get(&job_id);
                if let Some(r) = running {
                    tracing::info!(job_id = %job_id, slot = ?r.slot, "cancelling running job");
                    r.cancel.cancel();
                }
                let _ = reply.send(running.is_some());
            }
            DispatcherMsg::Drain(reply) => {
                state.draining = true;
                for (_, _, reply) in state.parked.drain(..) {
                    let _ = reply.send(vec![]);
                }
                if state.running.is_empty() {
                    let _ = reply.send(());
                } else {
                    state.drain_waiters.push(reply);
                }
            }
        }
        Ok(())
    }

    /// Job actors end here, however they end: free their slot. Never stops the dispatcher.
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => state.on_job_actor_end(cell.get_id(), None),
            SupervisionEvent::ActorFailed(cell, err) => state.on_job_actor_end(cell.get_id(), Some(err.to_string())),
            _ => {}
        }
        Ok(())
    }
}

impl DispatcherState {
    fn on_slot_up(&mut self, slot: String, inference: ActorRef<InferenceMsg>) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.inference = Some(inference);
            s.dead = false;
        }
        self.serve_parked();
    }

    fn on_slot_down(&mut self, slot: &str, dead: bool) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.inference = None;
            s.dead |= dead;
        }
    }

    fn on_reserve(&mut self, model: String, max: usize, reply: RpcReplyPort<Vec<String>>) {
        if self.draining {
            let _ = reply.send(vec![]);
            return;
        }
        // Earlier waiters first: a new request may not overtake a parked one.
        self.parked.push_back((model, max, reply));
        self.serve_parked();
    }

    /// Hands free slots to parked reservations, oldest first.
    fn serve_parked(&mut self) {
        let mut still = VecDeque::with_capacity(self.parked.len());
        while let Some((model, max, reply)) = self.parked.pop_front() {
            if reply.is_closed() {
                continue;
            }
            let got = self.reserve(&model, max);
            if got.is_empty() {
                still.push_back((model, max, reply));
            } else if let Err(ractor::MessagingErr::SendErr(slots)) = reply.send(got) {
                for slot in slots {
                    self.release_quietly(&slot);
                }
            }
        }
        self.parked = still;
    }

    fn reserve(&mut self, model: &str, max: usize) -> Vec<String> {
        let limit = self.ctx.config.model(model).map(|m| m.engine.max_batch()).unwrap_or(1);
        // Slots where the model is already resident first (no load, no eviction), and among
        // them those already running it (a batch forming).
        let warm = |slot: &String| self.ctx.warm.get(slot).is_some_and(|w| w.iter().any(|m| m == model));
        let mut candidates: Vec<(&String, usize, bool, bool)> = self
            .slots
            .iter()
            .map(|(name, s)| (name, s.room_for(model, limit), warm(name), s.held() > 0))
            .filter(|(_, room, _, _)| *room > 0)
            .collect();
        candidates.sort_by_key(|(_, _, warm, busy)| (!*warm, !*busy));
        let mut got = vec![];
        for (name, room, _, _) in candidates {
            for _ in 0..room.min(max - got.len()) {
                got.push(name.clone());
            }
            if got.len() >= max {
                break;
            }
        }
        for name in &got {
            if let Some(s) = self.slots.get_mut(name) {
                s.reserved += 1;
                s.model = Some(model.to_string());
            }
        }
        got
    }

    fn release_quietly(&mut self, slot: &str) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.reserved = s.reserved.saturating_sub(1);
            if s.held() == 0 {
                s.model = None;
            }
        }
    }

    fn release(&mut self, slot: &str) {
        self.release_quietly(slot);
        self.serve_parked();
    }

    /// A puller reserves whichever slots are free; if the job's model is cold on the one it
    /// got but warm on another slot that has room now, run it there instead (no load, no
    /// eviction).
    fn better_slot(&mut self, slot: String, model: &str) -> String {
        let is_warm = |s: &str| self.ctx.warm.get(s).is_some_and(|w| w.iter().any(|m| m == model));
        if is_warm(&slot) {
            return slot;
        }
        let limit = self.ctx.config.model(model).map(|m| m.engine.max_batch()).unwrap_or(1);
        let better = self
            .slots
            .iter()
            .find(|(name, s)| **name != slot && is_warm(name) && s.room_for(model, limit) > 0)
            .map(|(name, _)| name.clone());
        match better {
            Some(better) => {
                self.release_quietly(&slot);
                if let Some(s) = self.slots.get_mut(&better) {
                    s.reserved += 1;
                    s.model = Some(model.to_string());
                }
                better
            }
            None => slot,
        }
    }

    async fn dispatch(&mut self, myself: &ActorRef<DispatcherMsg>, slot: String, delivery: jetstream::Message) {
        let job_id = serde_json::from_slice::<kiln_core::nats::jobs::QueueMessage>(&delivery.payload).map(|q| q.job_id).unwrap_or_default();
        // The subject names the model: `<prefix>.jobs.<model>.<lane>`.
        let model = delivery.subject.split('.').rev().nth(1).unwrap_or_default().to_string();
        let slot = self.better_slot(slot, &model);
        // A delivery fetched before the drain began and handed in after it: the node takes no
        // new job, so it goes straight back to the queue. Claimed here, it was abandoned when
        // the node exited and came back only after the ack wait, as attempt 2 (seen by
        // `draining_a_node_under_load_loses_and_duplicates_nothing` on a loaded machine).
        let inference = if self.draining { None } else { self.slots.get(&slot).and_then(|s| s.inference.clone()) };
        let Some(inference) = inference else {
            // The slot went down (or the node began draining) between the reservation and the
            // delivery: hand the job straight back to the queue instead of waiting out the ack
            // wait.
            let _ = delivery.ack_with(jetstream::AckKind::Nak(None)).await;
            self.release(&slot);
            return;
        };
        let cancel = CancellationToken::new();
        let ack_subject = delivery.reply.as_ref().map(|r| r.to_string()).unwrap_or_default();
        let (listed_tx, listed) = tokio::sync::oneshot::channel();
        let args = JobArgs {
            ctx: self.ctx.clone(),
            delivery,
            slot: slot.clone(),
            inference,
            cancel: cancel.clone(),
            retry_backoff: self.retry_backoff,
            dispatcher: myself.clone(),
            compression: self.compression.clone(),
            listed: Some(listed),
        };
        match Actor::spawn_linked(None, JobActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                if let Some(s) = self.slots.get_mut(&slot) {
                    s.reserved = s.reserved.saturating_sub(1);
                    s.running += 1;
                    if s.running == 1 {
                        let update =
                            GpuUpdate { state: Some(GpuState::Busy), current_job: Some(Some(job_id.clone())), ..Default::default() };
                        let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: slot.clone(), update });
                    }
                }
                self.job_of_actor.insert(actor.get_id(), job_id.clone());
                self.running.insert(job_id, Running { slot: Some(slot), cancel, ack_subject });
                let held = self.held();
                let _ = self.registry.cast(RegistryWriterMsg::RunningJobs { jobs: held, listed: Some(listed_tx) });
            }
            Err(e) => {
                // The message stays unacked and is redelivered after the ack wait.
                tracing::error!(job_id = %job_id, error = %e, "cannot spawn job actor");
                self.release(&slot);
            }
        }
    }

    fn free_slot(&mut self, slot: &str) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.running = s.running.saturating_sub(1);
            if s.held() == 0 {
                s.model = None;
            }
            if s.running == 0 {
                // The dispatcher, which sees every job of the slot, says when it is idle: a
                // job of a batch that ends first must not show the slot idle.
                let update = GpuUpdate { state: Some(GpuState::Idle), current_job: Some(None), ..Default::default() };
                let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: slot.to_string(), update });
            }
        }
    }

    fn held(&self) -> Vec<HeldJob> {
        self.running.iter().map(|(id, r)| HeldJob { job_id: id.clone(), ack_subject: r.ack_subject.clone() }).collect()
    }

    fn publish_held(&self) {
        let _ = self.registry.cast(RegistryWriterMsg::RunningJobs { jobs: self.held(), listed: None });
    }

    fn on_job_actor_end(&mut self, actor: ActorId, failure: Option<String>) {
        let Some(job_id) = self.job_of_actor.remove(&actor) else { return };
        if let Some(reason) = failure {
            tracing::error!(job_id = %job_id, reason = %reason, "job actor failed; the job will be redelivered");
        }
        if let Some(slot) = self.running.remove(&job_id).and_then(|r| r.slot) {
            self.free_slot(&slot);
        }
        self.publish_held();
        self.serve_parked();
        if self.running.is_empty() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

/// One model's puller: reserve free slots, fetch that many jobs, hand them to the dispatcher.
async fn pull_loop(ctx: NodeContext, model: String, dispatcher: ActorRef<DispatcherMsg>) {
    let mut consumers = None;
    // Every enqueue is also a core-NATS message on the lane's subject: it wakes an idle puller.
    let mut wake: Option<async_nats::Subscriber> = None;
    loop {
        if consumers.is_none() {
            match (ctx.resources.consumer(&model, Lane::High).await, ctx.resources.consumer(&model, Lane::Normal).await) {
                (Ok(h), Ok(n)) => consumers = Some((h, n)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(model = %model, error = %e, "cannot open consumers; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if wake.is_none() {
            match ctx.resources.client.subscribe(ctx.resources.names.jobs_subject_model(&model)).await {
                Ok(sub) => wake = Some(sub),
                Err(e) => tracing::warn!(model = %model, error = %e, "cannot subscribe to the model's lanes; polling"),
            }
        }
        let (high, normal) = consumers.as_ref().expect("opened above");
        // Waits (parked in the dispatcher) until at least one slot is free for this model.
        let slots = match dispatcher.call(|reply| DispatcherMsg::Reserve { model: model.clone(), max: MAX_PULL, reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(s)) => s,
            _ => return, // the dispatcher is gone
        };
        if slots.is_empty() {
            // Draining: the node takes no more jobs.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Wake-ups from before this fetch are answered by it; only later ones must wake us.
        if let Some(sub) = wake.as_mut() {
            while let Some(Some(_)) = sub.next().now_or_never() {}
        }
        let mut slots = slots.into_iter();
        let want = slots.len();
        let mut messages = fetch_now(high, want).await;
        if messages.len() < want {
            messages.extend(fetch_now(normal, want - messages.len()).await);
        }
        if messages.is_empty() {
            // Nothing waiting: hold no slot while idle (other models may need it).
            for slot in slots {
                dispatcher.cast(DispatcherMsg::Release { slot }).ok();
            }
            match wake.as_mut() {
                Some(sub) => {
                    let _ = tokio::time::timeout(IDLE_RECHECK, sub.next()).await;
                }
                None => tokio::time::sleep(IDLE_RECHECK).await,
            }
            continue;
        }
        for message in messages {
            let slot = slots.next().expect("never more messages than slots");
            if dispatcher.cast(DispatcherMsg::Dispatch { slot, delivery: Box::new(message) }).is_err() {
                return;
            }
        }
        for slot in slots {
            dispatcher.cast(DispatcherMsg::Release { slot }).ok();
        }
    }
}

async fn fetch_now(consumer: &jetstream::consumer::PullConsumer, max: usize) -> Vec<jetstream::Message> {
    let mut out = vec![];
    match consumer.fetch().max_messages(max).messages().await {
        Ok(mut stream) => {
            while let Some(m) = stream.next().await {
                match m {
                    Ok(m) => out.push(m),
                    Err(e) => {
                        tracing::debug!(error = %e, "fetch error");
                        break;
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "fetch failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    out
}
