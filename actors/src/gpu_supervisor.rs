//! GpuSupervisor: one per GPU slot; owns the slot's [`InferenceActor`](crate::inference) and
//! its restart policy.
//!
//! ```text
//! GpuSupervisor (slot cuda:0)
//! └── InferenceActor   restarted on failure with backoff, within a restart budget
//! ```
//!
//! When the inference actor fails (panic, worker process death, timeout) the supervisor marks
//! the slot `restarting` in the registry, tells the dispatcher the slot is down, and restarts it
//! after the backoff. Past the budget ([`RestartBudget`]: N restarts in a window) the slot is
//! quarantined: `dead` in the registry, no more jobs. The job that was running is retried by
//! its job actor, which got the failure through its reply port.

use std::time::Duration;

use kiln_core::metrics as m;
use kiln_core::policy::{RestartBudget, RestartDecision};
use kiln_core::protocol::GpuState;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::context::NodeContext;
use crate::dispatcher::DispatcherMsg;
use crate::inference::{InferenceActor, InferenceArgs, InferenceMsg};
use crate::registry_writer::{GpuUpdate, RegistryWriterMsg};
use crate::wire::{groups, GpuControlReply, GpuControlRequest};

pub struct GpuSupervisor;

pub struct GpuSupervisorArgs {
    pub ctx: NodeContext,
    pub slot: String,
    pub registry: ActorRef<RegistryWriterMsg>,
    pub dispatcher: ActorRef<DispatcherMsg>,
}

pub struct GpuSupervisorState {
    ctx: NodeContext,
    slot: String,
    registry: ActorRef<RegistryWriterMsg>,
    dispatcher: ActorRef<DispatcherMsg>,
    budget: RestartBudget,
    inference: Option<ActorRef<InferenceMsg>>,
    restarts: u32,
    /// An operator asked for a restart: the actor was killed, and its end says so.
    restart_requested: bool,
    quarantined: bool,
    /// Set while the node shuts down: a child that stops then is not restarted.
    stopping: bool,
}

pub enum GpuSupervisorMsg {
    /// Sent to itself after the backoff.
    Restart,
    /// The node is shutting down: stop restarting.
    Stopping,
    /// From any node of the cluster, through the process groups [`groups::GPUS`] and
    /// [`groups::gpu`]; the one variant that may cross nodes.
    Control(GpuControlRequest, ractor::RpcReplyPort<GpuControlReply>),
}

crate::remote_call_message!(GpuSupervisorMsg, Control, GpuControlRequest, GpuControlReply);

impl Actor for GpuSupervisor {
    type Msg = GpuSupervisorMsg;
    type State = GpuSupervisorState;
    type Arguments = GpuSupervisorArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        // Cluster-wide groups: every GPU, and this one by node and slot (ractor_cluster syncs
        // them to every peer; a member leaves its groups when it stops).
        ractor::pg::join(groups::GPUS.to_string(), vec![myself.get_cell()]);
        ractor::pg::join(groups::gpu(&args.ctx.node, &args.slot), vec![myself.get_cell()]);
        Ok(GpuSupervisorState {
            budget: RestartBudget::new(&args.ctx.config.restart),
            ctx: args.ctx,
            slot: args.slot,
            registry: args.registry,
            dispatcher: args.dispatcher,
            inference: None,
            restarts: 0,
            restart_requested: false,
            quarantined: false,
            stopping: false,
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        state.start_inference(&myself).await;
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            GpuSupervisorMsg::Restart if !state.stopping && !state.quarantined => {
                state.start_inference(&myself).await;
                state.report(GpuUpdate::state(GpuState::Idle));
            }
            GpuSupervisorMsg::Restart => {}
            GpuSupervisorMsg::Stopping => state.stopping = true,
            GpuSupervisorMsg::Control(GpuControlRequest::Restart, reply) => {
                let (node, slot) = (state.ctx.node.clone(), state.slot.clone());
                match &state.inference {
                    Some(inference) if !state.stopping => {
                        tracing::warn!(slot = %slot, "restart requested through the cluster");
                        // Handled like a failure: counted against the budget, the running job
                        // (if any) fails over to a retry, a fresh actor starts after the backoff.
                        // Killed, not stopped: a stop waits for the handler, which runs a
                        // process job to its end (issue 15: the job completed on attempt 1 and
                        // the slot restarted after it). Dropping its state kills the workers;
                        // the job actor's call fails and the job is retried.
                        state.restart_requested = true;
                        inference.kill();
                        let _ = reply.send(GpuControlReply::Restarting { node, slot });
                    }
                    _ => {
                        let _ = reply.send(GpuControlReply::NotRunning { node, slot });
                    }
                }
            }
        }
        Ok(())
    }

