//! Engines run one job of one model on one GPU slot.
//!
//! | file         | engine    | how                                                           |
//! |--------------|-----------|---------------------------------------------------------------|
//! | `process.rs` | `process` | a long-lived worker process per slot and model, JSON lines    |
//! | `torchscript.rs` | `torchscript` | TorchScript via tch on a dedicated thread per slot    |
//! | `codecs.rs`  |           | job inputs to Torch values, outputs to PNG/npy/json/ply files |
//! | `torch_spec.rs` |        | a TorchScript model's settings: plain data, no libtorch       |
//! | `noop.rs`    | `noop`    | completes at once with a small artifact (runtime overhead)    |
//! | `proc_mem.rs` |          | a worker's process group and its resident memory, from /proc  |
//! | `nvidia.rs`  |           | a GPU's free memory from `nvidia-smi`, to check an eviction   |
//!
//! An engine loads its model lazily on the first job ([`Engine::ensure_loaded`]), keeps it
//! resident, and runs a job with a progress sink and a cancellation token. Engines are an enum,
//! not a trait object: the set is closed and known to the config, and async methods stay plain.
//!
//! `torchscript.rs` and `codecs.rs` link libtorch and exist only with the `torch` feature;
//! without it a `torchscript` model is refused when the config is validated, and
//! [`TorchEngine::run`] (never reached then) answers `model_broken`.

#[cfg(feature = "torch")]
pub mod codecs;
pub mod noop;
pub mod nvidia;
pub mod proc_mem;
pub mod process;
pub mod torch_spec;
#[cfg(feature = "torch")]
pub mod torchscript;

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{EngineConfig, ModelConfig};
use crate::job::{FailureKind, JobRecord};
use crate::protocol::{MemorySource, ResidentModel};

/// One input as the engine sees it: inline JSON, or a file the node downloaded for it.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolvedInput {
    Inline(serde_json::Value),
    File(PathBuf),
}

/// Everything an engine needs to run one attempt of one job.
#[derive(Debug, Clone)]
pub struct EngineJob {
    /// The job's record as this attempt claimed it (`attempt` is this attempt's number): what
    /// the client set reaches the engine here, so a new field needs no change on the way.
    pub record: JobRecord,
    /// The record's inputs as the node resolved them (uploads downloaded to files).
    pub inputs: BTreeMap<String, ResolvedInput>,
    /// Where the engine writes its outputs; owned by the inference actor, emptied per job.
    pub output_dir: PathBuf,
    /// Every slot the job holds, its own (the primary) first: more than one for a model of
    /// several GPUs (`gpus`), whose worker sees all of them. Empty: its own slot alone.
    pub group: Vec<String>,
}

/// A file the engine produced.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOutput {
    pub name: String,
    pub path: PathBuf,
    pub content_type: Option<String>,
}

/// What an engine reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressUpdate {
    /// A stage name (`downloading`, `inference`) and/or a percentage, 0 to 100.
    Progress { stage: Option<String>, progress: Option<f32>, message: Option<String> },
    /// A line the engine logged.
    Message(String),
    /// A live preview of the job ([`crate::preview`]), already let through by the model's
    /// interval and size limit: published for followers, never stored as an event.
    Preview {
        content_type: String,
        data: bytes::Bytes,
        /// When the engine let it through (Unix ms): its `Kiln-Ts-Ms`, one interval or more
        /// after the last one's however long it waits to be published.
        ts_ms: u64,
    },
}

/// Bounded: a job that logs faster than NATS takes events slows down rather than growing
/// memory. 256 events is a few seconds of the chattiest worker we host.
pub type ProgressSink = mpsc::Sender<ProgressUpdate>;
pub const PROGRESS_CHANNEL_BOUND: usize = 256;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// The job's input is wrong (bad params, unreadable image): no retry.
    #[error("{0}")]
    User(String),
    /// Something transient failed (out of memory, a worker reported a retryable error).
    #[error("{0}")]
    Infra(String),
    /// The model could not be loaded (worker exits at start): may be transient, retried.
    #[error("cannot load model: {0}")]
    Load(String),
    /// The model itself is unusable (missing or corrupt file, larger than the slot): retrying
    /// cannot help, so the job fails at once; the slot stays up for its other models.
    #[error("model unusable: {0}")]
    ModelBroken(String),
    /// The worker process died or broke its protocol: the slot must restart.
    #[error("worker died: {0}")]
    WorkerDied(String),
    /// The attempt ran past the model's timeout: the slot must restart.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("cancelled")]
    Cancelled,
    /// A post-processing stage failed on its last attempt (each stage retries on its own, so
    /// the job fails without running the model again).
    #[error("stage {stage}: {message}")]
    Stage { stage: String, message: String },
}

