//! The puller of one model: reserves free slots from the dispatcher, fetches that many jobs
//! from JetStream, and hands them over. It runs as a task of the dispatcher's, one per model
//! the node serves, and talks to it only through [`Placer`] (implemented by the dispatcher's
//! mailbox), so this file does not import the actor.
//!
//! ```text
//! Reserve free slots for the model (RPC; parked in FIFO order until a slot frees up)
//!      ▼
//! fetch (no wait) from the `high` lane, then the `normal` lane, up to the reserved count,
//!      ▼ each only if it may hold a job (`LaneHints`: a lane that came back short is
//!      ▼ not asked again until a publish on it wakes the puller)
//! Dispatch(slot, message) for each message; Release the reservations left over
//!      ▼ no lane may hold a job: sleep until one is published for the model (a core-NATS
//!        queue subscription on its lanes: each publish wakes one node's puller) or 250 ms
//!        pass, then ask both lanes
//! ```
//!
//! An idle model holds no slot while it waits. (It used to keep one and long-poll: on a node
//! whose slots serve several models, the idle models' pollers then held the slots the busy
//! model needed, and a 500-job batch of one model ran at 4 jobs/s.) The 250 ms re-check
//! catches what publishes nothing: a redelivery after the ack wait, or a retry's delayed NAK.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use futures::{FutureExt, StreamExt};
use kiln_core::nats::names::lane_of_job_subject;
use kiln_core::nats::Lane;
use kiln_core::policy;

use crate::context::NodeContext;

/// What a puller needs from whoever places jobs on slots (the dispatcher).
pub(crate) trait Placer: Send + Sync + 'static {
    /// Waits until at least one slot is free for `model` and reserves up to `max` of them
    /// (empty while the node drains); `None` once the placer is gone.
    fn reserve(&self, model: &str, max: usize) -> impl Future<Output = Option<Vec<String>>> + Send;
    /// A reserved slot the puller has no job for.
    fn release(&self, slot: String);
    /// A fetched job for a reserved slot; false once the placer is gone.
    fn dispatch(&self, slot: String, message: jetstream::Message) -> bool;
}

/// How often an idle puller looks again without being woken (redeliveries publish nothing).
const IDLE_RECHECK: Duration = Duration::from_millis(250);
/// Most messages one pull asks for (bounded by the free slots anyway).
const MAX_PULL: usize = 256;
/// Longest wait for a fetch's answer. A live server answers a no-wait fetch at once; a fetch
/// whose pull request died with its server (SIGKILLed holding it, or lost in a reconnect) is
/// never answered, and async-nats gives a fetch without `expires` no deadline of its own: the
/// model's puller on this node then never pulled again, and its jobs stayed queued for ever
/// (`tests/nats_cluster.rs`, a consumer's leader SIGKILLed under load). A message the server
/// hands over after the deadline goes unacked and comes back after the ack wait.
const FETCH_DEADLINE: Duration = Duration::from_secs(5);

/// Which lanes of a model may hold a job: a fetch is a round trip to the server, so a lane
/// found short is not asked again until a publish on it wakes the puller (or the idle re-check
/// comes round, for what publishes nothing: redeliveries and delayed NAKs). Asking both lanes
/// on every turn cost four pull requests per job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaneHints {
    high: bool,
    normal: bool,
}

impl LaneHints {
    /// Both lanes: at start, and when the idle re-check comes round.
    fn both() -> Self {
        LaneHints { high: true, normal: true }
    }
    /// A wake-up on a lane's subject (the enqueue's own publish): that lane has a job.
    fn woken(&mut self, lane: Option<Lane>) {
        match lane {
            Some(Lane::High) => self.high = true,
            Some(Lane::Normal) => self.normal = true,
            None => *self = LaneHints::both(),
        }
    }
    /// A fetch asked a lane for `asked` and got `got`: fewer means it is empty now.
    fn fetched(&mut self, lane: Lane, asked: usize, got: usize) {
        let hint = got >= asked;
        match lane {
            Lane::High => self.high = hint,
            Lane::Normal => self.normal = hint,
        }
    }
    fn any(self) -> bool {
        self.high || self.normal
    }
}

