//! # kiln-core
//!
//! The runtime's shared layer, on `kiln-contract`: configuration, slot placement, every NATS
//! resource, and the engines that run models. Nothing here is an actor: the rules that decide (job delivery and retry, placement,
//! restart budget and backoff) are pure functions, tested without a server.
//!
//! | module        | what                                                                        |
//! |---------------|-----------------------------------------------------------------------------|
//! | [`config`]    | `cluster.toml`, typed, env overrides, `validate()`                          |
//! | [`http`]      | the `[http]` section: gateway address, limits, API keys, seed routes        |
//! | [`autoscale`] | a model's queue figures and the slots that would drain it within a target wait (pure) |
//! | [`fair`]      | fair share between a label's values: queue per key, weights, the order keys are taken in, each key's quota (pure) |
//! | [`pending`]   | why a waiting job waits, its position and estimated start (pure)            |
//! | [`placement`] | which slot takes how many jobs of a model: reserve, start, finish, warm     |
//! | [`policy`]    | restart budget, backoff, patience with NATS trouble; pure, explicit time    |
//! | [`nats`]      | streams, KV (one compare-and-set helper), object store, registry            |
//! | [`store`]     | the job store trait under the delivery: NATS and in-memory, one semantics   |
//! | [`engine`]    | the `process`, `torchscript` (tch, batching; cargo feature `torch`) and `noop` engines |
//! | [`stage`]     | post-processing stages: command expansion, image size, camera metadata      |
//! | [`child`]     | child processes the kernel kills when this process ends (spawner thread)    |
//! | [`stall`]     | notices that this process itself stood still (SIGSTOP, pause, starved)      |
//! | [`task`]      | every spawned task under a named kind: what stops it, what its panic does   |
//! | [`telemetry`] | a job's spans in its W3C trace: parent from the record, context for the worker, spans made afterwards |
//! | [`fault`]     | named fault points, compiled in only for tests                              |
//! | [`webhook`]   | webhooks' pure part: events wanted, targets, payload, Standard Webhooks signature, refused addresses |
//! | [`metrics`]   | metric names and label conventions (units in names, bounded labels)         |
//!
//! Re-exported from `kiln-contract` (the wire contract, no NATS, no libtorch), so each type has
//! one path: [`protocol`], [`endpoint`], [`job`], [`batch`], [`keys`], [`worker`], [`retry_reason`],
//! [`params`], [`preview`], [`models`], [`ids`], `trace`, and `nats::names`.
//!
//! libtorch is linked only with the `torch` feature (on by default; the `kiln` binary turns it
//! on with its `engines` feature): without it the `torchscript` engine is absent and a model
//! that asks for it is refused when the config is validated.
//!
//! [`nats`] and [`engine`] open with a table of their own files.

// The wire contract lives in its own crate (no NATS, no libtorch); re-exported so the runtime's
// code and its users keep one path for each type (`kiln_core::job::JobRecord`).
pub use kiln_contract::{batch, endpoint, ids, job, keys, models, now_ms, params, preview, protocol, retry_reason, trace, worker};

pub mod autoscale;
pub mod child;
pub mod config;
pub mod engine;
pub mod fair;
pub mod fault;
pub use config::http;
pub mod metrics;
pub mod nats;
pub mod pending;
pub mod placement;
pub mod policy;
pub mod stage;
pub mod stall;
pub mod store;
pub mod task;
pub mod telemetry;
pub mod webhook;

use std::path::PathBuf;

/// Where pinned tools and the embedded server's state live: `$KILN_CACHE`, else
/// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`. Never inside the repository.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/kiln")
}
