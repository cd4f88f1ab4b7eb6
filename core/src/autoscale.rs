//! What an autoscaler reads of a model's queue, decided by pure functions: how many slots would
//! start every queued job within a target wait ([`desired_slots`]), the mean run time it is
//! computed from ([`mean_service_ms`]), and one model's [`ModelQueue`] put together from what
//! the queue's consumers, the registry and the results feed say ([`model_queue`]). The figures
//! are read in `nats::queue`; the node exports them as gauges (`kiln::queue_gauges`).

use crate::protocol::{GpuEntry, GpuState, JobView, KeyQueue, LaneQueue, ModelQueue};
use kiln_contract::names::Lane;

/// One lane of one model, as its consumers and the stream say now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneFigures {
    /// Messages not yet delivered (`num_pending`).
    pub queued: u64,
    /// Delivered and not acked (`num_ack_pending`).
    pub delivered: u64,
    /// Unix ms at which the oldest undelivered message was stored, if any waits.
    pub oldest_enqueued_ms: Option<u64>,
    /// By fair-share key: those with jobs queued or running.
    pub keys: Vec<KeyQueue>,
}

/// The slots that would start every one of `queued` jobs within `target_wait_s`, plus the
/// `running` ones (which hold a slot each until they end).
///
/// A slot runs jobs back to back, so within the target it starts `target / service` of them:
/// the queued jobs need `ceil(queued × service / target)` slots, at least one, and never more
/// than one each. When the service time is not known (nothing finished yet) or not a number,
/// each queued job counts as needing a slot of its own: an autoscaler would rather overshoot
/// at first than let the first jobs of a new model wait. Idle and empty: 0.
pub fn desired_slots(queued: u64, running: u64, mean_service_s: Option<f64>, target_wait_s: f64) -> u64 {
    if queued == 0 {
        return running;
    }
    let per_queued = match mean_service_s {
        Some(s) if s.is_finite() && s >= 0.0 && target_wait_s.is_finite() && target_wait_s > 0.0 => s / target_wait_s,
        _ => 1.0,
    };
    // `as` saturates (and maps NaN to 0, which the max below lifts): no overflow, no NaN.
    let needed = ((queued as f64) * per_queued).ceil() as u64;
    running.saturating_add(needed.clamp(1, queued))
}

/// The mean run time, in ms, of finished jobs (start of the attempt that ended to its end),
/// and how many it is over: those that started (a job cancelled while queued never ran).
pub fn mean_service_ms(finished: &[JobView]) -> (Option<f64>, u32) {
    let runs: Vec<u64> = finished.iter().filter_map(|j| Some(j.finished_ms?.saturating_sub(j.started_ms?))).collect();
    if runs.is_empty() {
        return (None, 0);
    }
    let total: f64 = runs.iter().map(|r| *r as f64).sum();
    (Some(total / runs.len() as f64), runs.len() as u32)
}

