//! The job store: the record, event and results-feed operations that a job's delivery needs,
//! behind one small trait, [`JobStore`], so that the rules built on them (fencing, the claim,
//! the outcome write, the artifact announcement) run the same against NATS and in memory.
//!
//! | file        | what                                                                         |
//! |-------------|------------------------------------------------------------------------------|
//! | `mod.rs`    | the trait; the compare-and-set update over it ([`update_job_patiently`])     |
//! | `nats.rs`   | the real one: [`Resources`](crate::nats::Resources) (KV, streams), unchanged |
//! | `memory.rs` | [`MemoryStore`]: the same semantics in memory, for in-process tests          |
//!
//! What the trait promises, and both implementations keep (`core/tests/store.rs` (`conforms`) runs the
//! same assertions against both):
//! - a job record is created once, read with its revision, and written only by a
//!   compare-and-set on the revision read ([`StoreError::Conflict`] otherwise): the fence;
//! - a job's events are stored in the order they were sent, each with a sequence that grows;
//!   one published again with a de-duplication id already stored is not stored twice (the
//!   first one's sequence is answered);
//! - an event published "after" a sequence is stored only while that is still the job's last
//!   event's ([`JobStore::publish_event_after`]);
//! - a job's end goes to its history (de-duplicated by `<job>-terminal`) and to the results
//!   feed (by `<job>-finished`).
//!
//! Batches, the object store, the queue and the registry stay on
//! [`Resources`](crate::nats::Resources): their rules are tested against a real server.

mod memory;
mod nats;

use futures::future::BoxFuture;

pub use memory::{MemoryStore, Op};

use crate::job::JobRecord;
use crate::nats::cas::{self, CasError, Step, Updated};
use crate::nats::jobs::Versioned;
use crate::nats::StoreError;
use crate::policy::Patience;
use crate::protocol::{Artifact, Event};

/// What a store operation returns: a boxed future, so the trait can stand behind `dyn`.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// Resolves once an event sent without waiting is stored, with its stream sequence. `Sync`
/// as well: a delivery keeps its events' acks while its methods are borrowed across awaits.
pub type EventAck = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, StoreError>> + Send + Sync + 'static>>;

/// The record, event and results-feed operations of a job's path (see the module docs for
/// the semantics both implementations keep).
pub trait JobStore: Send + Sync {
    /// Creates a record that must not exist yet: its revision, or [`StoreError::AlreadyExists`].
    fn create_job<'a>(&'a self, record: &'a JobRecord) -> StoreFuture<'a, u64>;

    /// The record and the revision it was read at; `None` when there is none. On a replicated
    /// cluster any replica may answer, one that lags too (see [`get_job_latest`](Self::get_job_latest)).
    fn get_job<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<Versioned>>;

    /// The record as it is now: on NATS, read from the bucket's stream leader, never from a
    /// replica that lags. What a decision that cannot be undone reads: a compare-and-set's
    /// re-read after a conflict or trouble, a running attempt's fence check. (A lagging
    /// replica's record from before this attempt's claim once made an attempt whose outcome
    /// write timed out take its job for another attempt's and delete the completed job's
    /// artifacts: a partitioned nats-server rejoining, `tests/nats_cluster.rs`.) The in-memory
    /// store has one copy: the same as `get_job`.
    fn get_job_latest<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        self.get_job(job_id)
    }

    /// Compare-and-set: writes `record` only if the stored revision is still `revision`
    /// ([`StoreError::Conflict`] otherwise); the new revision.
    fn update_job<'a>(&'a self, record: &'a JobRecord, revision: u64) -> StoreFuture<'a, u64>;

    /// Sends `event` (de-duplicated by `msg_id` when given) without waiting for it to be stored:
    /// events sent one after the other are stored in that order, while their acks overlap.
    fn publish_event_nowait<'a>(&'a self, event: &'a Event, msg_id: Option<&'a str>) -> StoreFuture<'a, EventAck>;

    /// Publishes `event` and waits until it is stored: its sequence (the first one's when
    /// `msg_id` was stored before).
    fn publish_event_stored<'a>(&'a self, event: &'a Event, msg_id: Option<&'a str>) -> StoreFuture<'a, u64>;

    /// Publishes `event` only if the job's last stored event still has sequence `after`:
    /// `Some(seq)` once stored, `None` when another event was stored in between.
    fn publish_event_after<'a>(&'a self, event: &'a Event, after: u64) -> StoreFuture<'a, Option<u64>>;

    /// The job's last stored event with its sequence, if any.
    fn last_event_with_seq<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<(u64, Event)>>;

    /// The job's end: its terminal `event` in the history and `record` on the results feed,
    /// both de-duplicated (a redelivery publishes them again).
    fn publish_end<'a>(&'a self, event: &'a Event, record: &'a JobRecord) -> StoreFuture<'a, ()>;

    /// The job's end on the results feed only (de-duplicated like [`publish_end`](Self::publish_end)'s).
    fn publish_finished<'a>(&'a self, record: &'a JobRecord) -> StoreFuture<'a, ()>;

    /// Tells the job's batch (if it is a batch item) how it ended; idempotent.
    fn settle_batch_item<'a>(&'a self, record: &'a JobRecord) -> BoxFuture<'a, Result<(), CasError>>;

    /// Deletes an artifact nothing refers to (a fenced attempt's).
    fn delete_artifact<'a>(&'a self, model: &'a str, artifact: &'a Artifact) -> StoreFuture<'a, ()>;
}

/// The job's last stored event, if any.
pub async fn last_event(store: &dyn JobStore, job_id: &str) -> Result<Option<Event>, StoreError> {
    Ok(store.last_event_with_seq(job_id).await?.map(|(_, e)| e))
}

/// Changes the job's record by `decide` (a pure change of [`crate::job`]) with the one
/// compare-and-set loop ([`cas::update_patiently`]), riding out trouble for as long as
/// `patience` allows. `held`: the record and revision the caller already has.
pub async fn update_job_patiently<R>(
    store: &dyn JobStore,
    job_id: &str,
    held: Option<Versioned>,
    patience: Patience,
    decide: impl FnMut(&JobRecord) -> Step<JobRecord, R>,
) -> Result<Updated<JobRecord, R>, CasError> {
    cas::update_patiently(
        job_id,
        held.map(Versioned::into_pair),
        patience,
        || async { Ok(store.get_job_latest(job_id).await?.map(Versioned::into_pair)) },
        |next, revision| async move { store.update_job(&next, revision).await },
        decide,
    )
    .await
}
