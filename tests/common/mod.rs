//! Test harness: a real nats-server per test (free port, JetStream in a temp dir) and real
//! `kiln node` processes built by cargo, each killed when its handle drops.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::client::Client;
use kiln_core::config::NatsConfig;
use kiln_core::nats::NatsServer;
use kiln_core::protocol::{Event, EventKind, JobView};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn demo_worker() -> String {
    repo().join("examples/workers/demo_worker.py").display().to_string()
}

/// The Python with nats-py from `scripts/setup.sh`.
pub fn python_with_nats() -> PathBuf {
    if let Ok(p) = std::env::var("KILN_PYTHON") {
        return p.into();
    }
    let p = kiln_core::cache_dir().join("venv/bin/python");
    assert!(p.exists(), "no python with nats-py at {}: run scripts/setup.sh (scripts/test.sh does)", p.display());
    p
}

/// A config for test nodes: fast heartbeats and short TTLs so failures show within seconds.
/// `extra` is appended (models and overrides).
pub fn config_toml(url: &str, slots: &[&str], ack_wait_ms: u64, extra: &str) -> String {
    let slots: Vec<String> = slots.iter().map(|s| format!("{s:?}")).collect();
    format!(
        r#"
[nats]
url = "{url}"
ack_wait_ms = {ack_wait_ms}
[node]
slots = [{slots}]
metrics_addr = ""
heartbeat_ms = 300
registry_ttl_ms = 2000
loss_after_ms = 1000
[retry]
backoff_initial_ms = 100
backoff_max_ms = 1000
[restart]
max_restarts = 5
window_ms = 60000
backoff_initial_ms = 50
backoff_max_ms = 500
{extra}
"#,
        slots = slots.join(", ")
    )
}

/// The demo model, optionally restricted to some slots.
pub fn demo_model(name: &str, slots: &[&str], max_attempts: u32, timeout_ms: u64) -> String {
    let slots: Vec<String> = slots.iter().map(|s| format!("{s:?}")).collect();
    format!(
        r#"
[[models]]
name = "{name}"
engine = {{ kind = "process", command = ["python3", "{worker}"], ready_timeout_ms = 20000 }}
timeout_ms = {timeout_ms}
max_attempts = {max_attempts}
slots = [{slots}]
required_inputs = ["prompt"]
"#,
        worker = demo_worker(),
        slots = slots.join(", ")
    )
}

/// A demo-worker model entry (from [`demo_model`]) whose worker imports this checkout's
/// `kiln_worker` SDK rather than the copy `scripts/setup.sh` installed in the venv: for tests of
/// what the SDK gained in this checkout (the venv's copy is refreshed only by the next set-up).
pub fn with_checkout_sdk(model: &str) -> String {
    let src = repo().join("python/kiln-worker/src");
    model.replace(
        "ready_timeout_ms = 20000 }",
        &format!("ready_timeout_ms = 20000, env = {{ PYTHONPATH = {:?} }} }}", src.display().to_string()),
    )
}

pub const NOOP_MODEL: &str = r#"
[[models]]
name = "noop"
engine = { kind = "noop" }
"#;

pub struct NodeProcess {
    pub name: String,
    /// Extra environment for the next start (e.g. `KILN_FAULTS`).
    pub env: Vec<(String, String)>,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl NodeProcess {
    pub fn spawn(dir: &Path, name: &str, config: &str) -> NodeProcess {
        Self::spawn_with_env(dir, name, config, &[])
    }

    pub fn spawn_with_env(dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> NodeProcess {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut node = NodeProcess { name: name.into(), env, config_path, log_path: dir.join(format!("{name}.log")), child: None };
        node.start();
        node
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["node", "--config"])
            .arg(&self.config_path)
            .args(["--node-name", &self.name])
            .env("KILN_LOG", "info,async_nats=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of its log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status.code().unwrap_or(-1));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of node {} ----\n{}", self.name, self.log());
        }
        self.kill();
    }
}

