//! `kiln scale`, `bench`, `chaos`: the arguments and their reports; the measuring and the
//! storming themselves are the `kiln-tools` crate's, which gets this binary's in-process node
//! from [`InProcessNodes`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use futures::future::BoxFuture;
use kiln::node::RunningNode;
use kiln_core::config::ClusterConfig;
use kiln_tools::in_process::{NodeStarter, StartedNode};

use crate::cli::exit::Failure;

#[derive(Args)]
pub struct ScaleArgs {
    /// Cluster sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,30,100")]
    nodes: Vec<usize>,
    /// GPU slots (no-op) of each simulated node.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Seconds the idle cluster is watched for its steady-state rates.
    #[arg(long, default_value_t = 10)]
    window_s: u64,
    /// No-op jobs of the throughput run, and how many are kept in flight.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Jobs of the throughput run kept in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Control pings through the API after the idle window (each may open a session).
    #[arg(long, default_value_t = 20)]
    calls: usize,
    /// Measure the full mesh Kiln had before sessions opened on demand: every pair of
    /// nodes opens a session at the start and keeps it.
    #[arg(long)]
    full_mesh: bool,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Jobs of each run.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Jobs kept in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// No-op slots of the node under test.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Use this NATS instead of starting a temp server.
    #[arg(long)]
    nats: Option<String>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Benchmark a TorchScript model instead: Kiln around a forward pass vs. tch directly,
    /// and throughput with and without dynamic batching.
    #[arg(long)]
    torchscript: bool,
    /// The TorchScript file for --torchscript (a plain model of one [1,4] tensor).
    #[arg(long, default_value = "examples/models/out/affine.pt")]
    model_file: PathBuf,
    /// The slot for --torchscript: cpu:0, or cuda:0 on a GPU machine.
    #[arg(long, default_value = "cpu:0")]
    slot: String,
    /// max_batch of the batching run of --torchscript.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Benchmark the HTTP gateway instead: HTTP submit -> SSE terminal event against the
    /// same over NATS, SSE fan-out to --sse-clients on one job with the gateway's RSS, and
    /// a --file-mb file up and down against the object store directly.
    #[arg(long)]
    http: bool,
    /// Benchmark webhook delivery instead: a no-op job's terminal event to a local receiver
    /// getting its signed POST, p50/p99 against a plain HTTP POST to the same receiver.
    #[arg(long)]
    webhooks: bool,
    /// SSE clients on one job for --http's fan-out run.
    #[arg(long, default_value_t = 1000)]
    sse_clients: usize,
    /// Size in MB of the file --http uploads and downloads.
    #[arg(long, default_value_t = 200)]
    file_mb: usize,
    /// The duty-cycle run: a no-op that holds its one slot this many ms, as a forward pass
    /// would; jobs/s against 1000/N. 0 skips it.
    #[arg(long, default_value_t = 5)]
    work_ms: u64,
    /// Replicas of every stream, Kiln's and the floor's (with --nats on a NATS cluster: 3).
    #[arg(long)]
    replicas: Option<usize>,
}

#[derive(Args)]
pub struct ChaosArgs {
    /// The seed of the storm's schedule: the same seed, the same submissions and faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `short` (CI: 120 submissions, 12 faults), `long` (2,000 and 200) or `cluster` (240
    /// and 20 on a three-server NATS cluster).
    #[arg(long, default_value = "short")]
    profile: String,
    /// Submissions (overrides the profile's).
    #[arg(long)]
    jobs: Option<u32>,
    /// Faults injected (overrides the profile's).
    #[arg(long)]
    faults: Option<u32>,
    /// Node processes, at least 2 (overrides the profile's).
    #[arg(long)]
    nodes: Option<usize>,
    /// Submissions per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Simulated model time per step (each job runs 2 to 5 steps).
    #[arg(long)]
    step_ms: Option<u64>,
    /// Write the report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep the cluster's files (node logs, configs, downloaded artifacts) here.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The worker the chaos models run.
    #[arg(long, default_value = "examples/workers/demo_worker.py")]
    worker: PathBuf,
    /// The nodes' `node.slot_prefetch` (jobs claimed ahead per slot); the profile's 0 if unset.
    #[arg(long)]
    slot_prefetch: Option<usize>,
    /// Run on a cluster of this many nats-servers (3), every stream replicated on each, with
    /// the cluster's fault kinds too: a server SIGKILLed, the queue's leader SIGKILLed, a
    /// server partitioned off.
    #[arg(long)]
    nats_cluster: Option<usize>,
}

pub async fn scale(args: ScaleArgs) -> Result<(), Failure> {
    let ScaleArgs { nodes, slots, window_s, jobs, concurrency, calls, full_mesh, json } = args;
    let opts = kiln::scale::ScaleOptions {
        sizes: nodes,
        slots: slots.max(1),
        window: Duration::from_secs(window_s.max(1)),
        jobs,
        concurrency: concurrency.max(1),
        calls,
        full_mesh,
    };
    let binary = std::env::current_exe().map_err(|e| e.to_string())?;
    let reports = kiln::scale::run(opts, binary).await?;
    kiln::scale::print(&reports);
    Ok(write_json(json, &reports)?)
}

