//! Several real `kiln node` processes on one nats-server: losing a node loses no job, and its
//! jobs come back at once (not after the ack wait).

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_core::job::JobState;
use kiln_core::protocol::{EventKind, GpuState, InputValue, SubmitRequest};

fn request(prompt: &str, p: serde_json::Value) -> SubmitRequest {
    SubmitRequest {
        model: "demo".into(),
        inputs: [("prompt".to_string(), InputValue::Inline(prompt.into()))].into(),
        params: params(p),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_job_resumes_on_another_node_at_once_and_completes_once() {
    let mut cluster = TestCluster::new();
    // An ack wait of 30 s: only the hand-back can bring the job back within seconds.
    let one_slot = config_toml(&cluster.url(), &["cpu:0"], 30_000, &demo_model("demo", &[], 3, 60_000));
    let two_slots = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("doomed", &one_slot);
    cluster.wait_node_ready("doomed", 1).await;
    let client = cluster.client().await;
    let victim = client.submit(&request("victim", serde_json::json!({"steps": 40, "step_ms": 100}))).await.unwrap().job_id;
    assert!(eventually(Duration::from_secs(20), || async { client.status(&victim).await.unwrap().status == JobState::Running }).await);
    cluster.add_node("survivor", &two_slots);
    cluster.wait_node_ready("survivor", 2).await;
    assert_eq!(client.status(&victim).await.unwrap().node.as_deref(), Some("doomed"));
    // Let the doomed node's entry carry the job (it is written within 100 ms of the start).
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.nodes[0].signal(libc::SIGKILL);
    let killed = Instant::now();
    // A request the server routed to the dying node in its last milliseconds is lost: poll
    // with a short timeout and treat a lost request as "not yet", as a client would retry.
    let polling = client.clone().with_timeout(Duration::from_millis(500));
    let resumed = eventually(Duration::from_secs(15), || async {
        polling.status(&victim).await.is_ok_and(|v| v.attempt == 2 && v.node.as_deref() == Some("survivor"))
    })
    .await;
    let kill_to_resumed = killed.elapsed();
    assert!(resumed, "the job came back before the 30 s ack wait:\n{}", cluster.nodes[1].log());
    println!("kill to resumed on another node: {} ms (loss_after_ms 1000, ack_wait 30000)", kill_to_resumed.as_millis());
    assert!(kill_to_resumed < Duration::from_secs(5), "took {kill_to_resumed:?}");

    let view = wait_terminal(&client, &victim, Duration::from_secs(30)).await;
    assert_eq!((view.status, view.attempt), (JobState::Completed, 2));
    let events = history(&client, &victim).await;
    let completed = events.iter().filter(|e| e.kind == EventKind::Status && e.status == Some(JobState::Completed)).count();
    assert_eq!(completed, 1, "completed exactly once");

    // The lost node's GPU shows dead until its entry expires; the lost node is gone.
    let c = client.cluster().await.unwrap();
    assert!(c.nodes.iter().all(|n| n.node != "doomed"), "{c:#?}");
    assert!(c.gpus.iter().filter(|g| g.node == "doomed").all(|g| g.state == GpuState::Dead), "{c:#?}");
    assert!(cluster.nodes[1].log().contains("node lost; handing its jobs back"));
}
