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
//! | [`output`]   | `--output json\|table`, downloads into a folder                          |
//! | [`exit`]     | the exit statuses, one enum, and the error every command returns        |
//!
//! Here too: `completions` (clap_complete's scripts) and `schema` (the NATS protocol's JSON
//! Schema, `kiln_contract::schema`). Every command returns `Result<(), exit::Failure>`: it is
//! printed as `kiln: ...` on stderr and exits with its [`exit::Exit`] status; clap's own usage
//! errors exit 2, as [`exit::Exit::Usage`] says.

mod batch;
mod cluster;
mod conn;
mod exit;
mod jobs;
mod output;
mod pairs;
mod run;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use exit::Failure;
use output::Format;

/// `kiln --version`: the package version and the commit it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KILN_COMMIT"), ")");

#[derive(Parser)]
#[command(name = "kiln", version = VERSION, about = "A cluster runtime for GPU generation jobs over NATS")]
struct Cli {
    /// How a command that prints data prints it: `json` (the reply, one JSON document on
    /// stdout) or `table` (for people). Each command keeps its default: a table (or lines) for
    /// `jobs`, `models`, `cluster`, `queue`, `batch`, `ping`, `result`; JSON for `status`,
    /// `cancel`, `drain`, `restart-gpu`; the id for `submit`.
    #[arg(long, short = 'o', global = true, value_enum)]
    output: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

/// The clap tree with the exit statuses as `--help`'s epilogue: what `kiln` parses, and what
/// completions and the help test walk.
fn command() -> clap::Command {
    Cli::command().after_help(exit::help())
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
    /// Exit status 4 when an invariant fails. Inference panics need a build with
    /// `--features fault-injection`.
    Chaos(tools::ChaosArgs),
    /// The demo: a local server and node, a batch of jobs on the demo model, results to a folder.
    Demo(run::DemoArgs),
    /// Print a shell completion script: `kiln completions bash > /etc/bash_completion.d/kiln`,
    /// `kiln completions zsh > "${fpath[1]}/_kiln"`, `kiln completions fish >
    /// ~/.config/fish/completions/kiln.fish`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the JSON Schema (draft 2020-12) of every NATS message, with the subjects they
    /// travel on (docs/schema/protocol.json is its output for the default prefix).
    Schema {
        /// The subject prefix of the deployment (`nats.prefix`).
        #[arg(long, default_value = "kiln")]
        prefix: String,
        /// Write it to this file instead of stdout.
        #[arg(long)]
        write: Option<PathBuf>,
        /// The same protocol as an AsyncAPI 3.0 document instead (docs/asyncapi.json).
        #[arg(long)]
        asyncapi: bool,
    },
}

/// Parses the command line, runs the command, and turns its outcome into the exit status.
pub async fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // A node and the gateway log what they do, and set up their logs and traces themselves
    // once their config is read (`[log]`, `[telemetry]`); every other command logs only its
    // warnings, set up here from the environment.
    let _telemetry = match cli.command {
        Command::Up(_) | Command::Node(_) | Command::Gateway(_) => None,
        _ => Some(kiln::telemetry::init("warn", &Default::default(), &Default::default())),
    };
    let output = cli.output;
    if let Err(refused) = no_output(output, &cli.command) {
        return refused.report();
    }
    let result = match cli.command {
        Command::Up(args) => run::node(args, true).await.map_err(Failure::from),
        Command::Node(args) => run::node(args, false).await.map_err(Failure::from),
        Command::Gateway(args) => run::gateway(args).await.map_err(Failure::from),
        Command::Demo(args) => run::demo(args).await.map_err(Failure::from),
        Command::Submit(args) => jobs::submit(args, output).await,
        Command::Status(args) => jobs::status(args, output).await,
        Command::Result(args) => jobs::result(args, output).await,
        Command::Cancel(args) => jobs::cancel(args, output).await,
        Command::Jobs(args) => jobs::list(args, output).await,
        Command::Batch { action } => batch::run(action, output).await,
        Command::Models(args) => cluster::models(args, output).await,
        Command::Cluster(args) => cluster::cluster(args, output).await,
        Command::Queue(args) => cluster::queue(args, output).await,
        Command::Drain(args) => cluster::drain(args, output).await,
        Command::RestartGpu(args) => cluster::restart_gpu(args, output).await,
        Command::Ping(args) => cluster::ping(args, output).await,
        Command::Scale(args) => tools::scale(args).await,
        Command::Bench(args) => tools::bench(args).await,
        Command::Chaos(args) => tools::chaos(args).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "kiln", &mut std::io::stdout());
            Ok(())
        }
        Command::Schema { prefix, write, asyncapi } => schema(&prefix, write, asyncapi),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// The commands that print no data refuse `--output` rather than ignore it; the tools write
