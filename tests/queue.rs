//! The queue as anyone can see into it: `kiln.api.queue`, `GET /v1/queue`, `kiln queue` and the
//! queue gauges on a node's `/metrics`, against a real nats-server, a real node whose one slot
//! is held by long jobs, and a real gateway.

mod common;

use std::time::Duration;

use common::*;
use kiln_core::job::JobState;
use kiln_core::protocol::{ModelQueue, QueueReply, QueueRequest, SubmitRequest};

/// Each job holds the slot this long: the deep-queue checks run while the first one runs.
const WORK_MS: u64 = 10_000;

fn slow_model() -> String {
    format!(
        r#"
[[models]]
name = "slow"
engine = {{ kind = "noop", work_ms = {WORK_MS} }}
"#
    )
}

fn submit_request(priority: u8) -> SubmitRequest {
    SubmitRequest { model: "slow".into(), priority, ..Default::default() }
}

async fn slow_queue(client: &kiln::client::Client) -> ModelQueue {
    let reply = client.queue(&QueueRequest { model: Some("slow".into()) }).await.expect("kiln.api.queue answers");
    assert_eq!(reply.models.len(), 1, "{reply:?}");
    reply.models.into_iter().next().unwrap()
}

fn lanes(q: &ModelQueue) -> Vec<(String, u64)> {
    q.lanes.iter().map(|l| (l.lane.clone(), l.queued)).collect()
}

/// The value of a gauge in a Prometheus text page: the line of `name` whose labels include
/// every one of `labels`.
fn gauge(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().filter(|l| l.starts_with(&format!("{name}{{"))).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}

