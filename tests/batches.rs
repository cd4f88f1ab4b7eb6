//! Batches, with real `kiln node` processes and the demo worker: a batch that succeeds in part,
//! its per-item events and summary, retrying only the failed items, cancel, limits and bad
//! items, a node crash between an item's end and its batch's update; and the options seed 004
//! needs: `reuse` within a batch, `max_concurrency` (and a crash between the settle that
//! launches a held item and its launch), `fallback_models`.

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

/// `reuse` within a batch (seed 004: a storyboard repeats a frame): identical items (same
/// inputs, uploaded files by content; same params) run once, the later ones share the first's
/// job; its end settles every one of them, each with its own item event, labels and count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_items_of_a_batch_run_once_with_reuse() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 2).await;
    let client = cluster.client().await;
    // Two uploads of the same bytes under different names, and one of other bytes.
    client.upload("uploads/a/ref.png", b"the same reference image").await.unwrap();
    client.upload("uploads/b/copy-of-ref.png", b"the same reference image").await.unwrap();
    client.upload("uploads/c/other.png", b"another image").await.unwrap();
    let with_file = |object: &str| {
        let mut i = item("a harbour", serde_json::json!({}));
        i.inputs.insert("image".into(), InputValue::Object { object: object.into() });
        i
    };
    let mut items = vec![
        item("a harbour", serde_json::json!({})),
        item("the boats leave", serde_json::json!({})),
        item("a harbour", serde_json::json!({})),          // = item 0
        item("a harbour", serde_json::json!({"seed": 7})), // other params
        with_file("uploads/a/ref.png"),
        with_file("uploads/b/copy-of-ref.png"), // = item 4, by content
        with_file("uploads/c/other.png"),
        item("a harbour", serde_json::json!({"steps": 2})), // = item 0: the batch's params are merged first
    ];
    for (i, it) in items.iter_mut().enumerate() {
        it.labels.insert("frame".into(), i.to_string());
    }
    let request = BatchSubmitRequest {
        model: "demo".into(),
        items,
        params: params(serde_json::json!({"steps": 2, "step_ms": 50})),
        labels: [("storyboard_id".to_string(), "sb-reuse".to_string())].into(),
        reuse: true,
        ..Default::default()
    };
    let reply = client.submit_batch(&request).await.unwrap();
    let job = |i: usize| reply.items[i].job_id.clone();
    assert_eq!((job(2), job(7)), (job(0), job(0)), "identical items share the first one's job: {reply:#?}");
    assert_eq!(job(5), job(4), "an upload of the same content is the same input");
    let distinct: std::collections::BTreeSet<String> = reply.items.iter().map(|i| i.job_id.clone()).collect();
    assert_eq!(distinct.len(), 5, "{reply:#?}");

    let mut item_events = vec![];
    let view = client.wait_batch(&reply.batch_id, Duration::from_secs(60), |e| item_events.extend(e.item.clone())).await.unwrap();
    assert_eq!(view.status, BatchStatus::Succeeded, "{view:#?}");
    assert!(view.reuse);
    let s = view.summary;
    assert_eq!((s.total, s.completed), (8, 8), "the summary counts every item, shared or not");
    let by_index = check_batch_history(&batch_history(&client, &reply.batch_id).await, &(0..8).collect::<Vec<_>>());
    for (index, e) in &by_index {
        let i = e.item.as_ref().unwrap();
        assert_eq!((e.kind, i.job_id.as_str()), (EventKind::ItemCompleted, reply.items[*index as usize].job_id.as_str()));
        assert!(i.artifacts.iter().any(|a| a.name == "image.png"), "item {index} carries the shared job's artifacts");
        assert_eq!(i.labels.get("frame"), Some(&index.to_string()), "item {index} keeps its own labels: {e:?}");
        assert_eq!(i.labels.get("storyboard_id").map(String::as_str), Some("sb-reuse"));
    }
    for v in &view.items {
        assert_eq!(v.labels.get("frame"), Some(&v.index.to_string()), "{v:?}");
        assert_eq!(
            (v.status, v.job_id.as_str(), v.model.as_str()),
            (JobState::Completed, reply.items[v.index as usize].job_id.as_str(), "demo")
        );
    }
    assert_eq!(view.items[2].artifacts, view.items[0].artifacts, "the same results");
    // Five jobs ran, each once; the shared one names the first of its items.
    let jobs = client.jobs(&Default::default()).await.unwrap().jobs;
    assert_eq!(jobs.len(), 5, "{jobs:#?}");
    let shared = client.status(&job(0)).await.unwrap();
    assert_eq!((shared.attempt, shared.batch.as_ref().map(|b| b.index)), (1, Some(0)));
    assert_eq!(statuses(&history(&client, &job(0)).await), ["queued", "running", "completed"]);

    // Reuse is within the batch: the same batch again runs again.
    let again = client.submit_batch(&BatchSubmitRequest { items: request.items[..1].to_vec(), ..request.clone() }).await.unwrap();
    assert_ne!(again.items[0].job_id, job(0));
    client.wait_batch(&again.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();
}

