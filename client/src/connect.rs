//! How a program reaches Kiln's NATS: the `[nats]` settings (server URLs, credentials, TLS,
//! the subject prefix, and the stream settings a node applies) and the one way to connect with
//! them. A bad credential or certificate fails at connect with its key named. Secrets never
//! show in `{:?}`. Checking the settings against a config file's rules (and the `KILN_NATS_*`
//! environment) is kiln-core's `config`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// The NATS connection of every node (and, through `kiln <command> --config`, of the CLI).
/// Credentials and TLS apply to every connection the process makes; see docs/SECURITY.md.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// `"embedded"` (default): `kiln up` starts its own nats-server; otherwise a NATS URL
    /// (`nats://host:4222`, or `tls://host:4222` to require TLS), or a comma-separated list of
    /// a cluster's servers: the connection starts on any and fails over between them.
    pub url: String,
    /// Replicas of every stream, KV bucket and object store Kiln creates: 1 (default), or 3 or
    /// 5 on a NATS cluster of at least that many JetStream servers.
    pub replicas: usize,
    /// JetStream storage of the embedded server. Empty: `$KILN_CACHE/state`.
    pub state_dir: String,
    /// Port of the embedded server; 0 picks a free one.
    pub embedded_port: u16,
    /// Prefix of every subject, stream and bucket name.
    pub prefix: String,
    /// How long a delivered job may go without an `in_progress` before JetStream redelivers
    /// it. The running job sends `in_progress` every third of this.
    pub ack_wait_ms: u64,
    /// How long to wait for the server at start.
    pub connect_timeout_ms: u64,
    /// User name of user/password authentication (with `password`).
    pub user: String,
    /// Password of `user`. Better from `KILN_NATS_PASSWORD` than in the file.
    pub password: String,
    /// Token authentication. Better from `KILN_NATS_TOKEN` than in the file.
    pub token: String,
    /// A file holding an NKey user seed (`SU...`): the server knows only its public key.
    pub nkey_seed_file: String,
    /// A `.creds` file (user JWT and NKey seed) of an operator/JWT-mode server.
    pub creds_file: String,
    /// PEM CA certificate(s) the server's certificate must chain to. Setting it (or any
    /// `tls_*` key) makes the connection require TLS.
    pub tls_ca_file: String,
    /// PEM client certificate, for servers that verify clients (`verify: true`); with `tls_key_file`.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Refuse to talk to the server without TLS (also implied by a `tls://` URL or a `tls_*` file).
    pub tls_required: bool,
}

/// Secrets never appear in logs or `{:?}`: they show as `<redacted>` when set.
pub fn redact(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("replicas", &self.replicas)
            .field("state_dir", &self.state_dir)
            .field("embedded_port", &self.embedded_port)
            .field("prefix", &self.prefix)
            .field("ack_wait_ms", &self.ack_wait_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("user", &self.user)
            .field("password", &redact(&self.password))
            .field("token", &redact(&self.token))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "embedded".into(),
            replicas: 1,
            state_dir: String::new(),
            embedded_port: 4222,
            prefix: "kiln".into(),
            ack_wait_ms: 30_000,
            connect_timeout_ms: 10_000,
            user: String::new(),
            password: String::new(),
            token: String::new(),
            nkey_seed_file: String::new(),
            creds_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_required: false,
        }
    }
}

/// How a connection authenticates, from the `nats.*` keys (at most one method is set). No
/// `Debug`: it holds secrets.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth<'a> {
    None,
    UserPassword { user: &'a str, password: &'a str },
    Token(&'a str),
    NkeySeedFile(&'a Path),
    CredsFile(&'a Path),
}

impl NatsConfig {
    /// The defaults, without credentials or TLS, for a server at `url`.
    pub fn for_url(url: &str) -> NatsConfig {
        NatsConfig { url: url.to_string(), ..Default::default() }
    }

    /// The server URLs of `url`: one, or a cluster's comma-separated seeds.
    pub fn urls(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
    }

    /// Makes relative credential and certificate paths absolute, against `base` (the config
    /// file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.nkey_seed_file, &mut self.creds_file, &mut self.tls_ca_file, &mut self.tls_cert_file, &mut self.tls_key_file]
        {
            if !path.is_empty() && !path.starts_with('/') {
                *path = base.join(&*path).display().to_string();
            }
        }
    }

    /// The authentication method configured (validated: at most one).
    pub fn auth(&self) -> NatsAuth<'_> {
        if !self.user.is_empty() || !self.password.is_empty() {
            NatsAuth::UserPassword { user: &self.user, password: &self.password }
        } else if !self.token.is_empty() {
            NatsAuth::Token(&self.token)
        } else if !self.nkey_seed_file.is_empty() {
            NatsAuth::NkeySeedFile(Path::new(&self.nkey_seed_file))
        } else if !self.creds_file.is_empty() {
            NatsAuth::CredsFile(Path::new(&self.creds_file))
        } else {
            NatsAuth::None
        }
    }

    /// Whether the connection must use TLS: `tls_required`, a `tls://` URL, or any `tls_*` file.
    pub fn tls(&self) -> bool {
        self.tls_required
            || self.urls().iter().any(|u| u.starts_with("tls://"))
            || !self.tls_ca_file.is_empty()
            || !self.tls_cert_file.is_empty()
            || !self.tls_key_file.is_empty()
    }
}

