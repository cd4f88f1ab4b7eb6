//! A real NATS cluster to hurt: N nats-servers on loopback (JetStream, a store and a monitoring
//! port each) that `kiln chaos --nats-cluster 3` and `tests/nats_cluster.rs` SIGKILL, stop,
//! wipe and partition, and read back through the servers' own monitoring (`/jsz`, `/healthz`,
//! `/routez`) and the JetStream API.
//!
//! A partitionable cluster routes every server pair through [`LinkProxy`]s, one per ordered pair
//! (`i` solicits `j` through proxy `(i, j)`), so cutting every proxy that involves server `c`
//! cuts all of its routes while its clients stay connected to it, as in a real partition. Route
//! gossip would get around the proxies: a server tells its peers its cluster address, and a peer
//! that has no route to it yet dials that address directly (an implicit route), which no proxy
//! sits on (seen with nats-server 2.15: a "partitioned" server kept two direct routes). So every
//! server advertises the address of a proxy that is cut for good: implicit routes are refused,
//! and only the explicit ones through the pair proxies exist (`routes(c)` is 0 while `c` is cut).
//! Clients are told nothing of the other servers either (`--no_advertise`), so a client that
//! reaches a server through a proxy of `kiln chaos` reconnects through its proxies only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use kiln_core::nats::{ClusterMember, NatsServer};

use super::proxy::LinkProxy;
use super::wait_until;

pub struct ChaosNatsCluster {
    /// Each server behind a lock: kills and restarts block (a start waits for the port), so they
    /// run on tokio's blocking pool.
    pub servers: Vec<Arc<Mutex<NatsServer>>>,
    members: Vec<ClusterMember>,
    /// The route proxies of a partitionable cluster: `(i, j, proxy)`, server `i` soliciting `j`.
    route_proxies: Vec<(usize, usize, LinkProxy)>,
    /// What every server advertises as its route address: refuses every connection, so gossip
    /// cannot open a route around the pair proxies.
    _gossip_sink: Option<LinkProxy>,
    http: reqwest::Client,
    /// The store dirs when the caller gave no folder.
    _temp: Option<tempfile::TempDir>,
}

