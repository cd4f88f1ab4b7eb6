//! What the seeds' clients rely on, each against a real node (issue 15): job labels echoed
//! everywhere and filterable, params a model declares checked at submit, stages under the
//! names a model's clients know (with `downloading`), the durable results feed, and the CLI's
//! `kiln result` and `kiln batch submit --wait`.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln_core::job::JobState;
use kiln_core::protocol::{
    BatchItemRequest, BatchSubmitRequest, ErrorCode, ErrorReply, EventKind, InputValue, JobView, Labels, ListJobsRequest, SubmitRequest,
};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

async fn expect_bad_request(client: &kiln::client::Client, endpoint: &str, body: serde_json::Value) -> String {
    let raw = client.request_raw(endpoint, serde_json::to_vec(&body).unwrap()).await.unwrap();
    let reply: ErrorReply = serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&raw)));
    assert_eq!(reply.error.code, ErrorCode::BadRequest, "{}", reply.error.message);
    reply.error.message
}

/// Seed 001's `user_id`, seed 002's `session_id`, seed 004's `storyboard_id`: labels come back
/// on the job view, on every event, on batch items and their events, and select jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_echoed_on_views_events_and_batch_items_and_select_jobs() {
    let mut cluster = TestCluster::new();
    let models = format!("{}{}", demo_model("demo", &[], 3, 60_000), NOOP_MODEL);
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    let mut request = prompt_request("demo", "a fox", serde_json::json!({"steps": 2, "step_ms": 10}));
    request.labels = labels(&[("user_id", "u-1"), ("session_id", "s-9"), ("client.job_id", "mine-7")]);
    let job = client.submit(&request).await.unwrap().job_id;
    let other = client
        .submit(&SubmitRequest { model: "noop".into(), labels: labels(&[("user_id", "u-2")]), ..Default::default() })
        .await
        .unwrap()
        .job_id;
    let view = wait_terminal(&client, &job, Duration::from_secs(60)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    assert_eq!(view.labels, request.labels);
    wait_terminal(&client, &other, Duration::from_secs(30)).await;

    let events = history(&client, &job).await;
    assert!(events.len() >= 5, "{events:?}");
    for e in &events {
        assert_eq!(e.labels, request.labels, "every event carries the labels: {e:?}");
    }

    let mine = client.jobs(&ListJobsRequest { labels: labels(&[("user_id", "u-1")]), ..Default::default() }).await.unwrap().jobs;
    assert_eq!(mine.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), vec![job.as_str()]);
    let both = client
        .jobs(&ListJobsRequest { labels: labels(&[("user_id", "u-1"), ("session_id", "nope")]), ..Default::default() })
        .await
        .unwrap();
    assert!(both.jobs.is_empty(), "every label must match");

    // A batch's labels reach every item, an item's own win.
    let batch = BatchSubmitRequest {
        model: "noop".into(),
        labels: labels(&[("storyboard_id", "sb-3"), ("shot", "all")]),
        items: (0..3).map(|i| BatchItemRequest { labels: labels(&[("shot", &i.to_string())]), ..Default::default() }).collect(),
        ..Default::default()
    };
    let reply = client.submit_batch(&batch).await.unwrap();
    let mut item_events = Vec::new();
    let view = client.wait_batch(&reply.batch_id, Duration::from_secs(60), |e| item_events.extend(e.item.clone())).await.unwrap();
    for item in &view.items {
        assert_eq!(item.labels, labels(&[("storyboard_id", "sb-3"), ("shot", &item.index.to_string())]), "{item:?}");
    }
    assert_eq!(item_events.len(), 3);
    assert!(item_events.iter().all(|i| i.labels["storyboard_id"] == "sb-3"), "{item_events:?}");

    // Bounded: count, name syntax, value size; nothing is queued.
    let many: serde_json::Map<String, serde_json::Value> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let msg = expect_bad_request(&client, "submit", serde_json::json!({"model": "noop", "labels": many})).await;
    assert!(msg.contains("16"), "{msg}");
    expect_bad_request(&client, "submit", serde_json::json!({"model": "noop", "labels": {"a b": "x"}})).await;
    expect_bad_request(&client, "submit", serde_json::json!({"model": "noop", "labels": {"k": "x".repeat(300)}})).await;
    expect_bad_request(&client, "submit", serde_json::json!({"model": "noop", "labels": {"k": 1}})).await;
    expect_bad_request(&client, "submit_batch", serde_json::json!({"model": "noop", "items": [{}], "labels": {"a b": "x"}})).await;
}

