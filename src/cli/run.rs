//! `kiln up`, `node`, `gateway`, `demo`: the processes that stay up, and the stop signals
//! that drain them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kiln::node::RunningNode;
use kiln_core::config::{ClusterConfig, Flag, Layers, NatsConfig};

/// The file of every command that reads one: `--config`, else `KILN_CONFIG`, else
/// `./cluster.toml` if it exists. Its keys are overridden by the environment
/// (`KILN_<SECTION>__<KEY>`), and those by the flags.
#[derive(Args)]
pub struct NodeArgs {
    /// The config file [default: $KILN_CONFIG, else ./cluster.toml if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// NATS URL, or "embedded" (overrides nats.url and KILN_NATS__URL).
    #[arg(long)]
    nats: Option<String>,
    /// The node's name in the cluster (overrides node.name; default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Comma-separated slots, e.g. cuda:0,cuda:1 or cpu:0.
    #[arg(long)]
    slots: Option<String>,
    /// host:port of the node's /metrics, /healthz and /readyz; "" disables them.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// How long a graceful stop (SIGTERM, Ctrl-C) waits for running jobs (overrides
    /// node.drain_grace_s, default 30).
    #[arg(long)]
    drain_grace_s: Option<u64>,
    /// host:port of the HTTP gateway `kiln up` starts (overrides http.addr); "" disables it.
    #[arg(long)]
    http_addr: Option<String>,
}

#[derive(Args)]
pub struct GatewayArgs {
    /// The config file [default: $KILN_CONFIG, else ./cluster.toml if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// NATS URL (overrides nats.url and KILN_NATS__URL); "embedded" means the server `kiln up`
    /// started on this machine.
    #[arg(long)]
    nats: Option<String>,
    /// host:port to serve (overrides http.addr).
    #[arg(long)]
    http_addr: Option<String>,
    /// Print the sha256 of an API key (what `[[http.api_keys]] sha256` stores) and exit.
    #[arg(long, value_name = "KEY")]
    hash_key: Option<String>,
}

#[derive(Args)]
pub struct DemoArgs {
    /// The config file [default: $KILN_CONFIG, else ./cluster.toml if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Jobs of the demo batch.
    #[arg(long, default_value_t = 6)]
    jobs: usize,
    /// The folder the results are downloaded into.
    #[arg(long, default_value = "demo-results")]
    out: PathBuf,
    /// The model the jobs run on.
    #[arg(long, default_value = "demo")]
    model: String,
    /// After the jobs, keep the node and the web console (http.addr) up until Ctrl-C.
    #[arg(long)]
    serve: bool,
}

/// Every stop signal a node can be sent: each one, at any stage of the node's life, is a drain.
struct StopSignals {
    streams: Vec<(&'static str, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    /// Installs the handlers: from here on these signals no longer kill the process (their
    /// default action), they only wake [`StopSignals::recv`]. Installed before anything else
    /// a node does: a SIGTERM 3 s into a restart, while the node still watched its old registry
    /// entry, used to kill it by signal in 0.05 s instead of draining (an outside storm).
    fn install() -> Result<StopSignals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut streams = vec![];
        for (name, kind) in [
            ("SIGTERM", SignalKind::terminate()),
            ("SIGINT", SignalKind::interrupt()),
            ("SIGHUP", SignalKind::hangup()),
            ("SIGQUIT", SignalKind::quit()),
        ] {
            streams.push((name, signal(kind).map_err(|e| format!("cannot handle {name}: {e}"))?));
        }
        Ok(StopSignals { streams })
    }

    /// Resolves with the name of the next stop signal received.
    async fn recv(&mut self) -> &'static str {
        let waits = self.streams.iter_mut().map(|(name, s)| {
            let name = *name;
            Box::pin(async move {
                s.recv().await;
                name
            })
        });
        futures::future::select_all(waits).await.0
    }
}

