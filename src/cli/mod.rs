//! The `kiln` command line: the clap tree and its dispatch. Each command family is a file
//! (mini-redis's `src/cmd/`) holding its arguments and what it does:
//!
//! | file         | commands                                                                 |
//! |--------------|--------------------------------------------------------------------------|
//! | [`run`]      | `up`, `node`, `gateway`, `demo`: the processes that stay up, and their stop signals |
//! | [`jobs`]     | `submit`, `status`, `result`, `cancel`, `jobs`                           |
//! | [`batch`]    | `batch submit`, `batch status`, `batch cancel`, `batch retry`            |
//! | [`cluster`]  | `models`, `cluster`, `drain`, `restart-gpu`, `ping`                      |
//! | [`tools`]    | `scale`, `bench`, `chaos` (their code is the `kiln-tools` crate)         |
//! | [`conn`]     | how a client command reaches Kiln (`--nats`, `--prefix`, `--config`)     |
//! | [`pairs`]    | `name=value` arguments: inputs, params, labels                           |
//! | [`output`]   | JSON on stdout, downloads into a folder                                  |
//!
//! Every command returns `Result<(), String>`: an error is printed as `kiln: ...` on stderr
//! and exits 1; clap's own usage errors exit 2.

mod batch;
mod cluster;
mod conn;
mod jobs;
mod output;
mod pairs;
mod run;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `kiln --version`: the package version and the commit it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KILN_COMMIT"), ")");

#[derive(Parser)]
#[command(name = "kiln", version = VERSION, about = "A cluster runtime for GPU generation jobs over NATS")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node with an embedded nats-server (or join an existing NATS with --nats).
    Up(run::NodeArgs),
    /// Start a node that joins an existing NATS (`nats.url` or --nats).
    Node(run::NodeArgs),
    /// Serve the HTTP + SSE gateway and the web console: the NATS API over HTTP, the seeds'
    /// routes of `[[http.routes]]`, at `http.addr` (a NATS client like any other).
    Gateway(run::GatewayArgs),
    /// Submit a job.
    Submit(jobs::SubmitArgs),
    /// Batches: submit N items as one request, follow them, retry the failed ones.
    Batch {
        #[command(subcommand)]
        action: batch::BatchCommand,
    },
    /// Show a job.
    Status(jobs::StatusArgs),
    /// Download a job's results into a folder (each artifact checked against its sha256);
    /// exits non-zero unless the job completed.
    Result(jobs::ResultArgs),
    /// Cancel a job (queued: it never runs; running: its worker is stopped).
    Cancel(jobs::CancelArgs),
    /// List jobs, newest first.
    Jobs(jobs::JobsArgs),
    /// List the cluster's models: which nodes and slots serve each, where it is warm.
    Models(cluster::ModelsArgs),
    /// Show every node and GPU slot of the cluster.
    Cluster(cluster::ClusterArgs),
    /// Show each model's queue: jobs waiting by lane, the oldest wait, running, slots serving
    /// it, and the slots that would drain it within `autoscale.target_wait_s`.
    Queue(cluster::QueueArgs),
    /// Ask a node to drain: it stops pulling, finishes its running jobs, leaves the registry
    /// and exits (as on SIGTERM). Nothing is lost or run twice.
    Drain(cluster::DrainArgs),
    /// Restart one GPU slot's inference actor, on any node (its running job is retried).
    RestartGpu(cluster::RestartGpuArgs),
    /// Time actor calls from one node to another through the actor cluster, beside plain NATS
    /// request/reply between the same two nodes.
    Ping(cluster::PingArgs),
    /// Measure how a cluster's costs grow with its size: for each size, a fresh nats-server and
    /// that many light node processes of no-op slots on this machine (docs/ARCHITECTURE.md,
    /// "Scaling", keeps the table).
    Scale(tools::ScaleArgs),
    /// Benchmark no-op jobs against the raw JetStream floor.
    Bench(tools::BenchArgs),
    /// Storm a local cluster (its own nats-server and node processes) with jobs while injecting
    /// faults on a seeded schedule; check that nothing was lost; print and write a report.
    /// Exit status 1 when an invariant fails. Inference panics need a build with
    /// `--features fault-injection`.
    Chaos(tools::ChaosArgs),
    /// The demo: a local server and node, a batch of jobs on the demo model, results to a folder.
    Demo(run::DemoArgs),
}

/// Parses the command line, runs the command, and turns its outcome into the exit status.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node and the gateway log what they do, and set up their logs and traces themselves
    // once their config is read (`[log]`, `[telemetry]`); every other command logs only its
    // warnings, set up here from the environment.
    let _telemetry = match cli.command {
        Command::Up(_) | Command::Node(_) | Command::Gateway(_) => None,
        _ => Some(kiln::telemetry::init("warn", &Default::default(), &Default::default())),
    };
    let result = match cli.command {
        Command::Up(args) => run::node(args, true).await,
        Command::Node(args) => run::node(args, false).await,
        Command::Gateway(args) => run::gateway(args).await,
        Command::Demo(args) => run::demo(args).await,
        Command::Submit(args) => jobs::submit(args).await,
        Command::Status(args) => jobs::status(args).await,
        Command::Result(args) => jobs::result(args).await,
        Command::Cancel(args) => jobs::cancel(args).await,
        Command::Jobs(args) => jobs::list(args).await,
        Command::Batch { action } => batch::run(action).await,
        Command::Models(args) => cluster::models(args).await,
        Command::Cluster(args) => cluster::cluster(args).await,
        Command::Queue(args) => cluster::queue(args).await,
        Command::Drain(args) => cluster::drain(args).await,
        Command::RestartGpu(args) => cluster::restart_gpu(args).await,
        Command::Ping(args) => cluster::ping(args).await,
        Command::Scale(args) => tools::scale(args).await,
        Command::Bench(args) => tools::bench(args).await,
        Command::Chaos(args) => tools::chaos(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::FAILURE
        }
    }
}
