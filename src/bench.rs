//! `kiln bench`: runs no-op jobs through a real node and prints submit-to-terminal latency and
//! throughput beside the raw NATS floor measured in the same run on the same server (a bare
//! JetStream publish, pull, ack round trip), with the ratio.
//!
//! Kiln's latency is measured from sending the submit request to receiving the job's terminal
//! event (subscribed before submitting); the floor's from publishing to acking the pulled message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use kiln_core::config::{ClusterConfig, EngineConfig, ModelConfig};
use kiln_core::nats::NatsServer;
use kiln_core::protocol::{Event, SubmitRequest};
use tokio::sync::oneshot;

use crate::client::Client;
use crate::node::RunningNode;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub jobs: usize,
    pub concurrency: usize,
    pub slots: usize,
    /// An existing NATS to use instead of a temp server.
    pub nats: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub per_second: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub floor_latency: Figures,
    pub floor_throughput: Figures,
    pub kiln_latency: Figures,
    pub kiln_throughput: Figures,
}

pub fn figures(mut samples: Vec<Duration>, wall: Duration) -> Figures {
    samples.sort();
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    Figures { count: samples.len(), p50_ms: pct(0.50), p99_ms: pct(0.99), per_second: samples.len() as f64 / wall.as_secs_f64() }
}

