//! Batches, with real `kiln node` processes and the demo worker: a batch that succeeds in part,
//! its per-item events and summary, retrying only the failed items, cancel, limits and bad
//! items, and a node crash between an item's end and its batch's update.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kiln_core::batch::BatchStatus;
use kiln_core::job::JobState;
use kiln_core::protocol::{BatchItemRequest, BatchSubmitRequest, ErrorCode, Event, EventKind, InputValue};

fn item(prompt: &str, p: serde_json::Value) -> BatchItemRequest {
    BatchItemRequest { inputs: [("prompt".to_string(), InputValue::Inline(prompt.into()))].into(), params: params(p), ..Default::default() }
}

fn api_error(r: Result<impl std::fmt::Debug, kiln::client::ClientError>) -> kiln_core::protocol::ApiError {
    match r {
        Err(kiln::client::ClientError::Api(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Every event of a batch, up to and including `batch_finished`.
async fn batch_history(client: &kiln::client::Client, batch_id: &str) -> Vec<Event> {
    history(client, batch_id).await
}

/// Checks a finished batch's event history: one item event per item, each index once, every
/// item event before the one `batch_finished`, which is last.
fn check_batch_history(events: &[Event], expected_indices: &[u32]) -> BTreeMap<u32, Event> {
    let (last, items) = events.split_last().expect("events");
    assert_eq!(last.kind, EventKind::BatchFinished, "batch_finished is last: {events:#?}");
    assert_eq!(events.iter().filter(|e| e.kind == EventKind::BatchFinished).count(), 1, "one batch_finished");
    let mut by_index = BTreeMap::new();
    // `batch_progress` (issue 15, seed 004): the counts after items end, never past the total,
    // each after at least that many item events.
    let total = expected_indices.len() as u32;
    let mut items_so_far = 0;
    for e in items.iter().filter(|e| e.kind == EventKind::BatchProgress || e.item.is_some()) {
        if let Some(s) = e.summary.as_ref().filter(|_| e.kind == EventKind::BatchProgress) {
            let done = s.completed + s.failed + s.cancelled;
            assert!(s.total == total && done >= 1 && done <= items_so_far, "{e:?} after {items_so_far} item events");
        } else {
            items_so_far += 1;
        }
    }
    assert!(items.iter().any(|e| e.kind == EventKind::BatchProgress), "progress is reported: {events:#?}");
    for e in items.iter().filter(|e| e.kind != EventKind::BatchProgress) {
        assert!(matches!(e.kind, EventKind::ItemCompleted | EventKind::ItemFailed), "only item events before the end: {e:?}");
        let i = e.item.as_ref().expect("item events name their item");
        assert!(by_index.insert(i.index, e.clone()).is_none(), "item {} reported twice", i.index);
    }
    assert_eq!(by_index.keys().copied().collect::<Vec<_>>(), expected_indices, "one event per item");
    by_index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_failing_items_is_partial_and_retry_runs_only_those() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("n1", &config);
    cluster.add_node("n2", &config);
    cluster.wait_node_ready("n1", 2).await;
    cluster.wait_node_ready("n2", 2).await;
    let client = cluster.client().await;

    // Items 2 and 5 need a file that appears only later (a dependency that was down); item 6
    // is wrong for good. The rest succeed.
    let marker = cluster.dir.path().join("dependency-is-up");
    let mut items: Vec<BatchItemRequest> = (0..8).map(|i| item(&format!("frame {i}"), serde_json::json!({"seed": i}))).collect();
    for i in [2, 5] {
        items[i].params.insert("require_file".into(), marker.display().to_string().into());
    }
    items[6].params.insert("fail".into(), "fatal".into());
    let request = BatchSubmitRequest {
        model: "demo".into(),
        items,
        params: params(serde_json::json!({"steps": 3, "step_ms": 150})),
        ..Default::default()
    };
    let reply = client.submit_batch(&request).await.unwrap();
    assert_eq!(reply.items.len(), 8);
    assert_eq!(reply.items.iter().map(|i| i.index).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());

    let early = api_error(client.retry_batch(&reply.batch_id).await);
    assert_eq!(early.code, ErrorCode::BadRequest, "no retry while the batch runs: {early:?}");
    assert!(early.message.contains("still running"), "{}", early.message);

    let view = client.wait_batch(&reply.batch_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(view.status, BatchStatus::Partial, "{view:#?}");
    let s = view.summary;
    assert_eq!((s.total, s.completed, s.failed, s.cancelled), (8, 5, 3, 0));
    assert!(view.finished_ms.is_some());

    // The history: one event per item (completed ones with their artifacts), then the summary.
    let events = batch_history(&client, &reply.batch_id).await;
    let by_index = check_batch_history(&events, &(0..8).collect::<Vec<_>>());
    for (index, e) in &by_index {
        let i = e.item.as_ref().unwrap();
        if [2, 5, 6].contains(index) {
            assert_eq!((e.kind, i.status), (EventKind::ItemFailed, JobState::Failed), "item {index}");
            assert_eq!(e.error.as_ref().unwrap().code, ErrorCode::BadRequest);
            assert!(i.artifacts.is_empty());
        } else {
            assert_eq!((e.kind, i.status), (EventKind::ItemCompleted, JobState::Completed), "item {index}");
            let names: Vec<&str> = i.artifacts.iter().map(|a| a.name.as_str()).collect();
            assert!(names.contains(&"image.png"), "item_completed carries its artifact: {names:?}");
        }
    }
    assert_eq!(events.last().unwrap().summary.unwrap(), s);

    // Each item is a job of its own, ran across the cluster, and knows its batch.
    let mut nodes = std::collections::BTreeSet::new();
    let mut finished_before = BTreeMap::new();
    for i in &view.items {
        let job = client.status(&i.job_id).await.unwrap();
        assert_eq!(job.batch.as_ref().map(|b| (b.batch_id.as_str(), b.index)), Some((reply.batch_id.as_str(), i.index)));
        assert_eq!(job.status, i.status);
        nodes.insert(job.node.clone().unwrap());
        finished_before.insert(i.index, (job.job_id.clone(), job.attempt, job.finished_ms));
        if i.status == JobState::Completed {
            let dest = cluster.dir.path().join("out").join(&i.job_id).join("image.png");
            client.download(i.artifacts.iter().find(|a| a.name == "image.png").unwrap(), &dest).await.unwrap();
        }
    }
    assert_eq!(nodes.len(), 2, "the items ran on both nodes: {nodes:?}");

    // The dependency comes up; retry the failed items only.
    std::fs::write(&marker, b"up").unwrap();
    let retry = client.retry_batch(&reply.batch_id).await.unwrap();
    assert_eq!(retry.retry_of.as_deref(), Some(reply.batch_id.as_str()));
    assert_eq!(retry.items.iter().map(|i| i.index).collect::<Vec<_>>(), [2, 5, 6], "only the failed items, with their indices");
    let again = client.retry_batch(&reply.batch_id).await.unwrap();
    assert_eq!((again.batch_id.as_str(), again.duplicate), (retry.batch_id.as_str(), true), "one retry batch per batch");

    let retried = client.wait_batch(&retry.batch_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(retried.status, BatchStatus::Partial, "{retried:#?}");
    let s = retried.summary;
    assert_eq!((s.total, s.completed, s.failed), (3, 2, 1));
    let states: BTreeMap<u32, JobState> = retried.items.iter().map(|i| (i.index, i.status)).collect();
    assert_eq!(states, [(2, JobState::Completed), (5, JobState::Completed), (6, JobState::Failed)].into());
    check_batch_history(&batch_history(&client, &retry.batch_id).await, &[2, 5, 6]);

    // The first batch ended as it ended: same summary, now pointing at its retry; none of its
    // jobs ran again.
    let old = client.batch(&reply.batch_id).await.unwrap();
    assert_eq!((old.status, old.summary), (BatchStatus::Partial, view.summary));
    assert_eq!(old.retried_by.as_deref(), Some(retry.batch_id.as_str()));
    for (index, (job_id, attempt, finished)) in finished_before {
        let job = client.status(&job_id).await.unwrap();
        assert_eq!((job.attempt, job.finished_ms), (attempt, finished), "item {index} of the first batch was not run again");
    }
    // A batch with nothing failed has nothing to retry.
    let ok = client
        .submit_batch(&BatchSubmitRequest {
            model: "demo".into(),
            items: vec![item("solo", serde_json::json!({"steps": 1}))],
            ..Default::default()
        })
        .await
        .unwrap();
    let done = client.wait_batch(&ok.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();
    assert_eq!(done.status, BatchStatus::Succeeded);
    let nothing = api_error(client.retry_batch(&ok.batch_id).await);
    assert_eq!(nothing.code, ErrorCode::BadRequest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_whole_and_a_cancelled_batch_ends() {
    let mut cluster = TestCluster::new();
    let extra = format!("{}\n[limits]\nmax_batch_items = 4\n", demo_model("demo", &[], 3, 60_000));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 30_000, &extra));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let batch = |items: Vec<BatchItemRequest>| BatchSubmitRequest { model: "demo".into(), items, ..Default::default() };

    let e = api_error(client.submit_batch(&batch(vec![])).await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    let five: Vec<_> = (0..5).map(|i| item(&format!("p{i}"), serde_json::json!({}))).collect();
    let e = api_error(client.submit_batch(&batch(five)).await);
    assert_eq!(e.code, ErrorCode::PayloadTooLarge, "{e:?}");
    assert!(e.message.contains("at most 4"), "{}", e.message);
    // One bad item (no prompt) refuses the whole batch, naming the item; nothing is queued.
    let mut items: Vec<_> = (0..3).map(|i| item(&format!("p{i}"), serde_json::json!({}))).collect();
    items[1].inputs.clear();
    let e = api_error(client.submit_batch(&batch(items)).await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.starts_with("item 1:"), "{}", e.message);
    let mut missing = vec![item("p", serde_json::json!({}))];
    missing[0].inputs.insert("image".into(), InputValue::Object { object: "uploads/never-uploaded.png".into() });
    assert_eq!(api_error(client.submit_batch(&batch(missing)).await).code, ErrorCode::NotFound);
    assert_eq!(client.jobs(&Default::default()).await.unwrap().jobs.len(), 0, "a refused batch leaves no job behind");
    let wrong_model = BatchSubmitRequest { model: "nope".into(), items: vec![item("p", serde_json::json!({}))], ..Default::default() };
    assert_eq!(api_error(client.submit_batch(&wrong_model).await).code, ErrorCode::UnknownModel);
    assert_eq!(api_error(client.batch("a*b").await).code, ErrorCode::BadRequest);
    assert_eq!(api_error(client.batch("no-such-batch").await).code, ErrorCode::NotFound);
    let raw = client.request_raw("submit_batch", br#"{"model":"demo","items":[{"prompt":"x"}]}"#.to_vec()).await.unwrap();
    let e = api_error(kiln::client::decode_reply::<kiln_core::protocol::BatchReply>(&raw));
    assert_eq!(e.code, ErrorCode::BadRequest, "an item is {{inputs, params}}, nothing else");

    // An idempotency key gives one batch.
    let keyed =
        BatchSubmitRequest { idempotency_key: Some("storyboard-42".into()), ..batch(vec![item("k", serde_json::json!({"steps": 1}))]) };
    let first = client.submit_batch(&keyed).await.unwrap();
    let second = client.submit_batch(&keyed).await.unwrap();
    assert_eq!((second.batch_id.as_str(), second.duplicate, second.items.clone()), (first.batch_id.as_str(), true, first.items.clone()));
    client.wait_batch(&first.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();

    // Cancel: one item runs (one slot), the others wait; all end cancelled and the batch ends.
    let slow: Vec<_> = (0..3).map(|i| item(&format!("slow {i}"), serde_json::json!({"steps": 100, "step_ms": 100}))).collect();
    let b = client.submit_batch(&batch(slow)).await.unwrap();
    let running = eventually(Duration::from_secs(20), || async {
        client.status(&b.items[0].job_id).await.is_ok_and(|j| j.status == JobState::Running)
            || client.status(&b.items[1].job_id).await.is_ok_and(|j| j.status == JobState::Running)
    })
    .await;
    assert!(running, "an item started");
    let started = std::time::Instant::now();
    client.cancel_batch(&b.batch_id).await.unwrap();
    let view = client.wait_batch(&b.batch_id, Duration::from_secs(20), |_| {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "cancelled in {:?}", started.elapsed());
    assert_eq!(view.status, BatchStatus::Failed, "nothing completed: {view:#?}");
    assert_eq!((view.summary.cancelled, view.summary.completed), (3, 0));
    assert!(view.items.iter().all(|i| i.status == JobState::Cancelled));
    check_batch_history(&batch_history(&client, &b.batch_id).await, &[0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_an_items_end_and_its_batch_update_loses_nothing() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 2_000, &demo_model("demo", &[], 3, 60_000));
    // The node aborts right after the second item's terminal write: before its terminal
    // event, before the batch hears of it, before the ack.
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "abort_after_terminal_write@2")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let items = (0..3).map(|i| item(&format!("crash {i}"), serde_json::json!({"steps": 1, "step_ms": 10}))).collect();
    let b = client.submit_batch(&BatchSubmitRequest { model: "demo".into(), items, ..Default::default() }).await.unwrap();
    assert!(cluster.nodes[0].wait_exit(Duration::from_secs(30)).is_some(), "the node aborted at the fault point");
    assert!(cluster.nodes[0].log().contains("fault injected: abort_after_terminal_write"));
    // With the only node down nothing serves the API: read the batch's record directly.
    let kv = async_nats::jetstream::new(client.nats().clone()).get_key_value("kiln_batches").await.unwrap();
    let mid: kiln_core::batch::BatchRecord = serde_json::from_slice(&kv.get(&b.batch_id).await.unwrap().unwrap()).unwrap();
    let states: Vec<JobState> = mid.items.iter().map(|i| i.state).collect();
    assert_eq!(states[..2], [JobState::Completed, JobState::Queued], "the batch has not heard of the second item's end: {mid:#?}");

    cluster.nodes[0].env.clear();
    cluster.nodes[0].start();
    cluster.wait_node_ready("n1", 1).await;
    let view = client.wait_batch(&b.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();
    assert_eq!(view.status, BatchStatus::Succeeded, "{view:#?}");
    assert_eq!(view.summary.completed, 3);
    check_batch_history(&batch_history(&client, &b.batch_id).await, &[0, 1, 2]);
    for i in &view.items {
        let job = client.status(&i.job_id).await.unwrap();
        assert_eq!(job.attempt, 1, "item {} ran once", i.index);
        assert_eq!(statuses(&history(&client, &i.job_id).await), ["queued", "running", "completed"], "item {}", i.index);
    }
}

/// Regression: with several models sharing a node's slots, idle models' pullers used to hold
/// slots while long-polling, and a batch of one model crawled (500 items at 4 jobs/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_models_do_not_hold_the_slots_a_busy_model_needs() {
    let mut cluster = TestCluster::new();
    let mut models = String::from(NOOP_MODEL);
    for i in 0..4 {
        models.push_str(&format!("\n[[models]]\nname = \"idle{i}\"\nengine = {{ kind = \"noop\" }}\n"));
    }
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &models));
    cluster.wait_node_ready("n1", 2).await;
    let client = cluster.client().await;
    let items = (0..100).map(|i| BatchItemRequest { params: params(serde_json::json!({ "i": i })), ..Default::default() }).collect();
    let started = std::time::Instant::now();
    let b = client.submit_batch(&BatchSubmitRequest { model: "noop".into(), items, ..Default::default() }).await.unwrap();
    let view = client.wait_batch(&b.batch_id, Duration::from_secs(60), |_| {}).await.unwrap();
    let took = started.elapsed();
    println!("100 noop items beside 4 idle models on 2 slots: {took:?}");
    assert_eq!(view.status, BatchStatus::Succeeded);
    // With the idle models holding slots in 500 ms polls, this did not finish within 60 s.
    assert!(took < Duration::from_secs(8), "took {took:?}");
}
