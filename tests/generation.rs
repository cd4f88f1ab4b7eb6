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
    let view = wait_terminal(&client, &first, limit).await;
    assert_eq!(view.status, JobState::Completed, "{view:?}\n{}", cluster.nodes[0].log_tail(40));
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

/// The same pipeline's run time per job called directly by its script (`--direct`): the floor.
fn direct_run_times(jobs: usize, extra: &[&str]) -> Vec<f64> {
    let direct = std::process::Command::new(python_with_nats())
        .arg(repo().join("examples/workers/text_to_image.py"))
        .args(["--direct", "--jobs", &jobs.to_string(), "--steps", "25"])
        .args(extra)
        .env("KILN_DIFFUSION_CONFIG", "tiny")
        .output()
        .unwrap();
    assert!(direct.status.success(), "{}", String::from_utf8_lossy(&direct.stderr));
    let stdout = String::from_utf8_lossy(&direct.stdout);
    stdout.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("run_s")?.as_f64()).collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Kiln's overhead per job, and what previews cost: the same pipeline, the same 25 steps, called
/// directly (before and after, the machine being shared) and through a node one job at a time
/// (submit to `completed`, the PNG stored), without and with previews, in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_overhead_per_diffusion_job_against_the_pipeline_called_directly() {
    const JOBS: usize = 5;
    let mut direct = direct_run_times(JOBS, &[]);

    let cluster = node_with_text_to_image("").await;
    let client = cluster.client().await;
    // The first job loads the worker (measured apart: it is the cold start, not the overhead).
    let started = Instant::now();
    let warm = client.submit(&prompt_request("text-to-image", "warm", serde_json::json!({"steps": 1}))).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &warm, Duration::from_secs(120)).await.status, JobState::Completed);
    let cold = started.elapsed();
    let through_kiln = |preview_every: u32| {
        let client = client.clone();
        async move {
            let mut times = Vec::new();
            for seed in 0..JOBS {
                let params = serde_json::json!({"steps": 25, "seed": seed, "preview_every": preview_every});
                let started = Instant::now();
                let job_id = client.submit(&prompt_request("text-to-image", "a lighthouse at dusk", params)).await.unwrap().job_id;
                let view = client.wait(&job_id, Duration::from_secs(120), |_| {}).await.unwrap();
                assert_eq!(view.status, JobState::Completed, "{view:?}");
                times.push(started.elapsed().as_secs_f64());
            }
            median(times)
        }
    };
    let kiln_s = through_kiln(0).await;
    let with_previews_s = through_kiln(1).await;
    direct.extend(direct_run_times(JOBS, &[]));
    let direct_s = median(direct);
    eprintln!(
        "text-to-image tiny, 25 steps 64x64, medians of {JOBS} jobs: direct {:.1} ms/job (the floor), through Kiln {:.1} ms/job ({:.3}x, {:+.1} %), \
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
