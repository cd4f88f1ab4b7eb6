//! The pipeline runner of one claimed attempt: inputs, inference, post-processing stages,
//! artifacts. The [`JobActor`](crate::job) runs it between the
//! [`delivery`](crate::delivery)'s claim and conclusion, and gives it the attempt's
//! [`AttemptEvents`] to report through; the pipeline calls nothing above it.
//!
//! ```text
//! fetch inputs ─► InferenceActor::Run (progress events stream out meanwhile)
//!      ▼ the model is done: hand the slot lease back (the slot takes its next job)
//! stages (stage pool, each with its own attempts) ─► store artifacts under this
//! attempt's own names (announced, and so made visible, only by the delivery's conclusion)
//! ```
//!
//! Each step is a span under the attempt's `kiln.job`: `kiln.inputs`, `kiln.run` (whose
//! context the worker is handed), `kiln.stage` per stage, `kiln.artifacts`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_core::config::StageConfig;
use kiln_core::engine::{EngineError, EngineJob, EngineOutput, ProgressUpdate, ResolvedInput, PROGRESS_CHANNEL_BOUND};
use kiln_core::job::JobRecord;
use kiln_core::nats::previews::PreviewOut;
use kiln_core::nats::{ride_out, StoreError};
use kiln_core::policy::{Patience, STAGE_RETRY_PAUSE};
use kiln_core::protocol::{truncate_utf8 as truncate, Artifact, Event, InputValue, MAX_EVENT_MESSAGE_BYTES, MAX_STAGE_BYTES};
use kiln_core::task::{self, TaskKind};
use kiln_core::telemetry;
use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::attempt_events::{AttemptEvents, ProgressOrder};

use crate::context::NodeContext;
use crate::inference::InferenceMsg;
use crate::lease::SlotLease;
use crate::stage_pool::StagePoolHandle;

/// A job's folder while the attempt uses it, cleaned up when dropped (in the blocking pool:
/// nobody waits for it). Handed back to its slot's free folders only after an attempt whose
/// engine and stages all finished: after a timeout, a cancel or a failure something may still
/// write into it late, so it is removed instead, never given to the next job.
struct Workspace {
    ctx: NodeContext,
    slot: String,
    dir: Option<std::path::PathBuf>,
    reusable: bool,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let (Some(dir), Ok(runtime)) = (self.dir.take(), tokio::runtime::Handle::try_current()) {
            let (ctx, slot, reusable) = (self.ctx.clone(), std::mem::take(&mut self.slot), self.reusable);
            runtime.spawn_blocking(move || {
                if reusable {
                    ctx.return_workspace(&slot, dir);
                } else {
                    let _ = std::fs::remove_dir_all(dir);
                }
            });
        }
    }
}

/// Runs one attempt's work on its slot.
pub(crate) struct Pipeline {
    pub(crate) ctx: NodeContext,
    /// The slot the model runs on (its work directory is per slot).
    pub(crate) slot: String,
    pub(crate) inference: ActorRef<InferenceMsg>,
    /// The job's place on the slot, handed back as soon as the model is done; dropped (and so
    /// handed back) however the attempt ends before that.
    pub(crate) lease: Option<SlotLease>,
    /// Runs the stages' commands, off the slot.
    pub(crate) stage_pool: StagePoolHandle,
    /// Stops the attempt's work: cancelled by a cancel notice, or by the delivery when the
    /// record asks for it or another attempt took the job over.
    pub(crate) cancel: CancellationToken,
}