/// `max_concurrency` (seed 004: a storyboard of 200 frames must not take every GPU): at most
/// that many of the batch's jobs exist unfinished at once, on a node with more slots; the rest
/// are held and launched as earlier items end, and all complete. Cancelling a batch ends its
/// held items without ever running them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_bounds_the_jobs_a_batch_runs_at_once() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1", "cpu:2"], 30_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 3).await;
    let client = cluster.client().await;
    // Warm every slot, so that the batch's jobs take about as long wherever they run.
    let warm = (0..3).map(|i| item(&format!("warm {i}"), serde_json::json!({"steps": 1, "step_ms": 300}))).collect();
    let w = client.submit_batch(&BatchSubmitRequest { model: "demo".into(), items: warm, ..Default::default() }).await.unwrap();
    client.wait_batch(&w.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();

    let items = (0..6).map(|i| item(&format!("frame {i}"), serde_json::json!({"steps": 8, "step_ms": 100}))).collect();
    let request = BatchSubmitRequest { model: "demo".into(), items, max_concurrency: Some(2), ..Default::default() };
    let reply = client.submit_batch(&request).await.unwrap();
    let ids: Vec<String> = reply.items.iter().map(|i| i.job_id.clone()).collect();
    let first = client.batch(&reply.batch_id).await.unwrap();
    assert_eq!(first.max_concurrency, Some(2));
    assert_eq!(first.items.iter().filter(|i| i.held).count(), 4, "four wait for room: {first:#?}");
    for held in first.items.iter().filter(|i| i.held) {
        assert_eq!(held.status, JobState::Queued);
        assert_eq!(api_error(client.status(&held.job_id).await).code, ErrorCode::NotFound, "a held item has no job yet");
    }

    // While it runs, never more than two of its jobs run at once (the cluster has three slots).
    let mut most_running = 0;
    let started = std::time::Instant::now();
    loop {
        let view = client.batch(&reply.batch_id).await.unwrap();
        let running = view.items.iter().filter(|i| i.status == JobState::Running).count();
        assert!(running <= 2, "{running} items run at once: {view:#?}");
        most_running = most_running.max(running);
        if view.summary.status != BatchStatus::Running {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the batch did not finish: {view:#?}");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let view = client.wait_batch(&reply.batch_id, Duration::from_secs(10), |_| {}).await.unwrap();
    assert_eq!((view.status, view.summary.completed), (BatchStatus::Succeeded, 6), "{view:#?}");
    check_batch_history(&batch_history(&client, &reply.batch_id).await, &(0..6).collect::<Vec<_>>());
    // Exactly: a job exists from its record's creation to its end; at no moment did three of
    // them overlap, and two did (the limit is used).
    let mut spans = vec![];
    for id in &ids {
        let job = client.status(id).await.unwrap();
        assert_eq!((job.status, job.attempt), (JobState::Completed, 1));
        spans.push((job.created_ms, job.finished_ms.unwrap()));
    }
    let overlap = |t: u64| spans.iter().filter(|(from, to)| *from <= t && t < *to).count();
    let most_open = spans.iter().map(|(from, _)| overlap(*from)).max().unwrap();
    assert_eq!(most_open, 2, "jobs open at once (created to finished): {spans:?}");
    assert_eq!(most_running, 2, "two ran at once");

    // Cancel: one item runs, two are held; all end cancelled, the held ones without a job.
    let slow = (0..3).map(|i| item(&format!("slow {i}"), serde_json::json!({"steps": 100, "step_ms": 100}))).collect();
    let b = client
        .submit_batch(&BatchSubmitRequest { model: "demo".into(), items: slow, max_concurrency: Some(1), ..Default::default() })
        .await
        .unwrap();
    let running = eventually(Duration::from_secs(20), || async {
        client.status(&b.items[0].job_id).await.is_ok_and(|j| j.status == JobState::Running)
    })
    .await;
    assert!(running, "the first item started");
    client.cancel_batch(&b.batch_id).await.unwrap();
    let view = client.wait_batch(&b.batch_id, Duration::from_secs(20), |_| {}).await.unwrap();
    assert_eq!((view.status, view.summary.cancelled), (BatchStatus::Failed, 3), "{view:#?}");
    assert!(view.items[1..].iter().all(|i| i.held && i.status == JobState::Cancelled), "{view:#?}");
    let events = check_batch_history(&batch_history(&client, &b.batch_id).await, &[0, 1, 2]);
    assert!(events.values().all(|e| e.item.as_ref().unwrap().status == JobState::Cancelled));
    for held in &view.items[1..] {
        assert_eq!(api_error(client.status(&held.job_id).await).code, ErrorCode::NotFound, "a held item never ran");
    }
}

/// `fallback_models` (seed 004): an item whose job fails on Kiln's side (a model whose worker
/// cannot load; a retryable failure on its last attempt) runs again on the next model, as a new
/// job the batch follows instead; a model no live slot serves is skipped at submit; a user
/// error does not fall back; a retry starts again from the first model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_items_fall_back_to_the_next_model() {
    let mut cluster = TestCluster::new();
    let broken = format!(
        r#"
[[models]]
name = "broken"
engine = {{ kind = "process", command = ["python3", "{worker}"], ready_timeout_ms = 20000, env = {{ KILN_DEMO_LOAD_FAIL = "1" }} }}
max_attempts = 1
required_inputs = ["prompt"]

[[models]]
name = "ghost"
engine = {{ kind = "noop" }}
slots = ["cpu:7"]
"#,
        worker = demo_worker()
    );
    let models = format!("{broken}{}{NOOP_MODEL}", demo_model("demo", &[], 1, 60_000));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &models));
    cluster.wait_node_ready("n1", 2).await;
    let client = cluster.client().await;
    let frames = |n: usize| (0..n).map(|i| item(&format!("frame {i}"), serde_json::json!({"steps": 1}))).collect::<Vec<_>>();

    // A model whose worker never loads: every item ends on noop.
    let request =
        BatchSubmitRequest { model: "broken".into(), items: frames(3), fallback_models: vec!["noop".into()], ..Default::default() };
    let reply = client.submit_batch(&request).await.unwrap();
    let mut item_events = vec![];
    let view = client.wait_batch(&reply.batch_id, Duration::from_secs(60), |e| item_events.extend(e.item.clone())).await.unwrap();
    assert_eq!((view.status, view.summary.completed), (BatchStatus::Succeeded, 3), "{view:#?}");
    assert_eq!(view.fallback_models, ["noop"]);
    check_batch_history(&batch_history(&client, &reply.batch_id).await, &[0, 1, 2]);
    for (i, v) in view.items.iter().enumerate() {
        assert_eq!((v.model.as_str(), v.status), ("noop", JobState::Completed), "{v:?}");
        assert_ne!(v.job_id, reply.items[i].job_id, "a new job replaced the first");
        let job = client.status(&v.job_id).await.unwrap();
        assert_eq!(
            (job.model.as_str(), job.batch.as_ref().map(|b| (b.batch_id.as_str(), b.index))),
            ("noop", Some((reply.batch_id.as_str(), i as u32)))
        );
        let first = client.status(&reply.items[i].job_id).await.unwrap();
        assert_eq!(
            (first.model.as_str(), first.status, first.error.map(|e| e.code)),
            ("broken", JobState::Failed, Some(ErrorCode::EngineFailed))
        );
        assert!(item_events.iter().any(|e| e.index == i as u32 && e.job_id == v.job_id), "the item event names the job it ended with");
    }

    // A model that no live slot serves: the items start on the next one.
    let request =
        BatchSubmitRequest { model: "ghost".into(), items: frames(2), fallback_models: vec!["noop".into()], ..Default::default() };
    let reply = client.submit_batch(&request).await.unwrap();
    for i in &reply.items {
        assert_eq!(client.status(&i.job_id).await.unwrap().model, "noop", "fell back at submit");
    }
    let view = client.wait_batch(&reply.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();
    assert_eq!(view.status, BatchStatus::Succeeded, "{view:#?}");
    assert!(view.items.iter().all(|i| i.model == "noop"));

    // A user error stays; a retryable failure on the last attempt falls back.
    let mut items = frames(3);
    items[0].params.insert("fail".into(), "fatal".into());
    items[1].params.insert("fail".into(), "retryable".into());
    let request = BatchSubmitRequest { model: "demo".into(), items, fallback_models: vec!["noop".into()], ..Default::default() };
    let reply = client.submit_batch(&request).await.unwrap();
    let view = client.wait_batch(&reply.batch_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!((view.status, view.summary.completed, view.summary.failed), (BatchStatus::Partial, 2, 1), "{view:#?}");
    let shown: Vec<(&str, JobState)> = view.items.iter().map(|i| (i.model.as_str(), i.status)).collect();
    assert_eq!(shown, [("demo", JobState::Failed), ("noop", JobState::Completed), ("demo", JobState::Completed)]);
    assert_eq!(view.items[0].error.as_ref().unwrap().code, ErrorCode::BadRequest);
    check_batch_history(&batch_history(&client, &reply.batch_id).await, &[0, 1, 2]);
    // The retry runs the failed item from the first model again, with the same list.
    let retry = client.retry_batch(&reply.batch_id).await.unwrap();
    let retried = client.wait_batch(&retry.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();
    assert_eq!(retried.fallback_models, ["noop"]);
    assert_eq!((retried.items[0].index, retried.items[0].model.as_str(), retried.items[0].status), (0, "demo", JobState::Failed));

    // Every model must be configured, once, and fit every item.
    let bad = |model: &str, fallback: &[&str], items: Vec<BatchItemRequest>| BatchSubmitRequest {
        model: model.into(),
        items,
        fallback_models: fallback.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    };
    let e = api_error(client.submit_batch(&bad("demo", &["nope"], frames(1))).await);
    assert_eq!(e.code, ErrorCode::UnknownModel, "{e:?}");
    assert!(e.message.contains("fallback_models[0]"), "{}", e.message);
    assert_eq!(api_error(client.submit_batch(&bad("demo", &["noop", "demo"], frames(1))).await).code, ErrorCode::BadRequest);
    let no_prompt = vec![BatchItemRequest::default()];
    let e = api_error(client.submit_batch(&bad("noop", &["demo"], no_prompt)).await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.starts_with("item 0:") && e.message.contains("\"demo\" needs input \"prompt\""), "{}", e.message);
    let e = api_error(client.submit_batch(&BatchSubmitRequest { max_concurrency: Some(0), ..bad("demo", &[], frames(1)) }).await);
    assert_eq!(e.code, ErrorCode::BadRequest);
}

/// A node that dies between a settle's write (which launched the next held item) and making
/// that item's job: the ended item's redelivery settles again, finds its end recorded and makes
/// the job; nothing is lost or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_settle_and_the_launch_it_wrote_loses_nothing() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 2_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "abort_before_batch_launch@1")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let items = (0..3).map(|i| item(&format!("held {i}"), serde_json::json!({"steps": 1, "step_ms": 10}))).collect();
    let request = BatchSubmitRequest { model: "demo".into(), items, max_concurrency: Some(1), ..Default::default() };
    let b = client.submit_batch(&request).await.unwrap();
    assert!(cluster.nodes[0].wait_exit(Duration::from_secs(30)).is_some(), "the node aborted at the fault point");
    assert!(cluster.nodes[0].log().contains("fault injected: abort_before_batch_launch"));
    // The record says item 1 is launched; its job was never made.
    let js = async_nats::jetstream::new(client.nats().clone());
    let kv = js.get_key_value("kiln_batches").await.unwrap();
    let mid: kiln_core::batch::BatchRecord = serde_json::from_slice(&kv.get(&b.batch_id).await.unwrap().unwrap()).unwrap();
    let held: Vec<(JobState, bool)> = mid.items.iter().map(|i| (i.state, i.held)).collect();
    assert_eq!(held, [(JobState::Completed, false), (JobState::Queued, false), (JobState::Queued, true)], "{mid:#?}");
    let jobs = js.get_key_value("kiln_jobs").await.unwrap();
    assert!(jobs.get(&b.items[1].job_id).await.unwrap().is_none(), "item 1's job does not exist yet");

    cluster.nodes[0].env.clear();
    cluster.nodes[0].start();
    cluster.wait_node_ready("n1", 1).await;
    let view = client.wait_batch(&b.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();
    assert_eq!((view.status, view.summary.completed), (BatchStatus::Succeeded, 3), "{view:#?}");
    check_batch_history(&batch_history(&client, &b.batch_id).await, &[0, 1, 2]);
    for i in &view.items {
        let job = client.status(&i.job_id).await.unwrap();
        assert_eq!(job.attempt, 1, "item {} ran once", i.index);
        assert_eq!(statuses(&history(&client, &i.job_id).await), ["queued", "running", "completed"], "item {}", i.index);
    }
}

/// `cancel_batch` while a held item's launch was cut short (its node died between the settle's
/// write and making the job): the item is made already cancelled, so it never runs, even when
/// the ended item's redelivery launches it again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_catching_a_launch_half_done_ends_the_item_unrun() {
    let mut cluster = TestCluster::new();
    // n1 runs the model; n2 only answers the API (its slot does not serve the model).
    let model = demo_model("demo", &["cpu:0"], 3, 60_000);
    cluster.add_node_with_env(
        "n1",
        &config_toml(&cluster.url(), &["cpu:0"], 2_000, &model),
        &[("KILN_FAULTS", "abort_before_batch_launch@1")],
    );
    cluster.add_node("n2", &config_toml(&cluster.url(), &["cpu:1"], 2_000, &model));
    cluster.wait_node_ready("n1", 1).await;
    cluster.wait_node_ready("n2", 1).await;
    let client = cluster.client().await;
    let items = (0..3).map(|i| item(&format!("cut {i}"), serde_json::json!({"steps": 1, "step_ms": 10}))).collect();
    let request = BatchSubmitRequest { model: "demo".into(), items, max_concurrency: Some(1), ..Default::default() };
    let b = client.submit_batch(&request).await.unwrap();
    assert!(cluster.nodes[0].wait_exit(Duration::from_secs(30)).is_some(), "n1 aborted at the fault point");
    assert_eq!(api_error(client.status(&b.items[1].job_id).await).code, ErrorCode::NotFound, "item 1 is listed, not made");

    let view = client.cancel_batch(&b.batch_id).await.unwrap();
    let states: Vec<JobState> = view.items.iter().map(|i| i.status).collect();
    assert_eq!(states, [JobState::Completed, JobState::Cancelled, JobState::Cancelled], "{view:#?}");
    let view = client.wait_batch(&b.batch_id, Duration::from_secs(20), |_| {}).await.unwrap();
    assert_eq!((view.status, view.summary.completed, view.summary.cancelled), (BatchStatus::Partial, 1, 2), "{view:#?}");
    assert!(!view.items[1].held && view.items[2].held, "item 1 got its job, cancelled; item 2 never did");

    // n1 comes back: item 0's redelivery settles again and launches item 1 again, which exists.
    let js = async_nats::jetstream::new(client.nats().clone());
    let queued = js.get_stream("KILN_JOBS").await.unwrap().info().await.unwrap().state.messages;
    assert_eq!(queued, 2, "item 0's unacked message and cancelled item 1's");
    cluster.nodes[0].env.clear();
    cluster.nodes[0].start();
    cluster.wait_node_ready("n1", 1).await;
    // Done once the queue is empty: item 0's message is acked only after its settle (which
    // launched item 1 again, finding it made), item 1's once its delivery found it cancelled.
    let drained = eventually(Duration::from_secs(30), || async {
        let mut stream = js.get_stream("KILN_JOBS").await.unwrap();
        stream.info().await.is_ok_and(|i| i.state.messages == 0)
    })
    .await;
    assert!(drained, "the queue drained: item 0 was redelivered and settled again");
    let one = client.status(&b.items[1].job_id).await.unwrap();
    assert_eq!((one.status, one.attempt), (JobState::Cancelled, 0), "it never ran");
    assert_eq!(statuses(&history(&client, &b.items[1].job_id).await), ["queued", "cancelled"]);
    let after = client.batch(&b.batch_id).await.unwrap();
    assert_eq!((after.status, after.summary), (view.status, view.summary), "the batch's end stands");
    check_batch_history(&batch_history(&client, &b.batch_id).await, &[0, 1, 2]);
}
