//! StagePool: a bounded pool of [`StageWorker`]s that runs pipelines' stage commands, whatever
//! they do (`.ply` to `.sog`, a copy, a checksum, ...), off the GPU slots.
//!
//! ```text
//! StagePool              queue (FIFO), at most `max_workers` commands at once
//! └── StageWorker (xN)   one command at a time; restarted when it dies
//! ```
//!
//! It was called the compression pool when compression was all it ran; the names outside
//! the code keep that name, as they are a contract with operators: the `[compression]` config
//! section, the `kiln_compression_*` metrics, the `panic_in_compression_worker` fault point,
//! the `kiln.compressors` process group and its log lines.
//!
//! Backpressure: a job must be admitted by [`StagePoolHandle::run`] before its command is
//! queued, and at most `queue_limit + max_workers` are admitted at once; the rest wait, so a
//! burst of finished GPU stages cannot grow the queue without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::stage::{CommandOutput, StageError};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::stage_worker::{CommandRun, StageWorker, StageWorkerMsg, WorkerFree};

pub struct StagePool;

pub struct StagePoolState {
    size: usize,
    workers: HashMap<ActorId, ActorRef<StageWorkerMsg>>,
    idle: VecDeque<ActorId>,
    queue: VecDeque<CommandRun>,
    /// Workers running a command now (never above `size`).
    active: usize,
    stopping: bool,
}

pub enum StagePoolMsg {
    Run(CommandRun),
    /// A worker finished its command.
    Idle(ActorId),
    /// Start a worker in place of one that died.
    Respawn,
    Stopping,
}

// Local only: never sent to another node.
impl ractor::Message for StagePoolMsg {}

/// What job actors hold to run a command on the pool.
#[derive(Clone)]
pub struct StagePoolHandle {
    pool: ActorRef<StagePoolMsg>,
    admission: Arc<Semaphore>,
}

impl StagePoolHandle {
    pub fn new(pool: ActorRef<StagePoolMsg>, workers: usize, queue_limit: usize) -> Self {
        StagePoolHandle { pool, admission: Arc::new(Semaphore::new(workers + queue_limit)) }
    }

    /// Runs `argv` on a pool worker once admitted; waits while the pool is full.
    pub async fn run(&self, argv: Vec<String>, timeout: Duration, cancel: &CancellationToken) -> Result<CommandOutput, StageError> {
        let _permit = tokio::select! {
            p = self.admission.clone().acquire_owned() => p.map_err(|_| StageError::Failed("the compression pool is closed".into()))?,
            _ = cancel.cancelled() => return Err(StageError::Cancelled),
        };
        let cancel = cancel.clone();
        let called = self.pool.call(|reply| StagePoolMsg::Run(CommandRun { argv, timeout, cancel, reply }), None).await;
        match called {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => Err(StageError::Failed("the compression worker stopped while running the command".into())),
        }
    }
}

impl WorkerFree for ActorRef<StagePoolMsg> {
    fn worker_free(&self, worker: ActorId) {
        let _ = self.cast(StagePoolMsg::Idle(worker));
    }
}

impl Actor for StagePool {
    type Msg = StagePoolMsg;
    type State = StagePoolState;
    type Arguments = usize;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, size: usize) -> Result<Self::State, ActorProcessingErr> {
        Ok(StagePoolState { size, workers: HashMap::new(), idle: VecDeque::new(), queue: VecDeque::new(), active: 0, stopping: false })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        for _ in 0..state.size {
            state.spawn_worker(&myself).await;
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            StagePoolMsg::Run(run) => state.queue.push_back(run),
            StagePoolMsg::Idle(id) => {
                if state.workers.contains_key(&id) {
                    state.active -= 1;
                    state.idle.push_back(id);
                }
            }
            StagePoolMsg::Respawn if !state.stopping => state.spawn_worker(&myself).await,
            StagePoolMsg::Respawn => {}
            StagePoolMsg::Stopping => state.stopping = true,
        }
        state.dispatch();
        Ok(())
    }

    /// A worker that dies is replaced (after a short pause, so a worker that dies at once
    /// cannot spin); the job whose command it ran sees its reply port dropped and retries.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.unwrap_or_default()),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if state.workers.remove(&id).is_none() {
            return Ok(());
        }
        match state.idle.iter().position(|w| *w == id) {
            Some(i) => {
                state.idle.remove(i);
            }
            None => state.active -= 1,
        }
        if !state.stopping {
            tracing::warn!(reason = %reason, "compression worker died; starting another");
            metrics::counter!(kiln_core::metrics::COMPRESSION_WORKER_RESTARTS).increment(1);
            myself.send_after(Duration::from_millis(100), || StagePoolMsg::Respawn);
        }
        Ok(())
    }
}

impl StagePoolState {
    async fn spawn_worker(&mut self, myself: &ActorRef<StagePoolMsg>) {
        match Actor::spawn_linked(None, StageWorker, Box::new(myself.clone()), myself.get_cell()).await {
            Ok((worker, _)) => {
                self.idle.push_back(worker.get_id());
                self.workers.insert(worker.get_id(), worker);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot spawn a compression worker");
                myself.send_after(Duration::from_secs(1), || StagePoolMsg::Respawn);
            }
        }
    }

    /// Hands queued commands to idle workers, oldest first.
    fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some(id) = self.idle.pop_front() else { break };
            let Some(worker) = self.workers.get(&id) else { continue };
            let run = self.queue.pop_front().expect("non-empty");
            if run.reply.is_closed() {
                self.idle.push_front(id); // its job gave up meanwhile
                continue;
            }
            match worker.cast(StageWorkerMsg::Run(run)) {
                Ok(()) => self.active += 1,
                Err(_) => continue, // the worker is dying; its supervision event replaces it
            }
        }
        metrics::gauge!(kiln_core::metrics::COMPRESSION_ACTIVE).set(self.active as f64);
        metrics::gauge!(kiln_core::metrics::COMPRESSION_QUEUED).set(self.queue.len() as f64);
    }
}
