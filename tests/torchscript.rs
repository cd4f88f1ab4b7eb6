//! The `torchscript` engine end to end: real TorchScript fixture models (exported by
//! `examples/models/export_fixtures.py` with the pinned torch, during set-up) run through tch
//! in real `kiln node` processes, on the CPU here.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln_core::job::JobState;
use kiln_core::protocol::{ErrorCode, GpuState, InputValue, SubmitRequest};

fn fixtures() -> std::path::PathBuf {
    let dir = repo().join("examples/models/out");
    assert!(dir.join("manifest.json").exists(), "fixture models missing: run scripts/setup.sh (scripts/test.sh does)");
    dir
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("manifest.json")).unwrap()).unwrap()
}

/// A `[[models]]` entry for a fixture file with the given engine settings.
fn torch_model(name: &str, file: &str, settings: &str, extra: &str) -> String {
    format!(
        "\n[[models]]\nname = \"{name}\"\nmax_attempts = 3\ntimeout_ms = 60000\n{extra}\n[models.engine]\nkind = \"torchscript\"\npath = \"{}\"\n{settings}\n",
        fixtures().join(file).display()
    )
}

const AFFINE: &str = r#"inputs = [{ name = "x", kind = "tensor" }]
outputs = [{ name = "output", codec = "json" }]"#;
const SAMPLER_NPY: &str = r#"inputs = [{ name = "prompt", kind = "text" }]
params = [{ name = "steps", kind = "int", default = 8 }, { name = "seed", kind = "int", default = 0 },
          { name = "width", kind = "int", default = 64 }, { name = "height", kind = "int", default = 64 }]
outputs = [{ name = "image", codec = "npy" }]"#;

fn request(model: &str, inputs: serde_json::Value, params: serde_json::Value) -> SubmitRequest {
    let inputs = inputs.as_object().unwrap().iter().map(|(k, v)| (k.clone(), InputValue::Inline(v.clone()))).collect();
    SubmitRequest { model: model.into(), inputs, params: common::params(params), ..Default::default() }
}

