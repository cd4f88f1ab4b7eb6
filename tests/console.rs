//! The web console in a real headless chromium against real processes: a nats-server, `kiln
//! node`s with the demo worker and a `kiln gateway`, driven by the scripts in tests/browser/
//! (puppeteer-core). Needs what `scripts/setup.sh` installs and `scripts/env.sh` exports
//! (KILN_CHROMIUM, KILN_NODE_MODULES); without them the tests fail, saying so.
//!
//! `KILN_CONSOLE_SCREENSHOTS=<dir>` copies the job page and overview screenshots of a passing
//! run there (docs/console-job.png and docs/console-overview.png come from such a run; the
//! attempts, jobs list and submit form ones from `console_shows_attempts_...`, docs/console-queue.png
//! from `console_queue_page_...`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// A driver's own watchdog ends it with a JSON line after 150 s; this is the margin on top.
const DRIVER_LIMIT: Duration = Duration::from_secs(170);

/// One browser at a time: two chromiums and their clusters on a loaded 2-core machine make
/// every timing worse for no gain.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fails, naming the fix, when the browser tools are missing: these tests never skip.
fn require_browser_tools() {
    const FIX: &str = "run scripts/setup.sh (it installs Debian's chromium and puppeteer-core), then `source scripts/env.sh`";
    let chromium = std::env::var("KILN_CHROMIUM").unwrap_or_else(|_| panic!("KILN_CHROMIUM is not set: {FIX}"));
    assert!(Path::new(&chromium).is_file(), "KILN_CHROMIUM={chromium} does not exist: {FIX}");
    let modules = std::env::var("KILN_NODE_MODULES").unwrap_or_else(|_| panic!("KILN_NODE_MODULES is not set: {FIX}"));
    let puppeteer = Path::new(&modules).join("puppeteer-core/package.json");
    assert!(puppeteer.is_file(), "no puppeteer-core in KILN_NODE_MODULES={modules} ({} is missing): {FIX}", puppeteer.display());
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(node.as_ref().is_ok_and(|o| o.status.success()), "`node --version` failed ({node:?}): {FIX}");
}

/// A running driver script (`node tests/browser/<script> ..`) in its own process group, which
/// is killed, chromium included, should the test give up on it.
struct Driver {
    script: String,
    child: tokio::process::Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
    deadline: Instant,
}

impl Driver {
    fn start(script: &str, args: &[&str]) -> Driver {
        let path = repo().join("tests/browser").join(script);
        let mut child = tokio::process::Command::new("node")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node {}: {e}", path.display()));
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            text
        });
        Driver { script: script.into(), child, stdout, stderr, deadline: Instant::now() + DRIVER_LIMIT }
    }

    /// The next JSON line on its stdout; None at its end. Other lines are printed and skipped.
    async fn next(&mut self) -> Option<Value> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let line = match tokio::time::timeout(left, self.stdout.next_line()).await {
                Ok(line) => line.expect("driver stdout"),
                Err(_) => {
                    self.kill();
                    let stderr = self.stderr().await;
                    panic!("{} gave no result within {DRIVER_LIMIT:?}; stderr:\n{stderr}", self.script);
                }
            }?;
            match serde_json::from_str(&line) {
                Ok(v) => return Some(v),
                Err(_) => println!("{}: {line}", self.script),
            }
        }
    }

    /// Reads to the end: the last JSON line, the exit status and stderr.
    async fn finish(mut self) -> (Option<Value>, ExitStatus, String) {
        let mut last = None;
        while let Some(v) = self.next().await {
            last = Some(v);
        }
        let left = self.deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        let status = match tokio::time::timeout(left, self.child.wait()).await {
            Ok(status) => status.expect("wait for the driver"),
            Err(_) => {
                self.kill();
                let stderr = self.stderr().await;
                panic!("{} closed its stdout but did not exit; stderr:\n{stderr}", self.script);
            }
        };
        let stderr = self.stderr().await;
        (last, status, stderr)
    }

    async fn stderr(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(5), &mut self.stderr).await.ok().and_then(Result::ok).unwrap_or_default()
    }

    fn kill(&mut self) {
        // Only while it runs: once reaped, its id (and group) may belong to someone else.
        if let Some(pid) = self.child.id() {
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Panics with the driver's failure report (step, error, page) unless it succeeded.
fn expect_success(script: &str, out_dir: &Path, result: &Option<Value>, status: ExitStatus, stderr: &str) -> Value {
    let Some(v) = result.as_ref().filter(|v| status.success() && v.get("error").is_none()) else {
        let failure = out_dir.join("failure.png");
        panic!(
            "{script} failed ({status})\n  step: {}\n  error: {}\n  url: {}\n  console errors: {}\n  page: {}\n  screenshot: {}\n  stderr:\n{stderr}",
            field(result, "step"),
            field(result, "error"),
            field(result, "url"),
            field(result, "console_errors"),
            field(result, "html"),
            if failure.exists() { failure.display().to_string() } else { "none".into() },
        );
    };
    v.clone()
}

fn field(v: &Option<Value>, key: &str) -> String {
    match v.as_ref().and_then(|v| v.get(key)) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "-".into(),
    }
}

/// Width and height of a PNG, checking its signature and IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    png_size_of(&data).unwrap_or_else(|| panic!("{} is not a PNG ({} bytes)", path.display(), data.len()))
}

