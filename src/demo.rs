//! `kiln demo`, the README's main job: starts a local nats-server (in a temp dir, on a free
//! port) and a node from `cluster.toml`, submits a batch of prompts to the `demo` model (a
//! real Python worker process per slot, `examples/workers/demo_worker.py`) and the TorchScript
//! `tiny-sampler`, turns one generated image into 3D Gaussians (`image-to-gaussians`, a `.ply`),
//! runs the `image-to-splat` pipeline on it (Gaussians, camera metadata, `.sog` on the
//! stage pool),
//! shows each job's progress live, and downloads the verified results into a folder.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_core::config::ClusterConfig;
use kiln_core::nats::NatsServer;
use kiln_core::protocol::{EventKind, InputValue, SubmitRequest};
use kiln_core::task::{self, TaskKind};

use crate::client::Client;
use crate::node::RunningNode;

pub struct DemoOptions {
    pub config: ClusterConfig,
    pub jobs: usize,
    pub out: PathBuf,
    pub model: String,
    /// After the jobs, keep the node and its gateway (the web console) up until Ctrl-C.
    pub serve: bool,
}

const PROMPTS: [&str; 8] = [
    "a lighthouse at dawn",
    "a red fox in fresh snow",
    "a teapot shaped like a whale",
    "neon city street in the rain",
    "a bonsai tree on the moon",
    "a paper boat on a still lake",
    "an owl reading a newspaper",
    "a glass greenhouse full of cacti",
];

