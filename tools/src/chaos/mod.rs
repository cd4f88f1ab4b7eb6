//! `kiln chaos`: storms a real local cluster with jobs while injecting faults on a seeded
//! schedule, then checks that nothing was lost and prints (and writes) a report.
//!
//! | file          | what                                                                  |
//! |---------------|-----------------------------------------------------------------------|
//! | `schedule.rs` | the seeded plan: submissions (jobs, pipelines, batches, cancels), faults |
//! | `cluster.rs`  | the local cluster: nats-server(s), node processes, link proxies       |
//! | `proxy.rs`    | a TCP proxy that cuts and restores one node's link to NATS            |
//! | `nats_cluster.rs` | a NATS cluster to kill, wipe and partition (`--nats-cluster 3`, `tests/nats_cluster.rs`) |
//! | `check.rs`    | the invariants, read back from NATS after the storm                   |
//!
//! The run: start the cluster; submit the plan's storm from one client (idempotency keys, so
//! a retried submit never makes a second job) while a second task injects the plan's faults
//! and heals them; wait until every accepted job has ended; check. The exit status is
//! non-zero when an invariant fails. docs/RELIABILITY.md has the invariants and the figures.

pub mod check;
pub mod cluster;
pub mod nats_cluster;
pub mod proxy;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::job::JobState;
use kiln_core::protocol::{BatchItemRequest, BatchSubmitRequest, ControlRequest, ErrorCode, InputValue, ListJobsRequest, SubmitRequest};
use serde::{Deserialize, Serialize};

use cluster::LocalCluster;
use kiln_client::{Client, ClientError};
pub use proxy::LinkProxy;
pub use schedule::{plan, Fault, FaultKind, Plan, Profile, Submission};

pub struct ChaosOptions {
    pub seed: u64,
    pub profile: Profile,
    /// The `kiln` binary the nodes run (this one, normally). Inference panics need one built
    /// with the `fault-injection` feature.
    pub node_binary: PathBuf,
    pub fault_points: bool,
    pub python: String,
    pub worker: PathBuf,
    /// Where the cluster keeps its files; a temporary folder when `None`.
    pub work_dir: Option<PathBuf>,
    pub report: Option<PathBuf>,
}

/// What was accepted: a job, or a batch and its items.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    pub job_ids: Vec<String>,
    pub batch_id: Option<String>,
    /// (prompt, seed) of each job: equal inputs must give equal bytes on any node or attempt.
    pub inputs: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InjectedFault {
    #[serde(flatten)]
    pub fault: Fault,
    pub target: String,
    /// Empty when injected; otherwise why it could not be.
    pub skipped: String,
    /// For node kills: how long the dead node stayed visible in the registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_visible_ms: Option<u64>,
    /// For a SIGTERM during start-up: the node's exit code (a drain exits 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Invariant {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub profile: Profile,
    pub passed: bool,
    pub submissions: u32,
    pub not_accepted: u32,
    pub jobs_accepted: u32,
    pub batches_accepted: u32,
    pub completed: u32,
    pub failed: BTreeMap<String, u32>,
    pub cancelled: u32,
    /// Jobs that took more than one attempt (the faults' visible cost).
    pub retried: u32,
    pub faults_by_kind: BTreeMap<String, u32>,
    pub faults_skipped: u32,
    pub faults: Vec<InjectedFault>,
    pub invariants: Vec<Invariant>,
    pub storm_ms: u64,
    /// From the last fault healed to every accepted job ended.
    pub settle_ms: u64,
    /// From every job ended to the registry showing every node up and every slot idle.
    pub registry_converged_ms: u64,
    pub total_ms: u64,
}

