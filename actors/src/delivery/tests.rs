//! The delivery's in-process tests: on the in-memory job store (`kiln_core::store::MemoryStore`),
//! with tokio's paused clock, the fence, the NAK ladder and cancel as the delivery's own
//! functions act on them. (The same paths against a real nats-server and real nodes:
//! tests/jobs.rs, tests/failures.rs, tests/reliability.rs, tests/nats_cluster.rs.)

use kiln_core::config::RetryPolicy;
use kiln_core::job::{CancelChange, FailureKind};
use kiln_core::store::{MemoryStore, Op};
use tokio::time::Instant as Clock;

use super::*;

#[test]
fn an_ended_job_found_again_republishes_its_feed_entry_and_its_ending_only_if_missing() {
    let ending = Event::status("j", 1, JobState::Completed);
    assert_eq!(end_to_republish(Some(&ending)), EndToRepublish::FeedOnly);
    for state in [JobState::Failed, JobState::Cancelled] {
        assert_eq!(end_to_republish(Some(&Event::status("j", 1, state))), EndToRepublish::FeedOnly);
    }
    // The crash came before the ending was stored: both go out.
    assert_eq!(end_to_republish(Some(&Event::status("j", 1, JobState::Running))), EndToRepublish::EndingAndFeed);
    assert_eq!(end_to_republish(Some(&Event::progress("j", 1, None, Some(0.5)))), EndToRepublish::EndingAndFeed);
    assert_eq!(end_to_republish(None), EndToRepublish::EndingAndFeed);
}

fn owner(node: &str) -> Owner {
    Owner { node: node.into(), slot: "gpu0".into() }
}

fn artifact(job_id: &str, attempt: u32, name: &str) -> Artifact {
    Artifact {
        name: name.into(),
        bucket: "kiln-results-m".into(),
        object: kiln_core::nats::objects::artifact_object(job_id, attempt, name),
        size: 1,
        content_type: "text/plain".into(),
        sha256: String::new(),
    }
}

fn failed(kind: FailureKind) -> Outcome {
    Outcome::Failed { error: ApiError::new(ErrorCode::EngineFailed, "the worker died"), kind }
}

async fn submit(store: &MemoryStore, job_id: &str) {
    store.create_job(&JobRecord::queued(job_id, "m", 3, kiln_core::now_ms())).await.unwrap();
}

/// A delivery's claim for `node`, as `claim` makes it: the attempt's record and revision.
async fn claim_for(store: &MemoryStore, job_id: &str, node: &str) -> Versioned {
    let first = store.get_job(job_id).await.unwrap().expect("a record");
    match claim_record(store, job_id, first, &owner(node), Patience::ONCE).await.unwrap() {
        Claimed::Written { record, revision, .. } if record.state == JobState::Running => Versioned { record: *record, revision },
        other => panic!("not claimed: {other:?}"),
    }
}

/// The attempt's conclusion write, as `conclude` makes it.
async fn conclude_as(store: &MemoryStore, held: &Versioned, outcome: &Outcome, cancel: &CancellationToken) -> WriteResult {
    let (attempt, owner) = (held.record.attempt, held.record.owner.clone().expect("owned"));
    let change = |r: &JobRecord| job::conclude(r, attempt, &owner, outcome, kiln_core::now_ms());
    write_as_owner(store, &held.record.job_id, held.clone(), attempt, cancel, change).await.expect("no store error")
}

/// The API's cancel, as its handler writes it (`job::request_cancel`, one try).
async fn api_cancel(store: &MemoryStore, job_id: &str) -> JobRecord {
    let changed = store::update_job_patiently(store, job_id, None, Patience::ONCE, |r| match job::request_cancel(r, kiln_core::now_ms()) {
        CancelChange::Unchanged => Step::Stop(()),
        CancelChange::Cancelled(next) | CancelChange::Requested(next) => Step::Write(next),
    })
    .await
    .unwrap();
    match changed {
        Updated::Written { value, .. } => value,
        Updated::Stopped(()) => panic!("the job had ended"),
    }
}

