//! The one compare-and-set loop that every writer of a KV record goes through: job records
//! (claim, conclude, cancel) and batch records (settling an item, linking a retry).
//!
//! ```text
//! read (or take the value the caller holds) ─► decide ── stop ──► Stopped(result), nothing written
//!      ▲                                         │
//!      │                                       write (compare-and-set on the revision read)
//!      │                                         ├── ok ──────► Written { value, revision }
//!      └── pause (grows, jittered) ◄── conflict ─┘   other error ► CasError::Store
//! ```
//!
//! `decide` is pure and may run several times for one update, once per round, each time on
//! the value as it is now: a rule written once (`crate::job`, `crate::batch`) is applied to the
//! latest record, never to a stale copy. Effects that must come between the decision and the
//! write (an event the write depends on, waiting for a registry listing) belong in `write`;
//! effects that follow a write or a stop belong to the caller, after this returns.

use std::future::Future;
use std::time::Duration;

use super::StoreError;

/// Compare-and-set rounds before an update gives up ([`CasError::Contended`]). One bound for
/// every writer, sized for the most contended key: a batch record, which every item of the
/// batch settles into as it ends, so items finishing on many slots at once collide. A job
/// record sees at most its owner and a cancel at once, and never comes near it.
pub const MAX_CAS_ROUNDS: usize = 64;

/// What `decide` makes of the value it was shown.
#[derive(Debug, Clone, PartialEq)]
pub enum Step<T, R> {
    /// Write this value in place of the one shown.
    Write(T),
    /// Write nothing; the update ends with this result.
    Stop(R),
}

/// How an update ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Updated<T, R> {
    /// `value` is stored at `revision` (the token for the caller's next compare-and-set).
    Written { value: T, revision: u64 },
    /// `decide` stopped: nothing was written.
    Stopped(R),
}

/// Errors of a compare-and-set update.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// Other writers changed the record between every read and write, `rounds` times over.
    /// Nothing was written; the update may be tried again.
    #[error("the record {key:?} kept changing: {rounds} compare-and-set rounds in a row lost to other writers")]
    Contended { key: String, rounds: usize },
    /// The record does not exist (never written, deleted, or expired).
    #[error("the record {key:?} does not exist")]
    Missing { key: String },
    /// Reading or writing failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads the record stored under `key`, lets `decide` say what it becomes, and writes that
