//! The `torchscript` engine: PyTorch models exported as TorchScript, run in process through
//! tch on the slot's device (`cuda:N`, or the CPU on a `cpu:N` slot).
//!
//! Every slot has one [`TorchSlot`]: a dedicated OS thread that owns the slot's loaded modules,
//! so forward passes never run on the async runtime. The engines of the slot's models send it
//! commands and await the replies. The thread:
//! - loads a model on its first job and keeps it resident, evicting the least recently used
//!   models when the slot's memory budget (bytes, from each model's estimate) would be exceeded;
//! - runs plain models with `forward(*args)`, and step-wise models (`num_steps`, `init`, `step`,
//!   `decode`) one step at a time, reporting progress after each step and stopping between
//!   steps when the job is cancelled;
//! - catches a panic in any command and answers it as a dead worker, which restarts the slot.
//!
//! Arguments are the model's configured inputs then its configured params, in config order
//! (see `examples/models/README.md` for the conventions fixture models follow).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tch::{CModule, Device, IValue};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::codecs::{self, InputKind, OutputCodec, ParamKind};
use super::{EngineError, EngineJob, EngineOutput, ProgressSink, ProgressUpdate};

/// One input of a TorchScript model, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub kind: InputKind,
}

/// One scalar param of a TorchScript model, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    #[serde(default)]
    pub default: Option<serde_json::Value>,
}

/// How one named output becomes a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The output's name (a dict key, `output`, or `output_N`); for `ply`, the file name.
    pub name: String,
    pub codec: OutputCodec,
}

/// A TorchScript model's settings (`engine = { kind = "torchscript", ... }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorchModel {
    pub path: PathBuf,
    pub inputs: Vec<InputSpec>,
    pub params: Vec<ParamSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Resident size estimate; eviction keeps the slot under its budget by this number.
    pub memory_bytes: u64,
    /// `cpu` pins the model to the CPU even on a GPU slot.
    pub cpu_only: bool,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Command {
    Run {
        model: String,
        spec: Box<TorchModel>,
        job: Box<EngineJob>,
        progress: ProgressSink,
        cancel: CancellationToken,
        reply: Reply<Vec<EngineOutput>>,
    },
}

/// The slot's torch thread and what it has loaded (readable without asking the thread).
pub struct TorchSlot {
    commands: std::sync::mpsc::Sender<Command>,
    loaded: Arc<Mutex<BTreeSet<String>>>,
}

impl TorchSlot {
    /// Starts the slot's thread. `device` is the slot's (`Device::Cuda(n)` or `Device::Cpu`).
    pub fn start(slot: &str, device: Device, budget_bytes: u64) -> Arc<TorchSlot> {
        let (tx, rx) = std::sync::mpsc::channel::<Command>();
        let loaded = Arc::new(Mutex::new(BTreeSet::new()));
        let mut worker = SlotThread { device, budget_bytes, models: HashMap::new(), clock: 0, loaded: loaded.clone() };
        std::thread::Builder::new()
            .name(format!("torch-{slot}"))
            .spawn(move || {
                // Commands come one at a time: the slot runs one job (or batch) at a time. The
                // channel is unbounded, but the dispatcher never sends a slot more than one job.
                while let Ok(cmd) = rx.recv() {
                    worker.handle(cmd);
                }
            })
            .expect("spawn torch thread");
        Arc::new(TorchSlot { commands: tx, loaded })
    }

    pub fn is_loaded(&self, model: &str) -> bool {
        self.loaded.lock().map(|l| l.contains(model)).unwrap_or(false)
    }

    pub async fn run(
        &self,
        model: &str,
        spec: &TorchModel,
        job: EngineJob,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Vec<EngineOutput>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Run { model: model.to_string(), spec: Box::new(spec.clone()), job: Box::new(job), progress, cancel, reply };
        self.commands.send(cmd).map_err(|_| EngineError::WorkerDied("the torch thread is gone".into()))?;
        rx.await.map_err(|_| EngineError::WorkerDied("the torch thread dropped the job".into()))?
    }
}

struct Loaded {
    module: CModule,
    bytes: u64,
    last_used: u64,
    stepwise: bool,
}

