//! The Rust client is the `kiln-client` crate (on the contract and async-nats only); the
//! runtime's commands, the gateway and the tools use it from here.

pub use kiln_client::client::*;