/// only if the record is still at the revision read; when another writer got in between
/// ([`StoreError::Conflict`]) it reads and decides again, at most [`MAX_CAS_ROUNDS`] times.
///
/// `held` is a value and revision the caller already has (the job actor holds its record from
/// the claim): the first round decides on it without reading. `read` answers `None` for a
/// missing record ([`CasError::Missing`]); `write` gets the value to store and the revision it
/// must replace, and answers the new revision or `StoreError::Conflict`. (Plain closures that
/// return futures, not async closures: the futures of async closures called through a generic
/// bound are not known to be `Send`, which an actor's handler must be.)
pub async fn update_with<T, R, ReadFut, WriteFut>(
    key: &str,
    held: Option<(T, u64)>,
    mut read: impl FnMut() -> ReadFut,
    mut write: impl FnMut(T, u64) -> WriteFut,
    mut decide: impl FnMut(&T) -> Step<T, R>,
) -> Result<Updated<T, R>, CasError>
where
    T: Clone,
    ReadFut: Future<Output = Result<Option<(T, u64)>, StoreError>>,
    WriteFut: Future<Output = Result<u64, StoreError>>,
{
    let mut held = held;
    for round in 0..MAX_CAS_ROUNDS {
        if round > 0 {
            tokio::time::sleep(pause(round)).await;
        }
        let (current, revision) = match held.take() {
            Some(value) => value,
            None => read().await?.ok_or_else(|| CasError::Missing { key: key.to_string() })?,
        };
        let next = match decide(&current) {
            Step::Stop(result) => return Ok(Updated::Stopped(result)),
            Step::Write(next) => next,
        };
        match write(next.clone(), revision).await {
            Ok(revision) => return Ok(Updated::Written { value: next, revision }),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CasError::Contended { key: key.to_string(), rounds: MAX_CAS_ROUNDS })
}

/// The pause before round `round` (from 1): 2 to 13 ms, growing with the round and spread by
/// the clock, so writers that collided do not collide again in lockstep.
fn pause(round: usize) -> Duration {
    Duration::from_millis(1 + (round as u64 % 8) + (crate::now_ms() % 5))
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    /// A value in memory with a revision, and a count of writes that other writers "win"
    /// before this one's (each bumps the revision just before the write lands).
    struct Store {
        value: RefCell<Option<(u32, u64)>>,
        losses: Cell<usize>,
        reads: Cell<usize>,
    }

    impl Store {
        fn new(value: Option<u32>, losses: usize) -> Store {
            Store { value: RefCell::new(value.map(|v| (v, 1))), losses: Cell::new(losses), reads: Cell::new(0) }
        }

        async fn read(&self) -> Result<Option<(u32, u64)>, StoreError> {
            self.reads.set(self.reads.get() + 1);
            Ok(*self.value.borrow())
        }

        async fn write(&self, next: u32, revision: u64) -> Result<u64, StoreError> {
            let mut stored = self.value.borrow_mut();
            let (value, current) = stored.as_mut().expect("exists");
            if self.losses.get() > 0 {
                self.losses.set(self.losses.get() - 1);
                *value += 100;
                *current += 1;
            }
            if *current != revision {
                return Err(StoreError::Conflict);
            }
            *stored = Some((next, revision + 1));
            Ok(revision + 1)
        }

        async fn add_one(&self, held: Option<(u32, u64)>) -> Result<Updated<u32, u32>, CasError> {
            update_with("k", held, || self.read(), |v, rev| self.write(v, rev), |v| Step::Write(v + 1)).await
        }
    }

    #[tokio::test]
    async fn a_lost_round_decides_again_on_the_value_as_it_is_now() {
        let store = Store::new(Some(1), 2);
        let updated = store.add_one(None).await.unwrap();
        // Two other writers added 100 each; this one's +1 applies on top of both.
        assert_eq!(updated, Updated::Written { value: 202, revision: 4 });
        assert_eq!(store.reads.get(), 3);
    }

    #[tokio::test]
    async fn a_held_value_is_decided_on_without_a_read() {
        let store = Store::new(Some(5), 0);
        assert_eq!(store.add_one(Some((5, 1))).await.unwrap(), Updated::Written { value: 6, revision: 2 });
        assert_eq!(store.reads.get(), 0);
    }

    #[tokio::test]
    async fn a_stop_writes_nothing() {
        let store = Store::new(Some(5), 0);
        let stopped = update_with(
            "k",
            None,
            || store.read(),
            |v, rev| store.write(v, rev),
            |v| Step::<u32, &str>::Stop(if *v == 5 { "five" } else { "other" }),
        )
        .await
        .unwrap();
        assert_eq!(stopped, Updated::Stopped("five"));
        assert_eq!(*store.value.borrow(), Some((5, 1)));
    }

    #[tokio::test]
    async fn a_missing_record_and_endless_contention_have_their_own_errors() {
        let missing = Store::new(None, 0).add_one(None).await;
        assert!(matches!(missing, Err(CasError::Missing { key }) if key == "k"));
        let contended = Store::new(Some(0), usize::MAX).add_one(None).await;
        assert!(matches!(contended, Err(CasError::Contended { rounds: MAX_CAS_ROUNDS, .. })));
    }

    #[tokio::test]
    async fn other_store_errors_end_the_update_at_once() {
        let store = Store::new(Some(0), 0);
        let failed = update_with(
            "k",
            None,
            || store.read(),
            |_, _| async { Err(StoreError::Nats("down".into())) },
            |v| Step::<u32, ()>::Write(v + 1),
        )
        .await;
        assert!(matches!(failed, Err(CasError::Store(StoreError::Nats(_)))));
        assert_eq!(store.reads.get(), 1);
    }
}
