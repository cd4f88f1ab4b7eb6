//! The compose cluster of `deploy/compose/docker-compose.yml`, from the images
//! `scripts/images.sh` built: three nats-server containers (JetStream, replicas 3), two node
//! containers running the demo worker, the gateway container, all on the host's loopback.
//!
//! Jobs go in over HTTP (the gateway's REST API, one with an uploaded file) and over NATS
//! (`kiln_client::Client`) while one nats-server container and then one node container, caught
//! running jobs, are SIGKILLed (`docker kill -s KILL`). Every accepted job must then have
//! completed exactly once, its artifacts downloading with their recorded sha256: the invariants
//! of `kiln chaos` (`kiln::chaos::check`). The cluster is torn down (`down -v`) also on failure.
//!
//! `#[ignore]`: it needs docker, a compose CLI and the images. `scripts/compose_test.sh` builds
//! the images and runs it (`cargo test --test compose -- --ignored`, the debug build the suite
//! made); `.ci/run` runs that script after the suite. `KILN_COMPOSE` picks the CLI (`docker-compose` when it exists,
//! else `docker compose`); `KILN_IMAGE` the image (`kiln:latest`).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kiln::chaos::check::{registry_problems, Checker};
use kiln::chaos::{wait_until, Accepted, Profile};
use kiln::client::Client;
use kiln_core::config::NatsConfig;
use kiln_core::job::JobState;
use kiln_core::nats::objects::sha256_hex;
use kiln_core::protocol::{InputValue, JobView, SubmitRequest};

/// The compose file's default ports (deploy/compose/docker-compose.yml).
const NATS_URL: &str = "nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224";
const GATEWAY: &str = "http://127.0.0.1:18080";
const NODE_METRICS: [&str; 2] = ["127.0.0.1:19464", "127.0.0.1:19465"];
const NODES: [&str; 2] = ["node-1", "node-2"];
const SLOTS_PER_NODE: usize = 2;
/// A killed node's job is delivered again after this long (the compose file's KILN_ACK_WAIT_MS;
/// its default, 30 s, would only make the test wait longer).
const ACK_WAIT_MS: &str = "10000";
/// How long a SIGKILLed node may still be shown alive: the image config's registry TTL (5 s)
/// and the registry's own checks.
const DEAD_NODE_GONE_S: u64 = 15;
/// Long jobs submitted before node-2 is killed: with four slots busy, at least one lands there.
const LONG_JOBS: u64 = 6;

/// The compose CLI: `KILN_COMPOSE` (split on spaces), else `docker-compose` where it exists
/// (Debian's 1.29), else the `docker compose` plugin.
fn compose_cli(chosen: Option<&str>, v1_installed: bool) -> Vec<String> {
    match chosen {
        Some(c) if !c.trim().is_empty() => c.split_whitespace().map(str::to_string).collect(),
        _ if v1_installed => vec!["docker-compose".into()],
        _ => vec!["docker".into(), "compose".into()],
    }
}

/// One project of the compose file; `down -v` when dropped, after printing every service's
/// log tail if the test is failing.
struct Cluster {
    cli: Vec<String>,
    file: PathBuf,
    project: String,
}

