//! What a TorchScript model is configured with (`engine = { kind = "torchscript", ... }`):
//! plain data, compiled with or without libtorch, so a build without the `torch` feature still
//! reads and validates a config that names such a model.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    Text,
    Tensor,
    Image,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    Int,
    Float,
    Bool,
    Str,
}

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

/// A TorchScript model's settings (`engine = { kind = "torchscript", ... }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorchModel {
    pub path: PathBuf,
    pub inputs: Vec<InputSpec>,
    pub params: Vec<ParamSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Resident size estimate; eviction keeps the slot under its budget by this number.
    pub memory_bytes: u64,
    /// `cpu` pins the model to the CPU even on a GPU slot.
    pub cpu_only: bool,
    /// Dynamic batching: up to this many jobs in one forward pass (1: off).
    pub max_batch: usize,
    /// How long the first job of a batch waits for others.
    pub max_batch_delay: std::time::Duration,
}
