//! The NATS layer against a real nats-server (2.11+): the record's compare-and-set fence,
//! create-once, queue de-duplication, and registry entries that expire on their own. And the
//! job store's conformance (`conforms`): the same assertions against the in-memory store and
//! the NATS one, so that what the in-process tests of the delivery learn on `MemoryStore`
//! holds on NATS (`kiln_core::store` lists the promises).

use std::time::{Duration, Instant};

use kiln_core::config::ClusterConfig;
use kiln_core::job::{JobRecord, JobState};
use kiln_core::nats::cas::{Step, Updated};
use kiln_core::nats::{resources, NatsServer, Resources, StoreError};
use kiln_core::policy::Patience;
use kiln_core::protocol::{Event, GpuEntry, GpuState, NodeEntry};
use kiln_core::store::{self, JobStore, MemoryStore};

fn config(url: &str) -> ClusterConfig {
    let mut c = ClusterConfig::from_toml("[[models]]\nname = \"m\"\nengine = { kind = \"noop\" }\n", "test").unwrap();
    c.nats.url = url.into();
    c.node.registry_ttl_ms = 1_000;
    c.node.heartbeat_ms = 200;
    c
}

async fn setup() -> (NatsServer, Resources) {
    let server = NatsServer::start_temp().expect("nats-server: run scripts/setup.sh");
    let client = resources::connect(&kiln_core::config::NatsConfig::for_url(&server.url()), "test").await.unwrap();
    let res = Resources::ensure(client, &config(&server.url())).await.unwrap();
    (server, res)
}

fn record(id: &str) -> JobRecord {
    JobRecord::queued(id, "m", 3, 0)
}

#[tokio::test]
async fn a_stale_attempt_cannot_overwrite_the_record() {
    let (_server, res) = setup().await;
    let mut r = record("job-1");
    let rev0 = res.create_job(&r).await.unwrap();
    assert!(matches!(res.create_job(&r).await, Err(StoreError::AlreadyExists)), "create is once only");

    // Attempt 1 claims; attempt 2 (after a redelivery) claims over it.
    r.state = JobState::Running;
    r.attempt = 1;
    let rev1 = res.update_job(&r, rev0).await.unwrap();
    r.attempt = 2;
    let rev2 = res.update_job(&r, rev1).await.unwrap();

    // Attempt 1 finishes late and tries to write its outcome with the revision it holds.
    let mut late = r.clone();
    late.attempt = 1;
    late.state = JobState::Completed;
    assert!(matches!(res.update_job(&late, rev1).await, Err(StoreError::Conflict)));
    let stored = res.get_job("job-1").await.unwrap().unwrap();
    assert_eq!((stored.record.attempt, stored.record.state, stored.revision), (2, JobState::Running, rev2));
}

#[tokio::test]
async fn the_queue_drops_a_second_publish_of_the_same_job() {
    let (_server, res) = setup().await;
    res.enqueue(&record("job-2")).await.unwrap();
    res.enqueue(&record("job-2")).await.unwrap();
    let mut high = record("job-3");
    high.priority = 5;
    res.enqueue(&high).await.unwrap();
    assert_eq!(res.queued_count("m").await.unwrap(), 2, "job-2 once, job-3 in the high lane");
    // A job with the fair-share key's label (`user_id` by default) goes to its key's queue,
    // which counts from its first job on (no node serves `m` here).
    let mut alice = record("job-4");
    alice.labels.insert("user_id".into(), "alice".into());
    res.enqueue(&alice).await.unwrap();
    res.enqueue(&alice).await.unwrap();
    assert_eq!(res.queued_count("m").await.unwrap(), 3);
    let normal = res.lane_figures("m", kiln_core::nats::Lane::Normal).await.unwrap();
    let keys: Vec<(Option<&str>, u64)> = normal.keys.iter().map(|k| (k.key.as_deref(), k.queued)).collect();
    assert_eq!(keys, [(None, 1), (Some("alice"), 1)]);
}

