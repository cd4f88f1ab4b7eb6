//! Models of several GPUs (issue 27 part 5, `gpus = N`): a job holds N slots of one node at
//! once, its worker sees all of them (`CUDA_VISIBLE_DEVICES`, `KILN_SLOTS`), the registry shows
//! the group, the slots it holds take no other job, and a node with too few slots never takes
//! one. Real nats-server, real node processes, a real Python worker that writes what it was
//! given into its artifact. The slots are `cpu:N` (no GPU here), whose `CUDA_VISIBLE_DEVICES`
//! is empty: the devices of `cuda:N` slots are checked by the engine's unit test
//! (`cuda_visible_devices`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln::client::Client;
use kiln_core::job::JobState;
use kiln_core::protocol::{GpuEntry, GpuState, JobView, PendingReason, QueueRequest, SubmitRequest};

/// Writes its environment into `env.json`, sleeps `sleep_s`, answers.
const WORKER: &str = r#"
import json, os, sys, time
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if job.get("type") != "job":
        continue
    out = job["output_dir"]
    os.makedirs(out, exist_ok=True)
    seen = {k: os.environ.get(k) for k in ["CUDA_VISIBLE_DEVICES", "KILN_SLOT", "KILN_SLOTS", "KILN_MODEL"]}
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(seen, f)
    time.sleep(float(job["params"].get("sleep_s", 0)))
    print(json.dumps({"type": "result", "job_id": job["job_id"],
                      "artifacts": [{"name": "env.json", "path": "env.json", "content_type": "application/json"}]}), flush=True)
"#;

/// `big` (2 GPUs) and `small` (1), both served by the worker above.
fn models(cluster: &TestCluster) -> String {
    let worker = cluster.dir.path().join("env_worker.py");
    std::fs::write(&worker, WORKER).unwrap();
    let model = |name: &str, gpus: usize| {
        format!(
            "[[models]]\nname = \"{name}\"\nengine = {{ kind = \"process\", command = [\"python3\", \"{}\"], ready_timeout_ms = 20000 }}\ngpus = {gpus}\nmax_attempts = 1\n",
            worker.display()
        )
    };
    format!("{}\n{}", model("big", 2), model("small", 1))
}

fn job(model: &str, sleep_s: f64) -> SubmitRequest {
    SubmitRequest { model: model.into(), params: params(serde_json::json!({ "sleep_s": sleep_s })), ..Default::default() }
}

/// The environment the job's worker wrote into its artifact.
async fn env_of(client: &Client, view: &JobView) -> serde_json::Value {
    let artifact = view.artifacts.iter().find(|a| a.name == "env.json").unwrap_or_else(|| panic!("no env.json: {view:?}"));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("env.json");
    client.download(artifact, &dest).await.unwrap();
    serde_json::from_slice(&std::fs::read(&dest).unwrap()).unwrap()
}

