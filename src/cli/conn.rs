//! How a client command reaches Kiln: `--nats`, `--prefix`, `--config`, and the hint a
//! newcomer gets when nothing answers.

use std::path::PathBuf;

use clap::Args;
use kiln::client::{Client, ClientError};
use kiln_core::config::{ClusterConfig, Flag, Layers};

use crate::cli::exit::Failure;

/// How a client command reaches Kiln: the `[nats]` section of the same layers a node reads
/// (the file of `--config`, else `KILN_CONFIG`, else `./cluster.toml` if it exists; then the
/// `KILN_NATS__<KEY>` variables and their older names `KILN_NATS_USER`, `KILN_NATS_PASSWORD`...;
/// then `--nats` and `--prefix`); see docs/SECURITY.md for credentials and TLS.
#[derive(Args, Clone)]
pub struct ConnArgs {
    /// NATS URL [default: nats.url of the config and environment, else nats://127.0.0.1:4222]
    #[arg(long)]
    nats: Option<String>,
    /// Prefix of subjects and buckets [default: nats.prefix of the config, else kiln]
    #[arg(long)]
    prefix: Option<String>,
    /// Connect as the `[nats]` section of this file says (URL, prefix, credentials, TLS)
    /// [default: $KILN_CONFIG, else ./cluster.toml if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
}

pub async fn connect(conn: &ConnArgs) -> Result<Client, Failure> {
    let flags = Flag::given([("--nats", "nats.url", conn.nats.clone()), ("--prefix", "nats.prefix", conn.prefix.clone())]);
    let layers = Layers::from_process(conn.config.clone(), flags);
    let mut nats = ClusterConfig::load_nats_layers(&layers).map_err(|e| Failure::usage(e.to_string()))?;
    if nats.url == "embedded" {
        // The server `kiln up` starts on this machine.
        nats.url = format!("nats://127.0.0.1:{}", nats.embedded_port);
    }
    // A client command is interactive: a server that does not answer within this is not
    // coming (a node waits `nats.connect_timeout_ms`, 10 s, as it may start before its server).
    nats.connect_timeout_ms = nats.connect_timeout_ms.min(CLIENT_CONNECT_TIMEOUT_MS);
    // Whatever the reason (nothing listening, a bad host, TLS, credentials), a client that
    // cannot connect has not reached Kiln.
    Client::connect_with(&nats).await.map_err(|e| Failure::unreachable(unreachable_hint(&nats.url, &e)))
}

/// How long a client command tries to reach its NATS server.
const CLIENT_CONNECT_TIMEOUT_MS: u64 = 2000;

/// The error of a client command that cannot reach its server (or finds no node there), with
/// what a newcomer most likely needs: a cluster to talk to.
fn unreachable_hint(url: &str, error: &ClientError) -> String {
    let text = error.to_string();
    match error {
        ClientError::Nats(m) if m.contains("cannot connect") => format!(
            "no NATS server answers at {url} ({text}).\nStart a local cluster with `kiln up` (in another terminal), \
             or point at yours with --nats URL (or KILN_NATS__URL, or nats.url in --config FILE)."
        ),
        _ => text,
    }
}
