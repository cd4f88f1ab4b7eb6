//! Pipelines: a model then post-processing stages on the node's compression pool, with real
//! commands in real `kiln node` processes: the `.ply` -> `.sog` compression by the pinned
//! `@playcanvas/splat-transform`, the pool's bound, a hanging command, a dying worker.

mod common;

use std::time::Duration;

use common::*;
use kiln_core::job::JobState;
use kiln_core::protocol::{ErrorCode, EventKind, InputValue, SubmitRequest};
use kiln_core::stage::live_group_members;

fn splat_pipeline(name: &str, keep_ply: bool) -> String {
    format!(
        r#"
[[models]]
name = "{name}"
timeout_ms = 60000
required_inputs = ["image"]
run_stage = "converting"
[models.engine]
kind = "torchscript"
path = "{model}"
inputs = [{{ name = "image", kind = "image" }}]
params = [{{ name = "focal_length", kind = "float", default = 64.0 }}]
outputs = [{{ name = "scene.ply", codec = "ply" }}]
[[models.stages]]
kind = "camera_metadata"
name = "metadata"
image_input = "image"
focal_param = "focal_length"
default_focal = 64.0
output = "metadata.json"
[[models.stages]]
kind = "command"
name = "compressing"
command = ["splat-transform", "{{input}}", "{{output}}"]
input = "scene.ply"
output = "scene.sog"
keep_input = {keep_ply}
timeout_ms = 120000
"#,
        model = repo().join("examples/models/out/image_to_gaussians.pt").display()
    )
}

/// A noop model (it writes `result.json`) followed by one command stage.
fn noop_with_stage(command: &str, timeout_ms: u64, max_attempts: u32) -> String {
    format!(
        r#"
[[models]]
name = "staged"
engine = {{ kind = "noop" }}
max_attempts = 3
[[models.stages]]
kind = "command"
name = "compressing"
command = ["sh", "-c", {command:?}, "sh", "{{input}}", "{{output}}"]
input = "result.json"
output = "result.out"
timeout_ms = {timeout_ms}
max_attempts = {max_attempts}
"#
    )
}

