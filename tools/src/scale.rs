//! `kiln scale`: how the cost of a Kiln cluster grows with its size, measured by simulation on
//! one machine. For each size it starts a fresh nats-server (JetStream, monitoring on) and that
//! many `kiln node` processes of no-op slots, then measures:
//!
//! - the registry's writes per second (node heartbeats, GPU entries), counted by a core NATS
//!   subscription to the KV subjects;
//! - what the server delivers to each node per second (its connection's `out_msgs` in
//!   `/connz`: the node-entry watch, tunnel frames, job pulls), and the node entries each node
//!   receives through its registry watch;
//! - actor-cluster sessions (from the registry's `peers`) and tunnel frames per second, idle
//!   and after `calls` control pings through the API (each opens a session on demand);
//! - node memory (its own, not the shared libraries) and CPU, from `/proc`;
//! - the no-op job throughput of the whole cluster ([`crate::bench`]'s client loop);
//! - the time from SIGKILLing a node that runs jobs to every one of them running again
//!   elsewhere (loss detection and hand-back);
//! - the time from starting a new node to its first job done (it alone serves model `late`).
//!
//! The machine is shared by every process, so CPU-bound figures (throughput, detection time)
//! fall as the size grows for want of cores, not only for the cluster's own costs: the
//! per-node message and session counts are the figures that say whether the design scales.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_core::config::NatsConfig;
use kiln_core::job::JobState;
use kiln_core::nats::NatsServer;
use kiln_core::protocol::{ControlRequest, SubmitRequest};

use crate::bench::cpu_time;
use kiln_client::Client;

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub sizes: Vec<usize>,
    pub slots: usize,
    /// How long the idle cluster is watched for the steady-state rates.
    pub window: Duration,
    /// No-op jobs of the throughput run, and how many the client keeps in flight.
    pub jobs: usize,
    pub concurrency: usize,
    /// Control pings through the API after the idle window (each may open a session).
    pub calls: usize,
    /// Rebuild what Kiln had before sessions opened on demand, to measure it: sessions never
    /// idle out (`cluster.idle_session_ms = 0`) and every pair of nodes opens one at the start.
    pub full_mesh: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SizeReport {
    pub nodes: usize,
    pub slots_per_node: usize,
    pub full_mesh: bool,
    pub start_s: f64,
    pub node_entry_writes_per_s: f64,
    pub gpu_entry_writes_per_s: f64,
    /// Node entries each node receives through its registry watch (it watches no GPU entry).
    pub watched_entries_per_node_per_s: f64,
    /// Every message the server delivers to one node's connection, mean over the nodes.
    pub delivered_per_node_per_s: f64,
    pub sessions_idle: usize,
    pub tunnel_frames_per_s_idle: f64,
    pub calls: usize,
    pub sessions_after_calls: usize,
    pub tunnel_frames_per_s_after_calls: f64,
    /// Memory of each node's own (not the shared libraries), in MiB.
    pub private_mib_mean: f64,
    pub private_mib_max: f64,
    /// CPU of one idle node, as a percentage of one core, mean over the nodes.
    pub idle_cpu_pct_per_node: f64,
    pub jobs_per_s: f64,
    pub detect_and_hand_back_ms: u64,
    pub handed_back_jobs: usize,
    pub join_to_first_job_ms: u64,
}

const NODE_PREFIX: &str = "s";

fn node_name(i: usize) -> String {
    format!("{NODE_PREFIX}{i:03}")
}

/// A light node: `slots` no-op slots serving `noop` and `hold` (a no-op that holds its slot
/// 20 s), one compression worker, no metrics endpoint; a `late` node also has slot `cpu:99`,
/// the only one serving `late`.
fn node_toml(url: &str, name: &str, slots: usize, work_dir: &Path, late: bool, full_mesh: bool) -> String {
    let mut all: Vec<String> = (0..slots).map(|i| format!("\"cpu:{i}\"")).collect();
    if late {
        all.push("\"cpu:99\"".into());
    }
    let plain = (0..slots).map(|i| format!("\"cpu:{i}\"")).collect::<Vec<_>>().join(", ");
    let cluster = if full_mesh { "[cluster]\nidle_session_ms = 0\n\n" } else { "" };
    format!(
        "{cluster}[nats]\nurl = \"{url}\"\n\n[node]\nname = \"{name}\"\nslots = [{}]\nmetrics_addr = \"\"\nwork_dir = {:?}\n\n\
         [compression]\nmax_workers = 1\n\n\
         [[models]]\nname = \"noop\"\nslots = [{plain}]\nengine = {{ kind = \"noop\" }}\n\n\
         [[models]]\nname = \"hold\"\nslots = [{plain}]\nengine = {{ kind = \"noop\", work_ms = 20000 }}\ntimeout_ms = 60000\n\n\
         [[models]]\nname = \"late\"\nslots = [\"cpu:99\"]\nengine = {{ kind = \"noop\" }}\n",
        all.join(", "),
        work_dir.display().to_string(),
    )
}

