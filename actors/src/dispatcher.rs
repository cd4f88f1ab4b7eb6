//! Dispatcher: hands each model's [`puller`](crate::puller) free slots, and spawns one
//! [`JobActor`](crate::job) per delivery it fetched.
//!
//! A busy cluster therefore leaves jobs in the durable queue, not in any node's memory: a node
//! holds at most one delivered job per slot, or up to `max_batch` jobs of one model on a slot
//! whose TorchScript model batches. A puller reserves free slots for its model (an RPC, parked
//! here in FIFO order until a slot frees up), fetches up to that many jobs, and hands each to
//! the dispatcher with the slot it goes to (`Dispatch`), giving back the places left over
//! (`Release`). An idle model holds no slot while it waits.
//!
//! Parked reservations are served oldest first whenever a slot frees up, so models that share
//! a slot take turns: a puller that just gave a slot back queues behind the others.
//!
//! Which slot takes how many jobs (warm slots first, then those where the model fits without
//! an eviction, one model per slot at a time, the batch
//! limit) is decided by [`SlotTable`], pure code in `kiln-core` with its invariants
//! property-tested; this actor keeps the table in step with the slots' inference actors and
//! the jobs it spawns, and talks to the registry and the pullers.
//!
//! A job's place on its slot is a [`SlotLease`], which comes back here by drop (through
//! [`LeaseReturn`], a message to this actor) as soon as the job's model is done. The
//! dispatcher supervises the job actors it spawns (overriding ractor's default, which
//! would stop the dispatcher when a child exits) and frees their slot when they stop, however
//! they stop. It also routes cancel notices to the job running locally: those the API sends on
//! core NATS to `<prefix>.node.<node>.cancel` (served here, so a cancel reaches a running job
//! within milliseconds whatever the actor cluster's state), and the control actor's.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use kiln_core::nats::names::JobSubject;
use kiln_core::placement::{Affinity, SlotTable};
use kiln_core::policy::Backoff;
use kiln_core::protocol::HeldJob;
use kiln_core::task::{self, TaskGuard, TaskKind};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio_util::sync::CancellationToken;

use crate::context::NodeContext;
use crate::inference::InferenceMsg;
use crate::job::{JobActor, JobArgs};
use crate::lease::{LeaseReturn, SlotLease};
use crate::puller::{pull_loop, Placer};
use crate::registry_writer::{GpuUpdate, RegistryWriterMsg};
use crate::stage_pool::StagePoolHandle;
use kiln_core::protocol::GpuState;

/// Longest wait for the dispatcher to say whether a cancelled job runs here.
const CANCEL_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves this node's cancel notices (`<prefix>.node.<node>.cancel`, body `{"job_id": ..}`):
/// cancels the job's token if it runs here and replies `{"node", "was_running"}`. The API
/// flags the record first, so a notice that is lost (or comes before the job's delivery) only
/// makes the cancel wait for the flag. Before this, the notice went only through the actor
/// cluster, and with no session to the owner (it had just restarted) the API waited 5 s for
/// one and then left the job to the flag, re-read every third of the ack wait: a 3 s job
/// completed instead of being cancelled (issue 23 item 9).
async fn serve_cancel_notices(ctx: NodeContext, mut notices: async_nats::Subscriber, dispatcher: ActorRef<DispatcherMsg>) {
    while let Some(notice) = notices.next().await {
        let job_id = match serde_json::from_slice::<kiln_core::protocol::JobRef>(&notice.payload) {
            Ok(r) if kiln_core::ids::is_valid_token(&r.job_id) => r.job_id,
            _ => {
                tracing::warn!(payload = ?String::from_utf8_lossy(&notice.payload), "undecodable cancel notice; ignored");
                continue;
            }
        };
        let was_running = matches!(
            dispatcher.call(|reply| DispatcherMsg::Cancel { job_id, reply }, Some(CANCEL_CALL_TIMEOUT)).await,
            Ok(ractor::rpc::CallResult::Success(true))
        );
        if let Some(reply) = notice.reply {
            let answer = kiln_core::protocol::CancelNoticeReply { node: ctx.node.clone(), was_running };
            let body = serde_json::to_string(&answer).expect("json");
            let _ = ctx.resources.client.publish(reply, body.into()).await;
        }
    }
}

