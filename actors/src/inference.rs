//! InferenceActor: owns one GPU slot's engines (one per model, loaded lazily and kept
//! resident) and runs one job at a time on them.
//!
//! Supervised by its slot's [`GpuSupervisor`](crate::gpu_supervisor). It fails on purpose
//! (returns an error from `handle`) when the engine's state can no longer be trusted: the
//! worker process died, or a job ran past its timeout. The supervisor then restarts it with
//! backoff; dropping the state kills every worker process it held. The job actor that was
//! waiting gets the error through its reply port first, and retries the job.
//!
//! Process-engine jobs run inside the handler, one at a time. TorchScript jobs are handed to the
//! slot's torch thread from a task, so several jobs of a batching model can be in flight; the
//! task reports back (`TorchDone`) and a slot-fatal error fails the actor as above. The mailbox
//! is unbounded by ractor's design, but the dispatcher never sends a slot more jobs than the
//! model's `max_batch` (1 unless it batches) plus the node's `slot_prefetch` claimed ahead,
//! which wait here for the current one.
//!
//! Memory: the slot's resident models share `node.slot_memory_bytes`, each counted by its
//! declared `memory_bytes`, else its measured memory (a process worker's, read after its load
//! and after each job). Before a load and after each measure, the least recently used process
//! workers that must go are stopped, and the stop is checked: the worker's process group is
//! waited for until /proc shows none of it. The slot's warm pool (models whose `min_warm`
//! names this slot) is loaded through a message the actor sends itself once started, and never
//! stopped to make room.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_core::config::EngineConfig;
use kiln_core::engine::{
    counted_bytes, resident_changed, workers_to_stop, Engine, EngineError, EngineJob, EngineOutput, ProgressSink, ResidentWorker,
    SlotContext,
};
use kiln_core::placement::SlotRoom;
use kiln_core::protocol::ResidentModel;
use kiln_core::task::{self, TaskKind};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use crate::context::NodeContext;
use crate::registry_writer::{GpuUpdate, RegistryWriterMsg};

pub struct InferenceActor;

pub struct InferenceArgs {
    pub ctx: NodeContext,
    pub slot: String,
    pub registry: ActorRef<RegistryWriterMsg>,
}

pub struct InferenceState {
    ctx: NodeContext,
    slot: SlotContext,
    registry: ActorRef<RegistryWriterMsg>,
    /// One engine per model this slot has run; BTreeMap for a stable warm-model list.
    engines: BTreeMap<String, Engine>,
    /// The warm list and resident models last reported, so the registry is written only when
    /// they change.
    reported_warm: Vec<String>,
    reported_resident: Vec<ResidentModel>,
    /// When each model last ran here (a logical clock), for stopping the least recently used
    /// process workers to make room in the slot's memory budget.
    last_used: BTreeMap<String, u64>,
    clock: u64,
    /// What each process model's worker was last measured to hold here. Kept after the worker
    /// stops: it is the estimate that makes room before the model's next load.
    measured: BTreeMap<String, u64>,
    /// The models this slot keeps loaded for their `min_warm`: loaded at start, never stopped
    /// to make room.
    pinned: BTreeSet<String>,
    /// The models that have run a job since the actor started: the first one is timed.
    ran: BTreeSet<String>,
}

pub type RunResult = Result<Vec<EngineOutput>, EngineError>;

pub enum InferenceMsg {
    Run {
        // Boxed: it holds the job's whole record, and the enum's other variant is a flag.
        job: Box<EngineJob>,
        progress: ProgressSink,
        cancel: CancellationToken,
        reply: RpcReplyPort<RunResult>,
    },
    /// A TorchScript run (spawned off the mailbox) ended well, or with this slot-fatal error.
    TorchDone { fatal: Option<String> },
    /// Loads the slot's warm pool (sent to itself once started): through the mailbox, so a job
    /// that arrives meanwhile waits for the load rather than racing it.
    LoadWarmPool,
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for InferenceMsg {}

impl Actor for InferenceActor {
    type Msg = InferenceMsg;
    type State = InferenceState;
    type Arguments = InferenceArgs;

