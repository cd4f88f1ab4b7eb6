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

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_core::engine::{workers_to_stop, Engine, EngineError, EngineJob, EngineOutput, ProgressSink, ResidentWorker, SlotContext};
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
    /// The warm list last reported, so the registry is written only when it changes.
    reported_warm: Vec<String>,
    /// When each model last ran here (a logical clock), for stopping the least recently used
    /// process workers to make room in the slot's memory budget.
    last_used: BTreeMap<String, u64>,
    clock: u64,
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
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for InferenceMsg {}

impl Actor for InferenceActor {
    type Msg = InferenceMsg;
    type State = InferenceState;
    type Arguments = InferenceArgs;

    /// Infallible on purpose: a failing `pre_start` never reaches the supervisor, so models are
    /// loaded on the first job, not here.
    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Ok(InferenceState {
            slot: SlotContext::new(&args.ctx.node, &args.slot, args.ctx.config.node.slot_memory_bytes),
            ctx: args.ctx,
            registry: args.registry,
            engines: BTreeMap::new(),
            reported_warm: vec![],
            last_used: BTreeMap::new(),
            clock: 0,
        })
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            InferenceMsg::Run { job, progress, cancel, reply } => state.on_run(&myself, *job, progress, cancel, reply).await,
            InferenceMsg::TorchDone { fatal } => state.on_torch_done(fatal),
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

    /// Counts what the resident process workers hold, for the torch thread's share.
    fn count_process_bytes(&self) {
        let held = self
            .engines
            .iter()
            .filter(|(_, e)| e.torch().is_none() && e.is_loaded())
            .filter_map(|(m, e)| self.ctx.config.model(m).map(|c| e.resident_bytes(c)))
            .sum();
        self.slot.process_bytes.store(held, std::sync::atomic::Ordering::Release);
    }

    /// Makes room in the slot's memory budget for `model`, about to load: stops the least
    /// recently used process workers that must go (TorchScript modules give way on the torch
    /// thread, which fits them in what the workers leave). An error when the model cannot fit
    /// beside what cannot be stopped here.
    fn make_room(&mut self, model: &kiln_core::config::ModelConfig) -> Result<(), EngineError> {
        let Some(engine) = self.engines.get(&model.name) else { return Ok(()) };
        let need = engine.resident_bytes(model);
        if need == 0 || engine.is_loaded() {
            return Ok(());
        }
        let budget = self.slot.memory_bytes;
        if need > budget {
            return Err(EngineError::ModelBroken(format!("model needs {need} bytes; the slot's budget is {budget}")));
        }
        let resident: Vec<ResidentWorker> = self
            .engines
            .iter()
            .filter(|(m, e)| *m != &model.name && e.torch().is_none() && e.is_loaded())
            .filter_map(|(m, e)| {
                let config = self.ctx.config.model(m)?;
                let bytes = e.resident_bytes(config);
                (bytes > 0).then(|| ResidentWorker { model: m.clone(), bytes, last_used: self.last_used.get(m).copied().unwrap_or(0) })
            })
            .collect();
        // A process model must also fit beside the modules; a TorchScript model makes its own
        // room among them.
        let fixed = if engine.torch().is_some() { 0 } else { self.slot.torch_bytes.load(std::sync::atomic::Ordering::Acquire) };
        let stop = workers_to_stop(&resident, fixed, need, budget).map_err(|missing| {
            EngineError::Load(format!(
                "model needs {need} bytes of the slot's {budget}; {missing} more are held by TorchScript models and workers that cannot be stopped now"
            ))
        })?;
        for victim in stop {
            tracing::info!(slot = %self.slot.slot, model = %victim, to_fit = %model.name, "stopping the least recently used worker to fit the slot's memory budget");
            if let Some(e) = self.engines.get_mut(&victim) {
                e.shutdown();
            }
        }
        self.count_process_bytes();
        self.report_warm();
        Ok(())
    }

    /// Publishes the warm models (to the registry and the dispatcher's placement) if changed:
    /// a load adds one, an eviction by the memory budget removes one.
    fn report_warm(&mut self) {
        let warm = self.warm_models();
        if warm != self.reported_warm {
            self.ctx.warm.insert(self.slot.slot.clone(), warm.clone());
            self.report(GpuUpdate { warm_models: Some(warm.clone()), ..Default::default() });
            self.reported_warm = warm;
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
                self.report(GpuUpdate { warm_models: Some(vec![]), last_error: Some(Some(reason.clone())), ..Default::default() });
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
        if let Err(e) = self.make_room(&model) {
            tracing::warn!(slot = %self.slot.slot, model = %model.name, error = %e, "model does not fit the slot's memory budget");
            self.report(GpuUpdate { last_error: Some(Some(e.to_string())), ..Default::default() });
            let _ = reply.send(Err(e));
            return Ok(());
        }
        let engine = self.engines.get_mut(&model.name).expect("inserted above");
        if let Some(torch) = engine.torch() {
            // Off the mailbox: the slot's torch thread serializes the jobs (and batches those of
            // a batching model), so the next job may arrive while this one runs.
            if !engine.is_loaded() {
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
        if !engine.is_loaded() {
            // An overlay on busy, not a state: once loaded the slot shows busy again.
            let update = GpuUpdate { loading: Some(true), ..Default::default() };
            let _ = self.registry.cast(RegistryWriterMsg::Gpu { slot: self.slot.slot.clone(), update });
            let loaded = tokio::time::timeout(timeout, engine.ensure_loaded()).await;
            let loaded = loaded.unwrap_or_else(|_| Err(EngineError::Load(format!("model did not load within {timeout:?}"))));
            if let Err(e) = loaded {
                // The job gets the load error (and retries, maybe elsewhere); the slot stays up
                // for its other models, so a broken model cannot quarantine a healthy GPU.
                tracing::warn!(slot = %self.slot.slot, model = %model.name, error = %e, "model load failed");
                self.report(GpuUpdate { loading: Some(false), last_error: Some(Some(e.to_string())), ..Default::default() });
                let _ = reply.send(Err(e));
                return Ok(());
            }
            self.report(GpuUpdate { loading: Some(false), ..Default::default() });
            self.count_process_bytes();
            self.report_warm();
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
        self.count_process_bytes();
        self.report_warm();
        if let Some(reason) = restart {
            self.ctx.warm.remove(&self.slot.slot);
            self.report(GpuUpdate { warm_models: Some(vec![]), last_error: Some(Some(reason.clone())), ..Default::default() });
            return Err(reason.into());
        }
        Ok(())
    }
}
