//! `kiln batch submit|status|cancel|retry`: N items as one request.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use kiln_core::protocol::{BatchItemRequest, BatchSubmitRequest, BatchView};

use crate::cli::conn::{connect, ConnArgs};
use crate::cli::exit::Failure;
use crate::cli::output::{download_all, print_json, Format};
use crate::cli::pairs::{parse_labels, split_pair};

#[derive(Subcommand)]
pub enum BatchCommand {
    /// Submit a batch: one item per line of --items (a JSON object of inline inputs, or
    /// `{"inputs": {..}, "params": {..}}`); prints the batch id, then follows it with --wait.
    Submit {
        /// The model every item runs on (`kiln models` lists them).
        model: String,
        /// A file (or `-` for stdin) with one item per line.
        #[arg(long)]
        items: PathBuf,
        /// A param every item gets: name=value (JSON if it parses, else a string).
        #[arg(short = 'p', long = "param")]
        params: Vec<String>,
        /// Two submissions with the same key make one batch.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// A label every item gets: name=value.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// Identical items run once and share their results.
        #[arg(long)]
        reuse: bool,
        /// At most this many of the batch's jobs queued or running at once.
        #[arg(long)]
        max_concurrency: Option<u32>,
        /// A model to fall back to, in order, when an item fails on Kiln's side or its model
        /// has no live slot (repeat for several).
        #[arg(long = "fallback")]
        fallback_models: Vec<String>,
        /// Follow the batch to its end, download every item's results into --out/<batch
        /// id>/<index>/, and exit non-zero unless every item completed.
        #[arg(long)]
        wait: bool,
        /// The folder --wait downloads the results into.
        #[arg(long, default_value = "kiln-results")]
        out: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show a batch: its summary and every item.
    Status {
        /// The batch's id (what `kiln batch submit` printed).
        batch_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cancel every item of a batch that has not ended.
    Cancel {
        /// The batch's id.
        batch_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Run the failed and cancelled items of a finished batch again, as a new batch.
    Retry {
        /// The finished batch's id.
        batch_id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// Every batch command; `--output json` prints the reply (or, after `submit --wait`, the
/// batch's final view) as one JSON document, the default is lines for people.
pub async fn run(action: BatchCommand, output: Option<Format>) -> Result<(), Failure> {
    let format = Format::choose(output, false, Format::Table);
    match action {
        BatchCommand::Submit {
            model,
            items,
            params,
            idempotency_key,
            labels,
            reuse,
            max_concurrency,
            fallback_models,
            wait,
            out,
            conn,
        } => {
            let text = if items.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(|e| format!("stdin: {e}"))?
            } else {
                std::fs::read_to_string(&items).map_err(|e| format!("{}: {e}", items.display()))?
            };
            let mut request = BatchSubmitRequest {
                model,
                idempotency_key,
                labels: parse_labels(&labels).map_err(Failure::usage)?,
                reuse,
                max_concurrency,
                fallback_models,
                ..Default::default()
            };
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| Failure::usage(format!("items line {}: {e}", n + 1)))?;
                let item = match serde_json::from_value::<BatchItemRequest>(value.clone()) {
                    Ok(item) if value.get("inputs").is_some() || value.get("params").is_some() => item,
                    _ => {
                        let inputs = serde_json::from_value(value).map_err(|e| Failure::usage(format!("items line {}: {e}", n + 1)))?;
                        BatchItemRequest { inputs, ..Default::default() }
                    }
                };
                request.items.push(item);
            }
            for p in &params {
                let (k, v) = split_pair(p).map_err(Failure::usage)?;
                request.params.insert(k, v);
            }
            let c = connect(&conn).await?;
            let reply = c.submit_batch(&request).await?;
            match (format, wait) {
                (Format::Table, _) => {
                    println!("{}{}", reply.batch_id, if reply.duplicate { " (duplicate: the batch of this idempotency key)" } else { "" })
                }
                (Format::Json, false) => print_json(&reply),
                (Format::Json, true) => {}
            }
            if wait {
                let view = c
                    .wait_batch(&reply.batch_id, Duration::from_secs(24 * 3600), |e| {
                        if let Some(i) = e.item.as_ref().filter(|_| format == Format::Table) {
                            println!("item {:>4} {}", i.index, i.status.as_str());
                        }
                    })
                    .await?;
                show(&view, format);
                for item in &view.items {
                    download_all(&c, &item.artifacts, &out.join(&view.batch_id).join(item.index.to_string()), format).await?;
                }
                let s = &view.summary;
                if s.completed < s.total {
                    return Err(Failure::job(format!(
                        "batch {} is partial: {} of {} items completed",
                        view.batch_id, s.completed, s.total
                    )));
                }
            }
            Ok(())
        }
        BatchCommand::Status { batch_id, conn } => {
            show(&connect(&conn).await?.batch(&batch_id).await?, format);
            Ok(())
        }
        BatchCommand::Cancel { batch_id, conn } => {
            show(&connect(&conn).await?.cancel_batch(&batch_id).await?, format);
            Ok(())
        }
        BatchCommand::Retry { batch_id, conn } => {
            let reply = connect(&conn).await?.retry_batch(&batch_id).await?;
            if format == Format::Json {
                print_json(&reply);
                return Ok(());
            }
            let indices: Vec<String> = reply.items.iter().map(|i| i.index.to_string()).collect();
            println!("{} retries items {}", reply.batch_id, indices.join(","));
            Ok(())
        }
    }
}

/// A batch's summary line, then a line per item (or the view as JSON).
fn show(v: &BatchView, format: Format) {
    if format == Format::Json {
        print_json(v);
        return;
    }
    let s = &v.summary;
    println!(
        "batch {} ({}): {}; {} items, {} completed, {} failed, {} cancelled",
        v.batch_id,
        v.model,
        v.status.as_str(),
        s.total,
        s.completed,
        s.failed,
        s.cancelled
    );
    for i in &v.items {
        let err = i.error.as_ref().map(|e| format!("{}: {}", e.code.as_str(), e.message)).unwrap_or_default();
        let names: Vec<&str> = i.artifacts.iter().map(|a| a.name.as_str()).collect();
        println!("  {:>4}  {:<36}  {:<10} {} {}", i.index, i.job_id, i.status.as_str(), names.join(","), err);
    }
    if let Some(r) = &v.retried_by {
        println!("retried by batch {r}");
    }
}