/// A client call during faults: retried on timeouts, no responders and overload, and after
/// the wait it was given over a quota, as a careful client does (every mutating call here is
/// idempotent).
async fn retrying<T, F, Fut>(limit: Duration, mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let start = Instant::now();
    loop {
        match call().await {
            Err(ClientError::Timeout(_)) | Err(ClientError::NoResponders(_)) | Err(ClientError::Nats(_)) if start.elapsed() < limit => {}
            Err(ClientError::Api(e)) if matches!(e.code, ErrorCode::Overloaded | ErrorCode::Internal) && start.elapsed() < limit => {}
            Err(e) if matches!(&e, ClientError::Api(a) if a.code == ErrorCode::QuotaExceeded) && start.elapsed() < limit => {
                let wait = e.retry_after().unwrap_or(Duration::from_millis(200)).min(Duration::from_secs(2));
                tokio::time::sleep(wait).await;
                continue;
            }
            other => return other,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn job_params(steps: u32, step_ms: u64, seed: u64) -> serde_json::Map<String, serde_json::Value> {
    serde_json::json!({ "steps": steps, "step_ms": step_ms, "seed": seed }).as_object().cloned().expect("object")
}

fn prompt_of(index: u32) -> (String, u64) {
    // Few distinct inputs, so equal inputs run on different nodes and attempts.
    (format!("chaos frame {}", index % 13), (index % 5) as u64)
}

/// Submits one planned submission; `None` when no node accepted it within a minute.
async fn submit(client: &Client, seed: u64, profile: &Profile, p: &schedule::Planned) -> Option<Accepted> {
    let key = format!("chaos-{seed}-{}", p.index);
    let limit = Duration::from_secs(60);
    let (prompt, input_seed) = prompt_of(p.index);
    let inputs = [("prompt".to_string(), InputValue::Inline(prompt.clone().into()))].into();
    let (model, steps, hang) = match &p.what {
        Submission::Job { steps, hang_first_attempt } => ("chaos", *steps, *hang_first_attempt),
        Submission::Staged { steps } => ("chaos-staged", *steps, false),
        Submission::Batch { items, steps } => return submit_batch(client, &key, profile, p, *items, *steps).await,
    };
    let mut params = job_params(steps, profile.step_ms, input_seed);
    if hang {
        params.insert("hang_on_attempts".into(), serde_json::json!([1]));
    }
    let labels = [("user_id".to_string(), schedule::user_of(p.index, profile.users))].into();
    let request = SubmitRequest { model: model.into(), inputs, params, idempotency_key: Some(key), labels, ..Default::default() };
    let reply = retrying(limit, || client.submit(&request)).await.ok()?;
    Some(Accepted { job_ids: vec![reply.job_id], batch_id: None, inputs: vec![(prompt, input_seed)] })
}

async fn submit_batch(client: &Client, key: &str, profile: &Profile, p: &schedule::Planned, items: u32, steps: u32) -> Option<Accepted> {
    let (inputs, items): (Vec<(String, u64)>, Vec<BatchItemRequest>) = (0..items)
        .map(|i| {
            let (prompt, s) = prompt_of(p.index * 7 + i);
            let item = BatchItemRequest {
                inputs: [("prompt".to_string(), InputValue::Inline(prompt.clone().into()))].into(),
                params: job_params(steps, profile.step_ms, s),
                ..Default::default()
            };
            ((prompt, s), item)
        })
        .unzip();
    let labels = [("user_id".to_string(), schedule::user_of(p.index, profile.users))].into();
    let request = BatchSubmitRequest { model: "chaos".into(), items, idempotency_key: Some(key.to_string()), labels, ..Default::default() };
    let reply = retrying(Duration::from_secs(60), || client.submit_batch(&request)).await.ok()?;
    Some(Accepted { job_ids: reply.items.iter().map(|i| i.job_id.clone()).collect(), batch_id: Some(reply.batch_id), inputs })
}

/// Runs the storm and the faults, waits for every job to end, checks, reports.
pub async fn run(opts: ChaosOptions) -> Result<ChaosReport, String> {
    let started = Instant::now();
    let temp = match &opts.work_dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("kiln-chaos-").tempdir().map_err(|e| e.to_string())?),
    };
    let dir = opts.work_dir.clone().unwrap_or_else(|| temp.as_ref().expect("temp").path().to_path_buf());
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let profile = opts.profile.clone();
    let plan = schedule::plan(opts.seed, &profile);
    println!(
        "chaos: seed {} profile {}: {} nodes x {} slots, {} submissions at {}/s, {} faults, {}",
        opts.seed,
        profile.name,
        profile.nodes,
        profile.slots_per_node,
        profile.jobs,
        profile.rate,
        plan.faults.len(),
        if profile.nats_servers > 1 {
            format!("a cluster of {} nats-servers (every stream with {} replicas)", profile.nats_servers, profile.nats_servers)
        } else {
            "one nats-server".to_string()
        }
    );
    for f in &plan.faults {
        println!("  fault at {:>6} ms: {:?} on node {} for {} ms", f.at_ms, f.kind, f.node, f.duration_ms);
    }

    let cluster = Arc::new(LocalCluster::start(&dir, &profile, &opts.node_binary, &opts.python, &opts.worker).await?);
    let client = Client::connect(&cluster.server_url, "kiln").await.map_err(|e| e.to_string())?.with_timeout(Duration::from_secs(3));
    // Wait until every node's slots are registered and the nodes have meshed.
    let ready = wait_until(Duration::from_secs(60), || async {
        client.cluster().await.is_ok_and(|c| c.gpus.len() == profile.nodes * profile.slots_per_node && c.nodes.len() == profile.nodes)
    })
    .await;
    if !ready {
        let logs: Vec<String> = cluster.nodes.iter().map(|n| n.lock().unwrap_or_else(|e| e.into_inner()).log()).collect();
        return Err(format!("the cluster did not come up within 60 s:\n{}", logs.join("\n")));
    }
    println!("chaos: cluster up in {} ms", started.elapsed().as_millis());

    // The storm: each submission at its offset, its cancel (if any) after it.
    let storm_start = Instant::now();
    let accepted: Arc<Mutex<Vec<Accepted>>> = Default::default();
    let not_accepted = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut storm = tokio::task::JoinSet::new();
    let mut planned = plan.submissions.clone();
    // Slow-model faults are jobs of their own, submitted at the fault's moment.
    for (index, f) in (profile.jobs..).zip(plan.faults.iter().filter(|f| f.kind == FaultKind::SlowModel)) {
        planned.push(schedule::Planned {
            at_ms: f.at_ms,
            index,
            what: Submission::Job { steps: 2, hang_first_attempt: true },
            cancel_after_ms: None,
        });
    }
    let submissions = planned.len() as u32;
    for p in planned {
        let (client, accepted, not_accepted, profile) = (client.clone(), accepted.clone(), not_accepted.clone(), profile.clone());
        let seed = opts.seed;
        storm.spawn(async move {
            tokio::time::sleep_until((storm_start + Duration::from_millis(p.at_ms)).into()).await;
            let Some(a) = submit(&client, seed, &profile, &p).await else {
                not_accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            };
            if let Some(after) = p.cancel_after_ms {
                tokio::time::sleep(Duration::from_millis(after)).await;
                let limit = Duration::from_secs(60);
                // A cancel that is refused (the job ended first) changes nothing to check.
                let _ = match &a.batch_id {
                    Some(b) => retrying(limit, || client.cancel_batch(b)).await.map(|_| ()),
                    None => retrying(limit, || client.cancel(&a.job_ids[0])).await.map(|_| ()),
                };
            }
            accepted.lock().unwrap_or_else(|e| e.into_inner()).push(a);
        });
    }

    // The faults, each healed by a task of its own.
    let injected: Arc<Mutex<Vec<InjectedFault>>> = Default::default();
    let mut heals = tokio::task::JoinSet::new();
    for fault in plan.faults.clone() {
        tokio::time::sleep_until((storm_start + Duration::from_millis(fault.at_ms)).into()).await;
        let target = match fault.kind {
            FaultKind::NatsRestart | FaultKind::NatsServerKill | FaultKind::NatsPartition => cluster.nats_target(fault.node),
            // On one server the flood's target was always reported as a node's name; kept.
            FaultKind::NatsTermFlood if cluster.nats_cluster().is_some() => cluster.nats_target(fault.node),
            FaultKind::NatsLeaderKill => nats_cluster::stream_leader(client.jetstream(), &client.names().jobs_stream())
                .await
                .unwrap_or_else(|| "no leader".to_string()),
            FaultKind::SlowModel | FaultKind::CompressionHang => "cluster".to_string(),
            _ => cluster.node_name(fault.node),
        };
        let skipped = inject(&cluster, &client, &fault, &target, opts.fault_points, &mut heals, injected.clone(), accepted.clone()).await;
        if !skipped.is_empty() {
            println!("  fault {:?} on {target} skipped: {skipped}", fault.kind);
        }
        // Node kills and start-up SIGTERMs record their own entry (with what they measured)
        // when healed.
        if !(matches!(fault.kind, FaultKind::NodeKill | FaultKind::StartupTerm) && skipped.is_empty()) {
            injected.lock().unwrap_or_else(|e| e.into_inner()).push(InjectedFault {
                fault,
                target,
                skipped,
                dead_visible_ms: None,
                exit_code: None,
            });
        }
    }
    while storm.join_next().await.is_some() {}
    let storm_ms = storm_start.elapsed().as_millis() as u64;
    while heals.join_next().await.is_some() {}
    let healed = Instant::now();
    println!("chaos: storm done in {storm_ms} ms; every fault healed {} ms after it began", storm_start.elapsed().as_millis());

    // Every accepted job must end.
    let accepted: Vec<Accepted> = accepted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let all_jobs: Vec<String> = accepted.iter().flat_map(|a| a.job_ids.clone()).collect();
    // Jobs seen terminal are not asked again (terminal is final).
    let open = Arc::new(Mutex::new(all_jobs.clone()));
    let ended = wait_until(Duration::from_secs(180), || async {
        let pending = open.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut still = vec![];
        for id in pending {
            if !client.status(&id).await.is_ok_and(|v| v.status.is_terminal()) {
                still.push(id);
            }
        }
        let done = still.is_empty();
        *open.lock().unwrap_or_else(|e| e.into_inner()) = still;
        done
    })
    .await;
    let settle_ms = healed.elapsed().as_millis() as u64;
    println!("chaos: {} jobs accepted; all ended: {ended} ({settle_ms} ms after the last heal)", all_jobs.len());

    let converge_start = Instant::now();
    let converged = wait_until(Duration::from_secs(30), || async {
        client.cluster().await.is_ok_and(|c| check::registry_problems(&c, &profile, &cluster_names(&cluster)).is_empty())
    })
    .await;
    let registry_converged_ms = converge_start.elapsed().as_millis() as u64;

    // An armed fault point that no job hit is reported as not injected.
    let mut faults = injected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for f in faults.iter_mut().filter(|f| f.fault.kind == FaultKind::InferencePanic && f.skipped.is_empty()) {
        let dir = cluster.nodes[f.fault.node].lock().unwrap_or_else(|e| e.into_inner()).fault_dir.clone();
        if dir.join("panic_before_run").exists() {
            f.skipped = "armed, but no job reached the fault point on that node".into();
        }
    }
    let mut checker = check::Checker::new(client.clone(), &dir);
    let mut invariants = checker.check_all(&accepted, &faults, &profile, &cluster_names(&cluster), converged, registry_converged_ms).await;
    invariants.push(no_record_left_open(&client).await);
    invariants.push(check::stop_signals_drained(&faults));
    let mut faults_by_kind = BTreeMap::new();
    for f in faults.iter().filter(|f| f.skipped.is_empty()) {
        *faults_by_kind.entry(format!("{:?}", f.fault.kind)).or_insert(0) += 1;
    }
    let report = ChaosReport {
        seed: opts.seed,
        profile: profile.clone(),
        passed: invariants.iter().all(|i| i.ok),
        submissions,
        not_accepted: not_accepted.load(std::sync::atomic::Ordering::Relaxed),
        jobs_accepted: all_jobs.len() as u32,
        batches_accepted: accepted.iter().filter(|a| a.batch_id.is_some()).count() as u32,
        completed: checker.outcomes.completed,
        failed: checker.outcomes.failed.clone(),
        cancelled: checker.outcomes.cancelled,
        retried: checker.outcomes.retried,
        faults_by_kind,
        faults_skipped: faults.iter().filter(|f| !f.skipped.is_empty()).count() as u32,
        faults,
        invariants,
        storm_ms,
        settle_ms,
        registry_converged_ms,
        total_ms: started.elapsed().as_millis() as u64,
    };
    print_report(&report);
    if let Some(path) = &opts.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report).expect("json")).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("chaos: report written to {}", path.display());
    }
    if !report.passed {
        for n in &cluster.nodes {
            let n = n.lock().unwrap_or_else(|e| e.into_inner());
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- last lines of node {} ----", n.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    drop(temp);
    Ok(report)
}

/// Every job record in NATS ended, not only those the storm was told of: a submission cut
/// between its writes (the flood under a nats-server SIGTERM, a node killed mid-request) must
/// not leave a record `queued` without its queue message.
async fn no_record_left_open(client: &Client) -> Invariant {
    // `kiln.api.jobs` reads every record (a known O(jobs) cost): the long profile's 2,800
    // records take longer than an ordinary request's timeout in a debug build.
    let client = client.clone().with_timeout(Duration::from_secs(120));
    let mut open = vec![];
    for status in [JobState::Queued, JobState::Running, JobState::Retrying] {
        let request = ListJobsRequest { status: Some(status), limit: Some(1000), ..Default::default() };
        match retrying(Duration::from_secs(30), || client.jobs(&request)).await {
            Ok(reply) => open.extend(reply.jobs.into_iter().map(|j| format!("{} is {}", j.job_id, j.status.as_str()))),
            Err(e) => open.push(format!("cannot list {} jobs: {e}", status.as_str())),
        }
    }
    check::invariant("no job record is left open", open, "every job record in the cluster ended, answered or not".into())
}

/// A flood of submits without idempotency keys, as a careless client sends them, with the
/// nats-server SIGTERMed in the middle of it. The answered ones are jobs like any other.
async fn flood_through_a_server_restart(
    cluster: &LocalCluster,
    client: &Client,
    target: &str,
    down: Duration,
    accepted: Arc<Mutex<Vec<Accepted>>>,
) {
    let quick = client.clone().with_timeout(Duration::from_secs(2));
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..FLOOD_SUBMITS {
        let quick = quick.clone();
        flood.spawn(async move {
            let (prompt, seed) = prompt_of(10_000 + i);
            let request = SubmitRequest {
                model: "chaos".into(),
                inputs: [("prompt".to_string(), InputValue::Inline(prompt.clone().into()))].into(),
                params: job_params(2, 20, seed),
                ..Default::default()
            };
            quick.submit(&request).await.ok().map(|r| Accepted { job_ids: vec![r.job_id], batch_id: None, inputs: vec![(prompt, seed)] })
        });
        if i == FLOOD_SUBMITS / 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(15)).await;
    if let Err(e) = cluster.restart_server(target, down).await {
        eprintln!("chaos: nats-server restart failed: {e}");
    }
    while let Some(done) = flood.join_next().await {
        if let Ok(Some(a)) = done {
            accepted.lock().unwrap_or_else(|e| e.into_inner()).push(a);
        }
    }
}

/// Submits in one `nats_term_flood`.
const FLOOD_SUBMITS: u32 = 40;

fn cluster_names(cluster: &LocalCluster) -> Vec<String> {
    (0..cluster.nodes.len()).map(|i| cluster.node_name(i)).collect()
}

/// Polls `check` every 50 ms until it is true (then true) or `limit` passes (then false).
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Injects one fault on `target` (healing it later from a task in `heals`); returns why it was
/// skipped, or an empty string.
#[allow(clippy::too_many_arguments)]
async fn inject(
    cluster: &Arc<LocalCluster>,
    client: &Client,
    fault: &Fault,
    target: &str,
    fault_points: bool,
    heals: &mut tokio::task::JoinSet<()>,
    injected: Arc<Mutex<Vec<InjectedFault>>>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
) -> String {
    let heal_after = Duration::from_millis(fault.duration_ms);
    let node = cluster.nodes[fault.node.min(cluster.nodes.len() - 1)].clone();
    let node_running = node.lock().unwrap_or_else(|e| e.into_inner()).is_running();
    if fault.kind.takes_node_down() {
        let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
        if n.in_fault {
            return "an earlier fault on that node has not healed yet".into();
        }
        if !node_running {
            return "the node is down already".into();
        }
        n.in_fault = true;
    }
    let healed = |node: &Arc<Mutex<cluster::NodeProcess>>| node.lock().unwrap_or_else(|e| e.into_inner()).in_fault = false;
    // On a cluster, one NATS server away at a time; the fault's heal clears this.
    if fault.kind.takes_nats_server_down() && cluster.nats_cluster().is_some() && cluster.nats_in_fault.swap(true, Ordering::SeqCst) {
        return "an earlier NATS fault has not healed yet".into();
    }
    let nats_healed = |cluster: &LocalCluster| cluster.nats_in_fault.store(false, Ordering::SeqCst);
    match fault.kind {
        FaultKind::InferencePanic => {
            if !fault_points {
                return "this binary has no fault points (build with --features fault-injection)".into();
            }
            let dir = node.lock().unwrap_or_else(|e| e.into_inner()).fault_dir.clone();
            match std::fs::write(dir.join("panic_before_run"), b"") {
                Ok(()) => String::new(),
                Err(e) => e.to_string(),
            }
        }
        FaultKind::WorkerKill => {
            let pids = cluster.worker_pids(fault.node);
            match pids.first() {
                Some(pid) => {
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                    String::new()
                }
                None => "no worker process running on that node".into(),
            }
        }
        FaultKind::NodeKill => {
            node.lock().unwrap_or_else(|e| e.into_inner()).kill();
            let (client, cluster, fault) = (client.clone(), cluster.clone(), fault.clone());
            heals.spawn(async move {
                let name = cluster.node_name(fault.node);
                let killed = Instant::now();
                // How long the registry still shows the dead node as alive.
                let gone = wait_until(Duration::from_secs(20), || async {
                    client.cluster().await.is_ok_and(|c| {
                        !c.nodes.iter().any(|n| n.node == name)
                            && c.gpus.iter().filter(|g| g.node == name).all(|g| g.state == kiln_core::protocol::GpuState::Dead)
                    })
                })
                .await;
                let visible = killed.elapsed().as_millis() as u64;
                tokio::time::sleep(heal_after.saturating_sub(killed.elapsed())).await;
                let restarted = node.lock().unwrap_or_else(|e| e.into_inner()).start();
                healed(&node);
                let skipped = match restarted {
                    Ok(()) => String::new(),
                    Err(e) => format!("restart failed: {e}"),
                };
                injected.lock().unwrap_or_else(|e| e.into_inner()).push(InjectedFault {
                    fault,
                    target: name,
                    skipped,
                    dead_visible_ms: Some(if gone { visible } else { u64::MAX }),
                    exit_code: None,
                });
            });
            String::new()
        }
        FaultKind::NodeDrain => {
            let name = cluster.node_name(fault.node);
            // As an operator would: a node just back from a nats-server restart may be missing
            // from the answering node's registry cache for a moment; try for 10 s.
            let request = ControlRequest::Drain { node: name.clone() };
            let started = Instant::now();
            loop {
                match client.control(&request).await {
                    Ok(_) => break,
                    Err(e) if started.elapsed() > Duration::from_secs(10) => {
                        // A request answered late or not at all may still have reached the node
                        // (another node forwards it once its actor-cluster session is up: a run
                        // saw "not_found" here and the drain land half a second later, and the
                        // node stayed down). If it drains after all, it comes back as a drained
                        // node does.
                        heals.spawn(async move {
                            let exited = wait_until(Duration::from_secs(30), || {
                                let node = node.clone();
                                async move { !node.lock().unwrap_or_else(|e| e.into_inner()).is_running() }
                            })
                            .await;
                            let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
                            if exited {
                                let _ = n.start();
                            }
                            n.in_fault = false;
                        });
                        return format!("drain refused: {e}");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
            heals.spawn(async move {
                // It exits by itself once its jobs are done; then it comes back.
                let exited = wait_until(Duration::from_secs(120), || {
                    let node = node.clone();
                    async move { !node.lock().unwrap_or_else(|e| e.into_inner()).is_running() }
                })
                .await;
                if !exited {
                    eprintln!("chaos: a drained node did not exit within 120 s; killing it");
                }
                tokio::time::sleep(heal_after).await;
                let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
                let _ = n.start();
                n.in_fault = false;
            });
            String::new()
        }
        FaultKind::NatsRestart => {
            let (cluster, target) = (cluster.clone(), target.to_string());
            heals.spawn(async move {
                if let Err(e) = cluster.restart_server(&target, heal_after).await {
                    eprintln!("chaos: nats-server restart failed: {e}");
                }
                nats_healed(&cluster);
            });
            String::new()
        }
        FaultKind::NatsServerKill | FaultKind::NatsLeaderKill | FaultKind::NatsPartition => {
            let Some(nats) = cluster.nats_cluster() else { return "needs a NATS cluster (--nats-cluster 3)".into() };
            let Some(i) = nats.index_of(target) else {
                nats_healed(cluster);
                return format!("no server {target} to hit");
            };
            if fault.kind == FaultKind::NatsPartition {
                if let Err(e) = nats.partition(i) {
                    nats_healed(cluster);
                    return e;
                }
            } else {
                nats.kill(i).await;
            }
            let (cluster, kind) = (cluster.clone(), fault.kind);
            heals.spawn(async move {
                tokio::time::sleep(heal_after).await;
                let nats = cluster.nats_cluster().expect("a NATS cluster");
                let back = if kind == FaultKind::NatsPartition {
                    nats.heal(i);
                    Ok(())
                } else {
                    nats.restart(i).await
                };
                if let Err(e) = back.and(cluster.wait_server_current(i).await) {
                    eprintln!("chaos: {} did not come back: {e}", nats.name(i));
                }
                nats_healed(&cluster);
            });
            String::new()
        }
        FaultKind::LinkCut => {
            cluster.links[fault.node].cut();
            let cluster = cluster.clone();
            let i = fault.node;
            heals.spawn(async move {
                tokio::time::sleep(heal_after).await;
                cluster.links[i].restore();
                healed(&cluster.nodes[i]);
            });
            String::new()
        }
        // Submitted by the storm at this moment; nothing to do here.
        FaultKind::SlowModel => String::new(),
        FaultKind::NodeStop => {
            let Some(pid) = node.lock().unwrap_or_else(|e| e.into_inner()).pid() else {
                healed(&node);
                return "the node has no process".into();
            };
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            heals.spawn(async move {
                tokio::time::sleep(heal_after).await;
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                healed(&node);
            });
            String::new()
        }
        FaultKind::NatsTermFlood => {
            let (cluster, client, target) = (cluster.clone(), client.clone(), target.to_string());
            heals.spawn(async move {
                flood_through_a_server_restart(&cluster, &client, &target, heal_after, accepted).await;
                nats_healed(&cluster);
            });
            String::new()
        }
        FaultKind::StartupTerm => {
            // A restart (as after a crash: its old entry is still in the registry, so the new
            // process first watches it for a registry TTL), then SIGTERM in the middle of that.
            let (restarted, startups) = {
                let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
                n.kill();
                let startups = n.startups_logged();
                (n.start(), startups)
            };
            if let Err(e) = restarted {
                healed(&node);
                return format!("restart failed: {e}");
            }
            let (cluster, fault) = (cluster.clone(), fault.clone());
            heals.spawn(async move {
                // The delay counts from the process's first line of its own: a loaded machine
                // takes up to a second or more to map libtorch before it (a SIGTERM then is
                // the default kill of a process that has not started anything).
                let logged = Instant::now() + Duration::from_secs(30);
                while node.lock().unwrap_or_else(|e| e.into_inner()).startups_logged() <= startups && Instant::now() < logged {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(heal_after).await;
                let pid = node.lock().unwrap_or_else(|e| e.into_inner()).pid();
                if let Some(pid) = pid {
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                let mut exit_code = None;
                let limit = Instant::now() + Duration::from_secs(30);
                while exit_code.is_none() && Instant::now() < limit {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    exit_code = node.lock().unwrap_or_else(|e| e.into_inner()).reap();
                }
                let skipped = {
                    let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
                    if exit_code.is_none() {
                        n.kill();
                    }
                    match n.start() {
                        Ok(()) => String::new(),
                        Err(e) => format!("restart failed: {e}"),
                    }
                };
                healed(&node);
                let entry = InjectedFault {
                    target: cluster.node_name(fault.node),
                    fault,
                    skipped,
                    dead_visible_ms: None,
                    exit_code: Some(exit_code.unwrap_or(i32::MIN)),
                };
                injected.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
            });
            String::new()
        }
        FaultKind::CompressionHang => {
            if let Err(e) = std::fs::write(&cluster.hang_marker, b"") {
                return e.to_string();
            }
            let marker = cluster.hang_marker.clone();
            heals.spawn(async move {
                tokio::time::sleep(heal_after).await;
                let _ = std::fs::remove_file(&marker);
            });
            String::new()
        }
    }
}

fn print_report(r: &ChaosReport) {
    println!();
    println!("chaos report: seed {} profile {} -> {}", r.seed, r.profile.name, if r.passed { "PASSED" } else { "FAILED" });
    println!(
        "  submissions {} ({} not accepted); jobs accepted {} (in {} batches or alone)",
        r.submissions, r.not_accepted, r.jobs_accepted, r.batches_accepted
    );
    println!(
        "  completed {}, cancelled {}, failed {:?}; {} jobs needed more than one attempt",
        r.completed, r.cancelled, r.failed, r.retried
    );
    println!("  faults injected {:?}, skipped {}", r.faults_by_kind, r.faults_skipped);
    println!(
        "  storm {} ms; all jobs ended {} ms after the last heal; registry converged in {} ms; total {} ms",
        r.storm_ms, r.settle_ms, r.registry_converged_ms, r.total_ms
    );
    for i in &r.invariants {
        println!("  [{}] {}: {}", if i.ok { "ok" } else { "FAIL" }, i.name, i.detail);
    }
}