impl EngineError {
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            EngineError::User(_) => FailureKind::User,
            EngineError::ModelBroken(_) | EngineError::Stage { .. } => FailureKind::Permanent,
            _ => FailureKind::Infrastructure,
        }
    }
    /// True when the slot's state can no longer be trusted and its actor must be restarted.
    pub fn needs_restart(&self) -> bool {
        matches!(self, EngineError::WorkerDied(_) | EngineError::Timeout(_))
    }
}

/// The engine instance of one model on one slot.
pub enum Engine {
    /// Boxed (as is `Torch`) so that the enum stays small next to `Noop`.
    Process(Box<process::ProcessEngine>),
    Torch(Box<TorchEngine>),
    Noop(noop::NoopEngine),
}

/// Where a slot runs, handed to engines so they pick the right device.
#[derive(Clone)]
pub struct SlotContext {
    pub node: String,
    /// `cuda:0`, `cpu:1`.
    pub slot: String,
    /// Budget of resident models on this slot: TorchScript modules and process workers that
    /// declare `memory_bytes` share it.
    pub memory_bytes: u64,
    /// The slot's torch thread, started by the first TorchScript model it runs.
    #[cfg(feature = "torch")]
    pub torch: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<torchscript::TorchSlot>>>,
    /// Bytes its resident process workers are counted for (set by the inference actor): the
    /// torch thread fits its modules in what they leave.
    pub process_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes its resident TorchScript modules are counted for (set by the torch thread): a
    /// process worker starts only where they leave room.
    pub torch_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SlotContext {
    pub fn new(node: &str, slot: &str, memory_bytes: u64) -> Self {
        SlotContext {
            node: node.into(),
            slot: slot.into(),
            memory_bytes,
            #[cfg(feature = "torch")]
            torch: Default::default(),
            process_bytes: Default::default(),
            torch_bytes: Default::default(),
        }
    }

    /// The Torch device of this slot: `cuda:N` when CUDA has that device, else the CPU.
    #[cfg(feature = "torch")]
    pub fn torch_device(&self) -> Result<tch::Device, EngineError> {
        match crate::config::parse_slot(&self.slot) {
            Some(crate::config::SlotDevice::Cuda(n)) => {
                if tch::Cuda::is_available() && (n as usize) < tch::Cuda::device_count() as usize {
                    Ok(tch::Device::Cuda(n as usize))
                } else {
                    Err(EngineError::ModelBroken(format!(
                        "slot {} names a GPU, but CUDA has {} device(s) here",
                        self.slot,
                        if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 }
                    )))
                }
            }
            _ => Ok(tch::Device::Cpu),
        }
    }
}

/// A TorchScript model of one slot: its settings and the slot's shared torch thread. Cheap to
/// clone: the inference actor runs it from a task so that jobs of a batch can arrive together.
#[derive(Clone)]
pub struct TorchEngine {
    model: String,
    spec: torch_spec::TorchModel,
    // Read only by the torch thread, which a build without `torch` has not.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    slot: SlotContext,
}

impl Engine {
    /// Builds the engine for a model; nothing is loaded until [`ensure_loaded`](Self::ensure_loaded).
    pub fn new(model: &ModelConfig, slot: &SlotContext) -> Engine {
        match &model.engine {
            EngineConfig::Process { command, env, ready_timeout_ms, cwd, .. } => Engine::Process(Box::new(
                process::ProcessEngine::new(&model.name, command.clone(), env.clone(), *ready_timeout_ms, slot)
                    .in_dir(cwd.clone())
                    .previews_every(model.preview_interval_ms),
            )),
            EngineConfig::Torchscript { path, inputs, params, outputs, memory_bytes, device, max_batch, max_batch_delay_ms } => {
                let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                let spec = torch_spec::TorchModel {
                    path: path.into(),
                    inputs: inputs.clone(),
                    params: params.clone(),
                    outputs: outputs.clone(),
                    memory_bytes: memory_bytes.unwrap_or(2 * file_bytes),
                    cpu_only: device == "cpu",
                    max_batch: (*max_batch).max(1),
                    max_batch_delay: std::time::Duration::from_millis(*max_batch_delay_ms),
                    preview_interval_ms: model.preview_interval_ms,
                };
                Engine::Torch(Box::new(TorchEngine { model: model.name.clone(), spec, slot: slot.clone() }))
            }
            EngineConfig::Noop { artifact_bytes, work_ms } => Engine::Noop(noop::NoopEngine::new(*artifact_bytes, *work_ms)),
        }
    }

