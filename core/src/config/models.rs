//! The `[[models]]`: each model's engine and its settings (a process worker, a TorchScript
//! module with its inputs, params and output codecs, or noop), attempts and timeouts, the
//! params it declares, and its post-processing stages.
//!
//! The TorchScript specs are plain data read from the file; the engine that runs them
//! (`crate::engine::torchscript`) takes them from here, so configuration builds without the
//! engines.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a TorchScript model cannot run in this build: said by validation (`engine.kind`) and by
/// the engine, should one be built anyway.
pub const NO_TORCH: &str =
    "this kiln was built without the TorchScript engine (cargo feature `engines`, on by default; the slim image leaves it out)";

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
    /// GPUs (slots of one node) one job of it needs at once: its worker sees all of them
    /// (`CUDA_VISIBLE_DEVICES`), and the node holds them together while it runs (one primary
    /// slot runs the job, the others are held for it). 1 (default): its slot alone. Above 1 for
    /// the `process` engine only; a node with fewer slots serving it does not serve it.
    #[serde(default = "default_gpus")]
    pub gpus: usize,
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
    /// Warm pool: slots that load this model when the node starts (the first `min_warm` of
    /// `node.slots` that serve it) and keep it loaded: it is never stopped to make room for
    /// another model, so it counts against those slots' memory budget for good. Process models
    /// only. 0 (default): loaded on its first job, evicted when least recently used.
    #[serde(default)]
    pub min_warm: u32,
    /// Live previews of this model's jobs go at most once per this many ms (the node drops
    /// the rest; the job line tells the worker, so the SDK drops them before encoding); 0
    /// turns them off. Default 500.
    #[serde(default = "default_preview_interval_ms")]
    pub preview_interval_ms: u64,
}

fn default_preview_interval_ms() -> u64 {
    kiln_contract::preview::DEFAULT_PREVIEW_INTERVAL_MS
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

fn default_gpus() -> usize {
    1
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
        /// are stopped to make room. None (default): the worker's measured memory counts once
        /// it is loaded (on a `cpu:N` slot its process group's resident set, on a `cuda:N`
        /// slot what it reports in a `memory` line), and nothing before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_bytes: Option<u64>,
    },
    /// A TorchScript module run in process through tch on the slot's device.
    Torchscript {
        /// The `.pt` file; relative paths resolve against the config file's folder.
        path: String,
        /// Inputs passed first, in this order (`{ name, kind = "text" | "tensor" | "image" }`).
        #[serde(default)]
        inputs: Vec<InputSpec>,
        /// Scalar params passed after the inputs (`{ name, kind = "int" | "float" | "bool" | "str", default }`).
        #[serde(default)]
        params: Vec<ParamSpec>,
        /// Codecs of named outputs (`{ name, codec = "png" | "npy" | "json" | "ply" }`); others are `.npy`.
        #[serde(default)]
        outputs: Vec<OutputSpec>,
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

/// One input of a TorchScript model, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub kind: InputKind,
}

/// One scalar param of a TorchScript model, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    #[serde(default)]
    pub default: Option<serde_json::Value>,
}

/// How one named output becomes a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The output's name (a dict key, `output`, or `output_N`); for `ply`, the file name.
    pub name: String,
    pub codec: OutputCodec,
}

/// What a TorchScript input is made from: a string, a tensor (JSON arrays or an uploaded
/// `.npy`), or an uploaded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    Text,
    Tensor,
    Image,
}

/// The type of a TorchScript scalar param.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    Int,
    Float,
    Bool,
    Str,
}

/// How a TorchScript output tensor is written to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputCodec {
    Png,
    Npy,
    Json,
    Ply,
}

impl OutputCodec {
    pub fn content_type(self) -> &'static str {
        match self {
            OutputCodec::Png => "image/png",
            OutputCodec::Npy => "application/x-npy",
            OutputCodec::Json => "application/json",
            OutputCodec::Ply => "application/x-ply",
        }
    }
    pub fn extension(self) -> &'static str {
        match self {
            OutputCodec::Png => "png",
            OutputCodec::Npy => "npy",
            OutputCodec::Json => "json",
            OutputCodec::Ply => "ply",
        }
    }
}
