//! Live previews against real processes: a nats-server, a `kiln node` running the demo worker
//! (Python, on the kiln_worker SDK) and a `kiln gateway`. A worker that sends a preview every
//! 50 ms step, through the SDK or as bare lines past its throttle, reaches followers on
//! `kiln.previews.<job>` and in the job's SSE stream at most once per the model's interval;
//! the newest stays readable (`GET /v1/jobs/{id}/preview`, `Client::preview`, first in a job's
//! SSE stream), and no preview is an artifact or an event of the job's history.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use futures::StreamExt;
use kiln_core::protocol::SubmitRequest;
use serde_json::{json, Value};

/// The `demo` model's `preview_interval_ms` here.
const INTERVAL_MS: u64 = 300;
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A node serving `demo` (previews every 300 ms), `quiet` (the demo worker with previews
/// off) and `noop`, and a gateway.
async fn start() -> (TestCluster, GatewayProcess) {
    let mut cluster = TestCluster::new();
    let models = format!(
        "{}preview_interval_ms = {INTERVAL_MS}\n{}preview_interval_ms = 0\n{}",
        with_checkout_sdk(&demo_model("demo", &[], 1, 60_000)),
        with_checkout_sdk(&demo_model("quiet", &[], 1, 60_000)),
        NOOP_MODEL
    );
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &models);
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 2).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw1", &config, &cluster.url());
    (cluster, gateway)
}

fn request(model: &str, previews: &str, steps: u32) -> SubmitRequest {
    prompt_request(model, "a lighthouse", json!({"steps": steps, "step_ms": 50, "previews": previews}))
}

