//! Why a job waits, where it stands and when it may start ([`Pending`] in its status), decided
//! by pure functions from what the API node reads when asked (`kiln.api.status`): the record,
//! the registry's slots for its model, its lane's queues (each fair-share key's depth) and the
//! model's recent run time.

use crate::job::{JobRecord, JobState};
use crate::protocol::{GpuEntry, GpuState, Pending, PendingReason};

/// What the API read about a waiting job and its model.
#[derive(Debug, Clone, Default)]
pub struct WaitFacts<'a> {
    /// The registry's live slots (any model); those serving the job's model are picked here.
    pub gpus: &'a [GpuEntry],
    /// Whether the node that owns the record (a running one) is alive in the registry.
    pub owner_alive: bool,
    /// Jobs before it in its own queue ([`Pending::position`]), if known.
    pub position: Option<u64>,
    /// The other queues of its model, each `(queued, weight, higher lane)`: the other keys of
    /// its lane, and every queue of the high lane for a job of the normal lane.
    pub others: Vec<OtherQueue>,
    /// Its own key's weight.
    pub weight: u32,
    /// Its key's queue runs as many jobs as its consumer allows (`[quota] max_running`).
    pub at_running_quota: bool,
    /// The model's recent mean run time, ms.
    pub mean_service_ms: Option<f64>,
}

/// Another queue of the job's model, as [`estimate_ahead`] counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OtherQueue {
    pub queued: u64,
    pub weight: u32,
    /// A queue of the high lane, for a job of the normal lane: all of it goes first.
    pub higher_lane: bool,
}

/// Whether a job in this state gets a [`Pending`]: queued, waiting to retry, or running on a
/// node that is gone.
pub fn waits(record: &JobRecord, owner_alive: bool) -> bool {
    match record.state {
        JobState::Queued | JobState::Retrying => true,
        JobState::Running => !owner_alive,
        _ => false,
    }
}

/// Jobs of the model that start before one with `position` jobs before it in its own queue,
/// by start-time fair queueing between the queues (`crate::fair`): all of a higher lane's,
/// and of each other key of its lane as many as it is given while this key works through
/// `position + 1` jobs at its weight, at most what it has queued.
pub fn estimate_ahead(position: u64, weight: u32, others: &[OtherQueue]) -> u64 {
    let turns = (position + 1) as f64 / f64::from(weight.max(1));
    position
        + others
            .iter()
            .map(|o| if o.higher_lane { o.queued } else { o.queued.min((turns * f64::from(o.weight.max(1))).ceil() as u64) })
            .sum::<u64>()
}

/// The estimated wait before a start: `ahead` jobs shared by `slots` slots at `mean_ms` each
/// (the slots' current jobs are taken as half done).
pub fn estimate_eta_ms(ahead: u64, slots: u32, mean_ms: Option<f64>) -> Option<u64> {
    let mean = mean_ms.filter(|m| m.is_finite() && *m >= 0.0)?;
    if slots == 0 {
        return None;
    }
    Some(((ahead as f64 / f64::from(slots) + 0.5) * mean).round() as u64)
}

/// Why `record` waits, from `facts`: the first that holds of node lost, retry backoff, no
/// slot, its quota, its model loading, its fair share, all slots busy; else a slot is free and
/// it is starting.
pub fn pending(record: &JobRecord, facts: &WaitFacts) -> Pending {
    let serving: Vec<&GpuEntry> =
        facts.gpus.iter().filter(|g| g.state != GpuState::Dead && g.models.iter().any(|m| m == &record.model)).collect();
    let busy = serving.iter().filter(|g| matches!(g.state, GpuState::Busy | GpuState::Draining | GpuState::Restarting)).count();
    let loading = serving.iter().filter(|g| g.state == GpuState::Loading).count();
    let idle = serving.len() - busy - loading;
    let others_waiting: u64 = facts.others.iter().filter(|o| !o.higher_lane).map(|o| o.queued).sum();
    let ahead = facts.position.map(|p| estimate_ahead(p, facts.weight, &facts.others));
    let eta_ms = ahead.and_then(|a| estimate_eta_ms(a, serving.len() as u32, facts.mean_service_ms));
    let (reason, message) = if record.state == JobState::Running && !facts.owner_alive {
        let node = record.owner.as_ref().map(|o| o.node.as_str()).unwrap_or("?");
        (PendingReason::NodeLost, format!("its node {node} was lost; the job is handed back to the queue and runs again"))
    } else if record.state == JobState::Retrying {
        (PendingReason::RetryBackoff, format!("attempt {} failed; it waits out the retry backoff", record.attempt))
    } else if serving.is_empty() {
        (PendingReason::NoSlot, format!("no live slot serves model {:?}", record.model))
    } else if facts.at_running_quota {
        (PendingReason::Quota, "its key runs as many jobs as its quota allows (max_running)".to_string())
    } else if loading > 0 && idle == 0 {
        (PendingReason::ModelLoading, format!("{loading} of the {} slots serving it are loading the model", serving.len()))
    } else if idle == 0 && others_waiting > 0 {
        (
            PendingReason::FairShare,
            format!("all {} slots are busy and {others_waiting} jobs of other keys share them fairly", serving.len()),
        )
    } else if idle == 0 {
        (PendingReason::SlotsBusy, format!("all {} slots serving model {:?} are busy", serving.len(), record.model))
    } else {
        (PendingReason::Starting, format!("{idle} slots are free; a node takes it next"))
    };
    Pending { reason, message, position: facts.position, ahead, eta_ms }
}

