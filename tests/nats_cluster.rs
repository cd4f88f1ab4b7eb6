//! Kiln on a replicated NATS cluster: three real nats-servers on loopback (routes, JetStream,
//! a store each), `nats.replicas = 3`, nodes and clients given the servers' URLs.
//!
//! - three servers SIGKILLed in turn under load (the meta leader, the queue's leader, the
//!   results' leader): no job lost or run twice, every artifact intact;
//! - a server restarted with an empty disk catches up, and then carries the data alone with
//!   one other server;
//! - a server partitioned off: its own clients are refused, the majority's are served, and
//!   after the heal nothing is doubled or lost;
//! - one replica raised to three in place.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kiln::chaos::nats_cluster::{move_stream_leader, stream_leader, stream_names, ChaosNatsCluster};
use kiln::client::{Client, ClientError};
use kiln_core::config::NatsConfig;
use kiln_core::job::JobState;
use kiln_core::nats::NatsCluster;
use kiln_core::protocol::{ListJobsRequest, SubmitRequest};

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

/// A two-slot node on `url` (one server or several) with three replicas of everything and the
/// models in `models`.
fn node_config(url: &str, models: &str) -> String {
    config_toml(url, &["cpu:0", "cpu:1"], 10_000, models).replacen("ack_wait_ms = ", "replicas = 3\nack_wait_ms = ", 1)
}

/// The no-op model with an artifact of three object-store chunks (128 KiB each), so that a
/// result is spread over several messages of the results stream.
const BIG_NOOP_MODEL: &str = r#"
[[models]]
name = "noop"
engine = { kind = "noop", artifact_bytes = 300000 }
"#;

/// The stream holding the no-op model's results (the object store `kiln_results_noop`).
const RESULTS: &str = "OBJ_kiln_results_noop";

/// Waits until `nodes` have registered `slots` slots; if they do not, says what each node logged.
async fn wait_slots(client: &Client, nodes: &[NodeProcess], slots: usize) {
    let ok = eventually(Duration::from_secs(30), || async { client.cluster().await.is_ok_and(|c| c.gpus.len() == slots) }).await;
    if !ok {
        let logs: Vec<String> = nodes.iter().map(|n| format!("--- {}:\n{}", n.name, n.log_tail(15))).collect();
        panic!("the nodes did not register {slots} slots within 30 s; their logs:\n{}", logs.join("\n"));
    }
}

/// (when it was accepted, job id), in acceptance order across every client.
type Accepted = Arc<Mutex<Vec<(Instant, String)>>>;