/// their JSON reports to a file (`--json FILE`, `chaos --report FILE`), since their progress
/// lines share stdout.
fn no_output(output: Option<Format>, command: &Command) -> Result<(), Failure> {
    let command = match command {
        Command::Up(_) => "up",
        Command::Node(_) => "node",
        Command::Gateway(_) => "gateway",
        Command::Demo(_) => "demo",
        Command::Scale(_) => "scale",
        Command::Bench(_) => "bench",
        Command::Chaos(_) => "chaos",
        Command::Completions { .. } => "completions",
        Command::Schema { .. } => "schema",
        _ => return Ok(()),
    };
    match output {
        None => Ok(()),
        Some(_) => Err(Failure::usage(format!(
            "`kiln {command}` prints no data to format: --output applies to the commands that print replies \
             (bench and scale write JSON with --json FILE, chaos with --report FILE)"
        ))),
    }
}

/// `kiln schema`: the protocol's JSON Schema for `prefix`, on stdout or into a file.
fn schema(prefix: &str, write: Option<PathBuf>, asyncapi: bool) -> Result<(), Failure> {
    if prefix.is_empty() || prefix.contains(|c: char| c.is_whitespace() || c == '*' || c == '>') {
        return Err(Failure::usage(format!("{prefix:?} is not a subject prefix")));
    }
    let names = kiln_contract::names::Names::new(prefix);
    let text = if asyncapi { kiln_contract::schema::asyncapi_text(&names) } else { kiln_contract::schema::document_text(&names) };
    match write {
        Some(path) => std::fs::write(&path, text).map_err(|e| Failure::from(format!("{}: {e}", path.display()))),
        // `kiln schema | head` is not an error: a closed pipe ends the output quietly.
        None => match std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::from(format!("stdout: {e}"))),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and positional argument of every command says what it is for (issue 28: 31
    /// of 83 had no help text): a new one without a doc comment fails here, naming it.
    #[test]
    fn every_argument_of_every_command_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>, count: &mut usize) {
            for arg in cmd.get_arguments() {
                *count += 1;
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing
                        .push(format!("{path} {}", arg.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| arg.get_id().to_string())));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing, count);
            }
        }
        // The walk sees a flag without help, even in a nested command.
        let (mut missing, mut count) = (vec![], 0);
        let bare = clap::Command::new("x").subcommand(clap::Command::new("y").about("y").arg(clap::Arg::new("z").long("z")));
        walk(&bare, "x", &mut missing, &mut count);
        assert_eq!(missing, ["x y --z"]);
        let mut cmd = command();
        cmd.build();
        let (mut missing, mut count) = (vec![], 0);
        walk(&cmd, "kiln", &mut missing, &mut count);
        assert!(count > 80, "only {count} arguments walked");
        assert!(missing.is_empty(), "{} of {count} arguments have no help text:\n{}", missing.len(), missing.join("\n"));
    }

    #[test]
    fn the_help_lists_the_exit_statuses_and_the_tree_is_consistent() {
        command().debug_assert();
        let help = command().render_long_help().to_string();
        for (exit, _) in exit::Exit::ALL {
            assert!(help.contains(&format!("  {}  ", exit.code())), "{help}");
        }
    }
}