/// How many stored messages a stream holds on `subject`.
async fn stored(client: &kiln::client::Client, stream: &str, subject: &str) -> usize {
    let stream = client.jetstream().get_stream(stream).await.unwrap();
    let mut subjects = stream.info_with_subjects(subject).await.unwrap();
    let mut total = 0;
    while let Some(entry) = subjects.next().await {
        total += entry.unwrap().1;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_reach_followers_live_at_most_one_per_interval_and_only_the_newest_stays() {
    let (cluster, gw) = start().await;
    let client = cluster.client().await;
    let names = kiln_core::nats::Names::new("kiln");
    let h = http();
    // Through the SDK (it drops what comes too soon), then bare lines past it (the node must).
    for mode in ["every_step", "raw"] {
        let id = client.submit(&request("demo", mode, 40)).await.unwrap().job_id;
        let started = Instant::now();
        // A follower on NATS, and one on the gateway's SSE stream.
        let live = Arc::new(Mutex::new(Vec::new()));
        let mut previews = Box::pin(client.previews(&id).await.unwrap());
        let collector = {
            let live = live.clone();
            tokio::spawn(async move {
                while let Some(p) = previews.next().await {
                    live.lock().unwrap().push((Instant::now(), p));
                }
            })
        };
        let sse = {
            let (h, url) = (h.clone(), gw.url(&format!("/v1/jobs/{id}/events")));
            tokio::spawn(async move { read_sse(h.get(url).send().await.unwrap(), Duration::from_secs(60)).await })
        };

        // While it runs, the newest preview is there to be read.
        let ok = eventually(Duration::from_secs(20), || async { !live.lock().unwrap().is_empty() }).await;
        assert!(ok, "{mode}: no preview on NATS within 20 s");
        let r = h.get(gw.url(&format!("/v1/jobs/{id}/preview"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{mode}");
        assert_eq!(r.headers()["content-type"], "image/png");
        assert_eq!(r.headers()["cache-control"], "no-store");
        assert!(r.bytes().await.unwrap().starts_with(PNG));

        let view = wait_terminal(&client, &id, Duration::from_secs(60)).await;
        let events = sse.await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        collector.abort();
        let ran = started.elapsed();
        assert_eq!(view.status.as_str(), "completed", "{mode}: {view:?}");

        // Live on NATS: one per interval at most, numbered in order, each a PNG of this job.
        let live = live.lock().unwrap().clone();
        let seqs: Vec<u64> = live.iter().map(|(_, p)| p.seq).collect();
        let gaps: Vec<u64> = live.windows(2).map(|w| w[1].1.ts_ms.saturating_sub(w[0].1.ts_ms)).collect();
        let arrivals: Vec<u128> = live.windows(2).map(|w| (w[1].0 - w[0].0).as_millis()).collect();
        println!("{mode}: {} previews in {ran:?}, seqs {seqs:?}, ms between sends {gaps:?}, between arrivals {arrivals:?}", live.len());
        assert!(live.len() >= 3, "{mode}: 40 steps of 50 ms at one per {INTERVAL_MS} ms: {seqs:?}");
        assert!(live.len() as u128 <= ran.as_millis() / INTERVAL_MS as u128 + 1, "{mode}: more than one per interval: {seqs:?}");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{mode}: {seqs:?}");
        // The node stamps each when its throttle lets it through (a wall clock beside its
        // monotonic one: a ms or two either way).
        assert!(gaps.iter().all(|g| *g + 2 >= INTERVAL_MS), "{mode}: previews closer than the interval: {gaps:?}");
        for (_, p) in &live {
            assert_eq!((p.job_id.as_str(), p.attempt, p.content_type.as_str()), (id.as_str(), 1, "image/png"));
            assert!(p.data.starts_with(PNG) && p.data.len() < 4096, "{mode}: a small PNG: {} bytes", p.data.len());
        }

        // The SSE stream: `preview` events among the job's, without an id (they are not part
        // of the resumable history), each one that NATS delivered too.
        let sse_previews: Vec<Value> =
            events.iter().filter(|(_, name, _)| name == "preview").map(|(_, _, data)| serde_json::from_str(data).unwrap()).collect();
        assert!(!sse_previews.is_empty(), "{mode}: no preview event in the SSE stream: {events:?}");
        let sse_seqs: Vec<u64> = sse_previews.iter().map(|p| p["seq"].as_u64().unwrap()).collect();
        assert!(sse_seqs.windows(2).all(|w| w[0] < w[1]), "{mode}: each once, in order: {sse_seqs:?}");
        for (id_field, name, _) in &events {
            assert_eq!(id_field.is_some(), name != "preview", "{mode}: only previews go without an id: {name}");
        }
        for p in &sse_previews {
            assert_eq!(
                (p["job_id"].as_str(), p["attempt"].as_u64(), p["content_type"].as_str()),
                (Some(id.as_str()), Some(1), Some("image/png"))
            );
            let data = base64::engine::general_purpose::STANDARD.decode(p["data_base64"].as_str().unwrap()).unwrap();
            let seq = p["seq"].as_u64().unwrap();
            let same = live.iter().find(|(_, l)| l.seq == seq).unwrap_or_else(|| panic!("{mode}: SSE preview {seq} not on NATS"));
            assert_eq!(&same.1.data[..], &data[..]);
        }
        let last: Value = serde_json::from_str(&events.last().unwrap().2).unwrap();
        assert_eq!(last["status"], "completed", "{mode}: the stream ends with the job");

        // After the end: the newest preview, and only it, is kept.
        let newest = &live.last().unwrap().1;
        let r = h.get(gw.url(&format!("/v1/jobs/{id}/preview"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["kiln-preview-seq"].to_str().unwrap(), newest.seq.to_string());
        assert_eq!(r.headers()["kiln-attempt"], "1");
        assert_eq!(&r.bytes().await.unwrap()[..], &newest.data[..]);
        assert_eq!(client.preview(&id).await.unwrap().as_ref(), Some(newest));
        assert_eq!(stored(&client, &names.previews_stream(), &names.previews_subject(&id)).await, 1);

        // Not an artifact, not an event: the replayed history holds the job's events only, and
        // a stream opened after the end has the job's events, and of the previews only the
        // newest (a stream begins with the one kept), once.
        let artifacts: Vec<&str> = view.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(artifacts, ["image.png", "meta.json"]);
        let history = history(&client, &id).await;
        assert_eq!(stored(&client, &names.events_stream(), &names.events_subject(&id)).await, history.len());
        let replay = read_sse(h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap(), Duration::from_secs(20)).await;
        let (kept, replayed): (Vec<_>, Vec<_>) = replay.iter().partition(|(_, name, _)| name == "preview");
        assert_eq!(replayed.len(), history.len(), "{mode}: {replay:?}");
        assert!(replayed.iter().all(|(id, _, _)| id.is_some()));
        assert_eq!(kept.len(), 1, "{mode}: the newest preview only: {kept:?}");
        let kept: Value = serde_json::from_str(&kept[0].2).unwrap();
        assert_eq!(kept["seq"].as_u64(), Some(newest.seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_previews_has_none_and_a_coded_404() {
    let (cluster, gw) = start().await;
    let client = cluster.client().await;
    let h = http();
    // A model with previews off: the worker's bare preview lines are all dropped by the node.
    let id = client.submit(&request("quiet", "raw", 10)).await.unwrap().job_id;
    let mut previews = Box::pin(client.previews(&id).await.unwrap());
    let view = wait_terminal(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(view.status.as_str(), "completed");
    let got = tokio::time::timeout(Duration::from_millis(300), previews.next()).await;
    assert!(got.is_err(), "previews are off for `quiet`: {got:?}");
    assert_eq!(client.preview(&id).await.unwrap(), None);
    let noop = client.submit(&prompt_request("noop", "x", json!({}))).await.unwrap().job_id;
    wait_terminal(&client, &noop, Duration::from_secs(30)).await;
    for job in [id.as_str(), noop.as_str(), "no-such-job", "a.b", "*"] {
        let r = h.get(gw.url(&format!("/v1/jobs/{job}/preview"))).send().await.unwrap();
        assert_eq!(r.status(), 404, "{job}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "not_found", "{job}: {body}");
    }
    // A job id that is not one subject token follows nothing (`*` would be every job's).
    assert!(client.previews("*").await.is_err());
    assert!(client.previews("a.>").await.is_err());
}
