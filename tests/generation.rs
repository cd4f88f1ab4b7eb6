//! The `text-to-image` example (examples/workers/text_to_image.py: diffusers' UNet, VAE and
//! scheduler from a config, random weights) as the shipped cluster.toml serves it, through a real
//! node and nats-server: progress per denoising step, the seed reproducible, the PNG, a cancel
//! between steps, and Kiln's overhead per job against the same pipeline called directly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_core::protocol::{Artifact, EventKind, JobState};

/// The shipped cluster.toml's `text-to-image` model, its worker's path made absolute.
fn shipped_text_to_image_model() -> String {
    let shipped = std::fs::read_to_string(repo().join("cluster.toml")).unwrap();
    let section = shipped
        .split("\n[[models]]")
        .find(|chunk| chunk.trim_start().starts_with("name = \"text-to-image\""))
        .expect("cluster.toml serves text-to-image");
    // The section ends where the next one's comment begins.
    let section = section.split("\n# ").next().unwrap();
    let worker = repo().join("examples/workers/text_to_image.py");
    format!("\n[[models]]{}", section.replace("\"examples/workers/text_to_image.py\"", &format!("{:?}", worker.display().to_string())))
}

async fn node_with_text_to_image(extra: &str) -> TestCluster {
    let mut cluster = TestCluster::new();
    let models = format!("{}{extra}", shipped_text_to_image_model());
    let config = config_toml(&cluster.url(), &["cpu:0"], 30_000, &models);
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    cluster
}

async fn png_of(client: &kiln::client::Client, artifacts: &[Artifact]) -> Vec<u8> {
    let image = artifacts.iter().find(|a| a.name == "image.png").unwrap_or_else(|| panic!("no image.png in {artifacts:?}"));
    assert_eq!(image.content_type, "image/png");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.png");
    client.download(image, &path).await.unwrap();
    std::fs::read(path).unwrap()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_diffusion_example_reports_every_step_and_its_seed_reproduces_the_png() {
    let cluster = node_with_text_to_image("").await;
    let client = cluster.client().await;
    let limit = Duration::from_secs(180);
    let job = |seed: u64, size: u32| {
        prompt_request(
            "text-to-image",
            "a lighthouse at dusk",
            serde_json::json!({"steps": 8, "seed": seed, "width": size, "height": size}),
        )
    };

    let first = client.submit(&job(7, 64)).await.unwrap().job_id;
    // Followed live from the submit on (the worker is still loading: nothing is missed).
    let previews = client.previews(&first).await.unwrap();
    let view = wait_terminal(&client, &first, limit).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}\n{}", cluster.nodes[0].log_tail(40));
    use futures::StreamExt;
    let seen: Vec<_> = previews.take_until(tokio::time::sleep(Duration::from_millis(500))).collect().await;
    let preview = seen.first().expect("the job's first step sent a preview, live");
    assert_eq!((preview.content_type.as_str(), preview.attempt), ("image/png", 1));
    assert_eq!(png_size(&preview.data), (32, 32), "the latents (64 / 2) mapped to RGB, no VAE");
    assert_eq!(client.preview(&first).await.unwrap().map(|p| p.seq), seen.last().map(|p| p.seq), "the newest is kept");
    assert_eq!(view.artifacts.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["image.png"], "previews are not artifacts");
    let events = history(&client, &first).await;
    let steps: Vec<String> = events
        .iter()
        .filter(|e| e.kind == EventKind::Progress && e.stage.as_deref() == Some("inference"))
        .filter_map(|e| e.message.clone())
        .collect();
    let expected: Vec<String> = (1..=8).map(|i| format!("step {i}/8")).collect();
    assert_eq!(steps, expected, "one progress event per denoising step, in order");
    assert!(events.iter().any(|e| e.stage.as_deref() == Some("decoding")), "the VAE decode is reported");
    let image = png_of(&client, &view.artifacts).await;
    assert_eq!(png_size(&image), (64, 64));

    // The same prompt and seed: the same bytes (fixed weights, the noise drawn from the seed).
    let again = client.submit(&job(7, 64)).await.unwrap().job_id;
    let again = wait_terminal(&client, &again, limit).await;
    assert!(png_of(&client, &again.artifacts).await == image, "seed 7 twice: the same bytes");
    // Another seed: another picture. Another size: that size.
    let other = client.submit(&job(8, 48)).await.unwrap().job_id;
    let other = wait_terminal(&client, &other, limit).await;
    let other = png_of(&client, &other.artifacts).await;
    assert_eq!(png_size(&other), (48, 48));
    assert!(other != image, "seed 8: another picture");

    // A size the VAE cannot take is the user's mistake: refused by the worker, not retried.
    let bad = client.submit(&job(1, 60)).await.unwrap().job_id;
    let bad = wait_terminal(&client, &bad, limit).await;
    assert_eq!(bad.status, JobState::Failed);
    let error = bad.error.expect("an error");
    assert_eq!(error.code.as_str(), "bad_request", "{error:?}");
    assert!(error.message.contains("multiple of 8"), "{error:?}");
    assert_eq!(bad.attempt, 1, "a user error is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diffusion_job_is_cancelled_between_denoising_steps_and_the_worker_stays_loaded() {
    let cluster = node_with_text_to_image("").await;
    let client = cluster.client().await;
    // 150 steps: several seconds on a CPU slot, far longer than the cancel takes.
    let long = prompt_request("text-to-image", "a long walk", serde_json::json!({"steps": 150}));
    let job_id = client.submit(&long).await.unwrap().job_id;
    let mut cancel_sent: Option<Instant> = None;
    let watcher = client.clone();
    let view = client
        .wait(&job_id, Duration::from_secs(180), |event| {
            if cancel_sent.is_none() && event.message.as_deref() == Some("step 3/150") {
                cancel_sent = Some(Instant::now());
                let (watcher, job_id) = (watcher.clone(), job_id.clone());
                tokio::spawn(async move { watcher.cancel(&job_id).await.unwrap() });
            }
        })
        .await
        .unwrap();
    let cancel_sent = cancel_sent.expect("step 3 was reported");
    let took = cancel_sent.elapsed();
    assert_eq!(view.status, JobState::Cancelled, "{view:?}");
    let steps_run = history(&client, &job_id).await.iter().filter(|e| e.stage.as_deref() == Some("inference")).count();
    eprintln!("cancelled after step 3 of 150: terminal {took:?} after the cancel, {steps_run} steps had run");
    assert!(steps_run < 150, "the loop stopped early ({steps_run} steps)");
    // Stopped by the worker between steps, not killed after the 3 s grace.
    assert!(took < Duration::from_millis(2500), "cancelled in {took:?}");

    let next = client.submit(&prompt_request("text-to-image", "next", serde_json::json!({"steps": 2}))).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &next, Duration::from_secs(60)).await.status, JobState::Completed);
    let starts = cluster.nodes[0].log().matches("worker process started").count();
    assert_eq!(starts, 1, "the worker answered the cancel itself and was kept loaded");
}

