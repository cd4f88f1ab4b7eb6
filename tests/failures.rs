//! Crashes and losses against real processes: a worker SIGKILLed mid-job, a worker that
//! crashes on every attempt, a job past its timeout, a node SIGKILLed and restarted.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use kiln_core::job::JobState;
use kiln_core::protocol::{EventKind, GpuState, ListJobsRequest, SubmitRequest};

fn request(model: &str, prompt: &str, p: serde_json::Value) -> SubmitRequest {
    prompt_request(model, prompt, p)
}

fn completed_events(events: &[kiln_core::protocol::Event]) -> usize {
    events.iter().filter(|e| e.kind == EventKind::Status && e.status == Some(JobState::Completed)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_is_restarted_and_the_job_completes_once() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let reply = client.submit(&request("demo", "victim", serde_json::json!({"steps": 10, "step_ms": 100}))).await.unwrap();

    // The worker announces its pid when it starts the job; kill it as soon as we see it.
    let mut events = client.events(&reply.job_id).await.unwrap().boxed();
    let pid = loop {
        let e = tokio::time::timeout(Duration::from_secs(20), events.next()).await.unwrap().unwrap();
        if let Some(pid) = e.message.as_deref().and_then(|m| m.strip_prefix("worker pid ")).and_then(|m| m.split_whitespace().next()) {
            break pid.parse::<i32>().unwrap();
        }
    };
    drop(events);
    unsafe { libc::kill(pid, libc::SIGKILL) };

    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(30)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    assert_eq!(view.attempt, 2, "the killed attempt, then the retry");
    let events = history(&client, &reply.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "retrying", "running", "completed"]);
    assert_eq!(completed_events(&events), 1, "completed exactly once");
    let retry = events.iter().find(|e| e.status == Some(JobState::Retrying)).unwrap();
    assert!(retry.message.as_deref().unwrap().contains("worker died"), "{retry:?}");

    let gpu = settled_gpu(&client, "cpu:0").await;
    assert_eq!(gpu.restarts, 1, "the registry shows the restart: {gpu:?}");
    assert_eq!(gpu.state, GpuState::Idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_fails_the_job_and_quarantines_only_that_gpu() {
    let mut cluster = TestCluster::new();
    // `crashy` runs only on cpu:0; `demo` on both. Two restarts allowed in the window.
    let models = format!("{}{}", demo_model("crashy", &["cpu:0"], 3, 60_000), demo_model("demo", &[], 3, 60_000));
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &models).replace("max_restarts = 5", "max_restarts = 2");
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 2).await;
    let client = cluster.client().await;

    let reply = client.submit(&request("crashy", "boom", serde_json::json!({"steps": 3, "step_ms": 10, "crash": "always"}))).await.unwrap();
    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(60)).await;
    assert_eq!(view.status, JobState::Failed);
    assert_eq!(view.attempt, 3);
    assert!(view.dead_letter);
    let error = view.error.unwrap();
    assert_eq!(error.code.as_str(), "engine_failed");
    assert!(error.message.contains("worker died") && error.message.contains("exit"), "the last error says why: {}", error.message);
    assert_eq!(
        statuses(&history(&client, &reply.job_id).await),
        ["queued", "running", "retrying", "running", "retrying", "running", "failed"]
    );

    // Three crashes: two restarts, then the budget is spent and cpu:0 is dead.
    let ok = eventually(Duration::from_secs(10), || async {
        let gpus = client.cluster().await.unwrap().gpus;
        gpus.iter().any(|g| g.slot == "cpu:0" && g.state == GpuState::Dead && g.restarts == 2)
    })
    .await;
    assert!(ok, "{:#?}", client.cluster().await.unwrap().gpus);
    let dead = client.jobs(&ListJobsRequest { dead_letter: true, ..Default::default() }).await.unwrap().jobs;
    assert_eq!(dead.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [reply.job_id.as_str()]);

    // The other GPU keeps serving.
    for i in 0..3 {
        let r = client.submit(&request("demo", &format!("fine {i}"), serde_json::json!({"steps": 2, "step_ms": 10}))).await.unwrap();
        let v = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
        assert_eq!((v.status, v.slot.as_deref()), (JobState::Completed, Some("cpu:1")));
    }
    let cpu0 = client.cluster().await.unwrap().gpus.into_iter().find(|g| g.slot == "cpu:0").unwrap();
    assert_eq!(cpu0.state, GpuState::Dead, "a quarantined slot stays dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_is_stopped_retried_then_failed() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 2, 1_500)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let started = Instant::now();
    let reply = client.submit(&request("demo", "stuck", serde_json::json!({"steps": 3, "hang": true}))).await.unwrap();
    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(30)).await;
    assert_eq!((view.status, view.attempt), (JobState::Failed, 2));
    assert!(view.error.unwrap().message.contains("timed out after 1500 ms"));
    assert!(started.elapsed() >= Duration::from_millis(3_000), "two attempts of 1.5 s each");
    // The hung worker was killed with its actor; the slot serves again.
    let r = client.submit(&request("demo", "next", serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_loses_no_job() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 3_000, &demo_model("demo", &[], 5, 60_000));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 2).await;
    let client = cluster.client().await;
    let mut ids = vec![];
    for i in 0..10 {
        ids.push(
            client.submit(&request("demo", &format!("job {i}"), serde_json::json!({"steps": 5, "step_ms": 100}))).await.unwrap().job_id,
        );
    }
    // Kill the node while it runs jobs.
    assert!(
        eventually(Duration::from_secs(20), || async {
            client.cluster().await.map(|c| c.gpus.iter().any(|g| g.current_job.is_some())).unwrap_or(false)
        })
        .await
    );
    cluster.nodes[0].signal(libc::SIGKILL);
    cluster.nodes[0].wait_exit(Duration::from_secs(5));

    // With the only node gone, nobody answers the API; the jobs wait in the queue.
    let raw = client.cluster().await;
    assert!(raw.is_err(), "with the only node gone, nobody answers the API: {raw:?}");
    // Restarted at once under the same name: it sees its old, silent registry entry and,
    // since that entry's heartbeat does not move, takes the name back.
    cluster.nodes[0].start();
    cluster.wait_node_ready("n1", 2).await;

    let mut attempts = HashMap::new();
    for id in &ids {
        let v = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!(v.status, JobState::Completed, "{v:?}");
        assert_eq!(completed_events(&history(&client, id).await), 1, "job {id} completed once");
        *attempts.entry(v.attempt).or_insert(0) += 1;
    }
    assert!(attempts.keys().any(|&a| a >= 2), "some job was retried after the kill: {attempts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_nodes_name_is_refused() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, NOOP_MODEL);
    cluster.add_node("twin", &config);
    cluster.wait_node_ready("twin", 1).await;
    let second = cluster.add_node("twin", &config);
    let code = cluster.nodes[second].wait_exit(Duration::from_secs(10));
    // 6: "any other error (... a node that fails to start)", src/cli/exit.rs; 1 is kept for a
    // job that ran and did not complete.
    assert_eq!(code, Some(6), "the second process exits with a node's start failure");
    assert!(cluster.nodes[second].log().contains("already alive"), "{}", cluster.nodes[second].log());
    // The first one is untouched.
    let client = cluster.client().await;
    let r = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(10)).await.status, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_running_job_then_leaves_the_registry() {
    let mut cluster = TestCluster::new();
    let leaving = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    // A second node that knows the model but has no slot for it, to answer the API throughout.
    let staying = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &["cpu:9"], 3, 60_000));
    cluster.add_node("leaving", &leaving);
    cluster.add_node("staying", &staying);
    cluster.wait_node_ready("leaving", 1).await;
    cluster.wait_node_ready("staying", 1).await;
    let client = cluster.client().await;
    let job = client.submit(&request("demo", "finish me", serde_json::json!({"steps": 15, "step_ms": 100}))).await.unwrap();
    assert!(eventually(Duration::from_secs(20), || async { client.status(&job.job_id).await.unwrap().status == JobState::Running }).await);

    cluster.nodes[0].signal(libc::SIGTERM);
    let draining = eventually(Duration::from_secs(5), || async {
        client.cluster().await.unwrap().gpus.iter().any(|g| g.node == "leaving" && g.state == GpuState::Draining)
    })
    .await;
    assert!(draining, "the registry shows the slot draining");
    // A job submitted now waits in the queue: the draining node takes no new work.
    let later = client.submit(&request("demo", "later", serde_json::json!({"steps": 1}))).await.unwrap();

    assert_eq!(cluster.nodes[0].wait_exit(Duration::from_secs(20)), Some(0), "clean exit:\n{}", cluster.nodes[0].log());
    let view = client.status(&job.job_id).await.unwrap();
    assert_eq!((view.status, view.attempt), (JobState::Completed, 1), "finished where it ran, not retried");
    let c = client.cluster().await.unwrap();
    assert!(
        c.nodes.iter().all(|n| n.node != "leaving") && c.gpus.iter().all(|g| g.node != "leaving"),
        "entries removed at once, not left to expire: {c:#?}"
    );
    assert_eq!(client.status(&later.job_id).await.unwrap().status, JobState::Queued, "nothing ran the late job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_inference_actor_restarts_it_and_the_job_is_retried() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "panic_before_run@1")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let r = client.submit(&request("demo", "panics once", serde_json::json!({"steps": 2, "step_ms": 10}))).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    assert_eq!((view.status, view.attempt), (JobState::Completed, 2));
    let events = history(&client, &r.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "retrying", "running", "completed"]);
    let gpu = settled_gpu(&client, "cpu:0").await;
    assert_eq!((gpu.restarts, gpu.state), (1, GpuState::Idle), "{gpu:?}");
    assert!(gpu.last_error.unwrap_or_default().contains("fault injected"), "the registry says why it restarted");
}

