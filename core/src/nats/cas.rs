//! The one compare-and-set loop that every writer of a KV record goes through: job records
//! (claim, conclude, cancel) and batch records (settling an item, linking a retry).
//!
//! ```text
//! read (or take the value the caller holds) ─► decide ── stop ──► Stopped(result), nothing written
//!      ▲                                         │
//!      │                                       write (compare-and-set on the revision read)
//!      │                                         ├── ok ──────► Written { value, revision }
//!      └── pause (grows, jittered) ◄── conflict ─┘   NATS trouble ► CasError::Store, or with
//!      ▲                                                            patience (`update_patiently`):
//!      └─────────── pause (backoff, up to 30 s in all) ◄────────────┘ read and decide again
//! ```
//!
//! `decide` is pure and may run several times for one update, once per round, each time on
//! the value as it is now: a rule written once (`crate::job`, `crate::batch`) is applied to the
//! latest record, never to a stale copy. Effects that must come between the decision and the
//! write (an event the write depends on, waiting for a registry listing) belong in `write`;
//! effects that follow a write or a stop belong to the caller, after this returns.

use std::future::Future;
use std::time::Duration;

use super::{StoreError, Transient};
use crate::policy::{CasContention, Patience};

/// Compare-and-set rounds before an update gives up ([`CasError::Contended`]): the policy
/// [`CasContention::RECORDS`], one bound for every writer.
pub const MAX_CAS_ROUNDS: usize = CasContention::RECORDS.max_rounds;

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
/// NATS trouble ends the update at once ([`update_patiently`] rides it out).
///
/// `held` is a value and revision the caller already has (the job actor holds its record from
/// the claim): the first round decides on it without reading. `read` answers `None` for a
/// missing record ([`CasError::Missing`]); `write` gets the value to store and the revision it
/// must replace, and answers the new revision or `StoreError::Conflict`. (Plain closures that
/// return futures, not async closures: the futures of async closures called through a generic
/// bound are not known to be `Send`, which an actor's handler must be.) A write answered as a
/// conflict that landed all the same is this update's own (see [`update_patiently`]).
pub async fn update_with<T, R, ReadFut, WriteFut>(
    key: &str,
    held: Option<(T, u64)>,
    read: impl FnMut() -> ReadFut,
    write: impl FnMut(T, u64) -> WriteFut,
    decide: impl FnMut(&T) -> Step<T, R>,
) -> Result<Updated<T, R>, CasError>
where
    T: Clone + PartialEq,
    ReadFut: Future<Output = Result<Option<(T, u64)>, StoreError>>,
    WriteFut: Future<Output = Result<u64, StoreError>>,
{
    run(key, held, Patience::ONCE, read, write, decide).await
}

/// [`update_with`] that rides out NATS trouble ([`Transient`]) for as long as `patience`
/// allows: a stream without a leader refuses reads and writes for seconds, and a write on a
/// job's path that gave up then made the job run again. Each retry reads and decides again,
/// so it keeps every fence: a retried write that another writer overtook meanwhile loses its
/// compare-and-set, and `decide` sees the record as it is now.
///
/// A write that failed may have landed all the same: its reply was lost (trouble), or a
/// replicated nats-server answered "wrong last sequence" to an update it stored while the
/// stream's leader changed (nats-server#7281; seen in tests/nats_cluster.rs's partition test).
/// When a later read finds exactly a value this update sent, that write landed and the update
/// ends `Written` with it. (Deciding again on it would take this writer's own write for another
/// writer's: an attempt's completed record for a newer attempt's, and its artifacts deleted.)
/// A value equal to one sent but written by another writer is the same value: written either way.
pub async fn update_patiently<T, R, ReadFut, WriteFut>(
    key: &str,
    held: Option<(T, u64)>,
    patience: Patience,
    read: impl FnMut() -> ReadFut,
    write: impl FnMut(T, u64) -> WriteFut,
    decide: impl FnMut(&T) -> Step<T, R>,
) -> Result<Updated<T, R>, CasError>
where
    T: Clone + PartialEq,
    ReadFut: Future<Output = Result<Option<(T, u64)>, StoreError>>,
    WriteFut: Future<Output = Result<u64, StoreError>>,
{
    run(key, held, patience, read, write, decide).await
}