pub async fn run(opts: DemoOptions) -> Result<(), String> {
    let temp = tempfile::Builder::new().prefix("kiln-demo-").tempdir().map_err(|e| e.to_string())?;
    let server = NatsServer::start(temp.path(), 0).map_err(|e| e.to_string())?;
    let mut config = opts.config;
    config.nats.url = server.url();
    println!("kiln demo: nats-server {} (JetStream in {})", server.url(), temp.path().display());
    let nats = config.nats.clone();
    let http = config.http.clone();
    let node = RunningNode::start(config).await.map_err(|e| e.to_string())?;
    let client = Client::connect_with(&nats).await.map_err(|e| e.to_string())?;
    // The HTTP gateway, as `kiln up` starts it: the jobs below show live in the web console.
    let (stop_gateway, gateway_stop) = tokio::sync::oneshot::channel::<()>();
    let gateway = match http.addr.is_empty() {
        true => None,
        false => {
            let serving = async {
                let g = crate::gateway::Gateway::connect(http.clone(), &nats).await.map_err(|e| e.to_string())?;
                g.serve(&http.addr, async move {
                    let _ = gateway_stop.await;
                })
                .await
                .map_err(|e| e.to_string())
            };
            match serving.await {
                Ok(s) => {
                    println!(
                        "  watch it live in the web console: http://{}/ (REST API at /v1; {})",
                        s.addr,
                        if opts.serve { "up until Ctrl-C" } else { "it stops with the demo; --serve keeps it up" }
                    );
                    Some(s)
                }
                Err(e) => {
                    println!("  (no web console: {e})");
                    None
                }
            }
        }
    };

    let cluster = client.cluster().await.map_err(|e| e.to_string())?;
    for g in &cluster.gpus {
        println!("  node {} slot {} serves {:?}", g.node, g.slot, g.models);
    }
    println!("submitting {} jobs to {:?} and, when configured, the TorchScript tiny-sampler", opts.jobs, opts.model);

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>36} [{bar:30}] {pos:>3}% {msg}").map_err(|e| e.to_string())?.progress_chars("=> ");
    let started = Instant::now();
    let mut tasks = vec![];
    let sampler = has_model(&client, "tiny-sampler").await;
    for i in 0..opts.jobs {
        let prompt = PROMPTS[i % PROMPTS.len()];
        // Half the batch on the Python worker process, half on the TorchScript sampler.
        let model = if sampler && i % 2 == 1 { "tiny-sampler".to_string() } else { opts.model.clone() };
        let request = SubmitRequest {
            model,
            inputs: [("prompt".to_string(), InputValue::Inline(prompt.into()))].into(),
            params: serde_json::json!({"steps": 10, "seed": i, "step_ms": 80}).as_object().cloned().unwrap_or_default(),
            ..Default::default()
        };
        let reply = client.submit(&request).await.map_err(|e| e.to_string())?;
        let bar = bars.add(ProgressBar::new(100));
        bar.set_style(style.clone());
        bar.set_prefix(format!("{:.8} {prompt:.26}", reply.job_id));
        let client = client.clone();
        let out = opts.out.clone();
        tasks.push(task::spawn(TaskKind::ClientWork, "follow a demo job", async move {
            let events = client.events(&reply.job_id).await.map_err(|e| e.to_string())?;
            tokio::pin!(events);
            while let Some(e) = events.next().await {
                match e.kind {
                    EventKind::Status => bar.set_message(e.status.map(|s| s.as_str().to_string()).unwrap_or_default()),
                    EventKind::Progress => {
                        if let Some(p) = e.progress {
                            bar.set_position(p as u64);
                        }
                        bar.set_message(e.stage.unwrap_or_default());
                    }
                    _ => {}
                }
            }
            let result = client.result(&reply.job_id).await.map_err(|e| e.to_string())?;
            let mut files = vec![];
            for a in &result.artifacts {
                let dest = out.join(&reply.job_id).join(&a.name);
                client.download(a, &dest).await.map_err(|e| e.to_string())?;
                files.push(dest);
            }
            bar.finish_with_message(format!("{} ({} files)", result.status.as_str(), files.len()));
            Ok::<_, String>((reply.job_id, result.status, files))
        }));
    }
    let mut completed = 0;
    let mut lines = vec![];
    let mut images = vec![];
    for t in tasks {
        let (job_id, status, files) = t.await.map_err(|e| e.to_string())??;
        completed += usize::from(status == kiln_core::job::JobState::Completed);
        images.extend(files.iter().filter(|f| f.extension().is_some_and(|e| e == "png")).cloned());
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        lines.push(format!("  {job_id} {:<9} {}", status.as_str(), names.join(", ")));
    }
    let mut total = opts.jobs;
    // The TorchScript path: an image the sampler made becomes 3D Gaussians, saved as a .ply;
    // and the image-to-splat pipeline: Gaussians, camera metadata, then a compressed .sog.
    for (model, what) in [("image-to-gaussians", "3D Gaussians"), ("image-to-splat", "splat pipeline")] {
        let Some(image) = images.last() else { break };
        if !has_model(&client, model).await {
            continue;
        }
        total += 1;
        let object = format!("uploads/demo/{}", image.file_name().and_then(|n| n.to_str()).unwrap_or("image.png"));
        client.upload(&object, &std::fs::read(image).map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())?;
        let inputs = [("image".to_string(), InputValue::Object { object })].into();
        let reply = client.submit(&SubmitRequest { model: model.into(), inputs, ..Default::default() }).await.map_err(|e| e.to_string())?;
        let view = client.wait(&reply.job_id, Duration::from_secs(120), |_| {}).await.map_err(|e| e.to_string())?;
        let mut files = vec![];
        for a in &view.artifacts {
            let dest = opts.out.join(&reply.job_id).join(&a.name);
            client.download(a, &dest).await.map_err(|e| e.to_string())?;
            files.push(dest.display().to_string());
        }
        completed += usize::from(view.status == kiln_core::job::JobState::Completed);
        lines.push(format!("  {} {:<9} {} ({what} of {})", reply.job_id, view.status.as_str(), files.join(", "), image.display()));
    }
    println!();
    for l in lines {
        println!("{l}");
    }
    println!("{completed}/{total} jobs completed in {:.2} s; results in {}", started.elapsed().as_secs_f64(), opts.out.display());
    if let Some(g) = gateway {
        if opts.serve {
            println!("serving the console at http://{}/ until Ctrl-C", g.addr);
            let _ = tokio::signal::ctrl_c().await;
        } else {
            // The console's URL was printed above; say that it goes now, and how to keep it.
            println!("the console at http://{}/ stops now with the demo: `kiln demo --serve` keeps it up until Ctrl-C", g.addr);
        }
        let _ = stop_gateway.send(());
        g.stopped().await;
    }
    node.shutdown(Duration::from_secs(5)).await;
    drop(server);
    if completed == total {
        Ok(())
    } else {
        Err(format!("{} jobs did not complete", total - completed))
    }
}

async fn has_model(client: &Client, name: &str) -> bool {
    client.models().await.map(|m| m.models.iter().any(|m| m.name == name)).unwrap_or(false)
}