    /// Infallible on purpose: a failing `pre_start` never reaches the supervisor, so models are
    /// loaded on the first job, or (a warm pool) by a message to itself, not here.
    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Ok(InferenceState {
            slot: SlotContext::new(&args.ctx.node, &args.slot, args.ctx.config.node.slot_memory_bytes),
            pinned: args.ctx.config.warm_pool(&args.slot).into_iter().collect(),
            ctx: args.ctx,
            registry: args.registry,
            engines: BTreeMap::new(),
            reported_warm: vec![],
            reported_resident: vec![],
            last_used: BTreeMap::new(),
            clock: 0,
            measured: BTreeMap::new(),
            ran: BTreeSet::new(),
        })
    }

    /// A restarted actor (its workers died with the old one) loads its warm pool again.
    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if !state.pinned.is_empty() {
            let _ = myself.cast(InferenceMsg::LoadWarmPool);
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            InferenceMsg::Run { job, progress, cancel, reply } => state.on_run(&myself, *job, progress, cancel, reply).await,
            InferenceMsg::TorchDone { fatal } => state.on_torch_done(fatal),
            InferenceMsg::LoadWarmPool => {
                state.on_load_warm_pool().await;
                Ok(())
            }
        }
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        for engine in state.engines.values_mut() {
            engine.shutdown();
        }
        Ok(())
    }
}

impl InferenceState {
    fn warm_models(&self) -> Vec<String> {
        self.engines.iter().filter(|(_, e)| e.is_loaded()).map(|(m, _)| m.clone()).collect()
    }

    /// A loaded model as the slot's budget counts it; `None` when it is not loaded.
    fn resident(&self, model: &str) -> Option<ResidentModel> {
        let engine = self.engines.get(model).filter(|e| e.is_loaded())?;
        let config = self.ctx.config.model(model)?;
        let (declared, estimate) = engine.budget_figures(config);
        // A worker's figure as last measured (reading /proc each time would not be cheap).
        let measured = self.measured.get(model).copied().filter(|_| engine.torch().is_none());
        let (bytes, source) = counted_bytes(declared, measured, estimate);
        Some(ResidentModel { model: model.to_string(), bytes, source, measured_bytes: measured, pinned: self.pinned.contains(model) })
    }

    /// The loaded models that hold memory, as the registry shows them.
    fn resident_list(&self) -> Vec<ResidentModel> {
        self.engines.keys().filter_map(|m| self.resident(m)).filter(|r| r.bytes > 0).collect()
    }

    /// The bytes the budget reserves for `model` before it loads: declared, else what it was
    /// last measured to hold here, else the estimate (0 for a process model never measured).
    fn need_bytes(&self, model: &kiln_core::config::ModelConfig) -> u64 {
        let Some(engine) = self.engines.get(&model.name) else { return 0 };
        let (declared, estimate) = engine.budget_figures(model);
        counted_bytes(declared, self.measured.get(&model.name).copied().filter(|_| engine.torch().is_none()), estimate).0
    }

    /// The slot's free memory and what each of its models would need here, for placement: the
    /// need of a model this slot has not run is its declared figure (nothing if none).
    fn room(&self, resident: &[ResidentModel]) -> SlotRoom {
        let held: u64 = resident.iter().map(|r| r.bytes).sum();
        let need = self
            .ctx
            .config
            .models_for_slot(&self.slot.slot)
            .into_iter()
            .filter_map(|name| {
                let model = self.ctx.config.model(&name)?;
                let bytes = match (self.engines.contains_key(&name), &model.engine) {
                    (true, _) => self.need_bytes(model),
                    (false, EngineConfig::Process { memory_bytes, .. } | EngineConfig::Torchscript { memory_bytes, .. }) => {
                        (*memory_bytes)?
                    }
                    _ => return None,
                };
                Some((name, bytes))
            })
            .collect();
        SlotRoom { free: self.slot.memory_bytes.saturating_sub(held), need }
    }

    /// Counts what the resident process workers hold, for the torch thread's share.
    fn count_process_bytes(&self) {
        let held = self.engines.iter().filter(|(_, e)| e.torch().is_none()).filter_map(|(m, _)| self.resident(m)).map(|r| r.bytes).sum();
        self.slot.process_bytes.store(held, std::sync::atomic::Ordering::Release);
    }

