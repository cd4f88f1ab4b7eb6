//! The HTTP gateway against real processes: a nats-server, `kiln node` and `kiln gateway`
//! processes, driven over real HTTP (reqwest, and raw TCP where a well-behaved client cannot
//! misbehave enough). The native REST API, SSE replay and resume (also across gateways, one
//! killed mid-stream), files and artifacts, bad input of every kind, clients that leave in the
//! middle, NATS restarted under the gateway, API keys and tenants, CORS, graceful stop.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_core::nats::objects::sha256_hex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A node serving `demo` (the Python worker) and `noop` on two slots, and a gateway.
async fn start(http_extra: &str) -> (TestCluster, GatewayProcess, String) {
    let mut cluster = TestCluster::new();
    // The demo worker's live previews off: they come without an id and differ between two
    // clients of one job (live only), and these tests check the events' stream (tests/previews.rs
    // checks the previews in it).
    let models = format!("{}preview_interval_ms = 0\n{}{}", demo_model("demo", &[], 3, 60_000), NOOP_MODEL, http_extra);
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &models);
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 2).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw1", &config, &cluster.url());
    (cluster, gateway, config)
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
}

/// Asserts an error reply: its status, and the `{code, message}` body.
async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> String {
    let (got, body) = json_of(r).await;
    assert_eq!((got, body["code"].as_str().unwrap_or("")), (status, code), "{body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "exactly {{code, message}}: {body}");
    body["message"].as_str().unwrap().to_string()
}

async fn submit(h: &reqwest::Client, gw: &GatewayProcess, body: Value) -> String {
    let r = h.post(gw.url("/v1/jobs")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let (_, reply) = json_of(r).await;
    let id = reply["job_id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    id
}

async fn wait_status(h: &reqwest::Client, gw: &GatewayProcess, id: &str, want: &str) -> Value {
    let url = gw.url(&format!("/v1/jobs/{id}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, view) = json_of(h.get(&url).send().await.unwrap()).await;
        if view["status"] == want {
            return view;
        }
        assert!(Instant::now() < deadline, "job {id} never became {want}: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(events: &[(Option<String>, String, String)]) -> Vec<u64> {
    events.iter().map(|(id, _, _)| id.as_deref().expect("every event has an id").parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_mirrors_the_nats_api() {
    let (_cluster, gw, _) = start("").await;
    let h = http();

    let id = submit(
        &h,
        &gw,
        json!({"model": "demo", "inputs": {"prompt": "a cat"}, "params": {"steps": 3, "step_ms": 50}, "labels": {"user_id": "u-1"}}),
    )
    .await;
    // The event stream: the whole history, each event with its id and type, ending (the
    // server closes it) after the terminal status.
    let events = read_sse(h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap(), Duration::from_secs(60)).await;
    let seqs = ids(&events);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ids increase: {seqs:?}");
    for (_, name, data) in &events {
        let e: Value = serde_json::from_str(data).unwrap();
        assert_eq!(&e["type"], name.as_str());
        assert_eq!(e["job_id"], id.as_str());
    }
    let last: Value = serde_json::from_str(&events.last().unwrap().2).unwrap();
    assert_eq!((last["type"].as_str(), last["status"].as_str()), (Some("status"), Some("completed")));
    assert!(events.iter().any(|(_, n, _)| n == "progress") && events.iter().any(|(_, n, _)| n == "artifact"));

    let (status, view) = json_of(h.get(gw.url(&format!("/v1/jobs/{id}"))).send().await.unwrap()).await;
    assert_eq!((status, view["status"].as_str()), (200, Some("completed")));
    assert_eq!(view["params"]["steps"], 3);
    let art = view["artifacts"].as_array().unwrap().iter().find(|a| a["name"] == "image.png").unwrap().clone();

    // The artifact: streamed with its type, length, sha256 ETag; ranges; revalidation.
    let url = gw.url(&format!("/v1/jobs/{id}/artifacts/image.png"));
    let r = h.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["content-length"].to_str().unwrap(), art["size"].to_string());
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", art["sha256"].as_str().unwrap()));
    let bytes = r.bytes().await.unwrap();
    assert_eq!(sha256_hex(&bytes), art["sha256"].as_str().unwrap());
    let r = h.get(&url).header("range", "bytes=0-7").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes 0-7/{}", bytes.len()));
    assert_eq!(&r.bytes().await.unwrap()[..], &bytes[..8]);
    let r = h.get(&url).header("range", "bytes=-5").send().await.unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], &bytes[bytes.len() - 5..]);
    let r = h.get(&url).header("range", format!("bytes={}-", bytes.len())).send().await.unwrap();
    expect_error(r, 416, "range_not_satisfiable").await;
    let r = h.get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    expect_error(h.get(gw.url(&format!("/v1/jobs/{id}/artifacts/nope.png"))).send().await.unwrap(), 404, "not_found").await;

    // Listing, filtered as the NATS API filters.
    let (_, list) = json_of(h.get(gw.url("/v1/jobs?status=completed&model=demo&limit=10")).send().await.unwrap()).await;
    assert!(list["jobs"].as_array().unwrap().iter().any(|j| j["job_id"] == id.as_str()), "{list}");
    let (_, none) = json_of(h.get(gw.url("/v1/jobs?status=failed")).send().await.unwrap()).await;
    assert!(none["jobs"].as_array().unwrap().is_empty());
    // By label (`label=name:value`, repeated: all must match).
    let (_, mine) = json_of(h.get(gw.url("/v1/jobs?label=user_id:u-1")).send().await.unwrap()).await;
    assert_eq!(mine["jobs"].as_array().unwrap().iter().map(|j| j["job_id"].clone()).collect::<Vec<_>>(), [json!(id)], "{mine}");
    assert_eq!(mine["jobs"][0]["labels"], json!({"user_id": "u-1"}));
    let (_, other) = json_of(h.get(gw.url("/v1/jobs?label=user_id:u-1&label=session_id:s")).send().await.unwrap()).await;
    assert!(other["jobs"].as_array().unwrap().is_empty(), "{other}");
    expect_error(h.get(gw.url("/v1/jobs?label=no-separator")).send().await.unwrap(), 400, "bad_request").await;
    expect_error(h.get(gw.url("/v1/jobs?status=bogus")).send().await.unwrap(), 400, "bad_request").await;
    expect_error(h.get(gw.url("/v1/jobs/no-such-job")).send().await.unwrap(), 404, "not_found").await;

    // Cancel a long job.
    let long = submit(&h, &gw, json!({"model": "demo", "inputs": {"prompt": "slow"}, "params": {"steps": 500, "step_ms": 100}})).await;
    let (status, _) = json_of(h.post(gw.url(&format!("/v1/jobs/{long}/cancel"))).send().await.unwrap()).await;
    assert_eq!(status, 200);
    wait_status(&h, &gw, &long, "cancelled").await;

    // Models, cluster, probes, the API's description and the console.
    let (_, models) = json_of(h.get(gw.url("/v1/models")).send().await.unwrap()).await;
    let demo = models["models"].as_array().unwrap().iter().find(|m| m["name"] == "demo").unwrap().clone();
    assert_eq!(demo["slots"].as_array().unwrap().len(), 2);
    let (_, cluster) = json_of(h.get(gw.url("/v1/cluster")).send().await.unwrap()).await;
    assert_eq!(cluster["gpus"].as_array().unwrap().len(), 2);
    assert_eq!(cluster["nodes"][0]["node"], "n1");
    assert_eq!(json_of(h.get(gw.url("/healthz")).send().await.unwrap()).await, (200, json!({"status": "ok"})));
    assert_eq!(
        json_of(h.get(gw.url("/readyz")).send().await.unwrap()).await,
        (200, json!({"ready": true, "nats": "connected", "nodes": 1}))
    );
    let (_, openapi) = json_of(h.get(gw.url("/openapi.json")).send().await.unwrap()).await;
    assert!(openapi["paths"]["/v1/jobs/{id}/events"]["get"].is_object());
    assert!(openapi["components"]["schemas"]["JobView"]["properties"]["artifacts"].is_object(), "schemas from the Rust types");
    let console = h.get(gw.url("/")).send().await.unwrap();
    assert!(console.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(console.text().await.unwrap().contains("/console/app.js"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_up_and_down_and_multipart_file_parts_become_inputs() {
    let (_cluster, gw, _) = start("").await;
    let h = http();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (status, put) = json_of(h.put(gw.url("/v1/files/inputs/blob.bin")).body(data.clone()).send().await.unwrap()).await;
    assert_eq!(status, 201, "{put}");
    assert_eq!(
        put,
        json!({"name": "inputs/blob.bin", "size": data.len(), "sha256": sha256_hex(&data), "content_type": "application/octet-stream"})
    );
    let r = h.get(gw.url("/v1/files/inputs/blob.bin")).send().await.unwrap();
    assert_eq!(r.headers()["etag"].to_str().unwrap(), format!("\"{}\"", sha256_hex(&data)));
    assert_eq!(r.bytes().await.unwrap().to_vec(), data);

    let form = reqwest::multipart::Form::new()
        .part("a", reqwest::multipart::Part::bytes(b"first".to_vec()).file_name("a.txt"))
        .part("b", reqwest::multipart::Part::bytes(vec![1u8; 1000]).file_name("../../b.png"));
    let (status, files) = json_of(h.post(gw.url("/v1/files")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, 201, "{files}");
    let names: Vec<&str> = files["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(names.iter().all(|n| n.starts_with("uploads/")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("/b.png")), "the client's path is dropped: {names:?}");
    assert_eq!(files["files"][0]["original_name"], "a.txt");

    // A multipart submit: text parts as inline inputs, `params` as JSON, a file part uploaded
    // and referenced as an object input (the demo worker logs the size of its `image`).
    let form = reqwest::multipart::Form::new()
        .text("model", "demo")
        .text("prompt", "a fox")
        .text("params", r#"{"steps": 2, "step_ms": 10}"#)
        .part("image", reqwest::multipart::Part::bytes(vec![9u8; 4321]).file_name("fox.png"));
    let r = h.post(gw.url("/v1/jobs")).multipart(form).send().await.unwrap();
    let (status, reply) = json_of(r).await;
    assert_eq!(status, 201, "{reply}");
    let id = reply["job_id"].as_str().unwrap();
    let view = wait_status(&h, &gw, id, "completed").await;
    assert_eq!(view["inputs"]["prompt"], "a fox");
    let object = view["inputs"]["image"]["object"].as_str().unwrap();
    assert!(object.starts_with("uploads/") && object.ends_with("/fox.png"), "{object}");
    let events = read_sse(h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap(), Duration::from_secs(30)).await;
    assert!(events.iter().any(|(_, _, d)| d.contains("4321 bytes")), "the worker read the uploaded file: {events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_http() {
    let (_cluster, gw, _) = start("").await;
    let h = http();
    let r = h.post(gw.url("/v1/batches")).json(&json!({"model": "noop", "items": [{}, {}, {}]})).send().await.unwrap();
    let (status, reply) = json_of(r).await;
    assert_eq!(status, 201, "{reply}");
    let batch = reply["batch_id"].as_str().unwrap();
    assert_eq!(reply["items"].as_array().unwrap().len(), 3);
    let events = read_sse(h.get(gw.url(&format!("/v1/batches/{batch}/events"))).send().await.unwrap(), Duration::from_secs(60)).await;
    assert_eq!(events.iter().filter(|(_, n, _)| n == "item_completed").count(), 3, "{events:?}");
    assert_eq!(events.last().unwrap().1, "batch_finished");
    let (_, view) = json_of(h.get(gw.url(&format!("/v1/batches/{batch}"))).send().await.unwrap()).await;
    assert_eq!(view["status"], "succeeded");
    // Nothing failed: a retry has nothing to run, and says so with a code.
    let r = h.post(gw.url(&format!("/v1/batches/{batch}/retry"))).send().await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let (_, body) = json_of(r).await;
    assert!(body["code"].is_string() && body["message"].is_string(), "{body}");
    expect_error(h.get(gw.url("/v1/batches/no-such-batch")).send().await.unwrap(), 404, "not_found").await;
}

/// Reads events from a streaming SSE response until `n` have arrived; returns them (the
/// response stays open, unless dropped).
async fn read_events(response: &mut reqwest::Response, n: usize) -> Vec<(Option<String>, String, String)> {
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = parse_sse(&text);
        // Only whole events (a block ends with a blank line).
        let complete = if text.ends_with("\n\n") { events.len() } else { events.len().saturating_sub(1) };
        if complete >= n {
            return events.into_iter().take(complete).collect();
        }
        assert!(Instant::now() < deadline, "only {complete} events in 60 s");
        match tokio::time::timeout(Duration::from_secs(60), response.chunk()).await.unwrap().unwrap() {
            Some(chunk) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
            None => return parse_sse(&text),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_gateway_after_its_gateway_dies_without_gap_or_repeat() {
    let (cluster, mut gw1, config) = start("").await;
    let gw2 = GatewayProcess::spawn(cluster.dir.path(), "gw2", &config, &cluster.url());
    let h = http();
    let id = submit(&h, &gw1, json!({"model": "demo", "inputs": {"prompt": "resume"}, "params": {"steps": 20, "step_ms": 100}})).await;

    let mut first = h.get(gw1.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap();
    let seen = read_events(&mut first, 4).await;
    assert!(seen.len() >= 4);
    // The gateway dies mid-stream (SIGKILL): the client's stream breaks.
    gw1.kill();
    assert!(tokio::time::timeout(Duration::from_secs(10), async { while let Ok(Some(_)) = first.chunk().await {} }).await.is_ok());
    let last_id = seen.last().unwrap().0.clone().unwrap();

    // It reconnects to another gateway with Last-Event-ID, as EventSource does.
    let rest = read_sse(
        h.get(gw2.url(&format!("/v1/jobs/{id}/events"))).header("Last-Event-ID", &last_id).send().await.unwrap(),
        Duration::from_secs(60),
    )
    .await;
    let mut combined = seen.clone();
    combined.extend(rest);
    let full = read_sse(h.get(gw2.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap(), Duration::from_secs(30)).await;
    assert_eq!(ids(&combined), ids(&full), "resumed = the whole history, no gap, no repeat");
    assert_eq!(combined, full);
    let last: Value = serde_json::from_str(&full.last().unwrap().2).unwrap();
    assert_eq!(last["status"], "completed");
    // Resuming after the terminal event: 204 No Content, which stops an EventSource for good
    // (an empty 200 made browsers reconnect in a loop); by header as EventSource sends it, or
    // by query. Resuming after any earlier event still streams the rest.
    let last = ids(&full).last().unwrap().to_string();
    for request in [
        h.get(gw2.url(&format!("/v1/jobs/{id}/events"))).header("Last-Event-ID", &last),
        h.get(gw2.url(&format!("/v1/jobs/{id}/events?last_event_id={last}"))),
    ] {
        let r = tokio::time::timeout(Duration::from_secs(10), request.send()).await.expect("answered at once").unwrap();
        assert_eq!(r.status(), 204);
        assert!(r.headers().get("content-type").is_none(), "{:?}", r.headers());
        assert_eq!(r.text().await.unwrap(), "");
    }
    let before_last = ids(&full)[ids(&full).len() - 2].to_string();
    let r = h.get(gw2.url(&format!("/v1/jobs/{id}/events"))).header("Last-Event-ID", &before_last).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let rest = read_sse(r, Duration::from_secs(10)).await;
    assert_eq!(ids(&rest), [ids(&full).last().copied().unwrap()]);
    // A batch's stream too.
    let (status, batch) = json_of(
        h.post(gw2.url("/v1/batches")).json(&json!({"model": "noop", "items": [{"inputs": {}}, {"inputs": {}}]})).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    let batch_id = batch["batch_id"].as_str().unwrap();
    let all = read_sse(h.get(gw2.url(&format!("/v1/batches/{batch_id}/events"))).send().await.unwrap(), Duration::from_secs(30)).await;
    assert!(all.last().is_some_and(|(_, name, _)| name == "batch_finished"), "{all:?}");
    let r = h
        .get(gw2.url(&format!("/v1/batches/{batch_id}/events")))
        .header("Last-Event-ID", all.last().unwrap().0.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

/// Every event stream starts with a `retry:` field (how long a browser waits to reconnect), and
/// a resume of a job that has not ended streams on (its stream broke: nothing ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_starts_with_retry_and_a_running_jobs_resume_streams_on() {
    let (_cluster, gw, _) = start("").await;
    let h = http();
    let id = submit(&h, &gw, json!({"model": "demo", "inputs": {"prompt": "retry"}, "params": {"steps": 10, "step_ms": 100}})).await;
    let mut first = h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let chunk =
        String::from_utf8(tokio::time::timeout(Duration::from_secs(10), first.chunk()).await.unwrap().unwrap().unwrap().to_vec()).unwrap();
    assert!(chunk.starts_with("retry: 3000\n"), "{chunk:?}");
    let seen = read_events(&mut first, 2).await;
    drop(first);
    let last = seen.last().unwrap().0.clone().unwrap();
    let r = h.get(gw.url(&format!("/v1/jobs/{id}/events"))).header("Last-Event-ID", &last).send().await.unwrap();
    assert_eq!(r.status(), 200, "the job runs on: its stream resumes");
    let body = tokio::time::timeout(Duration::from_secs(60), r.text()).await.unwrap().unwrap();
    assert!(body.starts_with("retry: 3000\n"), "{body:?}");
    let rest = parse_sse(&body);
    assert!(rest.last().is_some_and(|(_, _, data)| data.contains("\"completed\"")), "{rest:?}");
}

/// `Idempotency-Key` is the body's `idempotency_key`: the same header twice gives one job,
/// header and body equal are fine, different are a coded 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_header_gives_one_job_and_a_conflict_is_400() {
    let (_cluster, gw, _) = start("").await;
    let h = http();
    let body = json!({"model": "noop", "inputs": {"prompt": "once"}});
    let post = |key: Option<&str>, body: &Value| {
        let mut r = h.post(gw.url("/v1/jobs")).json(body);
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        r.send()
    };
    let (s1, first) = json_of(post(Some("order-17"), &body).await.unwrap()).await;
    let (s2, second) = json_of(post(Some("order-17"), &body).await.unwrap()).await;
    assert_eq!((s1, s2), (201, 201), "{first} {second}");
    assert_eq!(first["job_id"], second["job_id"], "one key, one job");
    assert_eq!((first["duplicate"].as_bool(), second["duplicate"].as_bool()), (Some(false), Some(true)));
    // The body's key is the same key.
    let mut keyed = body.clone();
    keyed["idempotency_key"] = json!("order-17");
    let (s3, third) = json_of(post(None, &keyed).await.unwrap()).await;
    assert_eq!((s3, &third["job_id"]), (201, &first["job_id"]), "{third}");
    let (s4, fourth) = json_of(post(Some("order-17"), &keyed).await.unwrap()).await;
    assert_eq!((s4, &fourth["job_id"]), (201, &first["job_id"]), "{fourth}");
    // Another key, another job.
    let (_, other) = json_of(post(Some("order-18"), &body).await.unwrap()).await;
    assert_ne!(other["job_id"], first["job_id"]);
    // Header and body differ: 400, the coded shape, naming the field; nothing submitted.
    let r = post(Some("order-19"), &keyed).await.unwrap();
    let (status, refused) = json_of(r).await;
    assert_eq!((status, refused["code"].as_str()), (400, Some("bad_request")), "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("Idempotency-Key") && message.contains("idempotency_key"), "{refused}");
    let (_, fresh) = json_of(post(Some("order-19"), &body).await.unwrap()).await;
    assert_eq!(fresh["duplicate"].as_bool(), Some(false), "the refused submit queued nothing under order-19: {fresh}");
    // A multipart submit and a batch take it too.
    let form = reqwest::multipart::Form::new().text("model", "noop").text("prompt", "form").text("idempotency_key", "form-1");
    let r = h.post(gw.url("/v1/jobs")).header("Idempotency-Key", "form-2").multipart(form).send().await.unwrap();
    assert_eq!(json_of(r).await.0, 400);
    let batch = json!({"model": "noop", "items": [{"inputs": {}}]});
    let (b1, one) = json_of(h.post(gw.url("/v1/batches")).header("Idempotency-Key", "b-1").json(&batch).send().await.unwrap()).await;
    let (b2, two) = json_of(h.post(gw.url("/v1/batches")).header("Idempotency-Key", "b-1").json(&batch).send().await.unwrap()).await;
    assert_eq!((b1, b2), (201, 201), "{one} {two}");
    assert_eq!(one["batch_id"], two["batch_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_on_one_job_share_one_consumer() {
    let (cluster, gw, _) = start("").await;
    let h = http();
    let id = submit(&h, &gw, json!({"model": "demo", "inputs": {"prompt": "fan-out"}, "params": {"steps": 20, "step_ms": 200}})).await;
    let client = cluster.client().await;
    let mut events_stream = client.jetstream().get_stream(client.names().events_stream()).await.unwrap();
    let before = events_stream.info().await.unwrap().state.consumer_count;
    let mut streams = vec![];
    for _ in 0..200 {
        streams.push(h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send());
    }
    let responses = futures::future::join_all(streams).await;
    // Every client has its first event (the responses are in), so the feed's consumer exists,
    // unless the job already ended and the feed deleted it: at most one, never one per client.
    let consumers = events_stream.info().await.unwrap().state.consumer_count;
    assert!(consumers <= before + 1, "one consumer per followed job, not one per client: {consumers}");
    let bodies = futures::future::join_all(responses.into_iter().map(|r| read_sse(r.unwrap(), Duration::from_secs(90)))).await;
    let reference = &bodies[0];
    assert!(reference.last().unwrap().2.contains("\"completed\""));
    assert!(bodies.iter().all(|b| b == reference), "every client got every event, in order");
}

/// One HTTP/1.1 response off a raw connection (its head and a `Content-Length` body).
async fn read_response(tcp: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, String::from_utf8_lossy(&got).into_owned()));
        }
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await?;
    Ok(format!("{head}{}", String::from_utf8_lossy(&body)))
}

/// An over-limit JSON body gets its 413 after the gateway read it to its end (up to a bound),
/// so the connection stays usable: before, the gateway answered mid-body and closed with
/// unread bytes, which resets the connection, and a client still sending (the chunked upload
/// of `bad_input_gets_its_status_and_code_and_the_gateway_keeps_serving`, under load) saw a
/// connection error instead of the 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_limit_body_is_read_to_its_end_before_its_413_and_the_connection_stays_usable() {
    let (_cluster, gw, _) = start("[http]\nmax_body_bytes = 65536\n").await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    let head = |framing: &str| format!("POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n");
    let chunk = |n: usize| format!("{n:x}\r\n{}\r\n", "x".repeat(n));
    let cases = [
        ("chunked", format!("{}{}{}0\r\n\r\n", head("Transfer-Encoding: chunked"), chunk(100_000), chunk(100_000))),
        ("declared", format!("{}{}", head("Content-Length: 200000"), "x".repeat(200_000))),
    ];
    for (what, request) in cases {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(20), read_response(&mut tcp)).await.expect("answered");
        let refused = refused.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(refused.starts_with("HTTP/1.1 413") && refused.contains("payload_too_large"), "{what}: {refused}");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(20), read_response(&mut tcp)).await.expect("answered");
        let next = next.unwrap_or_else(|e| panic!("{what}: the connection did not survive the refusal: {e}"));
        assert!(next.starts_with("HTTP/1.1 200"), "{what}: {next}");
    }
    // Through a client library, a body still being sent when the limit is passed.
    let h = http();
    for declared in [false, true] {
        let mut request = h.post(gw.url("/v1/jobs")).header("content-type", "application/json");
        request = if declared {
            request.body(vec![b'x'; 1 << 20])
        } else {
            request.body(reqwest::Body::wrap_stream(futures::stream::iter([Ok::<_, std::io::Error>(vec![b'x'; 1 << 20])])))
        };
        let response = request.send().await.unwrap_or_else(|e| panic!("declared length {declared}: {e:?}"));
        expect_error(response, 413, "payload_too_large").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_code_and_the_gateway_keeps_serving() {
    let (_cluster, gw, _) = start("[http]\nmax_body_bytes = 65536\nmax_upload_bytes = 1048576\nheader_timeout_ms = 2000\n").await;
    let h = http();
    let post = |body: &'static str, ct: &'static str| h.post(gw.url("/v1/jobs")).header("content-type", ct).body(body).send();

    expect_error(post("{nope", "application/json").await.unwrap(), 400, "bad_request").await;
    expect_error(post(r#"{"model": 5}"#, "application/json").await.unwrap(), 400, "bad_request").await;
    expect_error(post(r#"{"model": "demo", "wat": 1}"#, "application/json").await.unwrap(), 400, "bad_request").await;
    expect_error(post(r#"{"model": "nope"}"#, "application/json").await.unwrap(), 404, "unknown_model").await;
    expect_error(post(r#"{"model": "demo"}"#, "application/json").await.unwrap(), 400, "bad_request").await; // no prompt
    expect_error(post("garbage", "multipart/form-data; boundary=XYZ").await.unwrap(), 400, "bad_request").await;
    expect_error(post("garbage", "multipart/form-data").await.unwrap(), 400, "bad_request").await;
    let no_model = reqwest::multipart::Form::new().text("prompt", "x");
    expect_error(h.post(gw.url("/v1/jobs")).multipart(no_model).send().await.unwrap(), 400, "bad_request").await;
    let bad_params = reqwest::multipart::Form::new().text("model", "demo").text("prompt", "x").text("params", "[1,2]");
    expect_error(h.post(gw.url("/v1/jobs")).multipart(bad_params).send().await.unwrap(), 400, "bad_request").await;

    // Oversize: a JSON body past max_body_bytes, declared or not.
    let big = format!(r#"{{"model": "demo", "inputs": {{"prompt": "{}"}}}}"#, "x".repeat(100_000));
    let msg = expect_error(
        h.post(gw.url("/v1/jobs")).header("content-type", "application/json").body(big.clone()).send().await.unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    assert!(msg.contains("65536"), "{msg}");
    let chunked = reqwest::Body::wrap_stream(futures::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]));
    expect_error(
        h.post(gw.url("/v1/jobs")).header("content-type", "application/json").body(chunked).send().await.unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    // A declared length past the limit is refused before the body is sent at all.
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head)).await.expect("answered without the body").unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 413"), "{}", String::from_utf8_lossy(&head[..n]));

    // Paths that try to climb out, raw (a client library would normalize them).
    for path in ["/v1/files/a/../../etc/passwd", "/v1/files/..", "/api/../v1/files/x/%2e%2e/y"] {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut response)).await.unwrap().unwrap();
        let status: u16 = response[9..12].parse().unwrap();
        assert!(status == 400 || status == 404, "{path}: {response}");
        assert!(response.contains("\"code\""), "{path}: coded: {response}");
        assert!(!response.contains("root:"), "{path}");
    }

    // Unknown routes and methods, and a Last-Event-ID that is not one of ours.
    expect_error(h.get(gw.url("/v2/jobs")).send().await.unwrap(), 404, "not_found").await;
    expect_error(h.delete(gw.url("/v1/jobs")).send().await.unwrap(), 405, "method_not_allowed").await;
    expect_error(h.patch(gw.url("/v1/models")).send().await.unwrap(), 405, "method_not_allowed").await;
    let id = submit(&h, &gw, json!({"model": "noop"})).await;
    let r = h.get(gw.url(&format!("/v1/jobs/{id}/events"))).header("Last-Event-ID", "yesterday").send().await.unwrap();
    expect_error(r, 400, "bad_request").await;
    expect_error(h.get(gw.url("/v1/jobs/nope/events")).send().await.unwrap(), 404, "not_found").await;

    // A slowloris client: a request head trickled a byte a second is cut after the header
    // timeout (2 s here), while everyone else is served.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let trickle = async {
        for b in b"X-Slow: 1234567890" {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Closed, reset, or answered (408): the server cut it.
            let mut probe = [0u8; 256];
            if tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await.is_ok() {
                break;
            }
        }
    };
    let served = async {
        for _ in 0..5 {
            assert_eq!(h.get(gw.url("/healthz")).send().await.unwrap().status(), 200);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::join!(trickle, served);
    let cut_after = started.elapsed();
    assert!(cut_after < Duration::from_secs(6), "the slow client was cut after {cut_after:?}");

    // Still serving, and the submits above that were refused left no job behind.
    assert_eq!(h.get(gw.url("/healthz")).send().await.unwrap().status(), 200);
    let id = submit(&h, &gw, json!({"model": "noop"})).await;
    wait_status(&h, &gw, &id, "completed").await;
    let (_, jobs) = json_of(h.get(gw.url("/v1/jobs?limit=100")).send().await.unwrap()).await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2, "only the two good submits made jobs: {jobs}");
}

/// Messages in the files bucket's stream: chunks and metadata of every object in it.
async fn files_stream_messages(cluster: &TestCluster) -> u64 {
    let client = cluster.client().await;
    let name = format!("OBJ_{}", client.names().files_bucket());
    let mut stream = client.jetstream().get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_in_the_middle_leaves_no_half_object() {
    let (cluster, gw, _) = start("[http]\nmax_upload_bytes = 4194304\nheader_timeout_ms = 2000\n").await;
    let h = http();
    assert_eq!(files_stream_messages(&cluster).await, 0);
    let addr = gw.base.trim_start_matches("http://").to_string();

    // 1. The client goes away after 3 of its declared 4 MiB.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"PUT /v1/files/cut.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n").await.unwrap();
    tcp.write_all(&vec![7u8; 3_000_000]).await.unwrap();
    tcp.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tcp);

    // 2. A body without a length that runs past the limit.
    let chunks = (0..40).map(|_| Ok::<_, std::io::Error>(vec![1u8; 256 * 1024]));
    let r = h.put(gw.url("/v1/files/huge.bin")).body(reqwest::Body::wrap_stream(futures::stream::iter(chunks))).send().await;
    if let Ok(r) = r {
        // (The server may also close the connection before the client finishes sending.)
        expect_error(r, 413, "payload_too_large").await;
    }

    // 3. A body that stalls: cut after the body timeout.
    let mut stall = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stall.write_all(b"PUT /v1/files/stall.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n").await.unwrap();
    stall.write_all(&vec![3u8; 300_000]).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stall.read_to_string(&mut response)).await.expect("cut").ok();

    // 4. A multipart submit whose file part is cut.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: 3000000\r\n\r\n";
    let part = "--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndemo\r\n--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(part.as_bytes()).await.unwrap();
    tcp.write_all(&vec![5u8; 1_000_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tcp);

    // Nothing of any of them is left: no object, no chunk.
    let clean = eventually(Duration::from_secs(15), || async { files_stream_messages(&cluster).await == 0 }).await;
    assert!(clean, "chunks left in the files bucket: {}", files_stream_messages(&cluster).await);
    for name in ["cut.bin", "huge.bin", "stall.bin"] {
        expect_error(h.get(gw.url(&format!("/v1/files/{name}"))).send().await.unwrap(), 404, "not_found").await;
    }
    let (_, jobs) = json_of(h.get(gw.url("/v1/jobs")).send().await.unwrap()).await;
    assert!(jobs["jobs"].as_array().unwrap().is_empty());
    // And a whole upload still works.
    let (status, _) = json_of(h.put(gw.url("/v1/files/ok.bin")).body(vec![1u8; 1000]).send().await.unwrap()).await;
    assert_eq!(status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_an_event_stream_leaves_no_consumer() {
    let (cluster, gw, _) = start("").await;
    let h = http();
    let client = cluster.client().await;
    let mut events = client.jetstream().get_stream(client.names().events_stream()).await.unwrap();
    let before = events.info().await.unwrap().state.consumer_count;
    let id = submit(&h, &gw, json!({"model": "demo", "inputs": {"prompt": "long"}, "params": {"steps": 600, "step_ms": 100}})).await;
    let mut sse = h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap();
    read_events(&mut sse, 2).await;
    assert_eq!(events.info().await.unwrap().state.consumer_count, before + 1);
    drop(sse);
    let gone = eventually(Duration::from_secs(15), || async { events.clone().info().await.unwrap().state.consumer_count == before }).await;
    assert!(gone, "the consumer of a stream nobody follows was not deleted");
    h.post(gw.url(&format!("/v1/jobs/{id}/cancel"))).send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_under_the_gateway() {
    let (mut cluster, gw, _) = start("").await;
    let h = http();
    assert_eq!(h.get(gw.url("/readyz")).send().await.unwrap().status(), 200);
    cluster.server.stop();
    let not_ready = eventually(Duration::from_secs(15), || async {
        let r = h.get(gw.url("/readyz")).send().await.unwrap();
        r.status() == 503 && r.headers().contains_key("retry-after")
    })
    .await;
    assert!(not_ready, "/readyz must say so while NATS is away");
    assert_eq!(h.get(gw.url("/healthz")).send().await.unwrap().status(), 200, "the process itself is up");
    let r = h.get(gw.url("/v1/models")).send().await.unwrap();
    assert!(r.status() == 503 || r.status() == 504, "{}", r.status());
    cluster.server.restart().unwrap();
    let ready = eventually(Duration::from_secs(40), || async { h.get(gw.url("/readyz")).send().await.unwrap().status() == 200 }).await;
    assert!(ready, "the gateway reconnected; log:\n{}", gw.log());
    let id = submit(&h, &gw, json!({"model": "noop"})).await;
    wait_status(&h, &gw, &id, "completed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_the_configured_origins_only() {
    let (_cluster, gw, _) = start("[http]\ncors_origins = [\"http://app.example\"]\n").await;
    let h = http();
    let preflight = |origin: &'static str| {
        h.request(reqwest::Method::OPTIONS, gw.url("/v1/jobs"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let ok = preflight("http://app.example").await.unwrap();
    assert_eq!(ok.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap()), Some("http://app.example"));
    let other = preflight("http://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_signal_ends_the_streams_and_the_gateway_exits() {
    let (_cluster, mut gw, _) = start("").await;
    let h = http();
    let id = submit(&h, &gw, json!({"model": "demo", "inputs": {"prompt": "long"}, "params": {"steps": 600, "step_ms": 100}})).await;
    let mut sse = h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap();
    read_events(&mut sse, 2).await;
    unsafe { libc::kill(gw.pid() as i32, libc::SIGTERM) };
    let ended = tokio::time::timeout(Duration::from_secs(8), async { while let Ok(Some(_)) = sse.chunk().await {} }).await;
    assert!(ended.is_ok(), "the stream ended on the stop signal");
    let started = Instant::now();
    let exited = eventually(Duration::from_secs(8), || async { !process_alive(gw.pid()) }).await;
    assert!(exited, "the gateway exited ({:?})", started.elapsed());
    gw.kill();
}
