//! ClusterMesh: joins this node to the actor cluster, one ractor_cluster session per peer it
//! talks to, each carried by a NATS [`tunnel`](crate::tunnel).
//!
//! ```text
//! ClusterMesh
//! └── NodeServer (ractor_cluster)   authenticates sessions (cookie), syncs process groups
//!     └── NodeSession (per peer)    reads and writes its Tunnel
//! ```
//!
//! - **Sessions on demand.** A node opens a session only with a peer it needs to call (a
//!   cancel, a drain, a GPU restart, a ping: [`reach`]), and closes a session that carried no
//!   actor message for `cluster.idle_session_ms`. A full mesh would cost every node a session
//!   and its heartbeats per peer (n(n-1)/2 sessions: 4,950 at 100 nodes); on demand, a node's
//!   sessions follow what it does, not the cluster's size (docs/ARCHITECTURE.md, "Scaling").
//! - **Who dials.** Of two nodes, the one whose name sorts first; so a pair never opens two
//!   sessions at once and no election is needed. A node that needs a session with a peer that
//!   sorts first asks it to dial (`kiln.tunnel.want.<peer>`). Both then *want* the session
//!   until it idles out, and the dialer re-dials every `cluster.redial_ms` while it is wanted,
//!   the peer is live in the registry, and no session is up: after a tunnel closed, a peer
//!   restarted, or NATS came back.
//! - **Opening.** The dialer subscribes to its side, then asks `kiln.tunnel.open.<peer>` with a
//!   proof of the cookie. The acceptor checks the name, the proof and that it has no live
//!   session with that name, subscribes to its side, replies, and hands its end to its
//!   NodeServer; the dialer hands its end to its own. ractor_cluster then runs its own
//!   challenge with the cookie and syncs the process groups.
//! - **Isolated mode.** ractor_cluster never dials on its own (its transitive mode would dial
//!   the TCP addresses peers report); every session goes through a tunnel. Its TCP listener,
//!   which cannot be turned off, binds an ephemeral loopback port that nobody is told about.
//!
//! The peers with an authenticated session are written into this node's registry entry.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_core::task::{self, TaskGuard, TaskKind};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};

use crate::context::NodeContext;
use crate::registry_writer::RegistryWriterMsg;
use crate::tunnel::{self, Closed, Side, TunnelSettings};
use crate::wire::{self, OpenReply, OpenRequest, RefusalCode};

/// The host part of every ractor node name (`<node>@kiln`): sessions are keyed by the node
/// name alone, and no address is ever dialled.
const HOST: &str = "kiln";

/// The name the mesh is registered under in this process, so [`reach`] can ask it to dial.
pub const MESH_NAME: &str = "kiln-cluster-mesh";

/// The first member of `group`, a process group of `peer`'s actors, asking the mesh for a
/// session with `peer` first when none is up; `None` if no member appears within `timeout`
/// (the peer is gone, refuses the session, or the cluster layer is down).
pub async fn reach(group: &str, peer: &str, timeout: Duration) -> Option<ractor::ActorCell> {
    let deadline = Instant::now() + timeout;
    let mut asked = false;
    loop {
        if let Some(member) = ractor::pg::get_members(&group.to_string()).into_iter().next() {
            return Some(member);
        }
        if !asked {
            let mesh: ActorRef<ClusterMeshMsg> = ractor::registry::where_is(MESH_NAME)?.into();
            mesh.cast(ClusterMeshMsg::Want(peer.to_string())).ok()?;
            asked = true;
        }
        if Instant::now() >= deadline {
            return None;
        }
        // The session opens (two NATS round trips), authenticates and syncs the process
        // groups: a few milliseconds on a healthy cluster.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub struct ClusterMesh;

pub struct ClusterMeshArgs {
    pub ctx: NodeContext,
    pub registry: ActorRef<RegistryWriterMsg>,
}

pub struct ClusterMeshState {
    ctx: NodeContext,
    registry: ActorRef<RegistryWriterMsg>,
    settings: TunnelSettings,
    node_server: ActorRef<NodeServerMessage>,
    /// Authenticated sessions: ractor's node id to the peer's node name.
    sessions: HashMap<u64, String>,
    /// The newest tunnel opened with each peer, to find idle ones and close them.
    tunnels: HashMap<String, Closed>,
    /// Peers this node keeps a session with, and when it last needed one: a call, a peer's
    /// request to dial, or data through the session. Forgotten `idle_session_ms` after that.
    wanted: HashMap<String, Instant>,
    dialing: HashSet<String>,
    last_dial: HashMap<String, Instant>,
    /// When this node last asked each peer (that dials it) for a session.
    last_asked: HashMap<String, Instant>,
    /// The last refusal logged per peer, so a misconfigured peer is reported once, not per tick.
    refusals: HashMap<String, RefusalCode>,
    reported: Option<Vec<String>>,
    listeners: Vec<TaskGuard<()>>,
}

pub enum ClusterMeshMsg {
    Tick,
    Accept {
        request: OpenRequest,
        reply: async_nats::Subject,
    },
    /// A caller on this node needs a session with this peer ([`reach`]).
    Want(String),
    /// This peer asked this node (which sorts first) to dial it.
    WantedBy(String),
    Dialed {
        peer: String,
        tunnel: Option<Closed>,
        refused: Option<(RefusalCode, String)>,
        error: Option<String>,
    },
    SessionAuthenticated {
        id: u64,
        peer: String,
    },
    SessionClosed {
        id: u64,
    },
    /// The peers with an authenticated session now.
    Peers(ractor::RpcReplyPort<Vec<String>>),
}

// Local only: never sent to another node.
impl ractor::Message for ClusterMeshMsg {}

fn node_name_of(ses: &NodeServerSessionInformation) -> Option<String> {
    let full = &ses.peer_name.as_ref()?.name;
    Some(full.strip_suffix(&format!("@{HOST}")).unwrap_or(full).to_string())
}

/// Forwards ractor_cluster's session events to the mesh.
struct Events(ActorRef<ClusterMeshMsg>);

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.cast(ClusterMeshMsg::SessionClosed { id: ses.node_id });
    }
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if let Some(peer) = node_name_of(&ses) {
            let _ = self.0.cast(ClusterMeshMsg::SessionAuthenticated { id: ses.node_id, peer });
        }
    }
}

