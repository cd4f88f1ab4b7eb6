//! LossDetector: notices when another node goes silent and hands its jobs back at once.
//!
//! Every tick it reads the registry (the local, watch-fed cache) and notes, on this process's
//! own monotonic clock, when it last saw each other node's heartbeat *change*. A node whose
//! heartbeat this detector, watching all along, has not seen change for `node.loss_after_ms`
//! is a suspect (SIGKILL, a cut link, a dead machine). Before acting, the detector reads the
//! suspect's entry from the server itself (not the cache): if its heartbeat moved, it is alive.
//! Otherwise the survivors race to create a claim key for that node's life
//! (`_lost.<node>.<started_ms>`); the one that wins:
//! - NAKs every delivery the lost node held (its `kiln_held` entry, if of that life), so JetStream
//!   redelivers them now instead of after the ack wait; the next attempt's compare-and-set on
//!   the job record fences out anything the lost node still writes;
//! - marks the lost node's GPUs `dead` in the registry (they expire with their TTL) and
//!   removes its node entry.
//!
//! A detector judges nobody across its own blind spots: while its NATS connection is down,
//! after this process stood still (the stall watch, or a gap between its own ticks), it
//! forgets what it saw and watches again for a whole threshold before it may declare anyone.
//! (An outside storm SIGSTOPped a node for 8 s: on SIGCONT it compared its peers' 8 s old
//! heartbeats with its clock, declared both lost and NAKed their running jobs.) Comparing
//! heartbeat changes, not heartbeat times, also keeps clock differences between machines out
//! of the verdict.
//!
//! Without it, a lost node's jobs still come back, after `nats.ack_wait_ms`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kiln_core::protocol::{GpuState, NodeEntry};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::context::NodeContext;

/// How often the registry is checked: a fraction of the loss threshold.
const TICK: Duration = Duration::from_millis(250);

pub struct LossDetector;

pub struct LossDetectorState {
    ctx: NodeContext,
    /// Each other node's last entry seen, and when (on this process's clock) its heartbeat
    /// last changed. Kept after the server expires the entry, so an expired node is judged.
    watched: HashMap<String, Watched>,
    /// Lives already declared lost: (node, started_ms).
    declared: HashSet<(String, u64)>,
    /// Since when this detector has watched without a blind spot; `None` while blind.
    watching_since: Option<Instant>,
    /// The last tick, to notice a tick that came far too late (this process was starved).
    last_tick: Option<Instant>,
    /// The stall generation seen at the last tick.
    stall_seen: u64,
    /// The NATS connect count seen at the last tick: a reconnect between two ticks is a
    /// blind spot too.
    connects_seen: u64,
}

struct Watched {
    entry: NodeEntry,
    changed_at: Instant,
    /// In the registry at the last tick, seen by a detector that was watching.
    present: bool,
}

/// Whether a node watched since `changed_at` is a suspect at `now`: its heartbeat has not
/// changed for longer than `loss_after`, and the watcher itself has watched without a blind
/// spot for at least that long. Pure, so the rule is tested on its own.
pub fn is_suspect(watching_since: Instant, changed_at: Instant, now: Instant, loss_after: Duration) -> bool {
    now.saturating_duration_since(watching_since) > loss_after && now.saturating_duration_since(changed_at) > loss_after
}

pub enum LossDetectorMsg {
    Tick,
}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for LossDetectorMsg {}

impl Actor for LossDetector {
    type Msg = LossDetectorMsg;
    type State = LossDetectorState;
    type Arguments = NodeContext;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, ctx: NodeContext) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(TICK, || LossDetectorMsg::Tick);
        let stall_seen = ctx.stall.generation();
        let connects_seen = ctx.resources.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed);
        Ok(LossDetectorState {
            ctx,
            watched: HashMap::new(),
            declared: HashSet::new(),
            watching_since: None,
            last_tick: None,
            stall_seen,
            connects_seen,
        })
    }

    async fn handle(&self, _myself: ActorRef<Self::Msg>, message: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match message {
            LossDetectorMsg::Tick => state.on_tick().await,
        }
        Ok(())
    }
}