async fn upload_png(client: &kiln::client::Client, object: &str, w: i64, h: i64) {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("in.png");
    let img =
        tch::Tensor::arange(3 * w * h, (tch::Kind::Float, tch::Device::Cpu)).remainder(255).to_kind(tch::Kind::Uint8).reshape([3, h, w]);
    tch::vision::image::save(&img, &png).unwrap();
    client.upload(object, &std::fs::read(&png).unwrap()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_becomes_a_compressed_sog_with_camera_metadata() {
    let mut cluster = TestCluster::new();
    let models = format!("{}{}", splat_pipeline("splat-keep", true), splat_pipeline("splat", false));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    upload_png(&client, "uploads/t/photo.png", 40, 30).await;
    let submit = |model: &str| {
        let mut r = SubmitRequest { model: model.into(), ..Default::default() };
        r.inputs.insert("image".into(), InputValue::Object { object: "uploads/t/photo.png".into() });
        r.params.insert("focal_length".into(), serde_json::json!(1234.5));
        r
    };

    let kept = client.submit(&submit("splat-keep")).await.unwrap().job_id;
    let view = wait_terminal(&client, &kept, Duration::from_secs(120)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}\n{}", cluster.nodes[0].log());
    let names: Vec<&str> = view.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["scene.ply", "metadata.json", "scene.sog"], "keep_ply keeps the .ply beside the .sog");
    let ply = view.artifacts.iter().find(|a| a.name == "scene.ply").unwrap();
    let sog = view.artifacts.iter().find(|a| a.name == "scene.sog").unwrap();
    let dir = tempfile::tempdir().unwrap();
    client.download(sog, &dir.path().join("scene.sog")).await.unwrap();
    let bytes = std::fs::read(dir.path().join("scene.sog")).unwrap();
    // SOG is a zip of meta.json and WebP images.
    assert!(bytes.starts_with(b"PK\x03\x04"), "zip magic");
    assert!(bytes.windows(9).any(|w| w == b"meta.json"), "has meta.json");
    assert!(sog.size > 0 && sog.size < ply.size, "the .sog ({}) is smaller than the .ply ({})", sog.size, ply.size);
    println!(".ply {} bytes -> .sog {} bytes ({:.1}x smaller)", ply.size, sog.size, ply.size as f64 / sog.size as f64);

    let meta = view.artifacts.iter().find(|a| a.name == "metadata.json").unwrap();
    client.download(meta, &dir.path().join("metadata.json")).await.unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["intrinsic_matrix"], serde_json::json!([1234.5, 0.0, 20.0, 0.0, 1234.5, 15.0, 0.0, 0.0, 1.0]));
    assert_eq!(
        meta["extrinsic_matrix"],
        serde_json::json!([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    );

    // Events name each stage in order, and progress spans the pipeline without going back. The
    // stages are the documented ones only: while the model runs its events say `converting`,
    // not the engine's own steps (issue 15: `loading`, `forward`, `encoding` showed in between).
    // Its input image is an upload: `downloading` comes first.
    let events = history(&client, &kept).await;
    let stages: Vec<String> = events.iter().filter_map(|e| e.stage.clone()).fold(vec![], |mut v, s| {
        if v.last() != Some(&s) {
            v.push(s);
        }
        v
    });
    assert_eq!(stages, ["downloading", "converting", "metadata", "compressing"]);
    let progress: Vec<f32> = events.iter().filter(|e| e.kind == EventKind::Progress).filter_map(|e| e.progress).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(&100.0));

    // Without keep_ply the .sog replaces the .ply.
    let replaced = client.submit(&submit("splat")).await.unwrap().job_id;
    let view = wait_terminal(&client, &replaced, Duration::from_secs(120)).await;
    let names: Vec<&str> = view.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["scene.sog", "metadata.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_never_runs_more_commands_than_its_maximum() {
    let mut cluster = TestCluster::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spans.log");
    // Each command logs its start and end (ns) and takes 300 ms.
    let script = format!(
        "echo \"start $(date +%s%N)\" >> {log}; sleep 0.3; cp \"$1\" \"$2\"; echo \"end $(date +%s%N)\" >> {log}",
        log = log.display()
    );
    let extra = format!("[compression]\nmax_workers = 2\nqueue_limit = 2\n{}", noop_with_stage(&script, 10_000, 1));
    // Four slots finish the model part at once; only two commands may run at a time.
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0", "cpu:1", "cpu:2", "cpu:3"], 10_000, &extra));
    cluster.wait_node_ready("n1", 4).await;
    let client = cluster.client().await;
    let mut ids = vec![];
    for i in 0..10 {
        ids.push(client.submit(&prompt_request("staged", &format!("j{i}"), serde_json::json!({}))).await.unwrap().job_id);
    }
    for id in &ids {
        let v = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!(v.status, JobState::Completed, "{v:?}");
        assert_eq!(v.artifacts.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["result.out"]);
    }
    let mut spans: Vec<(u128, i32)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let (kind, ns) = l.split_once(' ').unwrap();
            (ns.parse().unwrap(), if kind == "start" { 1 } else { -1 })
        })
        .collect();
    spans.sort_by_key(|(t, d)| (*t, *d)); // an end before a start at the same instant
    let (mut now, mut peak) = (0, 0);
    for (_, d) in &spans {
        now += d;
        peak = peak.max(now);
    }
    println!("10 commands, max_workers 2: at most {peak} ran at once");
    assert_eq!(spans.len(), 20);
    assert_eq!(peak, 2, "the pool used its two workers and never more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_command_is_killed_at_its_timeout_retried_then_fails_clearly() {
    let mut cluster = TestCluster::new();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // Starts a child in its process group, records the group, and hangs.
    let script = format!("sleep 300 & echo $$ >> {}; wait", pids.display());
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &noop_with_stage(&script, 500, 2)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let id = client.submit(&prompt_request("staged", "hang", serde_json::json!({}))).await.unwrap().job_id;
    let v = wait_terminal(&client, &id, Duration::from_secs(30)).await;
    assert_eq!(v.status, JobState::Failed, "{v:?}");
    let error = v.error.unwrap();
    assert_eq!(error.code, ErrorCode::EngineFailed);
    assert_eq!(error.message, "stage compressing: timed out after 500 ms; its process group was killed (after 2 attempts)");
    assert_eq!(v.attempt, 1, "the stage retries on its own; the model does not run again");
    let events = history(&client, &id).await;
    assert!(events.iter().any(|e| e.message.as_deref().is_some_and(|m| m.starts_with("stage compressing attempt 1 of 2 failed"))));
    // Both attempts' process groups are gone, their background children included.
    let groups: Vec<i32> = std::fs::read_to_string(&pids).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(groups.len(), 2);
    for pgid in groups {
        assert!(eventually(Duration::from_secs(2), || async move { live_group_members(pgid).is_empty() }).await, "group {pgid} still runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_worker_that_dies_is_restarted_and_the_stage_retried() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &noop_with_stage("cp \"$1\" \"$2\"", 10_000, 3));
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "panic_in_compression_worker@1")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let id = client.submit(&prompt_request("staged", "crash", serde_json::json!({}))).await.unwrap().job_id;
    let v = wait_terminal(&client, &id, Duration::from_secs(30)).await;
    assert_eq!((v.status, v.attempt), (JobState::Completed, 1), "{v:?}\n{}", cluster.nodes[0].log());
    let log = cluster.nodes[0].log();
    assert!(log.contains("compression worker died; starting another"), "{log}");
    let events = history(&client, &id).await;
    assert!(events.iter().any(|e| e.message.as_deref().is_some_and(|m| m.contains("attempt 1 of 3 failed"))));
    // A second job runs on the replacement worker at the first try.
    let again = client.submit(&prompt_request("staged", "after", serde_json::json!({}))).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &again, Duration::from_secs(30)).await.status, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_request_reuses_the_earlier_result_when_asked() {
    let mut cluster = TestCluster::new();
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000)));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    // Two uploads of the same bytes under different names: one content.
    client.upload("uploads/a/one.txt", b"same bytes").await.unwrap();
    client.upload("uploads/b/two.txt", b"same bytes").await.unwrap();
    client.upload("uploads/c/three.txt", b"other bytes").await.unwrap();
    let req = |object: &str, steps: u32, reuse: bool| {
        let mut r = prompt_request("demo", "a fox", serde_json::json!({"steps": steps, "step_ms": 1}));
        r.inputs.insert("extra".into(), InputValue::Object { object: object.into() });
        r.reuse = reuse;
        r
    };
    let first = client.submit(&req("uploads/a/one.txt", 2, true)).await.unwrap();
    assert!(!first.reused);
    assert_eq!(wait_terminal(&client, &first.job_id, Duration::from_secs(30)).await.status, JobState::Completed);

    // Hit: same model, same content (another object name), same params.
    let hit = client.submit(&req("uploads/b/two.txt", 2, true)).await.unwrap();
    assert!(hit.reused, "{hit:?}");
    assert_eq!((hit.job_id.as_str(), hit.status), (first.job_id.as_str(), JobState::Completed));
    // Misses: other params, other content, or reuse not asked for.
    for (object, steps, reuse) in [("uploads/a/one.txt", 3, true), ("uploads/c/three.txt", 2, true), ("uploads/a/one.txt", 2, false)] {
        let miss = client.submit(&req(object, steps, reuse)).await.unwrap();
        assert!(!miss.reused && miss.job_id != first.job_id, "{object} {steps} {reuse}: {miss:?}");
        assert_eq!(wait_terminal(&client, &miss.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
    }
    // A failed job is not reused: the request runs again and takes the key over.
    let failing = |reuse| {
        let mut r = prompt_request("demo", "boom", serde_json::json!({"fail": "fatal"}));
        r.reuse = reuse;
        r
    };
    let failed = client.submit(&failing(true)).await.unwrap();
    assert_eq!(wait_terminal(&client, &failed.job_id, Duration::from_secs(30)).await.status, JobState::Failed);
    let again = client.submit(&failing(true)).await.unwrap();
    assert!(!again.reused && again.job_id != failed.job_id);

    // Only submissions that asked for reuse record their content key (PROTOCOL): an earlier
    // identical job submitted without it is not found, and this one runs.
    let plain = client.submit(&req("uploads/c/three.txt", 5, false)).await.unwrap();
    assert_eq!(wait_terminal(&client, &plain.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
    let asks = client.submit(&req("uploads/c/three.txt", 5, true)).await.unwrap();
    assert!(!asks.reused && asks.job_id != plain.job_id, "{asks:?}");
}