/// One model's puller: reserve free slots, fetch that many jobs, hand them to the dispatcher.
pub(crate) async fn pull_loop(ctx: NodeContext, model: String, dispatcher: impl Placer) {
    let mut consumers = None;
    // Every enqueue is also a core-NATS message on the lane's subject: it wakes an idle puller,
    // one per enqueue, of one node (a queue group). Waking every node's puller made each of
    // them fetch for every job, one of them getting it: n pull requests per job, which took a
    // 100-node cluster down to 82 jobs/s (`kiln scale`). A wake that lands on a node whose
    // slots are all busy waits there until one frees up (the puller then fetches); the other
    // nodes' pullers re-check every 250 ms meanwhile.
    let mut wake: Option<async_nats::Subscriber> = None;
    let mut hints = LaneHints::both();
    // Empty fetches in a row right after a wake-up (see below).
    let mut overtaken = 0u32;
    loop {
        if consumers.is_none() {
            match (ctx.resources.consumer(&model, Lane::High).await, ctx.resources.consumer(&model, Lane::Normal).await) {
                (Ok(h), Ok(n)) => consumers = Some((h, n)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(model = %model, error = %e, "cannot open consumers; retrying");
                    tokio::time::sleep(policy::PULL_CONSUMER_RETRY).await;
                    continue;
                }
            }
        }
        if wake.is_none() {
            let names = &ctx.resources.names;
            match ctx.resources.client.queue_subscribe(names.jobs_subject_model(&model), names.pullers_queue(&model)).await {
                Ok(sub) => wake = Some(sub),
                Err(e) => {
                    tracing::warn!(model = %model, error = %e, "cannot subscribe to the model's lanes; polling");
                    hints = LaneHints::both();
                }
            }
        }
        if !hints.any() {
            // Nothing known to wait: sleep until a job is published for the model, or the
            // re-check comes round. Holds no slot meanwhile (other models may need it).
            match wake.as_mut() {
                Some(sub) => match tokio::time::timeout(IDLE_RECHECK, sub.next()).await {
                    Ok(Some(m)) => {
                        hints.woken(lane_of_job_subject(&m.subject));
                        overtaken = 0;
                    }
                    _ => hints = LaneHints::both(),
                },
                None => {
                    tokio::time::sleep(IDLE_RECHECK).await;
                    hints = LaneHints::both();
                }
            }
            continue;
        }
        let (high, normal) = consumers.as_ref().expect("opened above");
        // Waits (parked in the dispatcher) until at least one slot is free for this model.
        let Some(slots) = dispatcher.reserve(&model, MAX_PULL).await else {
            return; // the dispatcher is gone
        };
        if slots.is_empty() {
            // Draining: the node takes no more jobs.
            tokio::time::sleep(policy::PULL_DRAINING_RECHECK).await;
            continue;
        }
        // Wake-ups from before this fetch are answered by it; only later ones must wake us.
        if let Some(sub) = wake.as_mut() {
            while let Some(Some(m)) = sub.next().now_or_never() {
                hints.woken(lane_of_job_subject(&m.subject));
            }
        }
        let mut slots = slots.into_iter();
        let want = slots.len();
        let before = hints;
        let mut messages = vec![];
        if hints.high {
            messages = fetch_now(high, want).await;
            hints.fetched(Lane::High, want, messages.len());
        }
        if messages.len() < want && hints.normal {
            let asked = want - messages.len();
            let got = fetch_now(normal, asked).await;
            hints.fetched(Lane::Normal, asked, got.len());
            messages.extend(got);
        }
        // The server hands a publish to core subscribers (the wake-up) before its stream has
        // stored it, so a fetch right after a wake-up can come back empty: look again at once,
        // then after a few ms, before waiting for the next wake-up (the policy says why).
        let overtaken_pause = if messages.is_empty() { policy::pull_overtaken_pause(overtaken) } else { None };
        if let Some(pause) = overtaken_pause {
            overtaken += 1;
            hints = before;
            for slot in slots {
                dispatcher.release(slot);
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            continue;
        }
        if !messages.is_empty() {
            overtaken = 0;
        }
        for message in messages {
            let slot = slots.next().expect("never more messages than slots");
            if !dispatcher.dispatch(slot, message) {
                return;
            }
        }
        // Places left over go back at once (other models may need them).
        for slot in slots {
            dispatcher.release(slot);
        }
    }
}

async fn fetch_now(consumer: &jetstream::consumer::PullConsumer, max: usize) -> Vec<jetstream::Message> {
    let deadline = tokio::time::Instant::now() + FETCH_DEADLINE;
    let mut out = vec![];
    match tokio::time::timeout_at(deadline, consumer.fetch().max_messages(max).messages()).await {
        Ok(Ok(mut stream)) => loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(m))) => out.push(m),
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "fetch error");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(got = out.len(), "a fetch got no answer in time (its server died with it?); pulling again");
                    break;
                }
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "fetch failed");
            tokio::time::sleep(policy::PULL_FETCH_FAILED_PAUSE).await;
        }
        Err(_) => tracing::warn!("a fetch could not be sent in time; pulling again"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_found_short_is_not_asked_again_until_woken() {
        let mut hints = LaneHints::both();
        hints.fetched(Lane::High, 8, 0);
        hints.fetched(Lane::Normal, 8, 3);
        assert!(!hints.any());
        hints.woken(lane_of_job_subject("kiln.jobs.noop.normal"));
        assert_eq!(hints, LaneHints { high: false, normal: true });
        // A full fetch may have left more behind: ask again.
        hints.fetched(Lane::Normal, 2, 2);
        assert!(hints.normal);
        hints.woken(lane_of_job_subject("kiln.jobs.noop.high"));
        assert!(hints.high);
        hints.fetched(Lane::High, 1, 0);
        hints.fetched(Lane::Normal, 1, 0);
        hints.woken(lane_of_job_subject("kiln.jobs.noop.bogus"));
        assert_eq!(hints, LaneHints::both());
    }
}
