//! StageWorker: runs one stage command at a time for the [`StagePool`](crate::stage_pool), and
//! tells the pool when it is free again, through [`WorkerFree`] (the pool's mailbox), so this
//! file does not import its parent.
//!
//! The command runs in its own process group and is killed whole on timeout or cancel
//! ([`kiln_core::stage::run_command`]); its reply goes straight to the job actor that asked.
//! If this actor dies mid-command (a bug, or the `panic_in_compression_worker` fault point),
//! the reply port is dropped, the job actor sees the failure and retries the stage, and the
//! pool starts a fresh worker.

use std::time::Duration;

use kiln_core::stage::{run_command, CommandOutput, StageError};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

pub struct StageWorker;

/// Where a worker says it is free again (the pool implements it with a message to itself).
pub trait WorkerFree: Send + Sync + 'static {
    fn worker_free(&self, worker: ActorId);
}

/// One command to run.
pub struct CommandRun {
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub cancel: CancellationToken,
    pub reply: RpcReplyPort<Result<CommandOutput, StageError>>,
}

pub enum StageWorkerMsg {
    Run(CommandRun),
}

// Local only: never sent to another node.
impl ractor::Message for StageWorkerMsg {}

impl Actor for StageWorker {
    type Msg = StageWorkerMsg;
    type State = Box<dyn WorkerFree>;
    type Arguments = Box<dyn WorkerFree>;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, pool: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        // Cluster-wide group of every stage worker (ractor_cluster syncs it to peers).
        ractor::pg::join(crate::wire::groups::COMPRESSORS.to_string(), vec![myself.get_cell()]);
        Ok(pool)
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, pool: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let StageWorkerMsg::Run(run) = message;
        kiln_core::fault::panic_at("panic_in_compression_worker");
        let result = run_command(&run.argv, run.timeout, &run.cancel).await;
        let _ = run.reply.send(result);
        pool.worker_free(myself.get_id());
        Ok(())
    }
}
