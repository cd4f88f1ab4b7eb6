//! The storm and the fault schedule, both drawn from one seed: the same seed gives the same
//! submissions and the same faults at the same offsets on the same targets.
//!
//! The generator is SplitMix64, written out here so a dependency upgrade can never change
//! what a seed means.

use serde::{Deserialize, Serialize};

/// A tiny deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6b69_6c6e_6368_616f)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Every kind of fault the chaos run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A panic in a node's inference actor (the fault point `panic_before_run`).
    InferencePanic,
    /// SIGKILL of one model worker process of a node.
    WorkerKill,
    /// SIGKILL of a node, restarted after `duration_ms`.
    NodeKill,
    /// `kiln.api.control` drain of a node; it finishes its jobs and exits, and is restarted.
    NodeDrain,
    /// The nats-server is stopped and started again after `duration_ms`.
    NatsRestart,
    /// The link between a node and NATS is cut for `duration_ms`, then restored.
    LinkCut,
    /// A job whose model hangs past its timeout on its first attempt.
    SlowModel,
    /// The compression command hangs (past its stage timeout) for `duration_ms`.
    CompressionHang,
    /// SIGSTOP of a node for `duration_ms`, then SIGCONT: it must neither judge its peers nor
    /// answer the requests it held, and its fenced attempts must touch nothing.
    NodeStop,
    /// A flood of submits without idempotency keys, and nats-server SIGTERMed in the middle of
    /// it (started again after `duration_ms`): no job record may be left without its queue
    /// message.
    NatsTermFlood,
    /// A node restarted, then SIGTERMed `duration_ms` into its start-up: it must exit 0.
    StartupTerm,
    /// On a NATS cluster: SIGKILL of one server, started again (same store) after
    /// `duration_ms`.
    NatsServerKill,
    /// On a NATS cluster: SIGKILL of the server leading the jobs queue (`KILN_JOBS`), started
    /// again after `duration_ms`: its streams elect new leaders.
    NatsLeaderKill,
    /// On a NATS cluster: every route of one server cut for `duration_ms` (its clients stay
    /// connected to it, in the minority), then restored.
    NatsPartition,
}

impl FaultKind {
    pub const ALL: [FaultKind; 11] = [
        FaultKind::InferencePanic,
        FaultKind::WorkerKill,
        FaultKind::NodeKill,
        FaultKind::NodeDrain,
        FaultKind::NatsRestart,
        FaultKind::LinkCut,
        FaultKind::SlowModel,
        FaultKind::CompressionHang,
        FaultKind::NodeStop,
        FaultKind::NatsTermFlood,
        FaultKind::StartupTerm,
    ];
    /// The kinds that need a NATS cluster.
    pub const CLUSTER_ONLY: [FaultKind; 3] = [FaultKind::NatsServerKill, FaultKind::NatsLeaderKill, FaultKind::NatsPartition];
    /// Every kind on a NATS cluster: the single server's kinds, then the cluster's own.
    pub const CLUSTER: [FaultKind; 14] = {
        let mut all = [FaultKind::NatsPartition; 14];
        let mut i = 0;
        while i < all.len() {
            all[i] = if i < Self::ALL.len() { Self::ALL[i] } else { Self::CLUSTER_ONLY[i - Self::ALL.len()] };
            i += 1;
        }
        all
    };
    /// Faults that take a node away for a while.
    pub fn takes_node_down(self) -> bool {
        matches!(self, FaultKind::NodeKill | FaultKind::NodeDrain | FaultKind::LinkCut | FaultKind::NodeStop | FaultKind::StartupTerm)
    }
    /// Faults that take a NATS server away (stopped, killed or cut off). On a cluster, one at
    /// a time: with two of three servers away nothing has a quorum, which is an outage, not a
    /// fault to ride out.
    pub fn takes_nats_server_down(self) -> bool {
        matches!(
            self,
            FaultKind::NatsRestart
                | FaultKind::NatsTermFlood
                | FaultKind::NatsServerKill
                | FaultKind::NatsLeaderKill
                | FaultKind::NatsPartition
        )
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Offset from the start of the storm.
    pub at_ms: u64,
    pub kind: FaultKind,
    /// Index of the node it hits (ignored by `slow_model` and `compression_hang`; on a NATS
    /// cluster, the server a NATS fault hits is this modulo the servers, and
    /// `nats_leader_kill` hits whichever server leads the queue then).
    pub node: usize,
    /// How long it lasts before it heals (restart, restore), where that applies.
    pub duration_ms: u64,
}

/// What one submission of the storm is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Submission {
    /// A job of the worker model.
    Job { steps: u32, hang_first_attempt: bool },
    /// A job of the pipeline model (model, then a compression command).
    Staged { steps: u32 },
    /// A batch of the worker model.
    Batch { items: u32, steps: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    pub at_ms: u64,
    pub index: u32,
    pub what: Submission,
    /// Cancel it this long after it was accepted.
    pub cancel_after_ms: Option<u64>,
}

/// The knobs of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub nodes: usize,
    pub slots_per_node: usize,
    pub jobs: u32,
    /// Submissions per second.
    pub rate: f64,
    pub faults: u32,
    /// Simulated model time per step (the demo worker's `step_ms`).
    pub step_ms: u64,
    pub batch_fraction: f64,
    pub staged_fraction: f64,
    pub cancel_fraction: f64,
    /// The nodes' `node.slot_prefetch`: jobs each slot claims ahead of the one it runs.
    #[serde(default)]
    pub slot_prefetch: usize,
    /// NATS servers: 1 (one server, single-replica streams) or a cluster (3: every stream
    /// replicated three ways, and the cluster's own fault kinds).
    #[serde(default = "one_server")]
    pub nats_servers: usize,
    /// Users the submissions come from (their `user_id` label: fair share's key), the first
    /// with half of them ([`user_of`]).
    #[serde(default = "one_user")]
    pub users: u32,
}

