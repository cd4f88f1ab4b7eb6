//! Restart and retry policy as data, decided by pure functions that take the time as an
//! argument, so that tests drive them with explicit instants instead of sleeping. Every retry
//! schedule of a job's path is named here, with the reason for its values:
//!
//! | policy                     | what it paces                                                     |
//! |----------------------------|-------------------------------------------------------------------|
//! | [`Backoff`] from `[retry]` | a job's next attempt after a failed one (the cluster's config)     |
//! | [`NakLadder`]              | how long a delivery hands its queue message back for, and why     |
//! | [`RECORD_RACE_WAITS`]      | re-reads of a record the API is still writing (first delivery)    |
//! | [`Patience`]               | riding out NATS trouble: every store operation on a job's path    |
//! | [`CasContention`]          | compare-and-set rounds lost to other writers, and their pauses    |
//! | [`STAGE_RETRY_PAUSE`]      | between a post-processing stage's attempts                        |
//! | [`BATCH_PROGRESS_TRIES`]   | a batch's `batch_progress` event against its moving history       |
//! | [`RestartBudget`]          | a slot's restarts (from `[restart]`), then quarantine             |
//! | [`webhook_verdict`], [`webhook_backoff`] | a webhook message's next attempt (from `[webhooks]`), or its end |

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::{RestartPolicy, RetryPolicy};

/// Exponential backoff: `initial * multiplier^(n-1)`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

impl Backoff {
    /// The delay before retry number `n` (1-based).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = self.multiplier.powi(n.saturating_sub(1).min(63) as i32);
        let ms = (self.initial.as_millis() as f64 * factor).min(self.max.as_millis() as f64);
        Duration::from_millis(ms as u64)
    }
}

impl From<&RetryPolicy> for Backoff {
    fn from(p: &RetryPolicy) -> Self {
        Backoff {
            initial: Duration::from_millis(p.backoff_initial_ms),
            max: Duration::from_millis(p.backoff_max_ms),
            multiplier: p.backoff_multiplier,
        }
    }
}

/// How long an operation rides out NATS trouble before that counts as a failure: a stream
/// without a leader (its leader's server died; nats-server elects another after its 4 to 9 s
/// election timeout, longer on a loaded machine), a server restarting, a request timing out.
/// That is not the job's failure, and a write on a job's path that gave up at once left the job
/// for redelivery after the ack wait, so its model ran a second time (an outside storm on three
/// nats-servers: 2 of 93 jobs when the `KV_kiln_jobs` leader died). Only trouble is retried
/// (`kiln_core::nats::Transient`); an answer (a compare-and-set conflict, a missing object)
/// is final.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Patience {
    /// The pauses between tries.
    pub backoff: Backoff,
    /// No try starts later than this after the first one began.
    pub within: Duration,
}

impl Patience {
    /// Every store operation on a job's path (inputs, artifacts, events, the outcome, the
    /// terminal event and results feed, the batch settle): 30 s, several elections' worth,
    /// pauses from 100 ms doubling to 2 s. The delivery stays this node's meanwhile: its
    /// `in_progress` keeps being sent.
    pub const NATS_TROUBLE: Patience = Patience {
        backoff: Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2), multiplier: 2.0 },
        within: Duration::from_secs(30),
    };

    /// A new job's record (the submit's last write, `Resources::launch_job`): a create that
    /// timed out may have landed, and the client told "refused" then found the job run (the
    /// partition test in tests/nats_cluster.rs: a job in the cluster no client was told was
    /// accepted). Tried again until it lands or is found there (`already exists`: this very
    /// record or an identical resubmission's), within 10 s, well inside a client's 30 s wait.
    pub const SUBMIT_RECORD: Patience = Patience {
        backoff: Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), multiplier: 2.0 },
        within: Duration::from_secs(10),
    };

    /// A delivery's claim: a claim that timed out may have landed (then the re-read finds
    /// exactly the record it sent, and the claim is this delivery's: `cas::update_patiently`).
    /// Given up on at once, it was left for redelivery, whose claim then took the landed one
    /// for a lost attempt and used another (a `max_attempts = 1` job failed without running).
    /// Within a third of the ack wait: the message is not redelivered elsewhere meanwhile
    /// (nothing sends `in_progress` before the claim).
    pub fn claim(ack_wait: Duration) -> Patience {
        Patience {
            backoff: Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), multiplier: 2.0 },
            within: ack_wait / 3,
        }
    }

    /// One try: trouble is the caller's to handle (an API request, whose client retries).
    pub const ONCE: Patience =
        Patience { backoff: Backoff { initial: Duration::ZERO, max: Duration::ZERO, multiplier: 1.0 }, within: Duration::ZERO };

    /// The pause before the next try, after `failures` tries failed (1-based) and `elapsed`
    /// since the first began; `None`: give up (the next try would start too late).
    pub fn pause(&self, failures: u32, elapsed: Duration) -> Option<Duration> {
        let pause = self.backoff.delay(failures);
        (elapsed + pause < self.within).then_some(pause)
    }
}