/// `stpes=10` on a model that declares `steps` is a `bad_request` naming the declared params,
/// not a param the worker silently ignores; defaults are filled in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_params_are_checked_at_submit_and_defaults_filled_in() {
    let mut cluster = TestCluster::new();
    let models = format!(
        r#"{}params = [
  {{ name = "steps", kind = "int", min = 1, max = 50, default = 2 }},
  {{ name = "step_ms", kind = "float", min = 0, max = 1000, default = 10 }},
  {{ name = "style", kind = "str", choices = ["photo", "sketch"] }},
]
"#,
        demo_model("demo", &[], 3, 60_000)
    );
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    // A client finds what the model takes in kiln.api.models, as configured.
    let models = client.models().await.unwrap().models;
    let declared = serde_json::to_value(&models.iter().find(|m| m.name == "demo").unwrap().params).unwrap();
    assert_eq!(declared[0], serde_json::json!({"name": "steps", "kind": "int", "min": 1.0, "max": 50.0, "choices": [], "default": 2}));
    assert_eq!(declared[2]["choices"], serde_json::json!(["photo", "sketch"]), "{declared}");

    let submit = |params: serde_json::Value| serde_json::json!({"model": "demo", "inputs": {"prompt": "x"}, "params": params});
    let msg = expect_bad_request(&client, "submit", submit(serde_json::json!({"stpes": 10}))).await;
    assert!(msg.contains("stpes") && msg.contains("steps"), "{msg}");
    let msg = expect_bad_request(&client, "submit", submit(serde_json::json!({"steps": 0}))).await;
    assert!(msg.contains("steps") && msg.contains("1 to 50"), "{msg}");
    expect_bad_request(&client, "submit", submit(serde_json::json!({"steps": "ten"}))).await;
    expect_bad_request(&client, "submit", submit(serde_json::json!({"steps": 2.5}))).await;
    expect_bad_request(&client, "submit", submit(serde_json::json!({"style": "oil"}))).await;
    let msg = expect_bad_request(
        &client,
        "submit_batch",
        serde_json::json!({"model": "demo", "items": [{"inputs": {"prompt": "a"}}, {"inputs": {"prompt": "b"}, "params": {"stpes": 1}}]}),
    )
    .await;
    assert!(msg.starts_with("item 1"), "{msg}");
    assert!(client.jobs(&Default::default()).await.unwrap().jobs.is_empty(), "nothing was queued");

    let job = client.submit(&prompt_request("demo", "x", serde_json::json!({"style": "sketch"}))).await.unwrap().job_id;
    let view = wait_terminal(&client, &job, Duration::from_secs(60)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    assert_eq!(view.params, params(serde_json::json!({"steps": 2, "step_ms": 10, "style": "sketch"})), "defaults filled in");
    let progress = history(&client, &job).await.into_iter().filter(|e| e.kind == EventKind::Progress).count();
    assert!(progress >= 2, "the worker ran the default 2 steps");
}