    /// Reads what `model`'s worker holds now (see [`Engine::measured_bytes`]).
    async fn measure(&mut self, model: &str) {
        let Some(engine) = self.engines.get(model) else { return };
        if let Some(bytes) = engine.measured_bytes().await {
            self.measured.insert(model.to_string(), bytes);
        }
    }

    /// Makes room in the slot's memory budget for `model`, about to load: stops the least
    /// recently used process workers that must go (TorchScript modules give way on the torch
    /// thread, which fits them in what the workers leave). An error when the model cannot fit
    /// beside what cannot be stopped here.
    async fn make_room(&mut self, model: &kiln_core::config::ModelConfig) -> Result<(), EngineError> {
        let Some(engine) = self.engines.get(&model.name) else { return Ok(()) };
        let need = self.need_bytes(model);
        if need == 0 || engine.is_loaded() {
            return Ok(());
        }
        let budget = self.slot.memory_bytes;
        if need > budget {
            return Err(EngineError::ModelBroken(format!("model needs {need} bytes; the slot's budget is {budget}")));
        }
        let torch = engine.torch().is_some();
        self.fit(&model.name, need, torch).await.map_err(|missing| {
            EngineError::Load(format!(
                "model needs {need} bytes of the slot's {budget}; {missing} more are held by TorchScript models and workers that cannot be stopped now"
            ))
        })
    }

    /// Stops the least recently used process workers (never a pinned one, nor `model` itself)
    /// until `need` bytes of `model` fit in the budget; `Err` with the bytes still missing when
    /// stopping all of them would not be enough (then none is stopped).
    async fn fit(&mut self, model: &str, need: u64, torch: bool) -> Result<(), u64> {
        let others: Vec<ResidentModel> =
            self.engines.iter().filter(|(m, e)| *m != model && e.torch().is_none()).filter_map(|(m, _)| self.resident(m)).collect();
        let pinned: u64 = others.iter().filter(|r| r.pinned).map(|r| r.bytes).sum();
        let resident: Vec<ResidentWorker> = others
            .iter()
            .filter(|r| !r.pinned && r.bytes > 0)
            .map(|r| ResidentWorker {
                model: r.model.clone(),
                bytes: r.bytes,
                last_used: self.last_used.get(&r.model).copied().unwrap_or(0),
            })
            .collect();
        // A process model must also fit beside the modules; a TorchScript model makes its own
        // room among them.
        let modules = if torch { 0 } else { self.slot.torch_bytes.load(std::sync::atomic::Ordering::Acquire) };
        let stop = workers_to_stop(&resident, pinned + modules, need, self.slot.memory_bytes)?;
        for victim in stop {
            self.evict(&victim, model).await;
        }
        self.count_process_bytes();
        self.report_warm();
        Ok(())
    }

    /// Stops `victim`'s worker to make room for `model`, and checks that its memory is given
    /// back: its process group gone from the process table.
    async fn evict(&mut self, victim: &str, model: &str) {
        let slot = self.slot.slot.clone();
        let bytes = self.resident(victim).map(|r| r.bytes).unwrap_or(0);
        tracing::info!(slot = %slot, model = %victim, bytes, to_fit = %model, "stopping the least recently used worker to fit the slot's memory budget");
        let Some(engine) = self.engines.get_mut(victim) else { return };
        match engine.stop().await {
            Some(s) if s.left_processes == 0 => tracing::info!(
                slot = %slot, model = %victim, pid = s.pid, freed_bytes = s.held_bytes, gpu_freed_bytes = ?s.gpu_freed_bytes,
                "evicted worker's process group is gone: its memory is given back"
            ),
            Some(s) => tracing::warn!(
                slot = %slot, model = %victim, pid = s.pid, left_processes = s.left_processes, left_bytes = s.left_bytes,
                "evicted worker's process group is still alive after SIGKILL"
            ),
            None => {}
        }
    }

    /// After a process model loaded or ran: measure what its worker holds now and, if the slot
    /// is over its budget with it, stop the least recently used others. A model that is over
    /// the budget by itself is kept (it is running and serving) and said so.
    async fn settle(&mut self, model: &str) {
        self.measure(model).await;
        if let Some(r) = self.resident(model).filter(|r| r.bytes > 0) {
            if let Err(missing) = self.fit(model, r.bytes, false).await {
                tracing::warn!(slot = %self.slot.slot, model, bytes = r.bytes, missing, "a worker holds more than its slot's memory budget leaves it");
            }
        }
        self.count_process_bytes();
        self.report_warm();
    }

