//! `kiln submit`, `status`, `result`, `cancel`, `jobs`: one job at a time, and the list.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use kiln::table::{Align, Table};
use kiln_core::job::JobState;
use kiln_core::protocol::{Event, EventKind, InputValue, ListJobsRequest, SubmitRequest};

use crate::cli::conn::{connect, ConnArgs};
use crate::cli::exit::Failure;
use crate::cli::output::{download_all, print_as, print_json, Format};
use crate::cli::pairs::{parse_labels, split_pair};

#[derive(Args)]
pub struct SubmitArgs {
    /// The model to run (`kiln models` lists them).
    model: String,
    /// An inline input: name=value (JSON if it parses, else a string).
    #[arg(short = 'i', long = "input")]
    inputs: Vec<String>,
    /// A file input: name=path; uploaded to the files bucket first.
    #[arg(short = 'f', long = "file")]
    files: Vec<String>,
    /// A parameter: key=value (JSON if it parses, else a string).
    #[arg(short = 'p', long = "param")]
    params: Vec<String>,
    /// 0 (normal) to 255; above 0 runs before the model's normal jobs.
    #[arg(long, default_value_t = 0)]
    priority: u8,
    /// Two submissions with the same key (for the same model) make one job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Attempts at most (capped by the model's `max_attempts`).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// A label for the job: name=value (a user id, a session id, your own job id).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Seconds from now after which the job must not start.
    #[arg(long)]
    deadline_s: Option<u64>,
    /// Reuse an identical earlier job's results (same model, input contents, params) when
    /// they are still within their TTL, instead of running again.
    #[arg(long)]
    reuse: bool,
    /// Follow progress until the job ends, then download the results.
    #[arg(long)]
    wait: bool,
    /// The folder --wait downloads the results into (under a folder named by the job id).
    #[arg(long, default_value = "kiln-results")]
    out: PathBuf,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The job's id (what `kiln submit` printed).
    job_id: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct ResultArgs {
    /// The job's id.
    job_id: String,
    /// The folder to download the results into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Wait for the job to end first (otherwise a job still running is an error).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct CancelArgs {
    /// The job's id.
    job_id: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
pub struct JobsArgs {
    /// Only jobs in this state: queued, running, retrying, completed, failed or cancelled.
    #[arg(long)]
    status: Option<String>,
    /// Only jobs of this model.
    #[arg(long)]
    model: Option<String>,
    /// Only jobs that failed after their last attempt.
    #[arg(long)]
    dead_letter: bool,
    /// Only jobs with this label: name=value (repeat for several, all must match).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// At most this many jobs (the newest).
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print the reply as JSON instead of a table (the same as `--output json`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `kiln submit`: prints the job id (`--output json`: the submit reply), and with --wait follows
/// the job, downloads its results (`--output json`: then prints its final view) and exits 1
/// unless it completed.
pub async fn submit(args: SubmitArgs, output: Option<Format>) -> Result<(), Failure> {
    let format = Format::choose(output, false, Format::Table);
    let client = connect(&args.conn).await?;
    let mut request = SubmitRequest {
        model: args.model,
        priority: args.priority,
        idempotency_key: args.idempotency_key,
        max_attempts: args.max_attempts,
        reuse: args.reuse,
        labels: parse_labels(&args.labels).map_err(Failure::usage)?,
        ..Default::default()
    };
    for i in &args.inputs {
        let (k, v) = split_pair(i).map_err(Failure::usage)?;
        request.inputs.insert(k, InputValue::Inline(v));
    }
    for f in &args.files {
        let (k, path) = f.split_once('=').ok_or_else(|| Failure::usage(format!("{f:?} is not name=path")))?;
        let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let base = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("input");
        let base: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
        let object = format!("uploads/{}/{base}", uuid::Uuid::new_v4());
        client.upload(&object, &data).await?;
        request.inputs.insert(k.to_string(), InputValue::Object { object });
    }
    for p in &args.params {
        let (k, v) = split_pair(p).map_err(Failure::usage)?;
        request.params.insert(k, v);
    }
    if let Some(s) = args.deadline_s {
        request.deadline_ms = Some(kiln_core::now_ms() + s * 1000);
    }
    let reply = client.submit(&request).await?;
    match (format, args.wait) {
        (Format::Table, _) => println!("{}{}", reply.job_id, if reply.reused { " (reused: an identical earlier job)" } else { "" }),
        (Format::Json, false) => print_json(&reply),
        // One JSON document on stdout: the job's final view, below.
        (Format::Json, true) => {}
    }
    if !args.wait {
        return Ok(());
    }
    // A bar for a person at a terminal (indicatif draws on stderr, and nothing at all when it
    // is not a terminal); otherwise one line per event on stderr, so a log or a CI run still
    // shows the job moving, and stdout keeps the job id alone.
    let at_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(indicatif::ProgressStyle::with_template("[{bar:40}] {pos:>3}% {msg}").expect("a valid template").progress_chars("=> "));
    let view = client
        .wait(&reply.job_id, Duration::from_secs(24 * 3600), |e| {
            if !at_terminal {
                if let Some(line) = progress_line(e) {
                    eprintln!("{line}");
                }
                return;
            }
            match e.kind {
                EventKind::Status => bar.set_message(e.status.map(|s| s.as_str().to_string()).unwrap_or_default()),
                EventKind::Progress => {
                    if let Some(p) = e.progress {
                        bar.set_position(p as u64);
                    }
                    if let Some(s) = &e.stage {
                        bar.set_message(s.clone());
                    }
                }
                EventKind::Message => bar.println(e.message.clone().unwrap_or_default()),
                EventKind::Retrying => bar.println(retrying_line(e)),
                _ => {}
            }
        })
        .await?;
    if at_terminal {
        bar.finish_with_message(view.status.as_str().to_string());
    }
    if let Some(e) = &view.error {
        eprintln!("{}: {}", e.code.as_str(), e.message);
    }
    download_all(&client, &view.artifacts, &args.out.join(&view.job_id), format).await?;
    if format == Format::Json {
        print_json(&view);
    }
    if view.status == JobState::Completed {
        Ok(())
    } else {
        Err(Failure::job(format!("job {} ended {}", view.job_id, view.status.as_str())))
    }
}

/// `kiln status`: the job's view, JSON by default.
pub async fn status(StatusArgs { job_id, conn }: StatusArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    print_as(Format::choose(output, false, Format::Json), &c.status(&job_id).await?);
    Ok(())
}

/// `kiln result`: downloads a finished job's results (`--output json`: then prints the job id,
/// its status, error and the files written); exits 1 unless the job completed.
pub async fn result(ResultArgs { job_id, out, wait, conn }: ResultArgs, output: Option<Format>) -> Result<(), Failure> {
    let format = Format::choose(output, false, Format::Table);
    let c = connect(&conn).await?;
    let view = if wait { c.wait(&job_id, Duration::from_secs(24 * 3600), |_| {}).await? } else { c.status(&job_id).await? };
    if !view.status.is_terminal() {
        return Err(Failure::job(format!("job {job_id} is {}; nothing to download yet (--wait waits for its end)", view.status.as_str())));
    }
    let files = download_all(&c, &view.artifacts, &out, format).await?;
    if format == Format::Json {
        print_json(&serde_json::json!({"job_id": view.job_id, "status": view.status, "error": view.error, "files": files}));
    }
    match (&view.status, &view.error) {
        (JobState::Completed, _) => Ok(()),
        (status, Some(e)) => Err(Failure::job(format!("job {job_id} ended {}: {}: {}", status.as_str(), e.code.as_str(), e.message))),
        (status, None) => Err(Failure::job(format!("job {job_id} ended {}", status.as_str()))),
    }
}

/// `kiln cancel`: the job's view after the cancel, JSON by default.
pub async fn cancel(CancelArgs { job_id, conn }: CancelArgs, output: Option<Format>) -> Result<(), Failure> {
    let c = connect(&conn).await?;
    print_as(Format::choose(output, false, Format::Json), &c.cancel(&job_id).await?);
    Ok(())
}

/// `kiln jobs`: the list, newest first, as a table or JSON.
pub async fn list(
    JobsArgs { status, model, dead_letter, labels, limit, json, conn }: JobsArgs,
    output: Option<Format>,
) -> Result<(), Failure> {
    let status = match status {
        Some(s) => Some(
            serde_json::from_value(serde_json::Value::String(s.clone())).map_err(|_| Failure::usage(format!("unknown status {s:?}")))?,
        ),
        None => None,
    };
    let labels = parse_labels(&labels).map_err(Failure::usage)?;
    let c = connect(&conn).await?;
    let reply = c.jobs(&ListJobsRequest { status, model, dead_letter, limit: Some(limit), labels }).await?;
    if Format::choose(output, json, Format::Table) == Format::Json {
        print_json(&reply);
        return Ok(());
    }
    let mut table = Table::new(&[
        ("JOB", Align::Left),
        ("MODEL", Align::Left),
        ("STATUS", Align::Left),
        ("ATTEMPT", Align::Right),
        ("ERROR", Align::Left),
    ]);
    for j in reply.jobs {
        let err = j.error.map(|e| format!("{}: {}", e.code.as_str(), e.message)).unwrap_or_default();
        table.row(vec![j.job_id, j.model, j.status.as_str().into(), format!("{}/{}", j.attempt, j.max_attempts), err]);
    }
    println!("{}", table.render());
    Ok(())
}

/// One event of a job as a plain progress line (`submit --wait` when stderr is not a
/// terminal); `None` for the events a person need not see (artifacts are listed at the end).
fn progress_line(e: &Event) -> Option<String> {
    match e.kind {
        EventKind::Status => Some(format!("job {}: {}", e.job_id, e.status.map(|s| s.as_str()).unwrap_or("?"))),
        EventKind::Progress => {
            let percent = e.progress.map(|p| format!(" {p:.0}%")).unwrap_or_default();
            let stage = e.stage.as_deref().map(|s| format!(" {s}")).unwrap_or_default();
            Some(format!("job {}: progress{percent}{stage}", e.job_id))
        }
        EventKind::Message => Some(format!("job {}: {}", e.job_id, e.message.as_deref().unwrap_or(""))),
        EventKind::Retrying => Some(retrying_line(e)),
        _ => None,
    }
}

/// A `retrying` event as a line: the new attempt, its reason's code and what happened.
fn retrying_line(e: &Event) -> String {
    let reason = e.reason.map(|r| r.as_str()).unwrap_or("unknown");
    let message = e.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    format!("job {}: retrying, attempt {} ({reason}){message}", e.job_id, e.attempt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::retry_reason::RetryReason;

    #[test]
    fn a_retrying_event_prints_a_line_with_its_attempt_and_reason() {
        let e = Event::retrying("j1", 2, RetryReason::WorkerCrashed, "attempt 1 failed on n1 (cpu:0): worker died".into(), None);
        assert_eq!(
            progress_line(&e).as_deref(),
            Some("job j1: retrying, attempt 2 (worker_crashed): attempt 1 failed on n1 (cpu:0): worker died")
        );
    }
}