    /// What the slot's budget knows of this model before measuring it: the declared
    /// `memory_bytes` (if any) and the estimate used when nothing else is known (a TorchScript
    /// model's: its file size twice; a process model's: 0, it is counted once measured).
    pub fn budget_figures(&self, model: &ModelConfig) -> (Option<u64>, u64) {
        match (self, &model.engine) {
            (Engine::Process(_), EngineConfig::Process { memory_bytes, .. }) => (*memory_bytes, 0),
            (Engine::Torch(e), EngineConfig::Torchscript { memory_bytes, .. }) => (*memory_bytes, e.spec.memory_bytes),
            _ => (None, 0),
        }
    }

    /// What a running process worker holds now ([`process::ProcessEngine::measured_bytes`];
    /// reads /proc on a `cpu:N` slot). TorchScript modules are not measured: tch reaches
    /// neither CUDA's allocator figures nor a module's buffers, so theirs is declared or
    /// estimated.
    pub async fn measured_bytes(&self) -> Option<u64> {
        match self {
            Engine::Process(e) => e.measured_bytes().await,
            _ => None,
        }
    }

    /// A process worker's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Engine::Process(e) => e.pid(),
            _ => None,
        }
    }

    pub fn is_loaded(&self) -> bool {
        match self {
            Engine::Process(e) => e.is_loaded(),
            Engine::Torch(e) => e.is_loaded(),
            Engine::Noop(_) => true,
        }
    }

    /// Loads the model if it is not resident. Infallible to call again after a failure.
    pub async fn ensure_loaded(&mut self) -> Result<(), EngineError> {
        match self {
            Engine::Process(e) => e.ensure_loaded().await,
            // TorchScript models load on the slot's thread as part of their first run.
            Engine::Torch(_) | Engine::Noop(_) => Ok(()),
        }
    }

    pub async fn run(
        &mut self,
        job: EngineJob,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Vec<EngineOutput>, EngineError> {
        match self {
            Engine::Process(e) => e.run(job, progress, cancel).await,
            Engine::Torch(e) => e.run(job, progress, cancel).await,
            Engine::Noop(e) => e.run(job).await,
        }
    }

    /// A TorchScript engine runs without holding the inference actor (its slot thread
    /// serializes and batches); the other engines run one job at a time inside it.
    pub fn torch(&self) -> Option<TorchEngine> {
        match self {
            Engine::Torch(e) => Some((**e).clone()),
            _ => None,
        }
    }

    /// The slots the next job holds (its [`EngineJob::group`]): a process worker started for
    /// another group (other devices) is stopped, to start again seeing these. Other engines
    /// run on their slot's one device and ignore it.
    pub fn use_group(&mut self, group: &[String]) {
        if let Engine::Process(e) = self {
            e.use_group(group)
        }
    }

    /// Stops whatever the engine holds (kills a worker process group).
    pub fn shutdown(&mut self) {
        if let Engine::Process(e) = self {
            e.shutdown()
        }
    }

    /// Stops a process worker and waits until its process group is gone
    /// ([`process::ProcessEngine::stop`]); `None` for the other engines or no worker.
    pub async fn stop(&mut self) -> Option<process::Stopped> {
        match self {
            Engine::Process(e) => e.stop().await,
            _ => None,
        }
    }
}

/// The bytes a slot's budget counts for a model, and where the figure comes from: a declared
/// figure wins (the operator's reservation covers a job's peak, which a figure measured between
/// jobs may not), else the measured one, else the estimate.
pub fn counted_bytes(declared: Option<u64>, measured: Option<u64>, estimate: u64) -> (u64, MemorySource) {
    match (declared, measured) {
        (Some(d), _) => (d, MemorySource::Declared),
        (None, Some(m)) => (m, MemorySource::Measured),
        (None, None) => (estimate, MemorySource::Estimated),
    }
}

