//! Everything Kiln keeps in NATS, behind one cheap-to-clone handle, [`Resources`]:
//!
//! | file          | what                                                                  |
//! |---------------|-----------------------------------------------------------------------|
//! | `names`       | every subject, stream and bucket name, from one prefix, and back (in kiln-contract) |
//! | `server.rs`   | a real nats-server child process (embedded mode, bench, tests); a cluster of them |
//! | `resources.rs`| connect, create streams/buckets/consumers idempotently                |
//! | `cas.rs`      | the one compare-and-set loop every writer of a record goes through    |
//! | `patience.rs` | riding out NATS trouble (a leaderless stream): the one retry loop      |
//! | `jobs.rs`     | the job record in KV: create, read (any replica's, or the leader's), compare-and-set; the queue |
//! | `batches.rs`  | batch records and plans in KV; settling a child's end; its launches   |
//! | `queue.rs`    | the queue now: lanes' depth and deliveries, oldest wait, recent run times |
//! | `events.rs`   | progress events into the `KILN_EVENTS` stream                          |
//! | `previews.rs` | live previews on `kiln.previews.<job>`; `KILN_PREVIEWS` keeps the newest |
//! | `objects.rs`  | uploaded inputs and result artifacts in the object store, sha256 each |
//! | `webhooks.rs` | webhook messages waiting for delivery (`KILN_WEBHOOKS`), their consumers, each job's delivery log |
//! | `direct.rs`   | batched direct gets: many messages per request (the registry's snapshot, a job's position) |
//! | `registry.rs` | GPU and node entries with per-key TTL, cached in a dashmap by a watch |

pub mod batches;
pub mod cas;
mod direct;
pub mod events;
pub mod jobs;
pub use kiln_contract::names;
pub mod objects;
pub mod patience;
pub mod previews;
pub mod queue;
pub mod registry;
pub mod resources;
pub mod server;
pub mod webhooks;

pub use cas::CasError;
pub use names::{Lane, Names};
pub use patience::{ride_out, Transient};
pub use registry::{lost_claim_key, RegistryCache};
pub use resources::{KeyJobs, Resources};
pub use server::{ClusterMember, NatsCluster, NatsServer};

/// Errors of the NATS layer: the client's (connecting and moving objects fail the same ways).
pub use kiln_client::StoreError;