impl ChaosNatsCluster {
    /// Starts `n` servers named `n0`, `n1`... storing under `dir` (a temp dir when `None`).
    /// `partitionable`: routes through pair proxies, so that [`ChaosNatsCluster::partition`]
    /// works; otherwise direct routes. Returns once every server accepts clients; call
    /// [`ChaosNatsCluster::wait_ready`] before creating replicated streams.
    pub async fn start(n: usize, dir: Option<&Path>, partitionable: bool) -> Result<ChaosNatsCluster, String> {
        let temp = match dir {
            Some(_) => None,
            None => Some(tempfile::Builder::new().prefix("kiln-nats-cluster-").tempdir().map_err(|e| e.to_string())?),
        };
        let dir: PathBuf = dir.map(Path::to_path_buf).unwrap_or_else(|| temp.as_ref().expect("temp").path().to_path_buf());
        let mut members = ClusterMember::allocate(&dir, n).map_err(|e| e.to_string())?;
        let mut route_proxies = vec![];
        let mut gossip_sink = None;
        if partitionable {
            let sink = LinkProxy::start(members[0].cluster_port).await.map_err(|e| e.to_string())?;
            sink.cut();
            for i in 0..n {
                for j in (0..n).filter(|&j| j != i) {
                    route_proxies.push((i, j, LinkProxy::start(members[j].cluster_port).await.map_err(|e| e.to_string())?));
                }
            }
            for (i, member) in members.iter_mut().enumerate() {
                member.routes = route_proxies.iter().filter(|(from, _, _)| *from == i).map(|(_, _, p)| p.url()).collect();
                member.advertise = Some(format!("127.0.0.1:{}", sink.port));
                member.no_advertise = true;
            }
            gossip_sink = Some(sink);
        } else {
            ClusterMember::route_to_each_other(&mut members);
        }
        let to_start = members.clone();
        let servers = tokio::task::spawn_blocking(move || {
            to_start
                .iter()
                .map(|m| NatsServer::start_member(m, "kiln-chaos").map(|s| Arc::new(Mutex::new(s))))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().map_err(|e| e.to_string())?;
        Ok(ChaosNatsCluster { servers, members, route_proxies, _gossip_sink: gossip_sink, http, _temp: temp })
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every server's URL, comma-separated: `nats.url` for a client of the whole cluster.
    pub fn url(&self) -> String {
        self.urls_of(&(0..self.len()).collect::<Vec<_>>())
    }

    /// The URLs of some servers only (a client that knows only the majority, or one server).
    pub fn urls_of(&self, servers: &[usize]) -> String {
        servers.iter().map(|&i| format!("nats://127.0.0.1:{}", self.members[i].port)).collect::<Vec<_>>().join(",")
    }

    pub fn port(&self, i: usize) -> u16 {
        self.members[i].port
    }

    /// The server's name (`n0`...): what stream infos and `/jsz` call it.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].lock().unwrap_or_else(|e| e.into_inner()).is_running()
    }

    /// SIGKILL: no flush, no leadership handed over.
    pub async fn kill(&self, i: usize) {
        let server = self.servers[i].clone();
        let _ = tokio::task::spawn_blocking(move || server.lock().unwrap_or_else(|e| e.into_inner()).kill()).await;
    }

    /// SIGTERM: the server hands its leaderships over before it exits.
    pub async fn stop(&self, i: usize) {
        let server = self.servers[i].clone();
        let _ = tokio::task::spawn_blocking(move || server.lock().unwrap_or_else(|e| e.into_inner()).stop()).await;
    }

    /// Starts the server again on its ports and store (stopping it first if it runs).
    pub async fn restart(&self, i: usize) -> Result<(), String> {
        let server = self.servers[i].clone();
        tokio::task::spawn_blocking(move || server.lock().unwrap_or_else(|e| e.into_inner()).restart())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Deletes a stopped server's JetStream data (its whole `jetstream/` folder: streams, RAFT
    /// logs, the meta group's state), as a lost or replaced disk would.
    pub fn wipe(&self, i: usize) -> Result<(), String> {
        let server = self.servers[i].lock().unwrap_or_else(|e| e.into_inner());
        if server.is_running() {
            return Err(format!("{} runs: stop it before wiping its store", self.members[i].name));
        }
        let jetstream = server.store_dir().join("jetstream");
        match std::fs::remove_dir_all(&jetstream) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", jetstream.display())),
        }
    }

    /// Cuts every route of server `i` (both directions); its clients stay connected to it.
    pub fn partition(&self, i: usize) -> Result<(), String> {
        if self.route_proxies.is_empty() {
            return Err("this cluster routes directly: start it partitionable".into());
        }
        for (_, _, proxy) in self.route_proxies.iter().filter(|(a, b, _)| *a == i || *b == i) {
            proxy.cut();
        }
        Ok(())
    }

    /// Restores server `i`'s routes (the servers dial again within about a second).
    pub fn heal(&self, i: usize) {
        for (_, _, proxy) in self.route_proxies.iter().filter(|(a, b, _)| *a == i || *b == i) {
            proxy.restore();
        }
    }

    async fn monitor(&self, i: usize, path: &str) -> Result<serde_json::Value, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.members[i].monitor_port);
        let response = self.http.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.map_err(|e| format!("{url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{url}: {status}: {body}"));
        }
        Ok(body)
    }

    /// `/jsz` of server `i` (with `?accounts=true&streams=true`: every stream's state there).
    pub async fn jsz(&self, i: usize, streams: bool) -> Result<serde_json::Value, String> {
        self.monitor(i, if streams { "/jsz?accounts=true&streams=true" } else { "/jsz" }).await
    }

    /// The JetStream meta leader, as the first running server that knows one says.
    pub async fn meta_leader(&self) -> Option<String> {
        for i in (0..self.len()).filter(|&i| self.is_running(i)) {
            if let Ok(jsz) = self.jsz(i, false).await {
                if let Some(leader) = jsz["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty()) {
                    return Some(leader.to_string());
                }
            }
        }
        None
    }

    /// `/healthz` of server `i` answers 200: it runs, and its JetStream is current with the
    /// meta leader and with every stream and consumer it holds.
    pub async fn healthy(&self, i: usize) -> bool {
        self.monitor(i, "/healthz").await.is_ok()
    }

    /// Routes server `i` has now (each peer counts once per pooled connection).
    pub async fn routes(&self, i: usize) -> Result<u64, String> {
        Ok(self.monitor(i, "/routez").await?["num_routes"].as_u64().unwrap_or(0))
    }

    /// Server `i`'s own copy of a stream: (messages, last sequence), from its `/jsz`.
    pub async fn stream_state(&self, i: usize, stream: &str) -> Result<(u64, u64), String> {
        let jsz = self.jsz(i, true).await?;
        let details = jsz["account_details"].as_array().cloned().unwrap_or_default();
        let found = details
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == stream)
            .ok_or_else(|| format!("{} holds no stream {stream}", self.members[i].name))?;
        Ok((found["state"]["messages"].as_u64().unwrap_or(0), found["state"]["last_seq"].as_u64().unwrap_or(0)))
    }

    /// Waits (at most `limit`) until every server answers `/healthz` and has its full set of
    /// routes, and the meta group has a leader. Returns how long that took.
    pub async fn wait_ready(&self, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let peers = (self.len() - 1) as u64;
        let ready = wait_until(limit, || async {
            for i in 0..self.len() {
                if !self.healthy(i).await || self.routes(i).await.map_or(true, |r| r < peers) {
                    return false;
                }
            }
            self.meta_leader().await.is_some()
        })
        .await;
        if ready {
            Ok(started.elapsed())
        } else {
            Err(format!("the NATS cluster was not ready within {limit:?}"))
        }
    }

    /// Waits (at most `limit`) until server `i` is a current member again: its `/healthz`
    /// passes and, for every stream named, the stream's leader reports it current with no lag
    /// (or it leads the stream). Returns how long that took.
    pub async fn wait_current(&self, i: usize, js: &jetstream::Context, streams: &[String], limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let name = self.members[i].name.clone();
        let last = Arc::new(Mutex::new(String::new()));
        let current = wait_until(limit, || {
            let (name, last) = (name.clone(), last.clone());
            async move {
                if !self.healthy(i).await {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = "its /healthz fails".into();
                    return false;
                }
                for stream in streams {
                    match replica_state(js, stream, &name).await {
                        Ok(ReplicaState::Leader) | Ok(ReplicaState::Current) => {}
                        Ok(other) => {
                            *last.lock().unwrap_or_else(|e| e.into_inner()) = format!("{stream}: {other:?}");
                            return false;
                        }
                        Err(e) => {
                            *last.lock().unwrap_or_else(|e| e.into_inner()) = format!("{stream}: {e}");
                            return false;
                        }
                    }
                }
                true
            }
        })
        .await;
        if current {
            Ok(started.elapsed())
        } else {
            Err(format!("{name} was not current within {limit:?}: {}", last.lock().unwrap_or_else(|e| e.into_inner())))
        }
    }
}

