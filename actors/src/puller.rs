//! The puller of one model: reserves free slots from the dispatcher, fetches that many jobs
//! from JetStream, and hands them over. It runs as a task of the dispatcher's, one per model
//! the node serves, and talks to it only through [`Placer`] (implemented by the dispatcher's
//! mailbox), so this file does not import the actor.
//!
//! ```text
//! Reserve free slots for the model (RPC; parked in FIFO order until a slot frees up)
//!      ▼
//! share them out between the queues that may hold jobs (`kiln_core::fair::FairOrder`): the
//!      ▼ `high` lane's before the `normal` lane's, within a lane in weighted fair order
//!      ▼ between its fair-share keys (a queue each; jobs without a key share the lane's own);
//!      ▼ fetch (no wait) each queue's share; a queue that came back short is not asked again
//!      ▼ until a publish on it wakes the puller or a re-check lists it
//! Dispatch(slot, message) for each message; Release the reservations left over
//!      ▼ no queue may hold a job: sleep until one is published for the model (a core-NATS
//!        queue subscription on its subjects: each publish wakes one node's puller) or 250 ms
//!        pass, then re-check: which of the model's subjects hold messages (one stream-info
//!        request); also every second while busy, for the keys whose wake-ups went elsewhere
//! ```
//!
//! An idle model holds no slot while it waits. (It used to keep one and long-poll: on a node
//! whose slots serve several models, the idle models' pollers then held the slots the busy
//! model needed, and a 500-job batch of one model ran at 4 jobs/s.) The re-check catches what
//! publishes nothing: a redelivery after the ack wait, or a retry's delayed NAK.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use futures::{FutureExt, StreamExt};
use kiln_core::fair::{weight_of, FairOrder};
use kiln_core::nats::names::JobSubject;
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
/// How often a busy puller re-checks which queues hold jobs: a key's wake-ups go to one node
/// each, and the others learn of the key here.
const BUSY_RECHECK: Duration = Duration::from_secs(1);
/// Most messages one pull asks for (bounded by the free slots anyway).
const MAX_PULL: usize = 256;
/// Longest wait for a fetch's answer. A live server answers a no-wait fetch at once; a fetch
/// whose pull request died with its server (SIGKILLed holding it, or lost in a reconnect) is
/// never answered, and async-nats gives a fetch without `expires` no deadline of its own: the
/// model's puller on this node then never pulled again, and its jobs stayed queued for ever
/// (`tests/nats_cluster.rs`, a consumer's leader SIGKILLed under load). A message the server
/// hands over after the deadline goes unacked and comes back after the ack wait.
const FETCH_DEADLINE: Duration = Duration::from_secs(5);

/// A queue of a model's lane: its fair-share key's token, or `None` for the lane's shared
/// queue (jobs without the key's label, and every job with fair share off).
type QueueKey = Option<String>;

/// The queues of one model as this node's puller knows them: which may hold jobs, in what
/// order to take them (one [`FairOrder`] per lane), and their consumers once opened.
struct Queues {
    ctx: NodeContext,
    model: String,
    high: FairOrder<QueueKey>,
    normal: FairOrder<QueueKey>,
    consumers: HashMap<(Lane, QueueKey), jetstream::consumer::PullConsumer>,
}

impl Queues {
    fn new(ctx: NodeContext, model: String) -> Self {
        Queues { ctx, model, high: FairOrder::default(), normal: FairOrder::default(), consumers: HashMap::new() }
    }

    fn order(&mut self, lane: Lane) -> &mut FairOrder<QueueKey> {
        match lane {
            Lane::High => &mut self.high,
            Lane::Normal => &mut self.normal,
        }
    }

    fn any_backlogged(&self) -> bool {
        self.high.any_backlogged() || self.normal.any_backlogged()
    }

    /// Every queue that may hold jobs, by lane (to look again after an empty fetch).
    fn backlogged(&self) -> Vec<(Lane, QueueKey)> {
        let high = self.high.backlogged_keys().into_iter().map(|k| (Lane::High, k));
        high.chain(self.normal.backlogged_keys().into_iter().map(|k| (Lane::Normal, k))).collect()
    }

    fn mark(&mut self, lane: Lane, key: QueueKey) {
        let weight = weight_of(&self.ctx.config.fair_share, key.as_deref());
        self.order(lane).backlogged(key, weight);
    }

    /// A job was published on `subject` (a wake-up): its queue holds one.
    fn woken(&mut self, subject: &str) {
        match JobSubject::parse(subject) {
            Some(s) => self.mark(s.lane, s.key.map(str::to_string)),
            None => self.mark_all(),
        }
    }

    /// Both lanes' shared queues and every key seen: when nothing better is known.
    fn mark_all(&mut self) {
        for lane in Lane::ALL {
            self.mark(lane, None);
            for key in self.order(lane).known_keys() {
                self.mark(lane, key);
            }
        }
    }

    /// Looks which of the model's queues hold messages now (one stream-info request), and
    /// forgets the keys that hold none.
    async fn recheck(&mut self) {
        match self.ctx.resources.queues_holding_jobs(&self.model).await {
            Ok(holding) => {
                for (subject, _) in holding {
                    if let Some(s) = JobSubject::parse(&subject) {
                        self.mark(s.lane, s.key.map(str::to_string));
                    }
                }
                self.high.forget_idle();
                self.normal.forget_idle();
            }
            Err(e) => {
                tracing::debug!(model = %self.model, error = %e, "cannot list the queues holding jobs; asking every queue");
                self.mark_all();
            }
        }
    }

