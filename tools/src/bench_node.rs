//! What every `kiln bench` row measures with (`bench`, `bench_tracing`, `kiln scale`): the
//! options, the figures (p50, p99, per second), the no-op job loop timed from submit to its
//! terminal event, a `kiln node` child process and the CPU it and nats-server spend per job.
//! A file of its own so the rows' files use it without using each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_client::Client;
use kiln_core::protocol::{Event, SubmitRequest};
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub jobs: usize,
    pub concurrency: usize,
    pub slots: usize,
    /// An existing NATS to use instead of a temp server.
    pub nats: Option<String>,
    /// The duty-cycle run's no-op holds its one slot this long (0: no such run).
    pub work_ms: u64,
    /// Replicas of every stream (Kiln's and the floor's); `nats.replicas` otherwise.
    pub replicas: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub per_second: f64,
}

pub fn figures(mut samples: Vec<Duration>, wall: Duration) -> Figures {
    samples.sort();
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    Figures { count: samples.len(), p50_ms: pct(0.50), p99_ms: pct(0.99), per_second: samples.len() as f64 / wall.as_secs_f64() }
}

/// Kiln: `concurrency` loops of submit -> wait for the terminal event, `n` jobs in all, each
/// job `make(i)` (its model must be `model`).
/// `n` plain no-op jobs, `concurrency` in flight, each timed from submit to its terminal event.
pub async fn kiln(client: &Client, prefix: &str, n: usize, concurrency: usize) -> Result<Figures, String> {
    kiln_jobs(client, prefix, n, concurrency, |_| SubmitRequest { model: "noop".into(), ..Default::default() }).await
}

/// How many users the fair-share row's jobs come from, in turn.
pub const FAIR_USERS: usize = 8;

/// As [`kiln`], each job labelled `user_id` = one of [`FAIR_USERS`] users in turn: every user
/// has its own queue, taken in fair order (`kiln_core::fair`), where [`kiln`]'s unlabelled jobs
/// share one first-in-first-out queue.
pub async fn kiln_fair(client: &Client, prefix: &str, n: usize, concurrency: usize) -> Result<Figures, String> {
    kiln_jobs(client, prefix, n, concurrency, |i| SubmitRequest {
        model: "noop".into(),
        labels: [("user_id".to_string(), format!("user-{}", i % FAIR_USERS))].into(),
        ..Default::default()
    })
    .await
}

/// Terminal events seen by the benchmark: waiters by job id, and events that came first.
#[derive(Default)]
struct Arrivals {
    waiting: HashMap<String, oneshot::Sender<Instant>>,
    early: HashMap<String, Instant>,
}

pub(crate) async fn kiln_jobs(
    client: &Client,
    prefix: &str,
    n: usize,
    concurrency: usize,
    make: impl Fn(usize) -> SubmitRequest + Send + Sync + Copy + 'static,
) -> Result<Figures, String> {
    // Terminal events by job id: a waiter registered after its submit's reply, or the time the
    // event came if it overtook the reply.
    let waiters: Arc<Mutex<Arrivals>> = Arc::default();
    let mut sub = client.nats().subscribe(format!("{prefix}.events.*")).await.map_err(|e| e.to_string())?;
    let w = waiters.clone();
    let listener = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Ok(e) = serde_json::from_slice::<Event>(&m.payload) {
                if e.is_terminal() {
                    let now = Instant::now();
                    let mut arrivals = w.lock().expect("lock");
                    match arrivals.waiting.remove(&e.job_id) {
                        Some(tx) => {
                            let _ = tx.send(now);
                        }
                        None => {
                            arrivals.early.insert(e.job_id, now);
                        }
                    }
                }
            }
        }
    });
    client.nats().flush().await.map_err(|e| e.to_string())?;
    let wall = Instant::now();
    let mut tasks = vec![];
    for w in 0..concurrency {
        let per = n / concurrency + usize::from(w < n % concurrency);
        let client = client.clone();
        let waiters = waiters.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per);
            for i in 0..per {
                // A plain submit (no idempotency key): the common case, and no record read.
                let t = Instant::now();
                let reply = client.submit(&make(i)).await.map_err(|e| e.to_string())?;
                let (tx, rx) = oneshot::channel();
                {
                    let mut arrivals = waiters.lock().expect("lock");
                    match arrivals.early.remove(&reply.job_id) {
                        Some(at) => {
                            let _ = tx.send(at);
                        }
                        None => {
                            arrivals.waiting.insert(reply.job_id.clone(), tx);
                        }
                    }
                }
                let done = tokio::time::timeout(Duration::from_secs(30), rx)
                    .await
                    .map_err(|_| format!("job {} did not finish within 30 s", reply.job_id))?
                    .map_err(|e| e.to_string())?;
                samples.push(done - t);
            }
            Ok::<_, String>(samples)
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    let fig = figures(all, wall.elapsed());
    listener.abort();
    Ok(fig)
}