/// Clients submitting no-op jobs at a steady pace, each its own connection, as careful clients
/// do: every submission has an idempotency key and is retried (same key) until it is accepted,
/// so a retry never makes a second job.
struct Load {
    accepted: Accepted,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` clients connected to `url`, each submitting every `every`.
    async fn start(url: &str, clients: usize, every: Duration, tag: &str) -> Load {
        let (accepted, stop): (Accepted, Arc<AtomicBool>) = Default::default();
        let mut tasks = vec![];
        for c in 0..clients {
            let client = Client::connect_with(&NatsConfig::for_url(url)).await.unwrap().with_timeout(Duration::from_secs(2));
            let (accepted, stop, tag) = (accepted.clone(), stop.clone(), tag.to_string());
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let request =
                        SubmitRequest { model: "noop".into(), idempotency_key: Some(format!("{tag}-{c}-{n}")), ..Default::default() };
                    // Until accepted: a refusal or a timeout during an election is retried.
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(reply) = client.submit(&request).await {
                            accepted.lock().unwrap().push((Instant::now(), reply.job_id));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    n += 1;
                    tokio::time::sleep(every).await;
                }
            }));
        }
        Load { accepted, stop, tasks }
    }

    fn accepted_since(&self, since: Instant) -> usize {
        self.accepted.lock().unwrap().iter().filter(|(at, _)| *at > since).count()
    }

    /// Stops every client (a submission in flight ends first); what was accepted.
    async fn stop(self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let accepted = self.accepted.lock().unwrap().clone();
        accepted
    }
}

/// The longest time without an accepted submission in `[from, to]`: a gap that began before
/// `from` counts from the last acceptance before it (what a client lived through), one still
/// open at `to` only up to `to` (what follows belongs to the next fault).
fn longest_gap(accepted: &[(Instant, String)], from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = accepted.iter().map(|(at, _)| *at).collect();
    times.sort();
    times.windows(2).filter(|w| w[1] > from && w[0] < to).map(|w| w[1].min(to) - w[0]).max().unwrap_or_default()
}

/// What the cluster says of an artifact that did not download: its metadata read from the
/// stream's leader (a download's metadata read is a direct get, which any replica may answer),
/// the stream's replicas, and whether downloads succeed over the next 20 s. Seen three times
/// after a partition healed ("object not found" for a completed job's result, for 20 s, while
/// the leader held metadata for it); turning direct gets off did not stop it, so the metadata
/// itself is printed now.
async fn why_not_downloadable(client: &Client, artifact: &kiln_core::protocol::Artifact, dest: &std::path::Path) -> String {
    use base64::Engine;
    let Ok(mut stream) = client.jetstream().get_stream(format!("OBJ_{}", artifact.bucket)).await else {
        return "its stream cannot be opened".into();
    };
    let key = base64::engine::general_purpose::URL_SAFE.encode(artifact.object.as_bytes());
    // The sequence and the whole info: a `deleted` marker, or another put's nuid and size, is a
    // writer's doing, not a replica's.
    let meta = stream
        .get_last_raw_message_by_subject(&format!("$O.{}.M.{key}", artifact.bucket))
        .await
        .map(|m| (m.sequence, String::from_utf8_lossy(&m.payload).into_owned()));
    let replicas = stream.info().await.map(|i| format!("{:?}", i.cluster)).unwrap_or_default();
    let mut later = vec![];
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        later.push(client.download(artifact, dest).await.is_ok());
    }
    format!("metadata from the leader: {meta:?}; replicas: {replicas}; downloads every 2 s after: {later:?}")
}

/// Every job completed exactly once (one `completed` event), and every artifact of it
/// downloads with its recorded sha256. Returns the jobs by attempt.
async fn assert_completed_once(client: &Client, ids: &[String], out: &std::path::Path) -> BTreeMap<u32, usize> {
    use futures::StreamExt;
    let checks = futures::stream::iter(ids.iter().cloned().map(|id| {
        let client = client.clone().with_timeout(Duration::from_secs(10));
        async move {
            let view = wait_terminal(&client, &id, Duration::from_secs(60)).await;
            assert_eq!(view.status, JobState::Completed, "{view:?}");
            let endings = statuses(&history(&client, &id).await).into_iter().filter(|s| s == "completed").count();
            assert_eq!(endings, 1, "job {id} completed exactly once");
            assert!(!view.artifacts.is_empty(), "job {id} has its artifact");
            for artifact in &view.artifacts {
                if let Err(e) = client.download(artifact, &out.join(&artifact.object)).await {
                    let why = why_not_downloadable(&client, artifact, &out.join(&artifact.object)).await;
                    panic!("job {id} ({view:?}): artifact {} does not download: {e}; {why}", artifact.object);
                }
            }
            view.attempt
        }
    }))
    .buffer_unordered(8)
    .collect::<Vec<u32>>()
    .await;
    let mut by_attempt = BTreeMap::new();
    for attempt in checks {
        *by_attempt.entry(attempt).or_insert(0) += 1;
    }
    by_attempt
}

/// The registry settles: exactly `nodes` up with two live slots each, none busy.
async fn assert_registry_converges(client: &Client, nodes: &[&str]) {
    let profile = kiln::chaos::Profile { slots_per_node: 2, nodes: nodes.len(), ..kiln::chaos::Profile::short() };
    let names: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    let problems = Arc::new(Mutex::new(vec![]));
    let converged = eventually(Duration::from_secs(30), || async {
        match client.cluster().await {
            Ok(c) => {
                let found = kiln::chaos::check::registry_problems(&c, &profile, &names);
                *problems.lock().unwrap() = found.clone();
                found.is_empty()
            }
            Err(e) => {
                *problems.lock().unwrap() = vec![e.to_string()];
                false
            }
        }
    })
    .await;
    assert!(converged, "the registry did not converge: {:?}", problems.lock().unwrap());
}

/// The servers that lead at least one stream now, with what they lead.
async fn leaderships(js: &async_nats::jetstream::Context) -> BTreeMap<String, Vec<String>> {
    let mut led: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stream in stream_names(js).await.unwrap_or_default() {
        if let Some(leader) = stream_leader(js, &stream).await {
            led.entry(leader).or_default().push(stream);
        }
    }
    led
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_killed_in_turn_under_load_lose_and_double_no_job() {
    let nats = ChaosNatsCluster::start(3, None, false).await.expect("nats-server (run scripts/setup.sh)");
    nats.wait_ready(Duration::from_secs(30)).await.unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<NodeProcess> = ["a", "b"].iter().map(|n| NodeProcess::spawn(dir.path(), n, &node_config(&url, NOOP_MODEL))).collect();
    let client = Client::connect_with(&NatsConfig::for_url(&url)).await.unwrap();
    wait_slots(&client, &nodes, 4).await;
    let js = client.jetstream().clone();
    for stream in ["KILN_JOBS", "KV_kiln_jobs", RESULTS] {
        assert_eq!(js.get_stream(stream).await.unwrap().info().await.unwrap().config.num_replicas, 3, "{stream} has three replicas");
    }
    let streams = stream_names(&js).await.unwrap();

    // Three clients, each submitting every 60 ms and retrying until accepted.
    let load = Load::start(&url, 3, Duration::from_millis(60), "kill").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL in turn: the meta leader, the queue's leader, the results' leader. Each is
    // restarted once submits flow again, and the next fault waits until it is current.
    let mut report = vec![];
    for what in ["the JetStream meta leader", "the leader of KILN_JOBS", "the leader of the results stream"] {
        let leader = match what {
            "the JetStream meta leader" => nats.meta_leader().await,
            "the leader of KILN_JOBS" => stream_leader(&js, "KILN_JOBS").await,
            _ => stream_leader(&js, RESULTS).await,
        };
        let leader = leader.unwrap_or_else(|| panic!("no {what}"));
        let victim = nats.index_of(&leader).unwrap();
        let held = leaderships(&js).await.remove(&leader).unwrap_or_default();
        let killed_at = Instant::now();
        nats.kill(victim).await;
        // Served again: ten submissions accepted after the kill.
        let resumed = eventually(Duration::from_secs(40), || async { load.accepted_since(killed_at) >= 10 }).await;
        assert!(resumed, "submits are accepted again within 40 s of killing {what} ({leader})");
        let resumed_after = killed_at.elapsed();
        nats.restart(victim).await.unwrap();
        let current = nats.wait_current(victim, &js, &streams, Duration::from_secs(60)).await.unwrap();
        report.push((what, leader, held, killed_at, Instant::now(), resumed_after, current));
        // Steady load again before the next fault.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let accepted = load.stop().await;

    eprintln!("{} jobs accepted from 3 clients", accepted.len());
    for (what, leader, held, killed_at, healed_at, resumed_after, current) in &report {
        let gap = longest_gap(&accepted, *killed_at, *healed_at);
        eprintln!(
            "SIGKILL of {what} ({leader}, leading {} streams: {held:?}): longest gap between accepted submits {gap:.2?}; \
             10 accepted {resumed_after:.2?} after the kill; restarted, current {current:.2?} later",
            held.len()
        );
        // nats-server elects after its RAFT election timeout (4 to 9 s in 2.15, not
        // configurable): under 3 s is out of Kiln's reach, so this bounds, not the goal.
        assert!(gap < Duration::from_secs(15), "submits stopped for {gap:?} after killing {what}");
    }
    let ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "no job id accepted twice");
    let by_attempt = assert_completed_once(&client, &ids, &dir.path().join("out")).await;
    eprintln!("jobs by attempt: {by_attempt:?}");
    assert_registry_converges(&client, &["a", "b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_with_an_empty_disk_catches_up_and_then_holds_everything() {
    let nats = ChaosNatsCluster::start(3, None, false).await.expect("nats-server (run scripts/setup.sh)");
    nats.wait_ready(Duration::from_secs(30)).await.unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<NodeProcess> =
        ["a", "b"].iter().map(|n| NodeProcess::spawn(dir.path(), n, &node_config(&url, BIG_NOOP_MODEL))).collect();
    let client = Client::connect_with(&NatsConfig::for_url(&url)).await.unwrap();
    wait_slots(&client, &nodes, 4).await;
    let js = client.jetstream().clone();

    // Results spread over many chunks: 20 jobs of three chunks each.
    let mut done = vec![];
    for _ in 0..20 {
        done.push(submit_retrying(&client, SubmitRequest { model: "noop".into(), ..Default::default() }).await);
    }
    for id in &done {
        assert_eq!(wait_terminal(&client, id, Duration::from_secs(30)).await.status, JobState::Completed);
    }
    let streams = stream_names(&js).await.unwrap();

    // The results' leader loses its disk: SIGKILL, its JetStream folder deleted, started again.
    let wiped_name = stream_leader(&js, RESULTS).await.expect("the results stream has a leader");
    let wiped = nats.index_of(&wiped_name).unwrap();
    nats.kill(wiped).await;
    nats.wipe(wiped).unwrap();
    let restarted_at = Instant::now();
    nats.restart(wiped).await.unwrap();
    let current = nats.wait_current(wiped, &js, &streams, Duration::from_secs(60)).await.unwrap();
    // What it holds, message for message, against another server's copy (the streams written
    // only by jobs are still now; the registry's change with every heartbeat).
    let other = (0..3).find(|&i| i != wiped).unwrap();
    let data_streams = ["KILN_JOBS", "KILN_EVENTS", "KV_kiln_jobs", "OBJ_kiln_files", RESULTS];
    let mut copies = vec![];
    for stream in data_streams {
        let (mine, theirs) = (nats.stream_state(wiped, stream).await.unwrap(), nats.stream_state(other, stream).await.unwrap());
        copies.push(format!("{stream}: {mine:?} vs {theirs:?}"));
        assert_eq!(mine, theirs, "{wiped_name} reported current but its {stream} (messages, last seq) differs from {}'s", nats.name(other));
    }
    eprintln!(
        "{wiped_name} (results leader) restarted with an empty disk: current {current:.2?} after the restart \
         ({:.2?} in all); its copies (messages, last seq) vs {}'s: {copies:?}",
        restarted_at.elapsed(),
        nats.name(other)
    );

    // Another server is lost: the rejoined one and the third must now hold everything.
    let second = (0..3).find(|&i| i != wiped && i != other).unwrap();
    nats.kill(second).await;
    // Following a job's events makes a consumer, which the meta leader places: if the server
    // killed led the meta group, nothing can follow until the two left elect one (4 to 9 s, a
    // second round after a split vote; once longer than the reads' 10 s timeout in the suite).
    let meta = eventually(Duration::from_secs(60), || async { nats.meta_leader().await.is_some_and(|l| l != nats.name(second)) }).await;
    assert!(meta, "no meta leader within 60 s of killing {}", nats.name(second));
    // Reads come from the streams' leaders: make the rejoined server lead every data stream,
    // so that what follows is served from what it caught up.
    for stream in data_streams {
        assert!(move_stream_leader(&js, client.nats(), stream, &wiped_name).await, "{wiped_name} did not take the lead of {stream}");
    }
    let by_attempt = assert_completed_once(&client, &done, &dir.path().join("old")).await;
    eprintln!(
        "after {} was killed too, with {wiped_name} leading: every old job and artifact read back ({by_attempt:?})",
        nats.name(second)
    );
    // And the cluster still takes new work.
    let mut fresh = vec![];
    for _ in 0..5 {
        fresh.push(submit_retrying(&client, SubmitRequest { model: "noop".into(), ..Default::default() }).await);
    }
    assert_completed_once(&client, &fresh, &dir.path().join("new")).await;
    assert_registry_converges(&client, &["a", "b"]).await;
}

/// One submission of a client that knows only one server: what it was told.
#[derive(Debug)]
struct Told {
    sent: Instant,
    answered: Instant,
    result: Result<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_server_refuses_its_clients_while_the_majority_serves_and_nothing_doubles() {
    let nats = ChaosNatsCluster::start(3, None, true).await.expect("nats-server (run scripts/setup.sh)");
    nats.wait_ready(Duration::from_secs(30)).await.unwrap();
    let (cut, majority) = (2, nats.urls_of(&[0, 1]));
    let minority = nats.urls_of(&[cut]);
    let dir = tempfile::tempdir().unwrap();
    // Nodes a and b on the majority's servers, node m on the server to be cut.
    let nodes = [
        NodeProcess::spawn(dir.path(), "a", &node_config(&majority, NOOP_MODEL)),
        NodeProcess::spawn(dir.path(), "b", &node_config(&majority, NOOP_MODEL)),
        NodeProcess::spawn(dir.path(), "m", &node_config(&minority, NOOP_MODEL)),
    ];
    let client = Client::connect_with(&NatsConfig::for_url(&majority)).await.unwrap();
    wait_slots(&client, &nodes, 6).await;
    let js = client.jetstream().clone();
    let streams = stream_names(&js).await.unwrap();
    // The hardest case: the queue's leader is the server cut off, with a node of its own.
    assert!(move_stream_leader(&js, client.nats(), "KILN_JOBS", nats.name(cut)).await, "the queue's leader did not move");

    let load = Load::start(&majority, 2, Duration::from_millis(60), "majority").await;
    // A client that knows only the server to be cut: a submission every 500 ms, each sent once
    // with its own key and waited for as long as a client waits by default (30 s), and what it
    // was told recorded.
    let alone = Client::connect_with(&NatsConfig::for_url(&minority)).await.unwrap();
    let told: Arc<Mutex<Vec<Told>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let lonely = {
        let (told, stop) = (told.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = tokio::task::JoinSet::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (alone, told) = (alone.clone(), told.clone());
                sent.spawn(async move {
                    let request = SubmitRequest { model: "noop".into(), idempotency_key: Some(format!("alone-{n}")), ..Default::default() };
                    let at = Instant::now();
                    let result = alone.submit(&request).await.map(|r| r.job_id).map_err(|e| match e {
                        ClientError::Api(e) => format!("refused: {}", e.code.as_str()),
                        other => other.to_string(),
                    });
                    told.lock().unwrap().push(Told { sent: at, answered: Instant::now(), result });
                });
                n += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            while sent.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut_at = Instant::now();
    nats.partition(cut).unwrap();
    // The cut is real: the server has no route left (gossip opened none around the proxies).
    let isolated = eventually(Duration::from_secs(5), || async { nats.routes(cut).await == Ok(0) }).await;
    let routes_cut: Vec<_> = [0, 1, cut].iter().map(|&i| (nats.name(i).to_string(), 0)).collect::<Vec<_>>();
    let mut routes_during = vec![];
    for (name, _) in routes_cut {
        routes_during.push((name.clone(), nats.routes(nats.index_of(&name).unwrap()).await));
    }
    assert!(isolated, "{} still has routes after the cut: {routes_during:?}", nats.name(cut));
    // The cut lasts 10 s, and longer if the majority has not yet been served ten times since it
    // began (at most 40 s): the majority is served once the queue's leader is re-elected on it,
    // one RAFT election of 4 to 9 s, or a second round after a split vote. Run alone that took
    // 6.2 to 8.4 s; in a fresh-clone CI run, with the suite's other tests beside it, longer than
    // a fixed 10 s cut, and the test failed on the cut's length, not on Kiln.
    // (Whether it was is asserted below, from what the clients were told.)
    eventually(Duration::from_secs(40), || async { load.accepted_since(cut_at) >= 10 }).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed())).await;
    let heal_at = Instant::now();
    nats.heal(cut);
    let routed = eventually(Duration::from_secs(30), || async { nats.routes(cut).await.is_ok_and(|r| r > 0) }).await;
    let routes_back = heal_at.elapsed();
    assert!(routed, "{} got no route back within 30 s of the heal", nats.name(cut));
    let healthy = eventually(Duration::from_secs(60), || nats.healthy(cut)).await;
    let healthy_after = heal_at.elapsed();
    assert!(healthy, "{} was not healthy 60 s after the heal", nats.name(cut));
    let current = nats.wait_current(cut, &js, &streams, Duration::from_secs(60)).await.unwrap();
    let current_at = Instant::now();
    // The lone client is served again once its server is back.
    let back =
        eventually(Duration::from_secs(30), || async { told.lock().unwrap().iter().any(|t| t.sent > current_at && t.result.is_ok()) })
            .await;
    stop.store(true, Ordering::Relaxed);
    lonely.await.unwrap();
    let accepted = load.stop().await;
    let told = std::mem::take(&mut *told.lock().unwrap());

    // Sent while its server was cut off: never accepted while the cut lasted. An answer that
    // came after the heal may be either (the node got through once the routes were back).
    let during: Vec<&Told> = told.iter().filter(|t| t.sent > cut_at && t.sent < heal_at).collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for t in &during {
        let when = if t.answered < heal_at { "during the cut" } else { "after the heal" };
        let what = match &t.result {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.chars().take(60).collect(),
        };
        *kinds.entry(format!("{what}, answered {when}")).or_insert(0) += 1;
    }
    let waits: Vec<Duration> = during.iter().map(|t| t.answered - t.sent).collect();
    let served_during = accepted.iter().filter(|(at, _)| *at > cut_at && *at < heal_at).count();
    let gap = longest_gap(&accepted, cut_at, heal_at);
    eprintln!(
        "{} (leading KILN_JOBS, with node m) cut off for {:.2?}: routes during the cut {routes_during:?}; after the heal: a route \
         back in {routes_back:.2?}, /healthz in {healthy_after:.2?}, every stream current {current:.2?} later",
        nats.name(cut),
        heal_at - cut_at,
    );
    eprintln!(
        "the lone client on it sent {} submits during the cut: {kinds:?}, answered in {:.2?} to {:.2?}; served again after: {back}; \
         the majority's two clients: {served_during} accepted during the cut, longest gap {gap:.2?}",
        during.len(),
        waits.iter().min().copied().unwrap_or_default(),
        waits.iter().max().copied().unwrap_or_default(),
    );
    assert!(!during.is_empty(), "the lone client sent nothing during the cut");
    assert!(
        during.iter().all(|t| t.answered >= heal_at || t.result.is_err()),
        "a submit to the cut-off server was accepted during the cut: {kinds:?}"
    );
    assert!(back, "the lone client was not served after the heal");
    assert!(served_during >= 10, "the majority was not served during the cut ({served_during} accepted)");
    // Two election rounds (9 s each) and a submit's JetStream timeout in the API (5 s).
    assert!(gap < Duration::from_secs(25), "the majority's submits stopped for {gap:?}");

    // Nothing doubled, nothing lost: every job a client was told was accepted completed once,
    // and no other job exists (a submit that was not accepted left no record behind).
    let mut ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    ids.extend(told.iter().filter_map(|t| t.result.clone().ok()));
    let by_attempt = assert_completed_once(&client, &ids, &dir.path().join("out")).await;
    eprintln!("{} jobs completed once each, by attempt: {by_attempt:?}", ids.len());
    let lister = client.clone().with_timeout(Duration::from_secs(30));
    let listed = lister.jobs(&ListJobsRequest { limit: Some(1000), ..Default::default() }).await.unwrap();
    let listed: BTreeSet<String> = listed.jobs.into_iter().map(|j| j.job_id).collect();
    let told_accepted: BTreeSet<String> = ids.iter().cloned().collect();
    assert!(listed.len() < 1000, "the listing was cut at its limit");
    assert_eq!(listed, told_accepted, "the jobs in the cluster are exactly those the clients were told were accepted");
    assert_registry_converges(&client, &["a", "b", "m"]).await;
}

/// The deterministic form of what the leader kills above found: a node's fetch whose pull
/// request the server never answers (the server died holding it) used to wait for ever, since
/// async-nats gives a fetch without `expires` no deadline. That model's puller on the node
/// then never pulled again, and the jobs behind it stayed queued (with the consumer's leader
/// SIGKILLed under load: 105 jobs queued, no pull request waiting, for minutes). Here the
/// single server is SIGSTOPped, so the idle puller's next fetch (within its 250 ms re-check)
/// is never read, then SIGKILLed and started again on its port and store.
/// While the results stream has no leader (its leader SIGKILLed; the others elect a new one
/// after nats-server's 4 to 9 s election timeout), a job's artifact cannot be stored. That is
/// NATS trouble, not the job's: it must not use up the job's attempts. (Found by the partition
/// test: a no-op job failed all three attempts within a second, `cannot store artifact
/// result.json: nats: no stream found for given subject`, and was dead-lettered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_finishing_while_the_results_stream_elects_a_leader_wait_for_it_instead_of_failing() {
    let nats = ChaosNatsCluster::start(3, None, false).await.expect("nats-server (run scripts/setup.sh)");
    nats.wait_ready(Duration::from_secs(30)).await.unwrap();
    let (victim, others) = (2, nats.urls_of(&[0, 1]));
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::spawn(dir.path(), "a", &node_config(&others, NOOP_MODEL));
    let client = Client::connect_with(&NatsConfig::for_url(&others)).await.unwrap().with_timeout(Duration::from_secs(3));
    wait_slots(&client, std::slice::from_ref(&node), 2).await;
    let first = submit_retrying(&client, SubmitRequest { model: "noop".into(), ..Default::default() }).await;
    assert_eq!(wait_terminal(&client, &first, Duration::from_secs(20)).await.status, JobState::Completed);

