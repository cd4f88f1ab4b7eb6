//! NodeSupervisor: the root of one node's actor tree.
//!
//! ```text
//! NodeSupervisor
//! ├── RegistryWriter            this node's registry entries, heartbeats
//! ├── Dispatcher                pulls jobs while slots are free
//! │   └── JobActor (per job)    claim, run, write outcome, ack
//! ├── LossDetector              declares silent nodes lost, hands their jobs back
//! ├── NodeControl               this node's door for the cluster: cancel, drain, ping
//! ├── ClusterMesh               actor-cluster sessions to the peers it talks to, through NATS tunnels
//! │   └── NodeServer            ractor_cluster (cookie, process groups)
//! ├── WebhookDelivery           job events into webhook messages, and their delivery
//! ├── StagePool                 pipelines' stage commands, at most max_workers at once
//! │   └── StageWorker           one command at a time, restarted when it dies
//! └── GpuSupervisor (per slot)  restart budget, backoff, quarantine
//!     └── InferenceActor        engines of the slot, one job at a time
//! ```
//!
//! The children here hold no job state of their own (the record in KV and the queue hold it),
//! so the policy for them is escalation: if one fails, which is a bug, the node supervisor
//! stops the node, the process exits non-zero, and every job it held is redelivered to the
//! other nodes (or to this one after its restart). Crashes of inference actors, the expected
//! failures, are handled one level down by the GPU supervisors and never reach here.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::cluster_mesh::{ClusterMesh, ClusterMeshArgs};
use crate::context::NodeContext;
use crate::dispatcher::{Dispatcher, DispatcherArgs, DispatcherMsg};
use crate::gpu_supervisor::{GpuSupervisor, GpuSupervisorArgs, GpuSupervisorMsg};
use crate::loss_detector::LossDetector;
use crate::node_control::{NodeControl, NodeControlArgs};
use crate::registry_writer::{RegistryWriter, RegistryWriterArgs, RegistryWriterMsg};
use crate::stage_pool::{StagePool, StagePoolHandle, StagePoolMsg};

pub struct NodeSupervisor;

pub struct NodeSupervisorState {
    pub registry: ActorRef<RegistryWriterMsg>,
    pub dispatcher: ActorRef<DispatcherMsg>,
    pub gpus: Vec<ActorRef<GpuSupervisorMsg>>,
    pool: ActorRef<StagePoolMsg>,
    shutting_down: bool,
}

/// The node supervisor's children, as handed to the node handle.
pub struct Children {
    pub registry: ActorRef<RegistryWriterMsg>,
    pub dispatcher: ActorRef<DispatcherMsg>,
    pub gpus: Vec<ActorRef<GpuSupervisorMsg>>,
}

pub enum NodeSupervisorMsg {
    /// Hands out the children's refs (for the node handle).
    Children(ractor::RpcReplyPort<Children>),
    /// Graceful stop: GPU supervisors stop restarting, then everything stops.
    Shutdown,
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for NodeSupervisorMsg {}

impl Actor for NodeSupervisor {
    type Msg = NodeSupervisorMsg;
    type State = NodeSupervisorState;
    type Arguments = NodeContext;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, ctx: NodeContext) -> Result<Self::State, ActorProcessingErr> {
        let (registry, _) = Actor::spawn_linked(None, RegistryWriter, RegistryWriterArgs { ctx: ctx.clone() }, myself.get_cell()).await?;
        let workers = ctx.config.compression.workers();
        let (pool, _) = Actor::spawn_linked(None, StagePool, workers, myself.get_cell()).await?;
        let stage_pool = StagePoolHandle::new(pool.clone(), workers, ctx.config.compression.queue_limit);
        let (dispatcher, _) = Actor::spawn_linked(
            None,
            Dispatcher,
            DispatcherArgs { ctx: ctx.clone(), registry: registry.clone(), stage_pool },
            myself.get_cell(),
        )
        .await?;
        Actor::spawn_linked(None, LossDetector, ctx.clone(), myself.get_cell()).await?;
        Actor::spawn_linked(None, crate::webhook::WebhookDelivery, ctx.clone(), myself.get_cell()).await?;
        let control = NodeControlArgs { ctx: ctx.clone(), dispatcher: dispatcher.clone(), drain_requested: ctx.drain_requested.clone() };
        Actor::spawn_linked(None, NodeControl, control, myself.get_cell()).await?;
        Actor::spawn_linked(
            Some(crate::cluster_mesh::MESH_NAME.into()),
            ClusterMesh,
            ClusterMeshArgs { ctx: ctx.clone(), registry: registry.clone() },
            myself.get_cell(),
        )
        .await?;
        let mut gpus = vec![];
        for slot in &ctx.config.node.slots {
            let args =
                GpuSupervisorArgs { ctx: ctx.clone(), slot: slot.clone(), registry: registry.clone(), dispatcher: dispatcher.clone() };
            let (gpu, _) = Actor::spawn_linked(None, GpuSupervisor, args, myself.get_cell()).await?;
            gpus.push(gpu);
        }
        Ok(NodeSupervisorState { registry, dispatcher, gpus, pool, shutting_down: false })
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            NodeSupervisorMsg::Children(reply) => {
                let _ = reply.send(Children {
                    registry: state.registry.clone(),
                    dispatcher: state.dispatcher.clone(),
                    gpus: state.gpus.clone(),
                });
            }
            NodeSupervisorMsg::Shutdown => {
                state.shutting_down = true;
                for g in &state.gpus {
                    let _ = g.cast(GpuSupervisorMsg::Stopping);
                }
                let _ = state.pool.cast(StagePoolMsg::Stopping);
                myself.stop_children_and_wait(None, None).await;
                myself.stop(None);
            }
        }
        Ok(())
    }

    /// Overrides ractor's default (stop on any child exit) with explicit escalation.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) if !state.shutting_down => {
                tracing::error!(actor = ?cell.get_id(), error = %err, "node actor failed; stopping the node so its jobs are redelivered");
                myself.stop(Some(format!("child failed: {err}")));
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) if !state.shutting_down => {
                tracing::error!(actor = ?cell.get_id(), reason = ?reason, "node actor stopped unexpectedly; stopping the node");
                myself.stop(Some("child stopped".into()));
            }
            _ => {}
        }
        Ok(())
    }
}
