//! Several real `kiln node` processes on one nats-server: losing a node loses no job, and its
//! jobs come back at once (not after the ack wait).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use kiln_core::job::JobState;
use kiln_core::protocol::{ControlRequest, ErrorCode, EventKind, GpuState, SubmitRequest};

fn request(prompt: &str, p: serde_json::Value) -> SubmitRequest {
    prompt_request("demo", prompt, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_job_resumes_on_another_node_at_once_and_completes_once() {
    let mut cluster = TestCluster::new();
    // An ack wait of 30 s: only the hand-back can bring the job back within seconds.
    let one_slot = config_toml(&cluster.url(), &["cpu:0"], 30_000, &demo_model("demo", &[], 3, 60_000));
    let two_slots = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 30_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("doomed", &one_slot);
    cluster.wait_node_ready("doomed", 1).await;
    let client = cluster.client().await;
    let victim = client.submit(&request("victim", serde_json::json!({"steps": 40, "step_ms": 100}))).await.unwrap().job_id;
    assert!(eventually(Duration::from_secs(20), || async { client.status(&victim).await.unwrap().status == JobState::Running }).await);
    cluster.add_node("survivor", &two_slots);
    cluster.wait_node_ready("survivor", 2).await;
    assert_eq!(client.status(&victim).await.unwrap().node.as_deref(), Some("doomed"));
    // Let the doomed node's entry carry the job (it is written within 100 ms of the start).
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.nodes[0].signal(libc::SIGKILL);
    let killed = Instant::now();
    // A request the server routed to the dying node in its last milliseconds is lost: poll
    // with a short timeout and treat a lost request as "not yet", as a client would retry.
    let polling = client.clone().with_timeout(Duration::from_millis(500));
    let resumed = eventually(Duration::from_secs(15), || async {
        polling.status(&victim).await.is_ok_and(|v| v.attempt == 2 && v.node.as_deref() == Some("survivor"))
    })
    .await;
    let kill_to_resumed = killed.elapsed();
    assert!(resumed, "the job came back before the 30 s ack wait:\n{}", cluster.nodes[1].log());
    println!("kill to resumed on another node: {} ms (loss_after_ms 1000, ack_wait 30000)", kill_to_resumed.as_millis());
    assert!(kill_to_resumed < Duration::from_secs(5), "took {kill_to_resumed:?}");

    let view = wait_terminal(&client, &victim, Duration::from_secs(30)).await;
    assert_eq!((view.status, view.attempt), (JobState::Completed, 2));
    let events = history(&client, &victim).await;
    let completed = events.iter().filter(|e| e.kind == EventKind::Status && e.status == Some(JobState::Completed)).count();
    assert_eq!(completed, 1, "completed exactly once");

    // The lost node's GPU shows dead until its entry expires; the lost node is gone.
    let c = client.cluster().await.unwrap();
    assert!(c.nodes.iter().all(|n| n.node != "doomed"), "{c:#?}");
    assert!(c.gpus.iter().filter(|g| g.node == "doomed").all(|g| g.state == GpuState::Dead), "{c:#?}");
    assert!(cluster.nodes[1].log().contains("node lost; handing its jobs back"));
}

fn completed_once(events: &[kiln_core::protocol::Event]) -> bool {
    events.iter().filter(|e| e.kind == EventKind::Status && e.status.is_some_and(|s| s.is_terminal())).count() == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_join_share_the_jobs_and_see_one_registry() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    for name in ["n1", "n2", "n3"] {
        let joined = Instant::now();
        cluster.add_node(name, &config);
        cluster.wait_node_ready(name, 1).await;
        println!("{name} visible in the registry {} ms after its process started", joined.elapsed().as_millis());
        assert!(joined.elapsed() < Duration::from_secs(2), "joined within 2 s: {:?}", joined.elapsed());
    }
    let client = cluster.client().await;
    let mut ids = vec![];
    for i in 0..9 {
        ids.push(client.submit(&request(&format!("spread {i}"), serde_json::json!({"steps": 4, "step_ms": 100}))).await.unwrap().job_id);
    }
    let mut nodes = std::collections::BTreeSet::new();
    for id in &ids {
        let v = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!(v.status, JobState::Completed);
        nodes.insert(v.node.unwrap());
        assert!(completed_once(&history(&client, id).await));
    }
    assert_eq!(nodes.len(), 3, "jobs ran on every node: {nodes:?}");
    // Any node answers `cluster` (queue group); all give the same view of the registry, once
    // the slots' last `busy -> idle` writes are in (on a loaded machine they can trail the
    // jobs' ends by a heartbeat or two).
    let settled = Instant::now();
    loop {
        let views: Vec<Vec<(String, String, GpuState)>> = futures::future::join_all((0..12).map(|_| async {
            let c = client.cluster().await.unwrap();
            c.gpus.into_iter().map(|g| (g.node, g.slot, g.state)).collect()
        }))
        .await;
        let agree = views.iter().all(|v| v == &views[0] && v.len() == 3 && v.iter().all(|g| g.2 == GpuState::Idle));
        if agree {
            break;
        }
        assert!(settled.elapsed() < Duration::from_secs(10), "{views:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One actor cluster: any node opens a session with any other when it needs one, through
    // NATS alone.
    let meshed = cluster.wait_mesh(&["n1", "n2", "n3"], Duration::from_secs(10)).await;
    println!("sessions between all three opened in {} ms", meshed.as_millis());
    // Control reaches any node's actors from whichever node takes the request.
    for node in ["n1", "n2", "n3"] {
        for _ in 0..3 {
            let r = client.control(&ControlRequest::Ping { node: node.into() }).await.unwrap();
            assert_eq!((r.target.as_str(), r.outcome.as_str()), (node, "pong"), "{r:?}");
        }
    }
    // A remote actor call against plain NATS request/reply between the same two processes.
    let p = client.ping("n1", "n2", 500).await.unwrap();
    println!(
        "n1 -> n2, 500 each: actor call p50 {} us p99 {} us; NATS request p50 {} us p99 {} us; ratio p50 {:.2}x",
        p.actor_p50_us,
        p.actor_p99_us,
        p.nats_p50_us,
        p.nats_p99_us,
        p.actor_p50_us as f64 / p.nats_p50_us.max(1) as f64
    );
    assert!(p.actor_p50_us > 0 && p.nats_p50_us > 0 && p.actor_p50_us < 50_000, "{p:?}");

    // Cancel a job wherever it runs: a notice to the owner stops it at once (the record's
    // flag alone would take up to a third of the 10 s ack wait).
    for i in 0..3 {
        let id = client.submit(&request(&format!("long {i}"), serde_json::json!({"steps": 100, "step_ms": 100}))).await.unwrap().job_id;
        assert!(eventually(Duration::from_secs(20), || async { client.status(&id).await.unwrap().status == JobState::Running }).await);
        let asked = Instant::now();
        client.cancel(&id).await.unwrap();
        let v = wait_terminal(&client, &id, Duration::from_secs(20)).await;
        assert_eq!(v.status, JobState::Cancelled, "{v:?}");
        println!("cancel of a job on {} took {} ms", v.node.unwrap_or_default(), asked.elapsed().as_millis());
        assert!(asked.elapsed() < Duration::from_millis(2500), "stopped through the notice, not the flag: {:?}", asked.elapsed());
    }

    // Restart a GPU actor on another node; its supervisor counts it and the slot serves again.
    let r = client.control(&ControlRequest::RestartGpu { node: "n3".into(), slot: "cpu:0".into() }).await.unwrap();
    assert_eq!((r.target.as_str(), r.outcome.as_str()), ("n3/cpu:0", "restarting"), "{r:?}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            client.cluster().await.is_ok_and(|c| c.gpus.iter().any(|g| g.node == "n3" && g.restarts == 1 && g.state == GpuState::Idle))
        })
        .await
    );
    let unknown = client.control(&ControlRequest::RestartGpu { node: "n3".into(), slot: "cuda:7".into() }).await;
    assert!(matches!(&unknown, Err(kiln::client::ClientError::Api(e)) if e.code == ErrorCode::NotFound), "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_cookie_is_refused_by_its_peers() {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000));
    cluster.add_node("a", &config);
    cluster.add_node("b", &config);
    cluster.add_node_with_env("c", &config, &[("KILN_CLUSTER_COOKIE", "not-the-cluster-cookie")]);
    for n in ["a", "b", "c"] {
        cluster.wait_node_ready(n, 1).await;
    }
    cluster.wait_mesh(&["a", "b"], Duration::from_secs(10)).await;
    // a and b dial c when they need it (names sort first); c refuses both with a clear code,
    // and keeps refusing: the calls fail.
    let client = cluster.client().await;
    for from in ["a", "b"] {
        assert!(client.ping(from, "c", 1).await.is_err(), "{from} reached c's actors with another cookie");
    }
    assert!(eventually(Duration::from_secs(10), || async { cluster.nodes[2].log().matches("cookie_mismatch").count() >= 2 }).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = cluster.client().await.cluster().await.unwrap();
    for n in &c.nodes {
        let expected: &[&str] = match n.node.as_str() {
            "a" => &["b"],
            "b" => &["a"],
            _ => &[],
        };
        assert_eq!(n.peers, expected, "{n:?}");
    }
    assert!(cluster.nodes[0].log().contains("actor-cluster session refused by peer"), "{}", cluster.nodes[0].log());
}

/// Two nodes `a` and `b` with two slots each, and `n` demo jobs of `steps` x 100 ms submitted,
/// returned once a slot is busy.
async fn two_nodes_under_load(
    cluster: &mut TestCluster,
    ack_wait_ms: u64,
    max_attempts: u32,
    n: usize,
    steps: u32,
) -> (kiln::client::Client, Vec<String>) {
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1"], ack_wait_ms, &demo_model("demo", &[], max_attempts, 60_000));
    cluster.add_node("a", &config);
    cluster.add_node("b", &config);
    cluster.wait_node_ready("a", 2).await;
    cluster.wait_node_ready("b", 2).await;
    let client = cluster.client().await;
    let mut ids = vec![];
    for i in 0..n {
        ids.push(client.submit(&request(&format!("load {i}"), serde_json::json!({"steps": steps, "step_ms": 100}))).await.unwrap().job_id);
    }
    let busy = eventually(Duration::from_secs(20), || async {
        client.cluster().await.is_ok_and(|c| c.gpus.iter().any(|g| g.state == GpuState::Busy))
    })
    .await;
    assert!(busy, "jobs started");
    (client, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_under_load_loses_and_duplicates_nothing() {
    let mut cluster = TestCluster::new();
    let (client, ids) = two_nodes_under_load(&mut cluster, 10_000, 3, 16, 5).await;
    // The request reaches whichever node the queue group picks; it forwards it to a's control
    // actor through the actor cluster.
    cluster.wait_mesh(&["a", "b"], Duration::from_secs(10)).await;
    let reply = client.control(&ControlRequest::Drain { node: "a".into() }).await.unwrap();
    assert_eq!((reply.target.as_str(), reply.outcome.as_str()), ("a", "draining"), "{reply:?}");
    assert_eq!(cluster.nodes[0].wait_exit(Duration::from_secs(30)), Some(0), "clean exit:\n{}", cluster.nodes[0].log());
    let gone = client.control(&ControlRequest::Drain { node: "a".into() }).await;
    assert!(matches!(&gone, Err(kiln::client::ClientError::Api(e)) if e.code == ErrorCode::NotFound), "gone: {gone:?}");

    for id in &ids {
        let v = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!((v.status, v.attempt), (JobState::Completed, 1), "no job lost or retried: {v:?}");
        assert!(completed_once(&history(&client, id).await), "job {id} ended once");
    }
    let c = client.cluster().await.unwrap();
    assert!(c.nodes.iter().all(|n| n.node != "a") && c.gpus.iter().all(|g| g.node != "a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_under_load_loses_no_job() {
    let mut cluster = TestCluster::new();
    let (_, ids) = two_nodes_under_load(&mut cluster, 5_000, 5, 12, 6).await;

    // Stop the server (JetStream on disk) for a second, then start it again on the same port.
    cluster.server.restart().unwrap();
    let restarted = Instant::now();
    let client = cluster.client().await; // the test's own connection may have given up meanwhile
    for id in &ids {
        let v = wait_terminal(&client, id, Duration::from_secs(90)).await;
        assert_eq!(v.status, JobState::Completed, "{v:?}");
        assert!(completed_once(&history(&client, id).await), "job {id} ended once");
    }
    println!("all 12 jobs completed {} ms after the server came back", restarted.elapsed().as_millis());
    // Both nodes are back in the registry, their actor-cluster session re-formed, and they keep
    // serving.
    cluster.wait_node_ready("a", 2).await;
    cluster.wait_node_ready("b", 2).await;
    cluster.wait_mesh(&["a", "b"], Duration::from_secs(15)).await;
    for node in ["a", "b", "a", "b"] {
        let r = client.control(&ControlRequest::Ping { node: node.into() }).await.unwrap();
        assert_eq!(r.outcome, "pong", "actor calls work again: {r:?}");
    }
    println!("actor calls between the nodes work again {} ms after the server came back", restarted.elapsed().as_millis());
    let r = client.submit(&request("after", serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_is_replaced_rejoins_and_nothing_counts_twice() {
    let mut cluster = TestCluster::new();
    let proxy = LinkProxy::start(cluster.server.port()).await.unwrap();
    let models = demo_model("demo", &[], 5, 60_000);
    cluster.add_node("cut", &config_toml(&proxy.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("cut", 1).await;
    let client = cluster.client().await;
    let victim = client.submit(&request("cut off", serde_json::json!({"steps": 30, "step_ms": 100}))).await.unwrap().job_id;
    assert!(
        eventually(Duration::from_secs(20), || async { client.status(&victim).await.is_ok_and(|v| v.status == JobState::Running) }).await
    );
    cluster.add_node("steady", &config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &models));
    cluster.wait_node_ready("steady", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    proxy.cut();
    let others: Vec<String> = {
        let mut ids = vec![];
        for i in 0..6 {
            ids.push(submit_retrying(&client, request(&format!("during {i}"), serde_json::json!({"steps": 3, "step_ms": 100}))).await);
        }
        ids
    };
    // The steady node declares the cut one lost and takes its job over.
    let taken_over = eventually(Duration::from_secs(15), || async {
        client
            .clone()
            .with_timeout(Duration::from_millis(500))
            .status(&victim)
            .await
            .is_ok_and(|v| v.attempt >= 2 && v.node.as_deref() == Some("steady"))
    })
    .await;
    assert!(taken_over, "{}", cluster.nodes[1].log());
    // The cut node's worker ran on meanwhile; restore the link before its attempt could end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    cluster.wait_node_ready("cut", 1).await; // it rejoins under its own name
    cluster.wait_mesh(&["cut", "steady"], Duration::from_secs(15)).await; // and re-forms its session

    for id in others.iter().chain([&victim]) {
        let v = wait_terminal(&client, id, Duration::from_secs(60)).await;
        assert_eq!(v.status, JobState::Completed, "{v:?}");
        assert!(completed_once(&history(&client, id).await), "job {id} ended once");
    }
    // Whatever the cut node wrote for its stale attempt was fenced: the outcome is attempt 2's.
    let v = client.status(&victim).await.unwrap();
    assert_eq!((v.attempt, v.node.as_deref()), (2, Some("steady")), "{v:?}");
    // And it serves again.
    let r = client.submit(&request("after", serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap();
    assert_eq!(wait_terminal(&client, &r.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
}

/// Sessions open when a node needs one and close when idle, so a node's sessions follow what
/// it does, not the cluster's size (issue 12: a full mesh is n(n-1)/2 sessions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_sessions_open_on_demand_and_close_when_idle() {
    let mut cluster = TestCluster::new();
    let config = format!(
        "[cluster]\nidle_session_ms = 1500\nredial_ms = 200\n{}",
        config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000))
    );
    for n in ["a", "b", "c"] {
        cluster.add_node(n, &config);
    }
    for n in ["a", "b", "c"] {
        cluster.wait_node_ready(n, 1).await;
    }
    let client = cluster.client().await;
    let sessions = || async {
        let c = client.cluster().await.unwrap();
        c.nodes.into_iter().map(|n| (n.node, n.peers)).collect::<BTreeMap<String, Vec<String>>>()
    };
    // Nobody has called anybody: no session, whatever the registry lists.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sessions().await.values().all(|p| p.is_empty()), "{:?}", sessions().await);

    // c calls a (c sorts after a: it asks a to dial), and only that pair gets a session.
    let opened = Instant::now();
    let p = client.ping("c", "a", 1).await.expect("the call opens a session");
    println!("first call c -> a, session included, took {} ms (actor call p50 {} us)", opened.elapsed().as_millis(), p.actor_p50_us);
    let pair = |a: &str, b: &str, s: &BTreeMap<String, Vec<String>>| {
        s.get(a).is_some_and(|p| p == &[b.to_string()]) && s.get(b).is_some_and(|p| p == &[a.to_string()])
    };
    assert!(
        eventually(Duration::from_secs(5), || async { pair("a", "c", &sessions().await) && sessions().await["b"].is_empty() }).await,
        "{:?}",
        sessions().await
    );
    // Idle for idle_session_ms: both ends close it.
    let idle_from = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async { sessions().await.values().all(|p| p.is_empty()) }).await,
        "{:?}",
        sessions().await
    );
    println!("idle session closed {} ms after its last call", idle_from.elapsed().as_millis());
    // The next call opens a new one.
    client.ping("a", "c", 3).await.expect("a new session");
    assert!(eventually(Duration::from_secs(5), || async { pair("a", "c", &sessions().await) }).await, "{:?}", sessions().await);
}

/// A cancel taken by a node with no actor-cluster session with the job's owner (here the
/// owner has another cookie, so none can open; in the storm, the owner had just restarted)
/// still stops the job within a second: the owner takes cancel notices on core NATS. Before,
/// the API waited 5 s for a session, then left the job to the record's flag, which the owner
/// re-reads every third of the ack wait (10 s): a 3 s job completed instead of being cancelled
/// (issue 23 item 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_running_job_on_a_node_the_api_node_has_no_session_with() {
    let mut cluster = TestCluster::new();
    // The model runs on `cpu:1`, which only `c` has; the default ack wait of 30 s.
    let model = demo_model("demo", &["cpu:1"], 3, 60_000);
    cluster.add_node("a", &config_toml(&cluster.url(), &["cpu:0"], 30_000, &model));
    cluster.add_node_with_env(
        "c",
        &config_toml(&cluster.url(), &["cpu:1"], 30_000, &model),
        &[("KILN_CLUSTER_COOKIE", "not-the-cluster-cookie")],
    );
    cluster.wait_node_ready("a", 1).await;
    cluster.wait_node_ready("c", 1).await;
    let client = cluster.client().await;
    let (a, c) = (&cluster.nodes[0], &cluster.nodes[1]);
    // The worker starts on the first job: warm it, so each job below runs its 3 s at once.
    let warm = client.submit(&request("warm", serde_json::json!({"steps": 1, "step_ms": 1}))).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &warm, Duration::from_secs(30)).await.status, JobState::Completed);
    // Six: the API is a queue group, and a cancel that `c` takes itself stops the job locally.
    for i in 0..6 {
        let id =
            client.submit(&request(&format!("three seconds {i}"), serde_json::json!({"steps": 30, "step_ms": 100}))).await.unwrap().job_id;
        assert!(eventually(Duration::from_secs(20), || async { client.status(&id).await.unwrap().status == JobState::Running }).await);
        let asked = Instant::now();
        let reply = client.cancel(&id).await.unwrap();
        assert!(reply.cancel_requested || reply.status == JobState::Cancelled, "{reply:?}");
        let view = wait_terminal(&client, &id, Duration::from_secs(30)).await;
        let took = asked.elapsed();
        println!(
            "cancel of a job on {} (no actor-cluster session with the API node) took {} ms",
            view.node.as_deref().unwrap_or("?"),
            took.as_millis()
        );
        assert_eq!(
            (view.status, view.node.as_deref()),
            (JobState::Cancelled, Some("c")),
            "{view:?}; a:\n{}\nc:\n{}",
            a.log_tail(20),
            c.log_tail(20)
        );
        assert!(took < Duration::from_millis(1500), "the cancel took {took:?}: it waited for the record's flag");
    }
    // The API node never had a session with the owner: the notice did not need one.
    let view = client.cluster().await.unwrap();
    assert!(view.nodes.iter().all(|n| n.peers.is_empty()), "{:?}", view.nodes);
}

/// A peer of the previous wire version (1: bincode 2) asking a real node for a tunnel is
/// refused with `wire_version` and a message naming both versions; its bytes are not misread
/// as a version-2 (postcard) request, though its body alone would decode as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_the_old_wire_version_is_refused_with_a_clear_code() {
    use kiln_actors::wire::{self, OpenReply, RefusalCode, WIRE_VERSION};
    let mut cluster = TestCluster::new();
    cluster.add_node("a", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 1, 60_000)));
    cluster.wait_node_ready("a", 1).await;
    assert_eq!(WIRE_VERSION, 2);
    // Version 1's OpenRequest {session, dialer, acceptor, proof}, as bincode 2 wrote it.
    let mut v1 = vec![1u8];
    for s in ["old-session", "old-node", "a", "0123"] {
        v1.push(s.len() as u8);
        v1.extend_from_slice(s.as_bytes());
    }
    let nats = async_nats::connect(cluster.url()).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), nats.request("kiln.tunnel.open.a", v1.into())).await.unwrap().unwrap();
    match wire::decode::<OpenReply>(&reply.payload).unwrap() {
        OpenReply::Refused { code: RefusalCode::Version, message } => {
            assert_eq!(message, "a peer speaks wire version 1, this node 2")
        }
        other => panic!("a version-1 peer got {other:?}"),
    }
}
