//! Quotas per fair-share key and model (`[quota]`, `kiln_core::fair::quota_of`), checked at
//! submit; over one, `quota_exceeded` with `retry_after_ms`:
//!
//! - `submits_per_s` + `burst`: a [`TokenBucket`] per key and model in this API node, with the
//!   node's share of the rate (the rate and the burst divided by the live nodes: the API is a
//!   queue group spread over them, so the cluster's rate is approximate). No NATS request: a
//!   refusal is answered at once, `retry_after_ms` exact for this node's bucket. A submit
//!   request takes one token per key it carries (a batch takes one per key, not per item).
//! - `max_queued`: the key's jobs waiting in the model's two lanes (one consumer-info request
//!   per lane, `Resources::key_queue`) plus those this node is admitting now plus the new ones
//!   must stay within the limit ([`admit_queued`]). `retry_after_ms` is an estimate of when
//!   the key's next job starts ([`queued_retry_after_ms`]) from the model's recent mean run
//!   time, which this node re-reads at most every [`SERVICE_TTL`], off the refusal's path.
//! - `max_running` is not checked here: JetStream enforces it (the key's consumers'
//!   `max_ack_pending`, `Resources::queue_consumer`).
//!
//! A job without the key's label is not limited.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use kiln_core::config::KeyQuota;
use kiln_core::protocol::ApiError;

/// What `retry_after_ms` says over `max_queued` while the model's recent run time is unknown
/// (no job of it finished lately, or not read yet): a figure a client can retry on without
/// flooding the API (docs/PROTOCOL.md, "Quotas").
pub const QUEUED_RETRY_AFTER_MS: u64 = 1000;
/// The bounds of the `max_queued` estimate: not a retry storm, not an hour.
const QUEUED_RETRY_AFTER_RANGE_MS: (u64, u64) = (10, 60_000);
/// How stale the model's recent mean run time used for `retry_after_ms` may be.
pub const SERVICE_TTL: Duration = Duration::from_secs(10);
/// Buckets kept per node before the full ones (keys idle long enough) are forgotten: bounds the
/// memory to the keys that submitted recently.
const MAX_BUCKETS: usize = 10_000;

/// A token bucket: `rate` tokens a second, at most `burst` held; a submit takes one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A bucket holding `burst` tokens at `now` (a key not seen before may burst at once).
    pub fn full(burst: f64, now: Instant) -> Self {
        TokenBucket { tokens: burst, updated: now }
    }

    /// Takes a token at `now` if there is one; else how long until there is (exact while the
    /// rate holds). `rate` > 0 and `burst` >= 1.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = self.updated.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Gives a token taken back (its submit was refused further on).
    pub fn give_back(&mut self, burst: f64) {
        self.tokens = (self.tokens + 1.0).min(burst);
    }

    /// Whether it holds `burst` tokens at `now`: its key is as if never seen.
    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.updated).as_secs_f64() * rate >= burst
    }
}

/// This node's share of a key's rate and burst, with `live_nodes` API nodes sharing it.
pub fn node_share(limits: &KeyQuota, live_nodes: usize) -> (f64, f64) {
    let nodes = live_nodes.max(1) as f64;
    (limits.submits_per_s / nodes, (limits.burst as f64 / nodes).max(1.0))
}

/// When a key over `max_queued` with `running` jobs running may have a place again: when its
/// next job starts, i.e. when one of its running jobs ends and its share gives the slot to the
/// next one. With the model's recent mean run time `mean_run_ms`, the first of `running` jobs
/// spread evenly through their runs ends after about `mean / (running + 1)`; with none running
/// (the model's slots busy with other keys, or none live), one run time. Without a mean,
/// [`QUEUED_RETRY_AFTER_MS`].
pub fn queued_retry_after_ms(mean_run_ms: Option<f64>, running: u64) -> u64 {
    let Some(mean) = mean_run_ms.filter(|m| m.is_finite() && *m >= 0.0) else { return QUEUED_RETRY_AFTER_MS };
    let (low, high) = QUEUED_RETRY_AFTER_RANGE_MS;
    ((mean / (running as f64 + 1.0)).ceil() as u64).clamp(low, high)
}

/// The `max_queued` rule: the key `shown` with `queued` jobs waiting in `model` takes `adding`
/// more only if that keeps it within `max` (0: no limit); refused, it may try again after
/// `retry_after_ms()` (asked only then: it may cost a look-up).
pub fn admit_queued(
    shown: &str,
    model: &str,
    queued: u64,
    adding: u64,
    max: u64,
    retry_after_ms: impl FnOnce() -> u64,
) -> Result<(), ApiError> {
    if max == 0 || queued.saturating_add(adding) <= max {
        return Ok(());
    }
    Err(ApiError::quota_exceeded(
        format!(
            "quota: key {shown:?} may have at most {max} jobs of model {model:?} queued; it has {queued}, and this request adds {adding}; retry later"
        ),
        retry_after_ms(),
    ))
}