struct Node {
    name: String,
    child: std::process::Child,
}

impl Node {
    fn spawn(binary: &Path, dir: &Path, url: &str, name: &str, slots: usize, late: bool, full_mesh: bool) -> Result<Node, String> {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, node_toml(url, name, slots, &dir.join(name), late, full_mesh)).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(binary)
            .args(["node", "--config"])
            .arg(&config)
            .env("KILN_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start node {name}: {e}"))?;
        Ok(Node { name: name.to_string(), child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

/// Stops every node and waits a little for each (the next size starts on a quiet machine),
/// sleeping on the runtime's timer, not blocking its thread.
async fn stop_all(nodes: &mut Vec<Node>) {
    for n in nodes.iter() {
        unsafe { libc::kill(n.child.id() as i32, libc::SIGTERM) };
    }
    let started = Instant::now();
    for n in nodes.iter_mut() {
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = n.child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = n.child.kill();
        let _ = n.child.wait();
    }
    nodes.clear();
}

/// A process's memory of its own (`Private_Clean` + `Private_Dirty` of `/proc/PID/smaps_rollup`,
/// in MiB): what one more node costs. Its RSS also counts the shared libraries (libtorch), paid
/// once however many nodes run.
fn private_mib(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = rollup.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    Some((field("Private_Clean:")? + field("Private_Dirty:")?) / 1024.0)
}

/// Messages published on a subject pattern, counted as they pass.
struct Counter {
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    async fn start(client: &async_nats::Client, subject: &str) -> Result<Counter, String> {
        let mut sub = client.subscribe(subject.to_string()).await.map_err(|e| e.to_string())?;
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while sub.next().await.is_some() {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Counter { count, task })
    }
    fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Messages the server delivered so far to each node's connection (`kiln-node-<name>`).
async fn delivered_per_node(http: &reqwest::Client, monitor: &str) -> Result<HashMap<String, u64>, String> {
    let connz: serde_json::Value =
        http.get(format!("{monitor}/connz?limit=5000")).send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for c in connz["connections"].as_array().into_iter().flatten() {
        if let Some(name) = c["name"].as_str().and_then(|n| n.strip_prefix("kiln-node-")) {
            *out.entry(name.to_string()).or_insert(0) += c["out_msgs"].as_u64().unwrap_or(0);
        }
    }
    Ok(out)
}

async fn sessions(client: &Client) -> usize {
    client.cluster().await.map(|c| c.nodes.iter().map(|n| n.peers.len()).sum::<usize>() / 2).unwrap_or(0)
}

use crate::chaos::wait_until as until;

/// Makes every pair of nodes call once (`kiln.node.<a>.ping`), 16 pairs at a time, so each
/// opens its session; returns how many pings succeeded.
async fn open_every_session(client: &Client, n: usize) -> usize {
    let pairs: Vec<(String, String)> = (0..n).flat_map(|a| (a + 1..n).map(move |b| (node_name(a), node_name(b)))).collect();
    futures::stream::iter(pairs)
        .map(|(a, b)| {
            let client = client.clone();
            async move { client.ping(&a, &b, 1).await.is_ok() }
        })
        .buffer_unordered(16)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await
}

/// The nodes running `ids`, with their jobs, once every one of them runs (`None` after `limit`).
async fn running_owners(client: &Client, ids: &[String], limit: Duration) -> Option<BTreeMap<String, Vec<String>>> {
    let started = Instant::now();
    'poll: while started.elapsed() < limit {
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for id in ids {
            match client.status(id).await {
                Ok(v) if v.status == JobState::Running => owners.entry(v.node.unwrap_or_default()).or_default().push(id.clone()),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'poll;
                }
            }
        }
        return Some(owners);
    }
    None
}

pub async fn run(opts: ScaleOptions, binary: PathBuf) -> Result<Vec<SizeReport>, String> {
    let mut reports = vec![];
    for &size in &opts.sizes {
        eprintln!("--- {size} nodes of {} slots", opts.slots);
        reports.push(run_size(&opts, &binary, size).await?);
    }
    Ok(reports)
}

async fn run_size(opts: &ScaleOptions, binary: &Path, n: usize) -> Result<SizeReport, String> {
    let server = NatsServer::start_temp_monitored().map_err(|e| e.to_string())?;
    let monitor = server.monitor_url().ok_or("the server has no monitoring port")?;
    let url = server.url();
    let dir = tempfile::Builder::new().prefix("kiln-scale-").tempdir().map_err(|e| e.to_string())?;
    let client = Client::connect_with(&NatsConfig::for_url(&url)).await.map_err(|e| e.to_string())?;
    let http = reqwest::Client::new();

    // Start the nodes a few at a time (each start creates or checks the streams).
    let started = Instant::now();
    let mut nodes: Vec<Node> = vec![];
    for i in 0..n {
        nodes.push(Node::spawn(binary, dir.path(), &url, &node_name(i), opts.slots, false, opts.full_mesh)?);
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let registered = until(Duration::from_secs(60 + 2 * n as u64), || async {
        client.cluster().await.is_ok_and(|c| c.nodes.len() == n && c.gpus.len() == n * opts.slots)
    })
    .await;
    if !registered {
        let c = client.cluster().await.map_err(|e| e.to_string())?;
        stop_all(&mut nodes).await;
        return Err(format!("{n} nodes did not register within the limit: {} nodes, {} slots", c.nodes.len(), c.gpus.len()));
    }
    let start_s = started.elapsed().as_secs_f64();
    eprintln!("    {n} nodes registered in {start_s:.1} s");
    if opts.full_mesh {
        let pairs = open_every_session(&client, n).await;
        eprintln!("    full mesh: {pairs} sessions opened in {:.1} s", started.elapsed().as_secs_f64() - start_s);
    }
    // Let start-up settle (first heartbeats, stream checks) before measuring the steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The idle cluster over the window.
    let nats = client.nats().clone();
    let node_writes = Counter::start(&nats, "$KV.kiln_nodes.>").await?;
    let gpu_writes = Counter::start(&nats, "$KV.kiln_gpus.>").await?;
    let frames = Counter::start(&nats, "kiln.tunnel.>").await?;
    nats.flush().await.map_err(|e| e.to_string())?;
    let before_delivered = delivered_per_node(&http, &monitor).await?;
    let before_cpu: Vec<Option<Duration>> = nodes.iter().map(|node| cpu_time(node.pid())).collect();
    let window_started = Instant::now();
    tokio::time::sleep(opts.window).await;
    let secs = window_started.elapsed().as_secs_f64();
    let after_delivered = delivered_per_node(&http, &monitor).await?;
    let (node_entry_writes, gpu_entry_writes, idle_frames) = (node_writes.get(), gpu_writes.get(), frames.get());
    let cpu_pcts: Vec<f64> = nodes
        .iter()
        .zip(&before_cpu)
        .filter_map(|(node, before)| Some((cpu_time(node.pid())? - (*before)?).as_secs_f64() / secs * 100.0))
        .collect();
    let delivered: Vec<f64> = nodes
        .iter()
        .filter_map(|node| {
            let (b, a) = (before_delivered.get(&node.name)?, after_delivered.get(&node.name)?);
            Some(a.saturating_sub(*b) as f64 / secs)
        })
        .collect();
    let private: Vec<f64> = nodes.iter().filter_map(|node| private_mib(node.pid())).collect();
    let sessions_idle = sessions(&client).await;

    // Control pings through the API: whichever node takes each request calls the target's
    // actor, opening a session on demand.
    let calls = opts.calls.min(n * n);
    for i in 0..calls {
        let target = node_name((i * 7 + 3) % n);
        let reply = client.control(&ControlRequest::Ping { node: target.clone() }).await;
        if !reply.as_ref().is_ok_and(|r| r.outcome == "pong") {
            eprintln!("    ping {target}: {reply:?}");
        }
    }
    // The registry shows sessions with the next heartbeat.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sessions_after_calls = sessions(&client).await;
    let frames_before = frames.get();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tunnel_frames_per_s_after_calls = (frames.get() - frames_before) as f64 / t.elapsed().as_secs_f64();
    drop((node_writes, gpu_writes, frames));

    // The whole cluster's no-op throughput.
    let throughput = crate::bench::kiln(&client, "kiln", opts.jobs, opts.concurrency).await?;
    eprintln!("    {} no-op jobs: {:.0} jobs/s", throughput.count, throughput.per_second);

    // SIGKILL a node that runs jobs: how long until every one of them runs elsewhere.
    let holds = n.max(4);
    let mut hold_ids = vec![];
    for _ in 0..holds {
        hold_ids
            .push(client.submit(&SubmitRequest { model: "hold".into(), ..Default::default() }).await.map_err(|e| e.to_string())?.job_id);
    }
    let owners = running_owners(&client, &hold_ids, Duration::from_secs(60)).await;
    let Some(owners) = owners else {
        stop_all(&mut nodes).await;
        return Err(format!("{holds} hold jobs did not all start within 60 s"));
    };
    let (victim, victim_jobs) = owners.iter().max_by_key(|(_, jobs)| jobs.len()).map(|(n, j)| (n.clone(), j.clone())).expect("owners");
    let killed_at = Instant::now();
    if let Some(node) = nodes.iter_mut().find(|node| node.name == victim) {
        node.sigkill();
    }
    let handed_back = until(Duration::from_secs(60), || {
        let (client, jobs, victim) = (client.clone(), victim_jobs.clone(), victim.clone());
        async move {
            for id in &jobs {
                match client.status(id).await {
                    Ok(v) if v.status == JobState::Running && v.attempt >= 2 && v.node.as_deref() != Some(victim.as_str()) => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    let detect_and_hand_back_ms = killed_at.elapsed().as_millis() as u64;
    if !handed_back {
        stop_all(&mut nodes).await;
        return Err(format!("the jobs of SIGKILLed {victim} did not run again elsewhere within 60 s"));
    }
    eprintln!("    SIGKILLed {victim}: its {} jobs ran again elsewhere after {detect_and_hand_back_ms} ms", victim_jobs.len());

    // A new node joins: from its start to its first job done (only it serves `late`).
    let join_started = Instant::now();
    nodes.push(Node::spawn(binary, dir.path(), &url, "late", opts.slots, true, opts.full_mesh)?);
    let late = client.submit(&SubmitRequest { model: "late".into(), ..Default::default() }).await.map_err(|e| e.to_string())?.job_id;
    let joined =
        until(Duration::from_secs(60), || async { client.status(&late).await.is_ok_and(|v| v.status == JobState::Completed) }).await;
    let join_to_first_job_ms = join_started.elapsed().as_millis() as u64;
    if !joined {
        stop_all(&mut nodes).await;
        return Err("the new node did not complete its first job within 60 s".into());
    }
    eprintln!("    a new node joined and completed its first job in {join_to_first_job_ms} ms");
    stop_all(&mut nodes).await;
    drop(server);

    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    Ok(SizeReport {
        nodes: n,
        slots_per_node: opts.slots,
        full_mesh: opts.full_mesh,
        start_s,
        node_entry_writes_per_s: node_entry_writes as f64 / secs,
        gpu_entry_writes_per_s: gpu_entry_writes as f64 / secs,
        watched_entries_per_node_per_s: node_entry_writes as f64 / secs,
        delivered_per_node_per_s: mean(&delivered),
        sessions_idle,
        tunnel_frames_per_s_idle: idle_frames as f64 / secs,
        calls,
        sessions_after_calls,
        tunnel_frames_per_s_after_calls,
        private_mib_mean: mean(&private),
        private_mib_max: private.iter().cloned().fold(0.0, f64::max),
        idle_cpu_pct_per_node: mean(&cpu_pcts),
        jobs_per_s: throughput.per_second,
        detect_and_hand_back_ms,
        handed_back_jobs: victim_jobs.len(),
        join_to_first_job_ms,
    })
}

/// The table, one row per size, in Markdown (docs/ARCHITECTURE.md keeps it).
pub fn print(reports: &[SizeReport]) {
    println!(
        "| nodes | node writes/s | GPU writes/s | watched entries/s per node | delivered msgs/s per node | sessions idle | tunnel frames/s idle | sessions after calls | tunnel frames/s then | own memory MiB mean (max) | idle CPU % per node | no-op jobs/s | SIGKILL to handed back | join to first job |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.1} | {} ({} calls) | {:.1} | {:.0} ({:.0}) | {:.2} | {:.0} | {:.1} s ({} jobs) | {:.1} s |",
            if r.full_mesh { format!("{} (full mesh)", r.nodes) } else { r.nodes.to_string() },
            r.node_entry_writes_per_s,
            r.gpu_entry_writes_per_s,
            r.watched_entries_per_node_per_s,
            r.delivered_per_node_per_s,
            r.sessions_idle,
            r.tunnel_frames_per_s_idle,
            r.sessions_after_calls,
            r.calls,
            r.tunnel_frames_per_s_after_calls,
            r.private_mib_mean,
            r.private_mib_max,
            r.idle_cpu_pct_per_node,
            r.jobs_per_s,
            r.detect_and_hand_back_ms as f64 / 1000.0,
            r.handed_back_jobs,
            r.join_to_first_job_ms as f64 / 1000.0,
        );
    }
}