/// The bench node's config: `slots` slots for `noop`, and with `work_ms` one more slot of its
/// own for `hold` (a no-op that holds its slot `work_ms`), so the duty-cycle run has exactly
/// one slot.
fn node_toml(url: &str, replicas: usize, slots: usize, work_ms: u64, work_dir: &std::path::Path) -> String {
    let noop_slots: Vec<String> = (0..slots).map(|i| format!("\"cpu:{i}\"")).collect();
    let mut all = noop_slots.clone();
    if work_ms > 0 {
        all.push(format!("\"cpu:{slots}\""));
    }
    let mut text = format!(
        "[nats]\nurl = \"{url}\"\nreplicas = {replicas}\n\n[node]\nname = \"bench\"\nslots = [{}]\nmetrics_addr = \"\"\nwork_dir = {:?}\nslot_prefetch = 1\n\n\
         [[models]]\nname = \"noop\"\nslots = [{}]\nmax_attempts = 3\ntimeout_ms = 10000\nengine = {{ kind = \"noop\" }}\n",
        all.join(", "),
        work_dir.display().to_string(),
        noop_slots.join(", ")
    );
    if work_ms > 0 {
        text.push_str(&format!(
            "\n[[models]]\nname = \"hold\"\nslots = [\"cpu:{slots}\"]\nmax_attempts = 3\ntimeout_ms = 10000\n\
             engine = {{ kind = \"noop\", work_ms = {work_ms} }}\n"
        ));
    }
    text
}

/// `kiln node` as a child process of the benchmark, so its CPU time is its own in `/proc`.
pub(crate) struct NodeChild {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl NodeChild {
    pub(crate) async fn start(url: &str, replicas: usize, slots: usize, work_ms: u64, client: &Client) -> Result<NodeChild, String> {
        Self::start_with(url, replicas, slots, work_ms, client, "", "warn").await
    }

    /// As [`NodeChild::start`], with `extra` appended to the node's config and `log` its
    /// `KILN_LOG` (the bench's own node logs only its warnings).
    pub(crate) async fn start_with(
        url: &str,
        replicas: usize,
        slots: usize,
        work_ms: u64,
        client: &Client,
        extra: &str,
        log: &str,
    ) -> Result<NodeChild, String> {
        let dir = tempfile::Builder::new().prefix("kiln-bench-").tempdir().map_err(|e| e.to_string())?;
        let config = dir.path().join("node.toml");
        let text = node_toml(url, replicas, slots, work_ms, &dir.path().join("work")) + extra;
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args(["node", "--config"])
            .arg(&config)
            .env("KILN_LOG", log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the bench node: {e}"))?;
        let node = NodeChild { child, _dir: dir };
        let want = slots + usize::from(work_ms > 0);
        let started = Instant::now();
        loop {
            if let Ok(c) = client.cluster().await {
                if c.gpus.iter().filter(|g| g.node == "bench").count() == want {
                    return Ok(node);
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the bench node did not register its slots within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeChild {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system CPU time of a process so far, from `/proc/PID/stat` (fields 14 and 15, in
/// clock ticks).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_time_of_stat(&stat)
}

fn cpu_time_of_stat(stat: &str) -> Option<Duration> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// CPU spent by the node and by nats-server during one run, per job.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CpuPerJob {
    pub node_us: f64,
    /// `None` when the server is not ours (`--nats`).
    pub server_us: Option<f64>,
}

pub(crate) struct CpuMeter {
    node: u32,
    server: Option<u32>,
    at: (Duration, Option<Duration>),
}

impl CpuMeter {
    pub(crate) fn start(node: u32, server: Option<u32>) -> CpuMeter {
        let at = (cpu_time(node).unwrap_or_default(), server.and_then(cpu_time));
        CpuMeter { node, server, at }
    }
    pub(crate) fn per_job(&self, jobs: usize) -> CpuPerJob {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / jobs.max(1) as f64;
        let node = cpu_time(self.node).unwrap_or_default().saturating_sub(self.at.0);
        let server = match (self.server.and_then(cpu_time), self.at.1) {
            (Some(now), Some(then)) => Some(per(now.saturating_sub(then))),
            _ => None,
        };
        CpuPerJob { node_us: per(node), server_us: server }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_reads_utime_and_stime_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(cpu_time_of_stat(stat), Some(Duration::from_micros(300 * 1_000_000 / hz)));
        assert_eq!(cpu_time_of_stat("garbage"), None);
    }
}