fn watch_for(held: &Versioned, cancel: &CancellationToken) -> AttemptWatch {
    AttemptWatch {
        job_id: held.record.job_id.clone(),
        attempt: held.record.attempt,
        owner: held.record.owner.clone().expect("owned"),
        cancel: cancel.clone(),
        fenced: Default::default(),
        concluding: Default::default(),
    }
}

// ---- fencing ----

#[tokio::test(start_paused = true)]
async fn fencing_a_stale_attempt_never_writes_its_outcome_over_a_newer_attempts() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let first = claim_for(&store, "j", "node-a").await;
    // node-a went silent; the job was redelivered to node-b, whose claim took it over.
    let second = claim_for(&store, "j", "node-b").await;
    assert_eq!(second.record.attempt, 2);
    for outcome in
        [Outcome::Completed { artifacts: vec![artifact("j", 1, "out.txt")] }, Outcome::Cancelled, failed(FailureKind::Infrastructure)]
    {
        let cancel = CancellationToken::new();
        assert!(matches!(conclude_as(&store, &first, &outcome, &cancel).await, WriteResult::Fenced), "{outcome:?}");
        assert!(!cancel.is_cancelled());
    }
    let stored = store.job("j").unwrap();
    assert_eq!((stored.record, stored.revision), (second.record.clone(), second.revision), "the newer attempt's record is untouched");
    // The newer attempt's own outcome lands.
    let cancel = CancellationToken::new();
    let written = conclude_as(&store, &second, &Outcome::Completed { artifacts: vec![] }, &cancel).await;
    assert!(matches!(written, WriteResult::Written(v) if v.record.state == JobState::Completed && v.record.attempt == 2));
}

#[tokio::test(start_paused = true)]
async fn fencing_the_keep_alive_stops_an_attempt_whose_job_was_taken_over_but_not_one_that_wrote_its_own_outcome() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let first = claim_for(&store, "j", "node-a").await;
    let cancel = CancellationToken::new();
    let watch = watch_for(&first, &cancel);
    assert_eq!(watch.look(&store, false).await, Looked::Running);
    assert!(!cancel.is_cancelled());
    claim_for(&store, "j", "node-b").await;
    assert_eq!(watch.look(&store, true).await, Looked::Superseded);
    assert!(cancel.is_cancelled() && watch.fenced.load(Ordering::Acquire));

    // The job's only attempt completed it while its keep-alive still runs: not a takeover.
    submit(&store, "k").await;
    let only = claim_for(&store, "k", "node-a").await;
    let cancel = CancellationToken::new();
    let watch = watch_for(&only, &cancel);
    watch.concluding.store(true, Ordering::Release);
    assert!(matches!(conclude_as(&store, &only, &Outcome::Completed { artifacts: vec![] }, &cancel).await, WriteResult::Written(_)));
    assert_eq!(watch.look(&store, false).await, Looked::Running);
    assert!(!cancel.is_cancelled() && !watch.fenced.load(Ordering::Acquire));
}

