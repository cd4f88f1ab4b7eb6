//! [`JobStore`] on NATS: each operation is the [`Resources`] method of the same name
//! (`nats/jobs.rs`, `nats/events.rs`, `nats/batches.rs`, `nats/objects.rs`), unchanged; and
//! `Resources::update_job_with`, the API's record update, as the store's one update.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};

use super::{EventAck, JobStore, StoreFuture};
use crate::job::JobRecord;
use crate::nats::cas::{Step, Updated};
use crate::nats::jobs::Versioned;
use crate::nats::{CasError, Resources, StoreError};
use crate::policy::Patience;
use crate::protocol::{Artifact, Event};

impl Resources {
    /// Changes the job's record by `decide` (a pure change of [`crate::job`]) with
    /// compare-and-set, reading and deciding again when another writer got in between; one
    /// try with NATS trouble (an API request, whose client retries).
    /// `held`: the record and revision the caller already has, decided on without a read.
    pub async fn update_job_with<R>(
        &self,
        job_id: &str,
        held: Option<Versioned>,
        decide: impl FnMut(&JobRecord) -> Step<JobRecord, R>,
    ) -> Result<Updated<JobRecord, R>, CasError> {
        super::update_job_patiently(self, job_id, held, Patience::ONCE, decide).await
    }
}

impl JobStore for Resources {
    fn create_job<'a>(&'a self, record: &'a JobRecord) -> StoreFuture<'a, u64> {
        Resources::create_job(self, record).boxed()
    }

    fn get_job<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        Resources::get_job(self, job_id).boxed()
    }

    fn get_job_latest<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        Resources::get_job_latest(self, job_id).boxed()
    }

    fn update_job<'a>(&'a self, record: &'a JobRecord, revision: u64) -> StoreFuture<'a, u64> {
        Resources::update_job(self, record, revision).boxed()
    }

    fn publish_event_nowait<'a>(&'a self, event: &'a Event, msg_id: Option<&'a str>) -> StoreFuture<'a, EventAck> {
        async move {
            let ack = match msg_id {
                Some(id) => Resources::publish_event_nowait_with_id(self, event, id).await?,
                None => Resources::publish_event_nowait(self, event).await?,
            };
            let stored: EventAck = Box::pin(Exclusive::new(async move { ack.await.map(|a| a.sequence).map_err(StoreError::nats) }));
            Ok(stored)
        }
        .boxed()
    }

    fn publish_event_stored<'a>(&'a self, event: &'a Event, msg_id: Option<&'a str>) -> StoreFuture<'a, u64> {
        Resources::publish_event_stored(self, event, msg_id).boxed()
    }

    fn publish_event_after<'a>(&'a self, event: &'a Event, after: u64) -> StoreFuture<'a, Option<u64>> {
        Resources::publish_event_after(self, event, after).boxed()
    }

    fn last_event_with_seq<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<(u64, Event)>> {
        Resources::last_event_with_seq(self, job_id).boxed()
    }

    fn publish_end<'a>(&'a self, event: &'a Event, record: &'a JobRecord) -> StoreFuture<'a, ()> {
        Resources::publish_end(self, event, record).boxed()
    }

    fn publish_finished<'a>(&'a self, record: &'a JobRecord) -> StoreFuture<'a, ()> {
        Resources::publish_finished(self, record).boxed()
    }

    fn settle_batch_item<'a>(&'a self, record: &'a JobRecord) -> BoxFuture<'a, Result<(), CasError>> {
        Resources::settle_batch_item(self, record).boxed()
    }

    fn delete_artifact<'a>(&'a self, model: &'a str, artifact: &'a Artifact) -> StoreFuture<'a, ()> {
        Resources::delete_artifact(self, model, artifact).boxed()
    }
}

/// A `Send` future made `Sync` ([`EventAck`]'s bound) by a lock that is never taken: it is
/// polled only through `&mut` (`Mutex::get_mut`). async-nats's ack future is `Sync`, but the
/// future awaiting it is not.
struct Exclusive<F>(Mutex<Pin<Box<F>>>);

impl<F: Future> Exclusive<F> {
    fn new(future: F) -> Exclusive<F> {
        Exclusive(Mutex::new(Box::pin(future)))
    }
}

impl<F: Future> Future for Exclusive<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.get_mut().0.get_mut() {
            Ok(future) => future.as_mut().poll(cx),
            Err(poisoned) => poisoned.into_inner().as_mut().poll(cx),
        }
    }
}
