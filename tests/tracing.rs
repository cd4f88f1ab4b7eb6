//! Traces and logs against real processes: a nats-server, a `kiln node` exporting spans over
//! OTLP/HTTP to a real receiver (tests/otlp_receiver.py, decoding with OpenTelemetry's own
//! protocol package), a `kiln gateway`, and a Python worker on this checkout's SDK. A job
//! submitted over HTTP with a `traceparent` header, one over NATS with the header, and one
//! without: each job's trace must be whole (every span, one trace id, each span under the right
//! parent: the gateway's under the caller's, the submit under it or directly under a NATS
//! caller's, the worker's spans under the node's run). And a node's JSON log lines parse, with
//! the job's id and trace id in the spans they were logged in.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_core::trace::TraceContext;
use serde_json::Value;

/// The OTLP receiver process, killed on drop.
struct Receiver {
    child: Child,
    port: u16,
    spans_path: PathBuf,
}

impl Receiver {
    fn start(dir: &Path) -> Receiver {
        let spans_path = dir.join("spans.jsonl");
        let mut child = Command::new(python_with_nats())
            .arg(repo().join("tests/otlp_receiver.py"))
            .arg(&spans_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python for the OTLP receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok()).unwrap_or_else(|| {
            panic!("the OTLP receiver did not start (is opentelemetry-proto installed? run scripts/setup.sh): {line:?}")
        });
        Receiver { child, port, spans_path }
    }