/// A claim whose write landed but whose reply was lost: the claim rides it out, its re-read
/// finds exactly the record it sent, and the attempt is this delivery's. (Given up at once,
/// the delivery was left for redelivery, whose claim took the landed claim for a lost attempt
/// and used a second one: a job of one attempt failed without having run.)
#[tokio::test(start_paused = true)]
async fn a_claim_whose_reply_was_lost_is_recognised_as_its_own() {
    let store = MemoryStore::new();
    store.create_job(&JobRecord::queued("j", "m", 1, kiln_core::now_ms())).await.unwrap();
    store.lose_next_reply(Op::UpdateJob);
    let first = store.get_job("j").await.unwrap().unwrap();
    let claimed = claim_record(&store, "j", first, &owner("node-a"), Patience::claim(Duration::from_secs(30))).await.unwrap();
    let Claimed::Written { record, .. } = claimed else { panic!("not claimed: {claimed:?}") };
    assert_eq!((record.state, record.attempt), (JobState::Running, 1));
    assert_eq!(store.job("j").unwrap().record, *record, "the landed claim is the one this delivery holds");
    // With no patience (as before), the same lost reply is an error: the delivery gave up.
    store.create_job(&JobRecord::queued("k", "m", 1, kiln_core::now_ms())).await.unwrap();
    store.lose_next_reply(Op::UpdateJob);
    let first = store.get_job("k").await.unwrap().unwrap();
    assert!(claim_record(&store, "k", first, &owner("node-a"), Patience::ONCE).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn fencing_an_outcome_write_whose_reply_was_lost_is_recognised_as_its_own() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let held = claim_for(&store, "j", "node-a").await;
    store.lose_next_reply(Op::UpdateJob);
    let started = Clock::now();
    let written = conclude_as(&store, &held, &Outcome::Completed { artifacts: vec![] }, &CancellationToken::new()).await;
    // Written, not fenced: the re-read after the first pause of the patience found this
    // attempt's own outcome.
    assert!(matches!(written, WriteResult::Written(v) if v.record.state == JobState::Completed), "a lost reply taken for a fence");
    assert_eq!(started.elapsed(), Patience::NATS_TROUBLE.backoff.initial);
    assert_eq!(store.job("j").unwrap().record.state, JobState::Completed);
}

/// A replicated nats-server answered "wrong last sequence" to an outcome write that it stored
/// (while the stream's leader changed): the attempt took its own completed record for a newer
/// attempt's, dropped the outcome and deleted the artifacts the record named (the partition
/// test in tests/nats_cluster.rs: a completed job whose result was "object not found").
#[tokio::test(start_paused = true)]
async fn fencing_an_outcome_write_stored_but_answered_as_a_conflict_is_recognised_as_its_own() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let held = claim_for(&store, "j", "node-a").await;
    store.land_next_as_conflict(Op::UpdateJob);
    let outcome = Outcome::Completed { artifacts: vec![artifact("j", 1, "result.json")] };
    let written = conclude_as(&store, &held, &outcome, &CancellationToken::new()).await;
    assert!(matches!(written, WriteResult::Written(v) if v.record.state == JobState::Completed), "its own outcome taken for a fence");
    assert_eq!(store.job("j").unwrap().record.artifacts.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn fencing_an_outcome_write_rides_out_trouble_for_the_patience_then_leaves_the_job_for_redelivery() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let held = claim_for(&store, "j", "node-a").await;
    // A leaderless bucket for some seconds: the write lands once it has a leader again.
    store.refuse_next(Op::UpdateJob, 5);
    let started = Clock::now();
    let written = conclude_as(&store, &held, &Outcome::Completed { artifacts: vec![] }, &CancellationToken::new()).await;
    assert!(matches!(written, WriteResult::Written(_)));
    assert_eq!(started.elapsed(), Duration::from_millis(100 + 200 + 400 + 800 + 1600));

    // For good: the write gives up within the patience, writing nothing (the delivery is
    // then left unacked, `DeliveryEnd::Abandoned`).
    submit(&store, "k").await;
    let held = claim_for(&store, "k", "node-a").await;
    store.refuse_next(Op::UpdateJob, 1_000);
    let started = Clock::now();
    let (attempt, owner) = (held.record.attempt, held.record.owner.clone().unwrap());
    let outcome = Outcome::Completed { artifacts: vec![] };
    let change = |r: &JobRecord| job::conclude(r, attempt, &owner, &outcome, kiln_core::now_ms());
    let gave_up = write_as_owner(&store, "k", held.clone(), attempt, &CancellationToken::new(), change).await;
    assert!(matches!(gave_up, Err(CasError::Store(_))));
    let waited = started.elapsed();
    assert!(waited > Duration::from_secs(9) && waited < Patience::NATS_TROUBLE.within, "{waited:?}");
    assert_eq!(store.job("k").unwrap().record, held.record);
}

#[tokio::test(start_paused = true)]
async fn fencing_a_fenced_attempt_announces_no_artifact_and_the_owner_announces_each_once() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let first = claim_for(&store, "j", "node-a").await;
    let own = store.publish_event_stored(&Event::status("j", 1, JobState::Running), Some("j-a1-e1")).await.unwrap();
    let second = claim_for(&store, "j", "node-b").await;
    let theirs = store.publish_event_stored(&Event::status("j", 2, JobState::Running), Some("j-a2-e1")).await.unwrap();
    let labels = first.record.labels.clone();
    // Attempt 1 chains onto its own last event: refused; re-read: attempt 2's follows it.
    let announced = announce_artifacts(&store, "j", 1, own, &labels, &[artifact("j", 1, "a.png")]).await.unwrap();
    assert!(!announced, "a fenced attempt announced an artifact");
    // Attempt 2's artifact events, one lost ack among them: each stored once, in order.
    store.lose_next_reply(Op::PublishEventAfter);
    let mine = [artifact("j", 2, "a.png"), artifact("j", 2, "b.png")];
    assert!(announce_artifacts(&store, "j", 2, theirs, &second.record.labels, &mine).await.unwrap());
    let history: Vec<(u32, Option<String>)> = store.events("j").into_iter().map(|e| (e.attempt, e.artifact.map(|a| a.object))).collect();
    assert_eq!(history, vec![(1, None), (2, None), (2, Some(mine[0].object.clone())), (2, Some(mine[1].object.clone()))]);

    // An ending in between fences even the job's owner (its conclusion then withdraws).
    store.publish_event_stored(&Event::status("j", 2, JobState::Completed), Some("j-terminal")).await.unwrap();
    assert!(!announce_artifacts(&store, "j", 2, 0, &second.record.labels, &[artifact("j", 2, "c.png")]).await.unwrap());
}