impl Actor for ClusterMesh {
    type Msg = ClusterMeshMsg;
    type State = ClusterMeshState;
    type Arguments = ClusterMeshArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let ctx = args.ctx;
        let server =
            NodeServer::new(0, ctx.config.cluster.cookie.clone(), ctx.node.clone(), HOST.into(), None, Some(NodeConnectionMode::Isolated))
                .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into());
        let (node_server, _) = Actor::spawn_linked(None, server, (), myself.get_cell()).await?;
        node_server
            .cast(NodeServerMessage::SubscribeToEvents { id: "kiln-mesh".into(), subscription: Box::new(Events(myself.clone())) })?;
        myself.send_interval(Duration::from_millis(ctx.config.cluster.redial_ms), || ClusterMeshMsg::Tick);
        Ok(ClusterMeshState {
            settings: TunnelSettings::from_config(&ctx.config.cluster),
            ctx,
            registry: args.registry,
            node_server,
            sessions: HashMap::new(),
            tunnels: HashMap::new(),
            wanted: HashMap::new(),
            dialing: HashSet::new(),
            last_dial: HashMap::new(),
            last_asked: HashMap::new(),
            refusals: HashMap::new(),
            reported: None,
            listeners: vec![],
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let client = state.ctx.resources.client.clone();
        let names = &state.ctx.resources.names;
        let mut opens = client.subscribe(names.tunnel_open(&state.ctx.node)).await?;
        let mut wants = client.subscribe(names.tunnel_want(&state.ctx.node)).await?;
        let me = myself.clone();
        state.listeners.push(task::spawn(TaskKind::OwnerLoop, "tunnel opens", async move {
            while let Some(msg) = opens.next().await {
                let Some(reply) = msg.reply else { continue };
                match wire::decode::<OpenRequest>(&msg.payload) {
                    Ok(request) => {
                        if me.cast(ClusterMeshMsg::Accept { request, reply }).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let refusal = OpenReply::Refused { code: RefusalCode::Version, message: e.to_string() };
                        let _ = client.publish(reply, wire::encode(&refusal).into()).await;
                    }
                }
            }
        }));
        let me = myself.clone();
        state.listeners.push(task::spawn(TaskKind::OwnerLoop, "tunnel wants", async move {
            while let Some(msg) = wants.next().await {
                let peer = String::from_utf8_lossy(&msg.payload).to_string();
                if !kiln_core::ids::is_valid_token(&peer) {
                    continue;
                }
                if me.cast(ClusterMeshMsg::WantedBy(peer)).is_err() {
                    return;
                }
            }
        }));
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Owner loops: dropping their guards stops them.
        state.listeners.clear();
        state.node_server.stop(Some("node stopping".into()));
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            ClusterMeshMsg::Tick => {
                state.close_idle_sessions();
                let live: Vec<String> = state.wanted.keys().filter(|p| state.ctx.registry.node(p).is_some()).cloned().collect();
                for peer in live {
                    state.want(&myself, &peer, false).await;
                }
                state.report();
            }
            ClusterMeshMsg::Want(peer) | ClusterMeshMsg::WantedBy(peer) => {
                state.wanted.insert(peer.clone(), Instant::now());
                state.want(&myself, &peer, true).await;
            }
            ClusterMeshMsg::Accept { request, reply } => state.accept(request, reply).await,
            ClusterMeshMsg::Dialed { peer, tunnel, refused, error } => {
                state.dialing.remove(&peer);
                if let Some(tunnel) = tunnel {
                    state.tunnels.insert(peer.clone(), tunnel);
                }
                match (refused, error) {
                    (Some((code, message)), _) => {
                        if state.refusals.insert(peer.clone(), code) != Some(code) {
                            tracing::warn!(peer = %peer, code = code.as_str(), message = %message, "actor-cluster session refused by peer");
                        }
                    }
                    (None, Some(error)) => tracing::debug!(peer = %peer, error = %error, "dial failed; will retry"),
                    (None, None) => {
                        state.refusals.remove(&peer);
                    }
                }
            }
            ClusterMeshMsg::SessionAuthenticated { id, peer } => {
                tracing::info!(peer = %peer, "actor-cluster session up");
                state.sessions.insert(id, peer);
                state.report();
            }
            ClusterMeshMsg::SessionClosed { id } => {
                if let Some(peer) = state.sessions.remove(&id) {
                    tracing::info!(peer = %peer, "actor-cluster session down");
                    state.report();
                }
            }
            ClusterMeshMsg::Peers(reply) => {
                let _ = reply.send(state.connected().into_iter().collect());
            }
        }
        Ok(())
    }

    /// The NodeServer failing is a bug in the cluster layer; escalate (the node restarts and
    /// its jobs are redelivered) rather than run on without a cluster.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(_, err) => myself.stop(Some(format!("node server failed: {err}"))),
            SupervisionEvent::ActorTerminated(_, _, reason) => myself.stop(Some(format!("node server stopped: {reason:?}"))),
            _ => {}
        }
        Ok(())
    }
}

