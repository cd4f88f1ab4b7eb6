//! `kiln bench --http`: what the HTTP gateway costs, each figure beside its floor measured in
//! the same run on the same nats-server and node:
//!
//! - latency: HTTP `POST /v1/jobs` then `GET /v1/jobs/{id}/events` to the terminal event,
//!   against the same no-op jobs submitted over NATS and followed through the events stream
//!   (`kiln submit --wait`'s path: submit, then replay the events);
//! - fan-out: N concurrent SSE clients on one job, each must get every event; the gateway
//!   process's RSS before and with them connected;
//! - throughput: a large file up (`PUT /v1/files/{name}`) and down (`GET`) through the gateway,
//!   against the object store's own put and get from a NATS client.
//!
//! The gateway runs as its own process (`kiln gateway`), as in production, so its RSS is its own.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_core::nats::NatsServer;
use kiln_core::protocol::SubmitRequest;

use crate::bench::{bench_config, figures, Figures};
use crate::in_process::NodeStarter;
use kiln_client::Client;

#[derive(Debug, Clone)]
pub struct HttpBenchOptions {
    /// Jobs of the latency comparison (each path).
    pub jobs: usize,
    /// SSE clients on one job.
    pub sse_clients: usize,
    /// Size of the file of the throughput comparison.
    pub file_bytes: usize,
    pub slots: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HttpBenchReport {
    pub nats_latency: Figures,
    pub http_latency: Figures,
    pub http_hop: Figures,
    pub nats_submit: Figures,
    pub http_submit: Figures,
    pub nats_replay: Figures,
    pub http_replay: Figures,
    pub sse_clients: usize,
    pub sse_events_per_client: usize,
    pub sse_all_complete: bool,
    pub sse_connect_ms: f64,
    pub gateway_rss_idle_kib: u64,
    pub gateway_rss_with_clients_kib: u64,
    pub file_bytes: usize,
    pub direct_upload_mb_s: f64,
    pub http_upload_mb_s: f64,
    pub direct_download_mb_s: f64,
    pub http_download_mb_s: f64,
}

struct GatewayChild {
    child: Child,
    base: String,
}

impl Drop for GatewayChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Lets this process (and the gateway it starts) hold the sockets of every SSE client.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn start_gateway(dir: &std::path::Path, nats_url: &str) -> Result<GatewayChild, String> {
    use std::io::BufRead;
    let config = dir.join("gateway.toml");
    std::fs::write(&config, format!("[nats]\nurl = \"{nats_url}\"\n[http]\nmax_upload_bytes = 4294967296\n")).map_err(|e| e.to_string())?;
    let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["gateway", "--config"])
        .arg(&config)
        .args(["--http-addr", "127.0.0.1:0"])
        .env("KILN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the gateway: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let line = std::io::BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with("kiln gateway on "));
    let base = line.and_then(|l| l.split_whitespace().nth(3).map(str::to_string)).ok_or("the gateway did not start")?;
    Ok(GatewayChild { child, base })
}

/// Reads an SSE body to its end; the number of events in it.
async fn count_events(response: reqwest::Response) -> Result<usize, String> {
    let mut events = 0;
    let mut tail = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        tail.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(end) = tail.find("\n\n") {
            if tail[..end].lines().any(|l| l.starts_with("data:")) {
                events += 1;
            }
            tail.drain(..end + 2);
        }
    }
    Ok(events)
}

async fn nats_latency(client: &Client, n: usize) -> Result<Figures, String> {
    let mut samples = Vec::with_capacity(n);
    let wall = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let reply = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.map_err(|e| e.to_string())?;
        let events = client.events(&reply.job_id).await.map_err(|e| e.to_string())?;
        let last = events.fold(None, |_, e| async move { Some(e) }).await;
        if !last.is_some_and(|e| e.is_terminal()) {
            return Err(format!("job {} did not end", reply.job_id));
        }
        samples.push(t.elapsed());
    }
    Ok(figures(samples, wall.elapsed()))
}