/// The refusal of a submit over `shown`'s rate: `wait` until its next token.
pub fn rate_exceeded(shown: &str, model: &str, limits: &KeyQuota, wait: Duration) -> ApiError {
    ApiError::quota_exceeded(
        format!(
            "quota: key {shown:?} may submit {} per second to model {model:?} (bursts of {}); retry later",
            limits.submits_per_s, limits.burst
        ),
        // Rounded up: a retry at that time finds the token there.
        (wait.as_micros() as u64).div_ceil(1000).max(1),
    )
}

/// One node's quota state: the keys' buckets, and the jobs it is admitting now.
#[derive(Debug, Default)]
pub struct Quotas {
    /// (model, key token) -> its bucket.
    buckets: DashMap<(String, String), TokenBucket>,
    /// (model, key token) -> jobs this node admitted under `max_queued` and is still putting
    /// in their queue: counted with the queued ones, so submits of one key in flight together
    /// on this node cannot all pass on the same count.
    admitting: DashMap<(String, String), u64>,
    /// model -> its recent mean run time in ms (`None`: none finished lately), and when read.
    service_ms: DashMap<String, (Option<f64>, Instant)>,
}

impl Quotas {
    /// Takes a token of `key`'s bucket for `model`, with this node's share `(rate, burst)`.
    pub fn take(&self, model: &str, key: &str, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() > MAX_BUCKETS {
            // Judged with this key's rate and burst: a key with other limits may be forgotten a
            // little early, which only gives it its burst back.
            self.buckets.retain(|_, b| !b.is_full(rate, burst, now));
        }
        let mut bucket = self.buckets.entry((model.to_string(), key.to_string())).or_insert_with(|| TokenBucket::full(burst, now));
        bucket.take(rate, burst, now)
    }

    /// Gives back a token [`take`](Self::take) gave.
    pub fn give_back(&self, model: &str, key: &str, burst: f64) {
        if let Some(mut bucket) = self.buckets.get_mut(&(model.to_string(), key.to_string())) {
            bucket.give_back(burst);
        }
    }

    /// Counts `adding` jobs of `key` as being admitted; returns all this node is admitting for
    /// it now, these included. [`done_admitting`](Self::done_admitting) un-counts them.
    pub fn start_admitting(&self, model: &str, key: &str, adding: u64) -> u64 {
        let mut n = self.admitting.entry((model.to_string(), key.to_string())).or_insert(0);
        *n += adding;
        *n
    }

    /// `model`'s recent mean run time as last read, and whether the caller should read it again
    /// now (older than [`SERVICE_TTL`], or never read): one caller claims it, the others go on
    /// with the figure they have.
    pub fn service_ms(&self, model: &str, now: Instant) -> (Option<f64>, bool) {
        match self.service_ms.get_mut(model) {
            Some(mut e) if now.saturating_duration_since(e.1) >= SERVICE_TTL => {
                e.1 = now;
                (e.0, true)
            }
            Some(e) => (e.0, false),
            None => {
                self.service_ms.insert(model.to_string(), (None, now));
                (None, true)
            }
        }
    }

    /// A new reading of `model`'s recent mean run time.
    pub fn measured_service(&self, model: &str, mean_ms: Option<f64>, now: Instant) {
        self.service_ms.insert(model.to_string(), (mean_ms, now));
    }

    pub fn done_admitting(&self, model: &str, key: &str, adding: u64) {
        let id = (model.to_string(), key.to_string());
        if let Some(mut n) = self.admitting.get_mut(&id) {
            *n = n.saturating_sub(adding);
        }
        self.admitting.remove_if(&id, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::protocol::ErrorCode;
    use proptest::prelude::*;

    proptest! {
        /// Over any window, a bucket gives at most `burst + rate * window` tokens, and a refusal's
        /// wait is exact: a token is there after it and not before.
        #[test]
        fn a_bucket_gives_its_rate_and_burst_and_no_more(
            rate in 0.5f64..200.0,
            burst in 1u64..20,
            gaps_us in proptest::collection::vec(0u64..50_000, 1..300),
        ) {
            let burst = burst as f64;
            let t0 = Instant::now();
            let mut bucket = TokenBucket::full(burst, t0);
            let (mut now, mut given) = (t0, 0u64);
            for gap in gaps_us {
                now += Duration::from_micros(gap);
                match bucket.take(rate, burst, now) {
                    Ok(()) => given += 1,
                    Err(wait) => {
                        prop_assert!(wait > Duration::ZERO);
                        let mut early = bucket;
                        prop_assert!(early.take(rate, burst, now + wait.mul_f64(0.99)).is_err(), "a token before the wait");
                        let mut after = bucket;
                        prop_assert!(after.take(rate, burst, now + wait + Duration::from_micros(1)).is_ok(), "no token after the wait");
                    }
                }
                let window = now.duration_since(t0).as_secs_f64();
                prop_assert!(given as f64 <= burst + rate * window + 1e-6, "{given} tokens in {window} s");
            }
        }
    }

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(3.0, t0);
        for _ in 0..3 {
            bucket.take(10.0, 3.0, t0).expect("the burst");
        }
        assert_eq!(bucket.take(10.0, 3.0, t0), Err(Duration::from_millis(100)), "one token per 100 ms");
        bucket.take(10.0, 3.0, t0 + Duration::from_millis(100)).expect("refilled");
        bucket.give_back(3.0);
        bucket.take(10.0, 3.0, t0 + Duration::from_millis(100)).expect("given back");
        // Idle for long: never more than the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            bucket.take(10.0, 3.0, later).expect("the burst again");
        }
        assert!(bucket.take(10.0, 3.0, later).is_err());
    }