/// The same pipeline called directly by its script (`--direct --stdin`: one job per seed
/// written to it, each answered with its run time): the floor.
struct DirectPipeline {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl DirectPipeline {
    async fn start() -> DirectPipeline {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(python_with_nats())
            .arg(repo().join("examples/workers/text_to_image.py"))
            .args(["--direct", "--stdin", "--steps", "25", "--prompt", "a lighthouse at dusk"])
            .env("KILN_DIFFUSION_CONFIG", "tiny")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next_line().await.unwrap().expect("the direct pipeline says ready");
        assert!(ready.contains("ready"), "{ready}");
        DirectPipeline { child, stdin, lines }
    }

    /// One job's run time, in seconds.
    async fn run(&mut self, seed: usize) -> f64 {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(format!("{seed}\n").as_bytes()).await.unwrap();
        let line = self.lines.next_line().await.unwrap().expect("a job's time");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["run_s"].as_f64().unwrap()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Kiln's overhead per job, and what previews cost: the same pipeline and 25 steps called
/// directly and through a node (submit to `completed`, the PNG stored), without and with
/// previews, one job at a time and taking turns, so that all three meet the same load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_overhead_per_diffusion_job_against_the_pipeline_called_directly() {
    const ROUNDS: usize = 6;
    let mut direct = DirectPipeline::start().await;
    let cluster = node_with_text_to_image("").await;
    let client = cluster.client().await;
    // The first job loads the worker (measured apart: it is the cold start, not the overhead).
    let started = Instant::now();
    let warm = client.submit(&prompt_request("text-to-image", "warm", serde_json::json!({"steps": 1}))).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &warm, Duration::from_secs(120)).await.status, JobState::Completed);
    let cold = started.elapsed();
    let through_kiln = |seed: usize, preview_every: u32| {
        let client = client.clone();
        async move {
            let params = serde_json::json!({"steps": 25, "seed": seed, "preview_every": preview_every});
            let started = Instant::now();
            let job_id = client.submit(&prompt_request("text-to-image", "a lighthouse at dusk", params)).await.unwrap().job_id;
            let view = client.wait(&job_id, Duration::from_secs(120), |_| {}).await.unwrap();
            assert_eq!(view.status, JobState::Completed, "{view:?}");
            started.elapsed().as_secs_f64()
        }
    };
    let (mut floor, mut kiln, mut with_previews) = (vec![], vec![], vec![]);
    for seed in 0..ROUNDS {
        floor.push(direct.run(seed).await);
        kiln.push(through_kiln(seed, 0).await);
        with_previews.push(through_kiln(seed, 1).await);
    }
    drop(direct.child);
    let (direct_s, kiln_s, with_previews_s) = (median(floor), median(kiln), median(with_previews));
    eprintln!(
        "text-to-image tiny, 25 steps 64x64, medians of {ROUNDS} rounds: direct {:.1} ms/job (the floor), through Kiln {:.1} ms/job ({:.3}x, {:+.1} %), \
         through Kiln with a preview offered every step (sent at most every 500 ms) {:.1} ms/job ({:+.1} % against without); first job with the worker's load {:.2} s",
        direct_s * 1000.0,
        kiln_s * 1000.0,
        kiln_s / direct_s,
        (kiln_s / direct_s - 1.0) * 100.0,
        with_previews_s * 1000.0,
        (with_previews_s / kiln_s - 1.0) * 100.0,
        cold.as_secs_f64()
    );
    // Loose bounds for a loaded 2-core machine: an overhead of this size would be a reload or a
    // poll per job, not the cost of a queue or of a few small PNGs.
    assert!(kiln_s < direct_s * 1.5 + 0.3, "through Kiln {kiln_s:.3} s/job against {direct_s:.3} s/job directly");
    assert!(with_previews_s < kiln_s * 1.5 + 0.3, "with previews {with_previews_s:.3} s/job against {kiln_s:.3} s/job");
}