/// The options of every NATS connection Kiln makes (nodes, the CLI, the benchmark): a name
/// that shows up in `nats server report connections`, then the credentials and TLS settings of
/// `nats` (see docs/SECURITY.md). Reads the NKey seed or creds file, so a bad one fails here
/// with its key named.
pub async fn connect_options(nats: &NatsConfig, name: &str) -> Result<async_nats::ConnectOptions, StoreError> {
    install_crypto_provider();
    let mut options = async_nats::ConnectOptions::new().name(name).connection_timeout(Duration::from_secs(2)).max_reconnects(None);
    options = match nats.auth() {
        NatsAuth::None => options,
        NatsAuth::UserPassword { user, password } => options.user_and_password(user.to_string(), password.to_string()),
        NatsAuth::Token(token) => options.token(token.to_string()),
        NatsAuth::NkeySeedFile(path) => options.nkey(read_nkey_seed(path)?),
        NatsAuth::CredsFile(path) => {
            options.credentials_file(path).await.map_err(|e| StoreError::Nats(format!("nats.creds_file {}: {e}", path.display())))?
        }
    };
    if nats.tls() {
        options = options.require_tls(true);
    }
    if !nats.tls_ca_file.is_empty() {
        options = options.add_root_certificates(nats.tls_ca_file.clone().into());
    }
    if !nats.tls_cert_file.is_empty() {
        options = options.add_client_certificate(nats.tls_cert_file.clone().into(), nats.tls_key_file.clone().into());
    }
    Ok(options)
}

/// The seed in an NKey seed file: the first word that starts with `SU` (a user seed), so the
/// files `nk -gen user` and `nsc` write both work. Checked here, never logged.
fn read_nkey_seed(path: &Path) -> Result<String, StoreError> {
    let key = |reason: String| StoreError::Nats(format!("nats.nkey_seed_file {}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| key(e.to_string()))?;
    let seed = text.split_whitespace().find(|w| w.starts_with("SU")).ok_or_else(|| key("holds no user seed (SU...)".into()))?;
    nkeys::KeyPair::from_seed(seed).map_err(|e| key(format!("not a valid seed: {e}")))?;
    Ok(seed.to_string())
}

/// Connects with [`connect_options`], retrying for `nats.connect_timeout_ms` while the server
/// cannot be reached, so a node may start before its server. A refusal of the credentials or a
/// failed TLS handshake is final at once, with an error that says which.
pub async fn connect(nats: &NatsConfig, name: &str) -> Result<async_nats::Client, StoreError> {
    let url = nats.url.as_str();
    // Every seed of a cluster: the client starts on one and fails over to the others (and to
    // those the servers announce).
    let mut addrs = Vec::new();
    for seed in nats.urls() {
        addrs.push(
            seed.parse::<async_nats::ServerAddr>().map_err(|e| StoreError::Nats(format!("nats.url {seed:?} is not a NATS URL: {e}")))?,
        );
    }
    let timeout = Duration::from_millis(nats.connect_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let options = connect_options(nats, name).await?;
        let error = match options.connect(addrs.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        use async_nats::ConnectErrorKind as Kind;
        // rustls' refusals of the server's certificate arrive as IO errors.
        let text = error.to_string().to_lowercase();
        let tls_refused = text.contains("certificate") || text.contains("tls") || text.contains("handshake");
        let message = match error.kind() {
            Kind::AuthorizationViolation | Kind::Authentication => {
                let method = match nats.auth() {
                    NatsAuth::None => {
                        "no credentials (set nats.user and nats.password, nats.token, nats.nkey_seed_file or nats.creds_file)".to_string()
                    }
                    NatsAuth::UserPassword { user, .. } => format!("user {user:?} (nats.user, nats.password)"),
                    NatsAuth::Token(_) => "the token (nats.token)".to_string(),
                    NatsAuth::NkeySeedFile(p) => format!("the NKey of {} (nats.nkey_seed_file)", p.display()),
                    NatsAuth::CredsFile(p) => format!("the creds of {} (nats.creds_file)", p.display()),
                };
                format!("authentication failed: the NATS server at {url} refused {method}: {error}")
            }
            Kind::Tls | Kind::Io if error.kind() == Kind::Tls || tls_refused => format!(
                "TLS with the NATS server at {url} failed: {error} (check nats.tls_ca_file: the CA that signed the server's \
                 certificate, and that the URL's host name is in that certificate)"
            ),
            Kind::ServerParse => format!("nats.url {url:?} is not a NATS URL: {error}"),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            _ => format!("cannot connect to {url} within {timeout:?}: {error}"),
        };
        return Err(StoreError::Nats(message));
    }
}

/// Installs ring as rustls' process-wide crypto provider. The build holds two (async-nats
/// brings ring, ractor_cluster's tokio-rustls brings aws-lc-rs), and with two and none
/// installed, the first `tls://` connection panics. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