fn one_server() -> usize {
    1
}

fn one_user() -> u32 {
    1
}

/// The user of submission `index` among `users`: the first submits every other one (a heavy
/// user beside light ones), the others take turns with the rest.
pub fn user_of(index: u32, users: u32) -> String {
    let user = if users <= 1 || index % 2 == 0 { 0 } else { 1 + (index / 2) % (users - 1) };
    format!("user-{user}")
}

impl Profile {
    /// The CI profile: every fault kind at least once, about a minute in all.
    pub fn short() -> Profile {
        Profile {
            name: "short".into(),
            nodes: 3,
            slots_per_node: 2,
            jobs: 120,
            rate: 4.0,
            faults: 12,
            step_ms: 60,
            batch_fraction: 0.1,
            staged_fraction: 0.15,
            cancel_fraction: 0.08,
            slot_prefetch: 0,
            nats_servers: 1,
            users: 5,
        }
    }
    /// The long profile of docs/RELIABILITY.md.
    pub fn long() -> Profile {
        Profile { name: "long".into(), nodes: 4, jobs: 2000, rate: 8.0, faults: 200, step_ms: 40, ..Profile::short() }
    }
    /// The short profile on a three-server NATS cluster, twice as long: its five NATS faults
    /// each take a server away for seconds and go one at a time.
    pub fn cluster() -> Profile {
        Profile { name: "cluster".into(), jobs: 240, faults: 20, nats_servers: 3, ..Profile::short() }
    }
    /// The fault kinds a run draws from.
    pub fn fault_kinds(&self) -> &'static [FaultKind] {
        if self.nats_servers > 1 {
            &FaultKind::CLUSTER
        } else {
            &FaultKind::ALL
        }
    }
    pub fn storm_ms(&self) -> u64 {
        (self.jobs as f64 / self.rate * 1000.0) as u64
    }
}

/// Room left after a NATS server comes back before the next NATS fault: its restart and
/// catching up (about 2 s on loopback), with a margin.
pub const NATS_SETTLE_MS: u64 = 4_000;

/// The whole plan of a run: what is submitted when, and what fails when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub seed: u64,
    pub submissions: Vec<Planned>,
    pub faults: Vec<Fault>,
}

