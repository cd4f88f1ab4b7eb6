//! NodeControl: this node's door for the rest of the cluster.
//!
//! It is a member of the process groups [`groups::NODES`] and [`groups::node`]`(<name>)`, which
//! ractor_cluster keeps in sync on every node, so any node (the one that happened to receive
//! an operator's or a client's request from NATS) reaches it with an actor call through the
//! tunnel: cancel a job running here, drain this node, or just ping it. The one message type
//! is [`NodeControlMsg::Call`], encoded by [`crate::wire`].

use std::sync::Arc;
use std::time::Duration;

use kiln_core::task::{self, TaskKind};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::context::NodeContext;
use crate::dispatcher::DispatcherMsg;
use crate::wire::{groups, NodeControlReply, NodeControlRequest};

pub struct NodeControl;

pub struct NodeControlArgs {
    pub ctx: NodeContext,
    pub dispatcher: ActorRef<DispatcherMsg>,
    /// Fired on `Drain`: the binary then runs the same graceful leave as on SIGTERM.
    pub drain_requested: Arc<tokio::sync::Notify>,
}

pub struct NodeControlState {
    ctx: NodeContext,
    dispatcher: ActorRef<DispatcherMsg>,
    drain_requested: Arc<tokio::sync::Notify>,
}

pub enum NodeControlMsg {
    Call(NodeControlRequest, RpcReplyPort<NodeControlReply>),
}

crate::remote_call_message!(NodeControlMsg, Call, NodeControlRequest, NodeControlReply);

impl Actor for NodeControl {
    type Msg = NodeControlMsg;
    type State = NodeControlState;
    type Arguments = NodeControlArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(groups::NODES.to_string(), vec![myself.get_cell()]);
        ractor::pg::join(groups::node(&args.ctx.node), vec![myself.get_cell()]);
        Ok(NodeControlState { ctx: args.ctx, dispatcher: args.dispatcher, drain_requested: args.drain_requested })
    }

    async fn handle(&self, _myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let NodeControlMsg::Call(request, reply) = message;
        let node = state.ctx.node.clone();
        match request {
            NodeControlRequest::Ping => {
                let _ = reply.send(NodeControlReply::Pong { node });
            }
            NodeControlRequest::CancelJob { job_id } => {
                // Answered from a task: the dispatcher may be busy, and a control actor that
                // waits on it would delay every other node's calls.
                let dispatcher = state.dispatcher.clone();
                task::spawn(TaskKind::Reply, "cancel answer", async move {
                    let was_running = matches!(
                        dispatcher.call(|r| DispatcherMsg::Cancel { job_id, reply: r }, Some(Duration::from_secs(5))).await,
                        Ok(ractor::rpc::CallResult::Success(true))
                    );
                    let _ = reply.send(NodeControlReply::Cancelled { node, was_running });
                });
            }
            NodeControlRequest::Drain => {
                tracing::info!(node = %node, "drain requested through the cluster");
                state.drain_requested.notify_one();
                let _ = reply.send(NodeControlReply::Draining { node });
            }
        }
        Ok(())
    }
}

/// Calls the control actor of `node`, wherever it runs, opening a session with `node` if none
/// is up. `None` when none could be (the process group has no member for it) or it did not
/// answer in `timeout`.
pub async fn call_node(node: &str, request: NodeControlRequest, timeout: Duration) -> Option<NodeControlReply> {
    let member = crate::cluster_mesh::reach(&groups::node(node), node, timeout).await?;
    let actor: ActorRef<NodeControlMsg> = member.into();
    match actor.call(|r| NodeControlMsg::Call(request, r), Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(reply)) => Some(reply),
        _ => None,
    }
}
