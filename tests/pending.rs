//! Why a job waits (issue 26 item 3, `kiln_core::pending`): a queued job's status says why, its
//! position in its queue and an estimated start, in each situation made for real here: its
//! model loading, its slots busy, other users' shares, a retry's backoff, its node lost, no
//! live slot left. Node `a` serves the demo model on one slot (its worker takes 3 s to load);
//! node `b` serves another model only and answers API requests beside it.

mod common;

use std::time::Duration;

use common::*;
use kiln::client::Client;
use kiln_core::job::JobState;
use kiln_core::protocol::{InputValue, Pending, PendingReason, SubmitRequest};

fn demo_job(user: &str, params: serde_json::Value) -> SubmitRequest {
    SubmitRequest {
        model: "demo".into(),
        inputs: [("prompt".to_string(), InputValue::Inline(serde_json::json!("a cat")))].into(),
        params: params.as_object().cloned().unwrap(),
        labels: [("user_id".to_string(), user.to_string())].into(),
        ..Default::default()
    }
}

async fn submit(client: &Client, user: &str, params: serde_json::Value) -> String {
    client.submit(&demo_job(user, params)).await.expect("accepted").job_id
}

/// The job's pending as soon as it gives `reason` (within 20 s), else the last one seen.
async fn wait_reason(client: &Client, job_id: &str, reason: PendingReason) -> Pending {
    let mut last = None;
    for _ in 0..200 {
        let view = client.status(job_id).await.unwrap();
        if view.pending.as_ref().is_some_and(|p| p.reason == reason) {
            return view.pending.unwrap();
        }
        last = Some(view);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {job_id} never waited for {reason:?}: last {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_job_says_why_where_it_stands_and_when_it_may_start() {
    let mut cluster = TestCluster::new();
    let retry = "[retry]\nbackoff_initial_ms = 6000\nbackoff_max_ms = 6000\n";
    let a = config_toml(&cluster.url(), &["cpu:0"], 30_000, &demo_model("demo", &[], 3, 60_000))
        .replace("[retry]\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n", retry);
    cluster.add_node_with_env("a", &a, &[("KILN_DEMO_LOAD_MS", "3000")]);
    cluster.add_node("b", &config_toml(&cluster.url(), &["cpu:0"], 30_000, NOOP_MODEL));
    cluster.wait_node_ready("a", 1).await;
    cluster.wait_node_ready("b", 1).await;
    let client = cluster.client().await.with_timeout(Duration::from_secs(10));

    // The first job makes the slot load the model (3 s): the next one waits for that.
    let first = submit(&client, "u1", serde_json::json!({"steps": 40, "step_ms": 100})).await;
    let second = submit(&client, "u1", serde_json::json!({"steps": 1, "step_ms": 0})).await;
    let loading = wait_reason(&client, &second, PendingReason::ModelLoading).await;
    eprintln!("model loading: {loading:?}");

    // Loaded, the first runs for 4 s: the second waits for the busy slot, first in its queue.
    let busy = wait_reason(&client, &second, PendingReason::SlotsBusy).await;
    assert_eq!(busy.position, Some(0), "{busy:?}");
    let third = submit(&client, "u1", serde_json::json!({"steps": 1, "step_ms": 0})).await;
    let behind = wait_reason(&client, &third, PendingReason::SlotsBusy).await;
    assert_eq!(behind.position, Some(1), "{behind:?}");
    assert_eq!(behind.ahead, Some(1), "{behind:?}");
    eprintln!("slots busy: {busy:?}; the one behind it: {behind:?}");

    // Another user's job: u1's next job now waits for its share too, and u2's goes before it.
    let theirs = submit(&client, "u2", serde_json::json!({"steps": 1, "step_ms": 0})).await;
    let shared = wait_reason(&client, &third, PendingReason::FairShare).await;
    assert_eq!((shared.position, shared.ahead), (Some(1), Some(2)), "{shared:?}");
    let other = wait_reason(&client, &theirs, PendingReason::FairShare).await;
    assert_eq!((other.position, other.ahead), (Some(0), Some(1)), "{other:?}");
    assert!(other.eta_ms.is_none() || shared.eta_ms.is_none() || other.eta_ms < shared.eta_ms, "{other:?} against {shared:?}");
    for id in [&first, &second, &third, &theirs] {
        assert_eq!(wait_terminal(&client, id, Duration::from_secs(60)).await.status, JobState::Completed);
    }
    // Jobs have run: an estimate of the start comes with the position from now on.

    // A retryable failure waits out its backoff (6 s here) before its next attempt.
    let failing = submit(&client, "u1", serde_json::json!({"steps": 1, "step_ms": 0, "fail": "retryable"})).await;
    let backoff = wait_reason(&client, &failing, PendingReason::RetryBackoff).await;
    eprintln!("retry backoff: {backoff:?}");

    // A long job runs on `a`, another waits behind it; `a` dies. The running one's node is
    // lost; the queued one has no live slot left.
    let long = submit(&client, "u1", serde_json::json!({"steps": 100, "step_ms": 100})).await;
    assert!(
        eventually(Duration::from_secs(30), || async { client.status(&long).await.is_ok_and(|v| v.status == JobState::Running) }).await,
        "the long job did not start"
    );
    let queued = submit(&client, "u1", serde_json::json!({"steps": 1, "step_ms": 0})).await;
    let waiting = wait_reason(&client, &queued, PendingReason::SlotsBusy).await;
    assert!(waiting.eta_ms.is_some(), "a recent run time gives an estimate: {waiting:?}");
    cluster.nodes[0].kill();
    let lost = wait_reason(&client, &long, PendingReason::NodeLost).await;
    assert!(lost.message.contains('a'), "{lost:?}");
    let none = wait_reason(&client, &queued, PendingReason::NoSlot).await;
    eprintln!("node lost: {lost:?}; no slot: {none:?}");
}
