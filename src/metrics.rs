//! The Prometheus endpoint: `metrics` records, `metrics-exporter-prometheus` serves
//! `http://<node.metrics_addr>/metrics`. Names and labels are in `kiln_core::metrics`.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the global recorder and its HTTP listener. Only one recorder exists per process,
/// so a second call (several nodes in one test process) is a no-op.
pub fn install(addr: &str) -> Result<(), String> {
    if addr.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = addr.parse().map_err(|e| format!("node.metrics_addr {addr:?}: {e}"))?;
    let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&buckets)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
}
