//! `kiln bench`: runs no-op jobs through a real node and prints submit-to-terminal latency and
//! throughput beside the raw NATS floor measured in the same run on the same server (a bare
//! JetStream publish, pull, ack round trip), with the ratio.
//!
//! Then the same jobs on a node that exports its spans over OTLP (`bench_tracing`): the cost
//! of tracing per job, as ratios to the rows above.
//!
//! Kiln's latency is measured from sending the submit request to receiving the job's terminal
//! event (subscribed before submitting); the floor's from publishing to acking the pulled message.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use kiln_core::config::{ClusterConfig, EngineConfig, ModelConfig};
use kiln_core::nats::NatsServer;
use kiln_core::protocol::SubmitRequest;

#[cfg(feature = "torch")]
use crate::in_process::NodeStarter;
use kiln_client::Client;

pub use crate::bench_node::{cpu_time, figures, kiln, kiln_fair, BenchOptions, CpuPerJob, Figures, FAIR_USERS};
use crate::bench_node::{kiln_jobs, CpuMeter, NodeChild};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub floor_latency: Figures,
    pub floor_throughput: Figures,
    pub kiln_latency: Figures,
    pub kiln_throughput: Figures,
    /// As `kiln_throughput`, the jobs from [`FAIR_USERS`] users taken in fair order.
    pub kiln_fair_throughput: Figures,
    pub cpu_sequential: CpuPerJob,
    pub cpu_concurrent: CpuPerJob,
    /// The floor's CPU: the bench process (publisher, puller, acker) and nats-server.
    pub cpu_floor: CpuPerJob,
    pub duty_cycle: Option<Figures>,
    pub work_ms: u64,
    pub ops: OpsPerJob,
    /// Replicas of Kiln's streams and of the floor's (`nats.replicas`).
    pub replicas: usize,
    /// The same jobs on a node exporting its spans (OTLP): the cost of tracing per job.
    pub tracing: crate::bench_tracing::TracingCost,
}

