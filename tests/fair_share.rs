//! Fair share between users (issue 26 item 1, `kiln_core::fair`), against a real nats-server
//! and node: user A submits a flood of short jobs, user B a few a second later. B's first job
//! starts within a couple of job durations, not behind A's flood, and while both have work the
//! slots' time is shared by the users' weights. The figures are printed.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use kiln::client::Client;
use kiln_core::job::JobState;
use kiln_core::protocol::{JobView, SubmitRequest};

/// How long each job runs (the no-op engine's `work_ms`).
const JOB_MS: u64 = 20;

fn model() -> String {
    format!("[[models]]\nname = \"noop\"\nengine = {{ kind = \"noop\", work_ms = {JOB_MS} }}\n")
}

fn job_of(user: &str) -> SubmitRequest {
    SubmitRequest { model: "noop".into(), labels: [("user_id".to_string(), user.to_string())].into(), ..Default::default() }
}

/// Submits `n` jobs of `user`, 32 at a time; their ids in order.
async fn submit_many(client: &Client, user: &str, n: usize) -> Vec<String> {
    let client = client.clone().with_timeout(Duration::from_secs(30));
    futures::stream::iter(0..n)
        .map(|_| {
            let client = client.clone();
            async move { client.submit(&job_of(user)).await.expect("accepted").job_id }
        })
        .buffered(32)
        .collect()
        .await
}

async fn views(client: &Client, ids: &[String]) -> Vec<JobView> {
    futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let client = client.clone();
            async move { wait_terminal(&client, &id, Duration::from_secs(120)).await }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// What the run of two users measured.
#[derive(Debug)]
struct Shares {
    /// From B's first submit (its record's creation) to its first job's start.
    b_first_start_ms: u64,
    /// B's share of the slots' run time while both had work: from B's first submit to B's
    /// last job's end (A's flood outlasts it).
    b_share: f64,
}

/// One node with 4 slots, fair share on the `user_id` label (the default) with `weights`:
/// A submits `a_jobs`, B `b_jobs` one second after A began.
async fn two_users(weights: &str, a_jobs: usize, b_jobs: usize) -> Shares {
    let mut cluster = TestCluster::new();
    let config = config_toml(&cluster.url(), &["cpu:0", "cpu:1", "cpu:2", "cpu:3"], 30_000, &format!("{weights}\n{}", model()));
    cluster.add_node("n", &config);
    cluster.wait_node_ready("n", 4).await;
    let client = cluster.client().await;

    let a = tokio::spawn({
        let client = client.clone();
        async move { submit_many(&client, "A", a_jobs).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_ids = submit_many(&client, "B", b_jobs).await;
    let b = views(&client, &b_ids).await;
    let a_ids = a.await.unwrap();
    let a = views(&client, &a_ids).await;
    for v in a.iter().chain(&b) {
        assert_eq!(v.status, JobState::Completed, "{v:?}");
    }

    let b_created = b.iter().map(|v| v.created_ms).min().unwrap();
    let b_first_start = b.iter().filter_map(|v| v.started_ms).min().unwrap();
    let b_last_end = b.iter().filter_map(|v| v.finished_ms).max().unwrap();
    let a_last_end = a.iter().filter_map(|v| v.finished_ms).max().unwrap();
    assert!(
        a_last_end > b_last_end,
        "A's flood ended before B's jobs ({a_last_end} <= {b_last_end}): the window is not one where both had work"
    );
    // Run time inside B's window, by user.
    let mut run: BTreeMap<&str, u64> = BTreeMap::new();
    for (user, jobs) in [("A", &a), ("B", &b)] {
        for v in jobs.iter() {
            let (s, f) = (v.started_ms.unwrap().max(b_created), v.finished_ms.unwrap().min(b_last_end));
            *run.entry(user).or_default() += f.saturating_sub(s);
        }
    }
    let b_share = run["B"] as f64 / (run["A"] + run["B"]) as f64;
    Shares { b_first_start_ms: b_first_start.saturating_sub(b_created), b_share }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_user_gets_half_the_slots_beside_a_flood_of_another() {
    let started = Instant::now();
    let shares = two_users("", 2_000, 50).await;
    eprintln!(
        "equal weights, 4 slots, {JOB_MS} ms jobs, A 2,000 jobs, B 50 a second later: B's first job started {} ms after its submit \
         ({:.1} job durations); B's share of the slots while both had work {:.1} % (run took {:.1?})",
        shares.b_first_start_ms,
        shares.b_first_start_ms as f64 / JOB_MS as f64,
        shares.b_share * 100.0,
        started.elapsed()
    );
    // First-in-first-out, B's first job would wait for A's ~1,500 queued ones (~7 s). The
    // issue's target is 2 job durations; on a loaded 2-core test machine the bound is looser.
    assert!(shares.b_first_start_ms < 1_000, "B's first job waited {} ms", shares.b_first_start_ms);
    assert!((0.40..=0.60).contains(&shares.b_share), "B's share {:.3}", shares.b_share);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_share_the_slots_three_to_one() {
    let shares = two_users("[fair_share.weights]\nA = 3\n", 1_000, 50).await;
    eprintln!(
        "weights A 3 : B 1, 4 slots, {JOB_MS} ms jobs: B's first job started {} ms after its submit; B's share {:.1} % (A's {:.1} %)",
        shares.b_first_start_ms,
        shares.b_share * 100.0,
        (1.0 - shares.b_share) * 100.0
    );
    assert!((0.15..=0.35).contains(&shares.b_share), "B's share {:.3}", shares.b_share);
}

/// A key's queue consumer idle for `fair_share.idle_queue_s` is removed, and the key's next job
/// makes it again and runs, whichever node takes the submit (the other node's note that the
/// consumer exists is stale then) and whichever pulls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_users_queue_is_removed_and_made_again_by_its_next_job() {
    let mut cluster = TestCluster::new();
    let extra = format!("[fair_share]\nidle_queue_s = 2\n{}", model());
    for name in ["a", "b"] {
        cluster.add_node(name, &config_toml(&cluster.url(), &["cpu:0"], 30_000, &extra));
    }
    cluster.wait_node_ready("a", 1).await;
    cluster.wait_node_ready("b", 1).await;
    let client = cluster.client().await.with_timeout(Duration::from_secs(10));
    let js = client.jetstream().clone();
    let consumers = || async {
        let stream = js.get_stream("KILN_JOBS").await.unwrap();
        let names: Vec<String> = stream.consumer_names().collect::<Vec<_>>().await.into_iter().map(|n| n.unwrap()).collect();
        names
    };
    for round in 0..3 {
        // Several jobs, so both nodes take submits and pull.
        let ids = submit_many(&client, "carol", 6).await;
        for v in views(&client, &ids).await {
            assert_eq!(v.status, JobState::Completed, "round {round}: {v:?}");
        }
        assert!(consumers().await.contains(&"noop-normal-u-carol".to_string()), "round {round}");
        let removed =
            eventually(Duration::from_secs(20), || async { !consumers().await.contains(&"noop-normal-u-carol".to_string()) }).await;
        assert!(removed, "round {round}: carol's idle queue was not removed: {:?}", consumers().await);
        assert!(consumers().await.contains(&"noop-normal".to_string()), "the lane's shared queue stays");
    }
}
