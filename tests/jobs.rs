//! The job life cycle against a real nats-server and real `kiln node` processes: submit,
//! progress, result (Rust and Python clients), late replay, idempotency, cancel.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln_core::job::JobState;
use kiln_core::protocol::{EventKind, InputValue, SubmitRequest};

fn demo_request(prompt: &str, p: serde_json::Value) -> SubmitRequest {
    prompt_request("demo", prompt, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_streams_progress_and_returns_verified_results() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    // An uploaded input travels through the files bucket to the worker as a file.
    client.upload("uploads/t1/ref.png", b"\x89PNG\r\n\x1a\nnot really").await.unwrap();
    let mut request = demo_request("a lighthouse at dawn", serde_json::json!({"steps": 5, "step_ms": 20, "seed": 7}));
    request.inputs.insert("image".into(), InputValue::Object { object: "uploads/t1/ref.png".into() });
    let reply = client.submit(&request).await.unwrap();
    assert_eq!(reply.status, JobState::Queued);

    let events: Vec<_> =
        tokio::time::timeout(Duration::from_secs(30), client.events(&reply.job_id).await.unwrap().collect()).await.unwrap();
    assert_eq!(statuses(&events), ["queued", "running", "completed"], "{events:#?}");
    let steps: Vec<f32> = events.iter().filter(|e| e.stage.as_deref() == Some("inference")).filter_map(|e| e.progress).collect();
    assert_eq!(steps.len(), 5, "one progress event per step: {events:#?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {steps:?}");
    let stages: Vec<&str> = events.iter().filter_map(|e| e.stage.as_deref()).collect();
    assert!(stages.contains(&"preparing") && stages.contains(&"encoding"), "{stages:?}");
    assert!(
        events.iter().any(|e| e.kind == EventKind::Message && e.message.as_deref().unwrap_or("").contains("image")),
        "the worker saw the uploaded file: {events:#?}"
    );
    assert_eq!(events.iter().filter(|e| e.kind == EventKind::Artifact).count(), 2);

    let result = client.result(&reply.job_id).await.unwrap();
    assert_eq!(result.status, JobState::Completed);
    let dir = tempfile::tempdir().unwrap();
    let mut names = vec![];
    for a in &result.artifacts {
        let dest = dir.path().join(&a.name);
        client.download(a, &dest).await.unwrap();
        let data = std::fs::read(&dest).unwrap();
        assert_eq!(data.len() as u64, a.size);
        names.push(a.name.clone());
        if a.name == "image.png" {
            assert_eq!(&data[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(a.content_type, "image/png");
        }
        if a.name == "meta.json" {
            let meta: serde_json::Value = serde_json::from_slice(&data).unwrap();
            assert_eq!(meta["seed"], 7);
            assert_eq!(meta["steps"], 5);
            assert_eq!(meta["prompt"], "a lighthouse at dawn");
        }
    }
    names.sort();
    assert_eq!(names, ["image.png", "meta.json"]);

    // Same prompt and seed, same image: the worker is deterministic and Kiln passes params as given.
    let again =
        client.submit(&demo_request("a lighthouse at dawn", serde_json::json!({"steps": 5, "step_ms": 1, "seed": 7}))).await.unwrap();
    let view = wait_terminal(&client, &again.job_id, Duration::from_secs(30)).await;
    let sha = |v: &[kiln_core::protocol::Artifact]| v.iter().find(|a| a.name == "image.png").unwrap().sha256.clone();
    assert_eq!(sha(&view.artifacts), sha(&result.artifacts));

    // The registry saw the model loaded on the slot.
    let models = client.models().await.unwrap();
    let demo = models.models.iter().find(|m| m.name == "demo").unwrap();
    assert_eq!(demo.warm_on, vec!["n1/cpu:0".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_replays_the_whole_history() {
    let mut cluster = TestCluster::new();
    let metrics_port = kiln_core::nats::server::free_port().unwrap();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000))
        .replace("metrics_addr = \"\"", &format!("metrics_addr = \"127.0.0.1:{metrics_port}\""));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let reply = client.submit(&demo_request("late", serde_json::json!({"steps": 4, "step_ms": 10}))).await.unwrap();
    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(30)).await;
    assert_eq!(view.status, JobState::Completed);

    // Subscribing only now, after the end, still yields everything, in order.
    let events = history(&client, &reply.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "completed"]);
    assert_eq!(events.iter().filter(|e| e.stage.as_deref() == Some("inference")).count(), 4);
    assert!(events.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms), "ordered by time");
    // A second late subscriber sees the identical history.
    assert_eq!(history(&client, &reply.job_id).await, events);

    // The node's Prometheus endpoint counted it.
    let metrics = http_get(metrics_port, "/metrics").await;
    assert!(metrics.contains(r#"kiln_jobs_submitted_total{model="demo"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"kiln_jobs_finished_total{model="demo",outcome="completed"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"kiln_gpu_state{slot="cpu:0",state="idle"} 1"#), "{metrics}");
    assert!(metrics.contains("kiln_run_seconds_bucket"), "{metrics}");

    // NATS service discovery finds the API.
    let ping = client.nats().request("$SRV.PING.kiln-api", "".into()).await.unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "kiln-api");
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_client_submits_follows_and_downloads() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let out = tempfile::tempdir().unwrap();
    let input = out.path().join("ref.png");
    std::fs::write(&input, b"reference image bytes").unwrap();
    let output = tokio::process::Command::new(python_with_nats())
        .arg(repo().join("examples/python/kiln_client.py"))
        .args([
            "--nats",
            &cluster.url(),
            "submit",
            "demo",
            "--input",
            "prompt=a cat from python",
            "--param",
            "steps=3",
            "--param",
            "step_ms=10",
        ])
        .arg("--file")
        .arg(format!("image={}", input.display()))
        .arg("--out")
        .arg(out.path().join("results"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "python client failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "completed");
    let files: Vec<String> = last["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    assert_eq!(files.len(), 2);
    for f in files {
        assert!(std::fs::metadata(&f).unwrap().len() > 0, "{f}");
    }
    assert!(stdout.contains("inference"), "progress was printed:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_gives_one_job() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let mut request = demo_request("once", serde_json::json!({"steps": 2, "step_ms": 10}));
    request.idempotency_key = Some("order-42".into());
    let first = client.submit(&request).await.unwrap();
    let second = client.submit(&request).await.unwrap();
    assert_eq!(first.job_id, second.job_id);
    assert!(!first.duplicate && second.duplicate);
    wait_terminal(&client, &first.job_id, Duration::from_secs(30)).await;
    // A third, after completion, still maps to the same (completed) job and runs nothing.
    let third = client.submit(&request).await.unwrap();
    assert_eq!((third.job_id.as_str(), third.status), (first.job_id.as_str(), JobState::Completed));
    let jobs = client.jobs(&Default::default()).await.unwrap().jobs;
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    let events = history(&client, &first.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "completed"]);
    // Another key is another job.
    let mut other = request.clone();
    other.model = "demo".into();
    other.idempotency_key = Some("order-43".into());
    assert_ne!(client.submit(&other).await.unwrap().job_id, first.job_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_queued_and_running_jobs() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    let running = client.submit(&demo_request("long", serde_json::json!({"steps": 200, "step_ms": 50}))).await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async { client.status(&running.job_id).await.unwrap().status == JobState::Running }).await
    );
    // One slot, busy: this one waits in the queue.
    let queued = client.submit(&demo_request("never", serde_json::json!({"steps": 2}))).await.unwrap();
    let view = client.cancel(&queued.job_id).await.unwrap();
    assert_eq!(view.status, JobState::Cancelled);

    let view = client.cancel(&running.job_id).await.unwrap();
    assert!(view.cancel_requested);
    let view = wait_terminal(&client, &running.job_id, Duration::from_secs(10)).await;
    assert_eq!(view.status, JobState::Cancelled);
    // `cancel_requested` is "asked for and not stopped yet" (PROTOCOL): an ended job has none
    // pending, whether it was cancelled running or queued, and a repeated cancel says the same
    // (issue 23 item 1: it stayed true).
    assert!(!view.cancel_requested, "{view:?}");
    assert!(!client.status(&queued.job_id).await.unwrap().cancel_requested);
    assert!(!client.cancel(&running.job_id).await.unwrap().cancel_requested);
    let events = history(&client, &running.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "cancelled"]);
    let steps = events.iter().filter(|e| e.stage.as_deref() == Some("inference")).count();
    assert!(steps < 200, "the worker stopped early ({steps} steps)");

    // The slot is free again and still serves; the cancelled queued job never ran.
    let after = client.submit(&demo_request("after", serde_json::json!({"steps": 2, "step_ms": 10}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &after.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
    let never = client.status(&queued.job_id).await.unwrap();
    assert_eq!((never.status, never.attempt), (JobState::Cancelled, 0));
    assert_eq!(statuses(&history(&client, &queued.job_id).await), ["queued", "cancelled"]);

    // Cancelling a finished job changes nothing.
    assert_eq!(client.cancel(&after.job_id).await.unwrap().status, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_sharing_one_slot_take_turns() {
    // Regression: an idle model's puller used to give its long-polled slot back and take it
    // again before the other model's puller could, starving the other model forever.
    let mut cluster = TestCluster::new();
    let models = format!("{}{}", demo_model("idle", &[], 3, 60_000), demo_model("busy", &[], 3, 60_000));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let mut ids = vec![];
    for i in 0..4 {
        let mut r = demo_request(&format!("turn {i}"), serde_json::json!({"steps": 1, "step_ms": 1}));
        r.model = "busy".into();
        ids.push(client.submit(&r).await.unwrap().job_id);
    }
    for id in &ids {
        assert_eq!(wait_terminal(&client, id, Duration::from_secs(20)).await.status, JobState::Completed);
    }

    // Both models with jobs waiting for the one slot: they take turns (a puller that just gave
    // the slot back queues behind the other's), so no model runs twice in a row. A blocker holds
    // the slot while both queues fill; each job then holds the slot 0.4 s, far longer than a
    // puller takes to queue again.
    let mut blocker = demo_request("blocker", serde_json::json!({"steps": 20, "step_ms": 100}));
    blocker.model = "busy".into();
    let blocker = client.submit(&blocker).await.unwrap().job_id;
    assert!(eventually(Duration::from_secs(20), || async { client.status(&blocker).await.unwrap().status == JobState::Running }).await);
    let mut waiting = vec![];
    for i in 0..3 {
        for model in ["idle", "busy"] {
            let mut r = demo_request(&format!("{model} {i}"), serde_json::json!({"steps": 2, "step_ms": 200}));
            r.model = model.into();
            waiting.push(client.submit(&r).await.unwrap().job_id);
        }
    }
    let mut started = vec![];
    for id in &waiting {
        let view = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!(view.status, JobState::Completed, "{id} on {}", view.model);
        started.push((view.started_ms.unwrap(), view.model));
    }
    assert!(
        wait_terminal(&client, &blocker, Duration::from_secs(30)).await.started_ms.unwrap() < started.iter().map(|s| s.0).min().unwrap()
    );
    started.sort();
    let order: Vec<&str> = started.iter().map(|(_, model)| model.as_str()).collect();
    assert!(order.windows(2).all(|pair| pair[0] != pair[1]), "the models did not take turns: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jobs_run_before_waiting_normal_ones() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let blocker = client.submit(&demo_request("blocker", serde_json::json!({"steps": 100, "step_ms": 50}))).await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async { client.status(&blocker.job_id).await.unwrap().status == JobState::Running }).await
    );
    let mut normal = vec![];
    for i in 0..3 {
        normal.push(
            client.submit(&demo_request(&format!("normal {i}"), serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap().job_id,
        );
    }
    let mut urgent = demo_request("urgent", serde_json::json!({"steps": 1, "step_ms": 1}));
    urgent.priority = 5;
    let urgent = client.submit(&urgent).await.unwrap().job_id;
    client.cancel(&blocker.job_id).await.unwrap();
    let urgent_started = wait_terminal(&client, &urgent, Duration::from_secs(30)).await.started_ms.unwrap();
    for id in &normal {
        let v = wait_terminal(&client, id, Duration::from_secs(30)).await;
        assert!(v.started_ms.unwrap() > urgent_started, "the urgent job ran first");
    }
}

/// A download whose object's chunks never come (lost with a server's disk, purged) ends with a
/// timeout error after the client's timeout without data, instead of hanging its caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_whose_chunks_never_come_times_out() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, NOOP_MODEL));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await.with_timeout(Duration::from_secs(1));
    let job = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap();
    let view = wait_terminal(&client, &job.job_id, Duration::from_secs(20)).await;
    let artifact = view.artifacts[0].clone();
    let store = client.jetstream().get_object_store(&artifact.bucket).await.unwrap();
    let nuid = store.info(&artifact.object).await.unwrap().nuid;
    let stream = client.jetstream().get_stream(format!("OBJ_{}", artifact.bucket)).await.unwrap();
    stream.purge().filter(format!("$O.{}.C.{nuid}", artifact.bucket)).await.unwrap();

    let dest = cluster.dir.path().join("lost.json");
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), client.download(&artifact, &dest)).await;
    let got = got.expect("the download ends on its own");
    assert!(matches!(got, Err(kiln::client::ClientError::Timeout(_))), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "after about the client's timeout: {:?}", started.elapsed());
}

/// A cold process slot shows `loading` while its worker starts, then `busy` with the job for
/// the rest of the run (issue 15: an outside client saw `loading` for the whole job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_process_slot_shows_loading_then_busy_with_its_job() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let job = client.submit(&demo_request("cold", serde_json::json!({"steps": 30, "step_ms": 100}))).await.unwrap().job_id;
    let mut seen: Vec<String> = vec![];
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let c = client.cluster().await.unwrap();
        let slot = c.gpus.iter().find(|g| g.node == "n1").expect("the slot").clone();
        let shown = format!("{} {}", slot.state.as_str(), slot.current_job.as_deref() == Some(job.as_str()));
        if seen.last() != Some(&shown) {
            seen.push(shown);
        }
        if client.status(&job).await.unwrap().status == JobState::Completed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.iter().any(|s| s == "busy true"), "the running job showed as busy at some point: {seen:?}");
    let last_running = seen.iter().rposition(|s| s.ends_with("true")).expect("the job showed");
    assert_eq!(seen[last_running], "busy true", "once loaded, the slot stays busy with the job: {seen:?}");
}

/// `restart_gpu` on a busy slot restarts it now, and the job it was running is retried, as
/// PROTOCOL says (issue 15: the job completed on attempt 1 and the slot restarted only after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gpu_on_a_busy_slot_retries_its_running_job() {
    use kiln_core::protocol::{ControlRequest, GpuState};
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    // Attempt 1 hangs after its first step (so the restart cannot come after its end however
    // loaded the machine is); attempt 2 runs through.
    let p = serde_json::json!({"steps": 3, "step_ms": 10, "hang_on_attempts": [1]});
    let job = client.submit(&prompt_request("demo", "long", p)).await.unwrap().job_id;
    // Once its steps run (history() would wait for the end: it reads to the terminal event).
    let mut events = Box::pin(client.events(&job).await.unwrap());
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = events.next().await {
            if e.kind == EventKind::Progress && e.stage.as_deref() == Some("inference") {
                return;
            }
        }
    });
    started.await.expect("the job never started its steps");
    let reply = client.control(&ControlRequest::RestartGpu { node: "n1".into(), slot: "cpu:0".into() }).await.unwrap();
    assert_eq!(reply.outcome, "restarting");
    // The slot goes down at once, not after the job.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let gpu = client.cluster().await.unwrap().gpus.into_iter().find(|g| g.slot == "cpu:0").unwrap();
        if gpu.restarts == 1 {
            assert_ne!(gpu.state, GpuState::Dead);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the busy slot did not restart at once: {gpu:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let view = wait_terminal(&client, &job, Duration::from_secs(60)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    assert_eq!(view.attempt, 2, "the running job was retried: {view:?}");
    let statuses = statuses(&history(&client, &job).await);
    assert!(statuses.contains(&"retrying".to_string()), "{statuses:?}");
}

/// Process models share a slot's memory budget the way TorchScript models do (issue 15): each
/// declares `memory_bytes`, the least recently used workers are stopped to make room, the
/// registry's warm list shows what is resident, and a model larger than the slot fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_workers_share_the_slot_memory_budget_least_recently_used_first() {
    let mut cluster = TestCluster::new();
    let model = |name: &str, bytes: u64| {
        format!(
            r#"
[[models]]
name = "{name}"
engine = {{ kind = "process", command = ["python3", "{worker}"], ready_timeout_ms = 20000, memory_bytes = {bytes} }}
max_attempts = 2
required_inputs = ["prompt"]
"#,
            worker = demo_worker()
        )
    };
    let models = [model("a", 1000), model("b", 1000), model("c", 1000), model("huge", 5000)].concat();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &models).replace("[node]\n", "[node]\nslot_memory_bytes = 2500\n");
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    let run = |model: &'static str| {
        let client = &client;
        async move {
            let job = client.submit(&prompt_request(model, "x", serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap().job_id;
            wait_terminal(client, &job, Duration::from_secs(60)).await
        }
    };
    // The registry follows a moment after the job's end.
    let warm_becomes = |expected: &'static [&'static str]| {
        let client = &client;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let warm = settled_gpu(client, "cpu:0").await.warm_models;
                if warm == expected || std::time::Instant::now() > deadline {
                    return warm;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(run("a").await.status, JobState::Completed);
    assert_eq!(run("b").await.status, JobState::Completed);
    assert_eq!(warm_becomes(&["a", "b"]).await, ["a", "b"], "both fit in 2500 bytes");
    assert_eq!(run("a").await.status, JobState::Completed); // b is now the least recently used
    assert_eq!(run("c").await.status, JobState::Completed);
    assert_eq!(warm_becomes(&["a", "c"]).await, ["a", "c"], "b's worker was stopped to make room for c");
    assert!(cluster.nodes[0].log().contains("stopping the least recently used worker"), "{}", cluster.nodes[0].log());

    let huge = run("huge").await;
    assert_eq!(huge.status, JobState::Failed, "{huge:?}");
    assert_eq!(huge.attempt, 1, "retrying cannot make it fit: {huge:?}");
    assert!(huge.error.as_ref().unwrap().message.contains("budget"), "{huge:?}");
    assert_eq!(warm_becomes(&["a", "c"]).await, ["a", "c"], "nothing was stopped for a model that cannot fit");
}
