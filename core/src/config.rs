//! Typed configuration: `cluster.toml`, then `KILN_*` environment overrides, then CLI flags
//! (applied by the binary), validated once by [`ClusterConfig::validate`].
//!
//! Every field has a documented default so the shortest useful file names only the models.
//! Unknown keys are refused (`deny_unknown_fields`) so a typo fails at start instead of being
//! silently ignored; validation errors name the key (`models[1].timeout_ms`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config: `{key}` {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub nats: NatsConfig,
    pub node: NodeConfig,
    pub limits: Limits,
    pub storage: StorageConfig,
    pub retry: RetryPolicy,
    pub restart: RestartPolicy,
    pub cluster: ClusterLink,
    pub compression: CompressionConfig,
    /// The HTTP + SSE gateway (`kiln gateway`, and the one `kiln up` starts).
    pub http: crate::http::HttpConfig,
    pub models: Vec<ModelConfig>,
}

/// The node's pool of compression workers, which runs models' post-processing stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Commands running at once on this node; 0 means the CPU count.
    pub max_workers: usize,
    /// Stage runs that may wait for a worker; a job stage beyond it waits to be admitted
    /// (backpressure) instead of queueing without bound.
    pub queue_limit: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig { max_workers: 0, queue_limit: 64 }
    }
}

impl CompressionConfig {
    pub fn workers(&self) -> usize {
        if self.max_workers > 0 {
            self.max_workers
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }
}

/// The actor cluster (ractor_cluster sessions tunnelled through NATS between every two nodes).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterLink {
    /// Shared secret of the actor cluster: a node with another cookie is refused by its peers.
    /// Set it (or `KILN_CLUSTER_COOKIE`) on any cluster reachable by others.
    pub cookie: String,
    /// Each tunnel sends a heartbeat frame this often when it has nothing else to send.
    pub heartbeat_ms: u64,
    /// A tunnel that receives nothing for this long closes (its peer or the link is gone).
    pub silence_ms: u64,
    /// Bytes a tunnel may have sent and not yet seen consumed by the peer: a slow peer makes
    /// the sender wait instead of growing memory.
    pub window_bytes: u64,
    /// The largest data frame, kept well under the NATS payload limit.
    pub frame_bytes: u64,
    /// How often a node re-dials a peer it wants a session with (one it called, or that called
    /// it) while that session is down, and closes sessions idle past `idle_session_ms`.
    pub redial_ms: u64,
    /// A session that carried no actor message for this long is closed, so a node holds
    /// sessions only with the peers it talks to, not with every node of the cluster; the next
    /// call dials again. 0 keeps sessions open for ever.
    pub idle_session_ms: u64,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLink")
            .field("cookie", &redact(&self.cookie))
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("silence_ms", &self.silence_ms)
            .field("window_bytes", &self.window_bytes)
            .field("frame_bytes", &self.frame_bytes)
            .field("redial_ms", &self.redial_ms)
            .field("idle_session_ms", &self.idle_session_ms)
            .finish()
    }
}

