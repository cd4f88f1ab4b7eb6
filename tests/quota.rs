//! Quotas per fair-share key (issue 26 item 2, `[quota]`), against a real nats-server, node and
//! gateway: a user over `max_queued` is refused `quota_exceeded` at once (the time of a refusal
//! is measured and printed) while another user's jobs are accepted and run; `max_running` holds
//! a user's jobs running at once; `submits_per_s` refuses a burst past the bucket with the exact
//! wait; the gateway answers 429 with `Retry-After`. Nothing refused leaves a record.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln::client::{Client, ClientError};
use kiln_core::job::JobState;
use kiln_core::protocol::{BatchItemRequest, BatchSubmitRequest, ErrorCode, JobView, ListJobsRequest, SubmitRequest};

fn noop_model(work_ms: u64) -> String {
    format!("[[models]]\nname = \"noop\"\nengine = {{ kind = \"noop\", work_ms = {work_ms} }}\n")
}

fn job_of(user: &str) -> SubmitRequest {
    SubmitRequest { model: "noop".into(), labels: [("user_id".to_string(), user.to_string())].into(), ..Default::default() }
}

/// One node with `slots` slots serving the no-op model (`work_ms`), with `quota` (TOML).
async fn start(slots: usize, work_ms: u64, quota: &str) -> (TestCluster, Client, String) {
    let mut cluster = TestCluster::new();
    let names: Vec<String> = (0..slots).map(|i| format!("cpu:{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let config = config_toml(&cluster.url(), &names, 30_000, &format!("{quota}\n{}", noop_model(work_ms)));
    cluster.add_node("n", &config);
    cluster.wait_node_ready("n", slots).await;
    let client = cluster.client().await;
    (cluster, client, config)
}

/// The `quota_exceeded` error of a refused request (anything else fails the test).
fn quota_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> kiln_core::protocol::ApiError {
    match r {
        Err(ClientError::Api(e)) if e.code == ErrorCode::QuotaExceeded => e,
        other => panic!("expected quota_exceeded, got {other:?}"),
    }
}

/// Every job (up to 1000) carrying `user_id = user`.
async fn jobs_of(client: &Client, user: &str) -> Vec<JobView> {
    let req = ListJobsRequest { labels: [("user_id".to_string(), user.to_string())].into(), limit: Some(1000), ..Default::default() };
    client.jobs(&req).await.expect("jobs").jobs
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_max_queued_is_refused_at_once_while_another_keeps_running() {
    // A runs one job at a time (its own max_running), so its jobs stay queued for seconds.
    let quota = "[quota]\nmax_queued = 5\n[quota.keys.A]\nmax_running = 1\n";
    let (_cluster, client, _) = start(2, 1000, quota).await;

    // A fills its quota, one submit after another: 5 queued (and at most 1 running).
    let mut accepted_a = vec![];
    let first_refusal = loop {
        match client.submit(&job_of("A")).await {
            Ok(reply) => accepted_a.push(reply.job_id),
            Err(e) => break quota_error::<()>(Err(e)),
        }
        assert!(accepted_a.len() <= 7, "A got past its quota: {} accepted", accepted_a.len());
    };
    assert!(accepted_a.len() >= 5, "A was refused before 5 queued: {}", accepted_a.len());
    // No run time of the model known yet: the fixed second.
    assert_eq!(first_refusal.retry_after_ms, Some(1000), "{first_refusal:?}");
    assert!(
        first_refusal.message.contains("\"A\"") && first_refusal.message.contains("at most 5"),
        "names the key and the limit: {}",
        first_refusal.message
    );

    // While A is over its quota: its submits are refused at once, B's accepted.
    let mut refusals = vec![];
    let mut accepted_b = vec![];
    for i in 0..50 {
        let started = Instant::now();
        match client.submit(&job_of("A")).await {
            // One of A's jobs started meanwhile and freed a place (a slow machine).
            Ok(reply) => accepted_a.push(reply.job_id),
            Err(e) => {
                refusals.push(started.elapsed());
                let e = quota_error::<()>(Err(e));
                assert!(e.retry_after_ms.is_some_and(|ms| (10..=60_000).contains(&ms)), "{e:?}");
            }
        }
        if i % 10 == 0 {
            accepted_b.push(client.submit(&job_of("B")).await.expect("B is under its quota").job_id);
        }
    }
    refusals.sort();
    let (p50, max) = (percentile(&refusals, 0.5), *refusals.last().unwrap());
    println!(
        "max_queued refusal over NATS (client round trip), 50 refusals: p50 {p50:?}, p90 {:?}, max {max:?}",
        percentile(&refusals, 0.9)
    );
    assert!(refusals.len() >= 40, "A stayed over its quota: {} refusals of 50", refusals.len());
    assert!(p50 < Duration::from_millis(50), "a refusal must be quick: p50 {p50:?}");

    // Once some of the model's jobs have finished, the wait is estimated from their run time
    // (1 s jobs, A running 1: about half a run), not the fixed second.
    let start = Instant::now();
    let estimated = loop {
        match client.submit(&job_of("A")).await {
            Ok(reply) => accepted_a.push(reply.job_id), // a place freed meanwhile
            Err(e) => {
                let ms = quota_error::<()>(Err(e)).retry_after_ms.unwrap();
                if ms < 1000 {
                    break ms;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "retry_after_ms never followed the model's run time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("max_queued retry_after_ms estimated from the model's recent run time (1 s jobs, 1 running): {estimated} ms");
    assert!((300..1000).contains(&estimated), "{estimated} ms");

    // A batch whose items would take C past its quota is refused whole: no job made.
    let items = |n: usize| (0..n).map(|_| BatchItemRequest::default()).collect::<Vec<_>>();
    let batch = |n: usize| BatchSubmitRequest {
        model: "noop".into(),
        items: items(n),
        labels: [("user_id".to_string(), "C".to_string())].into(),
        ..Default::default()
    };
    let e = quota_error(client.submit_batch(&batch(6)).await);
    assert!(e.message.contains("\"C\"") && e.message.contains("adds 6"), "{}", e.message);
    assert!(jobs_of(&client, "C").await.is_empty(), "a refused batch makes no job");
    let ok = client.submit_batch(&batch(5)).await.expect("5 items fit C's quota");
    assert_eq!(ok.items.len(), 5);

    // B's jobs run (the other slot), nothing refused left a record.
    for id in &accepted_b {
        assert_eq!(wait_terminal(&client, id, Duration::from_secs(60)).await.status, JobState::Completed);
    }
    let listed: std::collections::BTreeSet<String> = jobs_of(&client, "A").await.into_iter().map(|v| v.job_id).collect();
    assert_eq!(listed, accepted_a.iter().cloned().collect(), "A's records are exactly its accepted jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_running_holds_a_users_jobs_running_at_once_while_another_uses_the_other_slots() {
    // A's fair share alone would be 3 of the 4 slots (weight 3 to B's 1): its quota holds it
    // to 2, and B gets the other 2.
    let quota = "[fair_share.weights]\nA = 3\n[quota.keys.A]\nmax_running = 2\n";
    let (cluster, client, _) = start(4, 300, quota).await;
    let mut ids = vec![];
    for _ in 0..12 {
        ids.push(("A", client.submit(&job_of("A")).await.expect("A").job_id));
        ids.push(("B", client.submit(&job_of("B")).await.expect("B").job_id));
    }
    // A's last job waits for its quota while A runs 2, and its status says so.
    let last_a = ids[ids.len() - 2].1.clone();
    let says = eventually(Duration::from_secs(10), || async {
        client.status(&last_a).await.is_ok_and(|v| v.pending.is_some_and(|p| p.reason == kiln_core::protocol::PendingReason::Quota))
    })
    .await;
    assert!(says, "A's waiting job does not say it waits for its quota: {:?}", client.status(&last_a).await);
    let mut intervals: std::collections::BTreeMap<&str, Vec<(u64, u64)>> = Default::default();
    for (user, id) in &ids {
        let v = wait_terminal(&client, id, Duration::from_secs(120)).await;
        assert_eq!(v.status, JobState::Completed, "{v:?}");
        let run = (v.started_ms.expect("started"), v.finished_ms.expect("finished"));
        intervals.entry(user).or_default().push(run);
        intervals.entry("all").or_default().push(run);
    }
    // At each start, how many of the runs cover that moment.
    let most_at_once =
        |runs: &[(u64, u64)]| runs.iter().map(|(s, _)| runs.iter().filter(|(s2, f2)| s2 <= s && s < f2).count()).max().unwrap_or(0);
    let (a, b, all) = (most_at_once(&intervals["A"]), most_at_once(&intervals["B"]), most_at_once(&intervals["all"]));
    println!("jobs running at once, max_running = 2 for A (weight 3) and B on 4 slots: A {a}, B {b}, both {all}");
    assert!(a <= 2, "A ran {a} jobs at once: {:?}", intervals["A"]);
    assert_eq!(a, 2, "A had work all along: it ran 2 at once");
    assert!(b >= 2 && all == 4, "B took the slots A could not: B {b}, both {all}");
    // How much of its 2 places A used from its first start to its last end: a capped key's
    // fetch comes back short, and the puller sees its queue again at its next re-check.
    let runs = &intervals["A"];
    let span = runs.iter().map(|r| r.1).max().unwrap() - runs.iter().map(|r| r.0).min().unwrap();
    let busy: u64 = runs.iter().map(|(s, f)| f - s).sum();
    println!("A ran {:.2} jobs on average of its max_running 2 while it had work", busy as f64 / span as f64);
    // Fetches held back by max_ack_pending are short, not failures.
    let log = cluster.nodes[0].log();
    let fetch_trouble: Vec<&str> = log.lines().filter(|l| l.contains("WARN") && l.contains("fetch")).collect();
    assert!(fetch_trouble.is_empty(), "{fetch_trouble:#?}");
}

/// The `max_ack_pending` of key `u-A`'s consumer of the normal lane of `noop`.
async fn a_consumers_max_ack_pending(url: &str) -> i64 {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let names = kiln_core::nats::Names::new("kiln");
    let stream = js.get_stream(names.jobs_stream()).await.unwrap();
    let name = names.consumer_keyed("noop", kiln_core::nats::Lane::Normal, "u-A");
    stream.consumer_info(&name).await.expect("A's consumer").config.max_ack_pending
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_max_running_updates_the_keys_existing_consumer() {
    let (mut cluster, client, config) = start(1, 1, "[quota.keys.A]\nmax_running = 2\n").await;
    let id = client.submit(&job_of("A")).await.expect("A").job_id;
    wait_terminal(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(a_consumers_max_ack_pending(&cluster.url()).await, 2);

    // The same cluster, restarted with another quota: its consumer follows.
    cluster.nodes[0].kill();
    let changed = config.replace("max_running = 2", "max_running = 3");
    cluster.add_node("n2", &changed);
    cluster.wait_node_ready("n2", 1).await;
    let id = client.submit(&job_of("A")).await.expect("A").job_id;
    assert_eq!(wait_terminal(&client, &id, Duration::from_secs(60)).await.status, JobState::Completed);
    assert_eq!(a_consumers_max_ack_pending(&cluster.url()).await, 3);

    // No quota: back to the figure every other queue has.
    cluster.nodes[1].kill();
    cluster.add_node("n3", &config.replace("[quota.keys.A]\nmax_running = 2\n", ""));
    cluster.wait_node_ready("n3", 1).await;
    client.submit(&job_of("A")).await.expect("A");
    assert_eq!(a_consumers_max_ack_pending(&cluster.url()).await, 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_submit_rate_is_refused_with_the_exact_wait() {
    let quota = "[quota]\nsubmits_per_s = 2\nburst = 3\n";
    let (_cluster, client, _) = start(1, 1, quota).await;
    for _ in 0..3 {
        client.submit(&job_of("A")).await.expect("within the burst");
    }
    let started = Instant::now();
    let e = quota_error(client.submit(&job_of("A")).await);
    let refused_in = started.elapsed();
    let wait = e.retry_after_ms.expect("retry_after_ms");
    assert!((1..=500).contains(&wait), "one token per 500 ms: {wait} ms");
    client.submit(&job_of("B")).await.expect("another user has its own bucket");

    // Refusals of the rate need no NATS request on the node: measure them.
    let mut refusals = vec![refused_in];
    let mut accepted = 3;
    for _ in 0..20 {
        let started = Instant::now();
        let r = client.submit(&job_of("A")).await;
        if r.is_ok() {
            accepted += 1; // a token came back meanwhile (a slow machine)
            break;
        }
        quota_error(r);
        refusals.push(started.elapsed());
    }
    refusals.sort();
    println!(
        "submits_per_s refusal over NATS (client round trip), {} refusals: p50 {:?}, max {:?}",
        refusals.len(),
        percentile(&refusals, 0.5),
        refusals.last().unwrap()
    );
    assert!(percentile(&refusals, 0.5) < Duration::from_millis(50));

    // The client's error says how long to wait; after that, the submit is accepted.
    let refused = client.submit(&job_of("A")).await.expect_err("over the rate");
    let wait = refused.retry_after().expect("ClientError::retry_after");
    assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
    tokio::time::sleep(wait).await;
    client.submit(&job_of("A")).await.expect("accepted once the wait is over");
    assert_eq!(jobs_of(&client, "A").await.len(), accepted + 1, "only the accepted submits made jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_quota_exceeded_with_429_and_retry_after() {
    let quota = "[quota]\nsubmits_per_s = 0.25\nburst = 1\n";
    let (cluster, _client, config) = start(1, 1, quota).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw", &config, &cluster.url());
    let h = http();
    let body = serde_json::json!({"model": "noop", "labels": {"user_id": "A"}});
    let first = h.post(gateway.url("/v1/jobs")).json(&body).send().await.unwrap();
    assert_eq!(first.status(), 201);
    let refused = h.post(gateway.url("/v1/jobs")).json(&body).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let reply: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(reply["code"], "quota_exceeded", "{reply}");
    let ms = reply["retry_after_ms"].as_u64().expect("retry_after_ms in the body");
    assert!((1..=4000).contains(&ms), "{ms}");
    assert_eq!(retry_after, ms.div_ceil(1000), "Retry-After is the wait in seconds, rounded up");
}
