//! The `kiln` command line. See `kiln --help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kiln::client::Client;
use kiln::node::RunningNode;
use kiln::table::{Align, Table};
use kiln_core::config::{ClusterConfig, NatsConfig};
use kiln_core::protocol::{BatchItemRequest, BatchSubmitRequest, ControlRequest, EventKind, InputValue, ListJobsRequest, SubmitRequest};

#[derive(Parser)]
#[command(name = "kiln", version, about = "A cluster runtime for GPU generation jobs over NATS")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node with an embedded nats-server (or join an existing NATS with --nats).
    Up(NodeArgs),
    /// Start a node that joins an existing NATS (`nats.url` or --nats).
    Node(NodeArgs),
    /// Serve the HTTP + SSE gateway and the web console: the NATS API over HTTP, the seeds'
    /// routes of `[[http.routes]]`, at `http.addr` (a NATS client like any other).
    Gateway(GatewayArgs),
    /// Submit a job.
    Submit(SubmitArgs),
    /// Batches: submit N items as one request, follow them, retry the failed ones.
    Batch {
        #[command(subcommand)]
        action: BatchCommand,
    },
    /// Show a job.
    Status {
        job_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Download a job's results into a folder (each artifact checked against its sha256);
    /// exits non-zero unless the job completed.
    Result {
        job_id: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Wait for the job to end first (otherwise a job still running is an error).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cancel a job (queued: it never runs; running: its worker is stopped).
    Cancel {
        job_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List jobs, newest first.
    Jobs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Only jobs that failed after their last attempt.
        #[arg(long)]
        dead_letter: bool,
        /// Only jobs with this label: name=value (repeat for several, all must match).
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the reply as JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the cluster's models: which nodes and slots serve each, where it is warm.
    Models {
        /// Print the reply as JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show every node and GPU slot of the cluster.
    Cluster {
        /// Print the reply as JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Ask a node to drain: it stops pulling, finishes its running jobs, leaves the registry
    /// and exits (as on SIGTERM). Nothing is lost or run twice.
    Drain {
        node: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Restart one GPU slot's inference actor, on any node (its running job is retried).
    RestartGpu {
        node: String,
        slot: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Time actor calls from one node to another through the actor cluster, beside plain NATS
    /// request/reply between the same two nodes.
    Ping {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 1000)]
        count: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Measure how a cluster's costs grow with its size: for each size, a fresh nats-server and
    /// that many light node processes of no-op slots on this machine (docs/ARCHITECTURE.md,
    /// "Scaling", keeps the table).
    Scale {
        /// Cluster sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,30,100")]
        nodes: Vec<usize>,
        #[arg(long, default_value_t = 8)]
        slots: usize,
        /// Seconds the idle cluster is watched for its steady-state rates.
        #[arg(long, default_value_t = 10)]
        window_s: u64,
        /// No-op jobs of the throughput run, and how many are kept in flight.
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
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
    },
    /// Benchmark no-op jobs against the raw JetStream floor.
    Bench {
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
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
        #[arg(long, default_value_t = 1000)]
        sse_clients: usize,
        #[arg(long, default_value_t = 200)]
        file_mb: usize,
        /// The duty-cycle run: a no-op that holds its one slot this many ms, as a forward pass
        /// would; jobs/s against 1000/N. 0 skips it.
        #[arg(long, default_value_t = 5)]
        work_ms: u64,
        /// Replicas of every stream, Kiln's and the floor's (with --nats on a NATS cluster: 3).
        #[arg(long)]
        replicas: Option<usize>,
    },
    /// Storm a local cluster (its own nats-server and node processes) with jobs while injecting
    /// faults on a seeded schedule; check that nothing was lost; print and write a report.
    /// Exit status 1 when an invariant fails. Inference panics need a build with
    /// `--features fault-injection`.
    Chaos {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// `short` (CI: 120 submissions, 12 faults), `long` (2,000 and 200) or `cluster` (240
        /// and 20 on a three-server NATS cluster).
        #[arg(long, default_value = "short")]
        profile: String,
        #[arg(long)]
        jobs: Option<u32>,
        #[arg(long)]
        faults: Option<u32>,
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
    },
    /// The demo: a local server and node, a batch of jobs on the demo model, results to a folder.
    Demo {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 6)]
        jobs: usize,
        #[arg(long, default_value = "demo-results")]
        out: PathBuf,
        #[arg(long, default_value = "demo")]
        model: String,
        /// After the jobs, keep the node and the web console (http.addr) up until Ctrl-C.
        #[arg(long)]
        serve: bool,
    },
}

#[derive(Args)]
struct NodeArgs {
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    /// NATS URL, or "embedded" (overrides nats.url and KILN_NATS_URL).
    #[arg(long)]
    nats: Option<String>,
    #[arg(long)]
    node_name: Option<String>,
    /// Comma-separated slots, e.g. cuda:0,cuda:1 or cpu:0.
    #[arg(long)]
    slots: Option<String>,
    /// host:port of the Prometheus endpoint; "" disables it.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// How long a graceful stop (SIGTERM, Ctrl-C) waits for running jobs.
    #[arg(long, default_value_t = 30)]
    drain_grace_s: u64,
    /// host:port of the HTTP gateway `kiln up` starts (overrides http.addr); "" disables it.
    #[arg(long)]
    http_addr: Option<String>,
}

#[derive(Args)]
struct GatewayArgs {
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    /// NATS URL (overrides nats.url and KILN_NATS_URL); "embedded" means the server `kiln up`
    /// started on this machine.
    #[arg(long)]
    nats: Option<String>,
    /// host:port to serve (overrides http.addr).
    #[arg(long)]
    http_addr: Option<String>,
    /// Print the sha256 of an API key (what `[[http.api_keys]] sha256` stores) and exit.
    #[arg(long, value_name = "KEY")]
    hash_key: Option<String>,
}

/// How a client command reaches Kiln. Credentials and TLS come from the `[nats]` section of
/// `--config` and from the `KILN_NATS_*` variables (`KILN_NATS_USER`, `KILN_NATS_PASSWORD`,
/// `KILN_NATS_TOKEN`, `KILN_NATS_NKEY_SEED_FILE`, `KILN_NATS_CREDS_FILE`, `KILN_NATS_TLS_CA_FILE`...),
/// which win over the file; see docs/SECURITY.md.
#[derive(Args, Clone)]
struct ConnArgs {
    /// NATS URL [default: nats.url of --config, else nats://127.0.0.1:4222]
    #[arg(long, env = "KILN_NATS_URL")]
    nats: Option<String>,
    /// Prefix of subjects and buckets [default: nats.prefix of --config, else kiln]
    #[arg(long)]
    prefix: Option<String>,
    /// Connect as the `[nats]` section of this file says (URL, prefix, credentials, TLS).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Submit a batch: one item per line of --items (a JSON object of inline inputs, or
    /// `{"inputs": {..}, "params": {..}}`); prints the batch id, then follows it with --wait.
    Submit {
        model: String,
        /// A file (or `-` for stdin) with one item per line.
        #[arg(long)]
        items: PathBuf,
        /// A param every item gets: name=value (JSON if it parses, else a string).
        #[arg(short = 'p', long = "param")]
        params: Vec<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// A label every item gets: name=value.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// Identical items run once and share their results.
        #[arg(long)]
        reuse: bool,
        /// At most this many of the batch's jobs queued or running at once.
        #[arg(long)]
        max_concurrency: Option<u32>,
        /// A model to fall back to, in order, when an item fails on Kiln's side or its model
        /// has no live slot (repeat for several).
        #[arg(long = "fallback")]
        fallback_models: Vec<String>,
        /// Follow the batch to its end, download every item's results into --out/<batch
        /// id>/<index>/, and exit non-zero unless every item completed.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "kiln-results")]
        out: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show a batch: its summary and every item.
    Status {
        batch_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cancel every item of a batch that has not ended.
    Cancel {
        batch_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Run the failed and cancelled items of a finished batch again, as a new batch.
    Retry {
        batch_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Args)]
struct SubmitArgs {
    model: String,
    /// An inline input: name=value (JSON if it parses, else a string).
    #[arg(short = 'i', long = "input")]
    inputs: Vec<String>,
    /// A file input: name=path; uploaded to the files bucket first.
    #[arg(short = 'f', long = "file")]
    files: Vec<String>,
    /// A parameter: key=value (JSON if it parses, else a string).
    #[arg(short = 'p', long = "param")]
    params: Vec<String>,
    #[arg(long, default_value_t = 0)]
    priority: u8,
    #[arg(long)]
    idempotency_key: Option<String>,
    #[arg(long)]
    max_attempts: Option<u32>,
    /// A label for the job: name=value (a user id, a session id, your own job id).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Seconds from now after which the job must not start.
    #[arg(long)]
    deadline_s: Option<u64>,
    /// Reuse an identical earlier job's results (same model, input contents, params) when
    /// they are still within their TTL, instead of running again.
    #[arg(long)]
    reuse: bool,
    /// Follow progress until the job ends, then download the results.
    #[arg(long)]
    wait: bool,
    #[arg(long, default_value = "kiln-results")]
    out: PathBuf,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `name=value` pairs as labels (values kept as written).
fn parse_labels(pairs: &[String]) -> Result<kiln_core::protocol::Labels, String> {
    pairs
        .iter()
        .map(|s| s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not name=value")))
        .collect()
}

/// Downloads `artifacts` into `dir` (each checked against its sha256) and prints each path.
async fn download_all(client: &kiln::client::Client, artifacts: &[kiln_core::protocol::Artifact], dir: &Path) -> Result<(), String> {
    for a in artifacts {
        let dest = dir.join(&a.name);
        client.download(a, &dest).await.map_err(|e| format!("{}: {e}", a.name))?;
        println!("{} ({} bytes, sha256 {})", dest.display(), a.size, &a.sha256[..12.min(a.sha256.len())]);
    }
    Ok(())
}

/// One event of a job as a plain progress line (`submit --wait` when stderr is not a
/// terminal); `None` for the events a person need not see (artifacts are listed at the end).
fn progress_line(e: &kiln_core::protocol::Event) -> Option<String> {
    match e.kind {
        EventKind::Status => Some(format!("job {}: {}", e.job_id, e.status.map(|s| s.as_str()).unwrap_or("?"))),
        EventKind::Progress => {
            let percent = e.progress.map(|p| format!(" {p:.0}%")).unwrap_or_default();
            let stage = e.stage.as_deref().map(|s| format!(" {s}")).unwrap_or_default();
            Some(format!("job {}: progress{percent}{stage}", e.job_id))
        }
        EventKind::Message => Some(format!("job {}: {}", e.job_id, e.message.as_deref().unwrap_or(""))),
        EventKind::Retrying => Some(retrying_line(e)),
        _ => None,
    }
}

/// A `retrying` event as a line: the new attempt, its reason's code and what happened.
fn retrying_line(e: &kiln_core::protocol::Event) -> String {
    let reason = e.reason.map(|r| r.as_str()).unwrap_or("unknown");
    let message = e.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    format!("job {}: retrying, attempt {} ({reason}){message}", e.job_id, e.attempt)
}

fn split_pair(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not name=value"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

fn load_config(path: &Path) -> Result<ClusterConfig, String> {
    ClusterConfig::load(path).map_err(|e| e.to_string())
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => {
            init_tracing("info");
            run_node(args, true).await
        }
        Command::Node(args) => {
            init_tracing("info");
            run_node(args, false).await
        }
        Command::Gateway(args) => {
            init_tracing("info");
            run_gateway(args).await
        }
        Command::Chaos { seed, profile, jobs, faults, nodes, rate, step_ms, report, work_dir, worker, slot_prefetch, nats_cluster } => {
            init_tracing("warn");
            let overrides = ChaosOverrides { jobs, faults, nodes, rate, step_ms, slot_prefetch, nats_cluster };
            chaos(seed, &profile, overrides, report, work_dir, worker).await
        }
        Command::Demo { config, jobs, out, model, serve } => {
            init_tracing("warn");
            match load_config(&config) {
                Ok(mut c) => {
                    c.node.metrics_addr = String::new();
                    kiln::demo::run(kiln::demo::DemoOptions { config: c, jobs, out, model, serve }).await
                }
                Err(e) => Err(e),
            }
        }
        Command::Bench { jobs, concurrency, json, torchscript: true, model_file, slot, max_batch, .. } => {
            init_tracing("warn");
            let opts = kiln::bench::TorchBenchOptions { model_file, slot, jobs, concurrency: concurrency.max(1), max_batch };
            match kiln::bench::run_torchscript(opts.clone()).await {
                Ok(report) => {
                    kiln::bench::print_torchscript(&report, &opts);
                    write_json(json, &report)
                }
                Err(e) => Err(e),
            }
        }
        Command::Bench { jobs, slots, json, http: true, sse_clients, file_mb, .. } => {
            init_tracing("warn");
            let opts = kiln::bench_http::HttpBenchOptions {
                jobs: jobs.min(2000),
                sse_clients,
                file_bytes: file_mb * 1_000_000,
                slots: slots.max(1),
            };
            match kiln::bench_http::run(opts.clone()).await {
                Ok(report) => {
                    kiln::bench_http::print(&report, &opts);
                    write_json(json, &report)
                }
                Err(e) => Err(e),
            }
        }
        Command::Bench { jobs, concurrency, slots, nats, json, work_ms, replicas, .. } => {
            init_tracing("warn");
            let opts = kiln::bench::BenchOptions { jobs, concurrency: concurrency.max(1), slots: slots.max(1), nats, work_ms, replicas };
            match kiln::bench::run(opts.clone()).await {
                Ok(report) => {
                    kiln::bench::print(&report, &opts);
                    write_json(json, &report)
                }
                Err(e) => Err(e),
            }
        }
        Command::Scale { nodes, slots, window_s, jobs, concurrency, calls, full_mesh, json } => {
            init_tracing("warn");
            let opts = kiln::scale::ScaleOptions {
                sizes: nodes,
                slots: slots.max(1),
                window: Duration::from_secs(window_s.max(1)),
                jobs,
                concurrency: concurrency.max(1),
                calls,
                full_mesh,
            };
            match std::env::current_exe().map_err(|e| e.to_string()) {
                Ok(binary) => match kiln::scale::run(opts, binary).await {
                    Ok(reports) => {
                        kiln::scale::print(&reports);
                        write_json(json, &reports)
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        }
        other => {
            init_tracing("warn");
            client_command(other).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Every stop signal a node can be sent: each one, at any stage of the node's life, is a drain.
struct StopSignals {
    streams: Vec<(&'static str, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    /// Installs the handlers: from here on these signals no longer kill the process (their
    /// default action), they only wake [`StopSignals::recv`]. Installed before anything else
    /// a node does: a SIGTERM 3 s into a restart, while the node still watched its old registry
    /// entry, used to kill it by signal in 0.05 s instead of draining (an outside storm).
    fn install() -> Result<StopSignals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut streams = vec![];
        for (name, kind) in [
            ("SIGTERM", SignalKind::terminate()),
            ("SIGINT", SignalKind::interrupt()),
            ("SIGHUP", SignalKind::hangup()),
            ("SIGQUIT", SignalKind::quit()),
        ] {
            streams.push((name, signal(kind).map_err(|e| format!("cannot handle {name}: {e}"))?));
        }
        Ok(StopSignals { streams })
    }

    /// Resolves with the name of the next stop signal received.
    async fn recv(&mut self) -> &'static str {
        let waits = self.streams.iter_mut().map(|(name, s)| {
            let name = *name;
            Box::pin(async move {
                s.recv().await;
                name
            })
        });
        futures::future::select_all(waits).await.0
    }
}

async fn run_node(args: NodeArgs, allow_embedded: bool) -> Result<(), String> {
    let mut stop = StopSignals::install()?;
    tracing::info!("starting");
    let mut config = load_config(&args.config)?;
    if let Some(url) = args.nats {
        config.nats.url = url;
    }
    if let Some(n) = args.node_name {
        config.node.name = n;
    }
    if let Some(s) = args.slots {
        config.node.slots = s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
    }
    if let Some(m) = args.metrics_addr {
        config.node.metrics_addr = m;
    }
    if let Some(a) = &args.http_addr {
        config.http.addr = a.clone();
    }
    config.validate().map_err(|e| e.to_string())?;
    let (http, http_addr) = (config.http.clone(), config.http.addr.clone());
    let nats = config.nats.clone();
    if config.nats.url == "embedded" && !allow_embedded {
        return Err("`kiln node` joins an existing NATS: pass --nats URL (or use `kiln up` for an embedded server)".into());
    }
    if let Err(e) = kiln::metrics::install(&config.node.metrics_addr) {
        tracing::warn!(error = %e, "metrics endpoint disabled");
    }
    // A stop signal during start-up: nothing runs yet, so the drain is to stop starting. Start
    // is cancelled where it stands (connecting, creating streams, watching an old registry
    // entry); once its actors are up, they are drained like any running node's.
    let node = tokio::select! {
        started = RunningNode::start(config) => started.map_err(|e| e.to_string())?,
        signal = stop.recv() => {
            tracing::info!(signal, "stop signal during start-up; not starting");
            return Ok(());
        }
    };
    println!("kiln node {} up on {} (Ctrl-C or SIGTERM to drain and stop)", node.name, node.url);
    // `kiln up` also serves HTTP (the console, the REST API, the configured seed routes), so
    // its node answers curl and a browser with no extra step.
    let gateway = match (allow_embedded, http_addr.is_empty()) {
        (true, false) => {
            let nats = NatsConfig { url: node.url.clone(), ..nats };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let started = async {
                let gateway = kiln::gateway::Gateway::connect(http, &nats).await.map_err(|e| e.to_string())?;
                gateway
                    .serve(&http_addr, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
            };
            match started.await {
                Ok(serving) => {
                    println!(
                        "kiln gateway on http://{} (console at /, REST API at /v1, `kiln up --http-addr \"\"` disables it)",
                        serving.addr
                    );
                    Some((serving, stop_tx))
                }
                Err(e) => {
                    node.shutdown(Duration::from_secs(args.drain_grace_s)).await;
                    return Err(format!("the HTTP gateway cannot start: {e}"));
                }
            }
        }
        _ => None,
    };
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            signal = stop.recv() => {
                tracing::info!(signal, "stop signal");
                break;
            }
            _ = node.drain_requested() => break,
            _ = check.tick() => if node.failed() {
                return Err("the node's actor tree stopped after a failure; its jobs will be redelivered".into());
            },
        }
    }
    tracing::info!("draining");
    // The gateway stops first: its SSE clients reconnect to another gateway with their
    // Last-Event-ID, and it must not outlive the embedded server it talks to.
    if let Some((serving, stop)) = gateway {
        let _ = stop.send(());
        serving.stopped().await;
    }
    // A second stop signal during the drain is still a drain (the first one is under way).
    node.shutdown(Duration::from_secs(args.drain_grace_s)).await;
    Ok(())
}

async fn run_gateway(args: GatewayArgs) -> Result<(), String> {
    if let Some(key) = args.hash_key {
        println!("{}", kiln::gateway::hash_key(&key));
        return Ok(());
    }
    let mut stop = StopSignals::install()?;
    let config = ClusterConfig::load_gateway(&args.config).map_err(|e| e.to_string())?;
    let mut nats = config.nats.clone();
    if let Some(url) = args.nats {
        nats.url = url;
    }
    if nats.url == "embedded" {
        nats.url = format!("nats://127.0.0.1:{}", nats.embedded_port);
    }
    let addr = args.http_addr.unwrap_or_else(|| config.http.addr.clone());
    if addr.is_empty() {
        return Err("no address to serve: set http.addr or pass --http-addr".into());
    }
    let gateway = kiln::gateway::Gateway::connect(config.http.clone(), &nats).await.map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = gateway
        .serve(&addr, async move {
            let _ = stop_rx.await;
        })
        .await
        .map_err(|e| e.to_string())?;
    println!("kiln gateway on http://{} for NATS {} (console at /, REST API at /v1)", serving.addr, nats.url);
    let signal = stop.recv().await;
    tracing::info!(signal, "stop signal: the gateway stops accepting and ends its streams");
    let _ = stop_tx.send(());
    serving.stopped().await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// What `kiln chaos` changes in its profile.
struct ChaosOverrides {
    jobs: Option<u32>,
    faults: Option<u32>,
    nodes: Option<usize>,
    rate: Option<f64>,
    step_ms: Option<u64>,
    slot_prefetch: Option<usize>,
    nats_cluster: Option<usize>,
}

async fn chaos(
    seed: u64,
    profile: &str,
    o: ChaosOverrides,
    report: Option<PathBuf>,
    work_dir: Option<PathBuf>,
    worker: PathBuf,
) -> Result<(), String> {
    use kiln::chaos::{ChaosOptions, Profile};
    let mut p = match profile {
        "short" => Profile::short(),
        "long" => Profile::long(),
        "cluster" => Profile::cluster(),
        other => return Err(format!("unknown profile {other:?} (short, long or cluster)")),
    };
    match o.nats_cluster {
        None => {}
        Some(n) if n >= 3 && n % 2 == 1 => {
            p.nats_servers = n;
            // Room for one fault of every kind, the cluster's three included.
            p.faults = p.faults.max(kiln::chaos::FaultKind::CLUSTER.len() as u32);
        }
        Some(1) => p.nats_servers = 1,
        Some(n) => return Err(format!("--nats-cluster {n}: a NATS cluster needs an odd number of servers, 3 or more (or 1)")),
    }
    p.jobs = o.jobs.unwrap_or(p.jobs);
    p.faults = o.faults.unwrap_or(p.faults);
    p.nodes = o.nodes.unwrap_or(p.nodes).max(2);
    p.rate = o.rate.unwrap_or(p.rate);
    p.step_ms = o.step_ms.unwrap_or(p.step_ms);
    p.slot_prefetch = o.slot_prefetch.unwrap_or(p.slot_prefetch);
    let worker = std::fs::canonicalize(&worker).map_err(|e| format!("worker {}: {e}", worker.display()))?;
    let options = ChaosOptions {
        seed,
        profile: p,
        node_binary: std::env::current_exe().map_err(|e| e.to_string())?,
        fault_points: kiln_core::fault::compiled_in(),
        python: std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into()),
        worker,
        work_dir,
        report,
    };
    let report = kiln::chaos::run(options).await?;
    if report.passed {
        Ok(())
    } else {
        Err(format!("{} invariants failed", report.invariants.iter().filter(|i| !i.ok).count()))
    }
}

/// Writes a benchmark report as JSON when `--json` names a file.
fn write_json<T: serde::Serialize>(path: Option<PathBuf>, report: &T) -> Result<(), String> {
    match path {
        Some(p) => std::fs::write(&p, serde_json::to_vec_pretty(report).expect("json")).map_err(|e| format!("{}: {e}", p.display())),
        None => Ok(()),
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

async fn client_command(command: Command) -> Result<(), String> {
    match command {
        Command::Submit(args) => submit(args).await,
        Command::Batch { action } => batch_command(action).await,
        Command::Status { job_id, conn } => {
            let c = connect(&conn).await?;
            print_json(&c.status(&job_id).await.map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::Result { job_id, out, wait, conn } => {
            let c = connect(&conn).await?;
            let view = if wait {
                c.wait(&job_id, Duration::from_secs(24 * 3600), |_| {}).await.map_err(|e| e.to_string())?
            } else {
                c.status(&job_id).await.map_err(|e| e.to_string())?
            };
            if !view.status.is_terminal() {
                return Err(format!("job {job_id} is {}; nothing to download yet (--wait waits for its end)", view.status.as_str()));
            }
            download_all(&c, &view.artifacts, &out).await?;
            match (&view.status, &view.error) {
                (kiln_core::job::JobState::Completed, _) => Ok(()),
                (status, Some(e)) => Err(format!("job {job_id} ended {}: {}: {}", status.as_str(), e.code.as_str(), e.message)),
                (status, None) => Err(format!("job {job_id} ended {}", status.as_str())),
            }
        }
        Command::Cancel { job_id, conn } => {
            let c = connect(&conn).await?;
            print_json(&c.cancel(&job_id).await.map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::Jobs { status, model, dead_letter, labels, limit, json, conn } => {
            let c = connect(&conn).await?;
            let status = match status {
                Some(s) => Some(serde_json::from_value(serde_json::Value::String(s.clone())).map_err(|_| format!("unknown status {s:?}"))?),
                None => None,
            };
            let reply = c
                .jobs(&ListJobsRequest { status, model, dead_letter, limit: Some(limit), labels: parse_labels(&labels)? })
                .await
                .map_err(|e| e.to_string())?;
            if json {
                print_json(&reply);
                return Ok(());
            }
            let mut table = Table::new(&[
                ("JOB", Align::Left),
                ("MODEL", Align::Left),
                ("STATUS", Align::Left),
                ("ATTEMPT", Align::Right),
                ("ERROR", Align::Left),
            ]);
            for j in reply.jobs {
                let err = j.error.map(|e| format!("{}: {}", e.code.as_str(), e.message)).unwrap_or_default();
                table.row(vec![j.job_id, j.model, j.status.as_str().into(), format!("{}/{}", j.attempt, j.max_attempts), err]);
            }
            println!("{}", table.render());
            Ok(())
        }
        Command::Models { json, conn } => {
            let c = connect(&conn).await?;
            let reply = c.models().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&reply);
                return Ok(());
            }
            let mut table = Table::new(&[
                ("MODEL", Align::Left),
                ("ENGINE", Align::Left),
                ("NODES", Align::Left),
                ("SLOTS", Align::Right),
                ("WARM", Align::Right),
                ("ATTEMPTS", Align::Right),
                ("TIMEOUT", Align::Right),
                ("INPUTS", Align::Left),
                ("PARAMS", Align::Left),
            ]);
            for m in &reply.models {
                let params: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
                table.row(vec![
                    if m.conflict { format!("{} (!)", m.name) } else { m.name.clone() },
                    m.engine.clone(),
                    m.nodes.join(","),
                    m.slots.len().to_string(),
                    m.warm_on.len().to_string(),
                    m.max_attempts.to_string(),
                    format!("{} s", m.timeout_ms.div_ceil(1000)),
                    m.required_inputs.join(","),
                    params.join(","),
                ]);
            }
            println!("{}", table.render());
            if reply.models.iter().any(|m| m.conflict) {
                println!("(!) nodes declare this model differently; the definition of the node up longest holds (--json shows it)");
            }
            Ok(())
        }
        Command::Cluster { json, conn } => {
            let c = connect(&conn).await?;
            let cluster = c.cluster().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&cluster);
                return Ok(());
            }
            let mut table = Table::new(&[
                ("NODE", Align::Left),
                ("SLOT", Align::Left),
                ("STATE", Align::Left),
                ("RESTARTS", Align::Right),
                ("WARM", Align::Left),
                ("JOB", Align::Left),
            ]);
            for g in cluster.gpus {
                table.row(vec![
                    g.node,
                    g.slot,
                    g.state.as_str().into(),
                    g.restarts.to_string(),
                    g.warm_models.join(","),
                    g.current_job.unwrap_or_default(),
                ]);
            }
            println!("{}", table.render());
            println!();
            for n in cluster.nodes {
                println!("node {} v{}: {} slots, {} running", n.node, n.version, n.slots.len(), n.running_jobs);
            }
            Ok(())
        }
        Command::Drain { node, conn } => {
            let c = connect(&conn).await?;
            print_json(&c.control(&ControlRequest::Drain { node }).await.map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::RestartGpu { node, slot, conn } => {
            let c = connect(&conn).await?;
            print_json(&c.control(&ControlRequest::RestartGpu { node, slot }).await.map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::Ping { from, to, count, conn } => {
            let c = connect(&conn).await?;
            let r = c.ping(&from, &to, count).await.map_err(|e| e.to_string())?;
            println!("{} -> {}, {} round trips each, interleaved:", r.from, r.peer, r.count);
            println!("  actor call through the tunnel  p50 {:>6} us  p99 {:>6} us", r.actor_p50_us, r.actor_p99_us);
            println!("  NATS request/reply (floor)     p50 {:>6} us  p99 {:>6} us", r.nats_p50_us, r.nats_p99_us);
            println!(
                "  ratio                          p50 {:>6.2}x   p99 {:>6.2}x",
                r.actor_p50_us as f64 / r.nats_p50_us.max(1) as f64,
                r.actor_p99_us as f64 / r.nats_p99_us.max(1) as f64
            );
            Ok(())
        }
        _ => unreachable!("node commands are handled in main"),
    }
}

async fn batch_command(action: BatchCommand) -> Result<(), String> {
    let show = |v: &kiln_core::protocol::BatchView| {
        let s = &v.summary;
        println!(
            "batch {} ({}): {}; {} items, {} completed, {} failed, {} cancelled",
            v.batch_id,
            v.model,
            v.status.as_str(),
            s.total,
            s.completed,
            s.failed,
            s.cancelled
        );
        for i in &v.items {
            let err = i.error.as_ref().map(|e| format!("{}: {}", e.code.as_str(), e.message)).unwrap_or_default();
            let names: Vec<&str> = i.artifacts.iter().map(|a| a.name.as_str()).collect();
            println!("  {:>4}  {:<36}  {:<10} {} {}", i.index, i.job_id, i.status.as_str(), names.join(","), err);
        }
        if let Some(r) = &v.retried_by {
            println!("retried by batch {r}");
        }
    };
    match action {
        BatchCommand::Submit {
            model,
            items,
            params,
            idempotency_key,
            labels,
            reuse,
            max_concurrency,
            fallback_models,
            wait,
            out,
            conn,
        } => {
            let text = if items.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(|e| format!("stdin: {e}"))?
            } else {
                std::fs::read_to_string(&items).map_err(|e| format!("{}: {e}", items.display()))?
            };
            let mut request = BatchSubmitRequest {
                model,
                idempotency_key,
                labels: parse_labels(&labels)?,
                reuse,
                max_concurrency,
                fallback_models,
                ..Default::default()
            };
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("items line {}: {e}", n + 1))?;
                let item = match serde_json::from_value::<BatchItemRequest>(value.clone()) {
                    Ok(item) if value.get("inputs").is_some() || value.get("params").is_some() => item,
                    _ => {
                        let inputs = serde_json::from_value(value).map_err(|e| format!("items line {}: {e}", n + 1))?;
                        BatchItemRequest { inputs, ..Default::default() }
                    }
                };
                request.items.push(item);
            }
            for p in &params {
                let (k, v) = split_pair(p)?;
                request.params.insert(k, v);
            }
            let c = connect(&conn).await?;
            let reply = c.submit_batch(&request).await.map_err(|e| e.to_string())?;
            println!("{}{}", reply.batch_id, if reply.duplicate { " (duplicate: the batch of this idempotency key)" } else { "" });
            if wait {
                let view = c
                    .wait_batch(&reply.batch_id, Duration::from_secs(24 * 3600), |e| {
                        if let Some(i) = &e.item {
                            println!("item {:>4} {}", i.index, i.status.as_str());
                        }
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                show(&view);
                for item in &view.items {
                    download_all(&c, &item.artifacts, &out.join(&view.batch_id).join(item.index.to_string())).await?;
                }
                let s = &view.summary;
                if s.completed < s.total {
                    return Err(format!("batch {} is partial: {} of {} items completed", view.batch_id, s.completed, s.total));
                }
            }
            Ok(())
        }
        BatchCommand::Status { batch_id, conn } => {
            show(&connect(&conn).await?.batch(&batch_id).await.map_err(|e| e.to_string())?);
            Ok(())
        }
        BatchCommand::Cancel { batch_id, conn } => {
            show(&connect(&conn).await?.cancel_batch(&batch_id).await.map_err(|e| e.to_string())?);
            Ok(())
        }
        BatchCommand::Retry { batch_id, conn } => {
            let reply = connect(&conn).await?.retry_batch(&batch_id).await.map_err(|e| e.to_string())?;
            let indices: Vec<String> = reply.items.iter().map(|i| i.index.to_string()).collect();
            println!("{} retries items {}", reply.batch_id, indices.join(","));
            Ok(())
        }
    }
}

async fn connect(conn: &ConnArgs) -> Result<Client, String> {
    let mut nats = ClusterConfig::load_nats(conn.config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(url) = &conn.nats {
        nats.url = url.clone();
    }
    if nats.url == "embedded" {
        // The server `kiln up` starts on this machine.
        nats.url = format!("nats://127.0.0.1:{}", nats.embedded_port);
    }
    if let Some(prefix) = &conn.prefix {
        nats.prefix = prefix.clone();
    }
    // A client command is interactive: a server that does not answer within this is not
    // coming (a node waits `nats.connect_timeout_ms`, 10 s, as it may start before its server).
    nats.connect_timeout_ms = nats.connect_timeout_ms.min(CLIENT_CONNECT_TIMEOUT_MS);
    Client::connect_with(&nats).await.map_err(|e| unreachable_hint(&nats.url, &e))
}

/// How long a client command tries to reach its NATS server.
const CLIENT_CONNECT_TIMEOUT_MS: u64 = 2000;

/// The error of a client command that cannot reach its server (or finds no node there), with
/// what a newcomer most likely needs: a cluster to talk to.
fn unreachable_hint(url: &str, error: &kiln::client::ClientError) -> String {
    let text = error.to_string();
    match error {
        kiln::client::ClientError::Nats(m) if m.contains("cannot connect") => format!(
            "no NATS server answers at {url} ({text}).\nStart a local cluster with `kiln up` (in another terminal), \
             or point at yours with --nats URL (or KILN_NATS_URL, or nats.url in --config FILE)."
        ),
        _ => text,
    }
}

async fn submit(args: SubmitArgs) -> Result<(), String> {
    let client = connect(&args.conn).await?;
    let mut request = SubmitRequest {
        model: args.model,
        priority: args.priority,
        idempotency_key: args.idempotency_key,
        max_attempts: args.max_attempts,
        reuse: args.reuse,
        labels: parse_labels(&args.labels)?,
        ..Default::default()
    };
    for i in &args.inputs {
        let (k, v) = split_pair(i)?;
        request.inputs.insert(k, InputValue::Inline(v));
    }
    for f in &args.files {
        let (k, path) = f.split_once('=').ok_or_else(|| format!("{f:?} is not name=path"))?;
        let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let base = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("input");
        let base: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
        let object = format!("uploads/{}/{base}", uuid::Uuid::new_v4());
        client.upload(&object, &data).await.map_err(|e| e.to_string())?;
        request.inputs.insert(k.to_string(), InputValue::Object { object });
    }
    for p in &args.params {
        let (k, v) = split_pair(p)?;
        request.params.insert(k, v);
    }
    if let Some(s) = args.deadline_s {
        request.deadline_ms = Some(kiln_core::now_ms() + s * 1000);
    }
    let reply = client.submit(&request).await.map_err(|e| e.to_string())?;
    println!("{}{}", reply.job_id, if reply.reused { " (reused: an identical earlier job)" } else { "" });
    if !args.wait {
        return Ok(());
    }
    // A bar for a person at a terminal (indicatif draws on stderr, and nothing at all when it
    // is not a terminal); otherwise one line per event on stderr, so a log or a CI run still
    // shows the job moving, and stdout keeps the job id alone.
    let at_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(indicatif::ProgressStyle::with_template("[{bar:40}] {pos:>3}% {msg}").map_err(|e| e.to_string())?.progress_chars("=> "));
    let view = client
        .wait(&reply.job_id, Duration::from_secs(24 * 3600), |e| {
            if !at_terminal {
                if let Some(line) = progress_line(e) {
                    eprintln!("{line}");
                }
                return;
            }
            match e.kind {
                EventKind::Status => bar.set_message(e.status.map(|s| s.as_str().to_string()).unwrap_or_default()),
                EventKind::Progress => {
                    if let Some(p) = e.progress {
                        bar.set_position(p as u64);
                    }
                    if let Some(s) = &e.stage {
                        bar.set_message(s.clone());
                    }
                }
                EventKind::Message => bar.println(e.message.clone().unwrap_or_default()),
                EventKind::Retrying => bar.println(retrying_line(e)),
                _ => {}
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    if at_terminal {
        bar.finish_with_message(view.status.as_str().to_string());
    }
    if let Some(e) = &view.error {
        eprintln!("{}: {}", e.code.as_str(), e.message);
    }
    download_all(&client, &view.artifacts, &args.out.join(&view.job_id)).await?;
    if view.status == kiln_core::job::JobState::Completed {
        Ok(())
    } else {
        Err(format!("job {} ended {}", view.job_id, view.status.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::protocol::Event;
    use kiln_core::retry_reason::RetryReason;

    #[test]
    fn a_retrying_event_prints_a_line_with_its_attempt_and_reason() {
        let e = Event::retrying("j1", 2, RetryReason::WorkerCrashed, "attempt 1 failed on n1 (cpu:0): worker died".into(), None);
        assert_eq!(
            progress_line(&e).as_deref(),
            Some("job j1: retrying, attempt 2 (worker_crashed): attempt 1 failed on n1 (cpu:0): worker died")
        );
    }
}