/// Why a delivery hands its queue message back (`Nak` with a delay: JetStream redelivers it
/// after that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nak {
    /// Attempt `attempt` failed and the job has attempts left (its record says `retrying`).
    Retry { attempt: u32 },
    /// The job's record does not exist (yet) at delivery number `delivered` (from 1): its
    /// submission is still under way, or died between the enqueue and the record.
    NoRecordYet { delivered: u32 },
}

/// The NAK ladder: the delay of each [`Nak`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NakLadder {
    /// After a failed attempt: the cluster's `[retry]` backoff (config), by attempt number.
    pub retry: Backoff,
    /// A message without a record: [`NakLadder::NO_RECORD`].
    pub no_record: Backoff,
}

impl NakLadder {
    /// A message without a record is looked at again in 1 s, then 2, 4, 8, then every 10 s:
    /// the record's write is usually just late (the API writes it after the enqueue, and the
    /// first delivery re-reads it for [`RECORD_RACE_WAITS`] before handing it back), so the
    /// first look is soon; an orphan (its submission died) is redelivered until it is older
    /// than the queue's de-duplication window and then dropped, so the later looks are sparse
    /// and never hold a slot more than once in 10 s.
    pub const NO_RECORD: Backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(10), multiplier: 2.0 };

    /// The ladder of a cluster whose `[retry]` backoff is `retry`.
    pub fn new(retry: Backoff) -> NakLadder {
        NakLadder { retry, no_record: NakLadder::NO_RECORD }
    }

    pub fn delay(&self, nak: Nak) -> Duration {
        match nak {
            Nak::Retry { attempt } => self.retry.delay(attempt),
            Nak::NoRecordYet { delivered } => self.no_record.delay(delivered.max(1)),
        }
    }
}

/// A first delivery whose job record is missing re-reads it after these waits (in all 63 ms)
/// before handing the message back: the API writes the record after the enqueue, so a fast
/// node may see the message first. The first re-read is at once: the record's write is usually
/// in flight already (`kiln bench` saw the race in about one job in ten, and a 1 ms sleep was
/// the largest part of its latency then). A redelivered message was waited for once and reads
/// once (an orphan's redeliveries must not hold a slot for 63 ms each).
pub const RECORD_RACE_WAITS: [Duration; 7] = [
    Duration::ZERO,
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
];

/// Compare-and-set rounds lost to other writers (`crate::nats::cas`): read and decide again,
/// after a short pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasContention {
    /// Rounds before an update gives up (`CasError::Contended`).
    pub max_rounds: usize,
}

impl CasContention {
    /// One bound for every writer, sized for the most contended key: a batch record, which
    /// every item of the batch settles into as it ends, so items finishing on many slots at
    /// once collide. A job record sees at most its owner and a cancel at once, and never comes
    /// near it.
    pub const RECORDS: CasContention = CasContention { max_rounds: 64 };

    /// The pause before round `round` (from 1): 2 to 13 ms, growing with the round and spread
    /// by the clock (`clock_ms`, ms), so writers that collided do not collide again in lockstep.
    pub fn pause(round: usize, clock_ms: u64) -> Duration {
        Duration::from_millis(1 + (round as u64 % 8) + (clock_ms % 5))
    }
}

/// The pause between a post-processing stage's attempts (their number is the stage's
/// `max_attempts`): none. What a retry mends is the command's own flakiness (a crash, no
/// output), which waiting does not change; the job's slot has moved on to its next job
/// already, and the stage pool is bounded, so an immediate retry holds nothing up. A stage
/// whose attempts are all used fails the job's attempt, and the job's own [`NakLadder`]
/// paces what follows.
pub const STAGE_RETRY_PAUSE: Duration = Duration::ZERO;

/// Tries of a batch's `batch_progress` event, each chained onto the batch's last event read
/// (`Nats-Expected-Last-Subject-Sequence`), before it is left out: at once, with no pause,
/// since each loss means another settle stored its own event in between, which carries counts
/// as new. Left out, nothing is lost: the next item's event or `batch_finished` has the counts.
pub const BATCH_PROGRESS_TRIES: usize = 5;

