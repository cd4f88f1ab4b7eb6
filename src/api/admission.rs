//! Admission: whether the node takes on a request, and whether a model takes on more jobs.
//! Both refusals are `overloaded` (retryable), so a client backs off instead of the node
//! queueing without bound:
//!
//! - per request, in the service loop: at most [`MAX_IN_FLIGHT`] requests and
//!   [`MAX_IN_FLIGHT_BYTES`] of request bodies being served at once ([`InFlight`]);
//! - per model, at submit: at most `limits.max_queued_per_model` jobs waiting ([`admit_jobs`],
//!   the rule; [`QueueDepths`], the cached depths it is applied to).
//!
//! A request over `max_request_bytes` is refused `payload_too_large` before it takes a slot
//! (`validation::check_request_size`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use kiln_core::protocol::{ApiError, ErrorCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests handled concurrently by one node; beyond it, `overloaded` at once instead of
/// queueing without bound.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Request bytes held by the requests in flight on one node; beyond it, `overloaded` too. With
/// [`MAX_IN_FLIGHT`] this bounds the memory that requests being served hold (1024 requests of
/// the largest size would be 256 MiB).
pub const MAX_IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;
/// How stale the queue depth used by admission control may be.
pub const QUEUE_DEPTH_TTL: Duration = Duration::from_millis(250);

/// The rule of admission control: a model with `waiting` jobs takes `adding` more only if that
/// keeps it at or under `limit`. Returns the depth with them counted, or `overloaded`.
pub fn admit_jobs(model: &str, waiting: u64, adding: u64, limit: u64) -> Result<u64, ApiError> {
    match waiting.checked_add(adding) {
        Some(after) if after <= limit => Ok(after),
        _ => Err(ApiError::new(ErrorCode::Overloaded, format!("model {model:?} would have more than {limit} jobs waiting; retry later"))),
    }
}

/// Each model's queue depth as last measured, with the jobs this node admitted since: admission
/// control without a JetStream request per submit.
#[derive(Debug, Default)]
pub struct QueueDepths {
    /// model -> (waiting jobs, when measured).
    depths: DashMap<String, (u64, Instant)>,
}

impl QueueDepths {
    /// Whether the caller should re-measure `model`'s depth now: its figure is older than
    /// [`QUEUE_DEPTH_TTL`] (or there is none). One caller claims it (the entry's time is set at
    /// once); the others go on with the cached figure, so a burst of submits makes one
    /// JetStream call, not one each.
    pub fn claim_measurement(&self, model: &str, now: Instant) -> bool {
        match self.depths.get_mut(model) {
            Some(mut e) if now.saturating_duration_since(e.1) >= QUEUE_DEPTH_TTL => {
                e.1 = now;
                true
            }
            Some(_) => false,
            None => {
                self.depths.insert(model.to_string(), (0, now));
                true
            }
        }
    }

    /// A new measurement of `model`'s depth.
    pub fn measured(&self, model: &str, depth: u64, now: Instant) {
        self.depths.insert(model.to_string(), (depth, now));
    }

    /// [`admit_jobs`] against the cached depth; the jobs admitted are added to it at once, so a
    /// burst within one measurement cannot overshoot the limit on this node.
    pub fn admit(&self, model: &str, adding: u64, limit: u64, now: Instant) -> Result<(), ApiError> {
        let mut entry = self.depths.entry(model.to_string()).or_insert((0, now));
        entry.0 = admit_jobs(model, entry.0, adding, limit)?;
        Ok(())
    }

    /// The cached depth of `model` (for tests and logs).
    pub fn depth(&self, model: &str) -> Option<u64> {
        self.depths.get(model).map(|e| e.0)
    }
}

