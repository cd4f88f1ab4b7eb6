//! The local cluster a chaos run storms: one nats-server (or a cluster of them), N `kiln node`
//! processes (each behind its own [`LinkProxy`], one per server), and the actions that hurt
//! them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::nats::NatsServer;

use super::nats_cluster::ChaosNatsCluster;
use super::proxy::LinkProxy;
use super::Profile;

/// The worker model and the pipeline model every node serves. The pipeline's command hangs
/// while `hang_marker` exists (the `compression_hang` fault) and otherwise copies its input.
/// `proxy_url` may list one proxy per server of a NATS cluster; every stream then has as many
/// replicas as the cluster has servers.
pub fn node_config(proxy_url: &str, profile: &Profile, python: &str, worker: &Path, hang_marker: &Path) -> String {
    let slots: Vec<String> = (0..profile.slots_per_node).map(|i| format!("\"cpu:{i}\"")).collect();
    let engine = format!(r#"{{ kind = "process", command = [{python:?}, {:?}], ready_timeout_ms = 20000 }}"#, worker.display().to_string());
    let stage_script = format!(r#"if [ -e {} ]; then sleep 600; fi; cp "$1" "$2""#, hang_marker.display());
    format!(
        r#"
[nats]
url = "{proxy_url}"
replicas = {replicas}
ack_wait_ms = 10000
[node]
slots = [{slots}]
slot_prefetch = {prefetch}
metrics_addr = ""
heartbeat_ms = 300
registry_ttl_ms = 2000
loss_after_ms = 1000
[retry]
backoff_initial_ms = 100
backoff_max_ms = 1000
[restart]
max_restarts = 100
window_ms = 60000
backoff_initial_ms = 50
backoff_max_ms = 500
[compression]
max_workers = 2
# The heavy user (user-0, half the submissions) is held to 2 running jobs per lane and 30
# queued: its submits past that are refused quota_exceeded and retried after the wait given.
[quota.keys."user-0"]
max_running = 2
max_queued = 30

[[models]]
name = "chaos"
engine = {engine}
timeout_ms = 3000
max_attempts = 5
required_inputs = ["prompt"]

[[models]]
name = "chaos-staged"
engine = {engine}
timeout_ms = 3000
max_attempts = 5
required_inputs = ["prompt"]
[[models.stages]]
kind = "command"
name = "compressing"
command = ["sh", "-c", {stage_script:?}, "sh", "{{input}}", "{{output}}"]
input = "image.png"
output = "image-post.png"
timeout_ms = 1000
max_attempts = 5
"#,
        slots = slots.join(", "),
        prefetch = profile.slot_prefetch,
        replicas = profile.nats_servers.max(1)
    )
}

pub struct NodeProcess {
    pub name: String,
    config_path: PathBuf,
    log_path: PathBuf,
    /// `KILN_FAULT_DIR` of the node: a file named after a fault point arms it once.
    pub fault_dir: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
    /// Set while a fault that takes the node away (kill, drain, link cut) has not healed, so a
    /// second one waits its turn instead of racing the first one's restart.
    pub in_fault: bool,
}

impl NodeProcess {
    pub fn start(&mut self) -> std::io::Result<()> {
        // Never two processes under one name from here (the second would be refused anyway).
        self.kill();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let mut command = Command::new(&self.binary);
        command
            .args(["node", "--config"])
            .arg(&self.config_path)
            .args(["--node-name", &self.name])
            .env("KILN_LOG", "info,async_nats=warn")
            .env("KILN_FAULT_DIR", &self.fault_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Tied: a chaos run killed by a signal must not leave its nodes running.
        let child = kiln_core::child::spawn_tied(command)?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Reaps the process if it has exited; its exit code.
    pub fn reap(&mut self) -> Option<i32> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status.code().unwrap_or(-1))
            }
            _ => None,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Start-ups this node's processes have logged (their first line, `starting`): before it
    /// a new process is still being loaded (the dynamic loader maps libtorch) and runs none of
    /// its own code, so a signal then kills it the way it kills any process.
    pub fn startups_logged(&self) -> usize {
        self.log().lines().filter(|l| l.ends_with(" starting")).count()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The NATS side of the local cluster.
pub enum Nats {
    /// One nats-server, single-replica streams.
    One(Arc<Mutex<NatsServer>>),
    /// A partitionable cluster (`--nats-cluster N`), every stream with N replicas.
    Cluster(ChaosNatsCluster),
}

/// One node's links to NATS: a proxy per server, all cut and restored together.
pub struct NodeLink {
    pub proxies: Vec<LinkProxy>,
}

impl NodeLink {
    /// The node's `nats.url`: every proxy.
    pub fn url(&self) -> String {
        self.proxies.iter().map(LinkProxy::url).collect::<Vec<_>>().join(",")
    }
    pub fn cut(&self) {
        self.proxies.iter().for_each(LinkProxy::cut);
    }
    pub fn restore(&self) {
        self.proxies.iter().for_each(LinkProxy::restore);
    }
}

pub struct LocalCluster {
    pub dir: PathBuf,
    pub nats: Nats,
    /// Every server's own URL (not through a proxy): the storm's client and the checker.
    pub server_url: String,
    pub nodes: Vec<Arc<Mutex<NodeProcess>>>,
    pub links: Vec<NodeLink>,
    pub hang_marker: PathBuf,
    /// Set while a fault has a NATS server of the cluster away: the next one waits its turn
    /// (skipped) rather than leave two of three away, which no stream survives.
    pub nats_in_fault: AtomicBool,
}

impl LocalCluster {
    pub async fn start(dir: &Path, profile: &Profile, binary: &Path, python: &str, worker: &Path) -> Result<LocalCluster, String> {
        let store = dir.join("nats");
        std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
        let (nats, ports) = if profile.nats_servers > 1 {
            let cluster = ChaosNatsCluster::start(profile.nats_servers, Some(&store), true).await?;
            cluster.wait_ready(Duration::from_secs(60)).await?;
            let ports = (0..cluster.len()).map(|i| cluster.port(i)).collect::<Vec<_>>();
            (Nats::Cluster(cluster), ports)
        } else {
            let port = kiln_core::nats::server::free_port().map_err(|e| e.to_string())?;
            let server = NatsServer::start(&store, port).map_err(|e| e.to_string())?;
            (Nats::One(Arc::new(Mutex::new(server))), vec![port])
        };
        let server_url = ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let hang_marker = dir.join("compression-hangs");
        let mut nodes = vec![];
        let mut links = vec![];
        for i in 0..profile.nodes {
            let name = format!("c{}", i + 1);
            let mut proxies = vec![];
            for &port in &ports {
                proxies.push(LinkProxy::start(port).await.map_err(|e| e.to_string())?);
            }
            let link = NodeLink { proxies };
            let config_path = dir.join(format!("{name}.toml"));
            std::fs::write(&config_path, node_config(&link.url(), profile, python, worker, &hang_marker)).map_err(|e| e.to_string())?;
            let fault_dir = dir.join("faults").join(&name);
            std::fs::create_dir_all(&fault_dir).map_err(|e| e.to_string())?;
            let mut node = NodeProcess {
                name: name.clone(),
                config_path,
                log_path: dir.join(format!("{name}.log")),
                fault_dir,
                binary: binary.to_path_buf(),
                child: None,
                in_fault: false,
            };
            node.start().map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
            nodes.push(Arc::new(Mutex::new(node)));
            links.push(link);
        }
        Ok(LocalCluster { dir: dir.to_path_buf(), nats, server_url, nodes, links, hang_marker, nats_in_fault: AtomicBool::new(false) })
    }

    /// The NATS cluster, when the run has one.
    pub fn nats_cluster(&self) -> Option<&ChaosNatsCluster> {
        match &self.nats {
            Nats::Cluster(c) => Some(c),
            Nats::One(_) => None,
        }
    }

    /// The server a NATS fault on `node` hits: `nats-server`, or a cluster server's name.
    pub fn nats_target(&self, node: usize) -> String {
        match &self.nats {
            Nats::One(_) => "nats-server".into(),
            Nats::Cluster(c) => c.name(node % c.len()).to_string(),
        }
    }

    pub fn node_name(&self, i: usize) -> String {
        self.nodes[i].lock().unwrap_or_else(|e| e.into_inner()).name.clone()
    }

    /// The model worker processes a node runs now (its children running the worker script).
    pub fn worker_pids(&self, i: usize) -> Vec<u32> {
        let Some(parent) = self.nodes[i].lock().unwrap_or_else(|e| e.into_inner()).pid() else { return vec![] };
        let mut pids = vec![];
        let Ok(entries) = std::fs::read_dir("/proc") else { return pids };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // Field 4 (after the parenthesised command) is the parent pid.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("demo_worker") {
                    pids.push(pid);
                }
            }
        }
        pids.sort_unstable();
        pids
    }

    /// Stops the nats-server (SIGTERM; on a cluster, server `target`), waits `down`, starts it
    /// again (same port, same store); on a cluster, returns once it is current again.
    pub async fn restart_server(&self, target: &str, down: Duration) -> Result<(), String> {
        match &self.nats {
            Nats::One(server) => {
                let stopping = server.clone();
                tokio::task::spawn_blocking(move || stopping.lock().unwrap_or_else(|e| e.into_inner()).stop())
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::sleep(down).await;
                let starting = server.clone();
                tokio::task::spawn_blocking(move || starting.lock().unwrap_or_else(|e| e.into_inner()).restart())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Nats::Cluster(c) => {
                let i = c.index_of(target).ok_or_else(|| format!("no server {target}"))?;
                c.stop(i).await;
                tokio::time::sleep(down).await;
                c.restart(i).await?;
                self.wait_server_current(i).await
            }
        }
    }

    /// Waits until cluster server `i` is healthy again (its `/healthz`: current with the meta
    /// leader and every stream and consumer it holds), at most 60 s.
    pub async fn wait_server_current(&self, i: usize) -> Result<(), String> {
        let Some(c) = self.nats_cluster() else { return Ok(()) };
        if super::wait_until(Duration::from_secs(60), || c.healthy(i)).await {
            Ok(())
        } else {
            Err(format!("{} was not healthy 60 s after it came back", c.name(i)))
        }
    }
}
