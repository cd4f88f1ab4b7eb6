//! A TorchScript model as its slot runs it, built from its config: plain data, compiled with
//! or without libtorch (the `torch` feature), so a build without the engine still builds the
//! [`super::TorchEngine`] that refuses to run.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{InputSpec, OutputSpec, ParamSpec};

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
