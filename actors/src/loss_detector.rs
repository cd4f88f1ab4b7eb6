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
//! Nor across the registry's blind spots: the `kiln_nodes` stream can stand still while this
//! process and its connection are fine (its leader SIGSTOPped: writes wait, the watch delivers
//! nothing, a follower answers reads with what it had). A peer's silence counts only as far as
//! the registry is seen to move: a peer is a suspect once this node's *own* heartbeat, written
//! more than a threshold after the peer's last one, has come back through the watch. The stream
//! is one ordered log, so a heartbeat the peer wrote before that one would have come back
//! first. When the registry stood still (no own heartbeat came back for half a threshold),
//! only an own heartbeat written after it was seen moving again counts: what waited in a
//! stopped server's sockets is stored in no particular order when it resumes. (Issue 23 item
//! 6: right after SIGCONT of the server leading `kiln_nodes`, two live nodes declared each
//! other lost.)
//!
//! A new life of a node (a restart under the same name: a newer `started_ms`) says the old
//! life is dead, whatever the clock: its deliveries are handed back at once, even when the
//! restarted node came back before this detector judged the old life.
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
    /// Earlier lives of restarted nodes whose hand-back could not be claimed yet.
    pending_lives: Vec<NodeEntry>,
    /// Since when this detector has watched without a blind spot; `None` while blind.
    watching_since: Option<Instant>,
    /// The last tick, to notice a tick that came far too late (this process was starved).
    last_tick: Option<Instant>,
    /// The stall generation seen at the last tick.
    stall_seen: u64,
    /// The NATS connect count seen at the last tick: a reconnect between two ticks is a
    /// blind spot too.
    connects_seen: u64,
    /// This node's own newest heartbeat seen through the watch (`heartbeat_ms`), and when it
    /// was written, on this process's monotonic clock: how far the registry is known to have
    /// moved. `None` until the first one comes back, and after a blind spot.
    own_heartbeat: Option<(u64, Instant)>,
    /// When this node's own heartbeat last came back (this process's clock).
    own_seen_at: Option<Instant>,
    /// When the registry was last seen moving again after it stood still (or first seen):
    /// only an own heartbeat written after it is evidence that the registry moves.
    registry_resumed_at: Option<Instant>,
    /// When the registry was last seen moving again after standing still for a whole
    /// threshold or more (`stood_still_long`): every peer's silence counts from then.
    peers_reheard_from: Option<Instant>,
}

struct Watched {
    entry: NodeEntry,
    changed_at: Instant,
    /// In the registry at the last tick, seen by a detector that was watching.
    present: bool,
}

/// Whether a node whose heartbeat last changed at `changed_at` is a suspect at `now`:
/// - its heartbeat has not changed for longer than `loss_after`;
/// - the watcher itself has watched without a blind spot for at least that long;
/// - the registry moved past the node's deadline: `own_written`, when the newest heartbeat of
///   the watcher's own that came back through the watch was written, is more than
///   `loss_after` after `changed_at`. While the registry stands still (no own heartbeat comes
///   back), nobody is judged, however long the silence.
///
/// Pure, so the rule is tested on its own.
pub fn is_suspect(watching_since: Instant, changed_at: Instant, own_written: Option<Instant>, now: Instant, loss_after: Duration) -> bool {
    let registry_moved_past_deadline = own_written.is_some_and(|own| own.saturating_duration_since(changed_at) > loss_after);
    now.saturating_duration_since(watching_since) > loss_after
        && now.saturating_duration_since(changed_at) > loss_after
        && registry_moved_past_deadline
}

/// Whether the registry stood still: this node's own heartbeat, written every
/// `node.heartbeat_ms` (at most half the threshold), came back `now` after more than half the
/// threshold without one.
pub fn registry_stood_still(own_last_seen: Instant, now: Instant, loss_after: Duration) -> bool {
    now.saturating_duration_since(own_last_seen) > loss_after / 2
}

