//! Restart and retry policy as data, decided by pure functions that take the time as an
//! argument, so that tests drive them with explicit instants instead of sleeping: the backoff
//! of a job's retries, the restart budget of a slot, and the patience with NATS trouble of
//! every store operation on a job's path.

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

#[cfg(test)]
mod tests {
    use super::*;

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