/// Whether a slot's resident models changed enough to be written to the registry again: a
/// model came or went, or its figure moved by over 1/16. A resident set size moves a little
/// with every job; writing each wobble would cost a registry put per job.
pub fn resident_changed(old: &[ResidentModel], new: &[ResidentModel]) -> bool {
    old.len() != new.len()
        || old.iter().zip(new).any(|(a, b)| {
            a.model != b.model || a.source != b.source || a.pinned != b.pinned || a.bytes.abs_diff(b.bytes) > a.bytes.max(b.bytes) / 16
        })
}

/// A resident process worker, as the slot's memory budget counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidentWorker {
    pub model: String,
    /// Its model's `memory_bytes`.
    pub bytes: u64,
    /// When it last ran a job (a logical clock: larger is more recent).
    pub last_used: u64,
}

/// The workers to stop, least recently used first and no more than needed, so that a model of
/// `need` bytes fits in the slot's `budget` beside `fixed` bytes that cannot be freed this way
/// (the TorchScript modules). `Err` with the bytes that would still be missing when stopping
/// every one of them is not enough.
pub fn workers_to_stop(resident: &[ResidentWorker], fixed: u64, need: u64, budget: u64) -> Result<Vec<String>, u64> {
    let mut held: u64 = resident.iter().map(|w| w.bytes).sum();
    let mut by_age: Vec<&ResidentWorker> = resident.iter().collect();
    by_age.sort_by_key(|w| (w.last_used, w.model.clone()));
    let mut stop = Vec::new();
    for worker in by_age {
        if held + fixed + need <= budget {
            break;
        }
        held -= worker.bytes;
        stop.push(worker.model.clone());
    }
    match held + fixed + need {
        total if total <= budget => Ok(stop),
        total => Err(total - budget),
    }
}

#[cfg(feature = "torch")]
impl TorchEngine {
    pub async fn run(&self, job: EngineJob, progress: ProgressSink, cancel: CancellationToken) -> Result<Vec<EngineOutput>, EngineError> {
        let device = self.slot.torch_device()?;
        let slot = self.slot.torch.get_or_init(|| torchscript::TorchSlot::start(&self.slot, device)).clone();
        slot.run(&self.model, &self.spec, job, progress, cancel).await
    }

    fn is_loaded(&self) -> bool {
        self.slot.torch.get().is_some_and(|t| t.is_loaded(&self.model))
    }
}

/// A build without libtorch: config validation refuses TorchScript models, so this is reached
/// only by a config that skipped it.
#[cfg(not(feature = "torch"))]
impl TorchEngine {
    pub async fn run(
        &self,
        _job: EngineJob,
        _progress: ProgressSink,
        _cancel: CancellationToken,
    ) -> Result<Vec<EngineOutput>, EngineError> {
        Err(EngineError::ModelBroken(format!("model {}: {NO_TORCH}", self.model)))
    }

    fn is_loaded(&self) -> bool {
        false
    }
}

pub use crate::config::NO_TORCH;

#[cfg(test)]
mod residency_tests {
    use super::*;
    use proptest::prelude::*;

    fn worker(model: &str, bytes: u64, last_used: u64) -> ResidentWorker {
        ResidentWorker { model: model.into(), bytes, last_used }
    }

    #[test]
    fn the_least_recently_used_workers_go_first_and_no_more_than_needed() {
        let resident = [worker("a", 4, 3), worker("b", 4, 1), worker("c", 4, 2)];
        assert_eq!(workers_to_stop(&resident, 0, 4, 16), Ok(vec![]));
        assert_eq!(workers_to_stop(&resident, 0, 4, 12), Ok(vec!["b".to_string()]));
        assert_eq!(workers_to_stop(&resident, 2, 4, 12), Ok(vec!["b".to_string(), "c".to_string()]));
        assert_eq!(workers_to_stop(&resident, 10, 4, 12), Err(2), "TorchScript modules are not stopped here");
    }

    #[test]
    fn a_declared_figure_wins_then_the_measured_one_then_the_estimate() {
        assert_eq!(counted_bytes(Some(5), Some(9), 7), (5, MemorySource::Declared));
        assert_eq!(counted_bytes(None, Some(9), 7), (9, MemorySource::Measured));
        assert_eq!(counted_bytes(None, None, 7), (7, MemorySource::Estimated));
    }

