//! `kiln models`, `cluster`, `queue`, `drain`, `restart-gpu`, `ping`: the cluster's models, nodes and
//! slots, and what an operator asks of them.

use clap::Args;
use kiln::table::{Align, Table};
use kiln_core::protocol::{ControlRequest, QueueRequest};

use crate::cli::conn::{connect, ConnArgs};
use crate::cli::exit::Failure;
use crate::cli::output::{print_as, print_json, Format};

#[derive(Args)]
pub struct ModelsArgs {
    /// Print the reply as JSON instead of a table (the same as `--output json`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct ClusterArgs {
    /// Print the reply as JSON instead of a table (the same as `--output json`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct QueueArgs {
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Print the reply as JSON instead of a table (the same as `--output json`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct DrainArgs {
    /// The node's name (`kiln cluster` lists them).
    node: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct RestartGpuArgs {
    /// The node the slot is on.
    node: String,
    /// The slot, as configured: `cuda:0`, `cpu:1`.
    slot: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct PingArgs {
    /// The node that makes the calls.
    #[arg(long)]
    from: String,
    /// The node it calls.
    #[arg(long)]
    to: String,
    /// Round trips of each kind (at most 100,000).
    #[arg(long, default_value_t = 1000)]
    count: u32,
    #[command(flatten)]
    conn: ConnArgs,
}

pub async fn models(ModelsArgs { json, conn }: ModelsArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    let reply = c.models().await?;
    if Format::choose(output, json, Format::Table) == Format::Json {
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

pub async fn cluster(ClusterArgs { json, conn }: ClusterArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    let cluster = c.cluster().await?;
    if Format::choose(output, json, Format::Table) == Format::Json {
        print_json(&cluster);
        return Ok(());
    }
    let mut table = Table::new(&[
        ("NODE", Align::Left),
        ("SLOT", Align::Left),
        ("STATE", Align::Left),
        ("RESTARTS", Align::Right),
        ("WARM", Align::Left),
        ("MEMORY", Align::Right),
        ("BY MODEL", Align::Left),
        ("JOB", Align::Left),
        ("GROUP", Align::Left),
    ]);
    for g in cluster.gpus {
        let (memory, by_model) = memory_columns(&g);
        table.row(vec![
            g.node,
            g.slot,
            g.state.as_str().into(),
            g.restarts.to_string(),
            g.warm_models.join(","),
            memory,
            by_model,
            g.current_job.unwrap_or_default(),
            // A multi-GPU model's slots, primary first: a companion shows busy with the job.
            g.group.join(","),
        ]);
    }
    println!("{}", table.render());
    println!();
    for n in cluster.nodes {
        println!("node {} v{}: {} slots, {} running", n.node, n.version, n.slots.len(), n.running_jobs);
    }
    Ok(())
}

/// A slot's memory: `used/budget`, and each resident model's bytes with where the figure comes
/// from (`m` measured, `d` declared, `e` estimated; `*` kept by `min_warm`).
fn memory_columns(g: &kiln_core::protocol::GpuEntry) -> (String, String) {
    let used: u64 = g.resident.iter().map(|r| r.bytes).sum();
    let memory = if g.memory_budget_bytes > 0 { format!("{}/{}", bytes(used), bytes(g.memory_budget_bytes)) } else { bytes(used) };
    let by_model = g
        .resident
        .iter()
        .map(|r| {
            let source = &r.source.as_str()[..1];
            format!("{} {} {source}{}", r.model, bytes(r.bytes), if r.pinned { "*" } else { "" })
        })
        .collect::<Vec<_>>()
        .join(", ");
    (memory, by_model)
}

/// Bytes in binary units, three significant figures at most.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut value, mut unit) = (n as f64, 0);
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ if value < 10.0 => format!("{value:.2} {}", UNITS[unit]),
        _ if value < 100.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

pub async fn queue(QueueArgs { model, json, conn }: QueueArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    let reply = c.queue(&QueueRequest { model }).await?;
    if Format::choose(output, json, Format::Table) == Format::Json {
        print_json(&reply);
        return Ok(());
    }
    let mut table = Table::new(&[
        ("MODEL", Align::Left),
        ("HIGH", Align::Right),
        ("NORMAL", Align::Right),
        ("OLDEST", Align::Right),
        ("RUNNING", Align::Right),
        ("SLOTS", Align::Right),
        ("BUSY", Align::Right),
        ("MEAN RUN", Align::Right),
        ("DESIRED", Align::Right),
    ]);
    let seconds = |ms: Option<u64>| ms.map(|ms| format!("{:.1} s", ms as f64 / 1000.0)).unwrap_or_else(|| "-".into());
    for q in &reply.models {
        let lane = |name: &str| q.lanes.iter().find(|l| l.lane == name).map(|l| l.queued).unwrap_or(0).to_string();
        table.row(vec![
            q.model.clone(),
            lane("high"),
            lane("normal"),
            seconds(q.oldest_wait_ms),
            q.running.to_string(),
            q.slots.to_string(),
            q.busy_slots.to_string(),
            seconds(q.mean_service_ms),
            q.desired_slots.to_string(),
        ]);
    }
    println!("{}", table.render());
    println!("(DESIRED: slots that would start every waiting job within {} s, autoscale.target_wait_s)", reply.target_wait_s);
    Ok(())
}

pub async fn drain(DrainArgs { node, conn }: DrainArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    print_as(Format::choose(output, false, Format::Json), &c.control(&ControlRequest::Drain { node }).await?);
    Ok(())
}

pub async fn restart_gpu(RestartGpuArgs { node, slot, conn }: RestartGpuArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    print_as(Format::choose(output, false, Format::Json), &c.control(&ControlRequest::RestartGpu { node, slot }).await?);
    Ok(())
}

pub async fn ping(PingArgs { from, to, count, conn }: PingArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    let r = c.ping(&from, &to, count).await?;
    if Format::choose(output, false, Format::Table) == Format::Json {
        print_json(&r);
        return Ok(());
    }
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