#[derive(Debug, Clone)]
enum Act {
    /// A delivery to node `n` claims the job.
    Claim(u8),
    /// The claim made `i`-th (modulo) concludes with outcome `o`.
    Conclude(usize, u8),
    /// A client cancels.
    Cancel,
}

fn step() -> impl proptest::strategy::Strategy<Value = Act> {
    use proptest::prelude::*;
    prop_oneof![(0u8..3).prop_map(Act::Claim), (0usize..8, 0u8..4).prop_map(|(i, o)| Act::Conclude(i, o)), Just(Act::Cancel)]
}

proptest::proptest! {
    /// Whatever the interleaving of claims, conclusions and cancels, an attempt's outcome
    /// is written exactly when that attempt owns the record at the time, and the record's
    /// attempt number never goes back.
    #[test]
    fn fencing_an_outcome_lands_only_from_the_attempt_that_owns_the_job(steps in proptest::collection::vec(step(), 1..24)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let store = MemoryStore::new();
            submit(&store, "j").await;
            let mut claims: Vec<Versioned> = vec![];
            let mut attempt = 0;
            for step in steps {
                let before = store.job("j").unwrap().record;
                match step {
                    Act::Claim(n) => {
                        let first = store.get_job("j").await.unwrap().unwrap();
                        if let Claimed::Written { record, revision, .. } = claim_record(&store, "j", first, &owner(&format!("node-{n}")), Patience::ONCE).await.unwrap() {
                            if record.state == JobState::Running {
                                claims.push(Versioned { record: *record, revision });
                            }
                        }
                    }
                    Act::Conclude(i, o) if !claims.is_empty() => {
                        let held = claims[i % claims.len()].clone();
                        let outcome = match o {
                            0 => Outcome::Completed { artifacts: vec![] },
                            1 => Outcome::Cancelled,
                            2 => failed(FailureKind::Infrastructure),
                            _ => failed(FailureKind::User),
                        };
                        let owns = job::owned_by(&before, held.record.attempt, held.record.owner.as_ref().unwrap());
                        let written = conclude_as(&store, &held, &outcome, &CancellationToken::new()).await;
                        match &written {
                            WriteResult::Written(v) if !owns => {
                                // Only when the record holds exactly what this write sends (this
                                // attempt's same outcome, concluded again within the millisecond):
                                // a write that landed, whatever its answer, is told apart from
                                // another's by its value alone.
                                proptest::prop_assert_eq!(&v.record, &before);
                            }
                            WriteResult::Written(_) => {}
                            WriteResult::Fenced => proptest::prop_assert!(!owns, "the owner was fenced"),
                        }
                        if !owns {
                            proptest::prop_assert_eq!(&store.job("j").unwrap().record, &before);
                        }
                    }
                    Act::Conclude(..) => {}
                    Act::Cancel => {
                        let _ = store::update_job_patiently(&store, "j", None, Patience::ONCE, |r| match job::request_cancel(r, 0) {
                            CancelChange::Unchanged => Step::Stop(()),
                            CancelChange::Cancelled(next) | CancelChange::Requested(next) => Step::Write(next),
                        })
                        .await;
                    }
                }
                let now = store.job("j").unwrap().record.attempt;
                proptest::prop_assert!(now >= attempt, "the attempt went back from {} to {}", attempt, now);
                attempt = now;
            }
            Ok(())
        })?;
    }
}