    #[test]
    fn a_resident_set_is_rewritten_when_a_model_comes_or_goes_or_its_figure_moves_much() {
        let r = |model: &str, bytes: u64| ResidentModel {
            model: model.into(),
            bytes,
            source: MemorySource::Measured,
            measured_bytes: Some(bytes),
            pinned: false,
        };
        assert!(!resident_changed(&[r("a", 1600)], &[r("a", 1650)]), "a wobble");
        assert!(resident_changed(&[r("a", 1600)], &[r("a", 1800)]));
        assert!(resident_changed(&[r("a", 1600)], &[r("a", 1600), r("b", 1)]));
        assert!(resident_changed(&[r("a", 1600)], &[r("b", 1600)]));
        assert!(!resident_changed(&[], &[]));
    }

    proptest! {
        /// Whatever is resident, a plan fits the budget, stops the oldest first, and stops none
        /// that was not needed; a refusal means even stopping all would not fit.
        #[test]
        fn a_plan_fits_and_is_minimal(
            sizes in proptest::collection::vec((1u64..100, 0u64..50), 0..6),
            fixed in 0u64..100,
            need in 0u64..100,
            budget in 0u64..400,
        ) {
            let resident: Vec<ResidentWorker> = sizes.iter().enumerate().map(|(i, (b, t))| worker(&format!("m{i}"), *b, *t)).collect();
            match workers_to_stop(&resident, fixed, need, budget) {
                Ok(stop) => {
                    let kept: u64 = resident.iter().filter(|w| !stop.contains(&w.model)).map(|w| w.bytes).sum();
                    prop_assert!(kept + fixed + need <= budget);
                    if let Some(last) = stop.last() {
                        let last = resident.iter().find(|w| &w.model == last).unwrap();
                        prop_assert!(kept + last.bytes + fixed + need > budget, "the last one stopped was needed");
                        let oldest_kept = resident.iter().filter(|w| !stop.contains(&w.model)).map(|w| w.last_used).min();
                        prop_assert!(oldest_kept.is_none_or(|t| t >= last.last_used), "older workers go first");
                    }
                }
                Err(missing) => {
                    prop_assert!(fixed + need > budget, "refused only when nothing but the model itself fits");
                    prop_assert_eq!(missing, fixed + need - budget);
                }
            }
        }
    }
}

/// The retry reasons are read from the messages these errors display (kiln-contract's
/// `retry_reason`): each kind keeps its reason.
#[cfg(test)]
mod retry_reason_tests {
    use super::*;
    use crate::job::{JobRecord, JobState, Owner};
    use crate::protocol::{ApiError, ErrorCode};
    use crate::retry_reason;

    #[test]
    fn each_engine_failure_names_its_retry_reason() {
        let cases = [
            (
                EngineError::WorkerDied("worker process 42 exited (exit status: 3)".into()),
                kiln_contract::protocol::RetryReason::WorkerCrashed,
            ),
            (EngineError::WorkerDied(retry_reason::SLOT_STOPPED.into()), kiln_contract::protocol::RetryReason::SlotRestarted),
            (EngineError::Timeout(5_000), kiln_contract::protocol::RetryReason::Timeout),
            (EngineError::Load("no such file".into()), kiln_contract::protocol::RetryReason::LoadFailed),
            (EngineError::Infra("CUDA out of memory".into()), kiln_contract::protocol::RetryReason::EngineFailed),
        ];
        for (error, reason) in cases {
            let mut r = JobRecord { state: JobState::Retrying, attempt: 1, started_ms: Some(1_000), ..JobRecord::queued("j", "m", 3, 0) };
            r.owner = Some(Owner { node: "gpu-a".into(), slot: "cuda:0".into() });
            r.error = Some(ApiError::new(ErrorCode::EngineFailed, error.to_string()));
            let (got, message) = retry_reason::why_next_attempt(&r, retry_reason::OwnerLife::Unknown).expect("a retry");
            assert_eq!(got, reason, "{message}");
            assert!(message.starts_with("attempt 1 failed on gpu-a (cuda:0): "), "{message}");
        }
        assert_eq!(retry_reason::failure_reason(None), kiln_contract::protocol::RetryReason::EngineFailed);
    }
}
