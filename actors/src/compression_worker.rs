//! CompressionWorker: runs one post-processing command at a time for the
//! [`CompressionPool`](crate::compression_pool), and tells the pool when it is free again.
//!
//! The command runs in its own process group and is killed whole on timeout or cancel
//! ([`kiln_core::stage::run_command`]); its reply goes straight to the job actor that asked.
//! If this actor dies mid-command (a bug, or the `panic_in_compression_worker` fault point),
//! the reply port is dropped, the job actor sees the failure and retries the stage, and the
//! pool starts a fresh worker.

use std::time::Duration;

use kiln_core::stage::{run_command, CommandOutput, StageError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use crate::compression_pool::CompressionPoolMsg;

pub struct CompressionWorker;

/// One command to run.
pub struct CommandRun {
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub cancel: CancellationToken,
    pub reply: RpcReplyPort<Result<CommandOutput, StageError>>,
}

pub enum CompressionWorkerMsg {
    Run(CommandRun),
}

// Local only: never sent to another node.
impl ractor::Message for CompressionWorkerMsg {}

impl Actor for CompressionWorker {
    type Msg = CompressionWorkerMsg;
    type State = ActorRef<CompressionPoolMsg>;
    type Arguments = ActorRef<CompressionPoolMsg>;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, pool: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        // Cluster-wide group of every compression worker (ractor_cluster syncs it to peers).
        ractor::pg::join(crate::wire::groups::COMPRESSORS.to_string(), vec![myself.get_cell()]);
        Ok(pool)
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, pool: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let CompressionWorkerMsg::Run(run) = message;
        kiln_core::fault::panic_at("panic_in_compression_worker");
        let result = run_command(&run.argv, run.timeout, &run.cancel).await;
        let _ = run.reply.send(result);
        let _ = pool.cast(CompressionPoolMsg::Idle(myself.get_id()));
        Ok(())
    }
}