/// The requests and request bytes a node serves at once.
#[derive(Debug, Clone)]
pub struct InFlight {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// A request's place among those in flight: released when dropped (its reply sent).
#[derive(Debug)]
pub struct InFlightPermit {
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl InFlight {
    pub fn new(max_requests: usize, max_bytes: usize) -> Self {
        InFlight { requests: Arc::new(Semaphore::new(max_requests)), bytes: Arc::new(Semaphore::new(max_bytes)) }
    }

    /// A place for a request of `size` bytes, or `overloaded` at once (never a wait: the
    /// service loop must keep draining its subscriptions).
    pub fn try_admit(&self, size: usize) -> Result<InFlightPermit, ApiError> {
        let request = self.requests.clone().try_acquire_owned();
        let bytes = self.bytes.clone().try_acquire_many_owned(size.max(1) as u32);
        match (request, bytes) {
            (Ok(request), Ok(bytes)) => Ok(InFlightPermit { _request: request, _bytes: bytes }),
            _ => Err(ApiError::new(ErrorCode::Overloaded, "too many requests in flight on this node; retry later")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Admitted exactly when the jobs fit under the limit, the new depth counting them;
        /// refused `overloaded` otherwise, never an overflow.
        #[test]
        fn admission_is_the_limit_and_nothing_else(
            waiting in prop_oneof![any::<u64>(), 0u64..1000],
            adding in prop_oneof![any::<u64>(), 0u64..1000],
            // Mostly a limit right around the depth the jobs would make: the boundary.
            slack in prop_oneof![1 => any::<u64>().prop_map(|l| (l, false)), 3 => (0u64..3).prop_map(|d| (d, true))],
            above in any::<bool>(),
        ) {
            let limit = match slack {
                (limit, false) => limit,
                (d, true) if above => waiting.saturating_add(adding).saturating_add(d),
                (d, true) => waiting.saturating_add(adding).saturating_sub(d),
            };
            let fits = (waiting as u128) + (adding as u128) <= limit as u128;
            match admit_jobs("m", waiting, adding, limit) {
                Ok(after) => {
                    prop_assert!(fits);
                    prop_assert_eq!(after, waiting + adding);
                }
                Err(e) => {
                    prop_assert!(!fits);
                    prop_assert_eq!(e.code, ErrorCode::Overloaded);
                    prop_assert!(e.message.contains("\"m\""), "{}", e.message);
                }
            }
        }

        /// However a burst inside one measurement is split into submits, the jobs admitted
        /// never take the cached depth past the limit, and every refusal is one that would
        /// have.
        #[test]
        fn a_burst_never_overshoots_the_limit(measured in 0u64..200, limit in 0u64..200, burst in prop::collection::vec(0u64..50, 0..40)) {
            let depths = QueueDepths::default();
            let now = Instant::now();
            depths.measured("m", measured, now);
            let mut admitted = 0;
            for adding in burst {
                match depths.admit("m", adding, limit, now) {
                    Ok(()) => admitted += adding,
                    Err(_) => prop_assert!(measured + admitted + adding > limit),
                }
            }
            prop_assert_eq!(depths.depth("m"), Some(measured + admitted));
            prop_assert!(admitted == 0 || measured + admitted <= limit);
        }
    }

    #[test]
    fn the_limit_itself_is_admitted() {
        assert_eq!(admit_jobs("m", 5, 5, 10), Ok(10));
        assert_eq!(admit_jobs("m", 10, 0, 10), Ok(10), "adding nothing to a full queue");
        assert_eq!(admit_jobs("m", 5, 6, 10).expect_err("one over").code, ErrorCode::Overloaded);
        assert_eq!(admit_jobs("m", 11, 0, 10).expect_err("already over").code, ErrorCode::Overloaded);
        assert!(admit_jobs("m", u64::MAX, 1, u64::MAX).is_err(), "no overflow");
        let e = admit_jobs("sdxl", 0, 2, 1).expect_err("over");
        assert_eq!(e.message, "model \"sdxl\" would have more than 1 jobs waiting; retry later");
    }

    #[test]
    fn one_caller_claims_a_stale_measurement() {
        let depths = QueueDepths::default();
        let t0 = Instant::now();
        assert!(depths.claim_measurement("m", t0), "no figure yet: measure");
        assert!(!depths.claim_measurement("m", t0), "claimed: the others use the cached figure");
        assert!(!depths.claim_measurement("m", t0 + QUEUE_DEPTH_TTL / 2), "still fresh");
        assert!(depths.claim_measurement("m", t0 + QUEUE_DEPTH_TTL), "stale: measure again");
        assert!(!depths.claim_measurement("m", t0 + QUEUE_DEPTH_TTL), "once");
        assert!(depths.claim_measurement("other", t0), "per model");
        // A claim alone does not change the figure: admission goes on with the old one.
        depths.measured("m", 7, t0);
        assert!(depths.claim_measurement("m", t0 + QUEUE_DEPTH_TTL * 2));
        assert_eq!(depths.depth("m"), Some(7));
    }

    #[test]
    fn in_flight_refuses_past_either_bound_and_frees_on_drop() {
        let in_flight = InFlight::new(2, 100);
        let a = in_flight.try_admit(10).expect("room");
        let b = in_flight.try_admit(0).expect("an empty request takes one byte");
        let refused = in_flight.try_admit(1).expect_err("two requests in flight");
        assert_eq!(refused.code, ErrorCode::Overloaded);
        drop(a);
        let c = in_flight.try_admit(89).expect("room again, 89 + 1 bytes");
        assert_eq!(in_flight.try_admit(1).expect_err("no request left").code, ErrorCode::Overloaded);
        drop(b);
        assert_eq!(in_flight.try_admit(12).expect_err("bytes: 89 held of 100").code, ErrorCode::Overloaded);
        let d = in_flight.try_admit(10).expect("10 bytes fit");
        drop((c, d));
        // A refusal holds nothing: both bounds are whole again.
        let all = in_flight.try_admit(100).expect("all bytes");
        assert!(in_flight.try_admit(1).is_err());
        drop(all);
        assert!(in_flight.try_admit(100).is_ok());
    }
}