/// A job of a model of several GPUs (`gpus`) that no slot serves says why that may be: only
/// a node with that many slots serving it takes its jobs (`ClusterConfig::models_for_slot`).
pub fn for_model_of_gpus(mut pending: Pending, gpus: usize) -> Pending {
    if pending.reason == PendingReason::NoSlot && gpus > 1 {
        pending.message =
            format!("{}: each job of it needs {gpus} slots of one node, and a node with fewer does not serve it", pending.message);
    }
    pending
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Owner;
    use proptest::prelude::*;

    fn gpu(state: GpuState, model: &str) -> GpuEntry {
        GpuEntry {
            node: "n".into(),
            slot: "cuda:0".into(),
            state,
            models: vec![model.into()],
            warm_models: vec![],
            current_job: None,
            restarts: 0,
            last_error: None,
            heartbeat_ms: 0,
            group: vec![],
            memory_budget_bytes: 0,
            resident: vec![],
        }
    }

    fn reason(record: &JobRecord, facts: WaitFacts) -> PendingReason {
        pending(record, &facts).reason
    }

    #[test]
    fn each_reason_in_its_situation() {
        let queued = JobRecord::queued("j", "m", 3, 0);
        let busy = [gpu(GpuState::Busy, "m"), gpu(GpuState::Busy, "m")];
        let base = || WaitFacts { owner_alive: true, weight: 1, ..Default::default() };
        assert_eq!(reason(&queued, WaitFacts { gpus: &[gpu(GpuState::Idle, "other")], ..base() }), PendingReason::NoSlot);
        assert_eq!(reason(&queued, WaitFacts { gpus: &[gpu(GpuState::Dead, "m")], ..base() }), PendingReason::NoSlot);
        assert_eq!(reason(&queued, WaitFacts { gpus: &busy, ..base() }), PendingReason::SlotsBusy);
        let other = OtherQueue { queued: 5, weight: 1, higher_lane: false };
        assert_eq!(reason(&queued, WaitFacts { gpus: &busy, others: vec![other], ..base() }), PendingReason::FairShare);
        let high = OtherQueue { queued: 5, weight: 1, higher_lane: true };
        assert_eq!(reason(&queued, WaitFacts { gpus: &busy, others: vec![high], ..base() }), PendingReason::SlotsBusy);
        assert_eq!(reason(&queued, WaitFacts { gpus: &busy, at_running_quota: true, ..base() }), PendingReason::Quota);
        let loading = [gpu(GpuState::Loading, "m"), gpu(GpuState::Busy, "m")];
        assert_eq!(reason(&queued, WaitFacts { gpus: &loading, ..base() }), PendingReason::ModelLoading);
        let free = [gpu(GpuState::Loading, "m"), gpu(GpuState::Idle, "m")];
        assert_eq!(reason(&queued, WaitFacts { gpus: &free, ..base() }), PendingReason::Starting);
        let retrying = JobRecord { state: JobState::Retrying, attempt: 1, ..queued.clone() };
        assert_eq!(reason(&retrying, WaitFacts { gpus: &busy, ..base() }), PendingReason::RetryBackoff);
        // A model of 2 GPUs with no slot serving it says why that may be; other reasons stay.
        let no_slot = for_model_of_gpus(pending(&queued, &WaitFacts { gpus: &[], ..base() }), 2);
        assert!(no_slot.message.contains("needs 2 slots of one node"), "{}", no_slot.message);
        let busy_big = for_model_of_gpus(pending(&queued, &WaitFacts { gpus: &busy, ..base() }), 2);
        assert!(!busy_big.message.contains("slots of one node"), "{}", busy_big.message);
        let owner = Owner { node: "gone".into(), slot: "cuda:0".into() };
        let orphan = JobRecord { state: JobState::Running, owner: Some(owner), attempt: 1, ..queued.clone() };
        let lost = pending(&orphan, &WaitFacts { gpus: &busy, owner_alive: false, ..base() });
        assert_eq!(lost.reason, PendingReason::NodeLost);
        assert!(lost.message.contains("gone"), "{}", lost.message);
        assert!(waits(&orphan, false) && !waits(&orphan, true) && waits(&queued, true));
    }

    #[test]
    fn ahead_counts_a_higher_lane_whole_and_other_keys_by_their_share() {
        let others = [
            OtherQueue { queued: 7, weight: 1, higher_lane: true },
            OtherQueue { queued: 100, weight: 1, higher_lane: false },
            OtherQueue { queued: 100, weight: 3, higher_lane: false },
            OtherQueue { queued: 1, weight: 1, higher_lane: false },
        ];
        // 4 before it in its own queue (weight 1): its 5th job starts after 7 + 5 + 15 + 1.
        assert_eq!(estimate_ahead(4, 1, &others), 4 + 7 + 5 + 15 + 1);
        assert_eq!(estimate_eta_ms(10, 2, Some(100.0)), Some(550));
        assert_eq!(estimate_eta_ms(10, 0, Some(100.0)), None);
        assert_eq!(estimate_eta_ms(10, 2, None), None);
    }

    proptest! {
        /// More jobs before it never means fewer ahead, and a heavier weight never more.
        #[test]
        fn ahead_grows_with_position_and_shrinks_with_weight(position in 0u64..1000, weight in 1u32..8, queued in proptest::collection::vec((0u64..500, 1u32..8, any::<bool>()), 0..6)) {
            let others: Vec<OtherQueue> = queued.iter().map(|&(queued, weight, higher_lane)| OtherQueue { queued, weight, higher_lane }).collect();
            let ahead = estimate_ahead(position, weight, &others);
            prop_assert!(ahead >= position);
            prop_assert!(estimate_ahead(position + 1, weight, &others) >= ahead);
            prop_assert!(estimate_ahead(position, weight + 1, &others) <= ahead);
            prop_assert!(ahead <= position + others.iter().map(|o| o.queued).sum::<u64>());
        }
    }
}