// ---- the NAK ladder ----

#[tokio::test(start_paused = true)]
async fn nak_ladder_a_first_delivery_waits_for_a_record_the_api_is_still_writing() {
    let store = Arc::new(MemoryStore::new());
    let writer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        submit(&writer, "j").await;
    });
    let started = Clock::now();
    let found = read_record_awaiting(&*store, "j", false).await.unwrap();
    assert!(found.is_some(), "a first delivery gave up on a record 20 ms late");
    // Re-read at 0, 0, 1, 3, 7, 15 and 31 ms: found at the first read after 20 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(31));

    // A record that never comes: 63 ms on a first delivery, one read on a redelivery.
    let started = Clock::now();
    assert!(read_record_awaiting(&*store, "none", false).await.unwrap().is_none());
    assert_eq!(started.elapsed(), RECORD_RACE_WAITS.iter().sum::<Duration>());
    let started = Clock::now();
    assert!(read_record_awaiting(&*store, "none", true).await.unwrap().is_none());
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// Delivers a queue message for `job_id` as JetStream would, by the NAK ladder, until a
/// delivery finds its record or drops it; returns each hand-back's delay and how it ended.
async fn deliver_until_settled(store: &MemoryStore, job_id: &str) -> (Vec<Duration>, AckKind) {
    let (ladder, enqueued) = (NakLadder::new(Backoff::from(&RetryPolicy::default())), Clock::now());
    let mut delays = vec![];
    for delivered in 1u32.. {
        if read_record_awaiting(store, job_id, delivered > 1).await.unwrap().is_some() {
            return (delays, AckKind::Ack);
        }
        match without_record_ack(&ladder, enqueued.elapsed(), delivered) {
            AckKind::Nak(Some(delay)) => {
                delays.push(delay);
                tokio::time::sleep(delay).await;
            }
            other => return (delays, other),
        }
    }
    unreachable!()
}

#[tokio::test(start_paused = true)]
async fn nak_ladder_a_message_without_a_record_comes_back_after_1_2_4_8_then_every_10_s_until_it_is_an_orphan() {
    let store = MemoryStore::new();
    let started = Clock::now();
    let (delays, end) = deliver_until_settled(&store, "orphan").await;
    let secs: Vec<u64> = delays.iter().map(|d| d.as_secs()).collect();
    assert_eq!(&secs[..6], &[1, 2, 4, 8, 10, 10]);
    assert!(secs[4..].iter().all(|&s| s == 10), "{secs:?}");
    assert!(matches!(end, AckKind::Term), "an orphan was not dropped");
    let waited = started.elapsed();
    assert!(waited > ORPHAN_AFTER && waited < ORPHAN_AFTER + Duration::from_secs(11), "{waited:?}");

    // A submission whose record comes 5 s late runs at the delivery after it (1 + 2 + 4 s).
    let store = Arc::new(MemoryStore::new());
    let writer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        submit(&writer, "late").await;
    });
    let started = Clock::now();
    let (delays, end) = deliver_until_settled(&store, "late").await;
    assert!(matches!(end, AckKind::Ack));
    assert_eq!(delays, [1, 2, 4].map(Duration::from_secs));
    assert!(started.elapsed() >= Duration::from_secs(7) && started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn nak_ladder_a_failed_attempt_is_handed_back_for_the_retry_backoff_and_the_next_says_why() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let ladder = NakLadder::new(Backoff::from(&RetryPolicy::default()));
    let mut delays = vec![];
    for attempt in 1..=3 {
        let held = claim_for(&store, "j", "node-a").await;
        assert_eq!(held.record.attempt, attempt);
        let written = conclude_as(&store, &held, &failed(FailureKind::Infrastructure), &CancellationToken::new()).await;
        let WriteResult::Written(v) = written else { panic!("fenced") };
        if v.record.state != JobState::Retrying {
            // The last attempt: dead letter, acked, no hand-back.
            assert_eq!((attempt, v.record.state, v.record.dead_letter), (3, JobState::Failed, true));
            break;
        }
        delays.push(ladder.delay(Nak::Retry { attempt }));
    }
    assert_eq!(delays, [500, 1_000].map(Duration::from_millis));
    // A user error is not retried at all.
    submit(&store, "u").await;
    let held = claim_for(&store, "u", "node-a").await;
    let WriteResult::Written(v) = conclude_as(&store, &held, &failed(FailureKind::User), &CancellationToken::new()).await else { panic!() };
    assert_eq!(v.record.state, JobState::Failed);
}