impl ClusterMeshState {
    fn connected(&self) -> BTreeSet<String> {
        self.sessions.values().cloned().collect()
    }

    fn report(&mut self) {
        let now: Vec<String> = self.connected().into_iter().collect();
        if self.reported.as_ref() != Some(&now) {
            self.reported = Some(now.clone());
            let _ = self.registry.cast(RegistryWriterMsg::Peers(now));
        }
    }

    /// Gets a session with `peer` going, if none is up: dials it if this node sorts first,
    /// else asks it to dial (at most once per `redial_ms` unless `now`).
    async fn want(&mut self, myself: &ActorRef<ClusterMeshMsg>, peer: &str, now: bool) {
        if peer == self.ctx.node || self.connected().contains(peer) {
            return;
        }
        if self.ctx.node.as_str() < peer {
            self.maybe_dial(myself, peer, now);
            return;
        }
        let redial = Duration::from_millis(self.ctx.config.cluster.redial_ms);
        if !now && self.last_asked.get(peer).is_some_and(|t| t.elapsed() < redial) {
            return;
        }
        self.last_asked.insert(peer.to_string(), Instant::now());
        let subject = self.ctx.resources.names.tunnel_want(peer);
        if let Err(e) = self.ctx.resources.client.publish(subject, self.ctx.node.clone().into()).await {
            tracing::debug!(peer = %peer, error = %e, "cannot ask a peer for a session; will retry");
        }
    }

    /// Closes the sessions nobody used for `idle_session_ms` and forgets peers not wanted for
    /// that long. Data through a session counts as use on both ends, so both close together.
    fn close_idle_sessions(&mut self) {
        self.tunnels.retain(|_, t| !t.is_closed());
        let idle_ms = self.ctx.config.cluster.idle_session_ms;
        if idle_ms == 0 {
            return;
        }
        let idle = Duration::from_millis(idle_ms);
        for (peer, tunnel) in &self.tunnels {
            let last_data = Instant::now().checked_sub(tunnel.idle_for()).unwrap_or_else(Instant::now);
            let wanted = self.wanted.entry(peer.clone()).or_insert(last_data);
            *wanted = (*wanted).max(last_data);
            if wanted.elapsed() >= idle {
                tunnel.close(format!("idle for {idle_ms} ms"));
            }
        }
        self.wanted.retain(|_, at| at.elapsed() < idle);
        self.last_asked.retain(|_, at| at.elapsed() < idle);
        self.last_dial.retain(|_, at| at.elapsed() < idle);
    }

