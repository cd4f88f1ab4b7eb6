//! docs/HTTP.md is a contract: every ```sh block in it runs, in order, as one bash script
//! (`set -euo pipefail`, curl with `-f`), against a real node and gateway. A route, a field or a
//! flag the document shows that the gateway does not serve fails this test.

mod common;

use std::time::Duration;

use common::*;

/// The ```sh blocks of a Markdown text, in order.
fn shell_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = vec![];
    let mut current: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => current = Some(vec![]),
            (Some(_), l) if l.starts_with("```") => blocks.push(current.take().expect("open").join("\n")),
            (Some(lines), _) => lines.push(line),
            _ => {}
        }
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_curl_example_of_the_http_doc_works() {
    let doc = std::fs::read_to_string(repo().join("docs/HTTP.md")).unwrap();
    let blocks = shell_blocks(&doc);
    assert!(blocks.len() >= 2, "the doc has its examples");
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &with_checkout_sdk(&demo_model("demo", &[], 3, 60_000)));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 2).await;
    let gw = GatewayProcess::spawn(cluster.dir.path(), "gw", &config, &cluster.url());

    let work = tempfile::tempdir().unwrap();
    let script = format!("set -euo pipefail\n{}\n", blocks.join("\n"));
    let run = tokio::process::Command::new("bash").arg("-c").arg(&script).current_dir(work.path()).env("KILN", &gw.base).output();
    let out = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the examples finish").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the doc's examples failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    // What they printed is what the doc says they print.
    assert!(stdout.contains(r#""ready":true"#), "{stdout}");
    assert!(stdout.contains("event: status") && stdout.contains(r#""status":"completed""#), "{stdout}");
    assert!(stdout.contains("event: batch_finished"), "{stdout}");
    assert!(stdout.contains(r#""cancel_requested":true"#) || stdout.contains(r#""status":"cancelled""#), "{stdout}");
    assert!(stdout.contains("211   P   N   G"), "the first bytes of the PNG: {stdout}");
    assert!(work.path().join("fox.png").exists());
}