impl Default for ClusterLink {
    fn default() -> Self {
        ClusterLink {
            cookie: "kiln-dev-cookie".into(),
            heartbeat_ms: 500,
            silence_ms: 2_000,
            window_bytes: 4 << 20,
            frame_bytes: 256 << 10,
            redial_ms: 500,
            idle_session_ms: 60_000,
        }
    }
}

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
fn redact(secret: &str) -> &'static str {
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

    /// `KILN_NATS_URL`, `KILN_NATS_USER`, `KILN_NATS_PASSWORD`, `KILN_NATS_TOKEN`,
    /// `KILN_NATS_NKEY_SEED_FILE`, `KILN_NATS_CREDS_FILE`, `KILN_NATS_TLS_CA_FILE`,
    /// `KILN_NATS_TLS_CERT_FILE`, `KILN_NATS_TLS_KEY_FILE`, `KILN_NATS_TLS_REQUIRED`, `KILN_STATE_DIR`,
    /// `KILN_ACK_WAIT_MS`, `KILN_NATS_REPLICAS`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let strings: [(&str, &mut String); 10] = [
            ("KILN_NATS_URL", &mut self.url),
            ("KILN_STATE_DIR", &mut self.state_dir),
            ("KILN_NATS_USER", &mut self.user),
            ("KILN_NATS_PASSWORD", &mut self.password),
            ("KILN_NATS_TOKEN", &mut self.token),
            ("KILN_NATS_NKEY_SEED_FILE", &mut self.nkey_seed_file),
            ("KILN_NATS_CREDS_FILE", &mut self.creds_file),
            ("KILN_NATS_TLS_CA_FILE", &mut self.tls_ca_file),
            ("KILN_NATS_TLS_CERT_FILE", &mut self.tls_cert_file),
            ("KILN_NATS_TLS_KEY_FILE", &mut self.tls_key_file),
        ];
        for (key, field) in strings {
            if let Some(v) = var(key) {
                *field = v;
            }
        }
        if let Some(v) = var("KILN_NATS_TLS_REQUIRED") {
            self.tls_required = match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                _ => return Err(invalid("KILN_NATS_TLS_REQUIRED", format!("must be true or false, got {v:?}"))),
            };
        }
        if let Some(v) = var("KILN_ACK_WAIT_MS") {
            self.ack_wait_ms =
                v.parse().map_err(|_| invalid("KILN_ACK_WAIT_MS", format!("must be a number of milliseconds, got {v:?}")))?;
        }
        if let Some(v) = var("KILN_NATS_REPLICAS") {
            self.replicas = v.parse().map_err(|_| invalid("KILN_NATS_REPLICAS", format!("must be 1, 3 or 5, got {v:?}")))?;
        }
        Ok(())
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

    /// The checks of the connection keys: one authentication method, files that exist, a
    /// client certificate with its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !ids::is_valid_token(&self.prefix) {
            return Err(invalid("nats.prefix", "must be letters, digits, '-' or '_'"));
        }
        if self.ack_wait_ms < 1_000 {
            return Err(invalid("nats.ack_wait_ms", "must be at least 1000"));
        }
        if ![1, 3, 5].contains(&self.replicas) {
            return Err(invalid("nats.replicas", format!("must be 1, 3 or 5 (a RAFT group of that many servers), got {}", self.replicas)));
        }
        if self.url == "embedded" && self.replicas != 1 {
            return Err(invalid("nats.replicas", "must be 1 with the embedded server (one nats-server); point nats.url at a cluster"));
        }
        let methods: Vec<&str> = [
            ("nats.user/nats.password", !self.user.is_empty() || !self.password.is_empty()),
            ("nats.token", !self.token.is_empty()),
            ("nats.nkey_seed_file", !self.nkey_seed_file.is_empty()),
            ("nats.creds_file", !self.creds_file.is_empty()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .collect();
        if methods.len() > 1 {
            return Err(invalid(methods[1], format!("conflicts with {}: configure one authentication method", methods[0])));
        }
        if self.user.is_empty() != self.password.is_empty() {
            let key = if self.user.is_empty() { "nats.user" } else { "nats.password" };
            return Err(invalid(key, "must be set together with nats.user and nats.password (KILN_NATS_PASSWORD)"));
        }
        for (key, path) in [
            ("nats.nkey_seed_file", &self.nkey_seed_file),
            ("nats.creds_file", &self.creds_file),
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                return Err(invalid(key, format!("{path:?} is not a readable file")));
            }
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            let key = if self.tls_cert_file.is_empty() { "nats.tls_cert_file" } else { "nats.tls_key_file" };
            return Err(invalid(key, "a client certificate needs both nats.tls_cert_file and nats.tls_key_file"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Unique within the cluster. Empty: the host name.
    pub name: String,
    /// GPU slots: `cuda:0`, `cuda:1`..., or `cpu:0`... on a machine without a GPU.
    pub slots: Vec<String>,
    /// Prometheus endpoint (`host:port`); empty disables it.
    pub metrics_addr: String,
    /// Registry heartbeat period.
    pub heartbeat_ms: u64,
    /// A registry entry not refreshed for this long expires (the node is gone).
    pub registry_ttl_ms: u64,
    /// A node whose heartbeat is older than this is declared lost by the others: its GPUs are
    /// marked dead and its jobs handed back to the queue at once.
    pub loss_after_ms: u64,
    /// Per-slot working directories (job inputs and outputs). Empty: a temp dir.
    pub work_dir: String,
    /// Memory one slot may fill with resident TorchScript models (their `memory_bytes`);
    /// the least recently used are evicted to stay under it.
    pub slot_memory_bytes: u64,
    /// Jobs a slot claims ahead of the one it runs (each up to its batch), so that the next
    /// job's claim and inputs are ready when the current one's model is done: the slot never
    /// waits on the control plane. 0 (default): a job is fetched only once its slot is free,
    /// so priority order holds for every job not yet running; with 1, a job claimed ahead is
    /// not overtaken by a more urgent one submitted after it.
    pub slot_prefetch: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: String::new(),
            slots: vec!["cpu:0".into()],
            metrics_addr: "127.0.0.1:9464".into(),
            heartbeat_ms: 1_000,
            registry_ttl_ms: 5_000,
            loss_after_ms: 2_500,
            work_dir: String::new(),
            slot_memory_bytes: 8 << 30,
            slot_prefetch: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted on any endpoint. Must stay under the server's
    /// max_payload (1 MiB by default); big inputs go through the files bucket.
    pub max_request_bytes: usize,
    pub max_inputs: usize,
    /// Deepest nesting of `params` and inline inputs.
    pub max_params_depth: usize,
    /// Admission control: jobs waiting per model before submit answers `overloaded`.
    pub max_queued_per_model: u64,
    /// Items in one batch; each becomes a job, and the parent record lists them all.
    pub max_batch_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_request_bytes: 256 * 1024, max_inputs: 32, max_params_depth: 32, max_queued_per_model: 100_000, max_batch_items: 1000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Expiry of uploaded inputs in the files bucket (the seeds' 24 h temp-file API).
    pub files_ttl_s: u64,
    /// Default expiry of results, and of the event history; a model may override it.
    pub result_ttl_s: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { files_ttl_s: 86_400, result_ttl_s: 86_400 }
    }
}

/// Backoff between attempts of a job after an infrastructure error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub backoff_multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { backoff_initial_ms: 500, backoff_max_ms: 30_000, backoff_multiplier: 2.0 }
    }
}

/// How a GPU supervisor restarts its inference actor: at most `max_restarts` in `window_ms`,
/// with exponential backoff between them; past the budget the GPU is quarantined (`dead`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { max_restarts: 5, window_ms: 60_000, backoff_initial_ms: 100, backoff_max_ms: 5_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Lowercase letters, digits, `-` and `_`: it names subjects and a bucket.
    pub name: String,
    pub engine: EngineConfig,
    /// Longest a single attempt may run before it is stopped (an infrastructure error).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Expiry of this model's results; default `storage.result_ttl_s`.
    #[serde(default)]
    pub result_ttl_s: Option<u64>,
    /// Slots that serve it (`cpu:0`); empty means every slot of the node.
    #[serde(default)]
    pub slots: Vec<String>,
    /// Inputs a submission must name.
    #[serde(default)]
    pub required_inputs: Vec<String>,
    /// Stage name announced when the model itself starts (`converting`), and shown on every
    /// progress event of the model in place of the engine's own step names; empty: none (the
    /// engine's names show).
    #[serde(default)]
    pub run_stage: String,
    /// Post-processing stages, run in order after the model on the node's compression pool.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// The params this model takes (`[{ name = "steps", kind = "int", min = 1, max = 100,
    /// default = 20 }]`): when any are declared, a submission's params are checked at submit
    /// (an unknown name, a wrong type, a value out of range: `bad_request`) and defaults are
    /// filled in. Empty (default): any params pass unchecked.
    #[serde(default)]
    pub params: Vec<crate::params::ParamDecl>,
    /// The names clients see for the stages the engine or worker reports (`{ inference =
    /// "processing", downloading = "downloading" }`): when set, a progress event shows the
    /// mapped name, and a stage not in the map is left out of the event (its percentage still
    /// shows), so engine-internal steps do not leak to clients that know only their own
    /// statuses. Empty (default): stages show as reported. A `run_stage` wins over both.
    #[serde(default)]
    pub stage_names: BTreeMap<String, String>,
}

