//! The Prometheus recorder: `metrics` records into it, the node's HTTP server
//! ([`crate::health`]) and the gateway ([`crate::gateway`]) render it on `GET /metrics`. Names,
//! labels and help texts are in `kiln_core::metrics`; installing the recorder describes them
//! and sets `kiln_build_info`.

use std::sync::OnceLock;
use std::time::Duration;

use kiln_core::metrics as m;
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
            // Prometheus' recommended naming (unit suffixes, counters' `_total`) is on, so that a
            // name lacking its declared unit would show renamed (and a dashboard's query of it
            // would find nothing: tests/dashboard.rs). Kiln's names have both already.
            let handle = PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .map_err(|e| e.to_string())?
                .with_recommended_naming(true)
                .install_recorder()
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            // Once per process, right after the recorder exists: help text and units of every
            // metric, and which build this is.
            kiln_core::metrics::describe();
            let (version, commit, profile) = build_info();
            metrics::gauge!(m::BUILD_INFO, "version" => version, "commit" => commit, "profile" => profile).set(1.0);
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

/// The labels of `kiln_build_info`: the crate's version, the commit `kiln --version` names,
/// and the cargo profile (`debug` or `release`).
pub fn build_info() -> (&'static str, &'static str, &'static str) {
    (env!("CARGO_PKG_VERSION"), env!("KILN_COMMIT"), if cfg!(debug_assertions) { "debug" } else { "release" })
}

/// Sets this node's counters of things that may not have happened yet to 0, for each of its
/// models and slots: a counter that first appears at its first increment has no earlier sample,
/// so `rate()` and `increase()` miss that increment, and a dashboard panel of it shows "no data"
/// instead of 0 (Prometheus' own advice: export what may happen, from the start).
pub fn zero_counters(models: &[String], slots: &[String]) {
    for model in models {
        for outcome in m::Outcome::ALL {
            metrics::counter!(m::JOBS_FINISHED, "model" => model.clone(), "outcome" => outcome.as_str()).increment(0);
        }
        metrics::counter!(m::JOBS_SUBMITTED, "model" => model.clone()).increment(0);
        metrics::counter!(m::JOB_RETRIES, "model" => model.clone()).increment(0);
    }
    for slot in slots {
        metrics::counter!(m::ACTOR_RESTARTS, "slot" => slot.clone()).increment(0);
        metrics::counter!(m::GPU_QUARANTINED, "slot" => slot.clone()).increment(0);
    }
    metrics::counter!(m::NODES_LOST).increment(0);
}