impl Pipeline {
    /// Fetches inputs, runs the engine through the inference actor, stores artifacts, for
    /// the attempt `record` (as claimed) reports its events into `events`.
    pub(crate) async fn run(&mut self, events: &mut impl AttemptEvents, record: &JobRecord) -> Result<Vec<Artifact>, EngineError> {
        let (job_id, attempt) = (&record.job_id, record.attempt);
        let dir = {
            let (ctx, slot) = (self.ctx.clone(), self.slot.clone());
            tokio::task::spawn_blocking(move || ctx.take_workspace(&slot))
                .await
                .map_err(|e| EngineError::Infra(e.to_string()))?
                .map_err(|e| EngineError::Infra(format!("cannot make a job folder: {e}")))?
        };
        let mut workspace = Workspace { ctx: self.ctx.clone(), slot: self.slot.clone(), dir: Some(dir.clone()), reusable: false };
        let output_dir = dir.join("out");
        let inputs = resolve_inputs(&self.ctx, events, record, &dir.join("in")).instrument(tracing::info_span!("kiln.inputs")).await?;
        let job_inputs = inputs.clone();
        let group = self.lease.as_ref().map(|l| l.group().to_vec()).unwrap_or_default();
        // The engine's span; the worker is handed its context, so the worker's spans are its
        // children (when this node exports none, the worker gets the job's trace as it is).
        let run_span = tracing::info_span!("kiln.run", slot = %self.slot);
        let trace =
            telemetry::context_of(&run_span, record.trace.as_ref().and_then(|t| t.tracestate.clone())).or_else(|| record.trace.clone());
        let job = EngineJob { record: JobRecord { attempt, trace, ..record.clone() }, inputs, output_dir, group };

        let stages = self.ctx.config.model(&record.model).map(|m| m.stages.clone()).unwrap_or_default();
        let run_stage = self.ctx.config.model(&record.model).map(|m| m.run_stage.clone()).unwrap_or_default();
        // Progress spans the whole pipeline: the model takes the first MODEL_SHARE of it.
        let model_share = if stages.is_empty() { 1.0 } else { MODEL_SHARE };
        if !run_stage.is_empty() {
            events.event(Event::progress(job_id, attempt, Some(run_stage.clone()), Some(0.0))).await;
        }
        let (tx, rx) = mpsc::channel(PROGRESS_CHANNEL_BOUND);
        let model_config = self.ctx.config.model(&record.model).cloned();
        let shown = StageShown {
            share: model_share,
            run_stage: (!run_stage.is_empty()).then_some(run_stage),
            model: model_config,
            labels: record.labels.clone(),
            previews: self.ctx.resources.clone(),
        };
        let forwarder = task::spawn(
            TaskKind::JobPart,
            "progress forwarder",
            forward_progress(job_id.clone(), attempt, shown, rx, events.progress_order()),
        );
        let engine_cancel = self.cancel.clone();
        let model_timeout = self.ctx.config.model(&record.model).map(|m| m.timeout_ms).unwrap_or(600_000);
        // The inference actor enforces the model timeout itself; this outer bound only guards
        // against a reply that never comes. A job claimed ahead waits for the slot's current
        // one first, which may take a whole timeout too.
        let call = self
            .inference
            .call(
                |reply| InferenceMsg::Run { job: Box::new(job), progress: tx, cancel: engine_cancel, reply },
                Some(Duration::from_millis(2 * model_timeout + 30_000)),
            )
            .instrument(run_span)
            .await;
        let _ = forwarder.await;
        let outputs = match call {
            Ok(ractor::rpc::CallResult::Success(result)) => result?,
            Ok(ractor::rpc::CallResult::Timeout) => return Err(EngineError::Timeout(model_timeout)),
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
                return Err(EngineError::WorkerDied(kiln_core::retry_reason::SLOT_STOPPED.into()))
            }
        };
        // The model is done: the slot takes its next job while this one's stages run (and,
        // with jobs claimed ahead, while its artifacts are stored and its outcome written).
        // Without prefetch the lease is kept to the end when there are no stages, so the next
        // job is not claimed before this one is settled: a crash in between then takes one
        // job's attempt, not two.
        if !stages.is_empty() || self.ctx.config.node.slot_prefetch > 0 {
            drop(self.lease.take());
        }
        let outputs =
            if stages.is_empty() { outputs } else { self.run_stages(events, record, &stages, &job_inputs, outputs, &dir).await? };
        // Stored under this attempt's own names; announced (and so made visible) only in
        // `conclude`, if this attempt still owns the job.
        let artifacts = self.store_artifacts(record, outputs).instrument(tracing::info_span!("kiln.artifacts")).await?;
        workspace.reusable = true;
        drop(workspace);
        Ok(artifacts)
    }

    /// Stores the outputs as this attempt's artifacts.
    async fn store_artifacts(&self, record: &JobRecord, outputs: Vec<EngineOutput>) -> Result<Vec<Artifact>, EngineError> {
        let (job_id, attempt) = (&record.job_id, record.attempt);
        let mut artifacts = Vec::with_capacity(outputs.len());
        for output in outputs {
            let what = format!("storing artifact {}", output.name);
            // A stream without a leader refuses every write for seconds: not the job's failure
            // (charged to the job, it used up a no-op job's three attempts within a second).
            let artifact = ride_out(Patience::NATS_TROUBLE, job_id, &what, || {
                self.ctx.resources.store_artifact(
                    &record.model,
                    job_id,
                    attempt,
                    &output.name,
                    &output.path,
                    output.content_type.as_deref(),
                )
            })
            .await
            .map_err(|e| EngineError::Infra(format!("cannot store artifact {}: {e}", output.name)))?;
            artifacts.push(artifact);
        }
        Ok(artifacts)
    }

    /// Runs the model's post-processing stages in order, each with its own attempts; each
    /// stage's output replaces its input among the artifacts (or joins it, `keep_input`).
    async fn run_stages(
        &mut self,
        events: &mut impl AttemptEvents,
        record: &JobRecord,
        stages: &[StageConfig],
        inputs: &BTreeMap<String, ResolvedInput>,
        mut outputs: Vec<EngineOutput>,
        dir: &Path,
    ) -> Result<Vec<EngineOutput>, EngineError> {
        let (job_id, attempt, cancel) = (&record.job_id, record.attempt, &self.cancel);
        let stage_dir = dir.join("stages");
        tokio::fs::create_dir_all(&stage_dir)
            .await
            .map_err(|e| EngineError::Infra(format!("cannot create {}: {e}", stage_dir.display())))?;
        for (i, stage) in stages.iter().enumerate() {
            let base = MODEL_SHARE * 100.0;
            let share = (1.0 - MODEL_SHARE) * 100.0 / stages.len() as f32;
            events.event(Event::progress(job_id, attempt, Some(stage.name().to_string()), Some(base + share * i as f32))).await;
            let failed = |message: String| EngineError::Stage { stage: stage.name().to_string(), message };
            let stage_span = tracing::info_span!("kiln.stage", stage = %stage.name());
            // One span per stage: its body is an async block so that its early returns end the
            // span with it.
            async {
            match stage {
                StageConfig::Command { name, command, input, output, keep_input, timeout_ms, max_attempts } => {
                    let Some(at) = outputs.iter().position(|o| &o.name == input) else {
                        return Err(failed(format!("the model produced no artifact {input:?}")));
                    };
                    let out_path = stage_dir.join(output);
                    let argv = kiln_core::stage::expand(command, &outputs[at].path, &out_path);
                    let mut stage_attempt = 0;
                    loop {
                        stage_attempt += 1;
                        let _ = tokio::fs::remove_file(&out_path).await;
                        let ran = self.stage_pool.run(argv.clone(), Duration::from_millis(*timeout_ms), cancel).await;
                        let error = match ran {
                            Ok(_) if tokio::fs::metadata(&out_path).await.is_ok_and(|m| m.len() > 0) => break,
                            Ok(_) => format!("the command succeeded but wrote no {output:?}"),
                            Err(kiln_core::stage::StageError::Cancelled) => return Err(EngineError::Cancelled),
                            Err(e) => e.to_string(),
                        };
                        if cancel.is_cancelled() {
                            return Err(EngineError::Cancelled);
                        }
                        tracing::warn!(job_id = %job_id, stage = %name, attempt = stage_attempt, error = %error, "stage attempt failed");
                        if stage_attempt >= *max_attempts {
                            return Err(failed(format!("{error} (after {stage_attempt} attempts)")));
                        }
                        let note = format!("stage {name} attempt {stage_attempt} of {max_attempts} failed: {error}; retrying");
                        events.event(Event::message(job_id, attempt, truncate(note, MAX_EVENT_MESSAGE_BYTES))).await;
                        // None today (see the policy); a zero pause must not cost a timer tick.
                        if !STAGE_RETRY_PAUSE.is_zero() {
                            tokio::time::sleep(STAGE_RETRY_PAUSE).await;
                        }
                    }
                    let produced = EngineOutput { name: output.clone(), path: out_path, content_type: None };
                    if *keep_input {
                        outputs.push(produced);
                    } else {
                        outputs[at] = produced;
                    }
                }
                StageConfig::CameraMetadata { image_input, focal_param, default_focal, output, .. } => {
                    let Some(ResolvedInput::File(image)) = inputs.get(image_input) else {
                        return Err(failed(format!("input {image_input:?} is not an uploaded image")));
                    };
                    let image = image.clone();
                    let (w, h) = tokio::task::spawn_blocking(move || kiln_core::stage::image_size(&image))
                        .await
                        .map_err(|e| failed(e.to_string()))?
                        .map_err(|e| failed(e.to_string()))?;
                    let focal = record.params.get(focal_param).and_then(|v| v.as_f64()).unwrap_or(*default_focal);
                    let body = kiln_core::stage::camera_metadata(job_id, w, h, focal);
                    let path = stage_dir.join(output);
                    tokio::fs::write(&path, serde_json::to_vec_pretty(&body).expect("json"))
                        .await
                        .map_err(|e| EngineError::Infra(format!("cannot write {}: {e}", path.display())))?;
                    outputs.push(EngineOutput { name: output.clone(), path, content_type: Some("application/json".into()) });
                }
            }
            Ok::<(), EngineError>(())
            }
            .instrument(stage_span)
            .await?;
        }
        events.event(Event::progress(job_id, attempt, None, Some(100.0))).await;
        Ok(outputs)
    }
}

