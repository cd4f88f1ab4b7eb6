//! A cluster whose nodes serve different models (issue 23 item 3): the API is one NATS queue
//! group, so any node answers any request; its answer about models must be the cluster's (the
//! models that live nodes publish in the registry), not the answering node's own config.

mod common;

use std::time::Duration;

use common::*;
use kiln_core::job::JobState;
use kiln_core::protocol::SubmitRequest;

/// A model only node `b` has, with declared params and a required input: validating a submit
/// of it needs its definition even on node `a`.
const ONLY_ON_B: &str = r#"
[[models]]
name = "only-b"
engine = { kind = "noop" }
max_attempts = 2
required_inputs = ["prompt"]
params = [{ name = "steps", kind = "int", min = 1, max = 10, default = 3 }]
"#;

fn only_b(steps: serde_json::Value) -> SubmitRequest {
    SubmitRequest {
        model: "only-b".into(),
        inputs: [("prompt".to_string(), kiln_core::protocol::InputValue::Inline(serde_json::json!("x")))].into(),
        params: params(serde_json::json!({ "steps": steps })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_models_answer_as_one_cluster() {
    let mut cluster = TestCluster::new();
    cluster.add_node("a", &config_toml(&cluster.url(), &["cpu:0"], 30_000, NOOP_MODEL));
    cluster.add_node("b", &config_toml(&cluster.url(), &["cpu:0"], 30_000, &format!("{NOOP_MODEL}{ONLY_ON_B}")));
    cluster.wait_node_ready("a", 1).await;
    cluster.wait_node_ready("b", 1).await;
    let client = cluster.client().await;
    // Both nodes' entries are in both nodes' registry caches.
    assert!(eventually(Duration::from_secs(20), || async { client.cluster().await.is_ok_and(|c| c.nodes.len() == 2) }).await);

    // The queue group spreads requests over both nodes: 20 submits reach each of them.
    let mut job_ids = vec![];
    for i in 0..20 {
        match client.submit(&only_b(serde_json::json!(1 + i % 5))).await {
            Ok(reply) => job_ids.push(reply.job_id),
            Err(e) => panic!("submit {i} of a model only node b serves was refused: {e}"),
        }
    }
    for job_id in &job_ids {
        let view = wait_terminal(&client, job_id, Duration::from_secs(60)).await;
        assert_eq!(view.status, JobState::Completed, "{view:?}");
        assert_eq!(view.node.as_deref(), Some("b"));
    }
    // Node a validates with b's definition: the declared range and the required input hold
    // whoever answers.
    for _ in 0..10 {
        let err = client.submit(&only_b(serde_json::json!(11))).await.unwrap_err().to_string();
        assert!(err.contains("steps"), "{err}");
        let mut missing = only_b(serde_json::json!(2));
        missing.inputs.clear();
        let err = client.submit(&missing).await.unwrap_err().to_string();
        assert!(err.contains("prompt"), "{err}");
    }
    // A model nobody serves is unknown everywhere, and the message lists the cluster's models.
    for _ in 0..10 {
        let err = client.submit(&SubmitRequest { model: "nowhere".into(), ..only_b(serde_json::json!(1)) }).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown_model") && text.contains("only-b") && text.contains("noop"), "{text}");
    }

    // `models` is the same list whichever node answers, and says which nodes serve each model.
    let first = serde_json::to_value(client.models().await.unwrap()).unwrap();
    for _ in 0..20 {
        let again = serde_json::to_value(client.models().await.unwrap()).unwrap();
        assert_eq!(first, again, "models differ between answers");
    }
    let models = client.models().await.unwrap().models;
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["noop", "only-b"]);
    let nodes = |name: &str| models.iter().find(|m| m.name == name).unwrap().nodes.clone();
    assert_eq!(nodes("noop"), ["a", "b"]);
    assert_eq!(nodes("only-b"), ["b"]);
    let only = models.iter().find(|m| m.name == "only-b").unwrap();
    assert_eq!((only.max_attempts, only.required_inputs.clone(), only.params.len()), (2, vec!["prompt".to_string()], 1));
    assert!(models.iter().all(|m| !m.conflict), "{models:?}");
}

/// Two nodes declaring one model name differently: the cluster uses the definition of the node
/// that has served it longest, whoever answers, and flags the conflict in `models`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_declared_differently_uses_the_oldest_nodes_definition_and_is_flagged() {
    let mut cluster = TestCluster::new();
    cluster.add_node("old", &config_toml(&cluster.url(), &["cpu:0"], 30_000, ONLY_ON_B));
    cluster.wait_node_ready("old", 1).await;
    let other = ONLY_ON_B.replace("max = 10", "max = 50");
    cluster.add_node("new", &config_toml(&cluster.url(), &["cpu:0"], 30_000, &other));
    cluster.wait_node_ready("new", 1).await;
    let client = cluster.client().await;
    assert!(eventually(Duration::from_secs(20), || async { client.cluster().await.is_ok_and(|c| c.nodes.len() == 2) }).await);
    for _ in 0..10 {
        let err = client.submit(&only_b(serde_json::json!(20))).await.unwrap_err().to_string();
        assert!(err.contains("steps"), "the oldest node's range (max 10) holds: {err}");
        let models = client.models().await.unwrap().models;
        assert_eq!(models.len(), 1);
        assert!(models[0].conflict, "{models:?}");
        assert_eq!(models[0].nodes, ["new", "old"]);
    }
}