/// Fields drop in order: the nodes first (printing their logs if the test failed), then the
/// folder holding those logs, then the server.
pub struct TestCluster {
    pub nodes: Vec<NodeProcess>,
    pub dir: tempfile::TempDir,
    pub server: NatsServer,
    /// How [`TestCluster::client`] connects: the server's URL and prefix `kiln`, with the
    /// credentials and TLS settings a test sets.
    pub client_nats: NatsConfig,
}

impl TestCluster {
    pub fn new() -> TestCluster {
        Self::with_server(NatsServer::start_temp().expect("nats-server (run scripts/setup.sh)"))
    }

    /// A cluster on a server the test started (with a config file: accounts, TLS).
    pub fn with_server(server: NatsServer) -> TestCluster {
        TestCluster { client_nats: NatsConfig::for_url(&server.url()), server, dir: tempfile::tempdir().unwrap(), nodes: vec![] }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn add_node(&mut self, name: &str, config: &str) -> usize {
        self.add_node_with_env(name, config, &[])
    }

    pub fn add_node_with_env(&mut self, name: &str, config: &str, env: &[(&str, &str)]) -> usize {
        self.nodes.push(NodeProcess::spawn_with_env(self.dir.path(), name, config, env));
        self.nodes.len() - 1
    }

    pub async fn client(&self) -> Client {
        Client::connect_with(&self.client_nats).await.unwrap()
    }

    /// Waits until every slot of `node` shows in the registry.
    pub async fn wait_node_ready(&self, node: &str, slots: usize) {
        let client = self.client().await;
        let ok = eventually(Duration::from_secs(20), || async {
            match client.cluster().await {
                Ok(c) => c.gpus.iter().filter(|g| g.node == node).count() == slots,
                Err(_) => false,
            }
        })
        .await;
        assert!(
            ok,
            "node {node} did not register {slots} slots; log:\n{}",
            self.nodes.iter().find(|n| n.name == node).map(|n| n.log()).unwrap_or_default()
        );
    }

    /// Opens an actor-cluster session between every two nodes named (sessions open on demand:
    /// each pair is made to call, through `kiln.node.<a>.ping`) and waits until every node's
    /// registry entry lists every other; returns how long that took.
    pub async fn wait_mesh(&self, nodes: &[&str], limit: Duration) -> Duration {
        let client = self.client().await;
        let started = std::time::Instant::now();
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                let pinged = eventually(limit, || async { client.ping(a, b, 1).await.is_ok() }).await;
                if !pinged {
                    break;
                }
            }
        }
        let ok = eventually(limit, || async {
            let Ok(c) = client.cluster().await else { return false };
            nodes
                .iter()
                .all(|n| c.nodes.iter().any(|e| e.node == *n && nodes.iter().filter(|p| *p != n).all(|p| e.peers.iter().any(|q| q == p))))
        })
        .await;
        let logs: Vec<String> = self.nodes.iter().map(|n| format!("--- {}\n{}", n.name, n.log())).collect();
        assert!(ok, "no full mesh of {nodes:?} within {limit:?}: {:#?}\n{}", client.cluster().await.map(|c| c.nodes), logs.join("\n"));
        started.elapsed()
    }
}

/// Polls `check` until it is true or `limit` passes.
pub use kiln::chaos::wait_until as eventually;

