//! The node and what it allows: `[node]` (its name, slots, heartbeats, working folders,
//! memory), `[limits]` (request sizes, admission), `[storage]` (expiry), the `[retry]` and
//! `[restart]` policies, and the `[compression]` pool that runs stage commands; slot names.

use serde::{Deserialize, Serialize};

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
    /// Memory one slot may fill with resident models, TorchScript modules and process workers
    /// (each counted by its declared `memory_bytes`, else its measured memory); the least
    /// recently used are evicted to stay under it, except those kept by `min_warm`.
    pub slot_memory_bytes: u64,
    /// Jobs a slot claims ahead of the one it runs (each up to its batch), so that the next
    /// job's claim and inputs are ready when the current one's model is done: the slot never
    /// waits on the control plane. 0 (default): a job is fetched only once its slot is free,
    /// so priority order holds for every job not yet running; with 1, a job claimed ahead is
    /// not overtaken by a more urgent one submitted after it.
    pub slot_prefetch: usize,
    /// How long a graceful stop (SIGTERM, Ctrl-C, a drain request) waits for running jobs
    /// before their attempts are abandoned to redelivery (`kiln node --drain-grace-s`). A
    /// supervisor's stop timeout must be longer.
    pub drain_grace_s: u64,
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
            drain_grace_s: 30,
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

/// `[autoscale]`: what the queue figures and gauges for autoscalers are computed for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleConfig {
    /// `desired_slots` is the slots that would start every queued job within this many seconds.
    pub target_wait_s: u64,
    /// How often the exporting node re-reads the queue for its gauges.
    pub refresh_ms: u64,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        AutoscaleConfig { target_wait_s: 60, refresh_ms: 5000 }
    }
}

/// `[fair_share]`: jobs of a model are taken in weighted fair order between the values of one
/// label (`kiln_core::fair`), within each priority lane.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FairShareConfig {
    /// The label whose values share a model's slots fairly (seed 001's `user_id`). Jobs without
    /// it share one key. Empty: fair share off, one first-in-first-out queue per lane.
    pub key: String,
    /// The weight of a value not named in `weights`.
    pub default_weight: u32,
    /// Weights by value; a name ending in `*` is a class: every value it begins (the longest
    /// such name wins over a shorter one, an exact name over any class).
    pub weights: std::collections::BTreeMap<String, u32>,
    /// A key's queue consumer with nothing queued or running for this long is removed (made
    /// again by its next job); 0 keeps them.
    pub idle_queue_s: u64,
}

impl Default for FairShareConfig {
    fn default() -> Self {
        FairShareConfig { key: "user_id".into(), default_weight: 1, weights: Default::default(), idle_queue_s: 600 }
    }
}

/// `[quota]`: limits per fair-share key (a value of `fair_share.key`) and model, enforced at
/// submit (`max_queued`, `submits_per_s`) and by JetStream (`max_running`). 0 is no limit; all
/// 0 (the default) is off. Jobs without the key's label are not limited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// A key's jobs of one model waiting to start (both lanes), beyond which a submit is
    /// refused `quota_exceeded`.
    pub max_queued: u64,
    /// A key's jobs of one model running at once, in each lane (its consumers'
    /// `max_ack_pending`).
    pub max_running: u64,
    /// A key's submits per second to one model, as a token bucket of `burst` (across the
    /// cluster: each API node allows its share, the rate divided by the live nodes).
    pub submits_per_s: f64,
    /// Submits a key may make at once after being idle (at least 1 when `submits_per_s` is set).
    pub burst: u64,
    /// Overrides by value, or by class (`"free-*"`: every value it begins; the longest class
    /// wins, an exact value over any class), as for `fair_share.weights`. A field left out
    /// keeps the default above.
    pub keys: std::collections::BTreeMap<String, QuotaOverride>,
}

/// One `[quota.keys."<value or class>"]`: the limits it sets instead of `[quota]`'s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submits_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

/// The limits of one key, defaults and its override put together (`kiln_core::fair::quota_of`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyQuota {
    pub max_queued: u64,
    pub max_running: u64,
    pub submits_per_s: f64,
    pub burst: u64,
}

impl QuotaConfig {
    /// Whether any limit is set, by default or for some key.
    pub fn is_on(&self) -> bool {
        self.defaults() != KeyQuota::default() || !self.keys.is_empty()
    }

    /// `[quota]`'s own limits: those of a key no override names.
    pub fn defaults(&self) -> KeyQuota {
        KeyQuota { max_queued: self.max_queued, max_running: self.max_running, submits_per_s: self.submits_per_s, burst: self.burst }
    }
}

impl QuotaOverride {
    /// `base` with the limits this override sets.
    pub fn over(&self, base: KeyQuota) -> KeyQuota {
        KeyQuota {
            max_queued: self.max_queued.unwrap_or(base.max_queued),
            max_running: self.max_running.unwrap_or(base.max_running),
            submits_per_s: self.submits_per_s.unwrap_or(base.submits_per_s),
            burst: self.burst.unwrap_or(base.burst),
        }
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
