//! Bad input gets a clear, coded error and loses nothing: each case against a real node, which
//! keeps serving throughout.

mod common;

use std::time::Duration;

use common::*;
use kiln::client::ClientError;
use kiln_core::job::JobState;
use kiln_core::protocol::{ErrorCode, ErrorReply, SubmitRequest};

async fn expect_code(client: &kiln::client::Client, endpoint: &str, body: Vec<u8>, code: ErrorCode) -> String {
    let raw = client.request_raw(endpoint, body).await.unwrap();
    let reply: ErrorReply =
        serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{endpoint}: not an error reply ({e}): {}", String::from_utf8_lossy(&raw)));
    assert_eq!(reply.error.code, code, "{endpoint}: {}", reply.error.message);
    assert!(
        !reply.error.message.contains("Error {") && !reply.error.message.is_empty(),
        "a human message, not a debug string: {}",
        reply.error.message
    );
    reply.error.message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_coded_error_and_the_node_keeps_serving() {
    let mut cluster = TestCluster::new();
    let models = format!("{}{}", demo_model("demo", &[], 3, 60_000), NOOP_MODEL);
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    let msg = expect_code(&client, "submit", b"{not json".to_vec(), ErrorCode::BadRequest).await;
    assert!(msg.contains("malformed"), "{msg}");
    expect_code(&client, "submit", b"".to_vec(), ErrorCode::BadRequest).await;
    expect_code(&client, "submit", br#"{"model": "demo", "surprise": 1}"#.to_vec(), ErrorCode::BadRequest).await;
    let msg = expect_code(&client, "submit", br#"{"model": "sdxl"}"#.to_vec(), ErrorCode::UnknownModel).await;
    assert!(msg.contains("demo") && msg.contains("noop"), "it lists the known models: {msg}");
    let msg = expect_code(&client, "submit", br#"{"model": "demo", "inputs": {}}"#.to_vec(), ErrorCode::BadRequest).await;
    assert!(msg.contains("prompt"), "names the missing input: {msg}");
    let msg = expect_code(
        &client,
        "submit",
        br#"{"model": "demo", "inputs": {"prompt": "x", "image": {"object": "uploads/nope.png"}}}"#.to_vec(),
        ErrorCode::NotFound,
    )
    .await;
    assert!(msg.contains("uploads/nope.png"), "{msg}");
    expect_code(
        &client,
        "submit",
        br#"{"model": "demo", "inputs": {"prompt": "x", "image": {"object": "../../etc/passwd"}}}"#.to_vec(),
        ErrorCode::BadRequest,
    )
    .await;
    expect_code(&client, "submit", br#"{"model": "demo", "inputs": {"prompt": "x", "bad name": 1}}"#.to_vec(), ErrorCode::BadRequest).await;

    let big = serde_json::to_vec(&serde_json::json!({"model": "demo", "inputs": {"prompt": "x".repeat(300 * 1024)}})).unwrap();
    expect_code(&client, "submit", big, ErrorCode::PayloadTooLarge).await;
    let deep = format!(r#"{{"model": "noop", "params": {{"p": {}1{}}}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    expect_code(&client, "submit", deep.into_bytes(), ErrorCode::BadRequest).await;
    let nested = format!(r#"{{"model": "noop", "params": {{"p": {}1{}}}}}"#, "[".repeat(40), "]".repeat(40));
    let msg = expect_code(&client, "submit", nested.into_bytes(), ErrorCode::BadRequest).await;
    assert!(msg.contains("deeper"), "{msg}");
    expect_code(&client, "submit", br#"{"model": "noop", "deadline_ms": 1}"#.to_vec(), ErrorCode::DeadlineExceeded).await;
    expect_code(&client, "submit", br#"{"model": "noop", "max_attempts": 0}"#.to_vec(), ErrorCode::BadRequest).await;

    for id in ["a.*", ">", "kiln.jobs.>", "a b", "../x", ""] {
        let body = serde_json::to_vec(&serde_json::json!({ "job_id": id })).unwrap();
        for endpoint in ["status", "cancel", "result"] {
            expect_code(&client, endpoint, body.clone(), ErrorCode::BadRequest).await;
        }
    }
    expect_code(&client, "status", br#"{"job_id": "no-such-job"}"#.to_vec(), ErrorCode::NotFound).await;
    expect_code(&client, "jobs", br#"{"status": "sleeping"}"#.to_vec(), ErrorCode::BadRequest).await;

    // The typed client surfaces the same codes.
    match client.submit(&SubmitRequest { model: "nope".into(), ..Default::default() }).await {
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::UnknownModel),
        other => panic!("{other:?}"),
    }

    // Nothing above was queued, and the node still serves.
    assert!(client.jobs(&Default::default()).await.unwrap().jobs.is_empty());
    let ok = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap();
    assert_eq!(wait_terminal(&client, &ok.job_id, Duration::from_secs(10)).await.status, JobState::Completed);
}