async fn http_latency(http: &reqwest::Client, base: &str, n: usize) -> Result<Figures, String> {
    let mut samples = Vec::with_capacity(n);
    let wall = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let reply: serde_json::Value = http
            .post(format!("{base}/v1/jobs"))
            .json(&serde_json::json!({"model": "noop"}))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let id = reply["job_id"].as_str().ok_or_else(|| format!("submit failed: {reply}"))?;
        let events = http.get(format!("{base}/v1/jobs/{id}/events")).send().await.map_err(|e| e.to_string())?;
        let body = events.text().await.map_err(|e| e.to_string())?;
        if !body.contains("\"completed\"") {
            return Err(format!("job {id} did not complete: {body}"));
        }
        samples.push(t.elapsed());
    }
    Ok(figures(samples, wall.elapsed()))
}

/// The two halves of a job's round trip, each path: the submit alone, and the replay of a
/// finished job's events alone.
async fn halves(client: &Client, http: &reqwest::Client, base: &str, n: usize) -> Result<[Figures; 4], String> {
    let (mut nats_submit, mut http_submit, mut nats_replay, mut http_replay) = (vec![], vec![], vec![], vec![]);
    let wall = Instant::now();
    let mut done = vec![];
    for _ in 0..n {
        let t = Instant::now();
        let reply = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.map_err(|e| e.to_string())?;
        nats_submit.push(t.elapsed());
        done.push(reply.job_id);
        let t = Instant::now();
        let r = http.post(format!("{base}/v1/jobs")).json(&serde_json::json!({"model": "noop"})).send().await.map_err(|e| e.to_string())?;
        let _ = r.bytes().await.map_err(|e| e.to_string())?;
        http_submit.push(t.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &done {
        let t = Instant::now();
        let events = client.events(id).await.map_err(|e| e.to_string())?;
        let _ = events.count().await;
        nats_replay.push(t.elapsed());
        let t = Instant::now();
        let _ = http.get(format!("{base}/v1/jobs/{id}/events")).send().await.map_err(|e| e.to_string())?.text().await;
        http_replay.push(t.elapsed());
    }
    let w = wall.elapsed();
    Ok([figures(nats_submit, w), figures(http_submit, w), figures(nats_replay, w), figures(http_replay, w)])
}

fn mb_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

/// Runs the node in this process, started by `nodes`; the gateway as a child process.
pub async fn run(opts: HttpBenchOptions, nodes: &dyn NodeStarter) -> Result<HttpBenchReport, String> {
    raise_open_files_limit();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let server = NatsServer::start_temp().map_err(|e| e.to_string())?;
    let mut config = bench_config(opts.slots);
    config.nats.url = server.url();
    // The fan-out job: slow enough for every client to connect while it runs.
    config.models.push(fan_out_model()?);
    config.validate().map_err(|e| e.to_string())?;
    let nats = config.nats.clone();
    let node = nodes.start(config).await?;
    let client = Client::connect_with(&nats).await.map_err(|e| e.to_string())?;
    let gateway = start_gateway(dir.path(), &server.url())?;
    let pid = gateway.child.id();
    let http = reqwest::Client::builder().pool_max_idle_per_host(2048).build().map_err(|e| e.to_string())?;
    let base = gateway.base.clone();

    // Latency, interleaved in rounds so that drift (caches, the machine's load) hits both.
    nats_latency(&client, 20).await?;
    http_latency(&http, &base, 20).await?;
    let (mut nats_samples, mut http_samples) = (vec![], vec![]);
    let rounds = 10;
    for _ in 0..rounds {
        let n = (opts.jobs / rounds).max(1);
        nats_samples.push(nats_latency(&client, n).await?);
        http_samples.push(http_latency(&http, &base, n).await?);
    }
    // The median of the rounds' p50s and the worst p99.
    let merge = |parts: &[Figures]| -> Figures {
        let count: usize = parts.iter().map(|f| f.count).sum();
        let mut p50s: Vec<f64> = parts.iter().map(|f| f.p50_ms).collect();
        p50s.sort_by(|a, b| a.total_cmp(b));
        let p99 = parts.iter().map(|f| f.p99_ms).fold(0.0, f64::max);
        Figures {
            count,
            p50_ms: p50s[p50s.len() / 2],
            p99_ms: p99,
            per_second: parts.iter().map(|f| f.per_second).sum::<f64>() / parts.len() as f64,
        }
    };
    let nats_latency = merge(&nats_samples);
    let http_latency = merge(&http_samples);
    let [nats_submit, http_submit, nats_replay, http_replay] = halves(&client, &http, &base, opts.jobs.clamp(20, 300)).await?;
    // The HTTP hop alone: a request the gateway answers without NATS.
    let mut hop = vec![];
    let t0 = Instant::now();
    for _ in 0..opts.jobs.clamp(20, 1000) {
        let t = Instant::now();
        http.get(format!("{base}/healthz")).send().await.map_err(|e| e.to_string())?.bytes().await.map_err(|e| e.to_string())?;
        hop.push(t.elapsed());
    }
    let http_hop = figures(hop, t0.elapsed());

    // Fan-out: N clients on one slow job.
    let rss_idle = rss_kib(pid);
    let reply = client
        .submit(&SubmitRequest {
            model: "slow".into(),
            inputs: [("prompt".to_string(), kiln_core::protocol::InputValue::Inline("fan-out".into()))].into(),
            params: serde_json::json!({"steps": 60, "step_ms": 100}).as_object().cloned().unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let job = reply.job_id.clone();
    let connect = Instant::now();
    let mut opened = futures::stream::iter(0..opts.sse_clients)
        .map(|_| http.get(format!("{base}/v1/jobs/{job}/events")).send())
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let sse_connect_ms = connect.elapsed().as_secs_f64() * 1000.0;
    let rss_with = rss_kib(pid);
    let mut readers = vec![];
    for r in opened.drain(..) {
        let r = r.map_err(|e| e.to_string())?;
        readers.push(tokio::spawn(count_events(r)));
    }
    let mut counts = vec![];
    for r in readers {
        counts.push(r.await.map_err(|e| e.to_string())??);
    }
    let expected = Client::events(&client, &job).await.map_err(|e| e.to_string())?.count().await;
    let all_complete = counts.iter().all(|c| *c == expected);

    // Throughput of one large file, both ways, gateway vs the object store directly.
    let data: Vec<u8> = (0..opts.file_bytes).map(|i| (i % 251) as u8).collect();
    let js = client.jetstream().clone();
    let store = js.get_object_store(client.names().files_bucket()).await.map_err(|e| e.to_string())?;
    let t = Instant::now();
    store.put("bench/direct.bin", &mut data.as_slice()).await.map_err(|e| e.to_string())?;
    let direct_up = t.elapsed();
    let t = Instant::now();
    let mut object = store.get("bench/direct.bin").await.map_err(|e| e.to_string())?;
    let mut back = Vec::with_capacity(data.len());
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut back).await.map_err(|e| e.to_string())?;
    let direct_down = t.elapsed();
    if back.len() != data.len() {
        return Err("direct download incomplete".into());
    }
    let t = Instant::now();
    let r = http.put(format!("{base}/v1/files/bench/http.bin")).body(data.clone()).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("upload through the gateway: {}", r.status()));
    }
    let http_up = t.elapsed();
    let t = Instant::now();
    let got = http
        .get(format!("{base}/v1/files/bench/http.bin"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .bytes()
        .await
        .map_err(|e| e.to_string())?;
    let http_down = t.elapsed();
    if got.len() != data.len() || got[..] != data[..] {
        return Err("download through the gateway differs".into());
    }

    drop(gateway);
    node.shutdown(Duration::from_secs(5)).await;
    Ok(HttpBenchReport {
        nats_latency,
        http_latency,
        http_hop,
        nats_submit,
        http_submit,
        nats_replay,
        http_replay,
        sse_clients: opts.sse_clients,
        sse_events_per_client: expected,
        sse_all_complete: all_complete,
        sse_connect_ms,
        gateway_rss_idle_kib: rss_idle,
        gateway_rss_with_clients_kib: rss_with,
        file_bytes: opts.file_bytes,
        direct_upload_mb_s: mb_s(data.len(), direct_up),
        http_upload_mb_s: mb_s(data.len(), http_up),
        direct_download_mb_s: mb_s(data.len(), direct_down),
        http_download_mb_s: mb_s(data.len(), http_down),
    })
}

/// The model of the fan-out job: the demo worker (one progress event per step), so the job
/// runs while every client connects. Run the bench from the repository's root.
fn fan_out_model() -> Result<kiln_core::config::ModelConfig, String> {
    let worker = std::path::Path::new("examples/workers/demo_worker.py");
    let worker =
        worker.canonicalize().map_err(|e| format!("{}: {e} (run kiln bench --http from the repository root)", worker.display()))?;
    let toml = format!(
        "[[models]]\nname = \"slow\"\nengine = {{ kind = \"process\", command = [\"python3\", {:?}] }}\n",
        worker.display().to_string()
    );
    Ok(kiln_core::config::ClusterConfig::from_toml(&toml, "bench").map_err(|e| e.to_string())?.models.remove(0))
}

pub fn print(r: &HttpBenchReport, opts: &HttpBenchOptions) {
    println!("kiln bench --http: the gateway (its own process) against its floors, same nats-server and node");
    println!();
    println!("no-op job, submit -> terminal event ({} each, interleaved)   p50 ms    p99 ms", r.nats_latency.count);
    println!("  NATS: submit, then replay the events       {:>8.3}  {:>8.3}", r.nats_latency.p50_ms, r.nats_latency.p99_ms);
    println!("  HTTP: POST /v1/jobs, then SSE events       {:>8.3}  {:>8.3}", r.http_latency.p50_ms, r.http_latency.p99_ms);
    let added = r.http_latency.p50_ms - r.nats_latency.p50_ms;
    println!("  the gateway adds {added:.3} ms at p50 (goal: at most 0.5 ms): {}", if added <= 0.5 { "met" } else { "NOT met" });
    println!("  the halves:  submit alone, NATS / HTTP        {:>8.3}  {:>8.3}", r.nats_submit.p50_ms, r.http_submit.p50_ms);
    println!("               a finished job's replay, NATS / SSE {:>6.3}  {:>8.3}", r.nats_replay.p50_ms, r.http_replay.p50_ms);
    println!("  one HTTP round trip to the gateway (GET /healthz, no NATS): {:.3} ms at p50", r.http_hop.p50_ms);
    println!();
    println!("SSE fan-out: {} clients on one job", r.sse_clients);
    println!(
        "  every client got all {} events: {}; all connected in {:.0} ms",
        r.sse_events_per_client,
        if r.sse_all_complete { "yes" } else { "NO" },
        r.sse_connect_ms
    );
    println!(
        "  gateway RSS: {:.1} MiB idle, {:.1} MiB with the clients connected ({:.1} KiB per client)",
        r.gateway_rss_idle_kib as f64 / 1024.0,
        r.gateway_rss_with_clients_kib as f64 / 1024.0,
        r.gateway_rss_with_clients_kib.saturating_sub(r.gateway_rss_idle_kib) as f64 / opts.sse_clients.max(1) as f64
    );
    println!();
    println!("one {} MB file                          MB/s", r.file_bytes / 1_000_000);
    println!("  object store put (async-nats)      {:>8.1}", r.direct_upload_mb_s);
    println!(
        "  PUT /v1/files through the gateway  {:>8.1}   {:.0} % (goal >= 80 %)",
        r.http_upload_mb_s,
        100.0 * r.http_upload_mb_s / r.direct_upload_mb_s
    );
    println!("  object store get (async-nats)      {:>8.1}", r.direct_download_mb_s);
    println!(
        "  GET /v1/files through the gateway  {:>8.1}   {:.0} % (goal >= 80 %)",
        r.http_download_mb_s,
        100.0 * r.http_download_mb_s / r.direct_download_mb_s
    );
}
