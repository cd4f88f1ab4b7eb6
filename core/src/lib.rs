//! # kiln-core
//!
//! The layer every other Kiln crate stands on: configuration, the public wire protocol, the
//! job record and its rules, slot placement, every NATS resource, and the engines that run
//! models. Nothing here is an actor: the rules that decide (job delivery and retry, placement,
//! restart budget and backoff) are pure functions, tested without a server.
//!
//! | module        | what                                                                        |
//! |---------------|-----------------------------------------------------------------------------|
//! | [`config`]    | `cluster.toml`, typed, env overrides, `validate()`                          |
//! | [`http`]      | the `[http]` section: gateway address, limits, API keys, seed routes        |
//! | [`protocol`]  | JSON requests, replies, events and error codes on the wire                  |
//! | [`job`]       | the job record (source of truth) and every change to it, as pure functions |
//! | [`retry_reason`] | why a job gets another attempt (its `retrying` event), from the record |
//! | [`params`]    | params a model declares, checked at submit (names, types, ranges, defaults) |
//! | [`models`]    | the cluster's models from the registry's node entries; the conflict rule    |
//! | [`batch`]     | batches: record and plan, settling (reuse, held items, fallbacks), summary  |
//! | [`placement`] | which slot takes how many jobs of a model: reserve, start, finish, warm     |
//! | [`policy`]    | restart budget, backoff, patience with NATS trouble; pure, explicit time    |
//! | [`ids`]       | syntax of client-controlled names (no wildcards, no path tricks)            |
//! | [`nats`]      | streams, KV (one compare-and-set helper), object store, registry, names     |
//! | [`store`]     | the job store trait under the delivery: NATS and in-memory, one semantics   |
//! | [`engine`]    | the `process`, `torchscript` (tch, batching) and `noop` engines; `codecs`   |
//! | [`stage`]     | post-processing stages: command expansion, image size, camera metadata      |
//! | [`child`]     | child processes the kernel kills when this process ends (spawner thread)    |
//! | [`stall`]     | notices that this process itself stood still (SIGSTOP, pause, starved)      |
//! | [`fault`]     | named fault points, compiled in only for tests                              |
//! | [`metrics`]   | metric names and label conventions (units in names, bounded labels)         |
//!
//! [`nats`] and [`engine`] open with a table of their own files.

pub mod batch;
pub mod child;
pub mod config;
pub mod engine;
pub mod fault;
pub mod http;
pub mod ids;
pub mod job;
pub mod metrics;
pub mod models;
pub mod nats;
pub mod params;
pub mod placement;
pub mod policy;
pub mod protocol;
pub mod retry_reason;
pub mod stage;
pub mod stall;
pub mod store;

use std::path::PathBuf;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

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