struct SlotThread {
    device: Device,
    budget_bytes: u64,
    models: HashMap<String, Loaded>,
    /// Logical clock for least-recently-used eviction.
    clock: u64,
    loaded: Arc<Mutex<BTreeSet<String>>>,
}

/// Torch's own message, classified: running out of memory is the infrastructure's problem
/// (retry, after freeing what we can); anything else Torch rejects is the input's (a shape or
/// type mismatch), so retrying cannot help.
fn torch_error(context: &str, e: tch::TchError) -> EngineError {
    let msg = e.to_string();
    // A TorchScript failure starts with a generic line ("The following operation failed in the
    // TorchScript interpreter") and a traceback; the cause is the `...Error: ...` line.
    let cause = msg.lines().map(str::trim).rfind(|l| l.contains("Error: "));
    let first = cause.or_else(|| msg.lines().map(str::trim).find(|l| !l.is_empty())).unwrap_or(&msg).to_string();
    if msg.contains("out of memory") || msg.contains("OutOfMemory") {
        EngineError::Infra(format!("{context}: out of memory: {first}"))
    } else {
        EngineError::User(format!("{context}: {first}"))
    }
}

impl SlotThread {
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Run { model, spec, job, progress, cancel, reply } => {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::fault::panic_at("panic_in_engine_thread");
                    self.run(&model, &spec, &job, &progress, &cancel)
                }));
                let result = result.unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    // The module may be half-way through anything: drop them all.
                    self.models.clear();
                    self.publish_loaded();
                    Err(EngineError::WorkerDied(format!("the engine thread panicked: {msg}")))
                });
                let _ = reply.send(result);
            }
        }
    }

    fn publish_loaded(&self) {
        if let Ok(mut l) = self.loaded.lock() {
            *l = self.models.keys().cloned().collect();
        }
    }

    fn ensure_loaded(&mut self, model: &str, spec: &TorchModel) -> Result<(), EngineError> {
        self.clock += 1;
        if let Some(m) = self.models.get_mut(model) {
            m.last_used = self.clock;
            return Ok(());
        }
        if spec.memory_bytes > self.budget_bytes {
            return Err(EngineError::ModelBroken(format!(
                "model needs {} bytes; the slot's budget is {}",
                spec.memory_bytes, self.budget_bytes
            )));
        }
        while self.models.values().map(|m| m.bytes).sum::<u64>() + spec.memory_bytes > self.budget_bytes {
            let lru =
                self.models.iter().min_by_key(|(_, m)| m.last_used).map(|(k, _)| k.clone()).expect("over budget means something is loaded");
            tracing::info!(model = %lru, "evicting least recently used model to fit {model}");
            self.models.remove(&lru);
        }
        let device = if spec.cpu_only { Device::Cpu } else { self.device };
        if !spec.path.is_file() {
            return Err(EngineError::ModelBroken(format!("model file {} does not exist", spec.path.display())));
        }
        let mut module = CModule::load_on_device(&spec.path, device).map_err(|e| {
            EngineError::ModelBroken(format!(
                "cannot load {} as TorchScript: {}",
                spec.path.display(),
                e.to_string().lines().next().unwrap_or("")
            ))
        })?;
        module.set_eval();
        let stepwise = ["num_steps", "init", "step", "decode"].iter().all(|m| module_has_method(&module, m));
        tracing::info!(model, device = ?device, stepwise, bytes = spec.memory_bytes, "model loaded");
        self.models.insert(model.to_string(), Loaded { module, bytes: spec.memory_bytes, last_used: self.clock, stepwise });
        self.publish_loaded();
        Ok(())
    }

    fn run(
        &mut self,
        model: &str,
        spec: &TorchModel,
        job: &EngineJob,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Vec<EngineOutput>, EngineError> {
        if !self.models.contains_key(model) {
            let _ = progress.blocking_send(ProgressUpdate::Progress { stage: Some("loading".into()), progress: Some(0.0), message: None });
        }
        self.ensure_loaded(model, spec)?;
        let device = if spec.cpu_only { Device::Cpu } else { self.device };
        let mut args = Vec::with_capacity(spec.inputs.len() + spec.params.len());
        for input in &spec.inputs {
            let v = codecs::input_value(&input.name, input.kind, job.inputs.get(&input.name))?;
            args.push(to_device(v, device));
        }
        for param in &spec.params {
            args.push(codecs::param_value(&param.name, param.kind, job.params.get(&param.name).or(param.default.as_ref()))?);
        }
        let loaded = self.models.get(model).expect("loaded above");
        let _guard = tch::no_grad_guard();
        let output = if loaded.stepwise {
            let n = match loaded.module.method_is("num_steps", &args).map_err(|e| torch_error("num_steps", e))? {
                IValue::Int(n) if n >= 0 => n,
                other => return Err(EngineError::User(format!("num_steps returned {other:?}, not a count"))),
            };
            let mut state = loaded.module.method_is("init", &args).map_err(|e| torch_error("init", e))?;
            for i in 0..n {
                if cancel.is_cancelled() {
                    return Err(EngineError::Cancelled);
                }
                let mut step_args = vec![state, IValue::Int(i)];
                step_args.extend(args.iter().map(clone_ivalue));
                state = loaded.module.method_is("step", &step_args).map_err(|e| torch_error(&format!("step {i}"), e))?;
                let pct = (i + 1) as f32 * 100.0 / n.max(1) as f32;
                let _ = progress.blocking_send(ProgressUpdate::Progress {
                    stage: Some("sampling".into()),
                    progress: Some(pct),
                    message: Some(format!("step {}/{n}", i + 1)),
                });
            }
            let mut decode_args = vec![state];
            decode_args.extend(args.iter().map(clone_ivalue));
            loaded.module.method_is("decode", &decode_args).map_err(|e| torch_error("decode", e))?
        } else {
            let _ = progress.blocking_send(ProgressUpdate::Progress { stage: Some("forward".into()), progress: Some(0.0), message: None });
            loaded.module.forward_is(&args).map_err(|e| torch_error("forward", e))?
        };
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let _ = progress.blocking_send(ProgressUpdate::Progress { stage: Some("encoding".into()), progress: Some(100.0), message: None });
        write_outputs(codecs::named_outputs(output)?, spec, &job.output_dir)
    }
}