    /// Loads a process model's worker (making room first), showing `loading` meanwhile.
    async fn load(&mut self, model: &kiln_core::config::ModelConfig) -> Result<(), EngineError> {
        self.make_room(model).await.inspect_err(|e| {
            tracing::warn!(slot = %self.slot.slot, model = %model.name, error = %e, "model does not fit the slot's memory budget");
        })?;
        let timeout = Duration::from_millis(model.timeout_ms);
        // An overlay on busy, not a state: once loaded the slot shows busy again.
        self.report(GpuUpdate { loading: Some(true), ..Default::default() });
        let engine = self.engines.get_mut(&model.name).expect("created by the caller");
        let loaded = tokio::time::timeout(timeout, engine.ensure_loaded()).await;
        let loaded = loaded.unwrap_or_else(|_| Err(EngineError::Load(format!("model did not load within {timeout:?}"))));
        self.report(GpuUpdate { loading: Some(false), ..Default::default() });
        if let Err(e) = &loaded {
            tracing::warn!(slot = %self.slot.slot, model = %model.name, error = %e, "model load failed");
            return loaded;
        }
        self.settle(&model.name).await;
        Ok(())
    }

    /// Loads the models of the slot's warm pool that are not loaded. A model that fails stays
    /// unloaded (its first job loads it, or fails for it); the slot stays up for the others.
    async fn on_load_warm_pool(&mut self) {
        for name in self.pinned.clone() {
            let Some(model) = self.ctx.config.model(&name).cloned() else { continue };
            let engine = self.engines.entry(name.clone()).or_insert_with(|| Engine::new(&model, &self.slot));
            if engine.is_loaded() || engine.torch().is_some() {
                continue;
            }
            self.clock += 1;
            self.last_used.insert(name.clone(), self.clock);
            let started = std::time::Instant::now();
            match self.load(&model).await {
                Ok(()) => {
                    tracing::info!(slot = %self.slot.slot, model = %name, load_ms = started.elapsed().as_millis() as u64, "loaded for the model's min_warm")
                }
                Err(e) => self.report(GpuUpdate { last_error: Some(Some(e.to_string())), ..Default::default() }),
            }
        }
    }

    /// Publishes the warm models (to the registry and the dispatcher's placement) if changed:
    /// a load adds one, an eviction by the memory budget removes one.
    fn report_warm(&mut self) {
        let warm = self.warm_models();
        let resident = self.resident_list();
        self.ctx.room.insert(self.slot.slot.clone(), self.room(&resident));
        let warm_changed = warm != self.reported_warm;
        if warm_changed {
            self.ctx.warm.insert(self.slot.slot.clone(), warm.clone());
        }
        if warm_changed || resident_changed(&self.reported_resident, &resident) {
            self.report(GpuUpdate { warm_models: Some(warm.clone()), resident: Some(resident.clone()), ..Default::default() });
            self.reported_warm = warm;
            self.reported_resident = resident;
        }
    }