/// The newest own heartbeat's write time, if it counts as evidence that the registry moves:
/// written after the registry was seen moving again (`resumed_at`). The heartbeats that
/// come back when a stopped server resumes were written while it stood still, and so were
/// other nodes' writes waiting in that server's sockets, which it may store after ours (seen
/// on three servers: a live node declared lost 73 ms after the SIGCONT). A heartbeat written
/// after the resume was seen is stored after everything that waited.
pub fn registry_evidence(own_written: Option<Instant>, resumed_at: Option<Instant>) -> Option<Instant> {
    own_written.filter(|written| resumed_at.is_none_or(|resumed| *written > resumed))
}

/// Whether the registry stood still long enough that a live peer's writes may have been
/// dropped rather than held: no own heartbeat came back for a whole threshold (a leader
/// election takes seconds). Shorter gaps are a loaded machine's (a heartbeat of five slots'
/// puts can take over half a threshold): resetting every peer's silence on those delayed a
/// real verdict to 7.5 s.
pub fn stood_still_long(own_last_seen: Instant, now: Instant, loss_after: Duration) -> bool {
    now.saturating_duration_since(own_last_seen) > loss_after
}

/// When a peer's silence counts from: its last heartbeat change, or the moment the registry
/// was seen moving again after it stood still for a whole threshold ([`stood_still_long`]),
/// whichever is later. A live peer's heartbeat
/// written while the stream had no leader is not always waiting to be stored: it can be
/// dropped (its put times out), so after a resume every peer gets a whole threshold to be
/// heard again (seen on three servers: a live node declared lost 46 ms after the SIGCONT of
/// the registry's leader, its one write of the stall lost and the next not yet made).
pub fn silence_start(changed_at: Instant, resumed_at: Option<Instant>) -> Instant {
    resumed_at.map_or(changed_at, |resumed| changed_at.max(resumed))
}

/// Whether `seen` is a newer life of the node than `watched` (a restart under the same
/// name): then the watched life is dead, whatever any clock says.
pub fn is_new_life(watched_started_ms: u64, seen_started_ms: u64) -> bool {
    seen_started_ms > watched_started_ms
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
            pending_lives: vec![],
            watching_since: None,
            last_tick: None,
            stall_seen,
            connects_seen,
            own_heartbeat: None,
            own_seen_at: None,
            registry_resumed_at: None,
            peers_reheard_from: None,
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
        self.own_heartbeat = None;
        self.own_seen_at = None;
    }

    /// Notes this node's own entry as the watch delivered it: when its heartbeat changed, the
    /// registry moved up to the moment that heartbeat was written (stamped on this process's
    /// wall clock, turned into this process's monotonic clock).
    fn note_own(&mut self, entry: &NodeEntry, now: Instant, loss_after: Duration) {
        if self.own_heartbeat.is_some_and(|(seen, _)| seen >= entry.heartbeat_ms) {
            return;
        }
        if self.own_seen_at.is_none_or(|last| registry_stood_still(last, now, loss_after)) {
            self.registry_resumed_at = Some(now);
        }
        if self.own_seen_at.is_some_and(|last| stood_still_long(last, now, loss_after)) {
            self.peers_reheard_from = Some(now);
        }
        self.own_seen_at = Some(now);
        let age = Duration::from_millis(kiln_core::now_ms().saturating_sub(entry.heartbeat_ms));
        let written = now.checked_sub(age).unwrap_or(now);
        self.own_heartbeat = Some((entry.heartbeat_ms, written));
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
        // Earlier lives of nodes restarted under the same name, to hand back now.
        let mut previous_lives: Vec<(NodeEntry, u64)> = vec![];
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
                self.note_own(&entry, now, loss_after);
                continue;
            }
            let seen = (entry.started_ms, entry.heartbeat_ms);
            match self.watched.get_mut(&entry.node) {
                Some(w) if (w.entry.started_ms, w.entry.heartbeat_ms) == seen => {}
                Some(w) if seen < (w.entry.started_ms, w.entry.heartbeat_ms) => {} // an older write, late
                Some(w) => {
                    if is_new_life(w.entry.started_ms, entry.started_ms)
                        && !self.declared.contains(&(w.entry.node.clone(), w.entry.started_ms))
                    {
                        previous_lives.push((w.entry.clone(), now.saturating_duration_since(w.changed_at).as_millis() as u64));
                    }
                    *w = Watched { entry, changed_at: now, present: true };
                }
                None => {
                    self.watched.insert(entry.node.clone(), Watched { entry, changed_at: now, present: true });
                }
            }
        }
        self.retry_pending_lives().await;
        for (old, silent_ms) in previous_lives {
            // Only its deliveries: the new life owns the node's entries now.
            let life = (old.node.clone(), old.started_ms);
            self.declared.insert(life.clone());
            if hand_back(&self.ctx.resources, &old.node, old.started_ms, Some(silent_ms), HandBackScope::Deliveries).await.is_err() {
                // Tried again when the claim can be written: the new life stays watched, so
                // the old one is remembered here.
                self.declared.remove(&life);
                self.pending_lives.push(old);
            }
        }
        let own_written = registry_evidence(self.own_heartbeat.map(|(_, written)| written), self.registry_resumed_at);
        let suspects: Vec<NodeEntry> = self
            .watched
            .values()
            .filter(|w| is_suspect(watching_since, silence_start(w.changed_at, self.peers_reheard_from), own_written, now, loss_after))
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
            let life = (entry.node.clone(), entry.started_ms);
            self.declared.insert(life.clone());
            if self.on_lost(entry, silent_ms).await.is_err() {
                // The claim could not be written (the registry's stream without a leader, say):
                // judged again at the next tick, not left in the registry until its TTL.
                self.declared.remove(&life);
            }
        }
        // Forget lost nodes once handled and gone from the registry.
        self.watched.retain(|node, w| present.contains(node) || !self.declared.contains(&(node.clone(), w.entry.started_ms)));
    }

    async fn on_lost(&mut self, entry: NodeEntry, silent_ms: u64) -> Result<(), kiln_core::nats::StoreError> {
        hand_back(&self.ctx.resources, &entry.node, entry.started_ms, Some(silent_ms), HandBackScope::Node).await.map(|_| ())
    }

    /// Earlier lives whose hand-back could not be claimed yet: tried again each tick.
    async fn retry_pending_lives(&mut self) {
        for old in std::mem::take(&mut self.pending_lives) {
            let life = (old.node.clone(), old.started_ms);
            if self.declared.contains(&life) {
                continue;
            }
            self.declared.insert(life.clone());
            if hand_back(&self.ctx.resources, &old.node, old.started_ms, None, HandBackScope::Deliveries).await.is_err() {
                self.declared.remove(&life);
                self.pending_lives.push(old);
            }
        }
    }
}