/// The loop of both.
async fn run<T, R, ReadFut, WriteFut>(
    key: &str,
    mut held: Option<(T, u64)>,
    patience: Patience,
    mut read: impl FnMut() -> ReadFut,
    mut write: impl FnMut(T, u64) -> WriteFut,
    mut decide: impl FnMut(&T) -> Step<T, R>,
) -> Result<Updated<T, R>, CasError>
where
    T: Clone + PartialEq,
    ReadFut: Future<Output = Result<Option<(T, u64)>, StoreError>>,
    WriteFut: Future<Output = Result<u64, StoreError>>,
{
    let started = tokio::time::Instant::now();
    let (mut conflicts, mut troubles) = (0, 0);
    // Values sent whose write failed, with trouble or a conflict: each may have landed.
    let mut unsure: Vec<T> = vec![];
    // Waits out one more failure with trouble, or ends the update with it.
    let ride = |troubles: u32, e: StoreError| match patience.pause(troubles, started.elapsed()) {
        Some(pause) if e.is_transient() => {
            tracing::warn!(key, error = %e, failures = troubles, pause_ms = pause.as_millis() as u64, "compare-and-set failed (nats trouble); retrying");
            Ok(pause)
        }
        _ => Err(CasError::Store(e)),
    };
    loop {
        let (current, revision) = match held.take() {
            Some(value) => value,
            None => match read().await {
                Ok(Some(value)) => value,
                Ok(None) => return Err(CasError::Missing { key: key.to_string() }),
                Err(e) => {
                    troubles += 1;
                    tokio::time::sleep(ride(troubles, e)?).await;
                    continue;
                }
            },
        };
        // The value as sent: it may carry more than the stored part a read gives back.
        if let Some(sent) = unsure.iter().find(|sent| **sent == current) {
            return Ok(Updated::Written { value: sent.clone(), revision });
        }
        let next = match decide(&current) {
            Step::Stop(result) => return Ok(Updated::Stopped(result)),
            Step::Write(next) => next,
        };
        match write(next.clone(), revision).await {
            Ok(revision) => return Ok(Updated::Written { value: next, revision }),
            Err(StoreError::Conflict) => {
                unsure.push(next);
                conflicts += 1;
                if conflicts >= MAX_CAS_ROUNDS {
                    return Err(CasError::Contended { key: key.to_string(), rounds: MAX_CAS_ROUNDS });
                }
                tokio::time::sleep(pause(conflicts)).await;
            }
            Err(e) => {
                troubles += 1;
                let wait = ride(troubles, e)?;
                unsure.push(next);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The pause before round `round` (from 1), by [`CasContention::pause`] on this clock.
fn pause(round: usize) -> Duration {
    CasContention::pause(round, crate::now_ms())
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

    /// A record that meets NATS trouble as a script says, one entry per operation (read or
    /// write), then none: what a stream whose leader died does to a writer.
    #[derive(Clone, Copy)]
    enum Trouble {
        /// The write is applied, but its reply is lost (a timeout).
        LostReply,
        /// The write is refused (no responders): nothing applied.
        Refused,
        /// Another writer stores this value, then this write is refused.
        TakenOverWith(u32),
        /// A read fails (no leader yet).
        ReadFails,
        /// The write is applied, but its reply says the revision was wrong.
        LandedAsConflict,
    }

    struct Flaky {
        value: RefCell<(u32, u64)>,
        script: RefCell<std::collections::VecDeque<Trouble>>,
        writes: Cell<usize>,
    }

    impl Flaky {
        fn new(value: u32, script: &[Trouble]) -> Flaky {
            Flaky { value: RefCell::new((value, 1)), script: RefCell::new(script.iter().copied().collect()), writes: Cell::new(0) }
        }

        async fn read(&self) -> Result<Option<(u32, u64)>, StoreError> {
            if matches!(self.script.borrow().front(), Some(Trouble::ReadFails)) {
                self.script.borrow_mut().pop_front();
                return Err(StoreError::Nats("no stream found for given subject".into()));
            }
            Ok(Some(*self.value.borrow()))
        }

        async fn write(&self, next: u32, revision: u64) -> Result<u64, StoreError> {
            self.writes.set(self.writes.get() + 1);
            let trouble = self.script.borrow_mut().pop_front();
            let mut stored = self.value.borrow_mut();
            match trouble {
                Some(Trouble::Refused) => return Err(StoreError::Nats("no responders".into())),
                Some(Trouble::TakenOverWith(v)) => {
                    *stored = (v, stored.1 + 1);
                    return Err(StoreError::Nats("timed out".into()));
                }
                _ => {}
            }
            if stored.1 != revision {
                return Err(StoreError::Conflict);
            }
            *stored = (next, revision + 1);
            match trouble {
                Some(Trouble::LostReply) => Err(StoreError::Nats("timed out".into())),
                Some(Trouble::LandedAsConflict) => Err(StoreError::Conflict),
                _ => Ok(revision + 1),
            }
        }

        /// What an attempt's conclusion does: from 5 (running, owned) to 6 (its outcome);
        /// anything else means another writer owns the record now (fenced).
        async fn conclude(&self, patience: Patience) -> Result<Updated<u32, &'static str>, CasError> {
            let decide = |v: &u32| if *v == 5 { Step::Write(6) } else { Step::Stop("fenced") };
            update_patiently("k", Some((5, 1)), patience, || self.read(), |v, rev| self.write(v, rev), decide).await
        }
    }

    /// [`Patience::NATS_TROUBLE`]'s shape at a thousandth of its scale.
    const QUICK: Patience = Patience {
        backoff: crate::policy::Backoff { initial: Duration::from_micros(100), max: Duration::from_millis(2), multiplier: 2.0 },
        within: Duration::from_millis(30),
    };

    #[tokio::test]
    async fn trouble_is_ridden_out_until_the_write_lands() {
        let store = Flaky::new(5, &[Trouble::Refused, Trouble::ReadFails, Trouble::ReadFails, Trouble::Refused]);
        assert_eq!(store.conclude(QUICK).await.unwrap(), Updated::Written { value: 6, revision: 2 });
        assert_eq!(store.writes.get(), 3);
    }

    #[tokio::test]
    async fn a_write_that_landed_while_its_reply_was_lost_counts_as_written_not_as_fenced() {
        let store = Flaky::new(5, &[Trouble::LostReply, Trouble::ReadFails]);
        // The re-read finds 6: this update's own write, not another writer's.
        assert_eq!(store.conclude(QUICK).await.unwrap(), Updated::Written { value: 6, revision: 2 });
        assert_eq!(store.writes.get(), 1);
    }

    #[tokio::test]
    async fn a_write_that_landed_while_its_reply_said_conflict_counts_as_written() {
        let store = Flaky::new(5, &[Trouble::LandedAsConflict]);
        assert_eq!(store.conclude(QUICK).await.unwrap(), Updated::Written { value: 6, revision: 2 });
        assert_eq!(store.writes.get(), 1);
    }

    #[tokio::test]
    async fn a_write_retried_after_another_writer_took_over_is_fenced_and_overwrites_nothing() {
        let store = Flaky::new(5, &[Trouble::TakenOverWith(50), Trouble::Refused]);
        assert_eq!(store.conclude(QUICK).await.unwrap(), Updated::Stopped("fenced"));
        assert_eq!(*store.value.borrow(), (50, 2));
    }

    #[tokio::test]
    async fn trouble_past_the_patience_ends_the_update_and_once_means_once() {
        let endless = Flaky::new(5, &[Trouble::Refused; 1000]);
        assert!(matches!(endless.conclude(QUICK).await, Err(CasError::Store(StoreError::Nats(_)))));
        assert!(endless.writes.get() > 3, "{}", endless.writes.get());
        let once = Flaky::new(5, &[Trouble::Refused]);
        assert!(matches!(once.conclude(Patience::ONCE).await, Err(CasError::Store(StoreError::Nats(_)))));
        assert_eq!(once.writes.get(), 1);
    }
}
