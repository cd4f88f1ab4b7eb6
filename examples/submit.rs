//! A complete Rust client: submit a job, stream its progress, download its verified results.
//!
//! ```text
//! kiln up &                                     # a local node with the demo model
//! cargo run --example submit -- "a red fox in fresh snow"
//! cargo run --example submit -- "a red fox" --nats nats://10.0.0.5:4222 --model demo --out results
//! ```

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use kiln::client::Client;
use kiln_core::protocol::{EventKind, InputValue, SubmitRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut prompt = None;
    let (mut nats, mut model, mut out) = ("nats://127.0.0.1:4222".to_string(), "demo".to_string(), PathBuf::from("kiln-results"));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nats" => nats = args.next().ok_or("--nats needs a URL")?,
            "--model" => model = args.next().ok_or("--model needs a name")?,
            "--out" => out = args.next().ok_or("--out needs a folder")?.into(),
            _ => prompt = Some(a),
        }
    }
    let prompt = prompt.ok_or("usage: submit PROMPT [--nats URL] [--model NAME] [--out DIR]")?;

    let client = Client::connect(&nats, "kiln").await?;
    let request = SubmitRequest {
        model,
        inputs: [("prompt".to_string(), InputValue::Inline(prompt.into()))].into(),
        params: serde_json::json!({"steps": 10, "seed": 1}).as_object().cloned().unwrap_or_default(),
        ..Default::default()
    };
    // The reply comes once the job is durable: from here on it cannot be lost.
    let job = client.submit(&request).await?;
    println!("submitted {}", job.job_id);

    // Replays the history from the start, then follows live events until the terminal one.
    let events = client.events(&job.job_id).await?;
    tokio::pin!(events);
    while let Some(e) = tokio::time::timeout(Duration::from_secs(600), events.next()).await? {
        match e.kind {
            EventKind::Status => println!("status   {}", e.status.map(|s| s.as_str()).unwrap_or("?")),
            EventKind::Retrying => println!("retrying attempt {}: {}", e.attempt, e.message.unwrap_or_default()),
            EventKind::Progress => println!("progress {:>5.1}% {}", e.progress.unwrap_or(0.0), e.stage.unwrap_or_default()),
            EventKind::Message => println!("log      {}", e.message.unwrap_or_default()),
            EventKind::Artifact => println!("artifact {}", e.artifact.map(|a| a.name).unwrap_or_default()),
            // Only a batch's own subject carries these.
            EventKind::ItemCompleted | EventKind::ItemFailed | EventKind::BatchProgress | EventKind::BatchFinished => {}
        }
    }

    let result = client.result(&job.job_id).await?;
    if let Some(error) = &result.error {
        return Err(format!("job {}: {}: {}", result.status.as_str(), error.code.as_str(), error.message).into());
    }
    for artifact in &result.artifacts {
        let dest = out.join(&job.job_id).join(&artifact.name);
        client.download(artifact, &dest).await?; // checks the sha256 Kiln recorded
        println!("saved    {} ({} bytes)", dest.display(), artifact.size);
    }
    Ok(())
}
