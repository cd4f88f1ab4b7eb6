//! `kiln bench`'s tracing rows: what spans cost per job. The main rows' no-op jobs again, on
//! three fresh nodes of the same config in turn, each warmed up and measured alike: one that
//! makes no span (`KILN_LOG=warn`, no endpoint: the node before tracing), one whose spans serve
//! its log lines only (`KILN_LOG=info`, the default), one that exports them over OTLP/HTTP to a
//! sink in this process (it reads each request and answers 200, as a collector would; it
//! decodes nothing). Printed with the ratios of the last two to the first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_client::Client;

use crate::bench_node::{kiln, BenchOptions, CpuMeter, CpuPerJob, Figures, NodeChild};

/// One node's figures: the same jobs as the main rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Variant {
    pub name: &'static str,
    pub latency: Figures,
    pub throughput: Figures,
    pub cpu_sequential: CpuPerJob,
    pub cpu_concurrent: CpuPerJob,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TracingCost {
    /// No span is made: `KILN_LOG=warn`, no endpoint (the node before tracing).
    pub off: Variant,
    /// The spans made for the log lines only: `KILN_LOG=info`, no endpoint (the default node).
    pub logs_only: Variant,
    /// Spans exported over OTLP: an endpoint, `KILN_LOG=warn`.
    pub exported: Variant,
    /// Export requests and bytes the sink received, per job the exporting node ran.
    pub export_requests_per_job: f64,
    pub export_bytes_per_job: f64,
}

/// Counts what the sink received.
#[derive(Default)]
struct SinkCounts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An OTLP/HTTP endpoint that takes every request and answers `200` with an empty body.
async fn sink() -> Result<(String, Arc<SinkCounts>), String> {
    let counts = Arc::new(SinkCounts::default());
    let seen = counts.clone();
    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
    let base = crate::http_sink::serve(answer, move |body| {
        seen.requests.fetch_add(1, Ordering::Relaxed);
        seen.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    })
    .await?;
    Ok((base, counts))
}

/// Runs the main rows' jobs again on three fresh nodes in turn: without spans, with spans for
/// the logs only, exporting spans. `server_pid`: the nats-server's, when it is this bench's own.
pub(crate) async fn run(
    url: &str,
    replicas: usize,
    client: &Client,
    prefix: &str,
    opts: &BenchOptions,
    server_pid: Option<u32>,
) -> Result<TracingCost, String> {
    let (endpoint, counts) = sink().await?;
    let exporting = format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
    let variant = |name: &'static str, extra: String, log: &'static str| async move {
        let node = NodeChild::start_with(url, replicas, opts.slots, 0, client, &extra, log).await?;
        kiln(client, prefix, WARM_UP, 1).await?;
        let meter = CpuMeter::start(node.pid(), server_pid);
        let latency = kiln(client, prefix, opts.jobs.min(2000), 1).await?;
        let cpu_sequential = meter.per_job(latency.count);
        let meter = CpuMeter::start(node.pid(), server_pid);
        let throughput = kiln(client, prefix, opts.jobs, opts.concurrency).await?;
        let cpu_concurrent = meter.per_job(throughput.count);
        // A stop drains, and the exporting node flushes its last batch.
        drop(node);
        Ok::<Variant, String>(Variant { name, latency, throughput, cpu_sequential, cpu_concurrent })
    };
    let off = variant("off (no span: KILN_LOG=warn)", String::new(), "warn").await?;
    let logs_only = variant("spans for the logs only (KILN_LOG=info)", String::new(), "info").await?;
    let exported = variant("exported over OTLP (KILN_LOG=warn)", exporting, "warn").await?;
    let jobs = (WARM_UP + exported.latency.count + exported.throughput.count).max(1) as f64;
    Ok(TracingCost {
        off,
        logs_only,
        exported,
        export_requests_per_job: counts.requests.load(Ordering::Relaxed) as f64 / jobs,
        export_bytes_per_job: counts.bytes.load(Ordering::Relaxed) as f64 / jobs,
    })
}

/// Jobs each node runs before it is measured.
const WARM_UP: usize = 20;

/// The rows and the ratios to the node without spans.
pub fn print(cost: &TracingCost, concurrency: usize) {
    println!();
    println!("tracing: the same jobs on three fresh nodes in turn          p50 ms    p99 ms    per s   node CPU us/job");
    let row = |name: String, f: &Figures, cpu: &CpuPerJob| {
        println!("  {name:<56} {:>8.3}  {:>8.3}  {:>7.0}  {:>8.0}", f.p50_ms, f.p99_ms, f.per_second, cpu.node_us)
    };
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    for v in [&cost.off, &cost.logs_only, &cost.exported] {
        row(format!("{}, sequential", v.name), &v.latency, &v.cpu_sequential);
        row(format!("{}, concurrent ({concurrency})", v.name), &v.throughput, &v.cpu_concurrent);
    }
    for v in [&cost.logs_only, &cost.exported] {
        println!(
            "  {} / off: p50 latency {:.2}x, throughput {:.3}x, node CPU per job {:.2}x sequential, {:.2}x concurrent",
            v.name,
            ratio(v.latency.p50_ms, cost.off.latency.p50_ms),
            ratio(v.throughput.per_second, cost.off.throughput.per_second),
            ratio(v.cpu_sequential.node_us, cost.off.cpu_sequential.node_us),
            ratio(v.cpu_concurrent.node_us, cost.off.cpu_concurrent.node_us),
        );
    }
    println!(
        "  exported: {:.3} requests, {:.0} bytes of spans per job (8 spans a no-op job: submit, queue wait, job, claim, inputs, run, artifacts, terminal write)",
        cost.export_requests_per_job, cost.export_bytes_per_job
    );
}