    fn maybe_dial(&mut self, myself: &ActorRef<ClusterMeshMsg>, peer: &str, now: bool) {
        if self.dialing.contains(peer) || self.connected().contains(peer) {
            return;
        }
        if self.ctx.resources.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let redial = Duration::from_millis(self.ctx.config.cluster.redial_ms);
        if !now && self.last_dial.get(peer).is_some_and(|t| t.elapsed() < redial) {
            return;
        }
        self.dialing.insert(peer.to_string());
        self.last_dial.insert(peer.to_string(), Instant::now());
        let (ctx, settings, node_server, me, peer) =
            (self.ctx.clone(), self.settings.clone(), self.node_server.clone(), myself.clone(), peer.to_string());
        task::spawn(TaskKind::Reply, "dial", async move {
            let (tunnel, refused, error) = match dial(&ctx, settings, &node_server, &peer).await {
                Ok(Ok(tunnel)) => (Some(tunnel), None, None),
                Ok(Err(refusal)) => (None, Some(refusal), None),
                Err(e) => (None, None, Some(e)),
            };
            let _ = me.cast(ClusterMeshMsg::Dialed { peer, tunnel, refused, error });
        });
    }

    async fn accept(&mut self, request: OpenRequest, reply: async_nats::Subject) {
        let cluster = &self.ctx.config.cluster;
        let refusal = if request.acceptor != self.ctx.node || request.dialer == self.ctx.node {
            Some((RefusalCode::WrongName, format!("this is {:?}, asked for {:?} by {:?}", self.ctx.node, request.acceptor, request.dialer)))
        } else if request.proof != wire::cookie_proof(&cluster.cookie, &request.session, &request.dialer, &request.acceptor) {
            Some((RefusalCode::CookieMismatch, "the cluster cookies differ".to_string()))
        } else if self.connected().contains(&request.dialer) {
            Some((RefusalCode::AlreadyConnected, format!("a session with {:?} is up", request.dialer)))
        } else {
            None
        };
        let client = self.ctx.resources.client.clone();
        let answer = match refusal {
            Some((code, message)) => {
                if self.refusals.insert(request.dialer.clone(), code) != Some(code) {
                    tracing::warn!(peer = %request.dialer, code = code.as_str(), message = %message, "refusing an actor-cluster session");
                }
                OpenReply::Refused { code, message }
            }
            None => {
                self.refusals.remove(&request.dialer);
                let started = tunnel::start(
                    client.clone(),
                    &self.ctx.resources.names,
                    &request.session,
                    Side::Acceptor,
                    self.settings.clone(),
                    self.ctx.node.clone(),
                    request.dialer.clone(),
                )
                .await;
                match started {
                    Ok((tunnel, closed)) => {
                        self.tunnels.insert(request.dialer.clone(), closed);
                        self.wanted.insert(request.dialer.clone(), Instant::now());
                        let stream: Box<dyn ractor_cluster::ClusterBidiStream> = Box::new(tunnel);
                        let _ = self.node_server.cast(NodeServerMessage::ConnectionOpenedExternal { stream, is_server: true });
                        OpenReply::Accepted
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open a tunnel");
                        return;
                    }
                }
            }
        };
        let _ = client.publish(reply, wire::encode(&answer).into()).await;
    }
}

/// Opens a session to `peer`: `Ok(Ok(tunnel))` when the tunnel is handed to ractor_cluster,
/// `Ok(Err(refusal))` when the peer refused, `Err` when it did not answer.
async fn dial(
    ctx: &NodeContext,
    settings: TunnelSettings,
    node_server: &ActorRef<NodeServerMessage>,
    peer: &str,
) -> Result<Result<Closed, (RefusalCode, String)>, String> {
    let session = uuid::Uuid::new_v4().simple().to_string();
    let request = OpenRequest {
        proof: wire::cookie_proof(&ctx.config.cluster.cookie, &session, &ctx.node, peer),
        session: session.clone(),
        dialer: ctx.node.clone(),
        acceptor: peer.to_string(),
    };
    let client = ctx.resources.client.clone();
    let (tunnel, closed) =
        tunnel::start(client.clone(), &ctx.resources.names, &session, Side::Dialer, settings.clone(), ctx.node.clone(), peer.to_string())
            .await
            .map_err(|e| e.to_string())?;
    let asked =
        tokio::time::timeout(settings.silence, client.request(ctx.resources.names.tunnel_open(peer), wire::encode(&request).into())).await;
    let answer = match asked {
        Ok(Ok(msg)) => wire::decode::<OpenReply>(&msg.payload).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".to_string()),
    };
    match answer {
        Ok(OpenReply::Accepted) if !closed.is_closed() => {
            closed.open();
            ractor_cluster::client_connect_external(node_server, Box::new(tunnel)).await.map_err(|e| e.to_string())?;
            Ok(Ok(closed))
        }
        Ok(OpenReply::Accepted) => Err("tunnel closed while opening".into()),
        // Dropping the unused tunnel closes it (and tells the acceptor's side, if any).
        Ok(OpenReply::Refused { code, message }) => Ok(Err((code, message))),
        Err(e) => Err(e),
    }
}