#[tokio::test]
async fn registry_entries_expire_on_their_own_and_the_readers_follow() {
    let (_server, res) = setup().await;
    let cache = res.registry_cache().await.unwrap();
    let gpu = |node: &str, slot: &str| GpuEntry {
        node: node.into(),
        slot: slot.into(),
        state: GpuState::Idle,
        models: vec!["m".into()],
        warm_models: vec![],
        current_job: None,
        restarts: 0,
        last_error: None,
        heartbeat_ms: kiln_core::now_ms(),
        group: vec![],
        memory_budget_bytes: 0,
        resident: vec![],
    };
    let node = NodeEntry {
        node: "n1".into(),
        version: "test".into(),
        slots: vec!["cpu:0".into()],
        started_ms: 1,
        heartbeat_ms: kiln_core::now_ms(),
        running_jobs: 0,
        peers: vec![],
        models: vec![],
    };
    res.put_node(&node).await.unwrap();
    for (n, s) in [("n1", "cpu:0"), ("n1", "cpu:1"), ("n10", "cpu:0"), ("n2", "cpu:0")] {
        res.put_gpu(&gpu(n, s)).await.unwrap();
    }
    // GPU entries are read from the server, all of them or one node's (not `n10`'s for `n1`).
    let all: Vec<(String, String)> = res.gpu_entries(None, false).await.unwrap().into_iter().map(|g| (g.node, g.slot)).collect();
    assert_eq!(all.len(), 4, "{all:?}");
    let of_n1: Vec<String> = res.gpu_entries(Some("n1"), false).await.unwrap().into_iter().map(|g| g.slot).collect();
    assert_eq!(of_n1, ["cpu:0", "cpu:1"]);
    assert!(res.gpu_entries(Some("n3"), true).await.unwrap().is_empty(), "a node with no entries reads as none, at once");
    let start = Instant::now();
    while cache.node("n1").is_none() {
        assert!(start.elapsed() < Duration::from_secs(2), "the watch delivers the node entry");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Nobody refreshes them: the server removes them after their 1 s TTL, and the watch sees
    // the delete marker. (Debian's 2.9 server ignores per-key TTL; this is why 2.11+ is pinned.)
    let raw_gone = async {
        loop {
            // Check the KV itself, not only the readers' heartbeat filter.
            let js = async_nats::jetstream::new(res.client.clone());
            let kv = js.get_key_value(res.names.nodes_bucket()).await.unwrap();
            if kv.get("n1").await.unwrap().is_none() && res.gpu_entries(None, true).await.unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), raw_gone).await.expect("the keys expired in the server");
    let start = Instant::now();
    while !cache.nodes_including_stale().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(2), "the watch sees the delete marker");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// nats-server 2.15 limits a stream that sets nothing to 1,000 consumers; every client that
/// follows events or downloads an object holds one for a while. Kiln's streams set their own.
#[tokio::test]
async fn more_than_a_thousand_clients_can_follow_events_at_once() {
    let (_server, res) = setup().await;
    for stream in ["KILN_EVENTS", "OBJ_kiln_files", "OBJ_kiln_results_m"] {
        let mut s = res.js.get_stream(stream).await.unwrap();
        assert_eq!(s.info().await.unwrap().config.max_consumers, resources::MAX_CONSUMERS_PER_STREAM, "{stream}");
    }
    let stream = res.js.get_stream("KILN_EVENTS").await.unwrap();
    let started = Instant::now();
    for i in 0..1_100 {
        let config = async_nats::jetstream::consumer::pull::Config {
            filter_subject: format!("kiln.events.job-{i}"),
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        };
        stream.create_consumer(config).await.unwrap_or_else(|e| panic!("consumer {i}: {e}"));
    }
    println!("1,100 consumers on KILN_EVENTS in {} ms", started.elapsed().as_millis());

    // The control: a stream that sets no limit refuses consumer 1,001.
    let control = res
        .js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "CONTROL".into(),
            subjects: vec!["control.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut refused_at = None;
    for i in 0..1_100 {
        let config = async_nats::jetstream::consumer::pull::Config {
            filter_subject: format!("control.{i}"),
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        };
        if control.create_consumer(config).await.is_err() {
            refused_at = Some(i);
            break;
        }
    }
    assert_eq!(refused_at, Some(1_000), "the server's default limit, which Kiln's streams must not have");
}

#[tokio::test]
async fn more_replicas_than_servers_is_refused_with_a_clear_error() {
    let server = NatsServer::start_temp().expect("nats-server: run scripts/setup.sh");
    let client = resources::connect(&kiln_core::config::NatsConfig::for_url(&server.url()), "test").await.unwrap();
    let mut c = config(&server.url());
    c.nats.replicas = 3;
    let error = Resources::ensure(client, &c).await.err().expect("one server cannot hold three replicas").to_string();
    assert!(error.contains("nats.replicas = 3") && error.contains("JetStream servers"), "{error}");
}

/// The leader's read (a stream message get) knows a deleted or purged record as gone, as a
/// KV read does: the markers are not records.
#[tokio::test]
async fn the_leaders_read_of_a_deleted_or_purged_record_is_none() {
    let (_server, res) = setup().await;
    for id in ["gone-1", "gone-2", "kept"] {
        res.create_job(&record(id)).await.unwrap();
    }
    let kv = res.js.get_key_value(res.names.jobs_bucket()).await.unwrap();
    kv.delete("gone-1").await.unwrap();
    kv.purge("gone-2").await.unwrap();
    for id in ["gone-1", "gone-2"] {
        assert!(res.get_job(id).await.unwrap().is_none(), "{id}: the KV read");
        assert!(res.get_job_latest(id).await.unwrap().is_none(), "{id}: the leader's read");
    }
    let kept = res.get_job_latest("kept").await.unwrap().expect("a record");
    assert_eq!(kept.record, record("kept"));
    assert_eq!(kept.revision, res.get_job("kept").await.unwrap().unwrap().revision);
}

// ---- the job store's conformance: the same assertions on both stores ----

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
    // The leader's read (on NATS: a stream message get, not a direct get) says the same.
    let latest = store.get_job_latest("rec-1").await.unwrap().unwrap();
    assert_eq!((latest.record, latest.revision), (stored.record, stored.revision));
    assert!(store.get_job_latest("rec-none").await.unwrap().is_none(), "no record: none");
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
    let (_server, res) = setup().await;
    conforms(&res).await;
}

/// Every live slot is in every read of the GPU entries, while their nodes rewrite them (each
/// heartbeat and each job): `models` once answered without a slot that was written 1 s before
/// and rewritten every 300 ms since (tests/models_cluster.rs in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_is_read_while_the_slots_are_rewritten() {
    let (_server, res) = setup().await;
    let gpu = |node: &str| GpuEntry {
        node: node.into(),
        slot: "cpu:0".into(),
        state: GpuState::Idle,
        models: vec!["m".into()],
        warm_models: vec![],
        current_job: None,
        restarts: 0,
        last_error: None,
        heartbeat_ms: kiln_core::now_ms(),
        group: vec![],
        memory_budget_bytes: 0,
        resident: vec![],
    };
    res.put_gpu(&gpu("a")).await.unwrap();
    res.put_gpu(&gpu("b")).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = vec![];
    for node in ["a", "b"] {
        let (res, stop) = (res.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                res.put_gpu(&gpu(node)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let mut short = vec![];
    for i in 0..500 {
        let read = res.gpu_entries(None, false).await.unwrap();
        if read.len() != 2 {
            short.push((i, read.iter().map(|g| g.node.clone()).collect::<Vec<_>>()));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(short.is_empty(), "reads that missed a slot (read number, nodes read): {short:?}");
}

/// A registry of more slots than one direct get answers (1,024) is read node by node.
#[tokio::test]
async fn a_registry_of_more_slots_than_one_read_answers_is_read_whole() {
    let (_server, res) = setup().await;
    let entry = |node: String, slot: String| GpuEntry {
        node,
        slot,
        state: GpuState::Idle,
        models: vec![],
        warm_models: vec![],
        current_job: None,
        restarts: 0,
        last_error: None,
        heartbeat_ms: kiln_core::now_ms(),
        group: vec![],
        memory_budget_bytes: 0,
        resident: vec![],
    };
    for n in 0..130 {
        let node = format!("n{n:03}");
        res.put_node(&NodeEntry {
            node: node.clone(),
            version: "test".into(),
            slots: vec![],
            started_ms: 1,
            heartbeat_ms: kiln_core::now_ms(),
            running_jobs: 0,
            peers: vec![],
            models: vec![],
        })
        .await
        .unwrap();
        for s in 0..8 {
            res.put_gpu(&entry(node.clone(), format!("cuda:{s}"))).await.unwrap();
        }
    }
    let all = res.gpu_entries(None, true).await.unwrap();
    assert_eq!(all.len(), 1_040);
    assert_eq!((all[0].node.as_str(), all[0].slot.as_str()), ("n000", "cuda:0"));
    assert_eq!(res.gpu_entries(Some("n129"), true).await.unwrap().len(), 8);
}