async fn download(client: &kiln::client::Client, view: &kiln_core::protocol::JobView, name: &str) -> Vec<u8> {
    let a = view.artifacts.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("no artifact {name}: {view:?}"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    client.download(a, &p).await.unwrap();
    std::fs::read(p).unwrap()
}

/// The raw data of a little-endian float32 `.npy` (after its header).
fn npy_data(bytes: &[u8]) -> &[u8] {
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    &bytes[10 + header_len..]
}

#[test]
fn the_binary_keeps_libtorch_cuda_and_finds_torch_on_its_own() {
    let out = std::process::Command::new("readelf").args(["-d", env!("CARGO_BIN_EXE_kiln")]).output().expect("readelf (binutils)");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let runpath = dynamic.lines().find(|l| l.contains("RUNPATH") || l.contains("RPATH")).expect("an rpath to torch/lib");
    let lib = runpath
        .split('[')
        .nth(1)
        .unwrap()
        .trim_end_matches(']')
        .split(':')
        .find(|p| p.ends_with("torch/lib"))
        .expect("torch/lib in the rpath");
    if std::path::Path::new(lib).join("libtorch_cuda.so").exists() {
        assert!(dynamic.contains("[libtorch_cuda.so]"), "libtorch_cuda.so must stay NEEDED or CUDA is silently unavailable:\n{dynamic}");
    }
    // It starts with no LD_LIBRARY_PATH at all.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).arg("--version").env_remove("LD_LIBRARY_PATH").status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_outputs_match_the_reference_computed_with_torch() {
    let mut cluster = TestCluster::new();
    let models =
        format!("{}{}", torch_model("affine", "affine.pt", AFFINE, ""), torch_model("sampler", "tiny_sampler.pt", SAMPLER_NPY, ""));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let m = manifest();

    let reference = &m["models"]["affine"]["reference"];
    let r = client.submit(&request("affine", serde_json::json!({"x": reference["input"]}), serde_json::json!({}))).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    let out: serde_json::Value = serde_json::from_slice(&download(&client, &view, "output.json").await).unwrap();
    assert_eq!(out["shape"], serde_json::json!([2, 3]));
    let want: Vec<f64> = reference["output"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    let got: Vec<f64> = out["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got, want, "exact in float32");

    let reference = &m["models"]["tiny_sampler"]["reference"];
    let r =
        client.submit(&request("sampler", serde_json::json!({"prompt": reference["prompt"]}), reference["params"].clone())).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    let npy = download(&client, &view, "image.npy").await;
    assert_eq!(
        kiln_core::nats::objects::sha256_hex(npy_data(&npy)),
        reference["image_sha256"].as_str().unwrap(),
        "bit-identical to torch's own run"
    );

    // One progress event per step, in order, ending at 100.
    let events = history(&client, &r.job_id).await;
    let steps: Vec<f32> = events.iter().filter(|e| e.stage.as_deref() == Some("sampling")).map(|e| e.progress.unwrap()).collect();
    assert_eq!(steps, [12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5, 100.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loads_on_its_first_job_stays_warm_and_is_evicted_by_the_memory_budget() {
    let mut cluster = TestCluster::new();
    // Each model is said to need 600 kB; the slot holds 1 MB: two cannot be resident at once.
    let budget = "memory_bytes = 600000";
    let models = format!(
        "{}{}",
        torch_model("first", "affine.pt", &format!("{AFFINE}\n{budget}"), ""),
        torch_model("second", "affine.pt", &format!("{AFFINE}\n{budget}"), "")
    );
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &models)
        .replace("registry_ttl_ms = 2000", "registry_ttl_ms = 2000\nslot_memory_bytes = 1000000");
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let warm = || async { client.cluster().await.unwrap().gpus[0].warm_models.clone() };
    assert!(warm().await.is_empty(), "nothing loads at start");

    let x = serde_json::json!({"x": [[1, 2, 3, 4]]});
    let run = |model: &'static str| {
        let client = client.clone();
        let x = x.clone();
        async move {
            let r = client.submit(&request(model, x, serde_json::json!({}))).await.unwrap();
            let v = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
            assert_eq!(v.status, JobState::Completed);
            history(&client, &r.job_id).await.iter().any(|e| e.stage.as_deref() == Some("loading"))
        }
    };
    assert!(run("first").await, "the first job loads the model");
    assert!(eventually(Duration::from_secs(5), || async { warm().await == ["first"] }).await);
    // The registry shows what the slot's budget counts for it, and where the figure comes from.
    let gpu = client.cluster().await.unwrap().gpus.remove(0);
    assert_eq!(gpu.memory_budget_bytes, 1_000_000);
    assert_eq!(
        gpu.resident,
        [kiln_core::protocol::ResidentModel {
            model: "first".into(),
            bytes: 600_000,
            source: kiln_core::protocol::MemorySource::Declared,
            measured_bytes: None,
            pinned: false
        }]
    );
    assert!(!run("first").await, "the second job reuses it");
    assert!(run("second").await);
    assert!(eventually(Duration::from_secs(5), || async { warm().await == ["second"] }).await, "first was evicted: {:?}", warm().await);
    assert!(run("first").await, "so it loads again");
    assert!(eventually(Duration::from_secs(5), || async { warm().await == ["first"] }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepwise_model_reports_each_step_and_stops_early_on_cancel() {
    let mut cluster = TestCluster::new();
    let settings = r#"params = [{ name = "steps", kind = "int", default = 40 }]"#;
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &torch_model("slow", "slow_steps.pt", settings, "")));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let r = client.submit(&request("slow", serde_json::json!({}), serde_json::json!({"steps": 200}))).await.unwrap();
    let mut events = client.events(&r.job_id).await.unwrap().boxed();
    let mut seen = 0;
    while seen < 3 {
        let e = tokio::time::timeout(Duration::from_secs(30), events.next()).await.unwrap().unwrap();
        if e.stage.as_deref() == Some("sampling") {
            seen += 1;
        }
    }
    drop(events);
    client.cancel(&r.job_id).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(10)).await;
    assert_eq!(view.status, JobState::Cancelled);
    let steps = history(&client, &r.job_id).await.iter().filter(|e| e.stage.as_deref() == Some("sampling")).count();
    assert!((3..200).contains(&steps), "stopped between steps after {steps} of 200");
    // The slot is fine and the model still warm.
    let r = client.submit(&request("slow", serde_json::json!({}), serde_json::json!({"steps": 2}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_corrupt_and_misfed_models_fail_clearly_and_the_slot_stays_healthy() {
    let mut cluster = TestCluster::new();
    let models = format!(
        "{}{}{}{}",
        torch_model("ghost", "does_not_exist.pt", AFFINE, ""),
        torch_model("broken", "broken.pt", AFFINE, ""),
        torch_model("strict", "shape_strict.pt", r#"inputs = [{ name = "x", kind = "tensor" }]"#, ""),
        torch_model("affine", "affine.pt", AFFINE, "")
    );
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let x = serde_json::json!({"x": [[1, 2, 3, 4]]});

    for (model, expect) in [("ghost", "does not exist"), ("broken", "cannot load")] {
        let r = client.submit(&request(model, x.clone(), serde_json::json!({}))).await.unwrap();
        let v = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
        assert_eq!((v.status, v.attempt), (JobState::Failed, 1), "no retry for an unusable model: {v:?}");
        let e = v.error.unwrap();
        assert_eq!(e.code, ErrorCode::EngineFailed);
        assert!(e.message.contains(expect), "{model}: {}", e.message);
    }
    // A shape mismatch is the input's fault: bad_request, no retry, Torch's own words.
    let r = client.submit(&request("strict", serde_json::json!({"x": [[1, 2, 3]]}), serde_json::json!({}))).await.unwrap();
    let v = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    assert_eq!((v.status, v.attempt), (JobState::Failed, 1));
    let e = v.error.unwrap();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(
        e.message.starts_with("forward: ") && e.message.contains("RuntimeError") && e.message.contains("shapes"),
        "Torch's own cause: {}",
        e.message
    );
    // A wrong input type is caught before Torch.
    let r = client.submit(&request("affine", serde_json::json!({"x": "not a tensor"}), serde_json::json!({}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.error.unwrap().code, ErrorCode::BadRequest);

    let r = client.submit(&request("affine", x, serde_json::json!({}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
    let gpu = settled_gpu(&client, "cpu:0").await;
    assert_eq!((gpu.state, gpu.restarts), (GpuState::Idle, 0), "{gpu:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_engine_thread_is_caught_the_slot_restarts_and_the_job_is_retried() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &torch_model("affine", "affine.pt", AFFINE, ""));
    cluster.add_node_with_env("n1", &config, &[("KILN_FAULTS", "panic_in_engine_thread@1")]);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let r = client.submit(&request("affine", serde_json::json!({"x": [[1, 2, 3, 4]]}), serde_json::json!({}))).await.unwrap();
    let v = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    assert_eq!((v.status, v.attempt), (JobState::Completed, 2), "{v:?}");
    let retry = history(&client, &r.job_id).await.into_iter().find(|e| e.status == Some(JobState::Retrying)).unwrap();
    assert!(retry.message.unwrap().contains("engine thread panicked"));
    let gpu = client.cluster().await.unwrap().gpus.remove(0);
    assert_eq!(gpu.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_becomes_gaussians_written_as_a_3dgs_ply() {
    let mut cluster = TestCluster::new();
    let settings = r#"inputs = [{ name = "image", kind = "image" }]
params = [{ name = "focal_length", kind = "float", default = 64.0 }]
outputs = [{ name = "scene.ply", codec = "ply" }]"#;
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &torch_model("splat", "image_to_gaussians.pt", settings, "")));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;

    // An 8x6 PNG made with tch, uploaded like any client would.
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("in.png");
    let img =
        tch::Tensor::arange(3 * 6 * 8, (tch::Kind::Float, tch::Device::Cpu)).remainder(251).reshape([3, 6, 8]).to_kind(tch::Kind::Uint8);
    tch::vision::image::save(&img, &png).unwrap();
    client.upload("uploads/t/in.png", &std::fs::read(&png).unwrap()).await.unwrap();
    let mut req = request("splat", serde_json::json!({}), serde_json::json!({"focal_length": 10.0}));
    req.inputs.insert("image".into(), InputValue::Object { object: "uploads/t/in.png".into() });
    let r = client.submit(&req).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    let ply = download(&client, &view, "scene.ply").await;
    let header_end = ply.windows(11).position(|w| w == b"end_header\n").unwrap() + 11;
    let text = String::from_utf8_lossy(&ply[..header_end]);
    assert!(text.starts_with("ply\nformat binary_little_endian 1.0\nelement vertex 48\n"), "{text}");
    for p in ["f_dc_0", "opacity", "scale_2", "rot_3"] {
        assert!(text.contains(&format!("property float {p}\n")));
    }
    let body = ply.len() - header_end;
    assert_eq!(body, 48 * 17 * 4, "one row of 17 floats per pixel");
    assert_eq!(view.artifacts.iter().find(|a| a.name == "scene.ply").unwrap().content_type, "application/x-ply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_are_batched_into_fewer_forward_passes_and_split_back() {
    let mut cluster = TestCluster::new();
    let settings = format!("{AFFINE}\nmax_batch = 8\nmax_batch_delay_ms = 300");
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &torch_model("affine", "affine.pt", &settings, "")));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let reference = &manifest()["models"]["affine"]["reference"];
    let w: Vec<Vec<f32>> = serde_json::from_value(reference["weight"].clone()).unwrap();
    let b: Vec<f32> = serde_json::from_value(reference["bias"].clone()).unwrap();

    // Warm the model first so the batch forms on the forward pass, not behind the load.
    let r = client.submit(&request("affine", serde_json::json!({"x": [[0, 0, 0, 0]]}), serde_json::json!({}))).await.unwrap();
    wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;

    const K: usize = 6;
    let mut ids = vec![];
    for i in 0..K {
        let x = vec![vec![i as f32, 1.0, -(i as f32), 2.0]];
        ids.push((
            x.clone(),
            client.submit(&request("affine", serde_json::json!({ "x": x }), serde_json::json!({}))).await.unwrap().job_id,
        ));
    }
    let mut passes = std::collections::BTreeSet::new();
    for (x, id) in &ids {
        let view = wait_terminal(&client, id, Duration::from_secs(30)).await;
        assert_eq!(view.status, JobState::Completed, "{view:?}");
        let out: serde_json::Value = serde_json::from_slice(&download(&client, &view, "output.json").await).unwrap();
        assert_eq!(out["shape"], serde_json::json!([1, 3]), "each job gets its own slice");
        let got: Vec<f32> = serde_json::from_value(out["data"].clone()).unwrap();
        let want: Vec<f32> = (0..3).map(|j| (0..4).map(|k| x[0][k] * w[k][j]).sum::<f32>() + b[j]).collect();
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() < 1e-4, "job {id}: {got:?} != {want:?}");
        }
        let msg = history(&client, id).await.into_iter().find_map(|e| e.message.filter(|m| m.starts_with("forward pass #"))).unwrap();
        passes.insert(msg.split(',').next().unwrap().to_string());
    }
    assert!(passes.len() < K, "{K} jobs ran in {} forward passes: {passes:?}", passes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_memory_is_an_infrastructure_error_that_is_retried() {
    let mut cluster = TestCluster::new();
    let settings = r#"params = [{ name = "mb", kind = "int", default = 1 }]"#;
    let models = torch_model("allocate", "allocate.pt", settings, "").replace("max_attempts = 3", "max_attempts = 2");
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    // 2^40 MiB cannot be allocated anywhere: Torch's allocator refuses it.
    let r = client.submit(&request("allocate", serde_json::json!({}), serde_json::json!({"mb": 1_i64 << 40}))).await.unwrap();
    let v = wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await;
    assert_eq!((v.status, v.attempt, v.dead_letter), (JobState::Failed, 2, true), "retried, then dead-lettered: {v:?}");
    let e = v.error.unwrap();
    assert_eq!(e.code, ErrorCode::EngineFailed);
    assert!(e.message.contains("out of memory"), "{}", e.message);
    assert!(client.cluster().await.unwrap().gpus[0].warm_models.is_empty(), "the slot unloaded its models to free memory");
    // The slot survives it.
    let r = client.submit(&request("allocate", serde_json::json!({}), serde_json::json!({"mb": 1}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_prefers_a_slot_where_the_model_is_already_warm() {
    let mut cluster = TestCluster::new();
    let slow = r#"params = [{ name = "steps", kind = "int", default = 40 }]"#;
    // The blocker model serves cpu:0 only, so its puller never holds cpu:1. (Models that share
    // slots hold them while they long-poll; the preference is then best effort: see the notes.)
    let models =
        format!("{}{}", torch_model("slow", "slow_steps.pt", slow, "slots = [\"cpu:0\"]"), torch_model("affine", "affine.pt", AFFINE, ""));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &models));
    cluster.wait_node_ready("n1", 2).await;
    let client = cluster.client().await;
    // Keep cpu:0 (the first slot) busy so that affine first loads on cpu:1.
    let blocker = client.submit(&request("slow", serde_json::json!({}), serde_json::json!({"steps": 1000}))).await.unwrap();
    assert!(eventually(Duration::from_secs(20), || async { client.status(&blocker.job_id).await.unwrap().slot.is_some() }).await);
    let blocked_slot = client.status(&blocker.job_id).await.unwrap().slot.unwrap();
    assert_eq!(blocked_slot, "cpu:0");
    let x = serde_json::json!({"x": [[1, 2, 3, 4]]});
    let first = client.submit(&request("affine", x.clone(), serde_json::json!({}))).await.unwrap();
    let warm_slot = wait_terminal(&client, &first.job_id, Duration::from_secs(30)).await.slot.unwrap();
    assert_eq!(warm_slot, "cpu:1", "cpu:0 was busy");
    client.cancel(&blocker.job_id).await.unwrap();
    wait_terminal(&client, &blocker.job_id, Duration::from_secs(30)).await;
    // Both slots free now: affine goes to cpu:1, where it is resident, though cpu:0 comes first.
    for _ in 0..3 {
        let r = client.submit(&request("affine", x.clone(), serde_json::json!({}))).await.unwrap();
        assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.slot.unwrap(), warm_slot);
    }
}

/// A step-wise model whose state is an image shows it as live previews: PNGs scaled to at most
/// 256 pixels a side, at most one per its `preview_interval_ms`, none among its artifacts; the
/// newest stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepwise_image_model_shows_its_state_as_live_previews() {
    let mut cluster = TestCluster::new();
    let models = torch_model("sampler", "tiny_sampler.pt", SAMPLER_NPY, "preview_interval_ms = 250");
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    // Every job's previews (the job id is not known before the submit).
    let mut live = client.nats().subscribe("kiln.previews.>").await.unwrap();
    let params = serde_json::json!({"steps": 400, "width": 512, "height": 384});
    let r = client.submit(&request("sampler", serde_json::json!({"prompt": "a kiln at dusk"}), params)).await.unwrap();
    let view = wait_terminal(&client, &r.job_id, Duration::from_secs(60)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    let mut previews = vec![];
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), live.next()).await {
        previews.push(kiln::client::Preview::from_parts(m.headers.as_ref(), m.payload).expect("a preview's headers"));
    }
    let ran_ms = view.finished_ms.unwrap() - view.started_ms.unwrap();
    println!("{} previews of 400 steps in {ran_ms} ms", previews.len());
    assert!(previews.len() >= 2, "previews of a step-wise image model: {}", previews.len());
    assert!(previews.len() as u64 <= ran_ms / 250 + 1, "one per 250 ms at most: {} in {ran_ms} ms", previews.len());
    for p in &previews {
        assert_eq!((p.job_id.as_str(), p.attempt, p.content_type.as_str()), (r.job_id.as_str(), 1, "image/png"));
        assert_eq!(&p.data[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width then height, big-endian, after the signature and the chunk's length and type.
        let size = |at: usize| u32::from_be_bytes(p.data[at..at + 4].try_into().unwrap());
        assert_eq!((size(16), size(20)), (256, 192), "512x384 scaled to 256 a side");
    }
    let ts: Vec<u64> = previews.iter().map(|p| p.ts_ms).collect();
    assert!(ts.windows(2).all(|w| w[1] + 2 >= w[0] + 250), "one per 250 ms at most: {ts:?}");
    assert_eq!(client.preview(&r.job_id).await.unwrap().as_ref(), previews.last());
    assert_eq!(view.artifacts.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["image.npy"]);
}
