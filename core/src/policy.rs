//! Restart and retry policy as data, decided by pure functions that take the time as an
//! argument, so that tests drive them with explicit instants instead of sleeping.

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