// ---- cancel ----

#[tokio::test(start_paused = true)]
async fn cancel_of_a_queued_job_ends_it_before_it_runs_and_its_delivery_only_publishes_what_is_missing() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let cancelled = api_cancel(&store, "j").await;
    assert_eq!((cancelled.state, cancelled.attempt), (JobState::Cancelled, 0));
    let ending = Event::status("j", 0, JobState::Cancelled);
    store.publish_end(&ending, &cancelled).await.unwrap();
    // The queue message is still there: its delivery claims nothing and finds the ending stored.
    let first = store.get_job("j").await.unwrap().unwrap();
    let Claimed::Ended(found) = claim_record(&store, "j", first, &owner("node-a"), Patience::ONCE).await.unwrap() else {
        panic!("a cancelled job was claimed")
    };
    assert_eq!(*found, cancelled);
    let last = store::last_event(&store, "j").await.unwrap();
    assert_eq!(end_to_republish(last.as_ref()), EndToRepublish::FeedOnly);

    // The API's publish of the ending failed: the delivery publishes it.
    submit(&store, "k").await;
    let cancelled = api_cancel(&store, "k").await;
    store.refuse_next(Op::PublishEvent, 1);
    store.refuse_next(Op::PublishFinished, 1);
    assert!(store.publish_end(&Event::status("k", 0, JobState::Cancelled), &cancelled).await.is_err());
    let first = store.get_job("k").await.unwrap().unwrap();
    assert!(matches!(claim_record(&store, "k", first, &owner("node-a"), Patience::ONCE).await.unwrap(), Claimed::Ended(_)));
    assert_eq!(end_to_republish(store::last_event(&store, "k").await.unwrap().as_ref()), EndToRepublish::EndingAndFeed);
}

#[tokio::test(start_paused = true)]
async fn cancel_of_a_job_waiting_to_retry_ends_it_and_a_cancel_landing_during_a_failure_stops_the_next_attempt() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let held = claim_for(&store, "j", "node-a").await;
    assert!(matches!(
        conclude_as(&store, &held, &failed(FailureKind::Infrastructure), &CancellationToken::new()).await,
        WriteResult::Written(_)
    ));
    assert_eq!(api_cancel(&store, "j").await.state, JobState::Cancelled);
    let first = store.get_job("j").await.unwrap().unwrap();
    assert!(matches!(claim_record(&store, "j", first, &owner("node-b"), Patience::ONCE).await.unwrap(), Claimed::Ended(_)));

    // The cancel lands while the attempt's failure is being written: the failure applies on
    // top of it (the write re-reads), the flag stays, and the token is cancelled.
    submit(&store, "k").await;
    let held = claim_for(&store, "k", "node-a").await;
    assert!(api_cancel(&store, "k").await.cancel_requested);
    let cancel = CancellationToken::new();
    let WriteResult::Written(v) = conclude_as(&store, &held, &failed(FailureKind::Infrastructure), &cancel).await else { panic!("fenced") };
    assert!(v.record.state == JobState::Retrying && v.record.cancel_requested && cancel.is_cancelled());
    // Its redelivery cancels the job instead of running it.
    let first = store.get_job("k").await.unwrap().unwrap();
    let Claimed::Written { record, .. } = claim_record(&store, "k", first, &owner("node-b"), Patience::ONCE).await.unwrap() else {
        panic!()
    };
    assert_eq!((record.state, record.attempt), (JobState::Cancelled, 1));
}