/// The outcome's write is stored but its answer lost (the node's second record write, after
/// the claim, hears a timeout: as a write does while a stream elects its leader). The write's
/// re-read, from the leader, finds the record it sent: the job stays completed with artifacts
/// that download, and its history ends once. (An attempt that took its own stored outcome for a
/// takeover deleted the artifacts the completed record names: `tests/nats_cluster.rs`'s
/// partition test, where the re-read was answered by a replica that lagged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_stored_whose_answer_was_lost_keeps_the_completed_jobs_artifacts() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "lose_record_write_answer@2")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let r = client.submit(&request("demo", "answer lost", serde_json::json!({"steps": 2, "step_ms": 10}))).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    let log = cluster.nodes[0].log();
    assert!(log.contains("fault injected: lose_record_write_answer"), "{}", cluster.nodes[0].log_tail(30));
    assert!(
        log.lines().any(|l| l.contains("kiln.terminal_write") && l.contains("compare-and-set failed (nats trouble); retrying")),
        "the lost answer was the outcome's write: {}",
        cluster.nodes[0].log_tail(30)
    );
    assert_eq!((view.status, view.attempt), (JobState::Completed, 1), "{view:?}");
    assert!(!view.artifacts.is_empty(), "{view:?}");
    let dir = tempfile::tempdir().unwrap();
    for artifact in &view.artifacts {
        let dest = dir.path().join(&artifact.name);
        client.download(artifact, &dest).await.unwrap_or_else(|e| panic!("{} does not download: {e}", artifact.object));
        assert_eq!(kiln_core::keys::sha256_hex(&std::fs::read(&dest).unwrap()), artifact.sha256, "{}", artifact.name);
    }
    let events = history(&client, &r.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "completed"], "one ending");
    assert!(!cluster.nodes[0].log().contains("fenced"), "{}", cluster.nodes[0].log_tail(30));
}