/// One model's queue from its lanes' figures, the registry's live slots, its recent finished
/// jobs' run times and the clock (`now_ms`). `gpus`: the slots each job of the model holds at
/// once (its `gpus`), so `desired_slots` counts slots, as `slots` does: a job of a two-GPU
/// model needs two.
pub fn model_queue(
    model: &str,
    gpus_per_job: usize,
    lanes: &[(Lane, LaneFigures)],
    gpus: &[GpuEntry],
    service: (Option<f64>, u32),
    now_ms: u64,
    target_wait_s: u64,
) -> ModelQueue {
    let queued = lanes.iter().map(|(_, l)| l.queued).sum();
    let running = lanes.iter().map(|(_, l)| l.delivered).sum();
    let oldest = lanes.iter().filter_map(|(_, l)| l.oldest_enqueued_ms).min();
    let serving: Vec<&GpuEntry> = gpus.iter().filter(|g| g.state != GpuState::Dead && g.models.iter().any(|m| m == model)).collect();
    let (mean_ms, samples) = service;
    ModelQueue {
        model: model.to_string(),
        queued,
        lanes: lanes
            .iter()
            .map(|(lane, l)| LaneQueue { lane: lane.as_str().to_string(), queued: l.queued, running: l.delivered, keys: l.keys.clone() })
            .collect(),
        oldest_wait_ms: oldest.map(|t| now_ms.saturating_sub(t)),
        running,
        slots: serving.len() as u32,
        busy_slots: serving.iter().filter(|g| g.state == GpuState::Busy).count() as u32,
        mean_service_ms: mean_ms.map(|m| m.round() as u64),
        service_samples: samples,
        desired_slots: desired_slots(queued, running, mean_ms.map(|m| m / 1000.0), target_wait_s as f64)
            .saturating_mul(gpus_per_job.max(1) as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn service() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            Just(None),
            (0.0f64..10_000.0).prop_map(Some),
            Just(Some(f64::NAN)),
            Just(Some(f64::INFINITY)),
            Just(Some(-1.0)),
            Just(Some(0.0)),
        ]
    }

    fn target() -> impl Strategy<Value = f64> {
        prop_oneof![0.001f64..10_000.0, Just(0.0), Just(f64::NAN), Just(-5.0), Just(f64::INFINITY)]
    }

    proptest! {
        /// Never below the running jobs, at least one more while any waits, never more than a
        /// slot per job; 0 when idle and empty; no overflow whatever the figures.
        #[test]
        fn desired_is_bounded_by_the_work(queued in prop_oneof![0u64..1000, any::<u64>()], running in prop_oneof![0u64..1000, any::<u64>()], s in service(), t in target()) {
            let d = desired_slots(queued, running, s, t);
            prop_assert!(d >= running);
            if queued > 0 {
                prop_assert!(d >= running.saturating_add(1));
            }
            prop_assert!(d <= running.saturating_add(queued));
            if queued == 0 && running == 0 {
                prop_assert_eq!(d, 0);
            }
        }

        /// More jobs waiting, longer jobs or a shorter target never ask for fewer slots.
        #[test]
        fn desired_grows_with_depth_and_service_time(
            queued in 0u64..100_000, more in 0u64..100_000, running in 0u64..1000,
            s in 0.0f64..1000.0, longer in 0.0f64..1000.0, t in 0.001f64..1000.0, shorter in 0.0f64..1.0,
        ) {
            let d = desired_slots(queued, running, Some(s), t);
            prop_assert!(desired_slots(queued + more, running, Some(s), t) >= d);
            prop_assert!(desired_slots(queued, running, Some(s + longer), t) >= d);
            prop_assert!(desired_slots(queued, running, Some(s), t * (1.0 - shorter).max(0.001)) >= d);
            prop_assert!(desired_slots(queued, running, None, t) >= d, "unknown service time counts as the longest");
        }
    }

    #[test]
    fn desired_slots_drain_the_queue_within_the_target() {
        // 100 jobs of 2 s within 60 s: each slot starts 30, so 4 slots; plus the 3 running.
        assert_eq!(desired_slots(100, 3, Some(2.0), 60.0), 7);
        assert_eq!(desired_slots(90, 0, Some(2.0), 60.0), 3);
        // Jobs longer than the target: a slot each.
        assert_eq!(desired_slots(5, 1, Some(120.0), 60.0), 6);
        // Nothing finished yet: a slot each.
        assert_eq!(desired_slots(5, 1, None, 60.0), 6);
        // Instant jobs still need a slot.
        assert_eq!(desired_slots(1000, 0, Some(0.0), 60.0), 1);
        assert_eq!(desired_slots(0, 4, Some(2.0), 60.0), 4);
        assert_eq!(desired_slots(0, 0, None, 60.0), 0);
    }

    fn view(started: Option<u64>, finished: Option<u64>) -> JobView {
        let mut v: JobView = serde_json::from_value(serde_json::json!({
            "job_id": "j", "model": "m", "status": "completed", "attempt": 1, "max_attempts": 3,
            "priority": 0, "created_ms": 0,
        }))
        .expect("a minimal view");
        v.started_ms = started;
        v.finished_ms = finished;
        v
    }

    #[test]
    fn the_mean_is_over_the_jobs_that_ran() {
        assert_eq!(mean_service_ms(&[]), (None, 0));
        let views = [view(Some(1000), Some(3000)), view(Some(0), Some(1000)), view(None, Some(5000))];
        assert_eq!(mean_service_ms(&views), (Some(1500.0), 2));
    }

    fn gpu(node: &str, state: GpuState, models: &[&str]) -> GpuEntry {
        GpuEntry {
            node: node.into(),
            slot: "cpu:0".into(),
            state,
            models: models.iter().map(|m| m.to_string()).collect(),
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

    #[test]
    fn a_model_queue_adds_its_lanes_and_counts_the_live_slots_serving_it() {
        let lanes = [
            (Lane::High, LaneFigures { queued: 2, delivered: 0, oldest_enqueued_ms: Some(9_000), keys: vec![] }),
            (Lane::Normal, LaneFigures { queued: 4, delivered: 1, oldest_enqueued_ms: Some(7_000), keys: vec![] }),
        ];
        let gpus = [
            gpu("a", GpuState::Busy, &["m"]),
            gpu("b", GpuState::Idle, &["m", "other"]),
            gpu("c", GpuState::Dead, &["m"]),
            gpu("d", GpuState::Busy, &["other"]),
        ];
        let q = model_queue("m", 1, &lanes, &gpus, (Some(2000.0), 3), 10_000, 1);
        assert_eq!((q.queued, q.running, q.slots, q.busy_slots), (6, 1, 2, 1));
        assert_eq!(q.oldest_wait_ms, Some(3_000), "the older of the lanes' oldest");
        assert_eq!((q.mean_service_ms, q.service_samples), (Some(2000), 3));
        assert_eq!(q.desired_slots, 7, "2 s jobs, 1 s target: a slot per queued job, plus the running one");
        assert_eq!(q.lanes.iter().map(|l| (l.lane.as_str(), l.queued, l.running)).collect::<Vec<_>>(), [("high", 2, 0), ("normal", 4, 1)]);
        let idle = model_queue("m", 1, &[(Lane::High, LaneFigures::default())], &gpus, (None, 0), 10_000, 60);
        assert_eq!((idle.queued, idle.oldest_wait_ms, idle.desired_slots), (0, None, 0));
        let two_gpus = model_queue("m", 2, &lanes, &gpus, (Some(2000.0), 3), 10_000, 1);
        assert_eq!(two_gpus.desired_slots, 14, "each job of a two-GPU model holds two slots");
        assert_eq!((two_gpus.slots, two_gpus.running), (2, 1), "slots and running jobs are counted as before");
    }
}