/// A model's puller, when its queue's consumers cannot be opened (the stream is being created,
/// NATS is away): it tries again after this, for as long as the node runs.
pub const PULL_CONSUMER_RETRY: Duration = Duration::from_secs(1);
/// A draining node's puller re-checks this often whether it may take jobs again: a drain is
/// long-lived, and no job waits for this (the node takes none).
pub const PULL_DRAINING_RECHECK: Duration = Duration::from_secs(1);
/// A fetch that failed (not one that found nothing): a short pause before the next, so a
/// refusing server is not asked in a tight loop, short enough that a job published meanwhile
/// is not held up noticeably.
pub const PULL_FETCH_FAILED_PAUSE: Duration = Duration::from_millis(200);
/// An empty fetch right after a wake-up (another node took the job first, or the publish had
/// not reached the stream yet) is tried again at once, then after 1, 2 and 4 ms, before the
/// puller waits for the next wake-up: without these the job waited for the 250 ms idle re-check,
/// which showed as the sequential p99. `None` past the last: wait for a wake-up.
pub fn pull_overtaken_pause(overtaken: u32) -> Option<Duration> {
    match overtaken {
        0 => Some(Duration::ZERO),
        1..=3 => Some(Duration::from_millis(1 << (overtaken - 1))),
        _ => None,
    }
}

/// What a supervisor does after its child failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart after this delay.
    Restart { after: Duration, restarts_in_window: u32 },
    /// The budget is spent: quarantine (the GPU is `dead` and takes no more jobs).
    Quarantine { restarts_in_window: u32 },
}

/// At most `max_restarts` restarts in any `window`; the delay doubles with each restart still
/// inside the window, so a crash loop slows down before it is quarantined.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    max_restarts: u32,
    window: Duration,
    backoff: Backoff,
    /// Instants (ms on the caller's clock) of the restarts still inside the window.
    recent: VecDeque<u64>,
}

impl RestartBudget {
    pub fn new(policy: &RestartPolicy) -> Self {
        RestartBudget {
            max_restarts: policy.max_restarts,
            window: Duration::from_millis(policy.window_ms),
            backoff: Backoff {
                initial: Duration::from_millis(policy.backoff_initial_ms),
                max: Duration::from_millis(policy.backoff_max_ms),
                multiplier: 2.0,
            },
            recent: VecDeque::new(),
        }
    }

    /// Records a failure at `now_ms` and decides what to do.
    pub fn on_failure(&mut self, now_ms: u64) -> RestartDecision {
        let window = self.window.as_millis() as u64;
        while self.recent.front().is_some_and(|&t| now_ms.saturating_sub(t) >= window) {
            self.recent.pop_front();
        }
        if self.recent.len() as u32 >= self.max_restarts {
            return RestartDecision::Quarantine { restarts_in_window: self.recent.len() as u32 };
        }
        self.recent.push_back(now_ms);
        let n = self.recent.len() as u32;
        RestartDecision::Restart { after: self.backoff.delay(n), restarts_in_window: n }
    }
}

/// What one webhook attempt came to, as the delivery saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookAnswer {
    /// The receiver answered with this status.
    Status(u16),
    /// No answer in `[webhooks] timeout_ms`.
    Timeout,
    /// No connection (refused, reset, DNS failure, TLS failure).
    Unreachable,
    /// The host resolves only to addresses the cluster refuses (`allow_loopback` off).
    AddressRefused,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookVerdict {
    Delivered,
    /// Another attempt, after [`webhook_backoff`], while `retry_for_s` lasts.
    Retry,
    /// No further attempt: the receiver said no in a way a retry will not change.
    GiveUp,
}

/// The retry rule: 2xx is delivered; 408 (request timeout), 429 (too many requests), 5xx,
/// timeouts and unreachable receivers are retried (each may pass: a receiver being deployed
/// answers 502 for a while); a redirect (3xx, never followed: a signed message must reach the
/// URL the client named, and following one silently hid Replicate's 301s), every other 4xx
/// (413 included: the same body will be too large again) and an address the cluster refuses
/// are given up at once.
pub fn webhook_verdict(answer: WebhookAnswer) -> WebhookVerdict {
    match answer {
        WebhookAnswer::Status(s) if (200..300).contains(&s) => WebhookVerdict::Delivered,
        WebhookAnswer::Status(408 | 429) => WebhookVerdict::Retry,
        WebhookAnswer::Status(s) if s >= 500 => WebhookVerdict::Retry,
        WebhookAnswer::Status(_) => WebhookVerdict::GiveUp,
        WebhookAnswer::Timeout | WebhookAnswer::Unreachable => WebhookVerdict::Retry,
        WebhookAnswer::AddressRefused => WebhookVerdict::GiveUp,
    }
}

