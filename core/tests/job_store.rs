//! The job store's conformance: the same assertions against the in-memory store and against
//! the NATS one on a real nats-server (started per test), so that what the in-process tests of
//! the delivery learn on [`MemoryStore`] holds on NATS. See `kiln_core::store` for the promises.

use kiln_core::config::ClusterConfig;
use kiln_core::job::{JobRecord, JobState};
use kiln_core::nats::cas::{Step, Updated};
use kiln_core::nats::{resources, NatsServer, Resources, StoreError};
use kiln_core::policy::Patience;
use kiln_core::protocol::Event;
use kiln_core::store::{self, JobStore, MemoryStore};

fn config(url: &str) -> ClusterConfig {
    let mut c = ClusterConfig::from_toml("[[models]]\nname = \"m\"\nengine = { kind = \"noop\" }\n", "test").unwrap();
    c.nats.url = url.into();
    c
}

async fn nats() -> (NatsServer, Resources) {
    let server = NatsServer::start_temp().expect("nats-server: run scripts/setup.sh");
    let client = resources::connect(&kiln_core::config::NatsConfig::for_url(&server.url()), "test").await.unwrap();
    let res = Resources::ensure(client, &config(&server.url())).await.unwrap();
    (server, res)
}

fn record(id: &str) -> JobRecord {
    JobRecord::queued(id, "m", 3, 0)
}

/// Records: created once, read with their revision, written only by compare-and-set.
async fn records_are_fenced_by_their_revision(store: &dyn JobStore) {
    assert!(store.get_job("rec-1").await.unwrap().is_none(), "no record yet");
    let mut r = record("rec-1");
    let created = store.create_job(&r).await.unwrap();
    assert!(matches!(store.create_job(&r).await, Err(StoreError::AlreadyExists)), "create is once only");
    let read = store.get_job("rec-1").await.unwrap().unwrap();
    assert_eq!((read.record.clone(), read.revision), (r.clone(), created));

    r.state = JobState::Running;
    r.attempt = 1;
    let first = store.update_job(&r, created).await.unwrap();
    assert!(first > created, "revisions grow");
    r.attempt = 2;
    let second = store.update_job(&r, first).await.unwrap();
    // A writer holding an old revision is refused and changes nothing.
    let mut late = r.clone();
    late.attempt = 1;
    late.state = JobState::Completed;
    assert!(matches!(store.update_job(&late, first).await, Err(StoreError::Conflict)));
    let stored = store.get_job("rec-1").await.unwrap().unwrap();
    assert_eq!((stored.record.attempt, stored.record.state, stored.revision), (2, JobState::Running, second));
}

/// The compare-and-set update over the store decides again on the record as it is now when
/// the value it held is stale.
async fn an_update_from_a_stale_value_decides_again(store: &dyn JobStore) {
    let r = record("rec-2");
    let created = store.create_job(&r).await.unwrap();
    let held = store.get_job("rec-2").await.unwrap().unwrap();
    let mut other = r.clone();
    other.priority = 7;
    store.update_job(&other, created).await.unwrap();
    let updated = store::update_job_patiently(store, "rec-2", Some(held), Patience::ONCE, |current| {
        let mut next = current.clone();
        next.attempt += 1;
        Step::<_, ()>::Write(next)
    })
    .await
    .unwrap();
    let Updated::Written { value, revision } = updated else { panic!("written") };
    assert_eq!((value.priority, value.attempt), (7, 1), "applied on top of the other writer's change");
    assert_eq!(store.get_job("rec-2").await.unwrap().unwrap().revision, revision);
}

/// Events: stored in the order sent, sequences that grow, de-duplicated by their ids.
async fn events_are_ordered_and_deduplicated(store: &dyn JobStore) {
    assert!(store.last_event_with_seq("ev-1").await.unwrap().is_none());
    let events: Vec<Event> = (1..=3).map(|i| Event::message("ev-1", 1, format!("m{i}"))).collect();
    let mut acks = vec![];
    for (i, e) in events.iter().enumerate() {
        acks.push(store.publish_event_nowait(e, Some(&format!("ev-1-a1-e{i}"))).await.unwrap());
    }
    // Awaited in reverse: the order stored is the order sent.
    let mut seqs = vec![];
    for ack in acks.into_iter().rev() {
        seqs.push(ack.await.unwrap());
    }
    seqs.reverse();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let (last_seq, last) = store.last_event_with_seq("ev-1").await.unwrap().unwrap();
    assert_eq!((last_seq, last.message.as_deref()), (seqs[2], Some("m3")));

    // Published again with an id already stored: the first one's sequence, nothing new.
    let again = store.publish_event_stored(&events[0], Some("ev-1-a1-e0")).await.unwrap();
    assert_eq!(again, seqs[0]);
    assert_eq!(store.last_event_with_seq("ev-1").await.unwrap().unwrap().0, seqs[2]);

    // Another job's event comes later in the same stream.
    let other = store.publish_event_stored(&Event::message("ev-2", 1, "x".into()), None).await.unwrap();
    assert!(other > seqs[2]);
    assert_eq!(store.last_event_with_seq("ev-1").await.unwrap().unwrap().0, seqs[2], "per job");
}

/// `publish_event_after`: stored only while the job's last event is still the one named.
async fn an_event_after_a_sequence_is_fenced_on_the_last_event(store: &dyn JobStore) {
    let first = store.publish_event_stored(&Event::status("af-1", 1, JobState::Running), None).await.unwrap();
    let artifact = Event::message("af-1", 1, "after running".into());
    let stored = store.publish_event_after(&artifact, first).await.unwrap().expect("the last event is still `first`");
    assert!(stored > first);
    // Another event came in between: refused, nothing stored.
    assert_eq!(store.publish_event_after(&Event::message("af-1", 1, "late".into()), first).await.unwrap(), None);
    assert_eq!(store.last_event_with_seq("af-1").await.unwrap().unwrap().0, stored);
}

/// A job's end: its terminal event once in the history however often it is published; the
/// batch settle is a no-op for a job that is no batch item.
async fn a_jobs_end_is_stored_once(store: &dyn JobStore) {
    let mut r = record("end-1");
    store.publish_event_stored(&Event::status("end-1", 1, JobState::Running), None).await.unwrap();
    r.state = JobState::Completed;
    r.attempt = 1;
    let ending = Event::status("end-1", 1, JobState::Completed);
    store.publish_end(&ending, &r).await.unwrap();
    let (seq, last) = store.last_event_with_seq("end-1").await.unwrap().unwrap();
    assert!(last.is_terminal());
    store.publish_end(&ending, &r).await.unwrap();
    store.publish_finished(&r).await.unwrap();
    assert_eq!(store.last_event_with_seq("end-1").await.unwrap().unwrap().0, seq, "the ending is not stored twice");
    store.settle_batch_item(&r).await.unwrap();
}

async fn conforms(store: &dyn JobStore) {
    records_are_fenced_by_their_revision(store).await;
    an_update_from_a_stale_value_decides_again(store).await;
    events_are_ordered_and_deduplicated(store).await;
    an_event_after_a_sequence_is_fenced_on_the_last_event(store).await;
    a_jobs_end_is_stored_once(store).await;
}

#[tokio::test]
async fn the_memory_store_keeps_the_job_stores_promises() {
    let store = MemoryStore::new();
    conforms(&store).await;
    // What only the memory store can show: the feed took the end once.
    assert_eq!(store.feed().iter().filter(|r| r.job_id == "end-1").count(), 1);
}

#[tokio::test]
async fn the_nats_store_keeps_the_job_stores_promises() {
    let (_server, res) = nats().await;
    conforms(&res).await;
}
