//! `kiln bench`'s tracing rows: what exporting spans costs per job. The same no-op jobs as the
//! main rows, through a fresh node of the same config plus `[telemetry] otlp_endpoint`, whose
//! spans go over OTLP/HTTP to a sink in this process (it reads each request and answers 200,
//! as a collector would; it decodes nothing). Printed beside the main rows' figures (the node
//! without export, measured in the same run on the same server) as ratios.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::bench::{kiln, BenchOptions, CpuMeter, CpuPerJob, Figures, NodeChild};

#[derive(Debug, Clone, serde::Serialize)]
pub struct TracingCost {
    pub latency: Figures,
    pub throughput: Figures,
    pub cpu_sequential: CpuPerJob,
    pub cpu_concurrent: CpuPerJob,
    /// Export requests and bytes the sink received, per job of the measured rows and warm-up.
    pub export_requests_per_job: f64,
    pub export_bytes_per_job: f64,
}

/// Counts what the sink received.
#[derive(Default)]
struct SinkCounts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An OTLP/HTTP endpoint that takes every request (HTTP/1.1, keep-alive, `Content-Length`
/// bodies, as the exporter sends them) and answers `200` with an empty body.
async fn sink() -> Result<(String, Arc<SinkCounts>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let counts = Arc::new(SinkCounts::default());
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let counts = shared.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(64 * 1024);
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    // A request: its head up to the blank line, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize =
                        head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
                    while buf.len() < head_end + length {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + length);
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    counts.bytes.fetch_add(length as u64, Ordering::Relaxed);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((format!("http://{addr}"), counts))
}

/// Runs the main rows' jobs again on a node that exports its spans. `server_pid`: the
/// nats-server's, when it is this bench's own.
pub(crate) async fn run(
    url: &str,
    replicas: usize,
    client: &Client,
    prefix: &str,
    opts: &BenchOptions,
    server_pid: Option<u32>,
) -> Result<TracingCost, String> {
    let (endpoint, counts) = sink().await?;
    let extra = format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
    let node = NodeChild::start_with(url, replicas, opts.slots, 0, client, &extra).await?;
    let warm_up = 20;
    kiln(client, prefix, warm_up, 1).await?;
    let meter = CpuMeter::start(node.pid(), server_pid);
    let latency = kiln(client, prefix, opts.jobs.min(2000), 1).await?;
    let cpu_sequential = meter.per_job(latency.count);
    let meter = CpuMeter::start(node.pid(), server_pid);
    let throughput = kiln(client, prefix, opts.jobs, opts.concurrency).await?;
    let cpu_concurrent = meter.per_job(throughput.count);
    // The node's drain flushes its last batch.
    drop(node);
    let jobs = (warm_up + latency.count + throughput.count).max(1) as f64;
    Ok(TracingCost {
        latency,
        throughput,
        cpu_sequential,
        cpu_concurrent,
        export_requests_per_job: counts.requests.load(Ordering::Relaxed) as f64 / jobs,
        export_bytes_per_job: counts.bytes.load(Ordering::Relaxed) as f64 / jobs,
    })
}

/// The rows, beside the figures of the node without export (`off_*`).
pub fn print(cost: &TracingCost, off_latency: &Figures, off_throughput: &Figures, off_cpu: (&CpuPerJob, &CpuPerJob), concurrency: usize) {
    println!();
    println!("tracing: the same jobs on a node exporting its spans (OTLP/HTTP to a local sink) p50 ms    p99 ms    per s");
    let row = |name: &str, f: &Figures| println!("  {name:<40} {:>8.3}  {:>8.3}  {:>7.0}", f.p50_ms, f.p99_ms, f.per_second);
    row("export off, sequential (rows above)", off_latency);
    row("export on, sequential", &cost.latency);
    row(&format!("export off, concurrent ({concurrency})"), off_throughput);
    row(&format!("export on, concurrent ({concurrency})"), &cost.throughput);
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    println!(
        "  ratio on/off: p50 latency {:.2}x, p99 {:.2}x, throughput {:.3}x; node CPU per job {:.0} -> {:.0} us sequential ({:.2}x), {:.0} -> {:.0} us concurrent ({:.2}x)",
        ratio(cost.latency.p50_ms, off_latency.p50_ms),
        ratio(cost.latency.p99_ms, off_latency.p99_ms),
        ratio(cost.throughput.per_second, off_throughput.per_second),
        off_cpu.0.node_us,
        cost.cpu_sequential.node_us,
        ratio(cost.cpu_sequential.node_us, off_cpu.0.node_us),
        off_cpu.1.node_us,
        cost.cpu_concurrent.node_us,
        ratio(cost.cpu_concurrent.node_us, off_cpu.1.node_us),
    );
    println!(
        "  exported: {:.3} requests, {:.0} bytes of spans per job (8 spans a no-op job: submit, queue wait, job, claim, inputs, run, artifacts, terminal write)",
        cost.export_requests_per_job, cost.export_bytes_per_job
    );
}