/// docs/PROTOCOL.md's "Port your diffusers model" runs as written: its worker file and its
/// `[[models]]` block (only the worker's path made absolute), a job with progress per step and
/// the PNG, and a cancel between steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_your_diffusers_model_section_runs_as_written() {
    let doc = std::fs::read_to_string(repo().join("docs/PROTOCOL.md")).unwrap();
    let section = doc_section(&doc, "### Port your diffusers model");
    let worker = fenced_blocks(section, "python").into_iter().next().expect("a ```python block");
    let model = fenced_blocks(section, "toml").into_iter().next().expect("a ```toml block");
    let dir = tempfile::tempdir().unwrap();
    let worker_path = dir.path().join("sd_worker.py");
    std::fs::write(&worker_path, &worker).unwrap();
    assert!(model.contains("\"sd_worker.py\""), "{model}");
    let model = model.replace("\"sd_worker.py\"", &format!("{:?}", worker_path.display().to_string()));

    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 30_000, &format!("\n{model}"));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    let job_id =
        client.submit(&prompt_request("sd", "a lighthouse at dusk", serde_json::json!({"steps": 6, "seed": 3}))).await.unwrap().job_id;
    let view = wait_terminal(&client, &job_id, Duration::from_secs(180)).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}\n{}", cluster.nodes[0].log_tail(40));
    let steps: Vec<String> =
        history(&client, &job_id).await.iter().filter(|e| e.kind == EventKind::Progress).filter_map(|e| e.message.clone()).collect();
    assert_eq!(steps, (1..=6).map(|i| format!("step {i}/6")).collect::<Vec<_>>());
    assert_eq!(png_size(&png_of(&client, &view.artifacts).await), (64, 64));

    let long = client.submit(&prompt_request("sd", "a long walk", serde_json::json!({"steps": 150}))).await.unwrap().job_id;
    let mut asked = false;
    let watcher = client.clone();
    let view = client
        .wait(&long, Duration::from_secs(120), |event| {
            if !asked && event.message.as_deref() == Some("step 2/150") {
                asked = true;
                let (watcher, long) = (watcher.clone(), long.clone());
                tokio::spawn(async move { watcher.cancel(&long).await.unwrap() });
            }
        })
        .await
        .unwrap();
    assert_eq!(view.status, JobState::Cancelled, "{view:?}");
}