/// Seed 002's clients know `downloading` and their own status names: a model's `stage_names`
/// shows the worker's stages under those names and leaves the others out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_show_under_the_names_the_model_declares_with_downloading_first() {
    let mut cluster = TestCluster::new();
    let models = format!(
        "{}stage_names = {{ downloading = \"downloading\", inference = \"processing\" }}\n{}",
        demo_model("talking", &[], 3, 60_000),
        demo_model("plain", &[], 3, 60_000)
    );
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    client.upload("uploads/face.png", b"not really a png").await.unwrap();

    let stages = |events: &[kiln_core::protocol::Event]| -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for s in events.iter().filter(|e| e.kind == EventKind::Progress).filter_map(|e| e.stage.clone()) {
            if seen.last() != Some(&s) {
                seen.push(s);
            }
        }
        seen
    };
    let with_file = |model: &str| SubmitRequest {
        model: model.into(),
        inputs: [
            ("prompt".to_string(), InputValue::Inline("hi".into())),
            ("image".to_string(), InputValue::Object { object: "uploads/face.png".into() }),
        ]
        .into(),
        params: params(serde_json::json!({"steps": 3, "step_ms": 10})),
        ..Default::default()
    };
    let job = client.submit(&with_file("talking")).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &job, Duration::from_secs(60)).await.status, JobState::Completed);
    assert_eq!(stages(&history(&client, &job).await), vec!["downloading", "processing"]);

    // Without `stage_names`, stages show as the worker reports them, `downloading` first.
    let job = client.submit(&with_file("plain")).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &job, Duration::from_secs(60)).await.status, JobState::Completed);
    assert_eq!(stages(&history(&client, &job).await), vec!["downloading", "preparing", "inference", "encoding"]);
}

/// Seed 000's backend consumer: every finished job once on `kiln.finished.<model>`, with its
/// artifacts and labels, read by a durable consumer that starts late and resumes where it
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_feed_keeps_every_end_for_a_consumer_that_starts_late_and_resumes() {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let mut cluster = TestCluster::new();
    let models = format!("{}{}", demo_model("demo", &[], 1, 60_000), NOOP_MODEL);
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    let mut ids = Vec::new();
    for i in 0..3 {
        let request = SubmitRequest { model: "noop".into(), labels: labels(&[("n", &i.to_string())]), ..Default::default() };
        ids.push(client.submit(&request).await.unwrap().job_id);
    }
    let failing = client.submit(&prompt_request("demo", "x", serde_json::json!({"fail": "fatal"}))).await.unwrap().job_id;
    for id in ids.iter().chain([&failing]) {
        wait_terminal(&client, id, Duration::from_secs(60)).await;
    }

    // The consumer starts after all of that.
    let js = client.jetstream();
    let stream = js.get_stream("KILN_FINISHED").await.unwrap();
    let durable = || pull::Config {
        durable_name: Some("backend".into()),
        filter_subject: "kiln.finished.>".into(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ..Default::default()
    };
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream.get_or_create_consumer("backend", durable()).await.unwrap();
    let mut first = consumer.fetch().max_messages(2).expires(Duration::from_secs(2)).messages().await.unwrap();
    let mut seen: Vec<JobView> = Vec::new();
    while let Some(m) = first.next().await {
        let m = m.unwrap();
        seen.push(serde_json::from_slice(&m.payload).unwrap());
        m.ack().await.unwrap();
    }
    assert_eq!(seen.len(), 2);
    drop(consumer);

    // Another job finishes while the consumer is away; it resumes after the two it acked.
    let late = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap().job_id;
    wait_terminal(&client, &late, Duration::from_secs(30)).await;
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream.get_or_create_consumer("backend", durable()).await.unwrap();
    let mut rest = consumer.fetch().max_messages(10).expires(Duration::from_secs(2)).messages().await.unwrap();
    while let Some(m) = rest.next().await {
        let m = m.unwrap();
        assert!(m.subject.as_str().starts_with("kiln.finished."), "{}", m.subject);
        seen.push(serde_json::from_slice(&m.payload).unwrap());
        m.ack().await.unwrap();
    }
    let mut got: Vec<&str> = seen.iter().map(|v| v.job_id.as_str()).collect();
    got.sort();
    let mut want: Vec<&str> = ids.iter().chain([&failing, &late]).map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want, "each end exactly once, none skipped");
    for v in &seen {
        if v.job_id == failing {
            assert_eq!(v.status, JobState::Failed);
            assert_eq!(v.error.as_ref().unwrap().code, ErrorCode::BadRequest);
        } else {
            assert_eq!(v.status, JobState::Completed);
            assert!(!v.artifacts.is_empty() && !v.artifacts[0].sha256.is_empty(), "{v:?}");
        }
    }
    assert!(seen.iter().any(|v| v.labels.get("n").is_some_and(|n| n == "1")));
}