/// Draws the plan. Faults are spread over the storm (the first one after 10 % of it, the
/// last before 85 %); the first `profile.fault_kinds().len()` are one of each kind, so even a
/// short run injects every kind. A node fault only targets a node that the plan has up at that
/// moment, and never the last one up. On a NATS cluster, faults that take a server away do not
/// overlap (each with [`NATS_SETTLE_MS`] after it); one that finds no room becomes a worker
/// kill. One server's plans draw exactly as before the cluster kinds existed.
pub fn plan(seed: u64, profile: &Profile) -> Plan {
    let mut rng = Rng::new(seed);
    let storm = profile.storm_ms().max(1);
    let mut submissions = Vec::with_capacity(profile.jobs as usize);
    for index in 0..profile.jobs {
        let at_ms = (index as f64 * 1000.0 / profile.rate) as u64;
        let steps = 2 + rng.below(4) as u32;
        let roll = rng.below(1000) as f64 / 1000.0;
        let what = if roll < profile.batch_fraction {
            Submission::Batch { items: 2 + rng.below(3) as u32, steps }
        } else if roll < profile.batch_fraction + profile.staged_fraction {
            Submission::Staged { steps }
        } else {
            Submission::Job { steps, hang_first_attempt: false }
        };
        let cancel_after_ms = rng.chance(profile.cancel_fraction).then(|| rng.below(400));
        submissions.push(Planned { at_ms, index, what, cancel_after_ms });
    }

    let (start, end) = (storm / 10, storm * 85 / 100);
    let count = profile.faults as u64;
    let mut faults: Vec<Fault> = Vec::with_capacity(count as usize);
    // Each node's planned down intervals, to keep at least one node up.
    let mut down: Vec<Vec<(u64, u64)>> = vec![vec![]; profile.nodes];
    // When a NATS server is away (cluster only).
    let mut nats_down: Vec<(u64, u64)> = vec![];
    let kinds = profile.fault_kinds();
    for i in 0..count {
        let kind = if (i as usize) < kinds.len() { kinds[i as usize] } else { kinds[rng.below(kinds.len() as u64) as usize] };
        // Evenly spread with jitter, in drawing order (the kinds' order is shuffled by time).
        let slot = (end - start) / count.max(1);
        let at_ms = start + slot * ((i * 7919) % count) + rng.below(slot.max(1));
        let duration_ms = match kind {
            FaultKind::NodeKill => 2500 + rng.below(1500),
            FaultKind::NodeDrain => 1000 + rng.below(1000),
            FaultKind::LinkCut => 2000 + rng.below(1500),
            FaultKind::NatsRestart => 500 + rng.below(1000),
            FaultKind::CompressionHang => 1000 + rng.below(1000),
            FaultKind::NodeStop => 2000 + rng.below(2000),
            FaultKind::NatsTermFlood => 500 + rng.below(1000),
            // Into the start-up: a restarted node watches its old entry for one loss threshold.
            FaultKind::StartupTerm => 200 + rng.below(1800),
            FaultKind::NatsServerKill | FaultKind::NatsLeaderKill => 2000 + rng.below(2000),
            FaultKind::NatsPartition => 3000 + rng.below(3000),
            _ => 0,
        };
        let mut node = rng.below(profile.nodes as u64) as usize;
        let mut at_ms = at_ms;
        if kind.takes_node_down() {
            // Detection, drains finishing their jobs and restarts take a few seconds more. If
            // taking one more node down at `at_ms` would leave none up, try the later slots
            // (wrapping); if none has room, it becomes a worker kill.
            let span = (end - start).max(1);
            let place = (0..count).map(|k| start + (at_ms - start + k * slot.max(1)) % span).find_map(|t| {
                let busy = (t, t + duration_ms + 3_000);
                let up: Vec<usize> = (0..profile.nodes).filter(|&n| !down[n].iter().any(|&(a, b)| a < busy.1 && busy.0 < b)).collect();
                (up.len() >= 2).then_some((t, busy, up))
            });
            let Some((t, busy, up)) = place else {
                faults.push(Fault { at_ms, kind: FaultKind::WorkerKill, node, duration_ms: 0 });
                continue;
            };
            at_ms = t;
            node = up[rng.below(up.len() as u64) as usize];
            down[node].push(busy);
        }
        if profile.nats_servers > 1 && kind.takes_nats_server_down() {
            // The same search on the cluster's one "server away" lane.
            let span = (end - start).max(1);
            let place = (0..count)
                .map(|k| start + (at_ms - start + k * slot.max(1)) % span)
                .map(|t| (t, (t, t + duration_ms + NATS_SETTLE_MS)))
                .find(|(_, busy)| !nats_down.iter().any(|&(a, b)| a < busy.1 && busy.0 < b));
            let Some((t, busy)) = place else {
                faults.push(Fault { at_ms, kind: FaultKind::WorkerKill, node, duration_ms: 0 });
                continue;
            };
            at_ms = t;
            nats_down.push(busy);
        }
        faults.push(Fault { at_ms, kind, node, duration_ms });
    }
    faults.sort_by_key(|f| f.at_ms);
    Plan { seed, submissions, faults }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_user_submits_half_and_the_others_share_the_rest() {
        let users: Vec<String> = (0..40).map(|i| user_of(i, 5)).collect();
        let count = |u: &str| users.iter().filter(|v| *v == u).count();
        assert_eq!(count("user-0"), 20);
        for u in ["user-1", "user-2", "user-3", "user-4"] {
            assert_eq!(count(u), 5, "{u}");
        }
        assert!((0..10).all(|i| user_of(i, 1) == "user-0"));
    }

    #[test]
    fn the_same_seed_gives_the_same_plan_and_another_seed_another() {
        let p = Profile::short();
        assert_eq!(plan(7, &p), plan(7, &p));
        assert_ne!(plan(7, &p).faults, plan(8, &p).faults);
    }

    #[test]
    fn a_short_run_injects_every_kind_and_never_takes_every_node_down() {
        for seed in 0..50 {
            let p = Profile::short();
            let plan = plan(seed, &p);
            assert_eq!(plan.faults.len(), p.faults as usize);
            assert_eq!(plan.submissions.len(), p.jobs as usize);
            for kind in FaultKind::ALL {
                assert!(plan.faults.iter().any(|f| f.kind == kind), "seed {seed}: no {kind:?}");
            }
            assert!(plan.faults.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
            let down: Vec<(u64, u64, usize)> = plan
                .faults
                .iter()
                .filter(|f| f.kind.takes_node_down())
                .map(|f| (f.at_ms, f.at_ms + f.duration_ms + 3_000, f.node))
                .collect();
            for &(t, _, _) in &down {
                let mut nodes: Vec<usize> = down.iter().filter(|&&(a, b, _)| a <= t && t < b).map(|&(_, _, n)| n).collect();
                nodes.sort_unstable();
                nodes.dedup();
                assert!(nodes.len() < p.nodes, "seed {seed}: every node down at {t} ms");
            }
            assert!(plan.faults.iter().all(|f| f.at_ms < p.storm_ms()));
            assert!(plan.faults.iter().all(|f| FaultKind::ALL.contains(&f.kind)), "seed {seed}: a cluster kind on one server");
        }
    }

    #[test]
    fn a_cluster_run_injects_every_kind_and_takes_one_nats_server_away_at_a_time() {
        for seed in 0..50 {
            let p = Profile::cluster();
            let plan = plan(seed, &p);
            for kind in FaultKind::CLUSTER {
                assert!(plan.faults.iter().any(|f| f.kind == kind), "seed {seed}: no {kind:?}");
            }
            let mut away: Vec<(u64, u64)> = plan
                .faults
                .iter()
                .filter(|f| f.kind.takes_nats_server_down())
                .map(|f| (f.at_ms, f.at_ms + f.duration_ms + NATS_SETTLE_MS))
                .collect();
            away.sort_unstable();
            assert!(away.windows(2).all(|w| w[0].1 <= w[1].0), "seed {seed}: two NATS servers away at once: {away:?}");
        }
    }
}