    // Only the results stream is led by the victim: the queue, the records and the events
    // keep their leaders, so what the kill takes away is storing artifacts alone.
    let js = client.jetstream().clone();
    for stream in stream_names(&js).await.unwrap() {
        let leader = if stream == "OBJ_kiln_results_noop" { nats.name(victim) } else { nats.name(0) };
        assert!(move_stream_leader(&js, client.nats(), &stream, leader).await, "{stream} did not move to {leader}");
    }
    nats.kill(victim).await;
    let killed = Instant::now();
    let mut ids = vec![];
    for i in 0..3 {
        let request = SubmitRequest { model: "noop".into(), idempotency_key: Some(format!("leaderless-{i}")), ..Default::default() };
        ids.push(submit_retrying(&client, request).await);
    }
    for id in &ids {
        let view = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!(view.status, JobState::Completed, "{view:?}");
        assert_eq!(view.attempt, 1, "waiting for the store is not a failed attempt: {view:?}");
    }
    println!("3 jobs submitted right after the results leader's SIGKILL completed, at attempt 1, {:?} after it", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_lost_with_its_server_does_not_stop_the_node_pulling() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, NOOP_MODEL);
    cluster.add_node("a", &config);
    cluster.wait_node_ready("a", 1).await;
    let client = cluster.client().await.with_timeout(Duration::from_secs(2));
    let first = submit_retrying(&client, SubmitRequest { model: "noop".into(), ..Default::default() }).await;
    assert_eq!(wait_terminal(&client, &first, Duration::from_secs(20)).await.status, JobState::Completed);