async fn resolve_inputs(
    ctx: &NodeContext,
    events: &mut impl AttemptEvents,
    record: &JobRecord,
    dir: &Path,
) -> Result<BTreeMap<String, ResolvedInput>, EngineError> {
    let mut resolved = BTreeMap::new();
    // Seed 002's clients see `downloading` while their files come in (mapped by the model's
    // `stage_names` like any stage).
    if record.inputs.values().any(|v| matches!(v, InputValue::Object { .. })) {
        events.event(Event::progress(&record.job_id, record.attempt, Some("downloading".into()), Some(0.0))).await;
    }
    for (name, value) in &record.inputs {
        let input = match value {
            InputValue::Inline(v) => ResolvedInput::Inline(v.clone()),
            InputValue::Object { object } => {
                let base = object.rsplit('/').next().unwrap_or("input");
                let dest = dir.join(name).join(base);
                let what = format!("downloading input {name:?}");
                match ride_out(Patience::NATS_TROUBLE, &record.job_id, &what, || ctx.resources.download_file(object, &dest)).await {
                    Ok(_) => ResolvedInput::File(dest),
                    Err(StoreError::NotFound(_)) => {
                        return Err(EngineError::User(format!(
                            "input {name:?}: object {object:?} does not exist in the files bucket (expired?)"
                        )))
                    }
                    Err(e) => return Err(EngineError::Infra(format!("input {name:?}: cannot download {object:?}: {e}"))),
                }
            }
        };
        resolved.insert(name.clone(), input);
    }
    Ok(resolved)
}

