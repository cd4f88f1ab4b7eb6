//! [`MemoryStore`]: the [`JobStore`] in memory, for in-process tests of the rules built on it
//! (fencing, the claim, the outcome write, the artifact announcement) with tokio's paused
//! clock. Same semantics as the NATS one, where a test can see them: revisions that grow
//! bucket-wide (a KV bucket's revision is its stream's sequence), compare-and-set conflicts,
//! one events stream whose sequences grow across jobs, de-duplication ids, the
//! expected-last-sequence fence. Simpler where no rule depends on it: de-duplication has no
//! window (an id is remembered for ever), and batches are not modelled (a settle is recorded,
//! see [`MemoryStore::settled`]; the batch rules are tested against a real server).
//!
//! NATS trouble is injected by name: [`MemoryStore::refuse_next`] (the operation fails,
//! nothing applied: a stream without a leader) and [`MemoryStore::lose_next_reply`] (it is
//! applied, but its caller hears a timeout: the case a writer must recognise as its own).

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::{BoxFuture, FutureExt};

use super::{EventAck, JobStore, StoreFuture};
use crate::job::JobRecord;
use crate::nats::jobs::Versioned;
use crate::nats::{CasError, StoreError};
use crate::protocol::{Artifact, Event};

/// The operations trouble can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    GetJob,
    UpdateJob,
    /// Every publish into a job's history (`publish_event_*`, the terminal event of `publish_end`).
    PublishEvent,
    PublishEventAfter,
    LastEvent,
    /// The results feed entry (`publish_end`'s and `publish_finished`).
    PublishFinished,
    SettleBatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Fails before anything is applied.
    Refuse,
    /// Applied; the answer is lost.
    LoseReply,
    /// Applied; the answer says the revision was wrong (a compare-and-set that lost). A
    /// replicated nats-server answered a KV update so while its stream's leader changed
    /// (nats-server#7281; the partition test in tests/nats_cluster.rs).
    LandAsConflict,
}

/// A [`JobStore`] in memory (see the module docs).
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, (JobRecord, u64)>,
    /// The bucket's last revision: every create and update takes the next one.
    revision: u64,
    /// The events stream: (sequence, event), in the order stored.
    events: Vec<(u64, Event)>,
    /// De-duplication ids of stored events and the sequence each was stored at.
    event_ids: HashMap<String, u64>,
    /// The results feed, in the order stored.
    feed: Vec<JobRecord>,
    feed_ids: std::collections::HashSet<String>,
    settled: Vec<JobRecord>,
    deleted: Vec<String>,
    /// Trouble still to come, in order, each for one call of its operation.
    faults: Vec<(Op, Fault)>,
}

/// What a call of an operation meets.
fn trouble() -> StoreError {
    StoreError::Nats("no responders available for request".into())
}

fn lost_reply() -> StoreError {
    StoreError::Nats("timed out: didn't receive a reply".into())
}

