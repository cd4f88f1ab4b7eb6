//! The Prometheus recorder: `metrics` records into it, the node's HTTP server
//! ([`crate::health`]) renders it on `GET /metrics`. Names and labels are in
//! `kiln_core::metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Histogram buckets, in seconds: from a millisecond (a claim, an ack) to ten minutes (a run).
const BUCKETS: [f64; 17] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];

/// How often the recorder drains its histograms (unbounded memory otherwise).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The process's recorder, installed on first call. A recorder is global to the process, so
/// every node in it (several in one test process) renders the same one; each serves it on
/// its own address. Its upkeep runs on a thread of its own, independent of any runtime.
pub fn recorder() -> Result<PrometheusHandle, String> {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("kiln-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                })
                .map_err(|e| format!("cannot start the metrics upkeep: {e}"))?;
            Ok(handle)
        })
        .clone()
}