    fn report(&self, update: GpuUpdate) {
        let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: self.slot.slot.clone(), update });
    }

    /// A TorchScript run ended: publish what is warm now (a load adds, an eviction removes);
    /// a slot-fatal error (the torch thread panicked, a timeout) fails the actor so that its
    /// supervisor restarts it with a fresh thread.
    fn on_torch_done(&mut self, fatal: Option<String>) -> Result<(), ActorProcessingErr> {
        self.report(GpuUpdate { loading: Some(false), ..Default::default() });
        match fatal {
            Some(reason) => {
                self.ctx.warm.remove(&self.slot.slot);
                self.report(GpuUpdate {
                    warm_models: Some(vec![]),
                    resident: Some(vec![]),
                    last_error: Some(Some(reason.clone())),
                    ..Default::default()
                });
                Err(reason.into())
            }
            None => {
                self.report_warm();
                Ok(())
            }
        }
    }

    async fn on_run(
        &mut self,
        myself: &ActorRef<InferenceMsg>,
        job: EngineJob,
        progress: ProgressSink,
        cancel: CancellationToken,
        reply: RpcReplyPort<RunResult>,
    ) -> Result<(), ActorProcessingErr> {
        // A job claimed ahead of the slot's current one waited in this mailbox: it may have
        // been cancelled meanwhile.
        if cancel.is_cancelled() {
            let _ = reply.send(Err(EngineError::Cancelled));
            return Ok(());
        }
        let Some(model) = self.ctx.config.model(&job.record.model).cloned() else {
            let _ = reply.send(Err(EngineError::User(format!("model {:?} is not configured on this node", job.record.model))));
            return Ok(());
        };
        let timeout = Duration::from_millis(model.timeout_ms);
        // A multi-GPU model's worker must see the GPUs of the group this job holds.
        self.engines.entry(model.name.clone()).or_insert_with(|| Engine::new(&model, &self.slot)).use_group(&job.group);
        self.clock += 1;
        self.last_used.insert(model.name.clone(), self.clock);
        // The first job of a model since the slot started is timed: with `min_warm` its model
        // is loaded before it comes; without, the job waits for the load.
        let first = self.ran.insert(model.name.clone()).then(std::time::Instant::now);
        let engine = self.engines.get(&model.name).expect("inserted above");
        if let Some(torch) = engine.torch() {
            if let Err(e) = self.make_room(&model).await {
                tracing::warn!(slot = %self.slot.slot, model = %model.name, error = %e, "model does not fit the slot's memory budget");
                self.report(GpuUpdate { last_error: Some(Some(e.to_string())), ..Default::default() });
                let _ = reply.send(Err(e));
                return Ok(());
            }
            // Off the mailbox: the slot's torch thread serializes the jobs (and batches those of
            // a batching model), so the next job may arrive while this one runs.
            if !self.engines.get(&model.name).is_some_and(|e| e.is_loaded()) {
                self.report(GpuUpdate { loading: Some(true), ..Default::default() });
            }
            kiln_core::fault::panic_at("panic_before_run");
            let me = myself.clone();
            task::spawn(TaskKind::Reply, "torchscript run", async move {
                let result = match tokio::time::timeout(timeout, torch.run(job, progress, cancel)).await {
                    Ok(r) => r,
                    Err(_) => Err(EngineError::Timeout(model.timeout_ms)),
                };
                let fatal = result.as_ref().err().filter(|e| e.needs_restart()).map(|e| e.to_string());
                let _ = reply.send(result);
                let _ = me.cast(InferenceMsg::TorchDone { fatal });
            });
            return Ok(());
        }
        let loaded_here = !engine.is_loaded();
        if loaded_here {
            if let Err(e) = self.load(&model).await {
                // The job gets the load error (and retries, maybe elsewhere); the slot stays up
                // for its other models, so a broken model cannot quarantine a healthy GPU.
                self.report(GpuUpdate { last_error: Some(Some(e.to_string())), ..Default::default() });
                let _ = reply.send(Err(e));
                return Ok(());
            }
        }
        let engine = self.engines.get_mut(&model.name).expect("inserted above");
        kiln_core::fault::panic_at("panic_before_run");
        let result = match tokio::time::timeout(timeout, engine.run(job, progress, cancel)).await {
            Ok(r) => r,
            Err(_) => {
                engine.shutdown();
                Err(EngineError::Timeout(model.timeout_ms))
            }
        };
        let restart = result.as_ref().err().filter(|e| e.needs_restart()).map(|e| e.to_string());
        let _ = reply.send(result);
        if let Some(started) = first {
            let ms = started.elapsed().as_millis() as u64;
            tracing::info!(slot = %self.slot.slot, model = %model.name, ms, loaded_for_it = loaded_here, "first job of the model on this slot since it started");
        }
        if restart.is_none() {
            // A worker's memory grows with what its jobs leave behind (caches, arenas).
            self.settle(&model.name).await;
        }
        if let Some(reason) = restart {
            self.ctx.warm.remove(&self.slot.slot);
            self.report(GpuUpdate {
                warm_models: Some(vec![]),
                resident: Some(vec![]),
                last_error: Some(Some(reason.clone())),
                ..Default::default()
            });
            return Err(reason.into());
        }
        Ok(())
    }
}
