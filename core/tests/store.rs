//! The NATS layer against a real nats-server (2.11+): the record's compare-and-set fence,
//! create-once, queue de-duplication, and registry entries that expire on their own.

use std::time::{Duration, Instant};

use kiln_core::config::ClusterConfig;
use kiln_core::job::{JobRecord, JobState};
use kiln_core::nats::{resources, NatsServer, Resources, StoreError};
use kiln_core::protocol::{GpuEntry, GpuState, NodeEntry};

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
    res.enqueue("job-2", "m", 0).await.unwrap();
    res.enqueue("job-2", "m", 0).await.unwrap();
    res.enqueue("job-3", "m", 5).await.unwrap();
    assert_eq!(res.queued_count("m").await.unwrap(), 2, "job-2 once, job-3 in the high lane");
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