/// What a hand-back covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandBackScope {
    /// The life's deliveries only: a newer life of the node is alive and owns its entries.
    Deliveries,
    /// Also the node's entries: its GPUs are marked dead and its node entry removed.
    Node,
}

/// Hands back the jobs of one lost life of a node (`started_ms`), if this caller wins its claim
/// (`_lost.<node>.<started_ms>`; every survivor may try, one acts): NAKs every delivery that life
/// holds (`kiln_held`: the ack subjects stay valid after the process died, the consumer being
/// durable), and with [`HandBackScope::Node`] marks its GPUs dead and removes its node entry.
/// Also used by a node that restarts under the same name: its previous life's jobs then come
/// back at once even with no other node to notice.
///
/// `Ok(true)`: handed back by this caller; `Ok(false)`: another caller holds the claim; `Err`:
/// the claim could not be written, try again later.
pub async fn hand_back(
    resources: &kiln_core::nats::Resources,
    node: &str,
    started_ms: u64,
    silent_ms: Option<u64>,
    scope: HandBackScope,
) -> Result<bool, kiln_core::nats::StoreError> {
    let claim = kiln_core::nats::lost_claim_key(node, started_ms);
    match resources.claim_once(&claim).await {
        Ok(true) => {}
        Ok(false) => return Ok(false), // another survivor handles it
        Err(e) => {
            tracing::warn!(node = %node, error = %e, "cannot claim the hand-back of a lost node");
            return Err(e);
        }
    }
    // The deliveries of this life only: a new life of the same name (restarted meanwhile)
    // holds its own, which must not be handed back under it.
    let held = match resources.held_jobs(node).await {
        Ok(Some(held)) if held.started_ms == started_ms => held.jobs,
        Ok(_) => vec![],
        Err(e) => {
            tracing::warn!(node = %node, error = %e, "cannot read a lost node's deliveries; they return after the ack wait");
            vec![]
        }
    };
    tracing::warn!(node = %node, life = started_ms, silent_ms, jobs = held.len(), "node lost; handing its jobs back");
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
            tracing::info!(job_id = %job.job_id, node = %node, "handed back");
        }
    }
    let _ = client.flush().await;
    if scope == HandBackScope::Deliveries {
        return Ok(true);
    }
    let gpus = match resources.gpu_entries(Some(node), true).await {
        Ok(gpus) => gpus,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a lost node's GPU entries; they expire with their TTL");
            vec![]
        }
    };
    for mut gpu in gpus {
        gpu.state = GpuState::Dead;
        gpu.current_job = None;
        gpu.last_error = Some(match silent_ms {
            Some(ms) => format!("node lost: no heartbeat for {ms} ms"),
            None => "node lost".to_string(),
        });
        gpu.heartbeat_ms = kiln_core::now_ms();
        if let Err(e) = resources.put_gpu(&gpu).await {
            tracing::warn!(error = %e, "cannot mark a lost node's GPU dead");
        }
    }
    if let Err(e) = resources.delete_node_entry(node).await {
        tracing::warn!(error = %e, "cannot remove a lost node's entry");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nobody_is_a_suspect_until_the_watcher_watched_a_whole_threshold() {
        let t0 = Instant::now();
        let loss = Duration::from_millis(1000);
        let at = |ms| t0 + Duration::from_millis(ms);
        // The registry moves: this node's own heartbeats come back as they are written.
        let own = |now_ms| Some(at(now_ms));
        // Silent since t0, but the watcher only (re)started watching at 800 ms (it stood still).
        assert!(!is_suspect(at(800), t0, own(1500), at(1500), loss));
        assert!(is_suspect(at(800), t0, own(1801), at(1801), loss));
        // A heartbeat change resets the clock.
        assert!(!is_suspect(t0, at(900), own(1500), at(1500), loss));
        assert!(is_suspect(t0, at(900), own(1901), at(1901), loss));
    }

    /// Issue 23 item 6: the registry's stream stood still (its leader SIGSTOPped) while this
    /// process ran on. The last own heartbeat that came back was written before the peer's
    /// deadline: the peer is not judged however long the silence, and it is, at once, when an
    /// own heartbeat written past its deadline comes back.
    #[test]
    fn a_registry_that_stands_still_judges_nobody() {
        let t0 = Instant::now();
        let loss = Duration::from_millis(1000);
        let at = |ms| t0 + Duration::from_millis(ms);
        // Peer last seen at 100 ms, own heartbeat last back written at 300 ms; 8 s later.
        assert!(!is_suspect(t0, at(100), Some(at(300)), at(8_000), loss));
        assert!(!is_suspect(t0, at(100), None, at(8_000), loss));
        // The stream moves again: an own heartbeat written at 8 s comes back.
        assert!(is_suspect(t0, at(100), Some(at(8_000)), at(8_050), loss));
    }

    #[test]
    fn what_came_back_when_the_registry_resumed_is_no_evidence() {
        let t0 = Instant::now();
        let loss = Duration::from_millis(1000);
        let at = |ms| t0 + Duration::from_millis(ms);
        // Own heartbeats came back at 0 and 300 ms: moving. Then nothing until 6 s.
        assert!(!registry_stood_still(at(0), at(300), loss));
        assert!(registry_stood_still(at(300), at(6_000), loss));
        // What came back at 6 s was written at 5.8 s, before the resume was seen: no evidence.
        assert_eq!(registry_evidence(Some(at(5_800)), Some(at(6_000))), None);
        // The next one, written after: evidence.
        assert_eq!(registry_evidence(Some(at(6_100)), Some(at(6_000))), Some(at(6_100)));
    }

    #[test]
    fn after_the_registry_resumes_every_peer_gets_a_whole_threshold() {
        let loss = Duration::from_millis(1_000);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Heard last at 0, the registry stood still until 6,000, own evidence written at 6,050.
        let start = silence_start(at(0), Some(at(6_000)));
        assert!(!is_suspect(at(0), start, Some(at(6_050)), at(6_100), loss), "judged 100 ms after the resume");
        assert!(!is_suspect(at(0), start, Some(at(6_900)), at(6_950), loss));
        assert!(is_suspect(at(0), start, Some(at(7_100)), at(7_150), loss), "silent a whole threshold after the resume");
        // Only a stall of a whole threshold resets the peers; a loaded machine's late heartbeat does not.
        assert!(!stood_still_long(at(0), at(900), loss));
        assert!(stood_still_long(at(0), at(6_000), loss));
        // Without a stall, silence counts from the last change.
        assert_eq!(silence_start(at(10), None), at(10));
        assert_eq!(silence_start(at(7_000), Some(at(6_000))), at(7_000));
    }

    #[test]
    fn a_newer_life_is_a_verdict_on_the_older() {
        assert!(is_new_life(1_000, 2_000));
        assert!(!is_new_life(2_000, 2_000));
        assert!(!is_new_life(2_000, 1_000), "a late write of an older life says nothing");
    }

    proptest! {
        /// For every history: a node is never a suspect unless an own heartbeat written more
        /// than the threshold after the node's last change came back through the registry,
        /// and the watcher watched a whole threshold, and the node was silent that long.
        #[test]
        fn no_verdict_across_a_registry_blind_spot(
            loss_ms in 1u64..10_000,
            watching_ms in 0u64..60_000,
            changed_ms in 0u64..60_000,
            own_ms in proptest::option::of(0u64..60_000),
            now_ms in 0u64..120_000,
        ) {
            let t0 = Instant::now();
            let at = |ms| t0 + Duration::from_millis(ms);
            let loss = Duration::from_millis(loss_ms);
            let suspect = is_suspect(at(watching_ms), at(changed_ms), own_ms.map(at), at(now_ms), loss);
            let registry_moved_past_deadline = own_ms.is_some_and(|own| own > changed_ms + loss_ms);
            prop_assert!(!suspect || registry_moved_past_deadline, "judged while the registry stood still");
            prop_assert!(!suspect || now_ms > changed_ms + loss_ms);
            prop_assert!(!suspect || now_ms > watching_ms + loss_ms);
            // And it is judged once all three hold: a killed node is declared as soon as the
            // registry moves again.
            if registry_moved_past_deadline && now_ms > changed_ms + loss_ms && now_ms > watching_ms + loss_ms {
                prop_assert!(suspect);
            }
        }

        /// Only an own heartbeat written after the registry resumed is evidence, and a silent
        /// node is never judged on one written before.
        #[test]
        fn nothing_written_before_the_resume_judges_anyone(
            loss_ms in 2u64..10_000,
            changed_ms in 0u64..60_000,
            written_ms in 0u64..120_000,
            resumed_ms in 0u64..120_000,
            now_ms in 0u64..180_000,
        ) {
            let t0 = Instant::now();
            let at = |ms| t0 + Duration::from_millis(ms);
            let evidence = registry_evidence(Some(at(written_ms)), Some(at(resumed_ms)));
            prop_assert_eq!(evidence.is_some(), written_ms > resumed_ms);
            if written_ms <= resumed_ms {
                prop_assert!(!is_suspect(t0, at(changed_ms), evidence, at(now_ms), Duration::from_millis(loss_ms)));
            }
        }

        /// The stream stands still from `still_ms` on (nothing written after it comes back):
        /// however long the silence, a node heard within the threshold before it is not judged.
        #[test]
        fn a_node_heard_before_the_registry_stood_still_is_never_judged_during_it(
            loss_ms in 1u64..10_000,
            heard_before_ms in 0u64..10_000,
            still_ms in 10_000u64..60_000,
            stood_still_for_ms in 0u64..600_000,
        ) {
            prop_assume!(heard_before_ms < loss_ms);
            let t0 = Instant::now();
            let at = |ms| t0 + Duration::from_millis(ms);
            let changed = at(still_ms - heard_before_ms);
            // Own heartbeats came back up to the moment the stream stood still.
            let own = Some(at(still_ms));
            let now = at(still_ms + stood_still_for_ms);
            prop_assert!(!is_suspect(t0, changed, own, now, Duration::from_millis(loss_ms)));
        }
    }
}
