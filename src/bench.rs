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

fn figures(mut samples: Vec<Duration>, wall: Duration) -> Figures {
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

/// Kiln: `concurrency` loops of submit -> wait for the terminal event, `n` jobs in all.
async fn kiln(client: &Client, prefix: &str, n: usize, concurrency: usize) -> Result<Figures, String> {
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
            for _ in 0..per {
                // The id is derived from the idempotency key, so the waiter is registered
                // before the submit and a terminal event cannot race past it.
                let key = uuid::Uuid::new_v4().to_string();
                let job_id = crate::api::idempotent_job_id("noop", &key);
                let (tx, rx) = oneshot::channel();
                waiters.lock().expect("lock").insert(job_id.clone(), tx);
                let t = Instant::now();
                let request = SubmitRequest { model: "noop".into(), idempotency_key: Some(key), ..Default::default() };
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
    config.nats.url = url.clone();
    config.validate().map_err(|e| e.to_string())?;
    let prefix = config.nats.prefix.clone();
    let node = RunningNode::start(config).await.map_err(|e| e.to_string())?;
    let client = Client::connect(&url, &prefix).await.map_err(|e| e.to_string())?;
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