    fn spans(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.spans_path).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("the receiver writes JSON lines")).collect()
    }

    /// The spans of trace `trace_id`, once every name in `names` is among them (by name).
    async fn trace(&self, trace_id: &str, names: &[&str], limit: Duration) -> BTreeMap<String, Value> {
        let start = Instant::now();
        loop {
            let spans: Vec<Value> = self.spans().into_iter().filter(|s| s["trace_id"] == trace_id).collect();
            let by_name: BTreeMap<String, Value> = spans.iter().map(|s| (s["name"].as_str().unwrap().to_string(), s.clone())).collect();
            if names.iter().all(|n| by_name.contains_key(*n)) {
                return by_name;
            }
            assert!(
                start.elapsed() < limit,
                "trace {trace_id} still lacks {:?} after {limit:?}; it has {:?}; all spans: {:#?}",
                names.iter().filter(|n| !by_name.contains_key(**n)).collect::<Vec<_>>(),
                by_name.keys().collect::<Vec<_>>(),
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker on this checkout's SDK: it opens a span of its own and appends what it saw of the
/// trace (`TRACEPARENT` in its environment, `job.traceparent`) to `$SEEN`, one line per job.
const TINY_WORKER: &str = r#"
import os
from kiln_worker import serve

def run(job):
    with job.span("tiny.inner", note="inside run"):
        with open(os.environ["SEEN"], "a") as f:
            f.write(f"{job.job_id} {os.environ.get('TRACEPARENT', '-')} {job.traceparent or '-'}\n")
        job.write_text("out.txt", "done")

serve(run)
"#;

/// The tiny worker's model (on the venv's Python, which has OpenTelemetry) with one command
/// stage, so the trace has a `kiln.stage` span.
fn traced_model(dir: &Path) -> String {
    let worker = dir.join("tiny_worker.py");
    std::fs::write(&worker, TINY_WORKER).unwrap();
    let sdk = repo().join("python/kiln-worker/src");
    format!(
        r#"
[[models]]
name = "tiny"
engine = {{ kind = "process", command = [{python:?}, {worker:?}], ready_timeout_ms = 30000, env = {{ PYTHONPATH = {sdk:?}, SEEN = {seen:?}, OTEL_BSP_SCHEDULE_DELAY = "100" }} }}
timeout_ms = 30000
max_attempts = 1
[[models.stages]]
kind = "command"
name = "copy"
command = ["cp", "{{input}}", "{{output}}"]
input = "out.txt"
output = "copy.txt"
keep_input = true
"#,
        python = python_with_nats().display().to_string(),
        worker = worker.display().to_string(),
        sdk = sdk.display().to_string(),
        seen = dir.join("seen.txt").display().to_string(),
    )
}

const NODE_SPANS: [&str; 8] =
    ["kiln.queue_wait", "kiln.job", "kiln.claim", "kiln.inputs", "kiln.run", "kiln.stage", "kiln.artifacts", "kiln.terminal_write"];

/// Checks the shape of one job's trace below its submit span; returns the `kiln.run` span id.
fn check_job_trace(spans: &BTreeMap<String, Value>, what: &str) -> String {
    let id = |name: &str| spans[name]["span_id"].as_str().unwrap().to_string();
    let parent = |name: &str| spans[name]["parent_span_id"].as_str().unwrap().to_string();
    let submit = id("kiln.submit");
    assert_eq!(parent("kiln.queue_wait"), submit, "{what}: the queue wait is under the submit");
    assert_eq!(parent("kiln.job"), submit, "{what}: the node's attempt is under the submit");
    let job = id("kiln.job");
    for step in ["kiln.claim", "kiln.inputs", "kiln.run", "kiln.stage", "kiln.artifacts", "kiln.terminal_write"] {
        assert_eq!(parent(step), job, "{what}: {step} is under kiln.job");
    }
    assert_eq!(spans["kiln.stage"]["attributes"]["stage"], "copy", "{what}: the stage span names its stage");
    assert_eq!(parent("kiln.worker.run"), id("kiln.run"), "{what}: the worker's span is under the node's run");
    assert_eq!(parent("tiny.inner"), id("kiln.worker.run"), "{what}: the model's own span is under the SDK's");
    assert_eq!(spans["kiln.worker.run"]["service"], "kiln-worker-tiny");
    assert_eq!(spans["kiln.job"]["service"], "kiln");
    for name in NODE_SPANS {
        let s = &spans[name];
        assert!(s["end_ns"].as_u64() >= s["start_ns"].as_u64(), "{what}: {name} ends after it starts: {s}");
    }
    id("kiln.run")
}

/// What the worker saw of job `job_id`'s trace: (`TRACEPARENT`, `job.traceparent`).
fn seen_by_worker(dir: &Path, job_id: &str) -> (String, String) {
    let text = std::fs::read_to_string(dir.join("seen.txt")).unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with(job_id)).unwrap_or_else(|| panic!("the worker saw no job {job_id}: {text}"));
    let parts: Vec<&str> = line.split(' ').collect();
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_trace_is_whole_from_the_caller_through_the_node_to_the_worker() {
    let mut cluster = TestCluster::new();
    let receiver = Receiver::start(cluster.dir.path());
    let extra = format!(
        "{}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\n[http]\ncors_origins = [\"http://app.example\"]\n",
        traced_model(cluster.dir.path()),
        receiver.port
    );
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &extra);
    // Batches leave every 100 ms instead of 5 s (the SDK's default), so the test waits less.
    cluster.add_node_with_env("n1", &config, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw", &config, &cluster.url());
    let client = cluster.client().await;
    let dir = cluster.dir.path();
    let all: Vec<&str> = ["kiln.submit", "kiln.worker.run", "tiny.inner"].into_iter().chain(NODE_SPANS).collect();

    // 1. Over HTTP, in the caller's trace.
    let (trace1, caller1) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let r = http()
        .post(gateway.url("/v1/jobs"))
        .header("traceparent", format!("00-{trace1}-{caller1}-01"))
        .header("tracestate", "vendor=opaque")
        .header("x-request-id", "req-traced-1")
        .json(&serde_json::json!({"model": "tiny"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-request-id"], "req-traced-1", "the request id comes back");
    let job1 = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();
    let view = wait_terminal(&client, &job1, Duration::from_secs(60)).await;
    assert_eq!(view.status.as_str(), "completed", "{view:?}");
    let with_gateway: Vec<&str> = all.iter().copied().chain(["kiln.http"]).collect();
    let spans = receiver.trace(trace1, &with_gateway, Duration::from_secs(30)).await;
    let http_span = &spans["kiln.http"];
    assert_eq!(http_span["parent_span_id"], caller1, "the gateway's span is under the caller's");
    assert_eq!(http_span["attributes"]["request_id"], "req-traced-1");
    assert_eq!(http_span["attributes"]["path"], "/v1/jobs");
    assert_eq!(spans["kiln.submit"]["parent_span_id"], http_span["span_id"], "the submit is under the gateway's span");
    assert_eq!(spans["kiln.submit"]["attributes"]["job_id"], job1.as_str());
    let run = check_job_trace(&spans, "over HTTP");
    let (env, field) = seen_by_worker(dir, &job1);
    assert_eq!(env, format!("00-{trace1}-{run}-01"), "TRACEPARENT is the node's run span");
    assert_eq!(field, env, "job.traceparent and TRACEPARENT agree");

    // A browser app on another origin may send the headers and read the request id.
    let preflight = http()
        .request(reqwest::Method::OPTIONS, gateway.url("/v1/jobs"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "traceparent,tracestate,x-request-id")
        .send()
        .await
        .unwrap();
    let allowed = preflight.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    for h in ["traceparent", "tracestate", "x-request-id"] {
        assert!(allowed.contains(h), "CORS allows {h}: {allowed}");
    }

    // 2. Over NATS, with the headers on the request.
    let (trace2, caller2) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let context = TraceContext { traceparent: format!("00-{trace2}-{caller2}-01"), tracestate: None };
    let request = kiln_core::protocol::SubmitRequest { model: "tiny".into(), ..Default::default() };
    let job2 = client.submit_traced(&request, Some(&context)).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &job2, Duration::from_secs(60)).await.status.as_str(), "completed");
    let spans = receiver.trace(trace2, &all, Duration::from_secs(30)).await;
    assert_eq!(spans["kiln.submit"]["parent_span_id"], caller2, "the submit is under the caller's span");
    let run = check_job_trace(&spans, "over NATS");
    assert_eq!(seen_by_worker(dir, &job2).0, format!("00-{trace2}-{run}-01"));

    // 3. Without a traceparent: the submit starts the trace, and the job is whole in it.
    let job3 = client.submit(&request).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &job3, Duration::from_secs(60)).await.status.as_str(), "completed");
    let (env3, _) = seen_by_worker(dir, &job3);
    let trace3 = env3.split('-').nth(1).expect("a traceparent").to_string();
    assert_ne!(trace3, trace1);
    assert_ne!(trace3, trace2);
    let spans = receiver.trace(&trace3, &all, Duration::from_secs(30)).await;
    assert_eq!(spans["kiln.submit"]["parent_span_id"], "", "a submit without a caller's trace is its root");
    check_job_trace(&spans, "without a traceparent");

    // Kiln exports its own spans only (not ractor's per-actor `Actor` spans, say), and one
    // trace per job: no span of these jobs leaked into another trace.
    for s in receiver.spans() {
        let name = s["name"].as_str().unwrap();
        assert!(name.starts_with("kiln.") || name == "tiny.inner", "a span that is not Kiln's: {s}");
        let trace = s["trace_id"].as_str().unwrap();
        if s["attributes"]["job_id"] == job1.as_str() {
            assert_eq!(trace, trace1, "{s}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_and_carry_the_jobs_id_and_trace_id() {
    let mut cluster = TestCluster::new();
    let extra = format!("{}\n[log]\nformat = \"json\"\n", traced_model(cluster.dir.path()));
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &extra);
    // RUST_LOG is honoured where KILN_LOG is not set (the harness sets KILN_LOG: emptied here).
    cluster.add_node_with_env("n1", &config, &[("KILN_LOG", ""), ("RUST_LOG", "info,kiln=debug,kiln_actors=debug,async_nats=warn")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let context = TraceContext { traceparent: format!("00-{trace}-10f067aa0ba902b7-01"), tracestate: None };
    let request = kiln_core::protocol::SubmitRequest { model: "tiny".into(), ..Default::default() };
    let job = client.submit_traced(&request, Some(&context)).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &job, Duration::from_secs(60)).await.status.as_str(), "completed");
    // Without export, the worker is handed the caller's context as the record keeps it.
    assert_eq!(seen_by_worker(cluster.dir.path(), &job).0, context.traceparent);

    let log = cluster.nodes[0].log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(line.get(key).is_some(), "no {key} in {line}");
        }
    }
    let in_span = |span: &str, message: &str| {
        lines.iter().find(|l| {
            l["message"] == message
                && l["spans"].as_array().is_some_and(|spans| spans.iter().any(|s| s["name"] == span && s["job_id"] == job.as_str()))
        })
    };
    let claimed = in_span("kiln.job", "attempt claimed").unwrap_or_else(|| panic!("no `attempt claimed` line in kiln.job: {log}"));
    let job_span = claimed["spans"].as_array().unwrap().iter().find(|s| s["name"] == "kiln.job").unwrap();
    assert_eq!(job_span["trace_id"], trace, "{claimed}");
    assert_eq!(job_span["attempt"], 1, "{claimed}");
    let submitted = in_span("kiln.submit", "job submitted").unwrap_or_else(|| panic!("no `job submitted` line in kiln.submit: {log}"));
    assert_eq!(submitted["span"]["trace_id"], trace, "{submitted}");
}

/// A batch's jobs join the trace of the request that submitted it, as a submit's job does: over
/// `/v1/batches` each item's attempt is under the `kiln.submit_batch` span, itself under the
/// gateway's; and a configured seed route's submit (`[[http.routes]]`) carries the caller's
/// trace to its job too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_jobs_and_a_seed_routes_job_join_the_requests_trace() {
    let mut cluster = TestCluster::new();
    let receiver = Receiver::start(cluster.dir.path());
    let route = r#"
[[http.routes]]
method = "POST"
path = "/generate"
kind = "submit"
model = "tiny"
response = { task_id = "$job_id" }
"#;
    let extra =
        format!("{}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\n{route}", traced_model(cluster.dir.path()), receiver.port);
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &extra);
    cluster.add_node_with_env("n1", &config, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw", &config, &cluster.url());
    let client = cluster.client().await;

    // 1. A batch of two over HTTP.
    let (trace1, caller1) = ("6af7651916cd43dd8448eb211c80319d", "c7ad6b7169203332");
    let r = http()
        .post(gateway.url("/v1/batches"))
        .header("traceparent", format!("00-{trace1}-{caller1}-01"))
        .json(&serde_json::json!({"model": "tiny", "items": [{}, {}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let batch: Value = r.json().await.unwrap();
    let jobs: Vec<String> = batch["items"].as_array().unwrap().iter().map(|i| i["job_id"].as_str().unwrap().to_string()).collect();
    for job in &jobs {
        assert_eq!(wait_terminal(&client, job, Duration::from_secs(60)).await.status.as_str(), "completed");
    }
    let spans = receiver.trace(trace1, &["kiln.http", "kiln.submit_batch", "kiln.job", "kiln.worker.run"], Duration::from_secs(30)).await;
    assert_eq!(spans["kiln.http"]["parent_span_id"], caller1, "the gateway's span is under the caller's");
    let submit = &spans["kiln.submit_batch"];
    assert_eq!(submit["parent_span_id"], spans["kiln.http"]["span_id"], "the batch's submit is under the gateway's span");
    assert_eq!(submit["attributes"]["batch_id"], batch["batch_id"], "{submit}");
    // Both items' attempts and queue waits, each under the batch's submit, in this one trace.
    let in_trace =
        |name: &str| -> Vec<Value> { receiver.spans().into_iter().filter(|s| s["trace_id"] == trace1 && s["name"] == name).collect() };
    let all_there = eventually(Duration::from_secs(30), || {
        let n = in_trace("kiln.job").len().min(in_trace("kiln.queue_wait").len()).min(in_trace("kiln.worker.run").len());
        async move { n >= 2 }
    })
    .await;
    assert!(all_there, "both items' spans in the batch's trace: {:#?}", receiver.spans());
    for name in ["kiln.job", "kiln.queue_wait"] {
        let spans = in_trace(name);
        let mut of_jobs: Vec<&str> = spans.iter().map(|s| s["attributes"]["job_id"].as_str().unwrap_or("")).collect();
        of_jobs.sort();
        let mut expected: Vec<&str> = jobs.iter().map(String::as_str).collect();
        expected.sort();
        assert_eq!(of_jobs, expected, "{name}: one per item: {spans:#?}");
        assert!(spans.iter().all(|s| s["parent_span_id"] == submit["span_id"]), "{name} under kiln.submit_batch: {spans:#?}");
    }

    // 2. A seed route's submit.
    let (trace2, caller2) = ("7af7651916cd43dd8448eb211c80319e", "d7ad6b7169203333");
    let r = http()
        .post(gateway.url("/generate"))
        .header("traceparent", format!("00-{trace2}-{caller2}-01"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the route answers as the seed did");
    let job = r.json::<Value>().await.unwrap()["task_id"].as_str().expect("the route's task_id").to_string();
    assert_eq!(wait_terminal(&client, &job, Duration::from_secs(60)).await.status.as_str(), "completed");
    let all: Vec<&str> = ["kiln.http", "kiln.submit", "kiln.worker.run", "tiny.inner"].into_iter().chain(NODE_SPANS).collect();
    let spans = receiver.trace(trace2, &all, Duration::from_secs(30)).await;
    assert_eq!(spans["kiln.http"]["attributes"]["path"], "/generate");
    assert_eq!(spans["kiln.submit"]["parent_span_id"], spans["kiln.http"]["span_id"], "the route's submit is under the gateway's span");
    assert_eq!(spans["kiln.submit"]["attributes"]["job_id"], job.as_str());
    check_job_trace(&spans, "over a seed route");
}