/// One post-processing stage of a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StageConfig {
    /// An external command from a template: `{input}` and `{output}` become file paths. It
    /// turns artifact `input` into artifact `output`.
    Command {
        /// Shown in events (`compressing`).
        name: String,
        command: Vec<String>,
        input: String,
        output: String,
        /// Keep the input among the artifacts (`keep_ply`); otherwise the output replaces it.
        #[serde(default)]
        keep_input: bool,
        #[serde(default = "default_stage_timeout_ms")]
        timeout_ms: u64,
        /// Attempts of this stage within one attempt of the job.
        #[serde(default = "default_max_attempts")]
        max_attempts: u32,
    },
    /// Camera metadata of an image-to-3D job, as the SHARP service's `/metadata`: a row-major
    /// 3x3 intrinsic matrix from the focal length parameter and the input image's size, and a
    /// 4x4 identity extrinsic matrix, written as a JSON artifact.
    CameraMetadata {
        name: String,
        /// The image input whose size gives the principal point.
        image_input: String,
        /// The param holding the focal length in pixels.
        focal_param: String,
        /// Used when the job does not set the param.
        default_focal: f64,
        output: String,
    },
}

impl ModelConfig {
    /// The stage name a client sees for a `reported` one: as reported without `stage_names`
    /// (or for the `run_stage` itself), else its mapping, or `None` (left out) when unmapped.
    pub fn stage_shown(&self, reported: &str) -> Option<String> {
        if self.stage_names.is_empty() || reported == self.run_stage {
            return Some(reported.to_string());
        }
        self.stage_names.get(reported).cloned()
    }
}

impl StageConfig {
    pub fn name(&self) -> &str {
        match self {
            StageConfig::Command { name, .. } | StageConfig::CameraMetadata { name, .. } => name,
        }
    }
}

fn default_stage_timeout_ms() -> u64 {
    300_000
}

fn default_timeout_ms() -> u64 {
    600_000
}
fn default_max_attempts() -> u32 {
    3
}

/// The engine that runs a model, and its settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EngineConfig {
    /// One long-lived worker process per slot speaking JSON lines on stdin/stdout.
    Process {
        /// Program and arguments; relative paths resolve against the config file's folder.
        command: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// How long the worker may take to print `ready` (model load).
        #[serde(default = "default_ready_timeout_ms")]
        ready_timeout_ms: u64,
        /// The worker's working directory (relative: to the config file's folder); default:
        /// the node's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        /// What a resident worker holds of its slot (GPU memory), counted against the slot's
        /// `node.slot_memory_bytes` with the TorchScript models: least recently used workers
        /// are stopped to make room. None (default): not counted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_bytes: Option<u64>,
    },
    /// A TorchScript module run in process through tch on the slot's device.
    Torchscript {
        /// The `.pt` file; relative paths resolve against the config file's folder.
        path: String,
        /// Inputs passed first, in this order (`{ name, kind = "text" | "tensor" | "image" }`).
        #[serde(default)]
        inputs: Vec<crate::engine::torch_spec::InputSpec>,
        /// Scalar params passed after the inputs (`{ name, kind = "int" | "float" | "bool" | "str", default }`).
        #[serde(default)]
        params: Vec<crate::engine::torch_spec::ParamSpec>,
        /// Codecs of named outputs (`{ name, codec = "png" | "npy" | "json" | "ply" }`); others are `.npy`.
        #[serde(default)]
        outputs: Vec<crate::engine::torch_spec::OutputSpec>,
        /// Resident size estimate in bytes, for the slot's memory budget; default twice the file.
        #[serde(default)]
        memory_bytes: Option<u64>,
        /// `"slot"` (default): the slot's device; `"cpu"`: always the CPU.
        #[serde(default = "default_device")]
        device: String,
        /// Dynamic batching: jobs of this model that reach a slot within `max_batch_delay_ms`
        /// run as one forward pass of up to `max_batch` (inputs stacked on dim 0, outputs split
        /// back per job). 1 (default) disables it. Plain models only, not step-wise ones.
        #[serde(default = "default_max_batch")]
        max_batch: usize,
        #[serde(default)]
        max_batch_delay_ms: u64,
    },
    /// Completes with a small artifact: measures Kiln's own overhead. `work_ms` holds the slot
    /// that long first, as a GPU forward pass would (`kiln bench --work-ms`: the slot's duty
    /// cycle).
    Noop {
        #[serde(default)]
        artifact_bytes: usize,
        #[serde(default)]
        work_ms: u64,
    },
}