    #[test]
    fn max_queued_counts_what_is_added_and_says_who_and_how_many() {
        let never = || panic!("the wait is asked for only on a refusal");
        assert!(admit_queued("alice", "m", 9, 1, 10, never).is_ok());
        assert!(admit_queued("alice", "m", 10_000, 5, 0, never).is_ok(), "0: no limit");
        let e = admit_queued("alice", "sdxl", 9, 2, 10, || 250).expect_err("one over");
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert_eq!(e.retry_after_ms, Some(250));
        assert!(e.message.contains("\"alice\"") && e.message.contains("at most 10") && e.message.contains("has 9"), "{}", e.message);
        assert!(admit_queued("a", "m", u64::MAX, 1, u64::MAX, never).is_ok(), "no overflow");
    }

    #[test]
    fn a_queued_keys_wait_is_the_first_of_its_running_jobs_to_end() {
        assert_eq!(queued_retry_after_ms(None, 3), QUEUED_RETRY_AFTER_MS, "no run time known");
        assert_eq!(queued_retry_after_ms(Some(900.0), 0), 900, "none running: one run");
        assert_eq!(queued_retry_after_ms(Some(900.0), 2), 300);
        assert_eq!(queued_retry_after_ms(Some(1.0), 0), 10, "not a retry storm");
        assert_eq!(queued_retry_after_ms(Some(1e9), 0), 60_000, "not an hour");
        assert_eq!(queued_retry_after_ms(Some(f64::NAN), 0), QUEUED_RETRY_AFTER_MS);
    }

    #[test]
    fn one_caller_reads_the_run_time_again_when_it_is_stale() {
        let quotas = Quotas::default();
        let t0 = Instant::now();
        assert_eq!(quotas.service_ms("m", t0), (None, true), "never read: read it");
        assert_eq!(quotas.service_ms("m", t0), (None, false), "claimed");
        quotas.measured_service("m", Some(40.0), t0);
        assert_eq!(quotas.service_ms("m", t0 + SERVICE_TTL / 2), (Some(40.0), false));
        assert_eq!(quotas.service_ms("m", t0 + SERVICE_TTL), (Some(40.0), true), "stale: the figure still, and read again");
        assert_eq!(quotas.service_ms("m", t0 + SERVICE_TTL), (Some(40.0), false), "once");
    }

    #[test]
    fn each_node_takes_its_share_of_the_rate() {
        let limits = KeyQuota { submits_per_s: 10.0, burst: 5, ..Default::default() };
        assert_eq!(node_share(&limits, 1), (10.0, 5.0));
        assert_eq!(node_share(&limits, 2), (5.0, 2.5));
        assert_eq!(node_share(&limits, 0), (10.0, 5.0), "no live node listed yet: this one");
        assert_eq!(node_share(&limits, 10).1, 1.0, "at least one submit at once");
        let e = rate_exceeded("bob", "m", &limits, Duration::from_micros(1500));
        assert_eq!((e.code, e.retry_after_ms), (ErrorCode::QuotaExceeded, Some(2)), "rounded up");
    }

    #[test]
    fn admitting_counts_until_done() {
        let quotas = Quotas::default();
        assert_eq!(quotas.start_admitting("m", "k", 2), 2);
        assert_eq!(quotas.start_admitting("m", "k", 3), 5);
        assert_eq!(quotas.start_admitting("m", "other", 1), 1);
        quotas.done_admitting("m", "k", 2);
        assert_eq!(quotas.start_admitting("m", "k", 0), 3);
        quotas.done_admitting("m", "k", 3);
        assert!(quotas.admitting.get(&("m".to_string(), "k".to_string())).is_none(), "forgotten at 0");
    }
}
