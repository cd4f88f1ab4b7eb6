//! The node's probes on `node.metrics_addr`, against a real nats-server and real `kiln node`
//! processes: `/healthz` answers while the process lives, `/readyz` only while the node is
//! connected, its streams exist and its slots are registered (not while it drains), `/metrics`
//! is the Prometheus text, every other path is 404. A taken address fails the start.

mod common;

use std::time::Duration;

use common::*;
use kiln_core::job::JobState;
use kiln_core::protocol::ControlRequest;

/// A node config serving its probes on a free loopback port; that port.
fn node_config(url: &str) -> (String, u16) {
    let port = kiln_core::nats::server::free_port().unwrap();
    let config = config_toml(url, &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 120_000))
        .replace("metrics_addr = \"\"", &format!("metrics_addr = \"127.0.0.1:{port}\""));
    (config, port)
}

/// Status and JSON body of `GET path`; None when nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = http().get(format!("http://127.0.0.1:{port}{path}")).timeout(Duration::from_secs(10)).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

/// Waits until `GET path` answers `status`; the last answer either way.
async fn wait_status(port: u16, path: &str, status: u16, limit: Duration) -> Option<(u16, String)> {
    let last = std::sync::Mutex::new(None);
    eventually(limit, || async {
        let answer = get(port, path).await;
        let hit = answer.as_ref().is_some_and(|(s, _)| *s == status);
        *last.lock().unwrap() = answer;
        hit
    })
    .await;
    last.into_inner().unwrap()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The check named `name` in a `/readyz` body.
fn check<'a>(body: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    body["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name)).unwrap_or_else(|| panic!("no check {name:?}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_the_node_and_its_nats_connection() {
    let mut cluster = TestCluster::new();
    let (config, port) = node_config(&cluster.url());
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;

    let ready = wait_status(port, "/readyz", 200, Duration::from_secs(30)).await;
    let (_, body) = ready.clone().expect("the node serves /readyz");
    assert_eq!(ready.as_ref().map(|r| r.0), Some(200), "{body}\n{}", cluster.nodes[0].log_tail(40));
    let body = json(&body);
    assert_eq!(body["status"], "ready", "{body}");
    for name in ["nats", "streams", "slots", "node"] {
        assert_eq!(check(&body, name)["ok"], true, "{body}");
    }

    let (status, body) = get(port, "/healthz").await.expect("/healthz answers");
    assert_eq!((status, json(&body)), (200, serde_json::json!({"status": "ok"})));
    let (status, body) = get(port, "/nothing-here").await.expect("another path answers");
    assert_eq!(status, 404, "{body}");
    let (status, metrics) = get(port, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    // The node's API answered the cluster request that `wait_node_ready` made.
    assert!(metrics.contains("kiln_api_requests_total{endpoint=\"cluster\"}"), "{metrics}");

    // A bucket removed behind the node's back is named.
    let nats = async_nats::connect(cluster.url()).await.unwrap();
    async_nats::jetstream::new(nats).delete_stream("KV_kiln_reuse").await.unwrap();
    let (status, body) = wait_status(port, "/readyz", 503, Duration::from_secs(30)).await.expect("/readyz answers");
    assert_eq!(status, 503, "{body}");
    let body = json(&body);
    assert_eq!(check(&body, "streams")["ok"], false, "{body}");
    assert_eq!(check(&body, "streams")["detail"], "missing: KV_kiln_reuse", "{body}");

    // NATS goes away: the node lives (liveness passes) but is not ready, and says why.
    cluster.server.stop();
    let (status, body) = wait_status(port, "/readyz", 503, Duration::from_secs(30)).await.expect("/readyz answers without NATS");
    assert_eq!(status, 503, "{body}");
    let body = json(&body);
    assert_eq!(body["status"], "not ready", "{body}");
    assert_eq!(check(&body, "nats")["ok"], false, "{body}");
    assert!(check(&body, "nats")["detail"].as_str().unwrap().contains("disconnected"), "{body}");
    let (status, _) = get(port, "/healthz").await.expect("/healthz answers without NATS");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_is_not_ready() {
    let mut cluster = TestCluster::new();
    let (config, port) = node_config(&cluster.url());
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let ready = wait_status(port, "/readyz", 200, Duration::from_secs(30)).await;
    assert_eq!(ready.as_ref().map(|r| r.0), Some(200), "{ready:?}");

    // A job the drain waits for (up to the 30 s drain grace), so the node drains for a while.
    let client = cluster.client().await;
    let job = client.submit(&prompt_request("demo", "slow", serde_json::json!({"steps": 100, "step_ms": 200}))).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || async { client.status(&job.job_id).await.unwrap().status == JobState::Running }).await);
    client.control(&ControlRequest::Drain { node: "n1".into() }).await.unwrap();

    let answer = wait_status(port, "/readyz", 503, Duration::from_secs(15)).await;
    let (status, body) = answer.expect("a draining node still answers /readyz");
    assert_eq!(status, 503, "{body}\n{}", cluster.nodes[0].log_tail(40));
    let body = json(&body);
    assert_eq!(check(&body, "node")["ok"], false, "{body}");
    assert!(check(&body, "node")["detail"].as_str().unwrap().contains("draining"), "{body}");
    assert_eq!(check(&body, "nats")["ok"], true, "only the drain fails: {body}");
    let (status, _) = get(port, "/healthz").await.expect("/healthz answers while draining");
    assert_eq!(status, 200);
    assert!(process_alive(cluster.nodes[0].pid()), "the drain was still under way when checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_probe_address_fails_the_start() {
    let mut cluster = TestCluster::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, NOOP_MODEL)
        .replace("metrics_addr = \"\"", &format!("metrics_addr = \"127.0.0.1:{port}\""));
    let i = cluster.add_node("n1", &config);
    let code = cluster.nodes[i].wait_exit(Duration::from_secs(60));
    let log = cluster.nodes[i].log();
    assert!(code.is_some_and(|c| c != 0), "the node kept running ({code:?}): {log}");
    assert!(log.contains(&format!("127.0.0.1:{port}")) && log.contains("node.metrics_addr"), "{log}");
}
