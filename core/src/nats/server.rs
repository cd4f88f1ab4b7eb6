//! A real `nats-server` child process with JetStream, for `kiln up`, the benchmark and the
//! tests. It is killed when the handle drops, so a failing test leaves no server behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("nats-server not found: run scripts/setup.sh, or set KILN_NATS_SERVER to its path")]
    NotFound,
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: PathBuf, source: std::io::Error },
    #[error("nats-server did not accept connections on port {port} within {waited:?}; its log: {log}")]
    NotReady { port: u16, waited: Duration, log: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Finds the pinned server: `$KILN_NATS_SERVER`, then `$KILN_CACHE/venv/bin/nats-server`
/// (where `scripts/setup.sh` installs it), then `nats-server` on `PATH`.
pub fn find_server_binary() -> Result<PathBuf, ServerError> {
    if let Ok(p) = std::env::var("KILN_NATS_SERVER") {
        if Path::new(&p).is_file() {
            return Ok(p.into());
        }
    }
    let cached = crate::cache_dir().join("venv/bin/nats-server");
    if cached.is_file() {
        return Ok(cached);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("nats-server")).find(|p| p.is_file()))
        .ok_or(ServerError::NotFound)
}

/// A free TCP port on loopback, for a server that binds it soon after. Taken below the
/// kernel's ephemeral range: a port the OS hands out for `bind(0)` lies in that range, where
/// any outgoing connection (a node's, a client's, a route's) may take it as its source port
/// before the server binds it, and the server then dies with "address already in use" (seen
/// in the suite: a cluster member's route port). Below the range a port is bound only by
/// whoever asked for it, and this process never hands the same one out twice.
pub fn free_port() -> std::io::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = ephemeral_range_start();
    let floor = 10_000u16.min(ephemeral_low / 2);
    let span = ephemeral_low.saturating_sub(floor).max(1);
    // A random start, so that processes asking at once (a test and the `kiln` it runs) do not
    // walk the same ports in the same order.
    let start = std::collections::hash_map::RandomState::new().build_hasher().finish() % u64::from(span);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for step in 0..u64::from(span) {
        let port = floor + ((start + step) % u64::from(span)) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The lowest port the kernel picks for `bind(0)` and outgoing connections (Linux's default
/// where it cannot be read).
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store_dir: PathBuf,
    log_path: PathBuf,
    bin: PathBuf,
    /// A server config file (`-c`): accounts, users and permissions, TLS.
    config_file: Option<PathBuf>,
    /// `nats`, or `tls` for a server that requires TLS: the scheme of [`NatsServer::url`].
    scheme: &'static str,
    /// The HTTP monitoring port (`-m`: `/varz`, `/jsz`, `/connz`), when asked for.
    monitor_port: Option<u16>,
    /// More command-line arguments: a cluster member's name, cluster port and routes.
    extra_args: Vec<String>,
    /// Keeps a temp store dir alive for the server's life when the caller gave none.
    _temp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server on a free port with JetStream in a fresh temp dir.
    pub fn start_temp() -> Result<Self, ServerError> {
        let temp = tempfile::Builder::new().prefix("kiln-nats-").tempdir()?;
        let mut server = Self::start(temp.path(), 0)?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Like [`NatsServer::start_temp`], with the HTTP monitoring endpoint on a free port
    /// (`kiln bench` reads its counters before and after each run).
    pub fn start_temp_monitored() -> Result<Self, ServerError> {
        let temp = tempfile::Builder::new().prefix("kiln-nats-").tempdir()?;
        let bin = find_server_binary()?;
        let mut server = NatsServer {
            child: None,
            port: free_port()?,
            store_dir: temp.path().to_path_buf(),
            log_path: temp.path().join("nats-server.log"),
            bin,
            config_file: None,
            scheme: "nats",
            monitor_port: Some(free_port()?),
            extra_args: vec![],
            _temp: Some(temp),
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts a server storing JetStream under `store_dir` on `port` (0: a free one).
    pub fn start(store_dir: &Path, port: u16) -> Result<Self, ServerError> {
        Self::start_inner(store_dir, port, None)
    }

    /// Like [`NatsServer::start_temp`], with a server config file (`nats-server -c`) for
    /// authentication, permissions or TLS. The host, port, JetStream and store flags are still
    /// given on the command line and win over the file. `tls: true` makes [`NatsServer::url`]
    /// a `tls://` URL.
    pub fn start_with_config(config_file: &Path, tls: bool) -> Result<Self, ServerError> {
        let temp = tempfile::Builder::new().prefix("kiln-nats-").tempdir()?;
        let mut server = Self::start_inner(temp.path(), 0, Some(config_file.to_path_buf()))?;
        if tls {
            server.scheme = "tls";
        }
        server._temp = Some(temp);
        Ok(server)
    }

    fn start_inner(store_dir: &Path, port: u16, config_file: Option<PathBuf>) -> Result<Self, ServerError> {
        let bin = find_server_binary()?;
        let port = if port == 0 { free_port()? } else { port };
        std::fs::create_dir_all(store_dir)?;
        let mut server = NatsServer {
            child: None,
            port,
            store_dir: store_dir.to_path_buf(),
            log_path: store_dir.join("nats-server.log"),
            bin,
            config_file,
            scheme: "nats",
            monitor_port: None,
            extra_args: vec![],
            _temp: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.config_file {
            command.arg("-c").arg(config);
        }
        if let Some(port) = self.monitor_port {
            command.args(["-m", &port.to_string()]);
        }
        command.args(&self.extra_args);
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.store_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .stdin(Stdio::null());
        // Tied: a server this process started must not outlive it (a SIGKILLed `kiln chaos`
        // left its server running).
        let child = crate::child::spawn_tied(command).map_err(|source| ServerError::Spawn { bin: self.bin.clone(), source })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), ServerError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: String = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        Err(ServerError::NotReady { port: self.port, waited: start.elapsed(), log: tail })
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// The server's log (stderr), e.g. to find the permission violations it reported.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The folder given to `-sd`: JetStream keeps its data in `jetstream/` below it (the log
    /// lives beside it).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// `http://127.0.0.1:PORT` of the monitoring endpoint, if the server has one.
    pub fn monitor_url(&self) -> Option<String> {
        self.monitor_port.map(|p| format!("http://127.0.0.1:{p}"))
    }

    /// The server process's id while it runs (to read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the server at once (SIGKILL: no flush, no goodbye to its peers) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts it again on the same port with the same JetStream store.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One member of a NATS cluster: where it listens and which routes it solicits.
#[derive(Debug, Clone)]
pub struct ClusterMember {
    /// The server's name (`-n`): JetStream's RAFT groups know a peer by it.
    pub name: String,
    pub store_dir: PathBuf,
    /// The client port.
    pub port: u16,
    /// The route (cluster) port.
    pub cluster_port: u16,
    /// The HTTP monitoring port (`/jsz`, `/healthz`, `/routez`).
    pub monitor_port: u16,
    /// The route URLs it solicits (`--routes`).
    pub routes: Vec<String>,
    /// The route URL it tells its peers to gossip (`--cluster_advertise`); its listen address
    /// when `None`.
    pub advertise: Option<String>,
    /// Tell clients nothing of the other servers (`--no_advertise`): a client that reaches
    /// the server through a proxy would otherwise fail over straight to the others' ports.
    pub no_advertise: bool,
}

impl ClusterMember {
    /// Free loopback ports for `n` members named `n0`, `n1`... storing under `dir/<name>`, with
    /// no routes yet.
    pub fn allocate(dir: &Path, n: usize) -> std::io::Result<Vec<ClusterMember>> {
        (0..n)
            .map(|i| {
                Ok(ClusterMember {
                    name: format!("n{i}"),
                    store_dir: dir.join(format!("n{i}")),
                    port: free_port()?,
                    cluster_port: free_port()?,
                    monitor_port: free_port()?,
                    routes: vec![],
                    advertise: None,
                    no_advertise: false,
                })
            })
            .collect()
    }

    /// Routes every member straight to every other one's cluster port.
    pub fn route_to_each_other(members: &mut [ClusterMember]) {
        let cluster_ports: Vec<u16> = members.iter().map(|m| m.cluster_port).collect();
        for (i, member) in members.iter_mut().enumerate() {
            member.routes =
                cluster_ports.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, c)| format!("nats://127.0.0.1:{c}")).collect();
        }
    }
}

impl NatsServer {
    /// Starts one member of cluster `cluster_name` and waits until it accepts client
    /// connections (not until it has found its peers).
    pub fn start_member(member: &ClusterMember, cluster_name: &str) -> Result<NatsServer, ServerError> {
        std::fs::create_dir_all(&member.store_dir)?;
        let mut extra_args = vec![
            "-n".into(),
            member.name.clone(),
            "--cluster_name".into(),
            cluster_name.into(),
            "--cluster".into(),
            format!("nats://127.0.0.1:{}", member.cluster_port),
            "--routes".into(),
            member.routes.join(","),
        ];
        if let Some(advertise) = &member.advertise {
            extra_args.extend(["--cluster_advertise".into(), advertise.clone()]);
        }
        if member.no_advertise {
            extra_args.push("--no_advertise=true".into());
        }
        let mut server = NatsServer {
            child: None,
            port: member.port,
            log_path: member.store_dir.join("nats-server.log"),
            store_dir: member.store_dir.clone(),
            bin: find_server_binary()?,
            config_file: None,
            scheme: "nats",
            monitor_port: Some(member.monitor_port),
            extra_args,
            _temp: None,
        };
        server.spawn()?;
        Ok(server)
    }
}

/// A real NATS cluster on loopback: `n` servers, each with JetStream and its own store dir,
/// routed to each other, for tests of replicated streams and fail-over. Killed on drop.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    _temp: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers named `n0`, `n1`... in cluster `kiln-test`, each listing every other
    /// server's cluster port as a route and serving monitoring, and waits until each accepts
    /// connections.
    pub fn start(n: usize) -> Result<NatsCluster, ServerError> {
        let temp = tempfile::Builder::new().prefix("kiln-nats-cluster-").tempdir()?;
        let mut members = ClusterMember::allocate(temp.path(), n)?;
        ClusterMember::route_to_each_other(&mut members);
        let servers = members.iter().map(|m| NatsServer::start_member(m, "kiln-test")).collect::<Result<_, _>>()?;
        Ok(NatsCluster { servers, _temp: temp })
    }

    /// Every server's URL, comma-separated: `nats.url` for a client of the whole cluster.
    pub fn url(&self) -> String {
        self.servers.iter().map(|s| s.url()).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_range_start();
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        for port in ports {
            assert!(port < low, "{port} is in the ephemeral range (from {low})");
            TcpListener::bind(("127.0.0.1", port)).expect("free");
        }
    }
}
