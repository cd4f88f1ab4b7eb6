//! The command line's conventions (issue 28 item 6), against a real nats-server, a real node and
//! the real `kiln` binary: `--output json|table` on every command that prints data, the exit
//! statuses (`kiln --help` lists them), shell completions.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use kiln_core::job::JobState;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).stdin(Stdio::null()).output().unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `kiln <args> --output json`: it succeeds and its stdout is one JSON document.
fn json_of(args: &[&str]) -> serde_json::Value {
    let out = kiln(&[args, &["--output", "json"]].concat());
    assert!(out.status.success(), "{args:?}: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?} --output json is not JSON ({e}): {}", describe(&out)))
}

/// Runs `kiln <args> --output table`: it succeeds, stdout is not JSON and its first line is
/// the header `first_line_starts`.
fn table_of(args: &[&str], first_line_starts: &str) -> String {
    let out = kiln(&[args, &["--output", "table"]].concat());
    assert!(out.status.success(), "{args:?}: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(serde_json::from_str::<serde_json::Value>(&text).is_err(), "{args:?} --output table printed JSON: {text}");
    assert!(text.starts_with(first_line_starts), "{args:?} --output table:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_data_command_prints_json_or_a_table_and_failures_have_their_exit_status() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 1, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let url = cluster.url();
    let nats = ["--nats", url.as_str()];
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();

    // submit: the id (table), the reply (json); with --wait --output json the final view.
    let reply = json_of(&[&["submit", "demo", "-i", "prompt=a fox", "-p", "steps=1"][..], &nats].concat());
    let job = reply["job_id"].as_str().unwrap().to_string();
    let view = json_of(&[&["submit", "demo", "-i", "prompt=a fox", "-p", "steps=1", "--wait", "--out", out_dir][..], &nats].concat());
    assert_eq!(view["status"], "completed", "{view}");
    let client = cluster.client().await;
    assert_eq!(wait_terminal(&client, &job, Duration::from_secs(60)).await.status, JobState::Completed);

    // Each data command both ways.
    for (args, header) in [
        (vec!["jobs"], "JOB"),
        (vec!["models"], "MODEL"),
        (vec!["cluster"], "NODE"),
        (vec!["queue"], "MODEL"),
        (vec!["status", &job], "FIELD"),
        (vec!["cancel", &job], "FIELD"),
    ] {
        let args = [&args[..], &nats].concat();
        json_of(&args);
        table_of(&args, header);
    }
    assert_eq!(json_of(&[&["jobs"][..], &nats].concat())["jobs"].as_array().unwrap().len(), 2);
    // The older `--json` of the table commands still works.
    let old = kiln(&[&["models", "--json"][..], &nats].concat());
    assert!(serde_json::from_slice::<serde_json::Value>(&old.stdout).is_ok(), "{}", describe(&old));
    let result = json_of(&[&["result", &job, "--out", out_dir][..], &nats].concat());
    assert_eq!(result["status"], "completed");
    assert!(result["files"].as_array().is_some_and(|f| !f.is_empty()), "{result}");
    table_of(&[&["result", &job, "--out", out_dir][..], &nats].concat(), out_dir);

    // A batch: its id or reply, its view as lines or JSON.
    let items = dir.path().join("items.jsonl");
    std::fs::write(&items, "{\"prompt\": \"one\"}\n{\"prompt\": \"two\"}\n").unwrap();
    let items = items.to_str().unwrap();
    let batch = json_of(&[&["batch", "submit", "demo", "--items", items, "-p", "steps=1"][..], &nats].concat());
    let batch_id = batch["batch_id"].as_str().unwrap().to_string();
    let _ = client.wait_batch(&batch_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(json_of(&[&["batch", "status", &batch_id][..], &nats].concat())["summary"]["completed"], 2);
    table_of(&[&["batch", "status", &batch_id][..], &nats].concat(), &format!("batch {batch_id}"));
    let restart = json_of(&[&["restart-gpu", "n1", "cpu:0"][..], &nats].concat());
    assert!(restart.is_object(), "{restart}");

    // Exit statuses. 1: the job ran and failed (submit --wait, then result).
    let failed = kiln(&[&["submit", "demo", "-i", "prompt=x", "-p", "fail=fatal", "--wait", "--out", out_dir][..], &nats].concat());
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    let failed_id = String::from_utf8_lossy(&failed.stdout).lines().next().unwrap().trim().to_string();
    let result = kiln(&[&["result", &failed_id, "--out", out_dir][..], &nats].concat());
    assert_eq!(result.status.code(), Some(1), "{}", describe(&result));
    // 5: Kiln refused the request (not_found).
    let refused = kiln(&[&["status", "no-such-job"][..], &nats].concat());
    assert_eq!(refused.status.code(), Some(5), "{}", describe(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not_found"), "{}", describe(&refused));
    // 2: bad usage, clap's and ours.
    for args in [
        vec!["jobs", "--no-such-flag"],
        vec!["submit", "demo", "-i", "no-equals-sign"],
        vec!["jobs", "--output", "yaml"],
        vec!["node", "--output", "json"],
    ] {
        let out = kiln(&[&args[..], &nats].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
    // 3: nothing answers at the URL.
    let port = kiln_core::nats::server::free_port().unwrap();
    let nowhere = format!("nats://127.0.0.1:{port}");
    for args in [vec!["jobs", "--nats", &nowhere], vec!["status", "x", "--nats", &nowhere, "--output", "json"]] {
        let out = kiln(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", describe(&out));
    }
}

#[test]
fn the_help_lists_the_exit_statuses_and_completions_name_the_commands() {
    let help = kiln(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success());
    for line in ["Exit status:", "  1  a job or batch ran", "  2  bad usage", "  3  Kiln not reachable", "  4  an invariant"] {
        assert!(text.contains(line), "{line:?} not in kiln --help:\n{text}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = kiln(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", describe(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for command in ["submit", "jobs", "batch", "completions", "--output"] {
            assert!(script.contains(command), "the {shell} completions do not mention {command}");
        }
    }
    let bad = kiln(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}
