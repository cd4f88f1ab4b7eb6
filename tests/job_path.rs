//! The job path with `node.slot_prefetch`: a slot claims its next job while its current one
//! runs, hands its lease back when the model is done, and loses, duplicates or reorders
//! nothing a client can see. Real nats-server and `kiln node` processes.

mod common;

use std::time::Duration;

use common::*;
use kiln_core::job::JobState;
use kiln_core::protocol::{GpuState, SubmitRequest};

/// A no-op that holds its slot `work_ms`, as a forward pass would.
fn hold_model(work_ms: u64) -> String {
    format!("[[models]]\nname = \"hold\"\nmax_attempts = 3\nengine = {{ kind = \"noop\", work_ms = {work_ms} }}\n")
}

fn hold() -> SubmitRequest {
    SubmitRequest { model: "hold".into(), ..Default::default() }
}

/// Config of a one-slot node that claims one job ahead.
fn prefetching_node(url: &str, work_ms: u64) -> String {
    // `config_toml` ends its [node] table before `extra`; a second [node] would not parse, so
    // the key goes in with the slot line.
    config_toml(url, &["cpu:0"], 10_000, &hold_model(work_ms)).replacen("metrics_addr = \"\"", "metrics_addr = \"\"\nslot_prefetch = 1", 1)
}

/// A one-slot node that claims one job ahead, running a 1.5 s job: the client and that job.
async fn one_slot_running_a_job(cluster: &mut TestCluster) -> (kiln::client::Client, String) {
    cluster.add_node("n1", &prefetching_node(&cluster.url(), 1_500));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let first = client.submit(&hold()).await.unwrap().job_id;
    assert!(eventually(Duration::from_secs(10), || async { client.status(&first).await.unwrap().status == JobState::Running }).await);
    (client, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_claims_its_next_job_while_the_current_one_runs() {
    let mut cluster = TestCluster::new();
    let (client, first) = one_slot_running_a_job(&mut cluster).await;
    let second = client.submit(&hold()).await.unwrap().job_id;
    let third = client.submit(&hold()).await.unwrap().job_id;
    // While the first holds the slot, the second is claimed ahead (running, waiting for the
    // slot); the third stays in the queue: one job ahead, not more.
    let claimed_ahead =
        eventually(Duration::from_secs(1), || async { client.status(&second).await.unwrap().status == JobState::Running }).await;
    assert!(claimed_ahead, "the next job is claimed while the slot works");
    assert_eq!(client.status(&first).await.unwrap().status, JobState::Running, "the first still holds the slot");
    assert_eq!(client.status(&third).await.unwrap().status, JobState::Queued, "only one job is claimed ahead");

    for id in [&first, &second, &third] {
        let view = wait_terminal(&client, id, Duration::from_secs(20)).await;
        assert_eq!((view.status, view.attempt), (JobState::Completed, 1), "{view:?}");
        assert_eq!(statuses(&history(&client, id).await), ["queued", "running", "completed"]);
    }
    // The slot ran them one at a time: each did its work after the one before had done its.
    let finished = |id: &String| {
        let client = client.clone();
        let id = id.clone();
        async move { client.status(&id).await.unwrap().finished_ms.unwrap() }
    };
    let (f1, f2, f3) = (finished(&first).await, finished(&second).await, finished(&third).await);
    assert!(f2 >= f1 + 1_000 && f3 >= f2 + 1_000, "one job on the slot at a time: finished at {f1}, {f2}, {f3}");
    let gpu = settled_gpu(&client, "cpu:0").await;
    assert_eq!((gpu.state, gpu.current_job.as_deref()), (GpuState::Idle, None), "every lease came back: {gpu:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_claimed_ahead_never_runs() {
    let mut cluster = TestCluster::new();
    let (client, first) = one_slot_running_a_job(&mut cluster).await;
    let ahead = client.submit(&hold()).await.unwrap().job_id;
    assert!(eventually(Duration::from_secs(1), || async { client.status(&ahead).await.unwrap().status == JobState::Running }).await);
    client.cancel(&ahead).await.unwrap();

    let view = wait_terminal(&client, &ahead, Duration::from_secs(10)).await;
    assert_eq!(view.status, JobState::Cancelled, "{view:?}");
    assert!(view.artifacts.is_empty(), "it never ran: {view:?}");
    assert_eq!(statuses(&history(&client, &ahead).await), ["queued", "running", "cancelled"]);
    assert_eq!(wait_terminal(&client, &first, Duration::from_secs(10)).await.status, JobState::Completed);

    // The slot still serves.
    let after = client.submit(&hold()).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &after, Duration::from_secs(10)).await.status, JobState::Completed);
}