pub struct Dispatcher;

pub struct DispatcherArgs {
    pub ctx: NodeContext,
    pub registry: ActorRef<RegistryWriterMsg>,
    pub stage_pool: StagePoolHandle,
}

struct Running {
    slot: String,
    /// Still holds its slot lease (its model is not done yet).
    leased: bool,
    cancel: CancellationToken,
    /// The delivery's JetStream ack subject, published in the node's registry entry so that
    /// a survivor can hand the job back at once if this node is lost.
    ack_subject: String,
}

pub struct DispatcherState {
    ctx: NodeContext,
    registry: ActorRef<RegistryWriterMsg>,
    /// Placement and accounting: which slots are up, what each holds (reserved or running).
    slots: SlotTable,
    /// Each up slot's inference actor, handed to the job actors it runs; in step with
    /// `slots`' up flags (set and cleared by `SlotUp` / `SlotDown` together).
    inference: HashMap<String, ActorRef<InferenceMsg>>,
    running: HashMap<String, Running>,
    job_of_actor: HashMap<ActorId, String>,
    /// Reservations waiting for a free slot, oldest first: (model, max, reply). At most one
    /// per model (each puller waits for its reply), so this is bounded by the model count.
    parked: VecDeque<(String, usize, RpcReplyPort<Vec<String>>)>,
    draining: bool,
    drain_waiters: Vec<RpcReplyPort<()>>,
    /// The pullers and the cancel-notice server: loops of this actor's, stopped with it.
    tasks: Vec<TaskGuard<()>>,
    retry_backoff: Backoff,
    stage_pool: StagePoolHandle,
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
    /// A job's [`SlotLease`] came back (its model is done, or it ended): the place is free.
    LeaseReturned {
        slot: String,
        job_id: String,
    },
    /// Stop pulling; reply once no job runs here.
    Drain(RpcReplyPort<()>),
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for DispatcherMsg {}

impl LeaseReturn for ActorRef<DispatcherMsg> {
    fn lease_returned(&self, slot: String, job_id: String) {
        let _ = self.cast(DispatcherMsg::LeaseReturned { slot, job_id });
    }
}

impl Placer for ActorRef<DispatcherMsg> {
    async fn reserve(&self, model: &str, max: usize) -> Option<Vec<String>> {
        match self.call(|reply| DispatcherMsg::Reserve { model: model.to_string(), max, reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(slots)) => Some(slots),
            _ => None,
        }
    }
    fn release(&self, slot: String) {
        self.cast(DispatcherMsg::Release { slot }).ok();
    }
    fn dispatch(&self, slot: String, message: jetstream::Message) -> bool {
        self.cast(DispatcherMsg::Dispatch { slot, delivery: Box::new(message) }).is_ok()
    }
}

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherState;
    type Arguments = DispatcherArgs;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let ctx = args.ctx;
        // Every slot starts down: it takes jobs once its GPU supervisor reports it up.
        let slots = SlotTable::new(ctx.config.node.slots.iter().map(|s| (s.clone(), ctx.config.models_for_slot(s))))
            .with_prefetch(ctx.config.node.slot_prefetch)
            .with_gpus(ctx.config.models.iter().map(|m| (m.name.clone(), m.gpus)));
        for m in ctx.config.models.iter().filter(|m| !ctx.config.fits_on_node(m)) {
            tracing::warn!(model = %m.name, gpus = m.gpus, "this node has too few slots serving the model for one job of it; it does not serve it");
        }
        Ok(DispatcherState {
            retry_backoff: Backoff::from(&ctx.config.retry),
            stage_pool: args.stage_pool,
            ctx,
            registry: args.registry,
            slots,
            inference: HashMap::new(),
            running: HashMap::new(),
            job_of_actor: HashMap::new(),
            parked: VecDeque::new(),
            draining: false,
            drain_waiters: vec![],
            tasks: vec![],
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        for model in state.slots.served_models() {
            state.tasks.push(task::spawn(TaskKind::OwnerLoop, "puller", pull_loop(state.ctx.clone(), model, myself.clone())));
        }
        let subject = state.ctx.resources.names.node_cancel(&state.ctx.node);
        match state.ctx.resources.client.subscribe(subject.clone()).await {
            Ok(notices) => state.tasks.push(task::spawn(
                TaskKind::OwnerLoop,
                "cancel notices",
                serve_cancel_notices(state.ctx.clone(), notices, myself.clone()),
            )),
            // The record's flag still stops the job, at the keep-alive's next read.
            Err(e) => tracing::warn!(subject = %subject, error = %e, "cannot take cancel notices; cancels wait for the record's flag"),
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Owner loops: dropping their guards stops them.
        state.tasks.clear();
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            DispatcherMsg::SlotUp { slot, inference } => state.on_slot_up(slot, inference),
            DispatcherMsg::SlotDown { slot, dead } => state.on_slot_down(&slot, dead),
            DispatcherMsg::Reserve { model, max, reply } => state.on_reserve(model, max, reply),
            DispatcherMsg::Release { slot } => state.release(&slot),
            DispatcherMsg::LeaseReturned { slot, job_id } => {
                if let Some(r) = state.running.get_mut(&job_id) {
                    r.leased = false;
                }
                state.free_slot(&slot);
                state.serve_parked();
            }
            DispatcherMsg::Dispatch { slot, delivery } => state.dispatch(&myself, slot, *delivery).await,
            DispatcherMsg::Cancel { job_id, reply } => {
                let running = state.running.get(&job_id);
                if let Some(r) = running {
                    tracing::info!(job_id = %job_id, slot = %r.slot, "cancelling running job");
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

    /// Job actors end here, however they end: their delivery is no longer held (their slot
    /// came back through their lease). Never stops the dispatcher.
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
        if self.slots.set_up(&slot, true) {
            self.inference.insert(slot, inference);
        }
        self.serve_parked();
    }

    fn on_slot_down(&mut self, slot: &str, dead: bool) {
        self.slots.set_up(slot, false);
        if dead {
            self.slots.mark_dead(slot);
        }
        self.inference.remove(slot);
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
                // The puller is gone: its places go back. Not through `release`, which would
                // re-enter this loop; the reservations still to serve here may take them.
                for slot in slots {
                    self.slots.release(&slot);
                }
            }
        }
        self.parked = still;
    }

    fn reserve(&mut self, model: &str, max: usize) -> Vec<String> {
        let limit = batch_limit(&self.ctx, model);
        self.slots.reserve(model, max, limit, affinity_on(&self.ctx, model))
    }

    fn release(&mut self, slot: &str) {
        self.slots.release(slot);
        self.serve_parked();
    }

    /// A puller reserves whichever slots are free; if the job's model is cold on the one it
    /// got but warm on another slot that has room now, run it there instead (no load, no
    /// eviction).
    fn better_slot(&mut self, slot: String, model: &str) -> String {
        let limit = batch_limit(&self.ctx, model);
        self.slots.better_slot(&slot, model, limit, affinity_on(&self.ctx, model))
    }

    async fn dispatch(&mut self, myself: &ActorRef<DispatcherMsg>, slot: String, delivery: jetstream::Message) {
        let job_id = serde_json::from_slice::<kiln_core::nats::jobs::QueueMessage>(&delivery.payload).map(|q| q.job_id).unwrap_or_default();
        let model = JobSubject::parse(&delivery.subject).map_or("", |s| s.model).to_string();
        let slot = self.better_slot(slot, &model);
        // A delivery fetched before the drain began and handed in after it: the node takes no
        // new job, so it goes straight back to the queue. Claimed here, it was abandoned when
        // the node exited and came back only after the ack wait, as attempt 2 (seen by
        // `draining_a_node_under_load_loses_and_duplicates_nothing` on a loaded machine).
        let inference = if self.draining { None } else { self.inference.get(&slot).cloned() };
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
        // The reservation becomes the job's lease (the puller reserved `slot`, or
        // `better_slot` moved its reservation there); the lease hands it back, once.
        // A multi-GPU model's group (primary first): its companions show busy with the job too.
        let group = self.slots.group(&slot);
        if self.slots.start(&slot) {
            let shown = if group.len() > 1 { group.clone() } else { vec![] };
            for s in &group {
                let update = GpuUpdate {
                    state: Some(GpuState::Busy),
                    current_job: Some(Some(job_id.clone())),
                    group: (!shown.is_empty()).then(|| shown.clone()),
                    ..Default::default()
                };
                let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: s.clone(), update });
            }
        }
        let args = JobArgs {
            ctx: self.ctx.clone(),
            delivery,
            lease: SlotLease::new(slot.clone(), job_id.clone(), myself.clone()).with_group(group),
            inference,
            cancel: cancel.clone(),
            retry_backoff: self.retry_backoff,
            stage_pool: self.stage_pool.clone(),
            listed: Some(listed),
        };
        match Actor::spawn_linked(None, JobActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.job_of_actor.insert(actor.get_id(), job_id.clone());
                self.running.insert(job_id, Running { slot, leased: true, cancel, ack_subject });
                let held = self.held();
                let _ = self.registry.cast(RegistryWriterMsg::RunningJobs { jobs: held, listed: Some(listed_tx) });
            }
            Err(e) => {
                // The message stays unacked and is redelivered after the ack wait; the lease,
                // dropped with the arguments, hands the place back.
                tracing::error!(job_id = %job_id, error = %e, "cannot spawn job actor");
            }
        }
    }

    fn free_slot(&mut self, slot: &str) {
        // The dispatcher, which sees every job of the slot, says what it does: idle when its
        // last job's lease came back (a job of a batch that ends first must not show it idle),
        // else busy with a job that still holds it (one claimed ahead takes over).
        let group = self.slots.group(slot);
        let update = if self.slots.finish(slot) {
            // A group is freed with its primary's last job: its companions show idle again.
            let clear = (group.len() > 1).then(Vec::new);
            for companion in group.iter().skip(1) {
                let update = GpuUpdate { state: Some(GpuState::Idle), current_job: Some(None), group: clear.clone(), ..Default::default() };
                let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: companion.clone(), update });
            }
            GpuUpdate { state: Some(GpuState::Idle), current_job: Some(None), group: clear, ..Default::default() }
        } else {
            let next = self.running.iter().find(|(_, r)| r.leased && r.slot == slot).map(|(id, _)| id.clone());
            GpuUpdate { state: Some(GpuState::Busy), current_job: Some(next), ..Default::default() }
        };
        let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: slot.to_string(), update });
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
        // Its slot came back through its lease; this is the delivery's end.
        self.running.remove(&job_id);
        self.publish_held();
        self.serve_parked();
        if self.running.is_empty() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

/// Most jobs of `model` one slot runs at once: its `max_batch` when it batches, else 1.
fn batch_limit(ctx: &NodeContext, model: &str) -> usize {
    ctx.config.model(model).map(|m| m.engine.max_batch()).unwrap_or(1)
}

/// How `model` stands on a slot: resident (loaded by an earlier job, not evicted since), or
/// fitting in the slot's free memory as its inference actor last reported it, or neither.
fn affinity_on<'a>(ctx: &'a NodeContext, model: &'a str) -> impl Fn(&str) -> Affinity + 'a {
    move |slot| {
        if ctx.warm.get(slot).is_some_and(|w| w.iter().any(|m| m == model)) {
            Affinity::Warm
        } else {
            ctx.room.get(slot).map_or(Affinity::Fits, |room| room.affinity(model))
        }
    }
}