/// What a stream's leader says of one of its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    Leader,
    /// Current, no lag.
    Current,
    Behind {
        current: bool,
        lag: u64,
        offline: bool,
    },
    /// Not among the stream's peers.
    NotAPeer,
}

/// How server `name` stands in `stream`'s RAFT group, as its leader reports it.
pub async fn replica_state(js: &jetstream::Context, stream: &str, name: &str) -> Result<ReplicaState, String> {
    let info = stream_info(js, stream).await?;
    let cluster = info.cluster.ok_or_else(|| format!("{stream} has no cluster info"))?;
    if cluster.leader.as_deref() == Some(name) {
        return Ok(ReplicaState::Leader);
    }
    Ok(match cluster.replicas.iter().find(|r| r.name == name) {
        None => ReplicaState::NotAPeer,
        Some(r) if r.current && r.lag.unwrap_or(0) == 0 && !r.offline => ReplicaState::Current,
        Some(r) => ReplicaState::Behind { current: r.current, lag: r.lag.unwrap_or(0), offline: r.offline },
    })
}

/// The leader of a stream now (`None` while it has none).
pub async fn stream_leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    stream_info(js, stream).await.ok()?.cluster?.leader
}

async fn stream_info(js: &jetstream::Context, stream: &str) -> Result<jetstream::stream::Info, String> {
    let ask = async {
        let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        s.info().await.cloned().map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), ask).await.map_err(|_| format!("stream info of {stream} timed out"))?
}

/// Every stream in the account (the jobs queue, events, every KV bucket and object store).
pub async fn stream_names(js: &jetstream::Context) -> Result<Vec<String>, String> {
    use futures::TryStreamExt;
    let names = tokio::time::timeout(Duration::from_secs(5), js.stream_names().try_collect::<Vec<String>>()).await;
    let mut names = names.map_err(|_| "listing the streams timed out".to_string())?.map_err(|e| e.to_string())?;
    names.sort();
    Ok(names)
}

/// Asks `stream`'s leader to step down in favour of server `preferred` (nats-server 2.11+
/// takes a placement with a preferred server); true once `preferred` leads it.
pub async fn move_stream_leader(js: &jetstream::Context, client: &async_nats::Client, stream: &str, preferred: &str) -> bool {
    let body = serde_json::json!({ "placement": { "preferred": preferred } }).to_string();
    let prefix = "$JS.API";
    let subject = format!("{prefix}.STREAM.LEADER.STEPDOWN.{stream}");
    wait_until(Duration::from_secs(20), || {
        let (subject, body) = (subject.clone(), body.clone());
        async move {
            if stream_leader(js, stream).await.as_deref() == Some(preferred) {
                return true;
            }
            let _ = tokio::time::timeout(Duration::from_secs(3), client.request(subject, body.into())).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            stream_leader(js, stream).await.as_deref() == Some(preferred)
        }
    })
    .await
}