impl State {
    fn fault(&mut self, op: Op) -> Option<Fault> {
        let at = self.faults.iter().position(|(o, _)| *o == op)?;
        Some(self.faults.remove(at).1)
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn last_event(&self, job_id: &str) -> Option<(u64, Event)> {
        self.events.iter().rev().find(|(_, e)| e.job_id == job_id).cloned()
    }

    /// Stores `event` unless `msg_id` was stored before; its sequence either way.
    fn store_event(&mut self, event: &Event, msg_id: Option<&str>) -> u64 {
        if let Some(seq) = msg_id.and_then(|id| self.event_ids.get(id)) {
            return *seq;
        }
        let seq = self.events.last().map_or(0, |(s, _)| *s) + 1;
        self.events.push((seq, event.clone()));
        if let Some(id) = msg_id {
            self.event_ids.insert(id.to_string(), seq);
        }
        seq
    }

    fn store_finished(&mut self, record: &JobRecord) {
        if self.feed_ids.insert(format!("{}-finished", record.job_id)) {
            self.feed.push(record.clone());
        }
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    /// The next `times` calls of `op` fail with NATS trouble, applying nothing.
    pub fn refuse_next(&self, op: Op, times: usize) {
        self.state().faults.extend(std::iter::repeat_n((op, Fault::Refuse), times));
    }

    /// The next call of `op` is applied, but its caller hears a timeout.
    pub fn lose_next_reply(&self, op: Op) {
        self.state().faults.push((op, Fault::LoseReply));
    }

    /// The next call of `op` (a compare-and-set) is applied, but its caller hears that it lost.
    pub fn land_next_as_conflict(&self, op: Op) {
        self.state().faults.push((op, Fault::LandAsConflict));
    }

    /// The job's record as stored now, with its revision.
    pub fn job(&self, job_id: &str) -> Option<Versioned> {
        self.state().jobs.get(job_id).map(|(record, revision)| Versioned { record: record.clone(), revision: *revision })
    }

    /// The job's history, in the order stored.
    pub fn events(&self, job_id: &str) -> Vec<Event> {
        self.state().events.iter().filter(|(_, e)| e.job_id == job_id).map(|(_, e)| e.clone()).collect()
    }

    /// The results feed, in the order stored.
    pub fn feed(&self) -> Vec<JobRecord> {
        self.state().feed.clone()
    }

    /// The records settled into their batches, in the order asked.
    pub fn settled(&self) -> Vec<JobRecord> {
        self.state().settled.clone()
    }

    /// The artifact objects deleted, in the order asked.
    pub fn deleted_artifacts(&self) -> Vec<String> {
        self.state().deleted.clone()
    }
}

impl JobStore for MemoryStore {
    fn create_job<'a>(&'a self, record: &'a JobRecord) -> StoreFuture<'a, u64> {
        let mut state = self.state();
        let result = if state.jobs.contains_key(&record.job_id) {
            Err(StoreError::AlreadyExists)
        } else {
            let revision = state.next_revision();
            state.jobs.insert(record.job_id.clone(), (record.clone(), revision));
            Ok(revision)
        };
        futures::future::ready(result).boxed()
    }

    fn get_job<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        let mut state = self.state();
        let result = match state.fault(Op::GetJob) {
            Some(_) => Err(trouble()),
            None => Ok(state.jobs.get(job_id).map(|(record, revision)| Versioned { record: record.clone(), revision: *revision })),
        };
        futures::future::ready(result).boxed()
    }

    fn update_job<'a>(&'a self, record: &'a JobRecord, revision: u64) -> StoreFuture<'a, u64> {
        let mut state = self.state();
        let fault = state.fault(Op::UpdateJob);
        let result = match (fault, state.jobs.get(&record.job_id)) {
            (Some(Fault::Refuse), _) => Err(trouble()),
            (_, Some((_, stored))) if *stored == revision => {
                let next = state.next_revision();
                state.jobs.insert(record.job_id.clone(), (record.clone(), next));
                match fault {
                    Some(Fault::LoseReply) => Err(lost_reply()),
                    Some(Fault::LandAsConflict) => Err(StoreError::Conflict),
                    _ => Ok(next),
                }
            }
            // A KV update of a key that does not exist at `revision` (or at all) is refused
            // the same way: wrong last revision.
            _ => Err(StoreError::Conflict),
        };
        futures::future::ready(result).boxed()
    }

    fn publish_event_nowait<'a>(&'a self, event: &'a Event, msg_id: Option<&'a str>) -> StoreFuture<'a, EventAck> {
        let mut state = self.state();
        let result = match state.fault(Op::PublishEvent) {
            Some(Fault::Refuse) => Err(trouble()),
            fault => {
                let seq = state.store_event(event, msg_id);
                let ack = if fault == Some(Fault::LoseReply) { Err(lost_reply()) } else { Ok(seq) };
                let ack: EventAck = Box::pin(futures::future::ready(ack));
                Ok(ack)
            }
        };
        futures::future::ready(result).boxed()
    }

    fn publish_event_stored<'a>(&'a self, event: &'a Event, msg_id: Option<&'a str>) -> StoreFuture<'a, u64> {
        async move { self.publish_event_nowait(event, msg_id).await?.await }.boxed()
    }

    fn publish_event_after<'a>(&'a self, event: &'a Event, after: u64) -> StoreFuture<'a, Option<u64>> {
        let mut state = self.state();
        let fault = state.fault(Op::PublishEventAfter);
        let last = state.last_event(&event.job_id).map_or(0, |(seq, _)| seq);
        let result = match fault {
            Some(Fault::Refuse) => Err(trouble()),
            _ if last != after => Ok(None),
            fault => {
                let seq = state.store_event(event, None);
                if fault == Some(Fault::LoseReply) {
                    Err(lost_reply())
                } else {
                    Ok(Some(seq))
                }
            }
        };
        futures::future::ready(result).boxed()
    }

    fn last_event_with_seq<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Option<(u64, Event)>> {
        let mut state = self.state();
        let result = match state.fault(Op::LastEvent) {
            Some(_) => Err(trouble()),
            None => Ok(state.last_event(job_id)),
        };
        futures::future::ready(result).boxed()
    }

    fn publish_end<'a>(&'a self, event: &'a Event, record: &'a JobRecord) -> StoreFuture<'a, ()> {
        let mut state = self.state();
        // Both are sent before either answer is awaited, as on NATS: one may land while the
        // other fails.
        let feed = state.fault(Op::PublishFinished);
        if feed != Some(Fault::Refuse) {
            state.store_finished(record);
        }
        let terminal = state.fault(Op::PublishEvent);
        if terminal != Some(Fault::Refuse) {
            state.store_event(event, Some(&format!("{}-terminal", record.job_id)));
        }
        let result = match (feed, terminal) {
            (Some(Fault::Refuse), _) | (_, Some(Fault::Refuse)) => Err(trouble()),
            (Some(Fault::LoseReply), _) | (_, Some(Fault::LoseReply)) => Err(lost_reply()),
            _ => Ok(()),
        };
        futures::future::ready(result).boxed()
    }

    fn publish_finished<'a>(&'a self, record: &'a JobRecord) -> StoreFuture<'a, ()> {
        let mut state = self.state();
        let result = match state.fault(Op::PublishFinished) {
            Some(Fault::Refuse) => Err(trouble()),
            fault => {
                state.store_finished(record);
                if fault == Some(Fault::LoseReply) {
                    Err(lost_reply())
                } else {
                    Ok(())
                }
            }
        };
        futures::future::ready(result).boxed()
    }

    fn settle_batch_item<'a>(&'a self, record: &'a JobRecord) -> BoxFuture<'a, Result<(), CasError>> {
        let mut state = self.state();
        let result = match state.fault(Op::SettleBatch) {
            Some(Fault::Refuse) => Err(CasError::Store(trouble())),
            fault => {
                // A no-op for a job that is not a batch item or not terminal, as on NATS.
                if record.parent.is_some() && record.is_terminal() {
                    state.settled.push(record.clone());
                }
                if fault == Some(Fault::LoseReply) {
                    Err(CasError::Store(lost_reply()))
                } else {
                    Ok(())
                }
            }
        };
        futures::future::ready(result).boxed()
    }

    fn delete_artifact<'a>(&'a self, _model: &'a str, artifact: &'a Artifact) -> StoreFuture<'a, ()> {
        self.state().deleted.push(artifact.object.clone());
        futures::future::ready(Ok(())).boxed()
    }
}