/// Bare JetStream: `concurrency` loops of publish (acked) -> pull one -> ack, `n` in all, on a
/// stream with as many replicas as Kiln's (`nats.replicas`, `KILN_NATS_REPLICAS`).
async fn floor(js: &jetstream::Context, n: usize, concurrency: usize, replicas: usize) -> Result<Figures, String> {
    let s = js
        .get_or_create_stream(stream::Config {
            name: "BENCH_FLOOR".into(),
            subjects: vec!["bench.floor.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    // Consumers first, outside the clock: on a cluster each is a replicated group whose
    // creation took longer than the run itself.
    let mut consumers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
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
        consumers.push(c);
    }
    let mut tasks = vec![];
    let wall = Instant::now();
    for (w, c) in consumers.into_iter().enumerate() {
        let per = n / concurrency + usize::from(w < n % concurrency);
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

pub fn bench_config(slots: usize) -> ClusterConfig {
    let mut config = ClusterConfig::default();
    config.node.name = "bench".into();
    config.node.slots = (0..slots).map(|i| format!("cpu:{i}")).collect();
    config.node.metrics_addr = String::new();
    config.models = vec![ModelConfig {
        name: "noop".into(),
        engine: EngineConfig::Noop { artifact_bytes: 0, work_ms: 0 },
        timeout_ms: 10_000,
        max_attempts: 3,
        result_ttl_s: None,
        slots: vec![],
        gpus: 1,
        required_inputs: vec![],
        run_stage: String::new(),
        stages: vec![],
        params: vec![],
        stage_names: Default::default(),
        preview_interval_ms: 0,
        min_warm: 0,
    }];
    config
}

/// What one no-op job costs in NATS operations, by kind, as nats-server routed them: a
/// wiretap subscription on `>` sees every message of the account (client publishes, requests,
/// the server's replies and deliveries), classified by subject.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OpsPerJob {
    pub jobs: usize,
    /// (kind, messages per job), in the order of [`OP_KINDS`].
    pub by_kind: Vec<(String, f64)>,
    /// From the monitoring endpoint, before and after: every message the server received
    /// (`/varz` in_msgs) and sent (out_msgs, less the wiretap's own copies), JetStream API
    /// requests (`/jsz` api.total), and the messages stored per stream (`last_seq`).
    pub server_in_msgs: f64,
    pub server_out_msgs: f64,
    pub js_api_requests: f64,
    pub stored_by_stream: Vec<(String, f64)>,
}

/// The kinds of [`classify`], in the order the table prints them.
pub const OP_KINDS: [&str; 18] = [
    "kiln API requests (kiln.api.*)",
    "events published (KILN_EVENTS)",
    "queue publishes (KILN_JOBS)",
    "queue pull requests",
    "queue acks (+ACK)",
    "queue in-progress / nak / term",
    "job record reads (KV get)",
    "job record writes (KV put/CAS)",
    "registry writes (KV)",
    "registry and other KV reads",
    "other KV writes",
    "event stream reads (last event)",
    "object-store chunk/meta publishes",
    "other JetStream API requests",
    "replies to requests (_INBOX.*)",
    "other core messages",
    "JetStream deliveries (queue, KV watches)",
    "API advisories (sent only for this wiretap)",
];

/// The kinds that are not the job's own traffic: advisories exist only because the wiretap
/// listens on `>`.
const NOT_COUNTED: usize = 17;

/// Which [`OP_KINDS`] entry a message is, by its subject (and, for acks, its body). A
/// JetStream delivery keeps the subject it was published on and carries a `$JS.ACK.` reply
/// subject: that tells it from the publish.
pub fn classify(prefix: &str, subject: &str, reply: Option<&str>, payload: &[u8]) -> usize {
    let under = |p: &str| subject.strip_prefix(p);
    if reply.is_some_and(|r| r.starts_with("$JS.ACK.")) {
        return 16;
    }
    if under("$JS.EVENT.ADVISORY.").is_some() {
        return NOT_COUNTED;
    }
    if let Some(rest) = under(&format!("{prefix}.")) {
        return match rest.split('.').next() {
            Some("api") => 0,
            Some("events") => 1,
            Some("jobs") => 2,
            _ => 15,
        };
    }
    if under("$JS.API.CONSUMER.MSG.NEXT.").is_some() {
        return 3;
    }
    if under("$JS.ACK.").is_some() {
        let body = payload.trim_ascii();
        return if body.is_empty() || body == b"+ACK" || body.starts_with(b"+ACK ") { 4 } else { 5 };
    }
    if let Some(rest) = under("$JS.API.DIRECT.GET.") {
        let stream = rest.split('.').next().unwrap_or_default();
        let upper = prefix.to_uppercase().replace('-', "_");
        return if stream == format!("KV_{prefix}_jobs") {
            6
        } else if stream.starts_with("KV_") {
            9
        } else if stream == format!("{upper}_EVENTS") {
            11
        } else {
            13
        };
    }
    if let Some(rest) = under("$KV.") {
        let bucket = rest.split('.').next().unwrap_or_default();
        return if bucket == format!("{prefix}_jobs") {
            7
        } else if bucket == format!("{prefix}_gpus") || bucket == format!("{prefix}_nodes") {
            8
        } else {
            10
        };
    }
    if under("$O.").is_some() {
        return 12;
    }
    if under("$JS.").is_some() {
        return 13;
    }
    if under("_INBOX.").is_some() {
        return 14;
    }
    15
}

/// The monitoring endpoint's counters at one moment.
#[derive(Debug, Clone, Default)]
struct ServerCounters {
    in_msgs: u64,
    out_msgs: u64,
    api_total: u64,
    last_seq: std::collections::BTreeMap<String, u64>,
}

async fn server_counters(http: &reqwest::Client, monitor: &str) -> Result<ServerCounters, String> {
    let get = |path: &'static str| async move {
        http.get(format!("{monitor}{path}"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json::<serde_json::Value>()
            .await
            .map_err(|e| e.to_string())
    };
    let varz = get("/varz").await?;
    let jsz = get("/jsz?streams=true").await?;
    let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut last_seq = std::collections::BTreeMap::new();
    for account in jsz["account_details"].as_array().into_iter().flatten() {
        for stream in account["stream_detail"].as_array().into_iter().flatten() {
            last_seq.insert(stream["name"].as_str().unwrap_or_default().to_string(), num(&stream["state"]["last_seq"]));
        }
    }
    Ok(ServerCounters { in_msgs: num(&varz["in_msgs"]), out_msgs: num(&varz["out_msgs"]), api_total: num(&jsz["api"]["total"]), last_seq })
}

/// Runs `n` sequential no-op jobs with the wiretap on and the monitoring endpoint read
/// before and after.
async fn count_ops(client: &Client, nats: &kiln_core::config::NatsConfig, monitor: Option<&str>, n: usize) -> Result<OpsPerJob, String> {
    let prefix = nats.prefix.as_str();
    let tap_conn = kiln_core::nats::resources::connect(nats, "kiln-bench-wiretap").await.map_err(|e| e.to_string())?;
    let mut tap = tap_conn.subscribe(">").await.map_err(|e| e.to_string())?;
    tap_conn.flush().await.map_err(|e| e.to_string())?;
    let counts = Arc::new(Mutex::new([0u64; OP_KINDS.len()]));
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (c, s, p) = (counts.clone(), seen.clone(), prefix.to_string());
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on = counting.clone();
    let tapper = tokio::spawn(async move {
        while let Some(m) = tap.next().await {
            if on.load(std::sync::atomic::Ordering::Acquire) {
                let kind = classify(&p, &m.subject, m.reply.as_deref(), &m.payload);
                if kind != NOT_COUNTED {
                    s.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                c.lock().expect("lock")[kind] += 1;
            }
        }
    });
    let http = reqwest::Client::new();
    // Let the previous run's tail (acks, registry writes) pass before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = match monitor {
        Some(m) => Some(server_counters(&http, m).await?),
        None => None,
    };
    counting.store(true, std::sync::atomic::Ordering::Release);
    kiln(client, prefix, n, 1).await?;
    // The last job's ack and registry writes come after its terminal event.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tap_conn.flush().await.map_err(|e| e.to_string())?;
    counting.store(false, std::sync::atomic::Ordering::Release);
    let after = match monitor {
        Some(m) => Some(server_counters(&http, m).await?),
        None => None,
    };
    tapper.abort();
    let per = |x: u64| x as f64 / n as f64;
    let counts = *counts.lock().expect("lock");
    let mut ops =
        OpsPerJob { jobs: n, by_kind: OP_KINDS.iter().zip(counts).map(|(k, c)| (k.to_string(), per(c))).collect(), ..Default::default() };
    if let (Some(b), Some(a)) = (before, after) {
        ops.server_in_msgs = per(a.in_msgs - b.in_msgs);
        // Every message the wiretap got is one more the server sent (and each advisory too).
        let tapped = seen.load(std::sync::atomic::Ordering::Relaxed) + counts[NOT_COUNTED];
        ops.server_out_msgs = per((a.out_msgs - b.out_msgs).saturating_sub(tapped));
        ops.js_api_requests = per(a.api_total - b.api_total);
        ops.stored_by_stream = a
            .last_seq
            .iter()
            .map(|(name, seq)| (name.clone(), per(seq - b.last_seq.get(name).copied().unwrap_or(0))))
            .filter(|(_, v)| *v > 0.0)
            .collect();
    }
    Ok(ops)
}

/// Jobs of `model` at `concurrency` in flight, to read a slot's duty cycle.
async fn duty_cycle(client: &Client, prefix: &str, n: usize, concurrency: usize) -> Result<Figures, String> {
    kiln_jobs(client, prefix, n, concurrency, |_| SubmitRequest { model: "hold".into(), ..Default::default() }).await
}

pub async fn run(opts: BenchOptions) -> Result<BenchReport, String> {
    let server = match &opts.nats {
        Some(_) => None,
        None => Some(NatsServer::start_temp_monitored().map_err(|e| e.to_string())?),
    };
    let url = opts.nats.clone().unwrap_or_else(|| server.as_ref().expect("started").url());
    use kiln_core::config::NatsRules;
    let mut nats = kiln_core::config::NatsConfig::default();
    if opts.nats.is_some() {
        // An existing server may want credentials or TLS: the KILN_NATS_* variables.
        nats = kiln_core::config::ClusterConfig::load_nats(None).map_err(|e| e.to_string())?;
    }
    nats.url = url.clone();
    if let Some(replicas) = opts.replicas {
        nats.replicas = replicas;
    }
    nats.validate().map_err(|e| e.to_string())?;
    let prefix = nats.prefix.clone();
    let client = Client::connect_with(&nats).await.map_err(|e| e.to_string())?;
    let node = NodeChild::start(&url, nats.replicas, opts.slots, opts.work_ms, &client).await?;
    let js = jetstream::new(client.nats().clone());
    let server_pid = server.as_ref().and_then(|s| s.pid());
    let monitor = server.as_ref().and_then(|s| s.monitor_url());

    // Warm up both paths (connections, consumers, first-use allocations).
    floor(&js, 50, 1, nats.replicas).await?;
    kiln(&client, &prefix, 20, 1).await?;

    let floor_latency = floor(&js, opts.jobs.min(2000), 1, nats.replicas).await?;
    let meter = CpuMeter::start(node.pid(), server_pid);
    let kiln_latency = kiln(&client, &prefix, opts.jobs.min(2000), 1).await?;
    let cpu_sequential = meter.per_job(kiln_latency.count);
    let meter = CpuMeter::start(std::process::id(), server_pid);
    let floor_throughput = floor(&js, opts.jobs, opts.concurrency, nats.replicas).await?;
    let cpu_floor = meter.per_job(floor_throughput.count);
    let meter = CpuMeter::start(node.pid(), server_pid);
    let kiln_throughput = kiln(&client, &prefix, opts.jobs, opts.concurrency).await?;
    let cpu_concurrent = meter.per_job(kiln_throughput.count);
    kiln_fair(&client, &prefix, 20 * FAIR_USERS, opts.concurrency).await?;
    let kiln_fair_throughput = kiln_fair(&client, &prefix, opts.jobs, opts.concurrency).await?;
    let duty = if opts.work_ms > 0 {
        let n = ((2000 / opts.work_ms.max(1)) as usize).clamp(50, 1000);
        duty_cycle(&client, &prefix, 10, 4).await?;
        Some(duty_cycle(&client, &prefix, n, 4).await?)
    } else {
        None
    };
    let ops = count_ops(&client, &nats, monitor.as_deref(), opts.jobs.clamp(20, 200)).await?;
    drop(node);
    let tracing = crate::bench_tracing::run(&url, nats.replicas, &client, &prefix, &opts, server_pid).await?;
    Ok(BenchReport {
        floor_latency,
        floor_throughput,
        kiln_latency,
        kiln_throughput,
        kiln_fair_throughput,
        cpu_sequential,
        cpu_concurrent,
        cpu_floor,
        duty_cycle: duty,
        work_ms: opts.work_ms,
        ops,
        replicas: nats.replicas,
        tracing,
    })
}

pub fn print(report: &BenchReport, opts: &BenchOptions) {
    println!(
        "kiln bench: {} no-op jobs, {} slots (slot_prefetch 1), concurrency {}, {} replica(s) (the same NATS for both rows; the node is its own process)",
        opts.jobs, opts.slots, opts.concurrency, report.replicas
    );
    println!();
    println!("sequential (1 in flight)            p50 ms    p99 ms    per s");
    let row = |name: &str, f: &Figures| println!("  {name:<32} {:>8.3}  {:>8.3}  {:>7.0}", f.p50_ms, f.p99_ms, f.per_second);
    row("raw JetStream pub/pull/ack", &report.floor_latency);
    row("kiln submit -> terminal event", &report.kiln_latency);
    println!(
        "  ratio kiln/floor p50: {:.2}x (goal <= 2.5x); p99 {:.2} ms (goal <= 5 ms)",
        report.kiln_latency.p50_ms / report.floor_latency.p50_ms.max(1e-9),
        report.kiln_latency.p99_ms
    );
    println!();
    println!("concurrent ({} in flight)            p50 ms    p99 ms    per s", opts.concurrency);
    row("raw JetStream pub/pull/ack", &report.floor_throughput);
    row("kiln submit -> terminal event", &report.kiln_throughput);
    println!(
        "  ratio kiln/floor throughput: {:.3}x (goal >= 0.5x)",
        report.kiln_throughput.per_second / report.floor_throughput.per_second.max(1e-9)
    );
    row(&format!("kiln, fair share ({FAIR_USERS} users)"), &report.kiln_fair_throughput);
    println!(
        "  ratio fair share/first-in-first-out throughput: {:.3}x (goal >= 0.9x)",
        report.kiln_fair_throughput.per_second / report.kiln_throughput.per_second.max(1e-9)
    );
    println!();
    let server = |c: &CpuPerJob| c.server_us.map(|s| format!("{s:.0}")).unwrap_or_else(|| "n/a (--nats)".into());
    let total = |c: &CpuPerJob| c.node_us + c.server_us.unwrap_or(0.0);
    println!("CPU per job, from /proc (user + system)      node us   nats-server us   total us");
    for (name, c) in [("kiln, sequential", &report.cpu_sequential), ("kiln, concurrent", &report.cpu_concurrent)] {
        println!("  {name:<40} {:>8.0}  {:>15}  {:>9.0}", c.node_us, server(c), total(c));
    }
    println!(
        "  {:<40} {:>8.0}  {:>15}  {:>9.0}",
        "raw JetStream, concurrent (bench process)",
        report.cpu_floor.node_us,
        server(&report.cpu_floor),
        total(&report.cpu_floor)
    );
    println!("  goal: kiln total <= 150 us per job");
    if let Some(duty) = &report.duty_cycle {
        let ideal = 1000.0 / report.work_ms as f64;
        println!();
        println!("GPU slot duty cycle: one slot, each job holds it {} ms, 4 in flight", report.work_ms);
        row("kiln jobs", duty);
        println!(
            "  {:.0} jobs/s of an ideal {ideal:.0}: duty cycle {:.1} % (goal >= 90 %)",
            duty.per_second,
            100.0 * duty.per_second / ideal
        );
    }
    let ops = &report.ops;
    println!();
    println!("NATS messages per no-op job ({} sequential jobs; wiretap on '>', by subject)", ops.jobs);
    for (kind, per) in &ops.by_kind {
        if *per > 0.0 {
            println!("  {kind:<44} {per:>6.2}");
        }
    }
    let all: f64 = ops.by_kind.iter().enumerate().filter(|(i, _)| *i != NOT_COUNTED).map(|(_, (_, p))| p).sum();
    println!("  {:<44} {all:>6.2}", "all (less the advisories)");
    if ops.server_in_msgs > 0.0 {
        println!("nats-server monitoring endpoint, per job (before/after)");
        println!("  {:<44} {:>6.2}", "messages received (/varz in_msgs)", ops.server_in_msgs);
        println!("  {:<44} {:>6.2}", "messages sent, less the wiretap (out_msgs)", ops.server_out_msgs);
        println!("  {:<44} {:>6.2}", "JetStream API requests (/jsz api.total)", ops.js_api_requests);
        for (stream, per) in &ops.stored_by_stream {
            println!("  {:<44} {per:>6.2}", format!("stored in {stream}"));
        }
    }
    crate::bench_tracing::print(&report.tracing, opts.concurrency);
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

#[cfg(feature = "torch")]
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

#[cfg(feature = "torch")]
fn affine_job(i: usize) -> SubmitRequest {
    let x = serde_json::json!([[i as f32, 1.0, 2.0, 3.0]]);
    SubmitRequest {
        model: "affine".into(),
        inputs: [("x".to_string(), kiln_core::protocol::InputValue::Inline(x))].into(),
        ..Default::default()
    }
}

#[cfg(feature = "torch")]
async fn kiln_torch(client: &Client, n: usize, concurrency: usize) -> Result<Figures, String> {
    kiln_jobs(client, "kiln", n, concurrency, affine_job).await
}

/// A build without the engines has no TorchScript to measure.
#[cfg(not(feature = "torch"))]
pub async fn run_torchscript(_opts: TorchBenchOptions, _nodes: &dyn crate::in_process::NodeStarter) -> Result<TorchReport, String> {
    Err(kiln_core::engine::NO_TORCH.to_string())
}

/// Runs the nodes it measures in this process, started by `nodes`.
#[cfg(feature = "torch")]
pub async fn run_torchscript(opts: TorchBenchOptions, nodes: &dyn NodeStarter) -> Result<TorchReport, String> {
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
        let node = nodes.start(torch_config(&server.url(), &opts, max_batch)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_classified_by_subject() {
        let kind = |subject: &str, body: &[u8]| OP_KINDS[classify("kiln", subject, None, body)];
        assert_eq!(kind("kiln.api.submit", b""), "kiln API requests (kiln.api.*)");
        assert_eq!(kind("kiln.events.j1", b""), "events published (KILN_EVENTS)");
        assert_eq!(kind("kiln.jobs.noop.normal", b""), "queue publishes (KILN_JOBS)");
        assert_eq!(kind("$JS.API.CONSUMER.MSG.NEXT.KILN_JOBS.noop-normal", b""), "queue pull requests");
        assert_eq!(kind("$JS.ACK.KILN_JOBS.c.1.2.3.4.5", b"+ACK"), "queue acks (+ACK)");
        assert_eq!(kind("$JS.ACK.KILN_JOBS.c.1.2.3.4.5", b""), "queue acks (+ACK)");
        assert_eq!(kind("$JS.ACK.KILN_JOBS.c.1.2.3.4.5", b"+WPI"), "queue in-progress / nak / term");
        assert_eq!(kind("$JS.API.DIRECT.GET.KV_kiln_jobs.$KV.kiln_jobs.j1", b""), "job record reads (KV get)");
        assert_eq!(kind("$KV.kiln_jobs.j1", b""), "job record writes (KV put/CAS)");
        assert_eq!(kind("$KV.kiln_gpus.n.cpu_0", b""), "registry writes (KV)");
        assert_eq!(kind("$KV.kiln_batches.b", b""), "other KV writes");
        assert_eq!(kind("$JS.API.DIRECT.GET.KILN_EVENTS", b""), "event stream reads (last event)");
        assert_eq!(kind("$O.kiln_results_noop.C.x", b""), "object-store chunk/meta publishes");
        assert_eq!(kind("$JS.API.STREAM.INFO.KILN_JOBS", b""), "other JetStream API requests");
        assert_eq!(kind("_INBOX.abc.def", b""), "replies to requests (_INBOX.*)");
        assert_eq!(kind("elsewhere", b""), "other core messages");
        assert_eq!(kind("$JS.EVENT.ADVISORY.API", b""), "API advisories (sent only for this wiretap)");
        let delivered = classify("kiln", "kiln.jobs.noop.normal", Some("$JS.ACK.KILN_JOBS.noop-normal.1.2.3.4.0"), b"{}");
        assert_eq!(OP_KINDS[delivered], "JetStream deliveries (queue, KV watches)");
    }
}