/// Whether a TorchScript module defines `method`. tch has no reflection call, so call it with
/// no arguments: a missing method says so, an existing one complains about its arguments.
fn module_has_method(module: &CModule, method: &str) -> bool {
    match module.method_is::<IValue>(method, &[]) {
        Ok(_) => true,
        Err(e) => {
            let msg = e.to_string();
            !(msg.contains("not defined") || msg.contains("does not have") || msg.contains("Method '") && msg.contains("not"))
        }
    }
}

fn clone_ivalue(v: &IValue) -> IValue {
    match v {
        IValue::Tensor(t) => IValue::Tensor(t.shallow_clone()),
        IValue::Int(i) => IValue::Int(*i),
        IValue::Double(d) => IValue::Double(*d),
        IValue::Bool(b) => IValue::Bool(*b),
        IValue::String(s) => IValue::String(s.clone()),
        other => panic!("unexpected argument kind {other:?}"),
    }
}

fn to_device(v: IValue, device: Device) -> IValue {
    match v {
        IValue::Tensor(t) => IValue::Tensor(t.to_device(device)),
        other => other,
    }
}

fn write_outputs(outputs: Vec<(String, tch::Tensor)>, spec: &TorchModel, dir: &std::path::Path) -> Result<Vec<EngineOutput>, EngineError> {
    let mut files = vec![];
    let mut consumed = BTreeSet::new();
    for out in spec.outputs.iter().filter(|o| o.codec == OutputCodec::Ply) {
        let path = dir.join(&out.name);
        codecs::write_ply(&outputs, &path)?;
        consumed.extend(codecs::GAUSSIAN_KEYS.iter().map(|k| k.to_string()));
        files.push(EngineOutput { name: out.name.clone(), path, content_type: Some(OutputCodec::Ply.content_type().into()) });
    }
    for (name, tensor) in &outputs {
        if consumed.contains(name) {
            continue;
        }
        let codec = spec.outputs.iter().find(|o| &o.name == name).map(|o| o.codec).unwrap_or(OutputCodec::Npy);
        let file = format!("{name}.{}", codec.extension());
        let path = dir.join(&file);
        codecs::write_tensor(tensor, codec, &path)?;
        files.push(EngineOutput { name: file, path, content_type: Some(codec.content_type().into()) });
    }
    Ok(files)
}