/// The part of a pipeline's progress the model takes; its post-processing stages share the rest.
const MODEL_SHARE: f32 = 0.8;

/// Most progress events whose acks may be outstanding at once: the forwarder overlaps acks
/// for throughput but waits once this many are in flight, which bounds its memory.
const MAX_UNACKED_PROGRESS: usize = 64;

/// Turns engine progress into events, in order, until the engine drops its sender; returns
/// once every one of them is stored.
/// How the model's own progress shows in the job's events: scaled to its share of the
/// pipeline, and, for a model with a `run_stage`, under that stage name whatever the engine
/// calls its steps (a TorchScript model's `loading`, `forward`, `encoding` are the engine's,
/// not the stages a client of the pipeline was told about).
struct StageShown {
    share: f32,
    run_stage: Option<String>,
    /// Maps the engine's stage names to the ones its clients know (`stage_names`).
    model: Option<kiln_core::config::ModelConfig>,
    /// The job's labels, carried by every event.
    labels: kiln_core::protocol::Labels,
    /// Where the engine's previews go: `kiln.previews.<job>`, not the job's events.
    previews: kiln_core::nats::Resources,
}

async fn forward_progress(job_id: String, attempt: u32, shown: StageShown, mut rx: mpsc::Receiver<ProgressUpdate>, order: ProgressOrder) {
    let ProgressOrder { store, running_stored, last_seq } = order;
    let mut unacked = std::collections::VecDeque::new();
    let mut running_stored = Some(running_stored);
    let mut previews_sent = 0u64;
    while let Some(update) = rx.recv().await {
        // Not before the attempt's `running` event is stored: its history begins with it.
        if let Some(running) = running_stored.take() {
            running.await;
        }
        let event = match update {
            ProgressUpdate::Progress { stage, progress, message } => {
                let stage = match (&shown.run_stage, &shown.model) {
                    (Some(run_stage), _) => Some(run_stage.clone()),
                    (None, Some(model)) => stage.and_then(|s| model.stage_shown(&truncate(s, MAX_STAGE_BYTES))),
                    (None, None) => stage.map(|s| truncate(s, MAX_STAGE_BYTES)),
                };
                let mut e = Event::progress(&job_id, attempt, stage, progress.map(|p| p * shown.share));
                e.message = message.map(|m| truncate(m, MAX_EVENT_MESSAGE_BYTES));
                e
            }
            ProgressUpdate::Message(text) => Event::message(&job_id, attempt, truncate(text, MAX_EVENT_MESSAGE_BYTES)),
            ProgressUpdate::Preview { content_type, data, ts_ms } => {
                // Live only: not an event of the job's history, not an artifact.
                previews_sent += 1;
                let preview = PreviewOut { job_id: &job_id, attempt, seq: previews_sent, content_type: &content_type, data, ts_ms };
                if let Err(e) = shown.previews.publish_preview(preview).await {
                    tracing::debug!(job_id = %job_id, error = %e, "preview not published");
                }
                continue;
            }
        }
        .labelled(&shown.labels);
        match store.publish_event_nowait(&event, None).await {
            Ok(ack) => unacked.push_back(ack),
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "progress event publish failed"),
        }
        if unacked.len() >= MAX_UNACKED_PROGRESS {
            if let Ok(seq) = unacked.pop_front().expect("non-empty").await {
                last_seq.fetch_max(seq, Ordering::AcqRel);
            }
        }
    }
    for ack in unacked {
        match ack.await {
            Ok(seq) => {
                last_seq.fetch_max(seq, Ordering::AcqRel);
            }
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "progress event not stored"),
        }
    }
}