    /// Overrides ractor's default, which would stop this supervisor when its child exits.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, mut reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.unwrap_or_else(|| "stopped".into())),
            _ => return Ok(()),
        };
        let is_current = state.inference.as_ref().is_some_and(|a| a.get_id() == cell.get_id());
        if !is_current || state.stopping {
            return Ok(());
        }
        if std::mem::take(&mut state.restart_requested) {
            reason = "restart requested".into();
        }
        state.inference = None;
        let _ = state.dispatcher.cast(DispatcherMsg::SlotDown { slot: state.slot.clone(), dead: false });
        match state.budget.on_failure(kiln_core::now_ms()) {
            RestartDecision::Restart { after, restarts_in_window } => {
                state.restarts += 1;
                metrics::counter!(m::ACTOR_RESTARTS, "slot" => state.slot.clone()).increment(1);
                tracing::warn!(slot = %state.slot, reason = %reason, restarts_in_window, after_ms = after.as_millis() as u64, "inference actor failed; restarting");
                state.report(GpuUpdate {
                    state: Some(GpuState::Restarting),
                    restarts: Some(state.restarts),
                    current_job: Some(None),
                    last_error: Some(Some(reason)),
                    ..Default::default()
                });
                myself.send_after(after, || GpuSupervisorMsg::Restart);
            }
            RestartDecision::Quarantine { restarts_in_window } => {
                state.quarantined = true;
                metrics::counter!(m::GPU_QUARANTINED, "slot" => state.slot.clone()).increment(1);
                tracing::error!(slot = %state.slot, reason = %reason, restarts_in_window, "restart budget spent; quarantining the slot");
                state.report(GpuUpdate {
                    state: Some(GpuState::Dead),
                    current_job: Some(None),
                    last_error: Some(Some(format!("quarantined after {restarts_in_window} restarts; last: {reason}"))),
                    ..Default::default()
                });
                let _ = state.dispatcher.cast(DispatcherMsg::SlotDown { slot: state.slot.clone(), dead: true });
            }
        }
        Ok(())
    }
}

impl GpuSupervisorState {
    fn report(&self, update: GpuUpdate) {
        let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: self.slot.clone(), update });
    }

    async fn start_inference(&mut self, myself: &ActorRef<GpuSupervisorMsg>) {
        let args = InferenceArgs { ctx: self.ctx.clone(), slot: self.slot.clone(), registry: self.registry.clone() };
        match Actor::spawn_linked(None, InferenceActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.inference = Some(actor.clone());
                let _ = self.dispatcher.cast(DispatcherMsg::SlotUp { slot: self.slot.clone(), inference: actor });
            }
            Err(e) => {
                // Spawning only fails if the runtime is going away; try again shortly.
                tracing::error!(slot = %self.slot, error = %e, "cannot spawn inference actor");
                myself.send_after(Duration::from_secs(1), || GpuSupervisorMsg::Restart);
            }
        }
    }
}

/// Calls the supervisor of `slot` on `node`, wherever it runs. A session with `node` is opened
/// if none is up. `None` when none could be or it did not answer in `timeout`.
pub async fn call_gpu(node: &str, slot: &str, request: GpuControlRequest, timeout: Duration) -> Option<GpuControlReply> {
    let member = crate::cluster_mesh::reach(&groups::gpu(node, slot), node, timeout).await?;
    let actor: ActorRef<GpuSupervisorMsg> = member.into();
    match actor.call(|r| GpuSupervisorMsg::Control(request, r), Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(reply)) => Some(reply),
        _ => None,
    }
}
