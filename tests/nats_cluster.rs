//! Kiln on a replicated NATS cluster: three real nats-servers on loopback (routes, JetStream,
//! a store each), `nats.replicas = 3`, nodes and clients given every server's URL. Killing a
//! server under load loses no job and runs none twice.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kiln::client::Client;
use kiln_core::config::NatsConfig;
use kiln_core::job::JobState;
use kiln_core::nats::NatsCluster;
use kiln_core::protocol::SubmitRequest;

/// Waits until the cluster's JetStream has a meta leader and places a three-replica stream.
async fn wait_jetstream(url: &str) {
    let client = kiln_core::nats::resources::connect(&NatsConfig::for_url(url), "cluster-test").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let started = Instant::now();
    loop {
        let made = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "READY".into(),
                subjects: vec!["ready".into()],
                num_replicas: 3,
                ..Default::default()
            })
            .await;
        if made.is_ok() {
            let _ = js.delete_stream("READY").await;
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the cluster's JetStream did not come up: {made:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn node_config(url: &str) -> String {
    config_toml(url, &["cpu:0", "cpu:1"], 10_000, NOOP_MODEL).replacen("ack_wait_ms = ", "replicas = 3\nack_wait_ms = ", 1)
}

async fn wait_slots(client: &Client, slots: usize) {
    let ok = eventually(Duration::from_secs(30), || async { client.cluster().await.is_ok_and(|c| c.gpus.len() == slots) }).await;
    assert!(ok, "the nodes did not register {slots} slots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_queue_leader_under_load_loses_and_duplicates_no_job() {
    let mut nats = NatsCluster::start(3).expect("nats-server (run scripts/setup.sh)");
    let url = nats.url();
    wait_jetstream(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let _nodes: Vec<NodeProcess> = ["a", "b"].iter().map(|n| NodeProcess::spawn(dir.path(), n, &node_config(&url))).collect();
    let client = Client::connect_with(&NatsConfig::for_url(&url)).await.unwrap();
    wait_slots(&client, 4).await;

    // Every stream and bucket is replicated three ways.
    let js = async_nats::jetstream::new(client.nats().clone());
    let mut queue = js.get_stream("KILN_JOBS").await.unwrap();
    let info = queue.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3);
    let mut records = js.get_stream("KV_kiln_jobs").await.unwrap();
    assert_eq!(records.info().await.unwrap().config.num_replicas, 3);

    // A steady load: one submit every 20 ms, each retried until accepted.
    let accepted: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, accepted, stop) = (client.clone(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }),
                )
                .await;
                if let Ok(Ok(reply)) = reply {
                    accepted.lock().unwrap().push((Instant::now(), reply.job_id));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL the server leading the queue stream.
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("the queue stream has a leader");
    let victim: usize = leader.trim_start_matches('n').parse().unwrap();
    let killed_at = Instant::now();
    nats.servers[victim].kill();
    // Load on until 20 jobs were accepted after the kill (or 40 s pass, and the test fails).
    let resumed =
        eventually(Duration::from_secs(40), || async { accepted.lock().unwrap().iter().filter(|(at, _)| *at > killed_at).count() >= 20 })
            .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();

    let accepted = accepted.lock().unwrap().clone();
    let longest_gap = accepted.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default();
    let after_kill = accepted.iter().filter(|(at, _)| *at > killed_at).count();
    eprintln!(
        "killed {leader} (leader of KILN_JOBS); {} jobs accepted, {after_kill} after the kill; longest gap between accepted submits {longest_gap:?}",
        accepted.len()
    );
    assert!(resumed, "submits are accepted again after the kill ({after_kill} were)");
    let first_after = accepted.iter().find(|(at, _)| *at > killed_at).map(|(at, _)| *at - killed_at);
    eprintln!("first submit accepted {first_after:?} after the kill");

    let mut ends = BTreeMap::new();
    for (_, id) in &accepted {
        let view = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!(view.status, JobState::Completed, "{view:?}");
        let endings = statuses(&history(&client, id).await).into_iter().filter(|s| s == "completed").count();
        assert_eq!(endings, 1, "job {id} completed exactly once");
        for artifact in &view.artifacts {
            client.download(artifact, &dir.path().join("out").join(&artifact.object)).await.unwrap();
        }
        *ends.entry(view.attempt).or_insert(0) += 1;
    }
    eprintln!("jobs by attempt: {ends:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_replica_deployment_moves_to_three_replicas_with_nothing_lost() {
    let nats = NatsCluster::start(3).expect("nats-server (run scripts/setup.sh)");
    let url = nats.url();
    wait_jetstream(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect_with(&NatsConfig::for_url(&url)).await.unwrap();
    let noop = || SubmitRequest { model: "noop".into(), ..Default::default() };

    // A deployment made with one replica, one slot: jobs done, then one holding the slot for
    // 3 s and five waiting in the queue behind it.
    let hold = "[[models]]\nname = \"hold\"\nengine = { kind = \"noop\", work_ms = 3000 }\n";
    let one_replica = config_toml(&url, &["cpu:0"], 10_000, &format!("{NOOP_MODEL}{hold}"));
    let _old = NodeProcess::spawn(dir.path(), "old", &one_replica);
    wait_slots(&client, 1).await;
    let mut done = vec![];
    for _ in 0..5 {
        done.push(client.submit(&noop()).await.unwrap().job_id);
    }
    for id in &done {
        assert_eq!(wait_terminal(&client, id, Duration::from_secs(20)).await.status, JobState::Completed);
    }
    let holding = client.submit(&SubmitRequest { model: "hold".into(), ..Default::default() }).await.unwrap().job_id;
    assert!(eventually(Duration::from_secs(10), || async { client.status(&holding).await.unwrap().status == JobState::Running }).await);
    let mut waiting = vec![holding];
    for _ in 0..5 {
        waiting.push(client.submit(&noop()).await.unwrap().job_id);
    }
    let js = async_nats::jetstream::new(client.nats().clone());
    assert_eq!(js.get_stream("KILN_JOBS").await.unwrap().info().await.unwrap().config.num_replicas, 1);

    // A node with `replicas = 3` raises every stream, bucket and object store in place.
    let three = config_toml(&url, &["cpu:0", "cpu:1"], 10_000, &format!("{NOOP_MODEL}{hold}")).replacen(
        "ack_wait_ms = ",
        "replicas = 3\nack_wait_ms = ",
        1,
    );
    let _new = NodeProcess::spawn(dir.path(), "new", &three);
    for id in &waiting {
        assert_eq!(wait_terminal(&client, id, Duration::from_secs(30)).await.status, JobState::Completed, "the queued job ran");
    }
    for stream in ["KILN_JOBS", "KILN_EVENTS", "KV_kiln_jobs", "KV_kiln_gpus", "KV_kiln_nodes", "OBJ_kiln_files", "OBJ_kiln_results_noop"] {
        let replicas = js.get_stream(stream).await.unwrap().info().await.unwrap().config.num_replicas;
        assert_eq!(replicas, 3, "{stream} has three replicas now");
    }
    for id in done.iter().chain(&waiting) {
        let view = client.status(id).await.unwrap();
        let events = history(&client, id).await;
        for retry in events.iter().filter(|e| e.status == Some(JobState::Retrying)) {
            eprintln!("job {id} was retried while the streams moved: {:?}", retry.message);
        }
        let statuses = statuses(&events);
        assert_eq!(statuses.first().map(String::as_str), Some("queued"), "{id}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|s| *s == "completed").count(), 1, "{id} completed exactly once: {statuses:?}");
        assert_eq!(statuses.last().map(String::as_str), Some("completed"), "{id}: {statuses:?}");
        for artifact in &view.artifacts {
            client.download(artifact, &dir.path().join("out").join(&artifact.object)).await.unwrap();
        }
    }
}
