//! docs/PROTOCOL.md's worked sessions are a contract: the ```python block of "A worked nats-py
//! session" runs with real nats-py, and the ```js block of "A worked nats.js session" with real
//! nats.js, as the doc has them (only the server URL is put in), against a real node. A session
//! that no longer works with Kiln, or with the pinned client library, fails this test.

mod common;

use std::time::Duration;

use common::*;

/// The address the sessions in the doc connect to.
const DOC_URL: &str = "nats://127.0.0.1:4222";

/// The first `lang` block of the doc's section `heading`, with its server URL replaced by `url`.
fn session(heading: &str, lang: &str, url: &str) -> String {
    let doc = std::fs::read_to_string(repo().join("docs/PROTOCOL.md")).unwrap();
    let blocks = fenced_blocks(doc_section(&doc, heading), lang);
    let code = blocks.first().unwrap_or_else(|| panic!("{heading:?} in docs/PROTOCOL.md has no ```{lang} block"));
    assert!(code.contains(DOC_URL), "the session connects to {DOC_URL}:\n{code}");
    code.replace(DOC_URL, url)
}

/// Runs Python code the way `python -m asyncio` runs what is pasted into it: as top-level
/// code in which `await` is allowed, here compiled as one unit so that the first exception ends
/// it with exit status 1.
const TOP_LEVEL_AWAIT: &str = r#"
import ast, asyncio, sys
source = sys.stdin.read()
code = compile(source, "docs/PROTOCOL.md (A worked nats-py session)", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__main__"})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"#;

async fn node_with_demo() -> TestCluster {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_py_session_of_the_protocol_doc_runs_as_written() {
    let cluster = node_with_demo().await;
    let code = session("## A worked nats-py session", "python", &cluster.url());
    let work = tempfile::tempdir().unwrap();
    let mut python = tokio::process::Command::new(python_with_nats());
    python.arg("-c").arg(TOP_LEVEL_AWAIT).current_dir(work.path());
    let run = run_program(python, &code, Duration::from_secs(120)).await;
    run.assert_success(&format!("the nats-py session of docs/PROTOCOL.md\n{code}"));
    eprintln!("the nats-py session printed:\n{}", run.stdout);
    // What it printed: the job, its events to the terminal one, the artifacts it saved.
    assert!(run.stdout.contains("'status': 'queued'"), "{}", run.stdout);
    assert!(run.stdout.contains("progress inference"), "{}", run.stdout);
    assert!(run.stdout.contains("status completed"), "{}", run.stdout);
    assert!(run.stdout.contains("saved image.png"), "{}", run.stdout);
    assert!(work.path().join("image.png").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_js_session_of_the_protocol_doc_runs_as_written() {
    let node_modules = node_modules_with_nats();
    let cluster = node_with_demo().await;
    let code = session("## A worked nats.js session", "js", &cluster.url());
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("session.js"), &code).unwrap();
    let mut node = tokio::process::Command::new("node");
    node.arg("session.js").current_dir(work.path()).env("NODE_PATH", &node_modules);
    let run = run_program(node, "", Duration::from_secs(120)).await;
    run.assert_success(&format!("the nats.js session of docs/PROTOCOL.md\n{code}"));
    eprintln!("the nats.js session printed:\n{}", run.stdout);
    assert!(run.stdout.contains("status: 'queued'"), "{}", run.stdout);
    assert!(run.stdout.contains("progress inference"), "{}", run.stdout);
    assert!(run.stdout.contains("status completed"), "{}", run.stdout);
    assert!(run.stdout.contains("saved image.png"), "{}", run.stdout);
    assert!(run.stdout.contains("cancel "), "{}", run.stdout);
    assert!(work.path().join("image.png").is_file());
}