/// Waits for a job's terminal state by polling its status. A request lost with a node that
/// was just killed times out after 2 s and is retried, as a client would.
pub async fn wait_terminal(client: &Client, job_id: &str, limit: Duration) -> JobView {
    let client = client.clone().with_timeout(Duration::from_secs(2));
    let start = Instant::now();
    loop {
        let v = client.status(job_id).await;
        if let Ok(v) = &v {
            if v.status.is_terminal() {
                return v.clone();
            }
        }
        assert!(start.elapsed() < limit, "job {job_id} not terminal after {limit:?}: {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole stored history of a job (what a late subscriber replays).
/// A slot's registry entry once it has settled after a job (neither busy nor loading): the
/// busy/idle flip of a job is written within 100 ms of it, not at once.
pub async fn settled_gpu(client: &Client, slot: &str) -> kiln_core::protocol::GpuEntry {
    use kiln_core::protocol::GpuState;
    let started = std::time::Instant::now();
    loop {
        let gpu = client.cluster().await.unwrap().gpus.into_iter().find(|g| g.slot == slot).expect("the slot is registered");
        if !matches!(gpu.state, GpuState::Busy | GpuState::Loading) || started.elapsed() > Duration::from_secs(5) {
            return gpu;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn history(client: &Client, job_id: &str) -> Vec<Event> {
    use futures::StreamExt;
    let events = client.events(job_id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), events.collect::<Vec<_>>()).await.expect("history ends with a terminal event")
}

pub fn statuses(events: &[Event]) -> Vec<String> {
    events.iter().filter(|e| e.kind == EventKind::Status).map(|e| e.status.unwrap().as_str().to_string()).collect()
}

pub fn params(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().unwrap()
}

/// A job for a demo-worker model: a prompt and params.
pub fn prompt_request(model: &str, prompt: &str, p: serde_json::Value) -> kiln_core::protocol::SubmitRequest {
    kiln_core::protocol::SubmitRequest {
        model: model.into(),
        inputs: [("prompt".to_string(), kiln_core::protocol::InputValue::Inline(prompt.into()))].into(),
        params: params(p),
        ..Default::default()
    }
}

/// The link proxy `kiln chaos` uses: cuts and restores one node's link to the nats-server.
#[allow(unused_imports)]
pub use kiln::chaos::LinkProxy;

/// Submits as a careful client does around failures: with an idempotency key (so a retry can
/// never make a second job) and short timeouts, retrying a request that was lost with a node.
pub async fn submit_retrying(client: &Client, mut request: kiln_core::protocol::SubmitRequest) -> String {
    request.idempotency_key.get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
    let client = client.clone().with_timeout(Duration::from_secs(1));
    for _ in 0..20 {
        match client.submit(&request).await {
            Ok(reply) => return reply.job_id,
            Err(kiln::client::ClientError::Timeout(_)) => continue,
            Err(e) => panic!("submit failed: {e}"),
        }
    }
    panic!("submit kept timing out")
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`); None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// True while the process runs (not exited, not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// A `kiln gateway` process on a free port of 127.0.0.1, killed when dropped.
pub struct GatewayProcess {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    log_path: PathBuf,
    child: Option<Child>,
}

impl GatewayProcess {
    /// Starts `kiln gateway --config <dir>/<name>.toml --nats <url> --http-addr <addr>` with
    /// `config` as the file, and waits until it serves.
    pub fn spawn(dir: &Path, name: &str, config: &str, nats_url: &str) -> GatewayProcess {
        Self::spawn_on(dir, name, config, nats_url, "127.0.0.1:0")
    }

    pub fn spawn_on(dir: &Path, name: &str, config: &str, nats_url: &str, addr: &str) -> GatewayProcess {
        use std::io::BufRead;
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["gateway", "--config"])
            .arg(&config_path)
            .args(["--nats", nats_url, "--http-addr", addr])
            .env("KILN_LOG", "info,async_nats=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("kiln gateway on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let mut gateway = GatewayProcess { base: String::new(), log_path, child: Some(child) };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(base) => gateway.base = base,
            Err(_) => panic!("gateway {name} did not start; log:\n{}", gateway.log()),
        }
        gateway
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of gateway {} ----\n{}", self.base, self.log());
        }
        self.kill();
    }
}

/// The events of an SSE body read so far: (id, event name, data).
pub fn parse_sse(text: &str) -> Vec<(Option<String>, String, String)> {
    let mut out = vec![];
    for block in text.split("\n\n") {
        let (mut id, mut name, mut data) = (None, "message".to_string(), Vec::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !data.is_empty() {
            out.push((id, name, data.join("\n")));
        }
    }
    out
}

/// Reads an SSE response to its end (the gateway closes it after the terminal event), at most
/// `limit`; the events.
pub async fn read_sse(response: reqwest::Response, limit: Duration) -> Vec<(Option<String>, String, String)> {
    let body = tokio::time::timeout(limit, response.text()).await.expect("the event stream did not end").expect("body");
    parse_sse(&body)
}

/// An HTTP client with a short connect timeout.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().unwrap()
}

// ---- Client programs in other languages (nats-py, nats.js) and the docs that show them ----
// Used by tests/security.rs and tests/protocol_sessions.rs.

/// The fenced code blocks of a Markdown text whose info string is `lang` (```` ```python ````),
/// in order, without their fences.
pub fn fenced_blocks(markdown: &str, lang: &str) -> Vec<String> {
    let mut blocks = vec![];
    let mut current: Option<(bool, Vec<&str>)> = None;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed.starts_with("```") => current = Some((trimmed[3..].trim() == lang, vec![])),
            Some((wanted, lines)) if trimmed.starts_with("```") => {
                if *wanted {
                    blocks.push(lines.join("\n"));
                }
                current = None;
            }
            Some((_, lines)) => lines.push(line),
            None => {}
        }
    }
    blocks
}

/// The text of a Markdown section: from its heading line (`## A worked nats-py session`) to the
/// next heading of the same or a higher level (a `#` line inside a code block is no heading).
/// Panics, naming it, when the doc has no such heading.
pub fn doc_section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let (mut start, mut in_code) = (None, false);
    let mut offset = 0;
    for line in markdown.split_inclusive('\n') {
        let text = line.trim_end();
        if text.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code {
            let hashes = text.chars().take_while(|c| *c == '#').count();
            let is_heading = hashes > 0 && text[hashes..].starts_with(' ');
            match start {
                None if text == heading => start = Some(offset),
                Some(from) if is_heading && hashes <= level => return &markdown[from..offset],
                _ => {}
            }
        }
        offset += line.len();
    }
    let from = start.unwrap_or_else(|| panic!("the doc has no section {heading:?}"));
    &markdown[from..]
}

/// `KILN_NODE_MODULES` (from `scripts/env.sh`), checked to hold the `nats` package (nats.js,
/// pinned by `scripts/setup.sh`). Panics naming the fix: the tests that need it never skip.
pub fn node_modules_with_nats() -> PathBuf {
    const FIX: &str = "run scripts/setup.sh (it installs nats@2.29.3 into the npm cache), then `source scripts/env.sh`";
    let modules = std::env::var("KILN_NODE_MODULES").unwrap_or_else(|_| panic!("KILN_NODE_MODULES is not set: {FIX}"));
    let package = Path::new(&modules).join("nats/package.json");
    assert!(package.is_file(), "no nats.js in KILN_NODE_MODULES={modules} ({} is missing): {FIX}", package.display());
    let node = Command::new("node").arg("--version").output();
    assert!(node.as_ref().is_ok_and(|o| o.status.success()), "`node --version` failed ({node:?}): {FIX}");
    modules.into()
}

/// What a client program run by [`run_program`] did.
pub struct ProgramRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ProgramRun {
    /// Panics with both outputs unless the program exited 0.
    pub fn assert_success(&self, what: &str) {
        assert!(self.status.success(), "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}", self.status, self.stdout, self.stderr);
    }
}

/// Runs a client program (`python script.py`, `node session.js`) to its end, with `input` on its
/// stdin. One that runs past `limit` is killed with its process group, and fails the test with
/// what it printed so far.
pub async fn run_program(mut command: tokio::process::Command, input: &str, limit: Duration) -> ProgramRun {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let read = |mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>| {
        tokio::spawn(async move {
            let mut text = vec![];
            let _ = from.read_to_end(&mut text).await;
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let waited = tokio::time::timeout(limit, child.wait()).await;
    if waited.is_err() {
        if let Some(pid) = child.id() {
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
        let _ = child.wait().await;
    }
    let (stdout, stderr) = (stdout.await.unwrap(), stderr.await.unwrap());
    let Ok(status) = waited else {
        panic!("{command:?} did not finish within {limit:?}:\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    };
    ProgramRun { status: status.unwrap(), stdout, stderr }
}