/// The pause before attempt `attempt + 1` of a webhook message: `initial * 2^(attempt-1)`
/// capped at `max`, then "equal jitter" (half of it fixed, the other half scaled by
/// `jitter` in [0, 1)) so that the messages of a receiver that came back do not all return
/// at the same instant. Never below half of the un-jittered delay, never above `max`.
pub fn webhook_backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let base = Backoff { initial, max, multiplier: 2.0 }.delay(attempt.max(1));
    let half = base / 2;
    (half + Duration::from_secs_f64((base - half).as_secs_f64() * jitter.clamp(0.0, 1.0))).min(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overtaken_puller_looks_again_at_once_then_after_1_2_4_ms_then_waits() {
        let pauses: Vec<Option<u64>> = (0..6).map(|n| pull_overtaken_pause(n).map(|d| d.as_millis() as u64)).collect();
        assert_eq!(pauses, [Some(0), Some(1), Some(2), Some(4), None, None]);
    }

    /// A claim rides out trouble within a third of the ack wait, never up to the ack wait
    /// itself (the message would go to another node meanwhile).
    #[test]
    fn a_claim_is_patient_for_a_third_of_the_ack_wait() {
        let patience = Patience::claim(Duration::from_secs(30));
        assert_eq!(patience.pause(1, Duration::ZERO), Some(Duration::from_millis(100)));
        assert_eq!(patience.pause(4, Duration::from_secs(5)), Some(Duration::from_millis(800)));
        assert_eq!(patience.pause(5, Duration::from_millis(9_500)), None, "past 10 s: given up");
        let short = Patience::claim(Duration::from_millis(300));
        assert_eq!(short.pause(1, Duration::ZERO), None, "an ack wait of 300 ms leaves no time to wait 100 ms");
    }

    fn policy(max: u32) -> RestartPolicy {
        RestartPolicy { max_restarts: max, window_ms: 10_000, backoff_initial_ms: 100, backoff_max_ms: 1_000 }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(1_000), multiplier: 2.0 };
        let delays: Vec<u64> = (1..=6).map(|n| b.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(1_000));
    }

    #[test]
    fn nats_trouble_is_ridden_out_past_an_election_and_no_longer() {
        let p = Patience::NATS_TROUBLE;
        // Tries as a leaderless stream sees them, each failing at once: the pauses add up to
        // more than nats-server's 9 s election timeout and stop short of 30 s.
        let (mut elapsed, mut failures, mut pauses) = (Duration::ZERO, 0, vec![]);
        while let Some(pause) = p.pause(failures + 1, elapsed) {
            failures += 1;
            pauses.push(pause.as_millis() as u64);
            elapsed += pause;
        }
        assert_eq!(&pauses[..6], &[100, 200, 400, 800, 1600, 2000]);
        assert!(elapsed > Duration::from_secs(9) && elapsed < Duration::from_secs(30), "{elapsed:?}");
        // Tries that take long themselves (a 5 s request timeout each) use the same window.
        assert_eq!(p.pause(6, Duration::from_secs(25)), Some(Duration::from_secs(2)));
        assert_eq!(p.pause(6, Duration::from_secs(28)), None);
        assert_eq!(p.pause(1, Duration::from_millis(29_950)), None);
    }

    #[test]
    fn once_never_pauses() {
        assert_eq!(Patience::ONCE.pause(1, Duration::ZERO), None);
    }

    #[test]
    fn the_nak_ladder_looks_for_a_missing_record_soon_then_sparsely() {
        let ladder = NakLadder::new(Backoff::from(&RetryPolicy::default()));
        let no_record: Vec<u64> = (0..=7).map(|delivered| ladder.delay(Nak::NoRecordYet { delivered }).as_millis() as u64).collect();
        assert_eq!(no_record, vec![1_000, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]);
        assert_eq!(ladder.delay(Nak::NoRecordYet { delivered: u32::MAX }), Duration::from_secs(10));
        for attempt in 1..5 {
            assert_eq!(ladder.delay(Nak::Retry { attempt }), ladder.retry.delay(attempt));
        }
    }

    proptest::proptest! {
        /// Whatever the delivery count, a message without a record comes back within 1 to 10 s,
        /// and never sooner than it did the delivery before.
        #[test]
        fn a_missing_record_is_looked_at_again_within_one_to_ten_seconds(delivered in 0u32..) {
            let ladder = NakLadder::new(Backoff::from(&RetryPolicy::default()));
            let delay = ladder.delay(Nak::NoRecordYet { delivered });
            proptest::prop_assert!(delay >= Duration::from_secs(1) && delay <= Duration::from_secs(10));
            let before = ladder.delay(Nak::NoRecordYet { delivered: delivered.saturating_sub(1) });
            proptest::prop_assert!(delay >= before);
        }

        /// Conflict pauses stay short (2 to 13 ms) for every round and clock.
        #[test]
        fn a_lost_compare_and_set_pauses_two_to_thirteen_ms(round in 1usize..10_000, clock in 0u64..) {
            let pause = CasContention::pause(round, clock);
            proptest::prop_assert!(pause >= Duration::from_millis(1) && pause <= Duration::from_millis(13));
        }
    }

    #[test]
    fn webhook_answers_are_delivered_retried_or_given_up() {
        use WebhookAnswer::*;
        use WebhookVerdict::*;
        for (answer, verdict) in [
            (Status(200), Delivered),
            (Status(204), Delivered),
            (Status(301), GiveUp),
            (Status(308), GiveUp),
            (Status(400), GiveUp),
            (Status(404), GiveUp),
            (Status(408), Retry),
            (Status(413), GiveUp),
            (Status(429), Retry),
            (Status(500), Retry),
            (Status(503), Retry),
            (Timeout, Retry),
            (Unreachable, Retry),
            (AddressRefused, GiveUp),
        ] {
            assert_eq!(webhook_verdict(answer), verdict, "{answer:?}");
        }
    }

    proptest::proptest! {
        /// Only 2xx delivers; every 5xx retries; a 3xx never retries (redirects are not
        /// followed, and retrying would meet the same redirect).
        #[test]
        fn only_2xx_delivers_and_5xx_always_retries(status in 100u16..600) {
            let v = webhook_verdict(WebhookAnswer::Status(status));
            proptest::prop_assert_eq!(v == WebhookVerdict::Delivered, (200..300).contains(&status));
            if status >= 500 { proptest::prop_assert_eq!(v, WebhookVerdict::Retry); }
            if (300..400).contains(&status) { proptest::prop_assert_eq!(v, WebhookVerdict::GiveUp); }
        }

        /// A webhook's pause lies between half the exponential delay and the cap, and does not
        /// shrink as attempts grow (for the same jitter).
        #[test]
        fn webhook_backoff_is_jittered_within_half_to_full_and_capped(
            attempt in 1u32..200, initial_ms in 1u64..10_000, extra_ms in 0u64..1_000_000, jitter in 0.0f64..1.0,
        ) {
            let (initial, max) = (Duration::from_millis(initial_ms), Duration::from_millis(initial_ms + extra_ms));
            let d = webhook_backoff(attempt, initial, max, jitter);
            let base = Backoff { initial, max, multiplier: 2.0 }.delay(attempt);
            proptest::prop_assert!(d >= base / 2 && d <= base && d <= max, "{d:?} for base {base:?}");
            proptest::prop_assert!(webhook_backoff(attempt + 1, initial, max, jitter) >= d);
        }
    }

    #[test]
    fn the_record_race_waits_63_ms_in_all_the_first_at_once() {
        assert_eq!(RECORD_RACE_WAITS[0], Duration::ZERO);
        assert_eq!(RECORD_RACE_WAITS.iter().sum::<Duration>(), Duration::from_millis(63));
    }

    #[test]
    fn budget_quarantines_after_n_restarts_in_the_window() {
        let mut b = RestartBudget::new(&policy(3));
        assert_eq!(b.on_failure(0), RestartDecision::Restart { after: Duration::from_millis(100), restarts_in_window: 1 });
        assert_eq!(b.on_failure(10), RestartDecision::Restart { after: Duration::from_millis(200), restarts_in_window: 2 });
        assert_eq!(b.on_failure(20), RestartDecision::Restart { after: Duration::from_millis(400), restarts_in_window: 3 });
        assert_eq!(b.on_failure(30), RestartDecision::Quarantine { restarts_in_window: 3 });
    }

    #[test]
    fn failures_spread_beyond_the_window_never_quarantine() {
        let mut b = RestartBudget::new(&policy(2));
        for i in 0..100u64 {
            let d = b.on_failure(i * 6_000);
            assert!(matches!(d, RestartDecision::Restart { .. }), "failure {i}: {d:?}");
        }
    }

    #[test]
    fn zero_budget_quarantines_at_once() {
        let mut b = RestartBudget::new(&policy(0));
        assert_eq!(b.on_failure(0), RestartDecision::Quarantine { restarts_in_window: 0 });
    }
}
