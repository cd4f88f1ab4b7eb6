//! CompressionPool: a bounded pool of [`CompressionWorker`]s that runs pipelines'
//! post-processing commands (`.ply` to `.sog`, ...), off the GPU slots.
//!
//! ```text
//! CompressionPool              queue (FIFO), at most `max_workers` commands at once
//! └── CompressionWorker (xN)   one command at a time; restarted when it dies
//! ```
//!
//! Backpressure: a job must be admitted by [`CompressionHandle::run`] before its command is
//! queued, and at most `queue_limit + max_workers` are admitted at once; the rest wait, so a
//! burst of finished GPU stages cannot grow the queue without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::stage::{CommandOutput, StageError};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::compression_worker::{CommandRun, CompressionWorker, CompressionWorkerMsg};

pub struct CompressionPool;

pub struct CompressionPoolState {
    size: usize,
    workers: HashMap<ActorId, ActorRef<CompressionWorkerMsg>>,
    idle: VecDeque<ActorId>,
    queue: VecDeque<CommandRun>,
    /// Workers running a command now (never above `size`).
    active: usize,
    stopping: bool,
}

pub enum CompressionPoolMsg {
    Run(CommandRun),
    /// A worker finished its command.
    Idle(ActorId),
    /// Start a worker in place of one that died.
    Respawn,
    Stopping,
}

// Local only: never sent to another node.
impl ractor::Message for CompressionPoolMsg {}

/// What job actors hold to run a command on the pool.
#[derive(Clone)]
pub struct CompressionHandle {
    pool: ActorRef<CompressionPoolMsg>,
    admission: Arc<Semaphore>,
}

impl CompressionHandle {
    pub fn new(pool: ActorRef<CompressionPoolMsg>, workers: usize, queue_limit: usize) -> Self {
        CompressionHandle { pool, admission: Arc::new(Semaphore::new(workers + queue_limit)) }
    }

    /// Runs `argv` on a pool worker once admitted; waits while the pool is full.
    pub async fn run(&self, argv: Vec<String>, timeout: Duration, cancel: &CancellationToken) -> Result<CommandOutput, StageError> {
        let _permit = tokio::select! {
            p = self.admission.clone().acquire_owned() => p.map_err(|_| StageError::Failed("the compression pool is closed".into()))?,
            _ = cancel.cancelled() => return Err(StageError::Cancelled),
        };
        let cancel = cancel.clone();
        let called = self.pool.call(|reply| CompressionPoolMsg::Run(CommandRun { argv, timeout, cancel, reply }), None).await;
        match called {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => Err(StageError::Failed("the compression worker stopped while running the command".into())),
        }
    }
}

impl Actor for CompressionPool {
    type Msg = CompressionPoolMsg;
    type State = CompressionPoolState;
    type Arguments = usize;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, size: usize) -> Result<Self::State, ActorProcessingErr> {
        Ok(CompressionPoolState {
            size,
            workers: HashMap::new(),
            idle: VecDeque::new(),
            queue: VecDeque::new(),
            active: 0,
            stopping: false,
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        for _ in 0..state.size {
            state.spawn_worker(&myself).await;
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            CompressionPoolMsg::Run(run) => state.queue.push_back(run),
            CompressionPoolMsg::Idle(id) => {
                if state.workers.contains_key(&id) {
                    state.active -= 1;
                    state.idle.push_back(id);
                }
            }
            CompressionPoolMsg::Respawn if !state.stopping => state.spawn_worker(&myself).await,
            CompressionPoolMsg::Respawn => {}
            CompressionPoolMsg::Stopping => state.stopping = true,
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
            metrics::counter!("kiln_compression_worker_restarts_total").increment(1);
            myself.send_after(Duration::from_millis(100), || CompressionPoolMsg::Respawn);
        }
        Ok(())
    }
}

impl CompressionPoolState {
    async fn spawn_worker(&mut self, myself: &ActorRef<CompressionPoolMsg>) {
        match Actor::spawn_linked(None, CompressionWorker, myself.clone(), myself.get_cell()).await {
            Ok((worker, _)) => {
                self.idle.push_back(worker.get_id());
                self.workers.insert(worker.get_id(), worker);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot spawn a compression worker");
                myself.send_after(Duration::from_secs(1), || CompressionPoolMsg::Respawn);
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
            match worker.cast(CompressionWorkerMsg::Run(run)) {
                Ok(()) => self.active += 1,
                Err(_) => continue, // the worker is dying; its supervision event replaces it
            }
        }
        metrics::gauge!("kiln_compression_active").set(self.active as f64);
        metrics::gauge!("kiln_compression_queued").set(self.queue.len() as f64);
    }
}
