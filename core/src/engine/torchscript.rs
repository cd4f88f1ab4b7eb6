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
use std::sync::{Arc, Mutex};

use tch::{CModule, Device, IValue};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::codecs::{self, OutputCodec};
use super::{EngineError, EngineJob, EngineOutput, ProgressSink, ProgressUpdate};

// The specs are configuration (`[[models]]` names them), defined beside the rest of it.
pub use super::torch_spec::TorchModel;
pub use crate::config::{InputSpec, OutputSpec, ParamSpec};

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// The slot's torch thread and what it has loaded (readable without asking the thread).
pub struct TorchSlot {
    commands: std::sync::mpsc::Sender<Pending>,
    loaded: Arc<Mutex<BTreeSet<String>>>,
}

impl TorchSlot {
    /// Starts the slot's thread. `device` is the slot's (`Device::Cuda(n)` or `Device::Cpu`).
    pub fn start(slot: &super::SlotContext, device: Device) -> Arc<TorchSlot> {
        let (tx, rx) = std::sync::mpsc::channel::<Pending>();
        let loaded = Arc::new(Mutex::new(BTreeSet::new()));
        let mut worker = SlotThread {
            device,
            budget_bytes: slot.memory_bytes,
            process_bytes: slot.process_bytes.clone(),
            torch_bytes: slot.torch_bytes.clone(),
            models: HashMap::new(),
            clock: 0,
            passes: 0,
            loaded: loaded.clone(),
        };
        std::thread::Builder::new().name(format!("torch-{}", slot.slot)).spawn(move || worker.serve(rx)).expect("spawn torch thread");
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
        let cmd = Pending { model: model.to_string(), spec: Box::new(spec.clone()), job: Box::new(job), progress, cancel, reply };
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

/// One job sent to (and waiting on) the torch thread.
struct Pending {
    model: String,
    spec: Box<TorchModel>,
    job: Box<EngineJob>,
    progress: ProgressSink,
    cancel: CancellationToken,
    reply: Reply<Vec<EngineOutput>>,
}

/// One job of a batch being run (its reply stays with the caller).
struct BatchJob {
    model: String,
    spec: Box<TorchModel>,
    job: Box<EngineJob>,
    progress: ProgressSink,
    cancel: CancellationToken,
}

struct SlotThread {
    device: Device,
    budget_bytes: u64,
    /// What the slot's process workers hold: the modules fit in the rest of the budget.
    process_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// What the modules hold, published for the process side.
    torch_bytes: Arc<std::sync::atomic::AtomicU64>,
    models: HashMap<String, Loaded>,
    /// Logical clock for least-recently-used eviction.
    clock: u64,
    /// Forward passes run so far (a batch is one), reported in progress messages.
    passes: u64,
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
    // CUDA says "out of memory"; the CPU allocator says "can't allocate memory".
    if msg.contains("out of memory") || msg.contains("OutOfMemory") || msg.contains("can't allocate memory") {
        EngineError::Infra(format!("{context}: out of memory: {first}"))
    } else {
        EngineError::User(format!("{context}: {first}"))
    }
}

impl SlotThread {
    /// The thread's loop. Jobs run one at a time, except that jobs of a batching model that
    /// arrive within its `max_batch_delay` (up to `max_batch`) run as one forward pass. The
    /// channel is unbounded, but the dispatcher never sends a slot more jobs than that.
    fn serve(&mut self, rx: std::sync::mpsc::Receiver<Pending>) {
        let mut waiting: std::collections::VecDeque<Pending> = Default::default();
        loop {
            let first = match waiting.pop_front() {
                Some(p) => p,
                None => match rx.recv() {
                    Ok(p) => p,
                    Err(_) => return, // every engine of the slot is gone
                },
            };
            let (max, delay) = (first.spec.max_batch, first.spec.max_batch_delay);
            let mut batch = vec![first];
            if max > 1 {
                let mut others = std::collections::VecDeque::new();
                for p in waiting.drain(..) {
                    if batch.len() < max && p.model == batch[0].model {
                        batch.push(p);
                    } else {
                        others.push_back(p);
                    }
                }
                waiting = others;
                let deadline = std::time::Instant::now() + delay;
                while batch.len() < max {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(p) => {
                            if p.model == batch[0].model {
                                batch.push(p);
                            } else {
                                waiting.push_back(p);
                            }
                        }
                        Err(_) => break, // the delay passed (or the channel closed)
                    }
                }
            }
            self.handle(batch);
        }
    }

    /// Runs a batch (often of one), catching a panic: every job of it then gets a dead-worker
    /// error, which restarts the slot.
    fn handle(&mut self, batch: Vec<Pending>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut jobs = Vec::with_capacity(batch.len());
        for p in batch {
            replies.push(p.reply);
            jobs.push(BatchJob { model: p.model, spec: p.spec, job: p.job, progress: p.progress, cancel: p.cancel });
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::fault::panic_at("panic_in_engine_thread");
            self.run_batch(&jobs)
        }));
        let results = outcome.unwrap_or_else(|panic| {
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            // The module may be half-way through anything: drop them all.
            self.models.clear();
            self.publish_loaded();
            jobs.iter().map(|_| Err(EngineError::WorkerDied(format!("the engine thread panicked: {msg}")))).collect()
        });
        // Out of memory: free what the slot holds (every resident module and its buffers) so
        // that the retry, here or elsewhere, starts from an empty device. tch 0.24 has no call
        // to empty CUDA's caching allocator; dropping the modules is what it allows.
        if results.iter().any(|r| matches!(r, Err(EngineError::Infra(m)) if m.contains("out of memory"))) {
            tracing::warn!(models = self.models.len(), "out of memory: unloading every model of the slot");
            self.models.clear();
            self.publish_loaded();
        }
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }

    /// The configured inputs then params of one job, as Torch values on `device`.
    fn arguments(spec: &TorchModel, job: &EngineJob, device: Device) -> Result<Vec<IValue>, EngineError> {
        let mut args = Vec::with_capacity(spec.inputs.len() + spec.params.len());
        for input in &spec.inputs {
            let v = codecs::input_value(&input.name, input.kind, job.inputs.get(&input.name))?;
            args.push(to_device(v, device));
        }
        for param in &spec.params {
            args.push(codecs::param_value(&param.name, param.kind, job.record.params.get(&param.name).or(param.default.as_ref()))?);
        }
        Ok(args)
    }

    fn one_by_one(&mut self, jobs: &[BatchJob]) -> Vec<Result<Vec<EngineOutput>, EngineError>> {
        jobs.iter().map(|b| self.run(&b.model, &b.spec, &b.job, &b.progress, &b.cancel)).collect()
    }

    /// Runs jobs of one model: as one forward pass when it can (a plain model, tensor inputs,
    /// equal params, stackable shapes), else one by one. A batch that Torch rejects is re-run
    /// one by one, so each job gets its own outcome and one bad input fails only its own job.
    fn run_batch(&mut self, jobs: &[BatchJob]) -> Vec<Result<Vec<EngineOutput>, EngineError>> {
        if jobs.len() == 1 {
            return self.one_by_one(jobs);
        }
        let (model, spec) = (jobs[0].model.as_str(), &jobs[0].spec);
        if !self.models.contains_key(model) {
            for b in jobs {
                let _ = b.progress.blocking_send(ProgressUpdate::Progress {
                    stage: Some("loading".into()),
                    progress: Some(0.0),
                    message: None,
                });
            }
        }
        if let Err(e) = self.ensure_loaded(model, spec) {
            return jobs.iter().map(|_| Err(e.clone())).collect();
        }
        let device = if spec.cpu_only { Device::Cpu } else { self.device };
        let stepwise = self.models.get(model).is_some_and(|m| m.stepwise);
        let params_of =
            |j: &EngineJob| spec.params.iter().map(|p| j.record.params.get(&p.name).or(p.default.as_ref()).cloned()).collect::<Vec<_>>();
        let args: Vec<Result<Vec<IValue>, EngineError>> = jobs.iter().map(|b| Self::arguments(spec, &b.job, device)).collect();
        let tensors_only = |a: &Result<Vec<IValue>, EngineError>| {
            a.as_ref().is_ok_and(|a| a[..spec.inputs.len()].iter().all(|v| matches!(v, IValue::Tensor(_))))
        };
        let same_params = jobs.iter().all(|b| params_of(&b.job) == params_of(&jobs[0].job));
        if stepwise
            || spec.inputs.is_empty()
            || !same_params
            || !args.iter().all(tensors_only)
            || jobs.iter().any(|b| b.cancel.is_cancelled())
        {
            return self.one_by_one(jobs);
        }
        let args: Vec<Vec<IValue>> = args.into_iter().map(|a| a.expect("checked above")).collect();
        let tensor = |v: &IValue| match v {
            IValue::Tensor(t) => t.shallow_clone(),
            _ => unreachable!("checked tensor inputs"),
        };
        let sizes: Vec<i64> = args.iter().map(|a| tensor(&a[0]).size().first().copied().unwrap_or(1)).collect();
        let mut stacked = Vec::with_capacity(args[0].len());
        for i in 0..spec.inputs.len() {
            let parts: Vec<tch::Tensor> = args.iter().map(|a| tensor(&a[i])).collect();
            match tch::Tensor::f_cat(&parts, 0) {
                Ok(t) => stacked.push(IValue::Tensor(t)),
                Err(_) => return self.one_by_one(jobs), // shapes that do not stack: no batch
            }
        }
        stacked.extend(args[0][spec.inputs.len()..].iter().map(clone_ivalue));
        self.passes += 1;
        let pass = self.passes;
        for b in jobs {
            let msg = format!("forward pass #{pass}, batch of {}", jobs.len());
            let _ = b.progress.blocking_send(ProgressUpdate::Progress {
                stage: Some("forward".into()),
                progress: Some(0.0),
                message: Some(msg),
            });
        }
        let loaded = self.models.get(model).expect("loaded above");
        let output = {
            let _guard = tch::no_grad_guard();
            loaded.module.forward_is(&stacked)
        };
        let Ok(named) = output.map_err(|_| ()).and_then(|o| codecs::named_outputs(o).map_err(|_| ())) else {
            return self.one_by_one(jobs);
        };
        let total: i64 = sizes.iter().sum();
        let mut per_job: Vec<Vec<(String, tch::Tensor)>> = jobs.iter().map(|_| vec![]).collect();
        for (name, t) in named {
            if t.size().first() != Some(&total) {
                return self.one_by_one(jobs); // an output without the batch dimension
            }
            let Ok(parts) = t.f_split_with_sizes(sizes.as_slice(), 0) else { return self.one_by_one(jobs) };
            for (k, part) in parts.into_iter().enumerate() {
                per_job[k].push((name.clone(), part));
            }
        }
        jobs.iter()
            .zip(per_job)
            .map(|(b, outputs)| {
                let _ = b.progress.blocking_send(ProgressUpdate::Progress {
                    stage: Some("encoding".into()),
                    progress: Some(100.0),
                    message: None,
                });
                write_outputs(outputs, &b.spec, &b.job.output_dir)
            })
            .collect()
    }

    fn publish_loaded(&self) {
        if let Ok(mut l) = self.loaded.lock() {
            *l = self.models.keys().cloned().collect();
        }
        self.torch_bytes.store(self.models.values().map(|m| m.bytes).sum(), std::sync::atomic::Ordering::Release);
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
        // Process workers' share is freed by the inference actor before a job of a model that
        // is not resident comes here; what they still hold is not ours to take.
        let budget = self.budget_bytes.saturating_sub(self.process_bytes.load(std::sync::atomic::Ordering::Acquire));
        while self.models.values().map(|m| m.bytes).sum::<u64>() + spec.memory_bytes > budget {
            let Some(lru) = self.models.iter().min_by_key(|(_, m)| m.last_used).map(|(k, _)| k.clone()) else {
                return Err(EngineError::Load(format!(
                    "model needs {} bytes; the slot's process workers leave {budget} of its {}",
                    spec.memory_bytes, self.budget_bytes
                )));
            };
            tracing::info!(model = %lru, "evicting least recently used model to fit {model}");
            self.models.remove(&lru);
            self.publish_loaded();
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
        let args = Self::arguments(spec, job, device)?;
        self.passes += 1;
        let pass = self.passes;
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
            let msg = format!("forward pass #{pass}, batch of 1");
            let _ =
                progress.blocking_send(ProgressUpdate::Progress { stage: Some("forward".into()), progress: Some(0.0), message: Some(msg) });
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