/// A job's end whose feed entry could not be stored while its terminal event was (the
/// `KILN_FINISHED` stream out of reach for longer than the job path's patience) still reaches
/// the results feed: the redelivery, which finds the job ended and its ending in the history,
/// publishes the feed entry again (de-duplicated by `<job>-finished`) before it acks.
/// Here the stream stops capturing `kiln.finished.>` for longer than `Patience::NATS_TROUBLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_entry_that_could_not_be_stored_with_its_ending_is_published_by_the_redelivery() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 3_000, NOOP_MODEL));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let js = client.jetstream();

    // The feed's stream captures nothing of kiln.finished.> for now.
    let mut stream = js.get_stream("KILN_FINISHED").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    let subjects = config.subjects.clone();
    config.subjects = vec!["kiln.finished_elsewhere.>".into()];
    js.update_stream(&config).await.unwrap();

    let job = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &job, Duration::from_secs(60)).await.status, JobState::Completed);
    assert!(history(&client, &job).await.last().is_some_and(|e| e.is_terminal()), "the ending is in the history");
    // The node gives up on the feed after its patience (30 s) and leaves the delivery unacked.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !cluster.nodes[0].log().contains("terminal event not stored") {
        assert!(std::time::Instant::now() < deadline, "the node never gave up on the feed: {}", cluster.nodes[0].log_tail(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    config.subjects = subjects;
    js.update_stream(&config).await.unwrap();

    // The redelivery (after the 3 s ack wait) finds the job ended and puts it on the feed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = stream.info().await.unwrap();
        if info.state.messages > 0 {
            let m = stream.get_last_raw_message_by_subject("kiln.finished.noop").await.unwrap();
            let view: JobView = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!((view.job_id.as_str(), view.status), (job.as_str(), JobState::Completed));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the job's end never reached the results feed: {}", cluster.nodes[0].log_tail(30));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let endings = history(&client, &job).await.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(endings, 1, "one ending in the history");
}

/// `kiln result <job> --out DIR` downloads a job's results; `kiln batch submit --wait`
/// downloads every item's and exits non-zero on a partial batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_downloads_results_and_fails_on_a_partial_batch() {
    let mut cluster = TestCluster::new();
    let models = format!("{}{}", demo_model("demo", &[], 1, 60_000), NOOP_MODEL);
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let dir = tempfile::tempdir().unwrap();
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).args(["--nats", &cluster.url()]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };

    let job = client.submit(&prompt_request("demo", "a fox", serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap().job_id;
    let out = dir.path().join("one");
    let (ok, text) = kiln(&["result", &job, "--wait", "--out", out.to_str().unwrap()]);
    assert!(ok, "{text}");
    let view = client.status(&job).await.unwrap();
    for a in &view.artifacts {
        let bytes = std::fs::read(out.join(&a.name)).unwrap();
        assert_eq!(kiln_core::nats::objects::sha256_hex(&bytes), a.sha256);
    }

    let failed = client.submit(&prompt_request("demo", "x", serde_json::json!({"fail": "fatal"}))).await.unwrap().job_id;
    let (ok, text) = kiln(&["result", &failed, "--wait", "--out", out.to_str().unwrap()]);
    assert!(!ok && text.contains("bad_request"), "{text}");

    let items = dir.path().join("items.jsonl");
    std::fs::write(&items, "{\"prompt\": \"a\"}\n{\"inputs\": {\"prompt\": \"b\"}, \"params\": {\"fail\": \"fatal\"}}\n").unwrap();
    let out = dir.path().join("batch");
    let (ok, text) =
        kiln(&["batch", "submit", "demo", "--items", items.to_str().unwrap(), "-p", "steps=1", "--wait", "--out", out.to_str().unwrap()]);
    assert!(!ok && text.contains("partial: 1 of 2"), "{text}");
    let batch_dir = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    assert!(batch_dir.join("0").join("image.png").exists(), "the completed item's results are downloaded: {text}");
}