fn default_max_batch() -> usize {
    1
}

fn default_device() -> String {
    "slot".into()
}

fn default_ready_timeout_ms() -> u64 {
    120_000
}

impl EngineConfig {
    /// Most jobs of this model one slot runs at once (as one batch).
    pub fn max_batch(&self) -> usize {
        match self {
            EngineConfig::Torchscript { max_batch, .. } => (*max_batch).max(1),
            _ => 1,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            EngineConfig::Process { .. } => "process",
            EngineConfig::Torchscript { .. } => "torchscript",
            EngineConfig::Noop { .. } => "noop",
        }
    }
}

impl ClusterConfig {
    /// Parses TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
    }

    /// Reads a file, resolves relative worker paths against its folder, applies the
    /// environment overrides, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config = Self::from_toml(&text, &path.display().to_string())?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.include_tables(path.parent().unwrap_or(Path::new(".")))?;
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// What `kiln gateway` needs of a file: `[nats]` and `[http]`, validated. The rest may be
    /// absent (a gateway runs no model); when models are listed, the routes' models must be
    /// among them.
    pub fn load_gateway(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config = Self::from_toml(&text, &path.display().to_string())?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.include_tables(path.parent().unwrap_or(Path::new(".")))?;
        config.apply_env(|k| std::env::var(k).ok())?;
        config.nats.validate()?;
        let any_model = config.models.is_empty();
        config.http.validate(|m| any_model || config.model(m).is_some())?;
        Ok(config)
    }

    /// Only the `[nats]` section of a file (the rest is parsed but neither needed nor
    /// validated), with relative paths resolved and the `KILN_NATS_*` environment applied:
    /// what a client command (`kiln submit --config cluster.toml`) connects with. `None`: the
    /// defaults and the environment only.
    pub fn load_nats(path: Option<&Path>) -> Result<NatsConfig, ConfigError> {
        let mut nats = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                let mut nats = Self::from_toml(&text, &path.display().to_string())?.nats;
                nats.resolve_paths(path.parent().unwrap_or(Path::new(".")));
                nats
            }
            None => NatsConfig::default(),
        };
        nats.apply_env(|k| std::env::var(k).ok())?;
        nats.validate()?;
        Ok(nats)
    }

    /// Adds the `[[models]]` and `[[http.routes]]` of each `http.include` file (relative to
    /// `base`, this file's folder), their relative paths resolved against their own folder:
    /// a seed's table serves from wherever it lives, beside other tables. An included file
    /// includes nothing further, and its other sections are ignored.
    pub fn include_tables(&mut self, base: &Path) -> Result<(), ConfigError> {
        for (i, name) in std::mem::take(&mut self.http.include).into_iter().enumerate() {
            let path = base.join(&name);
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let mut table = Self::from_toml(&text, &path.display().to_string())?;
            if !table.http.include.is_empty() {
                return Err(invalid(format!("http.include[{i}]"), format!("{name:?} includes other files itself; include them here")));
            }
            table.resolve_paths(path.parent().unwrap_or(Path::new(".")));
            self.models.append(&mut table.models);
            self.http.routes.append(&mut table.http.routes);
        }
        Ok(())
    }

    /// Makes relative program paths in process commands absolute (against `base`), so a node
    /// started from any folder finds the worker scripts named in the file.
    pub fn resolve_paths(&mut self, base: &Path) {
        self.nats.resolve_paths(base);
        for key in &mut self.http.api_keys {
            for path in [&mut key.nkey_seed_file, &mut key.creds_file] {
                if !path.is_empty() && !path.starts_with('/') {
                    *path = base.join(&*path).display().to_string();
                }
            }
        }
        for model in &mut self.models {
            match &mut model.engine {
                EngineConfig::Process { command, cwd, .. } => {
                    if let Some(dir) = cwd.as_mut().filter(|d| !d.starts_with('/')) {
                        *dir = base.join(&*dir).display().to_string();
                    }
                    for (i, arg) in command.iter_mut().enumerate() {
                        // The program without a '/' is looked up on PATH (`python3`), as a shell
                        // would; any other relative word that names a file or folder beside the
                        // config is that file (`worker.py`), whatever folder the node runs in.
                        let looks_like_path = (i > 0 || arg.contains('/')) && !arg.starts_with('/') && !arg.starts_with('-');
                        if looks_like_path && !arg.is_empty() && base.join(&*arg).exists() {
                            *arg = base.join(&*arg).canonicalize().unwrap_or_else(|_| base.join(&*arg)).display().to_string();
                        }
                    }
                }
                // A missing model file is reported when a job needs it, not at start: the
                // node serves its other models meanwhile.
                EngineConfig::Torchscript { path, .. } if !path.starts_with('/') => *path = base.join(&*path).display().to_string(),
                _ => {}
            }
        }
    }

    /// `KILN_NODE_NAME`, `KILN_SLOTS` (comma separated), `KILN_METRICS_ADDR`,
    /// `KILN_CLUSTER_COOKIE`, and the `KILN_NATS_*` keys of [`NatsConfig::apply_env`] (URL,
    /// credentials, TLS files).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        self.nats.apply_env(&var)?;
        if let Some(v) = var("KILN_NODE_NAME") {
            self.node.name = v;
        }
        if let Some(v) = var("KILN_SLOTS") {
            self.node.slots = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = var("KILN_METRICS_ADDR") {
            self.node.metrics_addr = v;
        }
        if let Some(v) = var("KILN_CLUSTER_COOKIE") {
            self.cluster.cookie = v;
        }
        Ok(())
    }

    /// Checks everything serde cannot: names, ranges, references between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        if !self.node.name.is_empty() && !ids::is_valid_token(&self.node.name) {
            return Err(invalid("node.name", "must be letters, digits, '-' or '_'"));
        }
        if self.node.slots.is_empty() {
            return Err(invalid("node.slots", "must name at least one slot"));
        }
        for (i, slot) in self.node.slots.iter().enumerate() {
            if parse_slot(slot).is_none() {
                return Err(invalid(format!("node.slots[{i}]"), format!("{slot:?} is not `cuda:N` or `cpu:N`")));
            }
            if self.node.slots[..i].contains(slot) {
                return Err(invalid(format!("node.slots[{i}]"), format!("{slot:?} is listed twice")));
            }
        }
        if self.node.heartbeat_ms == 0 || self.node.registry_ttl_ms < 2 * self.node.heartbeat_ms {
            return Err(invalid("node.registry_ttl_ms", "must be at least twice node.heartbeat_ms"));
        }
        if self.node.loss_after_ms < 2 * self.node.heartbeat_ms || self.node.loss_after_ms > self.node.registry_ttl_ms {
            return Err(invalid("node.loss_after_ms", "must be at least twice node.heartbeat_ms and at most node.registry_ttl_ms"));
        }
        if self.compression.queue_limit == 0 {
            return Err(invalid("compression.queue_limit", "must be positive"));
        }
        for (i, model) in self.models.iter().enumerate() {
            for (j, stage) in model.stages.iter().enumerate() {
                let key = format!("models[{i}].stages[{j}]");
                if !ids::is_valid_token(stage.name()) {
                    return Err(invalid(format!("{key}.name"), "must be letters, digits, '-' or '_'"));
                }
                match stage {
                    StageConfig::Command { command, input, output, timeout_ms, max_attempts, .. } => {
                        if command.is_empty() {
                            return Err(invalid(format!("{key}.command"), "must name a program"));
                        }
                        for placeholder in ["{input}", "{output}"] {
                            if !command.iter().any(|a| a.contains(placeholder)) {
                                return Err(invalid(format!("{key}.command"), format!("must contain {placeholder}")));
                            }
                        }
                        if input == output || !ids::is_valid_object_name(input) || !ids::is_valid_object_name(output) {
                            return Err(invalid(format!("{key}.output"), "input and output must be two artifact file names"));
                        }
                        if *timeout_ms == 0 || *max_attempts == 0 {
                            return Err(invalid(format!("{key}.timeout_ms"), "timeout_ms and max_attempts must be positive"));
                        }
                    }
                    StageConfig::CameraMetadata { output, default_focal, .. } => {
                        if !ids::is_valid_object_name(output) || default_focal.is_nan() || *default_focal <= 0.0 {
                            return Err(invalid(format!("{key}.output"), "needs an artifact file name and a positive default_focal"));
                        }
                    }
                }
            }
        }
        if self.cluster.cookie.is_empty() {
            return Err(invalid("cluster.cookie", "must not be empty"));
        }
        if self.cluster.heartbeat_ms == 0 || self.cluster.silence_ms < 2 * self.cluster.heartbeat_ms {
            return Err(invalid("cluster.silence_ms", "must be at least twice cluster.heartbeat_ms"));
        }
        if self.cluster.frame_bytes < 1024 || self.cluster.frame_bytes > 512 * 1024 {
            return Err(invalid("cluster.frame_bytes", "must be between 1024 and 524288 (half the NATS payload limit)"));
        }
        if self.cluster.window_bytes < 2 * self.cluster.frame_bytes {
            return Err(invalid("cluster.window_bytes", "must be at least twice cluster.frame_bytes"));
        }
        if self.cluster.redial_ms == 0 {
            return Err(invalid("cluster.redial_ms", "must be positive"));
        }
        if self.limits.max_batch_items == 0 || self.limits.max_batch_items > 5000 {
            // The parent record lists every item and must fit one KV value (1 MiB payload).
            return Err(invalid("limits.max_batch_items", "must be between 1 and 5000"));
        }
        if self.limits.max_request_bytes == 0 || self.limits.max_request_bytes > 1024 * 1024 {
            return Err(invalid("limits.max_request_bytes", "must be between 1 and 1048576 (the NATS payload limit)"));
        }
        if self.restart.backoff_initial_ms == 0 || self.restart.backoff_max_ms < self.restart.backoff_initial_ms {
            return Err(invalid("restart.backoff_max_ms", "must be at least restart.backoff_initial_ms, which must be above 0"));
        }
        if self.retry.backoff_multiplier < 1.0 {
            return Err(invalid("retry.backoff_multiplier", "must be at least 1.0"));
        }
        if self.models.is_empty() {
            return Err(invalid("models", "must configure at least one model"));
        }
        for (i, m) in self.models.iter().enumerate() {
            let key = |field: &str| format!("models[{i}].{field}");
            if !ids::is_valid_model_name(&m.name) {
                return Err(invalid(key("name"), format!("{:?} must be 1-32 lowercase letters, digits, '-' or '_'", m.name)));
            }
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return Err(invalid(key("name"), format!("{:?} is configured twice", m.name)));
            }
            if m.timeout_ms == 0 {
                return Err(invalid(key("timeout_ms"), "must be above 0"));
            }
            if m.max_attempts == 0 || m.max_attempts > 100 {
                return Err(invalid(key("max_attempts"), "must be between 1 and 100"));
            }
            if m.result_ttl_s == Some(0) {
                return Err(invalid(key("result_ttl_s"), "must be above 0"));
            }
            for (j, decl) in m.params.iter().enumerate() {
                if let Some(why) = decl.invalid() {
                    return Err(invalid(key(&format!("params[{j}]")), why));
                }
                if m.params[..j].iter().any(|o| o.name == decl.name) {
                    return Err(invalid(key(&format!("params[{j}]")), format!("{:?} is declared twice", decl.name)));
                }
            }
            for s in &m.slots {
                if parse_slot(s).is_none() {
                    return Err(invalid(key("slots"), format!("{s:?} is not `cuda:N` or `cpu:N`")));
                }
            }
            match &m.engine {
                EngineConfig::Process { command, .. } if command.is_empty() => {
                    return Err(invalid(key("engine.command"), "must name a program"))
                }
                EngineConfig::Process { cwd: Some(dir), .. } if !Path::new(dir).is_dir() => {
                    return Err(invalid(key("engine.cwd"), format!("{dir:?} is not a folder")))
                }
                EngineConfig::Torchscript { .. } if !cfg!(feature = "torch") => {
                    return Err(invalid(key("engine.kind"), crate::engine::NO_TORCH))
                }
                EngineConfig::Torchscript { path, device, inputs, params, max_batch, max_batch_delay_ms, .. } => {
                    if *max_batch == 0 || *max_batch > 1024 {
                        return Err(invalid(key("engine.max_batch"), "must be between 1 and 1024"));
                    }
                    if *max_batch_delay_ms > 10_000 {
                        return Err(invalid(key("engine.max_batch_delay_ms"), "must be at most 10000"));
                    }
                    if path.is_empty() {
                        return Err(invalid(key("engine.path"), "must name a .pt file"));
                    }
                    if device != "slot" && device != "cpu" {
                        return Err(invalid(key("engine.device"), format!("{device:?} is not \"slot\" or \"cpu\"")));
                    }
                    let mut names: Vec<&str> =
                        inputs.iter().map(|i| i.name.as_str()).chain(params.iter().map(|p| p.name.as_str())).collect();
                    names.sort();
                    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                        return Err(invalid(key("engine"), format!("{:?} is both an input and a param, or listed twice", w[0])));
                    }
                }
                _ => {}
            }
        }
        self.http.validate(|m| self.model(m).is_some())?;
        Ok(())
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The models a slot of this node serves.
    pub fn models_for_slot(&self, slot: &str) -> Vec<String> {
        self.models.iter().filter(|m| m.slots.is_empty() || m.slots.iter().any(|s| s == slot)).map(|m| m.name.clone()).collect()
    }

    pub fn result_ttl_s(&self, model: &ModelConfig) -> u64 {
        model.result_ttl_s.unwrap_or(self.storage.result_ttl_s)
    }

    /// What this node publishes of each model it declares (see
    /// [`crate::protocol::ModelDecl`]): every one of its `[[models]]`, even one that none of its
    /// slots serves now, so that a configured model is known (its jobs wait, or a batch falls
    /// back at submit) as it was before the registry decided.
    pub fn model_decls(&self) -> Vec<crate::protocol::ModelDecl> {
        self.models
            .iter()
            .map(|m| crate::protocol::ModelDecl {
                name: m.name.clone(),
                engine: m.engine.kind().to_string(),
                max_attempts: m.max_attempts,
                timeout_ms: m.timeout_ms,
                result_ttl_s: self.result_ttl_s(m),
                required_inputs: m.required_inputs.clone(),
                params: m.params.clone(),
            })
            .collect()
    }
}