/// Reads with `read` every 100 ms until `done` holds of what it read or `limit` passes; returns
/// the last reading (the caller asserts on it, so a failure shows it).
async fn read_until<T, F, Fut>(limit: Duration, mut read: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let start = std::time::Instant::now();
    loop {
        let value = read().await;
        if done(&value) || start.elapsed() > limit {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics_page(port: u16) -> String {
    http()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .map(|r| r.text())
        .expect("/metrics answers")
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_shows_depth_by_lane_running_slots_and_the_slots_that_would_drain_it() {
    let mut cluster = TestCluster::new();
    let metrics_port = kiln_core::nats::server::free_port().unwrap();
    let plain =
        config_toml(&cluster.url(), &["cpu:0"], 60_000, &format!("{}\n[autoscale]\ntarget_wait_s = 1\nrefresh_ms = 300\n", slow_model()));
    let config = plain.replace("metrics_addr = \"\"", &format!("metrics_addr = \"127.0.0.1:{metrics_port}\""));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw", &plain, &cluster.url());
    let client = cluster.client().await;

    // Idle and empty: nothing wanted.
    let idle = slow_queue(&client).await;
    assert_eq!((idle.queued, idle.running, idle.slots, idle.desired_slots, idle.oldest_wait_ms), (0, 0, 1, 0, None), "{idle:?}");

    // One job takes the only slot; six more wait behind it, two of them in the high lane.
    let first = client.submit(&submit_request(0)).await.unwrap().job_id;
    let running =
        eventually(Duration::from_secs(20), || async { client.status(&first).await.is_ok_and(|v| v.status == JobState::Running) }).await;
    assert!(running, "the first job did not start: {:?}", client.status(&first).await);
    let mut waiting = vec![];
    for priority in [0, 0, 1, 0, 1, 0] {
        waiting.push(client.submit(&submit_request(priority)).await.unwrap().job_id);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let deep = slow_queue(&client).await;
    assert_eq!(lanes(&deep), [("high".to_string(), 2), ("normal".to_string(), 4)], "{deep:?}");
    assert_eq!((deep.queued, deep.running, deep.slots, deep.busy_slots), (6, 1, 1, 1), "{deep:?}");
    assert!(deep.oldest_wait_ms.is_some_and(|w| w >= 200), "the oldest waited since its submit: {deep:?}");
    // Nothing finished yet, so each waiting job counts for a slot, plus the running one.
    assert_eq!((deep.mean_service_ms, deep.service_samples, deep.desired_slots), (None, 0, 7), "{deep:?}");
    assert!(deep.desired_slots > deep.slots as u64);

    // The same over HTTP and from the command line.
    let over_http: QueueReply =
        http().get(gateway.url("/v1/queue?model=slow")).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    assert_eq!((over_http.target_wait_s, over_http.models.len()), (1, 1), "{over_http:?}");
    assert_eq!((over_http.models[0].queued, over_http.models[0].running, over_http.models[0].desired_slots), (6, 1, 7));
    let unknown = http().get(gateway.url("/v1/queue?model=nope")).send().await.unwrap();
    assert_eq!(unknown.status(), 404, "an unknown model");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(["queue", "--json", "--nats", &cluster.url()]);
    let cli = tokio::time::timeout(Duration::from_secs(30), command.output()).await.expect("kiln queue ends").unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let from_cli: QueueReply = serde_json::from_slice(&cli.stdout).expect("kiln queue --json prints the reply");
    assert_eq!(from_cli.models.iter().map(|q| (q.model.as_str(), q.queued, q.running)).collect::<Vec<_>>(), [("slow", 6, 1)]);
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(["queue", "--model", "slow", "--nats", &cluster.url()]);
    let table = tokio::time::timeout(Duration::from_secs(30), command.output()).await.expect("kiln queue ends").unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let row: Vec<&str> =
        table.lines().find(|l| l.starts_with("slow")).unwrap_or_else(|| panic!("no row for slow:\n{table}")).split_whitespace().collect();
    // MODEL HIGH NORMAL OLDEST (n s) RUNNING SLOTS BUSY MEAN RUN (-) DESIRED
    assert_eq!((row[1], row[2], row[5], row[6], row[7], row[8], row[9]), ("2", "4", "1", "1", "1", "-", "7"), "{table}");

    // The node exports the same figures as gauges.
    let page = read_until(
        Duration::from_secs(10),
        || metrics_page(metrics_port),
        |page| gauge(page, "kiln_model_desired_slots", &[("model", "slow")]) == Some(7.0),
    )
    .await;
    assert_eq!(gauge(&page, "kiln_model_desired_slots", &[("model", "slow")]), Some(7.0), "{page}");
    assert_eq!(gauge(&page, "kiln_queue_depth", &[("model", "slow"), ("lane", "high")]), Some(2.0), "{page}");
    assert_eq!(gauge(&page, "kiln_queue_depth", &[("model", "slow"), ("lane", "normal")]), Some(4.0), "{page}");
    assert_eq!(gauge(&page, "kiln_model_running", &[("model", "slow")]), Some(1.0), "{page}");
    assert_eq!(gauge(&page, "kiln_model_slots", &[("model", "slow")]), Some(1.0), "{page}");
    assert!(gauge(&page, "kiln_queue_oldest_wait_seconds", &[("model", "slow")]).is_some_and(|w| w > 0.0), "{page}");

    // Once the first job finished, its run time is the mean; a high job took its place.
    let done = wait_terminal(&client, &first, Duration::from_secs(60)).await;
    assert_eq!(done.status, JobState::Completed);
    let after = read_until(Duration::from_secs(20), || slow_queue(&client), |q| q.service_samples == 1 && q.running == 1).await;
    assert_eq!((after.service_samples, after.running), (1, 1), "{after:?}");
    assert!(after.mean_service_ms.is_some_and(|ms| ms >= WORK_MS), "{after:?}");
    assert_eq!(lanes(&after), [("high".to_string(), 1), ("normal".to_string(), 4)], "the high lane first: {after:?}");
    // 10 s jobs and a 1 s target: still a slot per waiting job.
    assert_eq!(after.desired_slots, 6, "{after:?}");

    // Cancelled and drained: nothing waits, nothing runs, nothing wanted.
    for job in &waiting {
        client.cancel(job).await.unwrap();
    }
    let empty = read_until(Duration::from_secs(60), || slow_queue(&client), |q| q.queued == 0 && q.running == 0).await;
    assert_eq!((empty.queued, empty.running, empty.desired_slots, empty.oldest_wait_ms), (0, 0, 0, None), "{empty:?}");
    let page = read_until(
        Duration::from_secs(10),
        || metrics_page(metrics_port),
        |page| gauge(page, "kiln_model_desired_slots", &[("model", "slow")]) == Some(0.0),
    )
    .await;
    assert_eq!(gauge(&page, "kiln_model_desired_slots", &[("model", "slow")]), Some(0.0), "{page}");
}

/// One node at a time exports the gauges, the live node whose name sorts first: a node alone
/// exports; when a node with a smaller name joins, that one takes over and the first sets its
/// gauges to 0 (so `max by (model)` reads the exporter's); when the exporter dies, the other
/// takes over again, within a registry TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_live_node_exports_the_gauges_and_another_takes_over_when_it_dies() {
    let mut cluster = TestCluster::new();
    let config_on = |port: u16| {
        config_toml(&cluster.url(), &["cpu:0"], 60_000, &format!("{}\n[autoscale]\nrefresh_ms = 200\n", slow_model()))
            .replace("metrics_addr = \"\"", &format!("metrics_addr = \"127.0.0.1:{port}\""))
    };
    let (port1, port2) = (kiln_core::nats::server::free_port().unwrap(), kiln_core::nats::server::free_port().unwrap());
    let (config1, config2) = (config_on(port1), config_on(port2));
    let slots = |page: &String| gauge(page, "kiln_model_slots", &[("model", "slow")]);

    // n2 alone exports: one slot serves the model.
    cluster.add_node("n2", &config2);
    cluster.wait_node_ready("n2", 1).await;
    let page = read_until(Duration::from_secs(20), || metrics_page(port2), |p| slots(p) == Some(1.0)).await;
    assert_eq!(slots(&page), Some(1.0), "{page}");

    // n1 joins: it exports the cluster's two slots, n2 steps back to 0.
    let n1 = cluster.add_node("n1", &config1);
    cluster.wait_node_ready("n1", 1).await;
    let page1 = read_until(Duration::from_secs(20), || metrics_page(port1), |p| slots(p) == Some(2.0)).await;
    assert_eq!(slots(&page1), Some(2.0), "{page1}");
    let page2 = read_until(Duration::from_secs(20), || metrics_page(port2), |p| slots(p) == Some(0.0)).await;
    assert_eq!(slots(&page2), Some(0.0), "{page2}");
    assert_eq!(gauge(&page2, "kiln_model_desired_slots", &[("model", "slow")]), Some(0.0), "{page2}");

    // n1 dies: once its entries expire, n2 exports again, its own slot the only one.
    cluster.nodes[n1].kill();
    let page = read_until(Duration::from_secs(30), || metrics_page(port2), |p| slots(p) == Some(1.0)).await;
    assert_eq!(slots(&page), Some(1.0), "{page}");
}
