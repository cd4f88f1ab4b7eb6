//! Every new attempt of a job is preceded in its history by a `retrying` event that says why
//! (issue 23 item 7): a node SIGKILLed mid-job, a worker SIGKILLed mid-job, a job past its
//! timeout. Real nats-server, real `kiln node` processes, the demo worker.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln_core::job::JobState;
use kiln_core::protocol::{Event, EventKind};
use kiln_core::retry_reason::RetryReason;

/// The `retrying` event of attempt `attempt`, checked to come after every event of the
/// attempt before it that precedes it, and right before the new attempt's `running`.
fn retrying_before(events: &[Event], attempt: u32) -> &Event {
    let kinds: Vec<String> = events.iter().map(|e| format!("{}:{:?}:{:?}", e.attempt, e.kind, e.status)).collect();
    let at = events
        .iter()
        .position(|e| e.kind == EventKind::Retrying && e.attempt == attempt)
        .unwrap_or_else(|| panic!("no retrying event for attempt {attempt}: {kinds:?}"));
    let running = events
        .iter()
        .position(|e| e.kind == EventKind::Status && e.status == Some(JobState::Running) && e.attempt == attempt)
        .unwrap_or_else(|| panic!("no running event of attempt {attempt}: {kinds:?}"));
    assert!(at < running, "the reason comes before the attempt's running: {kinds:?}");
    assert!(events[at + 1..running].iter().all(|e| e.attempt != attempt), "nothing of the new attempt between them: {kinds:?}");
    assert_eq!(events.iter().filter(|e| e.kind == EventKind::Retrying && e.attempt == attempt).count(), 1, "{kinds:?}");
    &events[at]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_job_leaves_a_node_lost_reason_before_the_next_attempt() {
    let mut cluster = TestCluster::new();
    // A 30 s ack wait: the survivor's loss detector hands the job back, as in production.
    let model = demo_model("demo", &[], 3, 60_000);
    let doomed = cluster.add_node("doomed", &config_toml(&cluster.url(), &["cpu:0"], 30_000, &model));
    cluster.wait_node_ready("doomed", 1).await;
    let client = cluster.client().await;
    let reply = client.submit(&prompt_request("demo", "victim", serde_json::json!({"steps": 20, "step_ms": 150}))).await.unwrap();
    // Attempt 1 runs on the only node; wait until it reported some progress.
    let mut events = client.events(&reply.job_id).await.unwrap().boxed();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.next()).await.expect("progress within 30 s").unwrap();
        if e.kind == EventKind::Progress && e.attempt == 1 && e.progress.is_some_and(|p| p >= 10.0) {
            break;
        }
    }
    drop(events);
    cluster.add_node("survivor", &config_toml(&cluster.url(), &["cpu:0"], 30_000, &model));
    cluster.wait_node_ready("survivor", 1).await;
    assert_eq!(client.status(&reply.job_id).await.unwrap().status, JobState::Running);
    cluster.nodes[doomed].signal(libc::SIGKILL);

    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(60)).await;
    assert_eq!((view.status, view.attempt), (JobState::Completed, 2), "{view:?}\n{}", cluster.nodes[1].log());
    let events = history(&client, &reply.job_id).await;
    let retrying = retrying_before(&events, 2);
    assert_eq!(retrying.reason, Some(RetryReason::NodeLost), "{retrying:?}");
    let message = retrying.message.as_deref().unwrap_or_default();
    assert!(message.contains("attempt 1") && message.contains("doomed"), "{message}");
    // Attempt 1's progress precedes the reason.
    let at = events.iter().position(|e| e.kind == EventKind::Retrying).unwrap();
    assert!(events[..at].iter().any(|e| e.kind == EventKind::Progress && e.attempt == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_leaves_a_worker_crashed_reason_before_the_next_attempt() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let reply = client.submit(&prompt_request("demo", "victim", serde_json::json!({"steps": 10, "step_ms": 100}))).await.unwrap();
    let mut events = client.events(&reply.job_id).await.unwrap().boxed();
    let pid = loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.next()).await.unwrap().unwrap();
        if let Some(pid) = e.message.as_deref().and_then(|m| m.strip_prefix("worker pid ")).and_then(|m| m.split_whitespace().next()) {
            break pid.parse::<i32>().unwrap();
        }
    };
    drop(events);
    unsafe { libc::kill(pid, libc::SIGKILL) };

    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(60)).await;
    assert_eq!((view.status, view.attempt), (JobState::Completed, 2), "{view:?}");
    let events = history(&client, &reply.job_id).await;
    let retrying = retrying_before(&events, 2);
    assert_eq!(retrying.reason, Some(RetryReason::WorkerCrashed), "{retrying:?}");
    assert!(retrying.error.as_ref().is_some_and(|e| e.message.contains("worker died")), "{retrying:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_leaves_a_timeout_reason_before_the_next_attempt() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 2, 1_500)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let reply = client.submit(&prompt_request("demo", "stuck", serde_json::json!({"steps": 3, "hang": true}))).await.unwrap();
    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(60)).await;
    assert_eq!((view.status, view.attempt), (JobState::Failed, 2));
    let events = history(&client, &reply.job_id).await;
    let retrying = retrying_before(&events, 2);
    assert_eq!(retrying.reason, Some(RetryReason::Timeout), "{retrying:?}");
    // The first attempt has no reason to give.
    assert!(!events.iter().any(|e| e.kind == EventKind::Retrying && e.attempt == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_under_its_name_gives_node_lost_for_its_job() {
    let mut cluster = TestCluster::new();
    // A short ack wait: whether the restarted node hands its old deliveries back at once or
    // they return after the ack wait, the reason is the same.
    let node = cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 3_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let reply = client.submit(&prompt_request("demo", "victim", serde_json::json!({"steps": 20, "step_ms": 100}))).await.unwrap();
    let mut events = client.events(&reply.job_id).await.unwrap().boxed();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.next()).await.expect("progress within 30 s").unwrap();
        if e.kind == EventKind::Progress && e.attempt == 1 && e.progress.is_some_and(|p| p > 0.0) {
            break;
        }
    }
    drop(events);
    cluster.nodes[node].signal(libc::SIGKILL);
    cluster.nodes[node].wait_exit(Duration::from_secs(5));
    cluster.nodes[node].start();
    cluster.wait_node_ready("n1", 1).await;

    let view = wait_terminal(&client, &reply.job_id, Duration::from_secs(60)).await;
    assert_eq!((view.status, view.attempt), (JobState::Completed, 2), "{view:?}");
    let events = history(&client, &reply.job_id).await;
    let retrying = retrying_before(&events, 2);
    assert_eq!(retrying.reason, Some(RetryReason::NodeLost), "{retrying:?}\n{}", cluster.nodes[node].log());
}