    let pid = cluster.server.pid().expect("the server runs");
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.server.kill();
    cluster.server.restart().expect("the server starts again");

    // Submitted once the node answers again (it reconnects within a second or two).
    let request = SubmitRequest { model: "noop".into(), idempotency_key: Some("after-the-kill".into()), ..Default::default() };
    let job: Arc<Mutex<Option<String>>> = Default::default();
    let answered = eventually(Duration::from_secs(20), || async {
        let reply = client.submit(&request).await.ok().map(|r| r.job_id);
        let answered = reply.is_some();
        *job.lock().unwrap() = reply;
        answered
    })
    .await;
    assert!(answered, "the node did not answer a submit within 20 s of the server's restart");
    let job = job.lock().unwrap().clone().expect("answered");
    let ran =
        eventually(Duration::from_secs(20), || async { client.status(&job).await.is_ok_and(|v| v.status == JobState::Completed) }).await;
    assert!(ran, "a job submitted after the restart did not run: the node's puller is stuck in a fetch nobody answers");
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
    let old = NodeProcess::spawn(dir.path(), "old", &one_replica);
    wait_slots(&client, std::slice::from_ref(&old), 1).await;
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

/// The no-op model holding its slot 3 s per job: long enough to kill a server while jobs run,
/// short enough that they end during the election that follows (4 to 9 s).
const SLOW_NOOP_MODEL: &str = r#"
[[models]]
name = "noop"
engine = { kind = "noop", work_ms = 3000 }
"#;

/// Two jobs running on one node when the server leading `stream` (and only it) is SIGKILLed,
/// so that they end while `stream` elects a new leader. Returns the cluster, the node, a
/// client, the jobs and when the kill was.
async fn jobs_ending_while_a_stream_elects(
    stream: &str,
    ack_wait_ms: u64,
    dir: &std::path::Path,
) -> (ChaosNatsCluster, NodeProcess, Client, Vec<String>, u64) {
    let nats = ChaosNatsCluster::start(3, None, false).await.expect("nats-server (run scripts/setup.sh)");
    nats.wait_ready(Duration::from_secs(30)).await.unwrap();
    let (victim, others) = (2, nats.urls_of(&[0, 1]));
    let config = node_config(&others, SLOW_NOOP_MODEL).replace("ack_wait_ms = 10000", &format!("ack_wait_ms = {ack_wait_ms}"));
    let node = NodeProcess::spawn(dir, "a", &config);
    let client = Client::connect_with(&NatsConfig::for_url(&others)).await.unwrap().with_timeout(Duration::from_secs(3));
    wait_slots(&client, std::slice::from_ref(&node), 2).await;
    let first = submit_retrying(&client, SubmitRequest { model: "noop".into(), ..Default::default() }).await;
    assert_eq!(wait_terminal(&client, &first, Duration::from_secs(30)).await.status, JobState::Completed);

    // Only `stream` is led by the victim: the queue, the events and everything else keep
    // their leaders, so what the kill takes away is `stream` alone.
    let js = client.jetstream().clone();
    for name in stream_names(&js).await.unwrap() {
        let leader = if name == stream { nats.name(victim) } else { nats.name(0) };
        assert!(move_stream_leader(&js, client.nats(), &name, leader).await, "{name} did not move to {leader}");
    }
    let mut ids = vec![];
    for i in 0..2 {
        let request = SubmitRequest { model: "noop".into(), idempotency_key: Some(format!("ending-{i}")), ..Default::default() };
        ids.push(submit_retrying(&client, request).await);
    }
    let running = eventually(Duration::from_secs(20), || async {
        let mut all = true;
        for id in &ids {
            all &= client.status(id).await.is_ok_and(|v| v.status == JobState::Running);
        }
        all
    })
    .await;
    assert!(running, "both jobs run before the kill");
    nats.kill(victim).await;
    let killed_ms = kiln_core::now_ms();
    (nats, node, client, ids, killed_ms)
}

/// While `KV_kiln_jobs` has no leader (its leader SIGKILLed), an attempt cannot write its
/// outcome. That is NATS trouble, not a reason to run the model again: the write rides out
/// the election (issue 23 item 5: `cannot write the outcome; leaving the job for redelivery
/// ... no stream found for given subject`, and the model ran a second time after the ack
/// wait, 2 jobs of 93 in a reproduction). Each job runs once: attempt 1, one `running` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_ending_while_the_job_records_elect_a_leader_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let (nats, node, client, ids, killed_ms) = jobs_ending_while_a_stream_elects("KV_kiln_jobs", 10_000, dir.path()).await;
    for id in &ids {
        let view = wait_terminal(&client, id, Duration::from_secs(90)).await;
        // Reading the history makes a consumer, which the meta leader places: the victim may
        // have led the meta group too.
        let meta = eventually(Duration::from_secs(60), || async { nats.meta_leader().await.is_some_and(|l| l != nats.name(2)) }).await;
        assert!(meta, "no meta leader within 60 s of the kill");
        let events = history(&client, id).await;
        assert_eq!(
            (view.status, view.attempt, statuses(&events)),
            (JobState::Completed, 1, vec!["queued".to_string(), "running".into(), "completed".into()]),
            "job {id} ran once, its outcome written through the election; the node's log:\n{}",
            node.log_tail(30)
        );
        println!(
            "job {id} completed {} ms after the KV_kiln_jobs leader's SIGKILL",
            view.finished_ms.unwrap_or(0).saturating_sub(killed_ms)
        );
    }
    let log = node.log();
    assert!(!log.contains("cannot write the outcome"), "{}", node.log_tail(30));
    // Its keep-alive ran through the conclusion and read the record it wrote (issue 23 item 8).
    assert!(!log.contains("stopping this one"), "{}", node.log_tail(30));
}