fn png_size_of(data: &[u8]) -> Option<(u32, u32)> {
    if data.len() < 24 || &data[..8] != b"\x89PNG\r\n\x1a\n" || &data[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
    Some((be(16), be(20)))
}

/// Copies a passing run's screenshots to `KILN_CONSOLE_SCREENSHOTS`, when set.
fn keep_screenshots(shots: &[(&Path, &str)]) {
    let Some(dir) = std::env::var_os("KILN_CONSOLE_SCREENSHOTS").map(PathBuf::from) else { return };
    std::fs::create_dir_all(&dir).unwrap();
    for (from, name) in shots {
        let to = dir.join(name);
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
        println!("kept {}", to.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_submits_a_job_and_shows_its_progress_and_image() {
    require_browser_tools();
    let _one_browser = BROWSER.lock().await;
    let mut cluster = TestCluster::new();
    // The checkout's SDK: the demo worker's live previews need it.
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &with_checkout_sdk(&demo_model("demo", &[], 3, 60_000)));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 2).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gateway", &config, &cluster.url());
    let out_dir = cluster.dir.path().join("browser");

    let started = Instant::now();
    let driver = Driver::start("console.mjs", &[&gateway.base, "demo", "a red fox in fresh snow", out_dir.to_str().unwrap()]);
    let (result, status, stderr) = driver.finish().await;
    let r = expect_success("console.mjs", &out_dir, &result, status, &stderr);
    println!("console.mjs took {:?}: {r}", started.elapsed());

    assert_eq!(r["status"], "completed", "{r}");
    let seen: Vec<f64> = r["progress_seen"].as_array().expect("progress_seen").iter().map(|v| v.as_f64().expect("a number")).collect();
    assert!(!seen.is_empty(), "no progress seen: {r}");
    assert!(seen[1..].windows(2).all(|w| w[0] <= w[1]), "the progress bar went back: {seen:?}");
    let mut moving: Vec<f64> = seen.iter().copied().filter(|p| *p > 0.0 && *p < 100.0).collect();
    moving.dedup();
    assert!(moving.len() >= 2, "the bar did not move through at least two values between 0 and 100: {seen:?}");
    assert_eq!(r["final_progress"].as_f64(), Some(100.0), "{r}");
    // The demo worker's default size (examples/workers/demo_worker.py: width, height 64).
    assert_eq!(r["image_natural_width"], 64, "{r}");
    // The live preview updated while the job ran (8 steps of 150 ms, one per 500 ms: the demo
    // worker's 32x32 step images), newest last.
    let previews: Vec<(u64, u64)> = r["previews_seen"]
        .as_array()
        .expect("previews_seen")
        .iter()
        .map(|p| (p["seq"].as_u64().expect("seq"), p["width"].as_u64().expect("width")))
        .collect();
    assert!(!previews.is_empty(), "the job page showed no live preview: {r}");
    assert!(previews.windows(2).all(|w| w[0].0 < w[1].0) && previews.iter().all(|p| p.1 == 32), "{previews:?}");
    assert_eq!(r["console_errors"], serde_json::json!([]), "the page logged errors: {r}");

    let shots: Vec<PathBuf> =
        r["screenshots"].as_array().expect("screenshots").iter().map(|v| PathBuf::from(v.as_str().expect("a path"))).collect();
    assert_eq!(shots.len(), 2, "{r}");
    for shot in &shots {
        assert!(shot.starts_with(&out_dir), "{} is not under {}", shot.display(), out_dir.display());
        let (w, h) = png_size(shot);
        assert!(w >= 1280 && h >= 900, "{}: {w}x{h}", shot.display());
        println!("screenshot: {} ({w}x{h})", shot.display());
    }

    // The REST API agrees: completed, with the image the page previewed.
    let job_id = r["job_id"].as_str().expect("job_id");
    let http = http();
    let job: Value =
        http.get(gateway.url(&format!("/v1/jobs/{job_id}"))).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    assert_eq!(job["status"], "completed", "{job:#}");
    let image = job["artifacts"].as_array().and_then(|a| a.iter().find(|a| a["name"] == "image.png"));
    let image = image.unwrap_or_else(|| panic!("no image.png artifact: {job:#}"));
    assert_eq!(image["content_type"], "image/png", "{job:#}");
    let png = http.get(gateway.url(&format!("/v1/jobs/{job_id}/artifacts/image.png"))).send().await.unwrap().error_for_status().unwrap();
    let png = png.bytes().await.unwrap();
    assert_eq!(Some(png.len() as u64), image["size"].as_u64(), "{job:#}");
    assert_eq!(png_size_of(&png), Some((64, 64)), "the artifact is a 64x64 PNG");

    keep_screenshots(&[(&shots[0], "console-job.png"), (&shots[1], "console-overview.png")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_overview_shows_nodes_joining_without_a_reload() {
    require_browser_tools();
    let _one_browser = BROWSER.lock().await;
    let mut cluster = TestCluster::new();
    let model = demo_model("demo", &[], 3, 60_000);
    let n1 = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &model);
    let n2 = config_toml(&cluster.url(), &["cpu:0", "cpu:1", "cpu:2"], 10_000, &model);
    cluster.add_node("n1", &n1);
    cluster.wait_node_ready("n1", 2).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gateway", &n1, &cluster.url());
    let out_dir = cluster.dir.path().join("browser");

    let started = Instant::now();
    let mut driver = Driver::start("overview.mjs", &[&gateway.base, out_dir.to_str().unwrap(), "n1=2", "n1=2,n2=3"]);

    // n1's slots, one row each, idle (no job has run).
    let first = driver.next().await;
    let Some(first) = first.clone().filter(|v| v["phase"] == 0) else {
        let (rest, status, stderr) = driver.finish().await;
        expect_success("overview.mjs", &out_dir, &rest.or(first), status, &stderr);
        unreachable!("overview.mjs ended before its first phase without an error");
    };
    println!("overview.mjs phase 0 after {:?}: {first}", started.elapsed());
    assert_eq!(slots_shown(&first), [("n1", "cpu:0", "idle"), ("n1", "cpu:1", "idle")].map(own), "{first}");
    assert_badges_match(&first);

    // A second node joins while the page stays open.
    cluster.add_node("n2", &n2);
    cluster.wait_node_ready("n2", 3).await;
    let (result, status, stderr) = driver.finish().await;
    let r = expect_success("overview.mjs", &out_dir, &result, status, &stderr);
    println!("overview.mjs took {:?}: {r}", started.elapsed());
    assert_eq!(r["done"], true, "{r}");
    let want = [("n1", "cpu:0"), ("n1", "cpu:1"), ("n2", "cpu:0"), ("n2", "cpu:1"), ("n2", "cpu:2")];
    let shown: Vec<_> = slots_shown(&r).into_iter().map(|(n, s, _)| (n, s)).collect();
    assert_eq!(shown, want.map(|(n, s)| (n.to_string(), s.to_string())), "{r}");
    for (node, slot, state) in slots_shown(&r) {
        assert!(["idle", "loading", "busy", "restarting", "draining", "dead"].contains(&state.as_str()), "{node}/{slot}: {state}");
    }
    assert_badges_match(&r);
    assert_eq!(r["same_document"], true, "the page was reloaded: {r}");
    assert_eq!(r["same_table"], true, "the overview was rendered anew instead of updated: {r}");
    assert_eq!(r["main_frame_navigations"], 0, "{r}");
    assert_eq!(r["console_errors"], serde_json::json!([]), "the page logged errors: {r}");
    for shot in r["screenshots"].as_array().expect("screenshots") {
        let shot = Path::new(shot.as_str().expect("a path"));
        let (w, h) = png_size(shot);
        println!("screenshot: {} ({w}x{h})", shot.display());
    }

    // The REST API lists the same slots.
    let view: Value = http().get(gateway.url("/v1/cluster")).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    let mut listed: Vec<(String, String)> = view["gpus"]
        .as_array()
        .expect("gpus")
        .iter()
        .map(|g| (g["node"].as_str().unwrap().to_string(), g["slot"].as_str().unwrap().to_string()))
        .collect();
    listed.sort();
    assert_eq!(listed, shown, "{view:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_page_of_a_completed_job_keeps_its_bar_at_100() {
    require_browser_tools();
    let _one_browser = BROWSER.lock().await;
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gateway", &config, &cluster.url());
    let out_dir = cluster.dir.path().join("browser");

    // A job that is over before its page is opened (as when one is picked from the overview).
    let http = http();
    let request =
        serde_json::json!({"model": "demo", "inputs": {"prompt": "a red fox in fresh snow"}, "params": {"steps": 8, "step_ms": 50}});
    let reply: Value =
        http.post(gateway.url("/v1/jobs")).json(&request).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    let job_id = reply["job_id"].as_str().unwrap_or_else(|| panic!("no job_id: {reply}")).to_string();
    let url = gateway.url(&format!("/v1/jobs/{job_id}"));
    let completed = eventually(Duration::from_secs(60), || async {
        let job: Option<Value> = match http.get(&url).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        job.is_some_and(|j| j["status"] == "completed")
    })
    .await;
    assert!(completed, "job {job_id} did not complete within 60 s");

    let started = Instant::now();
    let driver = Driver::start("job.mjs", &[&gateway.base, &job_id, out_dir.to_str().unwrap()]);
    let (result, status, stderr) = driver.finish().await;
    let r = expect_success("job.mjs", &out_dir, &result, status, &stderr);
    println!("job.mjs took {:?}: {r}", started.elapsed());
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["final_progress"].as_f64(), Some(100.0), "{r}");
    assert_eq!(r["console_errors"], serde_json::json!([]), "the page logged errors: {r}");
    // The page knows from its first fetch that the job is complete (100%); the replay of the
    // job's events must not take the bar back through the old progress values.
    let changes: Vec<f64> = r["progress_changes"].as_array().expect("progress_changes").iter().filter_map(Value::as_f64).collect();
    assert!(
        changes.iter().all(|p| *p == 100.0),
        "the page of a completed job moved its progress bar back from 100 to replay the job's history: {changes:?} \
         (src/gateway/console/app.js renderJob: applyJob's setStatus('completed') sets 100, then the event stream's \
         replayed progress events reach setProgress, which, unlike setStatus, has no guard for a terminal job); \
         screenshot {}",
        r["screenshot"]
    );
}

/// (node, slot, state) of each row a driver line reports, in page order.
fn slots_shown(v: &Value) -> Vec<(String, String, String)> {
    let s = |r: &Value, k: &str| r[k].as_str().unwrap_or_else(|| panic!("row without {k}: {r}")).to_string();
    v["rows"].as_array().expect("rows").iter().map(|r| (s(r, "node"), s(r, "slot"), s(r, "state"))).collect()
}

/// Each state cell's badge is styled for its state.
fn assert_badges_match(v: &Value) {
    for r in v["rows"].as_array().expect("rows") {
        let class = r["badge_class"].as_str().unwrap_or("");
        let state = r["state"].as_str().unwrap_or("");
        assert!(class.split_whitespace().any(|c| c == format!("state-{state}")), "badge {class:?} for state {state:?}: {r}");
    }
}

fn own((node, slot, state): (&str, &str, &str)) -> (String, String, String) {
    (node.into(), slot.into(), state.into())
}

/// Submits a job over HTTP; its id.
async fn submit_job(http: &reqwest::Client, gateway: &GatewayProcess, body: Value) -> String {
    let reply: Value =
        http.post(gateway.url("/v1/jobs")).json(&body).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    reply["job_id"].as_str().unwrap_or_else(|| panic!("no job_id: {reply}")).to_string()
}

/// A job's view over HTTP; None while the gateway does not answer with one.
async fn job_view(http: &reqwest::Client, gateway: &GatewayProcess, id: &str) -> Option<Value> {
    http.get(gateway.url(&format!("/v1/jobs/{id}"))).send().await.ok()?.json::<Value>().await.ok()
}

/// A model that declares its params (the demo worker's own), so the submit form offers them.
fn declared_demo(name: &str) -> String {
    format!(
        r#"{}params = [
  {{ name = "steps", kind = "int", min = 1, max = 1000, default = 5 }},
  {{ name = "step_ms", kind = "float", min = 0, max = 60000, default = 100 }},
  {{ name = "seed", kind = "int", default = 0 }},
  {{ name = "sampler", kind = "str", choices = ["euler", "ddim"], default = "euler" }},
  {{ name = "preview", kind = "bool", default = false }},
  {{ name = "crash_on_attempts", kind = "any" }},
]
"#,
        demo_model(name, &[], 3, 60_000)
    )
}

/// Issue 23 items 7 and 16: the job page shows each attempt (its time and how it ended, with
/// the reason of the retry), the whole job's time, a timeline whose progress ticks collapse,
/// the job's inputs and labels; the jobs list shows stage and progress, labels, a bounded
/// page with "Show more", and the queued count per model; the submit form offers the model's
/// declared params as typed fields and sets labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_attempts_progress_paging_labels_and_params() {
    require_browser_tools();
    let _one_browser = BROWSER.lock().await;
    let mut cluster = TestCluster::new();
    // One slot: the long job runs while the later ones queue behind it.
    // "studio" is the same worker taking an image too: its form has a file field.
    let studio = declared_demo("studio").replace(r#"required_inputs = ["prompt"]"#, r#"required_inputs = ["prompt", "image"]"#);
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &format!("{}{studio}", declared_demo("demo")));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gateway", &config, &cluster.url());
    let out_dir = cluster.dir.path().join("browser");
    let http = http();
    let submit = |body: Value| submit_job(&http, &gateway, body);

    // A job whose worker crashes on attempt 1: attempt 2 completes it.
    let retried = submit(serde_json::json!({"model": "demo", "inputs": {"prompt": "a red fox"}, "labels": {"user": "bo"},
        "params": {"steps": 12, "step_ms": 30, "crash_on_attempts": [1]}}))
    .await;
    let done = eventually(Duration::from_secs(60), || async {
        job_view(&http, &gateway, &retried).await.is_some_and(|j| j["status"] == "completed")
    })
    .await;
    assert!(done, "job {retried} did not complete: {:?}", job_view(&http, &gateway, &retried).await);
    // More jobs than a page, then a long one that runs and three queued behind it.
    for i in 0..24 {
        submit(serde_json::json!({"model": "demo", "inputs": {"prompt": format!("p{i}")}, "labels": {"run": "fill"}, "params": {"steps": 1, "step_ms": 0}})).await;
    }
    let long = submit(serde_json::json!({"model": "demo", "inputs": {"prompt": "long"}, "params": {"steps": 400, "step_ms": 250}})).await;
    for i in 0..3 {
        submit(serde_json::json!({"model": "demo", "inputs": {"prompt": format!("q{i}")}, "params": {"steps": 1, "step_ms": 0}})).await;
    }
    let running =
        eventually(Duration::from_secs(60), || async { job_view(&http, &gateway, &long).await.is_some_and(|j| j["status"] == "running") })
            .await;
    assert!(running, "the long job never ran");

    let started = Instant::now();
    let driver = Driver::start("history.mjs", &[&gateway.base, &retried, "studio", out_dir.to_str().unwrap()]);
    let (result, status, stderr) = driver.finish().await;
    let r = expect_success("history.mjs", &out_dir, &result, status, &stderr);
    println!("history.mjs took {:?}: {r}", started.elapsed());
    let shots: Vec<PathBuf> =
        r["screenshots"].as_array().expect("screenshots").iter().map(|v| PathBuf::from(v.as_str().unwrap())).collect();
    keep_screenshots(&[(&shots[0], "console-attempts.png"), (&shots[1], "console-jobs.png"), (&shots[2], "console-submit.png")]);
    assert_eq!(r["console_errors"], serde_json::json!([]), "the page logged errors: {r}");

    // a. Each attempt, how it ended and why the next one ran; the whole job's time.
    let attempts = r["attempts"].as_array().expect("attempts");
    let summary: Vec<(u64, &str, &str)> = attempts
        .iter()
        .map(|a| (a["attempt"].as_u64().unwrap(), a["outcome"].as_str().unwrap(), a["reason"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(summary, [(1, "failed", "worker_crashed"), (2, "completed", "")], "{r}");
    assert!(attempts.iter().all(|a| !a["time"].as_str().unwrap_or("").is_empty()), "every attempt shows its time: {r}");
    let view = job_view(&http, &gateway, &retried).await.expect("the job's view");
    let total = view["finished_ms"].as_u64().unwrap() - view["created_ms"].as_u64().unwrap();
    assert_eq!(r["total_ms"].as_u64(), Some(total), "the whole job's time, from submission to end: {r}");
    let timeline = r["timeline"].as_array().expect("timeline");
    let retrying: Vec<&Value> = timeline.iter().filter(|e| e["type"] == "retrying").collect();
    assert_eq!(retrying.len(), 1, "{r}");
    assert_eq!(retrying[0]["reason"], "worker_crashed", "{r}");
    assert_eq!(retrying[0]["attempt"], "2", "{r}");
    // 12 inference ticks in attempt 2 (and at most 1 in attempt 1) fold into a few rows.
    let progress_rows: Vec<&Value> = timeline.iter().filter(|e| e["type"] == "progress").collect();
    let ticks: u64 = progress_rows.iter().map(|e| e["ticks"].as_u64().unwrap()).sum();
    assert!(ticks >= 12, "every tick is counted: {r}");
    assert!(progress_rows.len() <= 6, "consecutive progress ticks collapse (stages preparing, inference, encoding per attempt): {r}");
    let same_row = |a: &Value, b: &Value| {
        a["type"] == "progress" && b["type"] == "progress" && a["attempt"] == b["attempt"] && a["stage"] == b["stage"]
    };
    assert!(!timeline.windows(2).any(|w| same_row(&w[0], &w[1])), "two rows for one run of ticks: {r}");
    let inputs = r["inputs"].as_array().expect("inputs");
    assert_eq!(inputs.len(), 1, "{r}");
    assert_eq!((inputs[0]["name"].as_str(), inputs[0]["value"].as_str()), (Some("prompt"), Some("a red fox")), "{r}");
    assert_eq!(r["job_labels"], serde_json::json!(["user=bo"]), "{r}");

    // b. The list: a bounded page with more, progress of the running job, labels, queued count.
    let list = &r["list"];
    assert_eq!(list["rows"], 20, "one page of 20 jobs: {r}");
    assert_eq!(list["more_visible"], true, "{r}");
    assert!(list["rows_after_more"].as_u64().unwrap() > 20, "{r}");
    // One line per job: 20 rows, the cluster and the models fit in well under 2,000 px (the
    // list without paging was 3,100 px after 60 jobs).
    assert!(list["page_height"].as_u64().unwrap() < 1_800, "the page stays bounded: {r}");
    let progress = list["progress"].as_array().expect("progress");
    assert!(
        progress.iter().any(|p| p["job_id"] == long.as_str() && p["stage"] == "inference" && p["progress"].as_f64().unwrap() > 0.0),
        "{r}"
    );
    assert!(list["labels"].as_array().unwrap().iter().any(|l| l == "run=fill"), "{r}");
    assert!(list["queued"]["demo"].as_u64().unwrap() >= 1, "{r}");

    // c. The form: typed fields with defaults; the submitted job has them and the labels.
    let fields: Vec<(String, String, Value)> = r["form"]["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f["type"].as_str().unwrap().to_string(), f["value"].clone()))
        .collect();
    let field = |name: &str| fields.iter().find(|f| f.0 == name).unwrap_or_else(|| panic!("no field {name}: {r}")).clone();
    assert_eq!(field("steps"), ("steps".into(), "number".into(), Value::from("5")), "{r}");
    assert_eq!(field("sampler"), ("sampler".into(), "select".into(), Value::from("euler")), "{r}");
    assert_eq!(field("preview"), ("preview".into(), "checkbox".into(), Value::from(false)), "{r}");
    assert_eq!(field("crash_on_attempts").1, "text", "{r}");
    let submitted = r["form"]["submitted_job_id"].as_str().expect("submitted job").to_string();
    assert_eq!(r["form"]["submitted_labels"], serde_json::json!(["session=s-7", "user=ada"]), "{r}");
    let job = job_view(&http, &gateway, &submitted).await.expect("the submitted job");
    assert_eq!(job["params"]["steps"], 3, "{job:#}");
    assert_eq!(job["params"]["sampler"], "euler", "{job:#}");
    assert_eq!(job["labels"], serde_json::json!({"user": "ada", "session": "s-7"}), "{job:#}");
    // The file was uploaded and the job names it; the page links it and previews it.
    let object = job["inputs"]["image"]["object"].as_str().unwrap_or_else(|| panic!("no uploaded image input: {job:#}"));
    let image = &r["form"]["submitted_image"];
    assert_eq!(image["object"], object, "{r}");
    assert_eq!(image["width"], 1, "the 1x1 PNG previewed: {r}");
    assert!(image["link"].as_str().is_some_and(|l| l.starts_with("/v1/files/uploads/")), "{r}");
    for shot in r["screenshots"].as_array().expect("screenshots") {
        let shot = Path::new(shot.as_str().expect("a path"));
        let (w, h) = png_size(shot);
        println!("screenshot: {} ({w}x{h})", shot.display());
    }
}

/// Issue 26 item 3: the console shows the queue live, per model, from `GET /v1/queue`. One slot
/// runs a long job while five wait behind it, two in the high lane and three in the normal one;
/// the overview counts them beside the model and the queue page shows each figure, then, once
/// the long job is cancelled and the five run, updates itself to an empty queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_queue_page_shows_each_lane_live_until_it_drains() {
    require_browser_tools();
    let _one_browser = BROWSER.lock().await;
    let mut cluster = TestCluster::new();
    // A long timeout: the long job must run until the test cancels it.
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 600_000));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gateway", &config, &cluster.url());
    let out_dir = cluster.dir.path().join("browser");
    let http = http();
    let submit = |body: Value| submit_job(&http, &gateway, body);
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;

    // 150 s of steps: it holds the only slot until cancelled.
    let long = submit(serde_json::json!({"model": "demo", "inputs": {"prompt": "long"}, "params": {"steps": 600, "step_ms": 250}})).await;
    let running =
        eventually(Duration::from_secs(60), || async { job_view(&http, &gateway, &long).await.is_some_and(|j| j["status"] == "running") })
            .await;
    assert!(running, "the long job never ran: {:?}", job_view(&http, &gateway, &long).await);
    // The oldest waiting job is the first of these: its wait is bounded by its submit's times.
    let normal_job = |i: usize| {
        serde_json::json!({"model": "demo", "inputs": {"prompt": format!("n{i}")}, "labels": {"user_id": "ada"},
            "params": {"steps": 1, "step_ms": 0}})
    };
    let before_first = now_ms();
    let mut waiting = vec![submit(normal_job(0)).await];
    let after_first = now_ms();
    for i in 1..3 {
        waiting.push(submit(normal_job(i)).await);
    }
    for i in 0..2 {
        waiting.push(
            submit(serde_json::json!({"model": "demo", "inputs": {"prompt": format!("h{i}")}, "labels": {"user_id": "bo"},
                "priority": 5, "params": {"steps": 1, "step_ms": 0}}))
            .await,
        );
    }

    let started = Instant::now();
    let mut driver = Driver::start(
        "queue.mjs",
        &[
            &gateway.base,
            "demo",
            out_dir.to_str().unwrap(),
            // Nothing finished yet, so each queued job counts as a slot of its own: 1 + 5.
            "high=2,normal=3,queued=5,running=1,slots=1,busy=1,desired=6",
            "high=0,normal=0,queued=0,running=0,desired=0",
        ],
    );
    let first = driver.next().await;
    let Some(first) = first.clone().filter(|v| v["phase"] == 0) else {
        let (rest, status, stderr) = driver.finish().await;
        expect_success("queue.mjs", &out_dir, &rest.or(first), status, &stderr);
        unreachable!("queue.mjs ended before its first phase without an error");
    };
    println!("queue.mjs phase 0 after {:?}: {first}", started.elapsed());
    let row = &first["row"];
    // The long job runs in the normal lane (priority 0); nothing runs in the high one.
    assert_eq!(row["high_running"], Value::Null, "{first}");
    assert_eq!(row["normal_running"], "· 1 running", "{first}");
    let measured = first["measured_ms"].as_u64().expect("measured_ms");
    assert!(first["measured_text"].as_str().is_some_and(|t| t.starts_with("measured ")), "{first}");
    let oldest = row["oldest_ms"].as_u64().unwrap_or_else(|| panic!("no oldest wait shown: {first}"));
    // One second of slack either way: the stream's clock and the node's are this machine's.
    let (earliest, latest) = (measured.saturating_sub(after_first + 1_000), measured - before_first + 1_000);
    assert!((earliest..=latest).contains(&oldest), "oldest wait {oldest} ms, not within [{earliest}, {latest}]: {first}");
    assert!(!["", "—"].contains(&row["oldest_text"].as_str().unwrap_or("")), "{first}");
    assert_eq!(row["mean_text"], "—", "no job of the model finished yet: {first}");

    // The API says the same now (the queue stands still until the cancel below), keys included
    // when the reply has them: the top 10 of each lane by queued.
    let api: Value = http.get(gateway.url("/v1/queue")).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    let model = api["models"].as_array().expect("models").iter().find(|m| m["model"] == "demo").unwrap_or_else(|| panic!("{api:#}"));
    let lane = |name: &str| model["lanes"].as_array().unwrap().iter().find(|l| l["lane"] == name).cloned().unwrap_or_default();
    let from_api = serde_json::json!({"queued": model["queued"], "high": lane("high")["queued"], "normal": lane("normal")["queued"],
        "running": model["running"], "slots": model["slots"], "busy": model["busy_slots"], "desired": model["desired_slots"]});
    let on_page = serde_json::json!({"queued": row["queued"], "high": row["high"], "normal": row["normal"],
        "running": row["running"], "slots": row["slots"], "busy": row["busy"], "desired": row["desired"]});
    assert_eq!(on_page, from_api, "the page against {api:#}");
    // A key as shown: its value, "" for the jobs without one (null in the reply).
    let key_of = |k: &Value| k["key"].as_str().unwrap_or("").to_string();
    for name in ["high", "normal"] {
        let mut keys: Vec<Value> = lane(name)["keys"].as_array().cloned().unwrap_or_default();
        keys.sort_by(|a, b| {
            let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
            n(b, "queued").cmp(&n(a, "queued")).then(n(b, "running").cmp(&n(a, "running"))).then(key_of(a).cmp(&key_of(b)))
        });
        let want: Vec<String> = keys.iter().take(10).map(key_of).collect();
        let on_page: Vec<String> = row["keys"][name]["keys"].as_array().map(|ks| ks.iter().map(key_of).collect()).unwrap_or_default();
        assert_eq!(on_page, want, "lane {name}'s keys against {api:#}: {first}");
    }

    // The long job goes; the five run on its slot and the page follows without a reload.
    http.post(gateway.url(&format!("/v1/jobs/{long}/cancel"))).send().await.unwrap().error_for_status().unwrap();
    let (result, status, stderr) = driver.finish().await;
    let r = expect_success("queue.mjs", &out_dir, &result, status, &stderr);
    println!("queue.mjs took {:?}: {r}", started.elapsed());
    assert_eq!(r["done"], true, "{r}");
    assert_eq!(r["overview_queued"], 5, "the overview's count beside the model: {r}");
    assert_eq!(r["row"]["oldest_ms"], Value::Null, "{r}");
    assert_eq!(r["row"]["oldest_text"], "—", "{r}");
    assert_eq!(r["same_document"], true, "the page was reloaded: {r}");
    assert_eq!(r["same_table"], true, "the queue was rendered anew instead of updated: {r}");
    assert_eq!(r["main_frame_navigations"], 0, "{r}");
    assert_eq!(r["console_errors"], serde_json::json!([]), "the page logged errors: {r}");
    for id in &waiting {
        let done = eventually(Duration::from_secs(30), || async {
            job_view(&http, &gateway, id).await.is_some_and(|j| j["status"] == "completed")
        })
        .await;
        assert!(done, "job {id} did not complete: {:?}", job_view(&http, &gateway, id).await);
    }

    // The lane's key list (app.js laneKeys) on a made-up lane of 12 keys: today's replies may
    // have none. Most queued first, the top 10, the rest counted; "" is the jobs without a key.
    let rendered = &r["rendered_keys"];
    let keys: Vec<&str> = rendered["keys"].as_array().expect("keys").iter().map(|k| k["key"].as_str().unwrap()).collect();
    let want: Vec<String> = std::iter::once(String::new()).chain((2..=10).rev().map(|i| format!("user-{i}"))).collect();
    assert_eq!(keys, want, "{r}");
    assert_eq!(rendered["keys"][0]["text"], "(no key) 11 queued · 2 running", "{r}");
    assert_eq!(rendered["more"], "and 2 more (1 queued)", "{r}");
    assert_eq!(rendered["without_keys"], 0, "a lane without keys lists none: {r}");

    let shots: Vec<PathBuf> =
        r["screenshots"].as_array().expect("screenshots").iter().map(|v| PathBuf::from(v.as_str().unwrap())).collect();
    for shot in &shots {
        let (w, h) = png_size(shot);
        println!("screenshot: {} ({w}x{h})", shot.display());
    }
    keep_screenshots(&[(&shots[0], "console-queue.png")]);
}

/// The job page shows the job's webhook delivery log (`GET /v1/jobs/{id}/webhooks`): a job
/// whose webhook was answered 500, then 200, shows both attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_job_page_shows_its_webhook_log() {
    require_browser_tools();
    let _one_browser = BROWSER.lock().await;
    // A receiver that answers 500 once, then 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().fallback(move || {
        let calls = counted.clone();
        async move {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                axum::http::StatusCode::INTERNAL_SERVER_ERROR
            } else {
                axum::http::StatusCode::OK
            }
        }
    });
    let _server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut cluster = TestCluster::new();
    let webhooks = "[webhooks]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nallow_loopback = true\nbackoff_initial_ms = 200\n";
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &format!("{NOOP_MODEL}\n{webhooks}"));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gateway", &config, &cluster.url());
    let out_dir = cluster.dir.path().join("browser");

    let http = http();
    let request = serde_json::json!({"model": "noop", "webhook": {"url": hook}});
    let reply: Value =
        http.post(gateway.url("/v1/jobs")).json(&request).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
    let job_id = reply["job_id"].as_str().unwrap_or_else(|| panic!("no job_id: {reply}")).to_string();
    let log_url = gateway.url(&format!("/v1/jobs/{job_id}/webhooks"));
    let delivered = eventually(Duration::from_secs(30), || async {
        let log: Option<Value> = match http.get(&log_url).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        log.is_some_and(|l| l["attempts"].as_array().is_some_and(|a| a.len() == 2))
    })
    .await;
    assert!(delivered, "the webhook was not delivered on its second attempt");

    let driver = Driver::start("job.mjs", &[&gateway.base, &job_id, out_dir.to_str().unwrap()]);
    let (result, status, stderr) = driver.finish().await;
    let r = expect_success("job.mjs", &out_dir, &result, status, &stderr);
    assert_eq!(r["console_errors"], serde_json::json!([]), "the page logged errors: {r}");
    let rows = r["webhooks"].as_array().expect("webhooks");
    let outcomes: Vec<&str> = rows.iter().filter_map(|w| w["outcome"].as_str()).collect();
    assert_eq!(outcomes, ["retrying", "delivered"], "{r}");
    assert!(rows[0]["text"].as_str().is_some_and(|t| t.contains("500")), "{r}");
    assert!(rows[1]["text"].as_str().is_some_and(|t| t.contains("job.completed") && t.contains(&hook)), "{r}");
}
