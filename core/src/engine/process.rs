//! The `process` engine: hosts an existing model (usually Python) as one long-lived worker
//! process per slot and model, loaded once and kept resident, speaking JSON lines.
//!
//! Kiln writes to the worker's stdin:
//! ```text
//! {"type":"job","job_id":"..","attempt":1,"inputs":{"prompt":"a cat","image":{"path":"/abs/in.png"}},
//!  "params":{"steps":20},"output_dir":"/abs/dir"}
//! {"type":"cancel","job_id":".."}
//! ```
//! The worker writes to its stdout (any line that is not JSON is kept as a log line):
//! ```text
//! {"type":"memory","bytes":1073741824}                   optional, before ready: its GPU memory
//! {"type":"ready"}                                        once, after loading its model
//! {"type":"progress","job_id":"..","stage":"inference","progress":40,"message":"step 8/20"}
//! {"type":"log","job_id":"..","message":".."}
//! {"type":"result","job_id":"..","artifacts":[{"name":"image.png","path":"image.png","content_type":"image/png"}]}
//! {"type":"error","job_id":"..","message":"..","retryable":false}
//! {"type":"cancelled","job_id":".."}
//! {"type":"preview","job_id":"..","content_type":"image/png","data":"<base64>"}
//! ```
//! A job line also carries the W3C `traceparent` (and `tracestate`) of the node's `kiln.run`
//! span when the job has a trace: the worker's own spans are its children (the SDK puts it in
//! `TRACEPARENT` while the handler runs). A node that exports spans hands its collector to the
//! worker as `OTEL_EXPORTER_OTLP_ENDPOINT` unless the model's `env` sets one.
//!
//! A preview is let through at most once per the model's `preview_interval_ms` (the job line
//! tells the worker that figure) and up to `MAX_PREVIEW_BYTES` decoded; the rest are dropped
//! here, so a worker that floods cannot flood its followers.
//!
//! The worker runs in its own process group with `CUDA_VISIBLE_DEVICES` set to its slot's GPU
//! (empty on a `cpu:N` slot), and the whole group is killed when the engine drops, so a crashed
//! or cancelled worker leaves no orphans. A model of several GPUs (`gpus = N`) runs on the
//! primary slot of a group of N: its worker sees every GPU of the group (`"0,1"`), `KILN_SLOT`
//! names the primary and `KILN_SLOTS` every slot of the group, comma-joined (just `KILN_SLOT`
//! for a one-slot model). A job held by another group than the worker's restarts the worker.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{EngineError, EngineJob, EngineOutput, ProgressSink, ProgressUpdate, ResolvedInput, SlotContext};
use crate::config::{parse_slot, SlotDevice};

/// How long a worker gets to acknowledge a cancel before its process group is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(3);
/// Lines of stderr kept to explain a crash.
const STDERR_TAIL_LINES: usize = 20;
/// Bound of the stdout line channel: the reader blocks (and so does the worker's stdout pipe)
/// rather than buffering a runaway worker's output.
const LINE_CHANNEL_BOUND: usize = 1024;
/// Longest stdout line accepted; a longer one is a protocol error (and a memory bound).
const MAX_LINE_BYTES: usize = 1024 * 1024;

// The lines themselves are the contract's (`kiln_contract::worker`): the Python SDK and any
// other worker read the same types' documentation.
use crate::worker::{FromWorker as WorkerLine, ToWorker, WorkerArtifact, WorkerJob};

/// What the stdout reader hands over: a parsed line, or raw text.
enum Line {
    Parsed(WorkerLine),
    Raw(String),
    /// The worker wrote a line over [`MAX_LINE_BYTES`]; nothing more is read from it.
    TooLong,
}

/// Why a worker that broke the line limit is stopped. (It used to read as "worker process N
/// exited (did not exit)": the reader stopped and the worker, still alive, was asked why.)
fn too_long(pid: u32) -> String {
    format!("worker process {pid} wrote a line over {MAX_LINE_BYTES} bytes, the worker protocol's limit (put big data in a file and name it in an artifact); it was stopped")
}

struct Worker {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Line>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The last `memory` line's bytes (its GPU memory, as the worker sees it).
    reported_bytes: Option<u64>,
}