/// The claim's write is stored but its answer lost (the node's first record write hears a
/// timeout): the claim rides it out, finds the record it sent, and runs the job as attempt 1.
/// (Given up at once, the job was left for redelivery, whose claim took the landed one for a
/// lost attempt: a job of one attempt failed, "all 1 attempts failed", without having run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_stored_whose_answer_was_lost_runs_the_job_as_that_attempt() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 5_000, &demo_model("demo", &[], 1, 60_000));
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "lose_record_write_answer@1")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let r = client.submit(&request("demo", "claim answer lost", serde_json::json!({"steps": 2, "step_ms": 10}))).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    let log = cluster.nodes[0].log();
    assert!(log.contains("fault injected: lose_record_write_answer"), "{}", cluster.nodes[0].log_tail(30));
    assert_eq!((view.status, view.attempt), (JobState::Completed, 1), "{view:?}\n{}", cluster.nodes[0].log_tail(30));
    let events = history(&client, &r.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "completed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_terminal_write_and_the_ack_runs_nothing_twice() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 2_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "abort_after_terminal_write@1")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let r = client.submit(&request("demo", "crash before ack", serde_json::json!({"steps": 2, "step_ms": 10}))).await.unwrap();
    assert!(cluster.nodes[0].wait_exit(Duration::from_secs(30)).is_some(), "the node aborted at the fault point");
    assert!(cluster.nodes[0].log().contains("fault injected: abort_after_terminal_write"));

    cluster.nodes[0].env.clear();
    cluster.nodes[0].start();
    cluster.wait_node_ready("n1", 1).await;
    let view = client.status(&r.job_id).await.unwrap();
    assert_eq!((view.status, view.attempt), (JobState::Completed, 1), "the outcome was already durable");

    // The unacked message comes back after the ack wait; the node finds the record terminal,
    // completes the history and acks, without running the job again.
    let js = async_nats::jetstream::new(client.nats().clone());
    let drained = eventually(Duration::from_secs(15), || async {
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            js.get_stream("KILN_JOBS").await.unwrap().get_consumer("demo-normal").await.unwrap();
        let info = c.info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0
    })
    .await;
    assert!(drained, "the redelivered message was acked");
    let events = history(&client, &r.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "completed"], "one ending, published by the redelivery");
    assert_eq!(client.status(&r.job_id).await.unwrap().attempt, 1, "not run again");
}