/// A parsed slot name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotDevice {
    Cuda(u32),
    Cpu(u32),
}

pub fn parse_slot(slot: &str) -> Option<SlotDevice> {
    let (kind, index) = slot.split_once(':')?;
    let index: u32 = index.parse().ok()?;
    match kind {
        "cuda" => Some(SlotDevice::Cuda(index)),
        "cpu" => Some(SlotDevice::Cpu(index)),
        _ => None,
    }
}

/// `cuda:0` -> `cuda-0`: KV keys and subjects may not contain `:`.
pub fn slot_key(slot: &str) -> String {
    slot.replace(':', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[models]]
name = "demo"
engine = { kind = "noop" }
"#;

    #[test]
    fn shipped_cluster_toml_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml");
        let config = ClusterConfig::load(&path).expect("shipped cluster.toml must be valid");
        assert!(!config.models.is_empty());
        assert_eq!(config.nats.url, "embedded");
    }

    #[test]
    fn defaults_fill_everything_but_models() {
        let c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.nats.prefix, "kiln");
        assert_eq!(c.models[0].max_attempts, 3);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = ClusterConfig::from_toml("[node]\nslotz = []\n", "t").unwrap_err().to_string();
        assert!(err.contains("slotz"), "{err}");
        let err = ClusterConfig::from_toml("[[models]]\nname='a'\nengine={kind='noop', delay=1}\n", "t").unwrap_err().to_string();
        assert!(err.contains("delay"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.node.slots = vec!["gpu0".into()];
        assert!(c.validate().unwrap_err().to_string().contains("node.slots[0]"));
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.models[0].name = "Bad Name".into();
        assert!(c.validate().unwrap_err().to_string().contains("models[0].name"));
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.models[0].max_attempts = 0;
        assert!(c.validate().unwrap_err().to_string().contains("models[0].max_attempts"));
    }

    #[test]
    fn a_nats_cluster_is_a_list_of_seeds_with_replicas_checked() {
        let n = NatsConfig::for_url("nats://a:4222, nats://b:4222,tls://c:4222");
        assert_eq!(n.urls(), ["nats://a:4222", "nats://b:4222", "tls://c:4222"]);
        assert!(n.tls(), "one tls:// seed asks for TLS");
        let check = |nats: &str| {
            let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
            c.nats = ClusterConfig::from_toml(nats, "t").unwrap().nats;
            c.validate().map_err(|e| e.to_string())
        };
        assert_eq!(check("[nats]\nurl = \"nats://a:1,nats://b:1,nats://c:1\"\nreplicas = 3"), Ok(()));
        assert!(check("[nats]\nurl = \"nats://a:1\"\nreplicas = 2").unwrap_err().contains("nats.replicas"));
        assert!(check("[nats]\nreplicas = 3").unwrap_err().contains("embedded"), "the embedded server is one server");
        let mut n = NatsConfig::for_url("nats://a:1");
        n.apply_env(|k| (k == "KILN_NATS_REPLICAS").then(|| "5".into())).unwrap();
        assert_eq!(n.replicas, 5);
        assert!(n.apply_env(|k| (k == "KILN_NATS_REPLICAS").then(|| "three".into())).is_err());
    }

    #[test]
    fn the_cluster_link_is_checked() {
        let check = |toml: &str| ClusterConfig::from_toml(toml, "t").unwrap().validate().unwrap_err().to_string();
        assert!(check("[cluster]\ncookie = \"\"").contains("cluster.cookie"));
        assert!(check("[cluster]\nheartbeat_ms = 500\nsilence_ms = 600").contains("cluster.silence_ms"));
        assert!(check("[cluster]\nframe_bytes = 2000000").contains("cluster.frame_bytes"));
        assert!(check("[cluster]\nwindow_bytes = 1000").contains("cluster.window_bytes"));
        let mut c = ClusterConfig::default();
        c.apply_env(|k| (k == "KILN_CLUSTER_COOKIE").then(|| "s3cret".into())).unwrap();
        assert_eq!(c.cluster.cookie, "s3cret");
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.apply_env(|k| match k {
            "KILN_NATS_URL" => Some("nats://10.0.0.1:4222".into()),
            "KILN_SLOTS" => Some("cpu:0, cpu:1".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(c.node.slots, vec!["cpu:0", "cpu:1"]);
        assert!(c.apply_env(|k| (k == "KILN_ACK_WAIT_MS").then(|| "soon".into())).unwrap_err().to_string().contains("KILN_ACK_WAIT_MS"));
    }

    #[test]
    fn nats_credentials_are_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.pem");
        std::fs::write(&file, "x").unwrap();
        let f = file.display().to_string();
        let check =
            |toml: &str| ClusterConfig::from_toml(&format!("{toml}\n{MINIMAL}"), "t").unwrap().validate().map_err(|e| e.to_string());
        assert!(check("[nats]\nuser = \"u\"").unwrap_err().contains("nats.password"));
        assert!(check("[nats]\npassword = \"p\"").unwrap_err().contains("nats.user"));
        let two = check(&format!("[nats]\nuser = \"u\"\npassword = \"p\"\ncreds_file = \"{f}\"")).unwrap_err();
        assert!(two.contains("nats.creds_file") && two.contains("one authentication method"), "{two}");
        assert!(check("[nats]\ntoken = \"t\"\nnkey_seed_file = \"/nope\"").unwrap_err().contains("nats.nkey_seed_file"));
        assert!(check("[nats]\ncreds_file = \"/no/such.creds\"").unwrap_err().contains("nats.creds_file"));
        assert!(check("[nats]\ntls_ca_file = \"/no/ca.pem\"").unwrap_err().contains("nats.tls_ca_file"));
        assert!(check(&format!("[nats]\ntls_key_file = \"{f}\"")).unwrap_err().contains("nats.tls_cert_file"));
        assert!(check(&format!("[nats]\ntls_cert_file = \"{f}\"")).unwrap_err().contains("nats.tls_key_file"));
        check(&format!("[nats]\ntls_cert_file = \"{f}\"\ntls_key_file = \"{f}\"\ntls_ca_file = \"{f}\"\ntoken = \"t\"")).unwrap();

        // Secrets come from the environment too, and never show in Debug output.
        let mut c = ClusterConfig::from_toml(&format!("[nats]\nuser = \"kiln\"\n[cluster]\ncookie = \"c00kie\"\n{MINIMAL}"), "t").unwrap();
        c.apply_env(|k| (k == "KILN_NATS_PASSWORD").then(|| "hunter2-secret".into())).unwrap();
        c.validate().unwrap();
        assert!(c.nats.auth() == NatsAuth::UserPassword { user: "kiln", password: "hunter2-secret" });
        let shown = format!("{c:?} {:?}", c.nats);
        assert!(!shown.contains("hunter2") && !shown.contains("c00kie") && shown.contains("<redacted>"), "{shown}");
        c.nats.password.clear();
        c.nats.user.clear();
        c.apply_env(|k| (k == "KILN_NATS_TOKEN").then(|| "tok-secret".into())).unwrap();
        assert!(!format!("{c:?}").contains("tok-secret"));
        assert!(c.nats.auth() == NatsAuth::Token("tok-secret"));
        assert!(!c.nats.tls());
        c.apply_env(|k| (k == "KILN_NATS_TLS_REQUIRED").then(|| "true".into())).unwrap();
        assert!(c.nats.tls());
        assert!(c.apply_env(|k| (k == "KILN_NATS_TLS_REQUIRED").then(|| "maybe".into())).is_err());
        assert!(NatsConfig::for_url("tls://h:4222").tls());
    }

    #[test]
    fn included_tables_add_their_models_and_routes_with_paths_of_their_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("seeds/http")).unwrap();
        std::fs::create_dir_all(dir.path().join("seeds/workers")).unwrap();
        std::fs::write(dir.path().join("seeds/workers/w.py"), "").unwrap();
        let table = r#"
[compression]
max_workers = 7
[[models]]
name = "talker"
engine = { kind = "process", command = ["python3", "../workers/w.py"] }
[[http.routes]]
method = "POST"
path = "/api/tasks"
kind = "submit"
model = "talker"
"#;
        std::fs::write(dir.path().join("seeds/http/t.toml"), table).unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, format!("[http]\ninclude = [\"seeds/http/t.toml\"]\n{MINIMAL}")).unwrap();
        let c = ClusterConfig::load(&path).unwrap();
        assert_eq!(c.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["demo", "talker"]);
        let EngineConfig::Process { command, .. } = &c.model("talker").unwrap().engine else { panic!("a process engine") };
        let worker = dir.path().join("seeds/workers/w.py").canonicalize().unwrap();
        assert_eq!(command[1], worker.display().to_string(), "relative to the table, not to the including file");
        assert_eq!((c.http.routes.len(), c.compression.max_workers), (1, 0), "routes come, other sections do not");
        assert!(ClusterConfig::load_gateway(&path).is_ok());

        // Twice the same table: its model is configured twice.
        std::fs::write(&path, format!("[http]\ninclude = [\"seeds/http/t.toml\", \"seeds/http/t.toml\"]\n{MINIMAL}")).unwrap();
        assert!(ClusterConfig::load(&path).unwrap_err().to_string().contains("configured twice"));
        // An included file includes nothing further; a missing one is named.
        std::fs::write(dir.path().join("seeds/http/nested.toml"), "[http]\ninclude = [\"t.toml\"]\n").unwrap();
        std::fs::write(&path, format!("[http]\ninclude = [\"seeds/http/nested.toml\"]\n{MINIMAL}")).unwrap();
        assert!(ClusterConfig::load(&path).unwrap_err().to_string().contains("http.include[0]"));
        std::fs::write(&path, format!("[http]\ninclude = [\"nope.toml\"]\n{MINIMAL}")).unwrap();
        assert!(ClusterConfig::load(&path).unwrap_err().to_string().contains("nope.toml"));
    }

    #[test]
    fn credential_paths_resolve_against_the_config_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.creds"), "x").unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, format!("[nats]\ncreds_file = \"node.creds\"\ntls_ca_file = \"ca.pem\"\n{MINIMAL}")).unwrap();
        let c = ClusterConfig::load(&path).unwrap();
        assert_eq!(c.nats.creds_file, dir.path().join("node.creds").display().to_string());
        // A client reads only the [nats] section: no models needed.
        std::fs::write(&path, "[nats]\nurl = \"nats://h:1\"\nprefix = \"acme\"\ntls_ca_file = \"ca.pem\"\n").unwrap();
        let n = ClusterConfig::load_nats(Some(&path)).unwrap();
        assert_eq!((n.url.as_str(), n.prefix.as_str()), ("nats://h:1", "acme"));
        assert!(n.tls() && n.tls_ca_file.starts_with('/'));
    }

    /// PROTOCOL: "Relative paths in `command` resolve against the config file's folder": a bare
    /// `worker.py` beside the config too, not only `./worker.py` (issue 23: it ran against the
    /// node's folder). The program word without a '/' stays a PATH lookup.
    #[test]
    fn worker_paths_in_a_command_resolve_against_the_config_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("worker.py"), "x").unwrap();
        std::fs::create_dir(dir.path().join("weights")).unwrap();
        let path = dir.path().join("cluster.toml");
        let model = r#"
[[models]]
name = "w"
engine = { kind = "process", command = ["python3", "worker.py", "--weights", "weights", "--mode", "fast", "./worker.py"] }
"#;
        std::fs::write(&path, model).unwrap();
        let c = ClusterConfig::load(&path).unwrap();
        let EngineConfig::Process { command, .. } = &c.models[0].engine else { panic!() };
        let folder = dir.path().canonicalize().unwrap();
        let at = |name: &str| folder.join(name).display().to_string();
        assert_eq!(
            command,
            &["python3".to_string(), at("worker.py"), "--weights".into(), at("weights"), "--mode".into(), "fast".into(), at("worker.py")]
        );
    }
}
