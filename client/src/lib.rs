//! # kiln-client
//!
//! The Rust client of Kiln, on the wire contract (`kiln-contract`) and async-nats only: a
//! program that submits jobs and reads their results depends on this, never on libtorch or
//! the runtime. `kiln submit/status/...`, the gateway and the tools are built on it; any
//! other language speaks the same JSON (docs/PROTOCOL.md, examples/python/).
//!
//! | module      | what                                                                   |
//! |-------------|------------------------------------------------------------------------|
//! | [`client`]  | [`Client`]: typed requests to `kiln.api.*`, event replay, waits, uploads, verified downloads, live previews |
//! | [`connect`] | [`NatsConfig`]: URLs, credentials, TLS; the one way to connect with them |
//! | [`objects`] | objects in the JetStream object store: streamed, sha256 in the metadata |
//! | [`error`]   | [`StoreError`], the kinds of NATS failure                               |
//!
//! The files depend one way: `error` <- `connect`, `objects` <- `client`.

pub mod client;
pub mod connect;
pub mod error;
pub mod objects;

pub use client::{decode_reply, Client, ClientError, Preview};
pub use connect::NatsConfig;
pub use error::StoreError;
pub use kiln_contract as contract;