#[tokio::test(start_paused = true)]
async fn cancel_of_a_running_job_reaches_its_engine_by_the_keep_alive_and_ends_it_cancelled() {
    let store = MemoryStore::new();
    submit(&store, "j").await;
    let held = claim_for(&store, "j", "node-a").await;
    let requested = api_cancel(&store, "j").await;
    assert_eq!((requested.state, requested.cancel_requested), (JobState::Running, true));
    // Its core-NATS notice was lost: the keep-alive's next look at the record cancels.
    let cancel = CancellationToken::new();
    assert_eq!(watch_for(&held, &cancel).look(&store, false).await, Looked::Running);
    assert!(cancel.is_cancelled());
    // The engine stopped (`EngineError::Cancelled`): the attempt concludes cancelled, on
    // top of the flag it did not hold, which the ending settles.
    let WriteResult::Written(v) = conclude_as(&store, &held, &Outcome::Cancelled, &cancel).await else { panic!("fenced") };
    assert_eq!((v.record.state, v.record.attempt, v.record.cancel_requested), (JobState::Cancelled, 1, false));
    // A second cancel changes nothing.
    let unchanged = store::update_job_patiently(&store, "j", None, Patience::ONCE, |r| match job::request_cancel(r, 0) {
        CancelChange::Unchanged => Step::Stop(()),
        CancelChange::Cancelled(next) | CancelChange::Requested(next) => Step::Write(next),
    })
    .await
    .unwrap();
    assert!(matches!(unchanged, Updated::Stopped(())));
}

// ---- the attempt's events ----

#[tokio::test(start_paused = true)]
async fn events_an_event_whose_ack_was_lost_is_stored_once_and_one_refused_is_sent_again() {
    let last_seq = AtomicU64::new(0);
    // Stored, but its ack lost: sent again under the same id, de-duplicated.
    let running = Event::status("j", 1, JobState::Running);
    let troubled = MemoryStore::new();
    troubled.lose_next_reply(Op::PublishEvent);
    let troubled: Arc<dyn JobStore> = Arc::new(troubled);
    let ack = troubled.publish_event_nowait(&running, Some("j-a1-e1")).await.ok();
    ensure_stored(troubled.clone(), "j", PendingEvent { event: running.clone(), msg_id: "j-a1-e1".into(), ack }, &last_seq).await;
    let (seq, last) = troubled.last_event_with_seq("j").await.unwrap().unwrap();
    assert_eq!((seq, last.status), (1, Some(JobState::Running)));
    assert_eq!(last_seq.load(Ordering::Acquire), 1);
    let again = troubled.publish_event_stored(&Event::message("j", 1, "x".into()), None).await.unwrap();
    assert_eq!(again, 2, "the event was stored twice");

    // Refused for three tries, the first publish among them (a leaderless stream): stored after the pauses, once.
    let message = Event::message("j", 1, "stage done".into());
    let refused = MemoryStore::new();
    refused.refuse_next(Op::PublishEvent, 3);
    let refused: Arc<dyn JobStore> = Arc::new(refused);
    let ack = refused.publish_event_nowait(&message, Some("j-a1-e2")).await.ok();
    assert!(ack.is_none());
    let started = Clock::now();
    let last_seq = AtomicU64::new(0);
    ensure_stored(refused.clone(), "j", PendingEvent { event: message, msg_id: "j-a1-e2".into(), ack }, &last_seq).await;
    assert_eq!(started.elapsed(), Duration::from_millis(100 + 200));
    assert_eq!(refused.last_event_with_seq("j").await.unwrap().map(|(seq, _)| seq), Some(1));
    assert_eq!(last_seq.load(Ordering::Acquire), 1);
}