impl Worker {
    fn stderr_tail(&self) -> String {
        self.stderr_tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    fn kill_group(&self) {
        // The worker leads its own process group (process_group(0)), so this reaches any
        // helper processes it spawned too.
        unsafe { libc::killpg(self.pid as i32, libc::SIGKILL) };
    }

    /// Why the worker is gone: its exit status and the end of its stderr.
    async fn death_reason(&mut self) -> String {
        let status = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
        let status = match status {
            Ok(Ok(s)) => s.to_string(),
            _ => "did not exit".into(),
        };
        let tail = self.stderr_tail();
        if tail.is_empty() {
            format!("worker process {} exited ({status})", self.pid)
        } else {
            format!("worker process {} exited ({status}); stderr: {tail}", self.pid)
        }
    }

    async fn send(&mut self, value: &ToWorker) -> Result<(), EngineError> {
        let mut line = serde_json::to_vec(value).expect("json");
        line.push(b'\n');
        self.stdin.write_all(&line).await.map_err(|e| EngineError::WorkerDied(format!("cannot write to worker {}: {e}", self.pid)))?;
        self.stdin.flush().await.map_err(|e| EngineError::WorkerDied(format!("cannot write to worker {}: {e}", self.pid)))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill_group();
    }
}

pub struct ProcessEngine {
    model: String,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    ready_timeout: Duration,
    slot: SlotContext,
    /// The worker's working directory (`cwd` of the model's engine); `None`: the node's.
    cwd: Option<String>,
    /// The slots the worker is (to be) started on, its own first: more than one for a model
    /// of several GPUs.
    group: Vec<String>,
    /// The model's `preview_interval_ms` (0: previews are dropped).
    preview_interval_ms: u64,
    worker: Option<Worker>,
}

/// `CUDA_VISIBLE_DEVICES` for a worker holding `slots`: the device indices of its `cuda:N`
/// slots, comma-joined in the group's order (`cuda:0` + `cuda:1`: `"0,1"`); empty when it holds
/// no GPU (`cpu:N` slots), so a worker never picks up a GPU it was not given.
pub fn cuda_visible_devices(slots: &[String]) -> String {
    slots
        .iter()
        .filter_map(|s| match parse_slot(s) {
            Some(SlotDevice::Cuda(i)) => Some(i.to_string()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl ProcessEngine {
    pub fn new(model: &str, command: Vec<String>, env: BTreeMap<String, String>, ready_timeout_ms: u64, slot: &SlotContext) -> Self {
        ProcessEngine {
            model: model.to_string(),
            command,
            env,
            ready_timeout: Duration::from_millis(ready_timeout_ms),
            slot: slot.clone(),
            cwd: None,
            group: vec![slot.slot.clone()],
            preview_interval_ms: crate::preview::DEFAULT_PREVIEW_INTERVAL_MS,
            worker: None,
        }
    }

    /// The same engine, letting a preview through at most once per `interval_ms` (0: never).
    pub fn previews_every(mut self, interval_ms: u64) -> Self {
        self.preview_interval_ms = interval_ms;
        self
    }

    /// The same engine, starting its worker in `cwd` (when set).
    pub fn in_dir(mut self, cwd: Option<String>) -> Self {
        self.cwd = cwd;
        self
    }

    pub fn is_loaded(&self) -> bool {
        self.worker.is_some()
    }

    pub fn shutdown(&mut self) {
        self.worker = None;
    }

    /// The next job holds `group` (empty: the engine's slot alone): a worker started for
    /// another group sees other devices, so it is stopped and starts again for this one.
    pub fn use_group(&mut self, group: &[String]) {
        let group = if group.is_empty() { std::slice::from_ref(&self.slot.slot) } else { group };
        if self.group != group {
            if self.worker.is_some() {
                tracing::info!(model = %self.model, from = ?self.group, to = ?group, "the job holds other slots than the worker's; restarting it");
            }
            self.worker = None;
            self.group = group.to_vec();
        }
    }

    /// The running worker's pid (its process group's id).
    pub fn pid(&self) -> Option<u32> {
        self.worker.as_ref().map(|w| w.pid)
    }

    /// What the worker holds now, if it can be known: on a `cpu:N` slot the resident bytes of
    /// its whole process group (read from /proc); on a `cuda:N` slot the GPU memory it last
    /// reported (a `memory` line), since its resident set says nothing of the GPU's memory.
    pub async fn measured_bytes(&self) -> Option<u64> {
        let worker = self.worker.as_ref()?;
        match parse_slot(&self.slot.slot) {
            Some(SlotDevice::Cuda(_)) => worker.reported_bytes,
            _ => Some(super::proc_mem::process_group_off_thread(worker.pid).await.1).filter(|b| *b > 0),
        }
    }

    /// Stops the worker and checks that its memory is given back: the whole process group is
    /// killed, the worker reaped, and /proc read until no process of the group is left (its
    /// helpers exit a moment after the signal). On a `cuda:N` slot, the GPU's free memory is
    /// read before and after (`nvidia-smi`, where there is one). `None` when no worker was
    /// running.
    pub async fn stop(&mut self) -> Option<Stopped> {
        let mut worker = self.worker.take()?;
        let pid = worker.pid;
        let gpu = match parse_slot(&self.slot.slot) {
            Some(SlotDevice::Cuda(i)) => Some(i),
            _ => None,
        };
        let gpu_free_before = match gpu {
            Some(i) => super::nvidia::free_bytes(i).await,
            None => None,
        };
        let (_, held_bytes) = super::proc_mem::process_group_off_thread(pid).await;
        worker.kill_group();
        let _ = tokio::time::timeout(Duration::from_secs(5), worker.child.wait()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let (left_processes, left_bytes) = loop {
            let (n, bytes) = super::proc_mem::process_group_off_thread(pid).await;
            if n == 0 || std::time::Instant::now() > deadline {
                break (n, bytes);
            }
            worker.kill_group();
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The driver frees a dead process's memory a moment after it exits.
        let mut gpu_freed_bytes = None;
        if let (Some(i), Some(before)) = (gpu, gpu_free_before) {
            for _ in 0..20 {
                let Some(after) = super::nvidia::free_bytes(i).await else { break };
                gpu_freed_bytes = Some(after as i64 - before as i64);
                if after > before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Some(Stopped { pid, held_bytes, left_processes, left_bytes, gpu_freed_bytes })
    }
}

/// What stopping a worker gave back ([`ProcessEngine::stop`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub pid: u32,
    /// The resident bytes of its process group just before the kill.
    pub held_bytes: u64,
    /// Processes of the group still alive after the wait (0: all gone), and what they hold.
    pub left_processes: usize,
    pub left_bytes: u64,
    /// On a `cuda:N` slot with `nvidia-smi`: how much the GPU's free memory grew.
    pub gpu_freed_bytes: Option<i64>,
}

impl ProcessEngine {
    fn spawn(&self) -> Result<Worker, EngineError> {
        let (program, args) = self.command.split_first().ok_or_else(|| EngineError::Load("empty command".into()))?;
        let cuda_visible = cuda_visible_devices(&self.group);
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(&self.env)
            .env("CUDA_VISIBLE_DEVICES", cuda_visible)
            .env("KILN_SLOT", &self.slot.slot)
            .env("KILN_SLOTS", self.group.join(","))
            .env("KILN_NODE", &self.slot.node)
            .env("KILN_MODEL", &self.model)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        // A node that exports spans tells its workers where to (the worker inherits the node's
        // environment, but `[telemetry] otlp_endpoint` is not in it); the model's own `env` wins.
        if let Some(endpoint) = crate::telemetry::worker_endpoint() {
            if !self.env.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT") {
                cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
            }
        }
        dies_with_the_node(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| EngineError::Load(format!("cannot start {program:?}: {e}")))?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");

        let (tx, lines) = mpsc::channel(LINE_CHANNEL_BOUND);
        crate::task::spawn(crate::task::TaskKind::ChildOutput, "worker stdout", read_stdout(stdout, tx));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let read = read_stderr(stderr, stderr_tail.clone(), self.model.clone(), self.slot.slot.clone());
        crate::task::spawn(crate::task::TaskKind::ChildOutput, "worker stderr", read);
        tracing::info!(model = %self.model, slot = %self.slot.slot, pid, "worker process started");
        Ok(Worker { child, pid, stdin, lines, stderr_tail, reported_bytes: None })
    }

    pub async fn ensure_loaded(&mut self) -> Result<(), EngineError> {
        if let Some(w) = self.worker.as_mut() {
            if matches!(w.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            self.worker = None;
        }
        let mut worker = self.spawn()?;
        let deadline = tokio::time::sleep(self.ready_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                line = worker.lines.recv() => match line {
                    Some(Line::Parsed(WorkerLine::Ready)) => break,
                    Some(Line::Parsed(WorkerLine::Memory { bytes })) => worker.reported_bytes = Some(bytes),
                    Some(Line::TooLong) => {
                        worker.kill_group();
                        return Err(EngineError::Load(too_long(worker.pid)));
                    }
                    Some(_) => continue,
                    None => return Err(EngineError::Load(worker.death_reason().await)),
                },
                _ = &mut deadline => {
                    return Err(EngineError::Load(format!("worker did not print ready within {:?}", self.ready_timeout)));
                }
            }
        }
        self.worker = Some(worker);
        Ok(())
    }

    pub async fn run(
        &mut self,
        job: EngineJob,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Vec<EngineOutput>, EngineError> {
        self.ensure_loaded().await?;
        let worker = self.worker.as_mut().expect("loaded above");
        let inputs: serde_json::Map<String, serde_json::Value> = job
            .inputs
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    ResolvedInput::Inline(v) => v.clone(),
                    ResolvedInput::File(p) => serde_json::json!({ "path": p }),
                };
                (k.clone(), v)
            })
            .collect();
        let request = ToWorker::Job(WorkerJob::new(&job.record, inputs, job.output_dir.clone(), self.preview_interval_ms));
        let mut previews = PreviewGate::new(self.preview_interval_ms);
        if let Err(e) = worker.send(&request).await {
            self.worker = None;
            return Err(e);
        }
        let mut cancelling: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let line = tokio::select! {
                line = worker.lines.recv() => line,
                _ = cancel.cancelled(), if cancelling.is_none() => {
                    let _ = worker.send(&ToWorker::Cancel { job_id: job.record.job_id.clone() }).await;
                    cancelling = Some(Box::pin(tokio::time::sleep(CANCEL_GRACE)));
                    continue;
                }
                _ = async { cancelling.as_mut().expect("guarded").await }, if cancelling.is_some() => {
                    tracing::warn!(job_id = %job.record.job_id, pid = worker.pid, "worker ignored cancel; killing it");
                    self.worker = None;
                    return Err(EngineError::Cancelled);
                }
            };
            let Some(line) = line else {
                let reason = worker.death_reason().await;
                self.worker = None;
                if cancelling.is_some() {
                    return Err(EngineError::Cancelled);
                }
                return Err(EngineError::WorkerDied(reason));
            };
            let line = match line {
                Line::Raw(text) => {
                    let _ = progress.send(ProgressUpdate::Message(text)).await;
                    continue;
                }
                Line::TooLong => {
                    let reason = too_long(worker.pid);
                    worker.kill_group();
                    self.worker = None;
                    return Err(EngineError::WorkerDied(reason));
                }
                Line::Parsed(l) => l,
            };
            let mine = |id: &Option<String>| id.as_deref().is_none_or(|i| i == job.record.job_id);
            match line {
                WorkerLine::Ready => {}
                WorkerLine::Memory { bytes } => worker.reported_bytes = Some(bytes),
                WorkerLine::Progress { job_id, stage, progress: pct, message } if mine(&job_id) => {
                    let pct = pct.map(|p| p.clamp(0.0, 100.0));
                    let _ = progress.send(ProgressUpdate::Progress { stage, progress: pct, message }).await;
                }
                WorkerLine::Log { job_id, message } if mine(&job_id) => {
                    let _ = progress.send(ProgressUpdate::Message(message)).await;
                }
                WorkerLine::Preview { job_id, content_type, data } if mine(&job_id) => {
                    if let Some(update) = previews.admit(content_type, &data, &job.record.job_id) {
                        // Never waits: a preview the forwarder has no room for is dropped, not
                        // queued behind (or ahead of) the job's progress.
                        let _ = progress.try_send(update);
                    }
                }
                WorkerLine::Result { job_id, artifacts } if job_id == job.record.job_id => {
                    if cancelling.is_some() {
                        return Err(EngineError::Cancelled);
                    }
                    return artifacts.into_iter().map(|a| resolve_artifact(&job.output_dir, a)).collect();
                }
                WorkerLine::Error { job_id, message, retryable } if job_id == job.record.job_id => {
                    if cancelling.is_some() {
                        return Err(EngineError::Cancelled);
                    }
                    return Err(if retryable { EngineError::Infra(message) } else { EngineError::User(message) });
                }
                WorkerLine::Cancelled { job_id } if job_id == job.record.job_id => return Err(EngineError::Cancelled),
                _ => {} // a line about another (earlier, cancelled) job
            }
        }
    }
}

/// The node's side of the preview throttle, for one attempt: what the worker sends is let
/// through by [`preview_due`](crate::preview::preview_due) on the node's clock and the size
/// limit, whatever the worker's own throttle did.
struct PreviewGate {
    interval_ms: u64,
    started: std::time::Instant,
    last_ms: Option<u64>,
    /// Dropped for their size: logged once per attempt, not once per line.
    warned: bool,
}

impl PreviewGate {
    fn new(interval_ms: u64) -> PreviewGate {
        PreviewGate { interval_ms, started: std::time::Instant::now(), last_ms: None, warned: false }
    }

    /// The preview to publish, or `None` when it is dropped (too soon, too big, not base64).
    fn admit(&mut self, content_type: Option<String>, data: &str, job_id: &str) -> Option<ProgressUpdate> {
        use base64::Engine as _;
        let (now_ms, ts_ms) = (self.started.elapsed().as_millis() as u64, crate::now_ms());
        if !crate::preview::preview_due(self.last_ms, now_ms, self.interval_ms) {
            return None;
        }
        // Checked before decoding: base64 takes 4 bytes per 3.
        let max = crate::preview::MAX_PREVIEW_BYTES;
        let decoded = if data.len() > max.div_ceil(3) * 4 {
            Err(format!("over the {max}-byte limit"))
        } else {
            match base64::engine::general_purpose::STANDARD.decode(data.trim()) {
                Ok(b) if b.is_empty() => Err("empty".into()),
                Ok(b) if b.len() > max => Err(format!("over the {max}-byte limit")),
                Ok(b) => Ok(b),
                Err(e) => Err(format!("its data is not base64: {e}")),
            }
        };
        let bytes = match decoded {
            Ok(b) => b,
            Err(why) => {
                if !self.warned {
                    tracing::warn!(job_id, "preview dropped: {why}");
                    self.warned = true;
                }
                return None;
            }
        };
        self.last_ms = Some(now_ms);
        let content_type = content_type.filter(|c| !c.is_empty() && c.len() <= 100).unwrap_or_else(|| "image/png".into());
        Some(ProgressUpdate::Preview { content_type, data: bytes.into(), ts_ms })
    }
}

/// Checks an artifact the worker named: a plain file name, a path inside the output dir.
fn resolve_artifact(output_dir: &Path, a: WorkerArtifact) -> Result<EngineOutput, EngineError> {
    if !crate::ids::is_valid_object_name(&a.name) || a.name.contains('/') {
        return Err(EngineError::Infra(format!("worker named an artifact {:?}: names are letters, digits, '.', '-', '_'", a.name)));
    }
    let path = if Path::new(&a.path).is_absolute() { PathBuf::from(&a.path) } else { output_dir.join(&a.path) };
    let canonical = path.canonicalize().map_err(|e| EngineError::Infra(format!("artifact {:?} at {}: {e}", a.name, path.display())))?;
    let dir = output_dir.canonicalize().map_err(|e| EngineError::Infra(format!("output dir {}: {e}", output_dir.display())))?;
    if !canonical.starts_with(&dir) {
        return Err(EngineError::Infra(format!("artifact {:?} lies outside the job's output dir", a.name)));
    }
    Ok(EngineOutput { name: a.name, path: canonical, content_type: a.content_type })
}

async fn read_stdout(stdout: tokio::process::ChildStdout, tx: mpsc::Sender<Line>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if buf.len() > MAX_LINE_BYTES {
            tracing::warn!("worker wrote a line over {MAX_LINE_BYTES} bytes; treating the worker as broken");
            let _ = tx.send(Line::TooLong).await;
            return;
        }
        let text = String::from_utf8_lossy(&buf).trim_end().to_string();
        if text.is_empty() {
            continue;
        }
        let line = match serde_json::from_str::<WorkerLine>(&text) {
            Ok(l) => Line::Parsed(l),
            Err(_) => Line::Raw(text),
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

use tokio::io::AsyncReadExt;

async fn read_stderr(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>, model: String, slot: String) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(model = %model, slot = %slot, "worker stderr: {line}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

/// If the node itself is SIGKILLed, its Drop never runs: have the kernel kill the child when
/// the node's thread that spawned it goes away, so no orphan keeps a GPU or a CPU busy. Used by
/// every process Kiln starts (model workers, pipeline commands).
pub fn dies_with_the_node(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PROGRESS_CHANNEL_BOUND;

    #[test]
    fn a_group_sees_every_gpu_it_holds_and_a_cpu_slot_none() {
        let slots = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(cuda_visible_devices(&slots(&["cuda:0", "cuda:1"])), "0,1");
        assert_eq!(cuda_visible_devices(&slots(&["cuda:3", "cuda:1"])), "3,1", "the primary's device first");
        assert_eq!(cuda_visible_devices(&slots(&["cuda:2"])), "2");
        assert_eq!(cuda_visible_devices(&slots(&["cpu:0", "cpu:1"])), "");
    }

    /// A real worker (sh) that writes the slots it was given, then says ready: a job holding
    /// another group than the resident worker's restarts it, seeing the new group.
    #[tokio::test]
    async fn a_worker_is_restarted_for_a_job_of_another_group() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let script =
            format!(r#"echo "$KILN_SLOT $KILN_SLOTS [$CUDA_VISIBLE_DEVICES]" >> {}; echo '{{"type":"ready"}}'; sleep 600"#, seen.display());
        let command = vec!["sh".into(), "-c".into(), script];
        let mut engine = ProcessEngine::new("big", command, BTreeMap::new(), 10_000, &SlotContext::new("n", "cpu:0", 0));
        engine.ensure_loaded().await.unwrap();
        // The engine's own slot, named or not: the same worker.
        engine.use_group(&[]);
        engine.use_group(&["cpu:0".to_string()]);
        assert!(engine.is_loaded());
        let group = ["cpu:0".to_string(), "cpu:2".to_string()];
        engine.use_group(&group);
        assert!(!engine.is_loaded(), "started for another group: stopped");
        engine.ensure_loaded().await.unwrap();
        engine.use_group(&group);
        assert!(engine.is_loaded(), "the same group keeps its worker");
        let lines = std::fs::read_to_string(&seen).unwrap();
        assert_eq!(lines, "cpu:0 cpu:0 []\ncpu:0 cpu:0,cpu:2 []\n");
    }

    /// A real worker (sh) that floods 200 preview lines at once, then a bad one, an oversized
    /// one, and its result: one preview goes (the interval has not passed again), none of the
    /// broken ones, and the job line told the worker the interval.
    #[tokio::test]
    async fn a_flood_of_previews_is_let_through_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("job-line");
        let script = format!(
            r#"echo '{{"type":"ready"}}'; read job; echo "$job" > {seen}
            i=0; while [ $i -lt 200 ]; do echo '{{"type":"preview","content_type":"image/png","data":"iVBORw0KGgo="}}'; i=$((i+1)); done
            echo '{{"type":"result","job_id":"j","artifacts":[]}}'; sleep 600"#,
            seen = seen.display()
        );
        let command = vec!["sh".into(), "-c".into(), script];
        let mut engine =
            ProcessEngine::new("previews", command, BTreeMap::new(), 10_000, &SlotContext::new("n", "cpu:0", 0)).previews_every(60_000);
        let record = crate::job::JobRecord { attempt: 1, ..crate::job::JobRecord::queued("j", "previews", 3, 0) };
        let job = EngineJob { record, inputs: BTreeMap::new(), output_dir: dir.path().to_path_buf(), group: vec![] };
        let (tx, mut rx) = mpsc::channel(PROGRESS_CHANNEL_BOUND);
        assert_eq!(engine.run(job, tx, CancellationToken::new()).await, Ok(vec![]));
        let mut previews = vec![];
        while let Ok(update) = rx.try_recv() {
            if let ProgressUpdate::Preview { content_type, data, .. } = update {
                previews.push((content_type, data));
            }
        }
        assert_eq!(previews, vec![("image/png".to_string(), bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\n"))]);
        let line: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
        assert_eq!(line["preview_interval_ms"], 60_000);
    }

    #[test]
    fn the_gate_drops_what_is_too_soon_too_big_or_not_base64() {
        use base64::Engine as _;
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        let mut gate = PreviewGate::new(1);
        assert!(gate.admit(None, "not base64!", "j").is_none());
        assert!(gate.admit(None, "", "j").is_none(), "empty");
        assert!(gate.admit(None, &b64(crate::preview::MAX_PREVIEW_BYTES + 1), "j").is_none());
        let at_limit = gate.admit(Some("image/webp".into()), &b64(crate::preview::MAX_PREVIEW_BYTES), "j");
        assert!(
            matches!(at_limit, Some(ProgressUpdate::Preview { ref content_type, ref data, .. }) if content_type == "image/webp" && data.len() == crate::preview::MAX_PREVIEW_BYTES)
        );
        let mut off = PreviewGate::new(0);
        assert!(off.admit(None, &b64(10), "j").is_none(), "interval 0: previews are off");
    }

    /// A worker's `memory` line is what a `cuda:N` slot counts (no GPU needed: the engine only
    /// reads the line); on a `cpu:N` slot its process group's resident memory counts instead.
    /// Stopping it leaves none of its group, helper processes included.
    #[tokio::test]
    async fn a_worker_is_measured_by_its_report_on_cuda_and_its_group_on_cpu_and_stops_whole() {
        let script = r#"sleep 600 & echo '{"type":"memory","bytes":123456}'; echo '{"type":"ready"}'; read line"#;
        let command = vec!["sh".to_string(), "-c".into(), script.into()];
        let mut gpu = ProcessEngine::new("m", command.clone(), BTreeMap::new(), 10_000, &SlotContext::new("n", "cuda:0", 0));
        gpu.ensure_loaded().await.unwrap();
        assert_eq!(gpu.measured_bytes().await, Some(123456));
        let mut cpu = ProcessEngine::new("m", command, BTreeMap::new(), 10_000, &SlotContext::new("n", "cpu:0", 0));
        cpu.ensure_loaded().await.unwrap();
        let pid = cpu.pid().unwrap();
        assert_eq!(crate::engine::proc_mem::process_group(pid).0, 2, "sh and its sleep");
        let rss = cpu.measured_bytes().await.unwrap();
        assert!(rss > 100_000 && rss != 123456, "the group's resident set: {rss}");
        let stopped = cpu.stop().await.unwrap();
        assert_eq!((stopped.pid, stopped.left_processes, stopped.left_bytes), (pid, 0, 0), "{stopped:?}");
        assert!(stopped.held_bytes > 0);
        assert_eq!(crate::engine::proc_mem::process_group(pid), (0, 0));
        assert!(!cpu.is_loaded() && cpu.stop().await.is_none());
        gpu.stop().await.unwrap();
    }

    /// A real worker (sh) that says ready, then answers its job with a 2 MiB line.
    #[tokio::test]
    async fn a_worker_line_over_the_limit_is_named_as_such_and_the_worker_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"echo '{"type":"ready"}'; read job; head -c 2097152 /dev/zero | tr '\0' x; echo; sleep 600"#;
        let command = vec!["sh".into(), "-c".into(), script.into()];
        let mut engine = ProcessEngine::new("long-lines", command, BTreeMap::new(), 10_000, &SlotContext::new("n", "cpu:0", 0));
        let record = crate::job::JobRecord { attempt: 1, ..crate::job::JobRecord::queued("j", "long-lines", 3, 0) };
        let job = EngineJob { record, inputs: BTreeMap::new(), output_dir: dir.path().to_path_buf(), group: vec![] };
        let (tx, _rx) = mpsc::channel(PROGRESS_CHANNEL_BOUND);
        let started = std::time::Instant::now();
        let result = engine.run(job, tx, CancellationToken::new()).await;
        match result {
            Err(EngineError::WorkerDied(reason)) => {
                assert!(reason.contains("a line over 1048576 bytes") && !reason.contains("did not exit"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!engine.is_loaded(), "the worker is gone");
        assert!(started.elapsed() < Duration::from_secs(2), "no wait for a worker that would not exit: {:?}", started.elapsed());
    }
}