/// While `KILN_FINISHED` has no leader, a job's end cannot go out on the results feed. The
/// record is written by then, so nothing runs twice, but leaving the delivery for redelivery
/// made the feed (and any consumer of it) wait out the whole ack wait (issue 23 item 5:
/// `terminal event not stored`). The publish rides out the election instead: with a 60 s ack
/// wait, each job's feed entry is stored well within 40 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_ending_while_the_results_feed_elects_a_leader_reach_it_without_waiting_for_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, node, client, ids, killed_ms) = jobs_ending_while_a_stream_elects("KILN_FINISHED", 60_000, dir.path()).await;
    for id in &ids {
        let view = wait_terminal(&client, id, Duration::from_secs(30)).await;
        assert_eq!((view.status, view.attempt), (JobState::Completed, 1), "{view:?}");
    }
    // The feed's entries as stored, with the time the stream stored each.
    let js = client.jetstream().clone();
    let mut fed: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    let complete = loop {
        if let Ok(stream) = js.get_stream("KILN_FINISHED").await {
            let mut seq = 1;
            while let Ok(message) = stream.get_raw_message(seq).await {
                if let Ok(view) = serde_json::from_slice::<kiln_core::protocol::JobView>(&message.payload) {
                    fed.entry(view.job_id).or_insert((message.time.unix_timestamp_nanos() / 1_000_000) as u64);
                }
                seq += 1;
            }
        }
        if ids.iter().all(|id| fed.contains_key(id)) || started.elapsed() > Duration::from_secs(90) {
            break ids.iter().all(|id| fed.contains_key(id));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(complete, "every job's end is on the results feed: {fed:?}");
    for id in &ids {
        let after = fed[id].saturating_sub(killed_ms);
        println!("job {id}'s end stored on the results feed {after} ms after the KILN_FINISHED leader's SIGKILL");
        assert!(
            after < 40_000,
            "job {id} reached the feed {after} ms after the kill, not through redelivery; the log:\n{}",
            node.log_tail(30)
        );
    }
    assert!(!node.log().contains("terminal event not stored"), "{}", node.log_tail(30));
}

/// Issue 25: the shipped `cluster.toml` (url = "embedded"), `KILN_NATS_REPLICAS=3` from the
/// environment and the three servers' URLs from `--nats`: validated once, after every layer,
/// the node starts on the cluster with three replicas (it used to fail with "`nats.replicas`
/// must be 1 with the embedded server": the file and the environment were validated before
/// the flag applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_from_the_environment_and_urls_from_a_flag_start_a_node_on_the_shipped_config() {
    use std::io::BufRead;
    let nats = ChaosNatsCluster::start(3, None, false).await.expect("nats-server (run scripts/setup.sh)");
    nats.wait_ready(Duration::from_secs(30)).await.unwrap();
    let url = nats.url();
    let shipped = repo().join("cluster.toml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["node", "--config"])
        .arg(&shipped)
        .args(["--nats", &url, "--node-name", "layered", "--metrics-addr", ""])
        .env("KILN_NATS_REPLICAS", "3")
        .env("KILN_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first line on stdout is "kiln node ... up on ..."; a refused config exits at once
    // with nothing on stdout, its error on stderr.
    let stdout = child.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let up = line_rx.recv_timeout(Duration::from_secs(90));
    let up = match up {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("no \"kiln node ... up\" line; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
    };
    assert!(up.starts_with("kiln node layered up on "), "{up}");
    let client = Client::connect_with(&NatsConfig::for_url(&url)).await.unwrap();
    let jobs = client.jetstream().get_stream("KILN_JOBS").await.unwrap().info().await.unwrap().config.num_replicas;
    assert_eq!(jobs, 3, "KILN_NATS_REPLICAS applied");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(stopped.elapsed() < Duration::from_secs(60), "the node did not stop within 60 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "a SIGTERM is a drain, then exit 0: {status:?}");
}
