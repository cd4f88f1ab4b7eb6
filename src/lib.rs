//! # kiln
//!
//! A cluster runtime for GPU generation jobs over NATS. This crate is the binary's library:
//!
//! | module      | what                                                                  |
//! |-------------|-----------------------------------------------------------------------|
//! | [`api`]     | the `kiln-api` NATS service: one [`api::Endpoint`] enum, one file per endpoint family (jobs, batches, control), admission and validation as pure functions |
//! | [`service`] | the NATS services protocol for it: `$SRV` discovery, error headers, stats, for the endpoints it is given |
//! | [`client`]  | the Rust client: re-exports the `kiln-client` crate                   |
//! | [`gateway`] | `kiln gateway`: HTTP + SSE, the seeds' routes, the web console        |
//! | [`node`]    | node bootstrap: embedded server, NATS resources, actors, API          |
//! | [`diag`]    | per-node diagnostics: echo, and actor-cluster ping (`kiln ping`)      |
//! | [`demo`]    | `kiln demo`: the README's main job                                     |
//! | [`health`]  | the node's HTTP server on `node.metrics_addr`: `/healthz`, `/readyz` (decided by a pure function), `/metrics` |
//! | [`metrics`] | the Prometheus recorder, installed once per process (describes every metric, sets `kiln_build_info`) |
//! | [`queue_gauges`] | the queue gauges for autoscalers, refreshed by one node (the live one whose name sorts first) |
//! | [`queue_sweep`] | removes idle fair-share queue consumers, by the node that exports the gauges |
//! | [`table`]   | the command line's tables, columns as wide as their content            |
//! | [`telemetry`] | the process's logs (filter `KILN_LOG`/`RUST_LOG`, text or JSON) and OTLP span export, set up once |
//!
//! The tools are the crate `kiln-tools` (`tools/`), re-exported here so their paths stay
//! `kiln::chaos`, `kiln::bench`, `kiln::bench_http`, `kiln::bench_webhooks` and `kiln::scale`: `kiln chaos` (a seeded
//! storm of jobs and faults, then the invariants), `kiln bench` (no-op jobs against the raw
//! JetStream floor, `--torchscript`, `--http`: the gateway), `kiln scale` (a cluster's costs at
//! 10, 30, 100 simulated nodes).
//!
//! The `kiln` binary is `main.rs` and the command line under `cli/` (not part of this library):
//! the clap tree and its dispatch in `cli/mod.rs`, one file per command family.
//!
//! The layers below: `kiln-actors` (the supervised actor tree), `kiln-core` (config, NATS
//! resources, placement, engines), `kiln-client` (the Rust client) and `kiln-contract` (the wire
//! contract and the job rules). `docs/ARCHITECTURE.md` draws the whole.

pub mod api;
pub mod client;
pub mod demo;
pub mod diag;
pub mod gateway;
pub mod health;
pub mod metrics;
pub mod node;
pub mod queue_gauges;
pub mod queue_sweep;
pub mod service;
pub mod table;
pub mod telemetry;

pub use kiln_actors as actors;
pub use kiln_core as core;
pub use kiln_tools::{bench, bench_http, bench_webhooks, chaos, scale};