impl LossDetectorState {
    /// Forgets what it saw: the next verdict needs a whole threshold of watching first.
    fn go_blind(&mut self) {
        self.watching_since = None;
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let loss_after = Duration::from_millis(self.ctx.config.node.loss_after_ms);
        let late_tick = self.last_tick.is_some_and(|t| now.saturating_duration_since(t) > loss_after / 2);
        self.last_tick = Some(now);
        let stall = self.ctx.stall.generation();
        let connects = self.ctx.resources.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed);
        if late_tick || stall != self.stall_seen || connects != self.connects_seen {
            (self.stall_seen, self.connects_seen) = (stall, connects);
            self.go_blind();
        }
        if self.ctx.resources.client.connection_state() != async_nats::connection::State::Connected {
            self.go_blind();
            return;
        }
        let watching_since = match self.watching_since {
            Some(since) => since,
            None => {
                // Whatever was seen before the blind spot says nothing about now: every node
                // starts a fresh threshold.
                for w in self.watched.values_mut() {
                    w.changed_at = now;
                    // Whether it left cleanly while this detector was blind is unknown.
                    w.present = false;
                }
                *self.watching_since.insert(now)
            }
        };
        let entries = self.ctx.registry.nodes_including_stale();
        let present: HashSet<String> = entries.iter().map(|e| e.node.clone()).collect();
        // Gone from the registry between two ticks while its heartbeat still moved: it left
        // cleanly (drain, SIGTERM) and removed its own entries. Forget it rather than declare
        // it lost later. One that vanished unseen (expired) stays, to be judged.
        self.watched.retain(|node, w| present.contains(node) || !w.present || now.saturating_duration_since(w.changed_at) > loss_after);
        for (node, w) in self.watched.iter_mut() {
            w.present = present.contains(node);
        }
        for entry in entries {
            if entry.node == self.ctx.node {
                continue;
            }
            let seen = (entry.started_ms, entry.heartbeat_ms);
            match self.watched.get_mut(&entry.node) {
                Some(w) if (w.entry.started_ms, w.entry.heartbeat_ms) == seen => {}
                Some(w) if seen < (w.entry.started_ms, w.entry.heartbeat_ms) => {} // an older write, late
                _ => {
                    self.watched.insert(entry.node.clone(), Watched { entry, changed_at: now, present: true });
                }
            }
        }
        let suspects: Vec<NodeEntry> = self
            .watched
            .values()
            .filter(|w| is_suspect(watching_since, w.changed_at, now, loss_after))
            .filter(|w| !self.declared.contains(&(w.entry.node.clone(), w.entry.started_ms)))
            .map(|w| w.entry.clone())
            .collect();
        for entry in suspects {
            // The cache may lag (a watch that fell behind): the server's own copy decides.
            match self.ctx.resources.node_entry_fresh(&entry.node).await {
                Ok(Some(fresh)) if (fresh.started_ms, fresh.heartbeat_ms) != (entry.started_ms, entry.heartbeat_ms) => {
                    self.watched.insert(entry.node.clone(), Watched { entry: fresh, changed_at: Instant::now(), present: true });
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %entry.node, error = %e, "cannot confirm a silent node's entry; judging it later");
                    continue;
                }
            }
            // The read may have taken long, or this process stood still during it.
            if self.ctx.stall.generation() != self.stall_seen {
                self.go_blind();
                return;
            }
            let silent_ms = now.saturating_duration_since(self.watched[&entry.node].changed_at).as_millis() as u64;
            self.declared.insert((entry.node.clone(), entry.started_ms));
            self.on_lost(entry, silent_ms).await;
        }
        // Forget lost nodes once handled and gone from the registry.
        self.watched.retain(|node, w| present.contains(node) || !self.declared.contains(&(node.clone(), w.entry.started_ms)));
    }

    async fn on_lost(&mut self, entry: NodeEntry, silent_ms: u64) {
        hand_back(&self.ctx.resources, &entry, silent_ms).await;
    }
}

/// Hands back the jobs of one lost life of a node, if this caller wins its claim
/// (`_lost.<node>.<started_ms>`; every survivor may try, one acts): NAKs every delivery that life
/// holds (`kiln_held`), marks its GPUs dead and removes its node entry. Also used by a node that
/// restarts under the same name and finds its previous life's entry dead: its jobs then come
/// back at once even with no other node to notice.
pub async fn hand_back(resources: &kiln_core::nats::Resources, entry: &NodeEntry, silent_ms: u64) {
    let claim = kiln_core::nats::lost_claim_key(&entry.node, entry.started_ms);
    match resources.claim_once(&claim).await {
        Ok(true) => {}
        Ok(false) => return, // another survivor handles it
        Err(e) => {
            tracing::warn!(node = %entry.node, error = %e, "cannot claim the hand-back of a lost node");
            return;
        }
    }
    // The deliveries of this life only: a new life of the same name (restarted meanwhile)
    // holds its own, which must not be handed back under it.
    let held = match resources.held_jobs(&entry.node).await {
        Ok(Some(held)) if held.started_ms == entry.started_ms => held.jobs,
        Ok(_) => vec![],
        Err(e) => {
            tracing::warn!(node = %entry.node, error = %e, "cannot read a lost node's deliveries; they return after the ack wait");
            vec![]
        }
    };
    tracing::warn!(node = %entry.node, silent_ms, jobs = held.len(), "node lost; handing its jobs back");
    metrics::counter!(kiln_core::metrics::NODES_LOST).increment(1);
    let client = &resources.client;
    for job in &held {
        if job.ack_subject.is_empty() {
            continue;
        }
        // "-NAK" on the delivery's ack subject: JetStream redelivers the message now.
        if let Err(e) = client.publish(job.ack_subject.clone(), "-NAK".into()).await {
            tracing::warn!(job_id = %job.job_id, error = %e, "cannot hand back a lost node's job; it returns after the ack wait");
        } else {
            tracing::info!(job_id = %job.job_id, node = %entry.node, "handed back");
        }
    }
    let _ = client.flush().await;
    let gpus = match resources.gpu_entries(Some(&entry.node), true).await {
        Ok(gpus) => gpus,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a lost node's GPU entries; they expire with their TTL");
            vec![]
        }
    };
    for mut gpu in gpus {
        gpu.state = GpuState::Dead;
        gpu.current_job = None;
        gpu.last_error = Some(format!("node lost: no heartbeat for {silent_ms} ms"));
        gpu.heartbeat_ms = kiln_core::now_ms();
        if let Err(e) = resources.put_gpu(&gpu).await {
            tracing::warn!(error = %e, "cannot mark a lost node's GPU dead");
        }
    }
    if let Err(e) = resources.delete_node_entry(&entry.node).await {
        tracing::warn!(error = %e, "cannot remove a lost node's entry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_is_a_suspect_until_the_watcher_watched_a_whole_threshold() {
        let t0 = Instant::now();
        let loss = Duration::from_millis(1000);
        let at = |ms| t0 + Duration::from_millis(ms);
        // Silent since t0, but the watcher only (re)started watching at 800 ms (it stood still).
        assert!(!is_suspect(at(800), t0, at(1500), loss));
        assert!(is_suspect(at(800), t0, at(1801), loss));
        // A heartbeat change resets the clock.
        assert!(!is_suspect(t0, at(900), at(1500), loss));
        assert!(is_suspect(t0, at(900), at(1901), loss));
    }
}
