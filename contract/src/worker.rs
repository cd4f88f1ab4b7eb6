//! The worker protocol: the JSON lines a `process` engine exchanges with its worker process
//! (docs/PROTOCOL.md "Worker protocol"; the Python SDK `kiln-worker` speaks it). One line per
//! message, each an object with a `type`.
//!
//! Kiln writes [`ToWorker`] to the worker's stdin; the worker writes [`FromWorker`] to its
//! stdout (any line that is not JSON is kept as a log line by the engine). A job's line is
//! built from its record by [`WorkerJob::new`], one struct literal: a field added to what a
//! worker sees is added here, and the compiler points at this one place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::job::JobRecord;

/// What Kiln writes to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Run this attempt of a job.
    Job(WorkerJob),
    /// Stop the job now running, if it is this one; answer `cancelled`.
    Cancel { job_id: String },
}

/// One attempt of a job, as its worker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerJob {
    pub job_id: String,
    pub attempt: u32,
    pub model: String,
    /// Inline inputs as sent; a file input as `{"path": "/abs/file"}` (downloaded by the node).
    pub inputs: serde_json::Map<String, serde_json::Value>,
    /// The job's params, the model's defaults filled in.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Where the worker writes its outputs; emptied before each job.
    pub output_dir: PathBuf,
    /// The model's `preview_interval_ms`: the node lets through at most one `preview` line per
    /// this many ms (0: none), so a worker can skip encoding one that would be dropped.
    #[serde(default = "default_preview_interval_ms")]
    pub preview_interval_ms: u64,
    /// The W3C `traceparent` of the node's span around this run (or of the job's submit when
    /// the node exports no spans): a worker's own spans are its children. Absent for a job
    /// without a trace (submitted to an older Kiln).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

fn default_preview_interval_ms() -> u64 {
    crate::preview::DEFAULT_PREVIEW_INTERVAL_MS
}

impl WorkerJob {
    /// The line of `record`'s current attempt, with its inputs as the node resolved them, for a
    /// model whose previews go at most once per `preview_interval_ms`.
    pub fn new(
        record: &JobRecord,
        inputs: serde_json::Map<String, serde_json::Value>,
        output_dir: PathBuf,
        preview_interval_ms: u64,
    ) -> WorkerJob {
        WorkerJob {
            job_id: record.job_id.clone(),
            attempt: record.attempt,
            model: record.model.clone(),
            inputs,
            params: record.params.clone(),
            output_dir,
            preview_interval_ms,
            traceparent: record.trace.as_ref().map(|t| t.traceparent.clone()),
            tracestate: record.trace.as_ref().and_then(|t| t.tracestate.clone()),
        }
    }
}

/// What a worker writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// Once, after loading its model.
    Ready,
    /// The memory the worker holds on its GPU, in bytes (the SDK sends CUDA's reserved bytes
    /// after load and warm-up, before `ready`): a `cuda:N` slot's budget counts it for a model
    /// that declares no `memory_bytes`. May be sent again at any time; the last one counts.
    Memory {
        bytes: u64,
    },
    Progress {
        #[serde(default)]
        job_id: Option<String>,
        #[serde(default)]
        stage: Option<String>,
        /// 0 to 100.
        #[serde(default)]
        progress: Option<f32>,
        #[serde(default)]
        message: Option<String>,
    },
    Log {
        #[serde(default)]
        job_id: Option<String>,
        message: String,
    },
    Result {
        job_id: String,
        #[serde(default)]
        artifacts: Vec<WorkerArtifact>,
    },
    Error {
        job_id: String,
        message: String,
        /// True when another attempt might succeed (Kiln's side of the failure).
        #[serde(default)]
        retryable: bool,
    },
    Cancelled {
        job_id: String,
    },
    /// A small image of the job in progress ([`crate::preview`]): not an artifact, shown live
    /// to followers, dropped when it comes sooner than the job line's `preview_interval_ms`
    /// after the last one let through, or when over [`crate::preview::MAX_PREVIEW_BYTES`].
    Preview {
        #[serde(default)]
        job_id: Option<String>,
        /// `image/png` when left out.
        #[serde(default)]
        content_type: Option<String>,
        /// The bytes, base64 (standard alphabet).
        data: String,
    },
}

/// A file a worker produced for its job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerArtifact {
    pub name: String,
    /// Absolute, or relative to the job's output dir; must lie inside it.
    pub path: String,
    #[serde(default)]
    pub content_type: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of the protocol's documentation parse as the types say, and a job's line
    /// reads as documented.
    #[test]
    fn the_documented_lines_are_the_types() {
        let record = JobRecord { attempt: 2, ..JobRecord::queued("j1", "m", 3, 0) };
        let inputs = serde_json::json!({"image": {"path": "/in.png"}}).as_object().cloned().unwrap();
        let line = serde_json::to_value(ToWorker::Job(WorkerJob::new(&record, inputs, "/out".into(), 500))).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"type": "job", "job_id": "j1", "attempt": 2, "model": "m",
                "inputs": {"image": {"path": "/in.png"}}, "params": {}, "output_dir": "/out", "preview_interval_ms": 500})
        );
        let cancel = serde_json::to_value(ToWorker::Cancel { job_id: "j1".into() }).unwrap();
        assert_eq!(cancel, serde_json::json!({"type": "cancel", "job_id": "j1"}));
        let parse = |s: &str| serde_json::from_str::<FromWorker>(s).unwrap();
        assert_eq!(parse(r#"{"type":"ready"}"#), FromWorker::Ready);
        assert_eq!(parse(r#"{"type":"memory","bytes":1048576}"#), FromWorker::Memory { bytes: 1 << 20 });
        assert!(
            matches!(parse(r#"{"type":"progress","job_id":"j1","progress":40}"#), FromWorker::Progress { progress: Some(p), .. } if p == 40.0)
        );
        assert!(matches!(parse(r#"{"type":"error","job_id":"j1","message":"x"}"#), FromWorker::Error { retryable: false, .. }));
        assert!(
            matches!(parse(r#"{"type":"preview","job_id":"j1","content_type":"image/jpeg","data":"AAE="}"#), FromWorker::Preview { data, .. } if data == "AAE=")
        );
        assert!(serde_json::from_str::<FromWorker>(r#"{"type":"other"}"#).is_err());
    }
}