/// `kiln up` (`allow_embedded`: it may start its own nats-server, and serves HTTP) and
/// `kiln node`: a node until a stop signal or a drain request, then a drain.
pub async fn node(args: NodeArgs, allow_embedded: bool) -> Result<(), String> {
    let mut stop = StopSignals::install()?;
    let flags = Flag::given([
        ("--nats", "nats.url", args.nats),
        ("--node-name", "node.name", args.node_name),
        ("--slots", "node.slots", args.slots),
        ("--metrics-addr", "node.metrics_addr", args.metrics_addr),
        ("--drain-grace-s", "node.drain_grace_s", args.drain_grace_s.map(|s| s.to_string())),
        ("--http-addr", "http.addr", args.http_addr),
    ]);
    let config = ClusterConfig::load_layers(&Layers::from_process(args.config, flags)).map_err(|e| e.to_string())?;
    // Logs and traces as configured; held to the end, where the last spans are flushed.
    let mut telemetry = kiln::telemetry::init("info", &config.log, &config.telemetry);
    tracing::info!("starting");
    let drain_grace = Duration::from_secs(config.node.drain_grace_s);
    let (http, http_addr) = (config.http.clone(), config.http.addr.clone());
    let nats = config.nats.clone();
    if config.nats.url == "embedded" && !allow_embedded {
        return Err("`kiln node` joins an existing NATS: pass --nats URL (or use `kiln up` for an embedded server)".into());
    }
    // A stop signal during start-up: nothing runs yet, so the drain is to stop starting. Start
    // is cancelled where it stands (connecting, creating streams, watching an old registry
    // entry); once its actors are up, they are drained like any running node's.
    let node = tokio::select! {
        started = RunningNode::start(config) => started.map_err(|e| e.to_string())?,
        signal = stop.recv() => {
            tracing::info!(signal, "stop signal during start-up; not starting");
            return Ok(());
        }
    };
    println!("kiln node {} up on {} (Ctrl-C or SIGTERM to drain and stop)", node.name, node.url);
    // `kiln up` also serves HTTP (the console, the REST API, the configured seed routes), so
    // its node answers curl and a browser with no extra step.
    let gateway = match (allow_embedded, http_addr.is_empty()) {
        (true, false) => {
            let nats = NatsConfig { url: node.url.clone(), ..nats };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let started = async {
                let gateway = kiln::gateway::Gateway::connect(http, &nats).await.map_err(|e| e.to_string())?;
                gateway
                    .serve(&http_addr, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
            };
            match started.await {
                Ok(serving) => {
                    println!(
                        "kiln gateway on http://{} (console at /, REST API at /v1, `kiln up --http-addr \"\"` disables it)",
                        serving.addr
                    );
                    Some((serving, stop_tx))
                }
                Err(e) => {
                    node.shutdown(drain_grace).await;
                    return Err(format!("the HTTP gateway cannot start: {e}"));
                }
            }
        }
        _ => None,
    };
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            signal = stop.recv() => {
                tracing::info!(signal, "stop signal");
                break;
            }
            _ = node.drain_requested() => break,
            _ = check.tick() => if node.failed() {
                return Err("the node's actor tree stopped after a failure; its jobs will be redelivered".into());
            },
        }
    }
    tracing::info!("draining");
    // The gateway stops first: its SSE clients reconnect to another gateway with their
    // Last-Event-ID, and it must not outlive the embedded server it talks to.
    if let Some((serving, stop)) = gateway {
        let _ = stop.send(());
        serving.stopped().await;
    }
    // A second stop signal during the drain is still a drain (the first one is under way).
    node.shutdown(drain_grace).await;
    telemetry.shutdown();
    Ok(())
}

pub async fn gateway(args: GatewayArgs) -> Result<(), String> {
    if let Some(key) = args.hash_key {
        println!("{}", kiln::gateway::hash_key(&key));
        return Ok(());
    }
    let mut stop = StopSignals::install()?;
    let flags = Flag::given([("--nats", "nats.url", args.nats), ("--http-addr", "http.addr", args.http_addr)]);
    let config = ClusterConfig::load_gateway_layers(&Layers::from_process(args.config, flags)).map_err(|e| e.to_string())?;
    let _telemetry = kiln::telemetry::init("info", &config.log, &config.telemetry);
    let mut nats = config.nats.clone();
    if nats.url == "embedded" {
        nats.url = format!("nats://127.0.0.1:{}", nats.embedded_port);
    }
    let addr = config.http.addr.clone();
    if addr.is_empty() {
        return Err("no address to serve: set http.addr or pass --http-addr".into());
    }
    let gateway = kiln::gateway::Gateway::connect(config.http.clone(), &nats).await.map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = gateway
        .serve(&addr, async move {
            let _ = stop_rx.await;
        })
        .await
        .map_err(|e| e.to_string())?;
    println!("kiln gateway on http://{} for NATS {} (console at /, REST API at /v1)", serving.addr, nats.url);
    let signal = stop.recv().await;
    tracing::info!(signal, "stop signal: the gateway stops accepting and ends its streams");
    let _ = stop_tx.send(());
    serving.stopped().await;
    Ok(())
}

pub async fn demo(DemoArgs { config, jobs, out, model, serve }: DemoArgs) -> Result<(), String> {
    let mut config = ClusterConfig::load_layers(&Layers::from_process(config, vec![])).map_err(|e| e.to_string())?;
    config.node.metrics_addr = String::new();
    kiln::demo::run(kiln::demo::DemoOptions { config, jobs, out, model, serve }).await
}
