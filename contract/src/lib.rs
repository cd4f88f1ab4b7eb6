//! # kiln-contract
//!
//! Kiln's wire contract and the pure rules over it: what a client sends and receives, what a
//! node stores, and what a worker process reads. No NATS client, no libtorch, no async
//! runtime: a program that only speaks Kiln's protocol depends on this crate alone, and the
//! rules here are tested without a server.
//!
//! | module           | what                                                                  |
//! |------------------|-----------------------------------------------------------------------|
//! | [`protocol`]     | JSON requests, replies, events, job states and error codes on the wire |
//! | [`job`]          | the job record (source of truth) and every change to it, as pure functions |
//! | [`batch`]        | batches: record and plan, settling (reuse, held items, fallbacks), summary |
//! | [`endpoint`]     | every `kiln.api.*` endpoint once: name, family, request and reply types |
//! | [`keys`]         | ids derived from client keys: idempotent job ids, reuse keys          |
//! | [`worker`]       | the worker protocol's lines (stdin/stdout JSON of a `process` engine)  |
//! | [`preview`]      | live previews: their limits, headers, the throttle rule, the SSE view  |
//! | [`retry_reason`] | why a job gets another attempt (its `retrying` event), from the record |
//! | [`params`]       | params a model declares, checked at submit (names, types, ranges, defaults) |
//! | [`models`]       | the cluster's models from the registry's node entries; the conflict rule |
//! | [`ids`]          | syntax of client-controlled names (no wildcards, no path tricks)      |
//! | [`names`]        | every subject, stream and bucket name, from one prefix                |
//! | [`schema`]       | the JSON Schema of every NATS message, with the subjects they travel on |
//! | [`trace`]        | W3C trace context (`traceparent`, `tracestate`): parse, format, a fresh trace |
//!
//! The files depend one way: `ids`, `names`, `params` <- `protocol` <- `job` <- `batch`,
//! `retry_reason`, `keys`, `worker`; `preview` and `trace` stand alone (`job` keeps a `trace`); `models` and `endpoint` read `protocol` only; `schema` reads them all.

pub mod batch;
pub mod endpoint;
pub mod ids;
pub mod job;
pub mod keys;
pub mod models;
pub mod names;
pub mod params;
pub mod preview;
pub mod protocol;
pub mod retry_reason;
pub mod schema;
pub mod trace;
pub mod worker;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