impl Cluster {
    fn new() -> Cluster {
        let v1 = Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success());
        let cli = compose_cli(std::env::var("KILN_COMPOSE").ok().as_deref(), v1);
        Cluster { cli, file: repo().join("deploy/compose/docker-compose.yml"), project: "kiln-compose-test".into() }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(&self.cli[0]);
        c.args(&self.cli[1..]).arg("-f").arg(&self.file).args(["-p", &self.project]).args(args).env("KILN_ACK_WAIT_MS", ACK_WAIT_MS);
        c.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.cli))
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}\n{}",
            self.cli.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn container(&self, service: &str) -> String {
        let id = self.run_ok(&["ps", "-q", service]).trim().to_string();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// `docker kill -s KILL`: the process dies at once, nothing is flushed or drained.
    fn sigkill(&self, service: &str) {
        docker(&["kill", "-s", "KILL", &self.container(service)]);
    }

    /// Starts a killed service's container again (docker does not: a killed container counts as
    /// stopped on purpose). Through compose: `docker compose ps` (v2) no longer lists it.
    fn start(&self, service: &str) {
        self.run_ok(&["start", service]);
    }

    fn down(&self) {
        let out = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
        if !out.status.success() {
            eprintln!("compose down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.run(&["logs", "--no-color", "--tail", "40"]);
            eprintln!("--- the cluster's logs:\n{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
        }
        self.down();
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn demo_params(seed: u64) -> serde_json::Value {
    // Four steps of 150 ms: long enough that a killed node is caught with jobs running.
    serde_json::json!({"steps": 4, "step_ms": 150, "seed": seed})
}

/// Jobs accepted so far, from every submitter.
type AcceptedJobs = Arc<Mutex<Vec<Accepted>>>;

fn accept(jobs: &AcceptedJobs, job_id: String, prompt: String, seed: u64) {
    jobs.lock().unwrap().push(Accepted { job_ids: vec![job_id], batch_id: None, inputs: vec![(prompt, seed)] });
}

/// Submits demo jobs every `every` until stopped, as a careful client does: each with an
/// idempotency key, retried (same key) until accepted, so a retry across a dead server never
/// makes a second job. `over_http`: through the gateway's `POST /v1/jobs`, else over NATS.
fn start_submitter(
    tag: &'static str,
    over_http: bool,
    every: Duration,
    jobs: AcceptedJobs,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let client = Client::connect_with(&NatsConfig::for_url(NATS_URL)).await.unwrap().with_timeout(Duration::from_secs(3));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let mut refused = 0u32;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let prompt = format!("compose {tag} {n}");
            let request =
                SubmitRequest { idempotency_key: Some(format!("compose-{tag}-{n}")), ..prompt_request("demo", &prompt, demo_params(n)) };
            while !stop.load(Ordering::Relaxed) {
                let accepted = if over_http {
                    match http.post(format!("{GATEWAY}/v1/jobs")).json(&request).send().await {
                        Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                            r.json::<serde_json::Value>().await.ok().and_then(|v| v["job_id"].as_str().map(str::to_string))
                        }
                        _ => None,
                    }
                } else {
                    client.submit(&request).await.ok().map(|r| r.job_id)
                };
                match accepted {
                    Some(id) => {
                        accept(&jobs, id, prompt.clone(), n);
                        break;
                    }
                    None => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            n += 1;
            tokio::time::sleep(every).await;
        }
        refused
    })
}

async fn http_ok(url: String) -> bool {
    reqwest::Client::new().get(url).timeout(Duration::from_secs(2)).send().await.is_ok_and(|r| r.status().is_success())
}

/// The first of `ids` seen running on `node`, within `limit`.
async fn running_on_node(client: &Client, ids: &[String], node: &str, limit: Duration) -> Option<String> {
    let started = Instant::now();
    while started.elapsed() < limit {
        for id in ids {
            if client.status(id).await.is_ok_and(|v| v.status == JobState::Running && v.node.as_deref() == Some(node)) {
                return Some(id.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Submits until accepted (the same idempotency key each time, so never two jobs): a refusal
/// or a timeout while a server's streams elect new leaders is retried.
async fn submit_until_accepted(client: &Client, request: &SubmitRequest) -> String {
    let started = Instant::now();
    loop {
        match client.submit(request).await {
            Ok(reply) => return reply.job_id,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(60), "submit refused for 60 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_compose_cli_is_the_chosen_one_else_v1_else_the_plugin() {
    assert_eq!(compose_cli(None, true), ["docker-compose"]);
    assert_eq!(compose_cli(None, false), ["docker", "compose"]);
    assert_eq!(compose_cli(Some("docker compose"), true), ["docker", "compose"]);
    assert_eq!(compose_cli(Some(" "), false), ["docker", "compose"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker and the images of scripts/images.sh: run scripts/compose_test.sh"]
async fn a_compose_cluster_runs_every_job_exactly_once_through_a_killed_server_and_node() {
    let started = Instant::now();
    let image = std::env::var("KILN_IMAGE").unwrap_or_else(|_| "kiln:latest".into());
    let inspected = Command::new("docker").args(["image", "inspect", &image]).output().expect("docker");
    assert!(inspected.status.success(), "no image {image}: build it with scripts/images.sh");

    let cluster = Cluster::new();
    cluster.down(); // what an interrupted earlier run left
    cluster.run_ok(&["up", "-d"]);
    eprintln!("compose up -d returned after {:?}", started.elapsed());

    // Serving: the gateway, both nodes ready (their /readyz), and both nodes' slots in the registry.
    let limit = Duration::from_secs(180);
    assert!(wait_until(limit, || http_ok(format!("{GATEWAY}/healthz"))).await, "the gateway never answered /healthz");
    for addr in NODE_METRICS {
        assert!(wait_until(limit, || http_ok(format!("http://{addr}/readyz"))).await, "no node was ready on {addr}");
    }
    let client = Client::connect_with(&NatsConfig::for_url(NATS_URL)).await.unwrap().with_timeout(Duration::from_secs(5));
    let names: Vec<String> = NODES.iter().map(|s| s.to_string()).collect();
    let profile = Profile { slots_per_node: SLOTS_PER_NODE, ..Profile::short() };
    let registered =
        wait_until(limit, || async { client.cluster().await.is_ok_and(|c| registry_problems(&c, &profile, &names).is_empty()) }).await;
    assert!(registered, "the nodes did not register their slots: {:?}", client.cluster().await);
    assert!(http_ok(format!("{GATEWAY}/readyz")).await, "the gateway is not ready");
    eprintln!("cluster serving after {:?}", started.elapsed());

    let jobs: AcceptedJobs = Default::default();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    // An upload through the gateway, then a job that reads it: the worker logs its size.
    let upload: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let put = http.put(format!("{GATEWAY}/v1/files/compose/input.bin")).body(upload.clone()).send().await.unwrap();
    assert_eq!(put.status(), reqwest::StatusCode::CREATED, "upload refused");
    let stored: serde_json::Value = put.json().await.unwrap();
    assert_eq!(stored["sha256"], sha256_hex(&upload), "the files bucket holds other bytes than were uploaded");
    let mut with_file = prompt_request("demo", "compose uploaded", demo_params(7));
    with_file.inputs.insert("image".into(), InputValue::Object { object: "compose/input.bin".into() });
    let reply = http.post(format!("{GATEWAY}/v1/jobs")).json(&with_file).send().await.unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::CREATED);
    let upload_job = reply.json::<serde_json::Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();
    accept(&jobs, upload_job.clone(), "compose uploaded".into(), 7);

    // Load over both paths, then the faults under it.
    let stop = Arc::new(AtomicBool::new(false));
    let submitters = vec![
        start_submitter("nats-a", false, Duration::from_millis(250), jobs.clone(), stop.clone()),
        start_submitter("nats-b", false, Duration::from_millis(250), jobs.clone(), stop.clone()),
        start_submitter("http", true, Duration::from_millis(250), jobs.clone(), stop.clone()),
    ];
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.sigkill("nats-2");
    eprintln!("SIGKILLed nats-2 at {:?}, {} jobs accepted", started.elapsed(), jobs.lock().unwrap().len());
    // Long jobs (5 s) beside the short ones, so that node-2 is killed in the middle of one
    // that must then run again elsewhere and still complete once.
    let mut long_jobs = vec![];
    for i in 0..LONG_JOBS {
        let prompt = format!("compose long {i}");
        let request = SubmitRequest {
            idempotency_key: Some(format!("compose-long-{i}")),
            ..prompt_request("demo", &prompt, serde_json::json!({"steps": 10, "step_ms": 500, "seed": i}))
        };
        let id = submit_until_accepted(&client, &request).await;
        accept(&jobs, id.clone(), prompt, i);
        long_jobs.push(id);
    }
    let caught = running_on_node(&client, &long_jobs, "node-2", Duration::from_secs(120)).await;
    let caught = caught.expect("no long job ran on node-2 to be killed with");
    cluster.sigkill("node-2");
    let killed = Instant::now();
    eprintln!("SIGKILLed node-2 at {:?} while it ran jobs, {} jobs accepted", started.elapsed(), jobs.lock().unwrap().len());
    // Docker does not restart a container it was told to kill: node-2 stays down until started
    // below, and the registry must drop it (node.registry_ttl_ms, 5 s, plus a check's slack).
    let gone = wait_until(Duration::from_secs(DEAD_NODE_GONE_S), || async {
        client.cluster().await.is_ok_and(|c| !c.nodes.iter().any(|n| n.node == "node-2"))
    })
    .await;
    assert!(gone, "the killed node-2 was still shown alive {DEAD_NODE_GONE_S} s after its SIGKILL");
    eprintln!("node-2 gone from the registry {:?} after its SIGKILL", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut refused = 0;
    for s in submitters {
        refused += s.await.unwrap();
    }
    let accepted: Vec<Accepted> = jobs.lock().unwrap().clone();
    eprintln!("load stopped at {:?}: {} jobs accepted, {refused} submissions retried", started.elapsed(), accepted.len());
    assert!(accepted.len() >= 20, "too few jobs accepted to mean anything: {}", accepted.len());
    cluster.start("nats-2");
    cluster.start("node-2");

    // Every accepted job ends; then the registry shows both nodes idle again.
    let ids: Vec<String> = accepted.iter().flat_map(|a| a.job_ids.clone()).collect();
    let ended = wait_until(Duration::from_secs(300), || async {
        let mut all = true;
        for id in &ids {
            if !client.status(id).await.is_ok_and(|v| v.status.is_terminal()) {
                all = false;
                break;
            }
        }
        all
    })
    .await;
    let ended_at = Instant::now();
    assert!(ended, "not every accepted job ended within 300 s");
    let converged = wait_until(Duration::from_secs(60), || async {
        client.cluster().await.is_ok_and(|c| registry_problems(&c, &profile, &names).is_empty())
    })
    .await;
    let converged_ms = ended_at.elapsed().as_millis() as u64;
    eprintln!("every job ended at {:?}", started.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let mut checker = Checker::new(client.clone(), dir.path());
    let invariants = checker.check_all(&accepted, &[], &profile, &names, converged, converged_ms).await;
    for i in &invariants {
        eprintln!("[{}] {}: {}", if i.ok { "ok" } else { "FAIL" }, i.name, i.detail);
    }
    let broken: Vec<&str> = invariants.iter().filter(|i| !i.ok).map(|i| i.name.as_str()).collect();
    assert!(broken.is_empty(), "invariants broken: {broken:?}");
    let outcomes = &checker.outcomes;
    assert_eq!(
        (outcomes.completed as usize, outcomes.failed.clone(), outcomes.cancelled),
        (ids.len(), BTreeMap::new(), 0),
        "every accepted job completed"
    );
    let caught_view = client.status(&caught).await.unwrap();
    // Completed (every job did, above), by a later attempt than the one node-2 died in.
    assert!(caught_view.attempt >= 2, "the job node-2 was killed running did not run again: {caught_view:?}");
    assert!(outcomes.retried > 0);

    // The uploaded file reached the worker, and its result downloads through the gateway with
    // the sha256 the record holds.
    let view: JobView = client.status(&upload_job).await.unwrap();
    assert_eq!(view.status, JobState::Completed);
    let logged = history(&client, &upload_job).await.iter().any(|e| e.message.as_deref() == Some("input image input.bin: 200000 bytes"));
    assert!(logged, "the worker never read the uploaded file");
    let image = view.artifacts.iter().find(|a| a.name == "image.png").expect("image.png");
    let bytes = http.get(format!("{GATEWAY}/v1/jobs/{upload_job}/artifacts/image.png")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_hex(&bytes), image.sha256, "the gateway served other bytes than the record's");

    eprintln!("compose test: {} jobs ({} retried) completed exactly once in {:?}", ids.len(), outcomes.retried, started.elapsed());
}
