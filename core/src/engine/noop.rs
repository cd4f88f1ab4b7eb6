//! The `noop` engine: writes one small artifact and returns, so that a benchmark through it
//! measures Kiln (queue, record, events, object store, actors) and nothing else; with
//! `work_ms` it first holds its slot that long, standing in for a forward pass.

use super::{EngineError, EngineJob, EngineOutput};

pub struct NoopEngine {
    /// Extra bytes of payload in the artifact, to measure the artifact path at a given size.
    artifact_bytes: usize,
    /// How long each run holds the slot before it writes its artifact.
    work: std::time::Duration,
}

impl NoopEngine {
    pub fn new(artifact_bytes: usize, work_ms: u64) -> Self {
        NoopEngine { artifact_bytes, work: std::time::Duration::from_millis(work_ms) }
    }

    pub async fn run(&mut self, job: EngineJob) -> Result<Vec<EngineOutput>, EngineError> {
        if !self.work.is_zero() {
            // A thread's sleep, not tokio's timer: that one rounds up to the next millisecond
            // tick (5 ms held about 6), and a forward pass takes the time it takes.
            let work = self.work;
            tokio::task::spawn_blocking(move || std::thread::sleep(work)).await.map_err(|e| EngineError::Infra(e.to_string()))?;
        }
        let body = serde_json::json!({
            "job_id": job.record.job_id,
            "attempt": job.record.attempt,
            "params": job.record.params,
            "padding": "x".repeat(self.artifact_bytes),
        });
        let path = job.output_dir.join("result.json");
        tokio::fs::write(&path, serde_json::to_vec(&body).expect("json"))
            .await
            .map_err(|e| EngineError::Infra(format!("cannot write output: {e}")))?;
        Ok(vec![EngineOutput { name: "result.json".into(), path, content_type: Some("application/json".into()) }])
    }
}