/// The node's slots in the registry once `check` holds of them (within 15 s).
async fn slots_when(client: &Client, node: &str, what: &str, check: impl Fn(&[GpuEntry]) -> bool) -> Vec<GpuEntry> {
    let started = Instant::now();
    loop {
        let mut gpus: Vec<GpuEntry> = client.cluster().await.unwrap().gpus.into_iter().filter(|g| g.node == node).collect();
        gpus.sort_by(|a, b| a.slot.cmp(&b.slot));
        if check(&gpus) {
            return gpus;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{what} never showed: {gpus:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gpu_job_holds_two_slots_together_and_its_worker_sees_both() {
    let mut cluster = TestCluster::new();
    let models = models(&cluster);
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0", "cpu:1", "cpu:2"], 30_000, &models));
    cluster.wait_node_ready("n1", 3).await;
    let client = cluster.client().await;

    let big = client.submit(&job("big", 4.0)).await.unwrap().job_id;
    // While it runs: its primary and one companion show busy with it and name the group; the
    // third slot stays out of it.
    // (The primary shows `loading` while the worker starts, then `busy`.)
    let running = slots_when(&client, "n1", "the group", |g| {
        g.iter().filter(|g| g.current_job.as_deref() == Some(big.as_str()) && g.state == GpuState::Busy).count() == 2
    })
    .await;
    let group = vec!["cpu:0".to_string(), "cpu:1".to_string()];
    for g in &running[..2] {
        assert_eq!((g.state, &g.group), (GpuState::Busy, &group), "{g:?}");
    }
    assert!(running[2].group.is_empty() && running[2].current_job.is_none(), "{:?}", running[2]);

    // A one-slot job runs beside it, on the free slot, and ends first.
    let small = client.submit(&job("small", 0.0)).await.unwrap().job_id;
    let small_view = wait_terminal(&client, &small, Duration::from_secs(30)).await;
    assert_eq!((small_view.status, small_view.slot.as_deref()), (JobState::Completed, Some("cpu:2")), "{small_view:?}");
    let env = env_of(&client, &small_view).await;
    assert_eq!((env["KILN_SLOTS"].as_str(), env["CUDA_VISIBLE_DEVICES"].as_str()), (Some("cpu:2"), Some("")), "{env}");
    assert_eq!(client.status(&big).await.unwrap().status, JobState::Running, "the small job ended while the big one ran");

    let big_view = wait_terminal(&client, &big, Duration::from_secs(30)).await;
    assert_eq!((big_view.status, big_view.slot.as_deref()), (JobState::Completed, Some("cpu:0")), "{big_view:?}");
    let env = env_of(&client, &big_view).await;
    assert_eq!(env["KILN_SLOTS"], "cpu:0,cpu:1", "{env}");
    assert_eq!(env["KILN_SLOT"], "cpu:0", "{env}");
    assert_eq!(env["CUDA_VISIBLE_DEVICES"], "", "cpu slots give the worker no GPU: {env}");
    // The group is freed with its job: both slots idle, no group named.
    slots_when(&client, "n1", "the group freed", |g| {
        g.iter().all(|g| g.state == GpuState::Idle && g.group.is_empty() && g.current_job.is_none())
    })
    .await;
    println!("big on {:?} with KILN_SLOTS {}, small on cpu:2 meanwhile", big_view.slot, env["KILN_SLOTS"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gpu_job_waits_while_a_group_holds_every_slot() {
    let mut cluster = TestCluster::new();
    let models = models(&cluster);
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &models));
    cluster.wait_node_ready("n1", 2).await;
    let client = cluster.client().await;

    let big = client.submit(&job("big", 3.0)).await.unwrap().job_id;
    slots_when(&client, "n1", "the group", |g| g.iter().all(|g| g.current_job.as_deref() == Some(big.as_str()))).await;
    let small = client.submit(&job("small", 0.0)).await.unwrap().job_id;
    // The companion is held for the big job: the small one stays queued until it ends.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = client.status(&small).await.unwrap();
    assert_eq!(waiting.status, JobState::Queued, "{waiting:?}");
    assert_eq!(client.status(&big).await.unwrap().status, JobState::Running);
    let big_view = wait_terminal(&client, &big, Duration::from_secs(30)).await;
    let small_view = wait_terminal(&client, &small, Duration::from_secs(30)).await;
    assert_eq!((big_view.status, small_view.status), (JobState::Completed, JobState::Completed));
    let (big_end, small_start) = (big_view.finished_ms.unwrap(), small_view.started_ms.unwrap());
    assert!(small_start + 50 >= big_end, "the small job started at {small_start}, before the group was freed at {big_end}");
    println!(
        "small job waited {} ms in the queue; started {} ms after the big one ended",
        small_start - small_view.created_ms,
        small_start as i64 - big_end as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_too_few_slots_never_takes_a_multi_gpu_job() {
    let mut cluster = TestCluster::new();
    let models = models(&cluster);
    cluster.add_node("one", &config_toml(&cluster.url(), &["cpu:0"], 30_000, &models));
    cluster.wait_node_ready("one", 1).await;
    let client = cluster.client().await;

    let gpus = client.cluster().await.unwrap().gpus;
    assert_eq!(gpus[0].models, vec!["small".to_string()], "the one-slot node does not serve the 2-GPU model: {gpus:?}");
    let big = client.submit(&job("big", 0.0)).await.unwrap().job_id;
    let started = Instant::now();
    loop {
        let view = client.status(&big).await.unwrap();
        assert_eq!(view.status, JobState::Queued, "{view:?}");
        if started.elapsed() > Duration::from_secs(2) {
            let pending = view.pending.expect("a queued job says why it waits");
            assert_eq!(pending.reason, PendingReason::NoSlot, "{pending:?}");
            assert!(pending.message.contains("needs 2 slots of one node"), "{pending:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What an autoscaler reads: no slot serves it, and its one job needs two.
    let queue = client.queue(&QueueRequest { model: Some("big".into()) }).await.unwrap();
    let big_queue = &queue.models[0];
    assert_eq!((big_queue.queued, big_queue.slots, big_queue.desired_slots), (1, 0, 2), "{big_queue:?}");
    // A node with two slots takes it.
    cluster.add_node("two", &config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &models));
    let view = wait_terminal(&client, &big, Duration::from_secs(30)).await;
    assert_eq!((view.status, view.node.as_deref()), (JobState::Completed, Some("two")), "{view:?}");
    assert_eq!(env_of(&client, &view).await["KILN_SLOTS"], "cpu:0,cpu:1");
}