/// Bare JetStream: `concurrency` loops of publish (acked) -> pull one -> ack, `n` in all.
async fn floor(js: &jetstream::Context, n: usize, concurrency: usize) -> Result<Figures, String> {
    let s = js
        .get_or_create_stream(stream::Config {
            name: "BENCH_FLOOR".into(),
            subjects: vec!["bench.floor.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut tasks = vec![];
    let wall = Instant::now();
    for w in 0..concurrency {
        let per = n / concurrency + usize::from(w < n % concurrency);
        let name = format!("floor-{w}");
        let c = s
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("bench.floor.{w}"),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let js = js.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per);
            for i in 0..per {
                let t = Instant::now();
                js.publish(format!("bench.floor.{w}"), format!("{i}").into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                let mut batch = c.batch().max_messages(1).expires(Duration::from_secs(5)).messages().await.map_err(|e| e.to_string())?;
                let m = batch.next().await.ok_or("floor: no message")?.map_err(|e| e.to_string())?;
                m.double_ack().await.map_err(|e| e.to_string())?;
                samples.push(t.elapsed());
            }
            Ok::<_, String>(samples)
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    let fig = figures(all, wall.elapsed());
    let _ = js.delete_stream("BENCH_FLOOR").await;
    Ok(fig)
}

/// Kiln: `concurrency` loops of submit -> wait for the terminal event, `n` jobs in all, each
/// job `make(i)` (its model must be `model`).
async fn kiln(client: &Client, prefix: &str, n: usize, concurrency: usize) -> Result<Figures, String> {
    kiln_jobs(client, prefix, n, concurrency, "noop", |_| SubmitRequest { model: "noop".into(), ..Default::default() }).await
}

async fn kiln_jobs(
    client: &Client,
    prefix: &str,
    n: usize,
    concurrency: usize,
    model: &'static str,
    make: impl Fn(usize) -> SubmitRequest + Send + Sync + Copy + 'static,
) -> Result<Figures, String> {
    let waiters: Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>> = Arc::default();
    let mut sub = client.nats().subscribe(format!("{prefix}.events.*")).await.map_err(|e| e.to_string())?;
    let w = waiters.clone();
    let listener = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Ok(e) = serde_json::from_slice::<Event>(&m.payload) {
                if e.is_terminal() {
                    if let Some(tx) = w.lock().expect("lock").remove(&e.job_id) {
                        let _ = tx.send(Instant::now());
                    }
                }
            }
        }
    });
    client.nats().flush().await.map_err(|e| e.to_string())?;
    let wall = Instant::now();
    let mut tasks = vec![];
    for w in 0..concurrency {
        let per = n / concurrency + usize::from(w < n % concurrency);
        let client = client.clone();
        let waiters = waiters.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per);
            for i in 0..per {
                // The id is derived from the idempotency key, so the waiter is registered
                // before the submit and a terminal event cannot race past it.
                let key = uuid::Uuid::new_v4().to_string();
                let job_id = crate::api::idempotent_job_id(model, &key);
                let (tx, rx) = oneshot::channel();
                waiters.lock().expect("lock").insert(job_id.clone(), tx);
                let t = Instant::now();
                let request = SubmitRequest { idempotency_key: Some(key), ..make(i) };
                client.submit(&request).await.map_err(|e| e.to_string())?;
                let done = tokio::time::timeout(Duration::from_secs(30), rx)
                    .await
                    .map_err(|_| format!("job {job_id} did not finish within 30 s"))?
                    .map_err(|e| e.to_string())?;
                samples.push(done - t);
            }
            Ok::<_, String>(samples)
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    let fig = figures(all, wall.elapsed());
    listener.abort();
    Ok(fig)
}

pub fn bench_config(slots: usize) -> ClusterConfig {
    let mut config = ClusterConfig::default();
    config.node.name = "bench".into();
    config.node.slots = (0..slots).map(|i| format!("cpu:{i}")).collect();
    config.node.metrics_addr = String::new();
    config.models = vec![ModelConfig {
        name: "noop".into(),
        engine: EngineConfig::Noop { artifact_bytes: 0 },
        timeout_ms: 10_000,
        max_attempts: 3,
        result_ttl_s: None,
        slots: vec![],
        required_inputs: vec![],
        run_stage: String::new(),
        stages: vec![],
    }];
    config
}

pub async fn run(opts: BenchOptions) -> Result<BenchReport, String> {
    let server = match &opts.nats {
        Some(_) => None,
        None => Some(NatsServer::start_temp().map_err(|e| e.to_string())?),
    };
    let url = opts.nats.clone().unwrap_or_else(|| server.as_ref().expect("started").url());
    let mut config = bench_config(opts.slots);
    if opts.nats.is_some() {
        // An existing server may want credentials or TLS: the KILN_NATS_* variables.
        config.nats.apply_env(|k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    }
    config.nats.url = url.clone();
    config.validate().map_err(|e| e.to_string())?;
    let prefix = config.nats.prefix.clone();
    let nats = config.nats.clone();
    let node = RunningNode::start(config).await.map_err(|e| e.to_string())?;
    let client = Client::connect_with(&nats).await.map_err(|e| e.to_string())?;
    let js = jetstream::new(client.nats().clone());

    // Warm up both paths (connections, consumers, first-use allocations).
    floor(&js, 50, 1).await?;
    kiln(&client, &prefix, 20, 1).await?;

    let floor_latency = floor(&js, opts.jobs.min(2000), 1).await?;
    let kiln_latency = kiln(&client, &prefix, opts.jobs.min(2000), 1).await?;
    let floor_throughput = floor(&js, opts.jobs, opts.concurrency).await?;
    let kiln_throughput = kiln(&client, &prefix, opts.jobs, opts.concurrency).await?;
    node.shutdown(Duration::from_secs(5)).await;
    Ok(BenchReport { floor_latency, floor_throughput, kiln_latency, kiln_throughput })
}

pub fn print(report: &BenchReport, opts: &BenchOptions) {
    println!(
        "kiln bench: {} no-op jobs, {} slots, concurrency {} (same nats-server for both rows)",
        opts.jobs, opts.slots, opts.concurrency
    );
    println!();
    println!("sequential (1 in flight)            p50 ms    p99 ms    per s");
    let row = |name: &str, f: &Figures| println!("  {name:<32} {:>8.3}  {:>8.3}  {:>7.0}", f.p50_ms, f.p99_ms, f.per_second);
    row("raw JetStream pub/pull/ack", &report.floor_latency);
    row("kiln submit -> terminal event", &report.kiln_latency);
    println!("  ratio kiln/floor p50: {:.2}x", report.kiln_latency.p50_ms / report.floor_latency.p50_ms.max(1e-9));
    println!();
    println!("concurrent ({} in flight)            p50 ms    p99 ms    per s", opts.concurrency);
    row("raw JetStream pub/pull/ack", &report.floor_throughput);
    row("kiln submit -> terminal event", &report.kiln_throughput);
    println!("  ratio kiln/floor throughput: {:.3}x", report.kiln_throughput.per_second / report.floor_throughput.per_second.max(1e-9));
}

/// `kiln bench --torchscript`: Kiln's per-job overhead around a forward pass of a fixture
/// model, against the same forward pass called directly through tch in the same process; and
/// jobs/s with and without dynamic batching.
#[derive(Debug, Clone)]
pub struct TorchBenchOptions {
    /// The TorchScript file (a plain model taking one `[1,4]` tensor, as the `affine` fixture).
    pub model_file: std::path::PathBuf,
    /// `cpu:0`, or `cuda:0` on a GPU machine.
    pub slot: String,
    pub jobs: usize,
    pub concurrency: usize,
    pub max_batch: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TorchReport {
    pub device: String,
    pub cuda_available: bool,
    pub direct_forward: Figures,
    pub kiln_sequential: Figures,
    pub kiln_unbatched: Figures,
    pub kiln_batched: Figures,
}

fn torch_config(url: &str, opts: &TorchBenchOptions, max_batch: usize) -> ClusterConfig {
    let mut config = bench_config(1);
    config.nats.url = url.to_string();
    config.node.slots = vec![opts.slot.clone()];
    let settings = format!(
        "[[models]]\nname = \"affine\"\n[models.engine]\nkind = \"torchscript\"\npath = {:?}\ninputs = [{{ name = \"x\", kind = \"tensor\" }}]\noutputs = [{{ name = \"output\", codec = \"json\" }}]\nmax_batch = {max_batch}\nmax_batch_delay_ms = {}\n",
        opts.model_file.display().to_string(),
        if max_batch > 1 { 2 } else { 0 }
    );
    config.models = ClusterConfig::from_toml(&settings, "bench").expect("bench model config").models;
    config
}

fn affine_job(i: usize) -> SubmitRequest {
    let x = serde_json::json!([[i as f32, 1.0, 2.0, 3.0]]);
    SubmitRequest {
        model: "affine".into(),
        inputs: [("x".to_string(), kiln_core::protocol::InputValue::Inline(x))].into(),
        ..Default::default()
    }
}

async fn kiln_torch(client: &Client, n: usize, concurrency: usize) -> Result<Figures, String> {
    kiln_jobs(client, "kiln", n, concurrency, "affine", affine_job).await
}

pub async fn run_torchscript(opts: TorchBenchOptions) -> Result<TorchReport, String> {
    let device = match kiln_core::config::parse_slot(&opts.slot) {
        Some(kiln_core::config::SlotDevice::Cuda(n)) if tch::Cuda::is_available() => tch::Device::Cuda(n as usize),
        Some(kiln_core::config::SlotDevice::Cuda(_)) => return Err(format!("{} asked for, but CUDA is not available here", opts.slot)),
        _ => tch::Device::Cpu,
    };
    // The floor: the same forward pass through tch, in this process, no Kiln around it.
    let module = tch::CModule::load_on_device(&opts.model_file, device).map_err(|e| e.to_string())?;
    let direct = tokio::task::spawn_blocking(move || {
        let _guard = tch::no_grad_guard();
        let mut samples = Vec::new();
        let wall = Instant::now();
        for i in 0..2000 {
            let x = tch::Tensor::from_slice(&[i as f32, 1.0, 2.0, 3.0]).reshape([1, 4]).to_device(device);
            let t = Instant::now();
            let y = module.forward_ts(&[x]).expect("forward");
            let _ = Vec::<f32>::try_from(y.flatten(0, -1).to_device(tch::Device::Cpu)).expect("copy back");
            samples.push(t.elapsed());
        }
        figures(samples, wall.elapsed())
    })
    .await
    .map_err(|e| e.to_string())?;

    let server = NatsServer::start_temp().map_err(|e| e.to_string())?;
    let mut sequential = None;
    let mut results = vec![];
    for max_batch in [1, opts.max_batch.max(2)] {
        let node = RunningNode::start(torch_config(&server.url(), &opts, max_batch)).await.map_err(|e| e.to_string())?;
        let client = Client::connect(&server.url(), "kiln").await.map_err(|e| e.to_string())?;
        kiln_torch(&client, 20, 1).await?; // load the model, warm the paths
        if sequential.is_none() {
            sequential = Some(kiln_torch(&client, opts.jobs.min(500), 1).await?);
        }
        results.push(kiln_torch(&client, opts.jobs, opts.concurrency).await?);
        node.shutdown(Duration::from_secs(5)).await;
    }
    Ok(TorchReport {
        device: format!("{device:?}"),
        cuda_available: tch::Cuda::is_available(),
        direct_forward: direct,
        kiln_sequential: sequential.expect("measured"),
        kiln_batched: results.pop().expect("measured"),
        kiln_unbatched: results.pop().expect("measured"),
    })
}

pub fn print_torchscript(report: &TorchReport, opts: &TorchBenchOptions) {
    println!(
        "kiln bench --torchscript: {} on {} ({}; CUDA available: {})",
        opts.model_file.display(),
        opts.slot,
        report.device,
        report.cuda_available
    );
    println!();
    println!("sequential (1 in flight)              p50 ms    p99 ms    per s");
    let row = |name: &str, f: &Figures| println!("  {name:<34} {:>8.3}  {:>8.3}  {:>7.0}", f.p50_ms, f.p99_ms, f.per_second);
    row("direct tch forward (same process)", &report.direct_forward);
    row("kiln submit -> completed", &report.kiln_sequential);
    println!(
        "  kiln overhead per job (p50): {:.3} ms; ratio {:.1}x",
        report.kiln_sequential.p50_ms - report.direct_forward.p50_ms,
        report.kiln_sequential.p50_ms / report.direct_forward.p50_ms.max(1e-9)
    );
    println!();
    println!("concurrent ({} in flight, {} jobs)", opts.concurrency, opts.jobs);
    row("kiln, no batching (max_batch 1)", &report.kiln_unbatched);
    row(&format!("kiln, batching (max_batch {})", opts.max_batch.max(2)), &report.kiln_batched);
    println!("  batched/unbatched throughput: {:.2}x", report.kiln_batched.per_second / report.kiln_unbatched.per_second.max(1e-9));
}
