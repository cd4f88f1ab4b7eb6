//! Riding out NATS trouble: the one retry loop for a store operation on a job's path, paced by
//! [`Patience`] (`crate::policy`). What counts as trouble and what as an answer is
//! [`Transient`]: a stream without a leader, no responders, a timeout, "no stream found for
//! given subject" are trouble (tried again); a compare-and-set conflict, a missing object, a
//! refused permission are answers (returned at once).
//!
//! Only operations that are safe to repeat go through here: publishes de-duplicated by their
//! message id, idempotent settles, and compare-and-set writes, whose retry inside
//! [`super::cas::update_patiently`] re-reads and decides again (so a retried write that
//! another attempt overtook meanwhile fails its compare-and-set, never overwrites).

use std::future::Future;

use super::{CasError, StoreError};
use crate::policy::Patience;

/// Whether an error is NATS trouble that may pass (try again) rather than an answer.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

impl Transient for StoreError {
    fn is_transient(&self) -> bool {
        match self {
            // async-nats's own errors, by their text: a leaderless stream answers "no stream
            // found for given subject" (no responders) or times out; a server restarting
            // drops the request. A permission or a size limit will not change by waiting.
            StoreError::Nats(message) => {
                let message = message.to_ascii_lowercase();
                !["permissions violation", "maximum payload", "authorization"].iter().any(|m| message.contains(m))
            }
            StoreError::Conflict | StoreError::NotFound(_) | StoreError::AlreadyExists | StoreError::Decode(_) | StoreError::Io(_) => false,
        }
    }
}

impl Transient for CasError {
    fn is_transient(&self) -> bool {
        match self {
            CasError::Store(e) => e.is_transient(),
            CasError::Contended { .. } | CasError::Missing { .. } => false,
        }
    }
}

/// Runs `op` until it succeeds, fails with an answer, or `patience` says the next try would
/// start too late; then returns the last result. Each retry is logged (`what` names the
/// operation, `job_id` its job).
pub async fn ride_out<T, E, F, Fut>(patience: Patience, job_id: &str, what: &str, mut op: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = tokio::time::Instant::now();
    let mut failures = 0;
    loop {
        match op().await {
            Err(e) if e.is_transient() => {
                failures += 1;
                let Some(pause) = patience.pause(failures, started.elapsed()) else { return Err(e) };
                tracing::warn!(job_id = %job_id, error = %e, failures, pause_ms = pause.as_millis() as u64, "{what} failed (nats trouble); retrying");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;

    #[test]
    fn trouble_is_told_from_answers() {
        for trouble in ["no stream found for given subject", "timed out: didn't receive a reply", "no responders", "jetstream not enabled"]
        {
            assert!(StoreError::Nats(trouble.into()).is_transient(), "{trouble}");
        }
        assert!(!StoreError::Nats("Permissions Violation for Publish to \"x\"".into()).is_transient());
        assert!(!StoreError::Conflict.is_transient());
        assert!(!StoreError::NotFound("x".into()).is_transient());
        assert!(CasError::Store(StoreError::Nats("no responders".into())).is_transient());
        assert!(!CasError::Missing { key: "k".into() }.is_transient());
        assert!(!CasError::Contended { key: "k".into(), rounds: 64 }.is_transient());
    }

    /// The shape of [`Patience::NATS_TROUBLE`] at a thousandth of its scale (no paused clock in
    /// this crate's tokio): 0.1 ms doubling to 2 ms, within 30 ms.
    const QUICK: Patience = Patience {
        backoff: crate::policy::Backoff { initial: Duration::from_micros(100), max: Duration::from_millis(2), multiplier: 2.0 },
        within: Duration::from_millis(30),
    };

    #[tokio::test]
    async fn trouble_is_retried_until_it_passes() {
        let tries = Cell::new(0);
        let done = ride_out(QUICK, "j", "writing", || {
            tries.set(tries.get() + 1);
            async {
                if tries.get() < 6 {
                    Err(StoreError::Nats("no responders".into()))
                } else {
                    Ok(tries.get())
                }
            }
        })
        .await;
        assert_eq!(done.unwrap(), 6);
    }

    #[tokio::test]
    async fn an_answer_ends_at_once_and_endless_trouble_within_the_patience() {
        let tries = Cell::new(0);
        let conflict: Result<(), _> = ride_out(QUICK, "j", "writing", || {
            tries.set(tries.get() + 1);
            async { Err(StoreError::Conflict) }
        })
        .await;
        assert!(matches!(conflict, Err(StoreError::Conflict)));
        assert_eq!(tries.get(), 1);
        tries.set(0);
        let down: Result<(), _> = ride_out(QUICK, "j", "writing", || {
            tries.set(tries.get() + 1);
            async { Err(StoreError::Nats("timed out".into())) }
        })
        .await;
        assert!(down.is_err());
        // Pauses of 0.1, 0.2, ... 2, 2 ms (the timer's grain makes the first ones shorter):
        // the tries stop once the next would start past 30 ms, some 15 to 30 of them.
        assert!((5..=60).contains(&tries.get()), "{}", tries.get());
        assert!(ride_out(Patience::ONCE, "j", "writing", || async { Err::<(), _>(StoreError::Nats("x".into())) }).await.is_err());
    }
}
