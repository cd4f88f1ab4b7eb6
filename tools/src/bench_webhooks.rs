//! `kiln bench --webhooks`: webhook delivery latency, beside its floor measured in the same run
//! against the same receiver.
//!
//! - webhook: the time from a no-op job's terminal event (seen by this process on the job's
//!   core NATS subject) to the receiver getting the signed POST Kiln sends for it;
//! - floor: a plain HTTP POST of a body of the same size from this process to the same
//!   receiver, from send to the receiver getting it.
//!
//! Both times are taken with this process's monotonic clock (the receiver runs in it), so the
//! figures need no clock agreement. Jobs run one at a time: this is latency, not throughput.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_core::nats::NatsServer;
use kiln_core::protocol::{Event, SubmitRequest, WebhookSpec};

use crate::bench::{bench_config, figures, Figures};
use crate::in_process::NodeStarter;
use kiln_client::Client;

/// The bench's own secret (24 bytes, as `whsec_<base64>`); nothing outside this run sees it.
const BENCH_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Debug, Clone)]
pub struct WebhookBenchOptions {
    pub jobs: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WebhookBenchReport {
    pub floor: Figures,
    pub webhook: Figures,
    /// Submit to the webhook's arrival (the whole path a back end waits).
    pub submit_to_webhook: Figures,
}

/// What the receiver saw: when each request's job (or floor probe) id arrived.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// The receiver: answers 204 and notes the arrival of each body's `data.job_id` (or its
/// `probe`) at once, before the answer is written.
async fn receiver(arrivals: Arrivals) -> Result<String, String> {
    crate::http_sink::serve(b"HTTP/1.1 204 No Content\r\n\r\n", move |body| {
        let at = Instant::now();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            let id = v["data"]["job_id"].as_str().or(v["probe"].as_str()).unwrap_or("").to_string();
            arrivals.lock().expect("not poisoned").insert(id, at);
        }
    })
    .await
}

async fn arrival(arrivals: &Arrivals, id: &str, limit: Duration) -> Result<Instant, String> {
    let start = Instant::now();
    loop {
        if let Some(at) = arrivals.lock().expect("not poisoned").get(id) {
            return Ok(*at);
        }
        if start.elapsed() > limit {
            return Err(format!("{id}: nothing arrived within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

pub async fn run(opts: WebhookBenchOptions, nodes: &dyn NodeStarter) -> Result<WebhookBenchReport, String> {
    let server = NatsServer::start_temp().map_err(|e| e.to_string())?;
    let arrivals: Arrivals = Default::default();
    let base = receiver(arrivals.clone()).await?;
    let mut config = bench_config(1);
    config.nats.url = server.url();
    config.webhooks.secret = BENCH_SECRET.into();
    config.webhooks.allow_loopback = true;
    config.validate().map_err(|e| e.to_string())?;
    let nats = config.nats.clone();
    let _node = nodes.start(config).await?;
    let client = Client::connect_with(&nats).await.map_err(|e| e.to_string())?;
    let http = reqwest::Client::new();

    // Terminal events as they are published: the webhook's clock starts here.
    let ended: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let mut events = client.nats().subscribe(format!("{}.events.>", nats.prefix)).await.map_err(|e| e.to_string())?;
    let seen = ended.clone();
    tokio::spawn(async move {
        while let Some(m) = events.next().await {
            if let Ok(e) = serde_json::from_slice::<Event>(&m.payload) {
                if e.is_terminal() {
                    seen.lock().expect("not poisoned").insert(e.job_id, Instant::now());
                }
            }
        }
    });

    let url = format!("{base}/hook");
    let run_job = || {
        let (client, url, arrivals, ended) = (client.clone(), url.clone(), arrivals.clone(), ended.clone());
        async move {
            let t = Instant::now();
            let request = SubmitRequest { model: "noop".into(), webhook: Some(WebhookSpec { url, events: vec![] }), ..Default::default() };
            let job = client.submit(&request).await.map_err(|e| e.to_string())?.job_id;
            let got = arrival(&arrivals, &job, Duration::from_secs(30)).await?;
            let end = ended.lock().expect("not poisoned").get(&job).copied().ok_or_else(|| format!("{job}: no terminal event seen"))?;
            Ok::<_, String>((got.saturating_duration_since(end), got - t))
        }
    };
    // Warm up both paths (connections, consumers, first-use allocations).
    for _ in 0..10 {
        run_job().await?;
    }
    // About a no-op job's webhook body, so that the floor's probes match its size.
    let body_len = 600;

    let (mut floor, mut webhook, mut whole) = (vec![], vec![], vec![]);
    let wall = Instant::now();
    let n = opts.jobs.max(1);
    // Interleaved, so that drift (the machine's load) hits both.
    for i in 0..n {
        let probe = format!("probe-{i}");
        let body = serde_json::json!({"probe": probe, "padding": "x".repeat(body_len)});
        let t = Instant::now();
        let sent = http.post(format!("{base}/floor")).json(&body).send();
        let (answer, got) = tokio::join!(sent, arrival(&arrivals, &probe, Duration::from_secs(10)));
        answer.map_err(|e| e.to_string())?;
        floor.push(got? - t);
        let (after_event, after_submit) = run_job().await?;
        webhook.push(after_event);
        whole.push(after_submit);
    }
    let w = wall.elapsed();
    Ok(WebhookBenchReport { floor: figures(floor, w), webhook: figures(webhook, w), submit_to_webhook: figures(whole, w) })
}

pub fn print(report: &WebhookBenchReport, opts: &WebhookBenchOptions) {
    println!("kiln bench --webhooks: {} no-op jobs with a webhook, one at a time; receiver on 127.0.0.1 (this process)", opts.jobs);
    println!();
    println!("                                              p50 ms    p99 ms");
    let row = |name: &str, f: &Figures| println!("  {name:<42} {:>8.3}  {:>8.3}", f.p50_ms, f.p99_ms);
    row("plain HTTP POST to the receiver (floor)", &report.floor);
    row("terminal event -> receiver has the webhook", &report.webhook);
    row("submit -> receiver has the webhook", &report.submit_to_webhook);
    println!(
        "  ratio webhook/floor: p50 {:.1}x, p99 {:.1}x",
        report.webhook.p50_ms / report.floor.p50_ms.max(1e-9),
        report.webhook.p99_ms / report.floor.p99_ms.max(1e-9)
    );
}