/// `kiln bench`: the no-op run against the JetStream floor, or `--torchscript`, `--http`, `--webhooks`.
pub async fn bench(args: BenchArgs) -> Result<(), Failure> {
    if args.torchscript {
        let opts = kiln::bench::TorchBenchOptions {
            model_file: args.model_file,
            slot: args.slot,
            jobs: args.jobs,
            concurrency: args.concurrency.max(1),
            max_batch: args.max_batch,
        };
        let report = kiln::bench::run_torchscript(opts.clone(), &InProcessNodes).await?;
        kiln::bench::print_torchscript(&report, &opts);
        return Ok(write_json(args.json, &report)?);
    }
    if args.webhooks {
        let opts = kiln::bench_webhooks::WebhookBenchOptions { jobs: args.jobs.min(2000) };
        let report = kiln::bench_webhooks::run(opts.clone(), &InProcessNodes).await?;
        kiln::bench_webhooks::print(&report, &opts);
        return Ok(write_json(args.json, &report)?);
    }
    if args.http {
        let opts = kiln::bench_http::HttpBenchOptions {
            jobs: args.jobs.min(2000),
            sse_clients: args.sse_clients,
            file_bytes: args.file_mb * 1_000_000,
            slots: args.slots.max(1),
        };
        let report = kiln::bench_http::run(opts.clone(), &InProcessNodes).await?;
        kiln::bench_http::print(&report, &opts);
        return Ok(write_json(args.json, &report)?);
    }
    let opts = kiln::bench::BenchOptions {
        jobs: args.jobs,
        concurrency: args.concurrency.max(1),
        slots: args.slots.max(1),
        nats: args.nats,
        work_ms: args.work_ms,
        replicas: args.replicas,
    };
    let report = kiln::bench::run(opts.clone()).await?;
    kiln::bench::print(&report, &opts);
    Ok(write_json(args.json, &report)?)
}

/// `kiln chaos`: the profile with the command line's changes, a run, and its verdict as the
/// exit status (4, [`crate::cli::exit::Exit::Invariant`], when an invariant failed).
pub async fn chaos(args: ChaosArgs) -> Result<(), Failure> {
    use kiln::chaos::{ChaosOptions, Profile};
    let mut p = match args.profile.as_str() {
        "short" => Profile::short(),
        "long" => Profile::long(),
        "cluster" => Profile::cluster(),
        other => return Err(Failure::usage(format!("unknown profile {other:?} (short, long or cluster)"))),
    };
    match args.nats_cluster {
        None => {}
        Some(n) if n >= 3 && n % 2 == 1 => {
            p.nats_servers = n;
            // Room for one fault of every kind, the cluster's three included.
            p.faults = p.faults.max(kiln::chaos::FaultKind::CLUSTER.len() as u32);
        }
        Some(1) => p.nats_servers = 1,
        Some(n) => {
            return Err(Failure::usage(format!("--nats-cluster {n}: a NATS cluster needs an odd number of servers, 3 or more (or 1)")))
        }
    }
    p.jobs = args.jobs.unwrap_or(p.jobs);
    p.faults = args.faults.unwrap_or(p.faults);
    p.nodes = args.nodes.unwrap_or(p.nodes).max(2);
    p.rate = args.rate.unwrap_or(p.rate);
    p.step_ms = args.step_ms.unwrap_or(p.step_ms);
    p.slot_prefetch = args.slot_prefetch.unwrap_or(p.slot_prefetch);
    let worker = std::fs::canonicalize(&args.worker).map_err(|e| format!("worker {}: {e}", args.worker.display()))?;
    let options = ChaosOptions {
        seed: args.seed,
        profile: p,
        node_binary: std::env::current_exe().map_err(|e| e.to_string())?,
        fault_points: kiln_core::fault::compiled_in(),
        python: std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into()),
        worker,
        work_dir: args.work_dir,
        report: args.report,
    };
    let report = kiln::chaos::run(options).await?;
    if report.passed {
        Ok(())
    } else {
        Err(Failure::invariant(format!("{} invariants failed", report.invariants.iter().filter(|i| !i.ok).count())))
    }
}

/// Writes a benchmark report as JSON when `--json` names a file.
fn write_json<T: serde::Serialize>(path: Option<PathBuf>, report: &T) -> Result<(), String> {
    match path {
        Some(p) => std::fs::write(&p, serde_json::to_vec_pretty(report).expect("json")).map_err(|e| format!("{}: {e}", p.display())),
        None => Ok(()),
    }
}

/// The runtime's node, started in this process for the benchmarks that run one beside their
/// client (the tools cannot name it: the `kiln` crate depends on theirs).
struct InProcessNodes;

impl NodeStarter for InProcessNodes {
    fn start(&self, config: ClusterConfig) -> BoxFuture<'_, Result<Box<dyn StartedNode>, String>> {
        Box::pin(async move {
            let node = RunningNode::start(config).await.map_err(|e| e.to_string())?;
            Ok(Box::new(InProcessNode(node)) as Box<dyn StartedNode>)
        })
    }
}

struct InProcessNode(RunningNode);

impl StartedNode for InProcessNode {
    fn shutdown(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        Box::pin(self.0.shutdown(grace))
    }
}