    /// Up to `want` jobs, taken from the queues in fair order (see the module docs).
    async fn fetch(&mut self, want: usize) -> Vec<jetstream::Message> {
        let mut messages = vec![];
        for lane in Lane::ALL {
            while messages.len() < want && self.order(lane).any_backlogged() {
                let shares = self.order(lane).take(want - messages.len());
                let mut fetches = Vec::with_capacity(shares.len());
                for (key, asked) in &shares {
                    fetches.push((self.consumer(lane, key).await, *asked));
                }
                // The keys' fetches at once: a round of slots shared between keys costs one
                // round trip, not one per key.
                let fetched = futures::future::join_all(fetches.into_iter().map(|(consumer, asked)| async move {
                    match consumer {
                        Some(consumer) => fetch_now(&consumer, asked).await,
                        None => Ok(vec![]),
                    }
                }))
                .await;
                for ((key, asked), got) in shares.into_iter().zip(fetched) {
                    // A fetch refused (its consumer removed as idle, say): opened again next time.
                    let got = got.unwrap_or_else(|()| {
                        self.consumers.remove(&(lane, key.clone()));
                        vec![]
                    });
                    if got.len() < asked {
                        self.order(lane).returned(&key, asked - got.len());
                    }
                    messages.extend(got);
                }
            }
        }
        messages
    }

    /// The consumer of one queue, opened (a key's created) on first use; `None` when NATS
    /// refuses (the queue is asked again after the next re-check).
    async fn consumer(&mut self, lane: Lane, key: &QueueKey) -> Option<jetstream::consumer::PullConsumer> {
        if let Some(c) = self.consumers.get(&(lane, key.clone())) {
            return Some(c.clone());
        }
        let opened = match key {
            None => self.ctx.resources.consumer(&self.model, lane).await,
            Some(key) => self.ctx.resources.keyed_consumer(&self.model, lane, key).await,
        };
        match opened {
            Ok(c) => {
                self.consumers.insert((lane, key.clone()), c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(model = %self.model, lane = lane.as_str(), key = ?key, error = %e, "cannot open a queue's consumer; retrying later");
                None
            }
        }
    }
}

/// One model's puller: reserve free slots, fetch that many jobs, hand them to the dispatcher.
pub(crate) async fn pull_loop(ctx: NodeContext, model: String, dispatcher: impl Placer) {
    let mut queues = Queues::new(ctx.clone(), model.clone());
    queues.recheck().await;
    queues.mark_all();
    let mut last_recheck = tokio::time::Instant::now();
    // Every enqueue is also a core-NATS message on the queue's subject: it wakes an idle
    // puller, one per enqueue, of one node (a queue group). Waking every node's puller made
    // each of them fetch for every job, one of them getting it: n pull requests per job, which
    // took a 100-node cluster down to 82 jobs/s (`kiln scale`). A wake that lands on a node
    // whose slots are all busy waits there until one frees up (the puller then fetches); the
    // other nodes' pullers re-check meanwhile.
    let mut wake: Option<async_nats::Subscriber> = None;
    // Empty fetches in a row right after a wake-up (see below).
    let mut overtaken = 0u32;
    loop {
        if wake.is_none() {
            let names = &ctx.resources.names;
            match ctx.resources.client.queue_subscribe(names.jobs_subject_model(&model), names.pullers_queue(&model)).await {
                Ok(sub) => wake = Some(sub),
                Err(e) => {
                    tracing::warn!(model = %model, error = %e, "cannot subscribe to the model's queues; polling");
                    queues.mark_all();
                }
            }
        }
        if !queues.any_backlogged() {
            // Nothing known to wait: sleep until a job is published for the model, or the
            // re-check comes round. Holds no slot meanwhile (other models may need it).
            let woken = match wake.as_mut() {
                Some(sub) => tokio::time::timeout(IDLE_RECHECK, sub.next()).await.ok().flatten(),
                None => {
                    tokio::time::sleep(IDLE_RECHECK).await;
                    None
                }
            };
            match woken {
                Some(m) => {
                    queues.woken(&m.subject);
                    overtaken = 0;
                }
                None => {
                    queues.recheck().await;
                    last_recheck = tokio::time::Instant::now();
                }
            }
            continue;
        }
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
                queues.woken(&m.subject);
            }
        }
        if last_recheck.elapsed() >= BUSY_RECHECK {
            queues.recheck().await;
            last_recheck = tokio::time::Instant::now();
        }
        let mut slots = slots.into_iter();
        let before = queues.backlogged();
        let messages = queues.fetch(slots.len()).await;
        // The server hands a publish to core subscribers (the wake-up) before its stream has
        // stored it, so a fetch right after a wake-up can come back empty: look again at once,
        // then after a few ms, before waiting for the next wake-up (the policy says why).
        let overtaken_pause = if messages.is_empty() { policy::pull_overtaken_pause(overtaken) } else { None };
        if let Some(pause) = overtaken_pause {
            overtaken += 1;
            for (lane, key) in before {
                queues.mark(lane, key);
            }
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

/// Up to `max` messages the consumer holds now; `Err` when the fetch was refused (after a
/// short pause), which drops the consumer's handle: it is opened again on next use.
async fn fetch_now(consumer: &jetstream::consumer::PullConsumer, max: usize) -> Result<Vec<jetstream::Message>, ()> {
    let deadline = tokio::time::Instant::now() + FETCH_DEADLINE;
    let mut out = vec![];
    match tokio::time::timeout_at(deadline, consumer.fetch().max_messages(max).messages()).await {
        Ok(Ok(mut stream)) => loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(m))) => out.push(m),
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "fetch error");
                    if out.is_empty() {
                        return Err(());
                    }
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
            return Err(());
        }
        Err(_) => tracing::warn!("a fetch could not be sent in time; pulling again"),
    }
    Ok(out)
}
