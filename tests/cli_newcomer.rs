//! The command line as a newcomer found it (issue 23 item 15), against a real nats-server and
//! real `kiln` processes: an unreachable NATS, progress without a terminal, `kiln models` as a
//! table that keeps its columns with long names, logs without colours, and a worker named
//! relative to the config file.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_core::job::JobState;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn an_unreachable_nats_fails_fast_and_names_kiln_up() {
    let port = kiln_core::nats::server::free_port().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    let out = kiln(&["models", "--nats", &url]);
    let took = started.elapsed();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains(&url) && stderr.contains("kiln up") && stderr.contains("--nats"), "{stderr}");
    // It took 10.6 s (12.7 s here) before: the node's 10 s of retries. Now 2 s of them, plus
    // the start of the binary (1.4 s on a loaded 2-core machine).
    println!("an unreachable NATS reported in {} ms", took.as_millis());
    assert!(took < Duration::from_secs(8), "took {took:?}: {stderr}");
}

/// A model name longer than any fixed column, on two nodes: `kiln models` is a table whose
/// columns line up, `--json` the reply; `kiln submit --wait` with stdout and stderr piped
/// prints the job id on stdout and its progress on stderr; the nodes' log files (stderr to a
/// file) hold no ANSI colours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_is_a_table_submit_shows_progress_without_a_terminal_and_logs_have_no_colours() {
    let mut cluster = TestCluster::new();
    let long = "a-long-model-name-over-12-chars";
    let models = format!("{}{}", demo_model("demo", &[], 1, 60_000), NOOP_MODEL.replace("name = \"noop\"", &format!("name = {long:?}")));
    cluster.add_node("node-with-a-rather-long-name-1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("node-with-a-rather-long-name-1", 1).await;
    let url = cluster.url();

    let out = kiln(&["models", "--nats", &url]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("MODEL") && lines.len() == 3, "{stdout}");
    // Every column starts at the same character on every line: the ENGINE column, for one.
    let engine_at = lines[0].find("ENGINE").unwrap();
    for line in &lines[1..] {
        let engine = &line[engine_at..];
        assert!(engine.starts_with("process") || engine.starts_with("noop"), "misaligned:\n{stdout}");
        assert!(line.contains("node-with-a-rather-long-name-1"), "{stdout}");
    }
    let json = kiln(&["models", "--json", "--nats", &url]);
    let reply: kiln_core::protocol::ModelsReply = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(reply.models.len(), 2);
    let jobs = kiln(&["jobs", "--json", "--nats", &url]);
    assert!(serde_json::from_slice::<kiln_core::protocol::ListJobsReply>(&jobs.stdout).is_ok(), "{:?}", text(&jobs));

    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let out =
        kiln(&["submit", "demo", "-i", "prompt=a fox", "-p", "steps=4", "-p", "step_ms=50", "--wait", "--out", out_dir, "--nats", &url]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // stdout: the job id, then the files downloaded; the progress goes to stderr.
    let job_id = stdout.lines().next().unwrap().trim();
    assert!(stdout.contains("image.png") && !stdout.contains("progress"), "{stdout}");
    assert!(stderr.contains(&format!("job {job_id}: running")), "{stderr}");
    assert!(stderr.contains(&format!("job {job_id}: progress")), "{stderr}");
    assert!(stderr.contains(&format!("job {job_id}: completed")), "{stderr}");

    let log = cluster.nodes[0].log();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file:\n{log}");
}

/// PROTOCOL: relative paths in a process engine's `command` resolve against the config file's
/// folder. The node runs in another folder (the test's), the worker sits beside the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_named_relative_to_the_config_runs_whatever_folder_the_node_runs_in() {
    let mut cluster = TestCluster::new();
    std::fs::copy(demo_worker(), cluster.dir.path().join("my_worker.py")).unwrap();
    let model = r#"
[[models]]
name = "beside"
engine = { kind = "process", command = ["python3", "my_worker.py"], ready_timeout_ms = 20000 }
max_attempts = 1
"#;
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, model));
    assert_ne!(std::env::current_dir().unwrap(), cluster.dir.path(), "the node runs elsewhere than its config");
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let job = client.submit(&prompt_request("beside", "x", serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap().job_id;
    let view = wait_terminal(&client, &job, Duration::from_secs(60)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}\n{}", cluster.nodes[0].log_tail(30));
}

/// `kiln submit --wait` without a terminal prints a line for a `retrying` event, with the new
/// attempt and its reason (a worker that reports a retryable error: `engine_failed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_prints_why_an_attempt_is_retried() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 2, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let url = cluster.url();
    let dir = tempfile::tempdir().unwrap();
    let args = ["submit", "demo", "-i", "prompt=a fox", "-p", "steps=1", "-p", "fail=retryable", "--wait", "--nats", &url];
    let out = kiln(&[&args[..], &["--out", dir.path().to_str().unwrap()]].concat());
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "both attempts fail: {stdout}\n{stderr}");
    let job_id = stdout.lines().next().unwrap().trim();
    assert!(stderr.contains(&format!("job {job_id}: retrying, attempt 2 (engine_failed): ")), "{stderr}");
    assert!(stderr.contains(&format!("job {job_id}: failed")), "{stderr}");
}

/// `kiln --version` names the commit it was built from (issue 25 item 6): an operator with a
/// binary on a host can tell which code runs. Built from a git checkout, it is that checkout's
/// HEAD; `+dirty` when the tree had uncommitted changes.
#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let out = kiln(&["--version"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{stdout}");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    // Outside a git checkout (a source tarball) the build says what the builder set, or
    // `unknown`.
    let commit = head.unwrap_or_else(|| std::env::var("KILN_COMMIT").unwrap_or_else(|_| "unknown".into()));
    let expected = format!("kiln {} (commit {commit})", env!("CARGO_PKG_VERSION"));
    assert!(stdout.starts_with(&expected), "{stdout:?} does not start with {expected:?}");
}
