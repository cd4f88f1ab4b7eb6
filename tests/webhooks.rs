//! Webhooks against real processes: a real nats-server, real `kiln node` processes (and a
//! `kiln gateway` for the HTTP routes), and a real HTTP receiver in this test (axum on
//! 127.0.0.1) that checks every request's Standard Webhooks signature itself, with its own
//! HMAC (not Kiln's code), and answers as each case scripts it: 500 then 200, too slowly, a
//! redirect, 413, not at all for a while. The receiver is on loopback, so the clusters here set
//! `[webhooks] allow_loopback = true`, except the one that checks the refusal.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use common::*;
use hmac::{Hmac, Mac};
use kiln_core::job::JobState;
use kiln_core::protocol::{ErrorCode, SubmitRequest, WebhookEvent, WebhookSpec};

/// 24 random bytes, as `whsec_<base64>`.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_c2Vjb25kLWVuZHBvaW50LXNlY3JldC0xMjM0NTY3OA==";

/// How the receiver answers one request.
#[derive(Debug, Clone)]
enum Answer {
    Status(u16),
    /// Waits this long, then answers 200 (past Kiln's `timeout_ms`: a timeout).
    Slow(Duration),
    /// 301 to `/moved` (which counts any request it gets).
    Redirect,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    timestamp: u64,
    /// The signature verified with the secret the path is for.
    verified: bool,
    body: serde_json::Value,
    at: Instant,
}

#[derive(Default)]
struct Receiver {
    /// Per path: the answers to give, in order; past them, 200.
    script: Mutex<BTreeMap<String, VecDeque<Answer>>>,
    got: Mutex<Vec<Received>>,
}

impl Receiver {
    fn script(&self, path: &str, answers: &[Answer]) {
        self.script.lock().unwrap().insert(path.to_string(), answers.iter().cloned().collect());
    }
    fn got(&self, path: &str) -> Vec<Received> {
        self.got.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
    }
}

/// The spec's check, written here from the spec: HMAC-SHA256 over "{id}.{timestamp}.{body}"
/// with the base64-decoded part of the secret after `whsec_`; any `v1,` signature of the
/// space-separated list may match.
fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header.split(' ').any(|s| s == format!("v1,{expected}"))
}

async fn receive(State(rx): State<Arc<Receiver>>, uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let path = uri.path().to_string();
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let secret = if path.starts_with("/cfg") { OTHER_SECRET } else { SECRET };
    let (id, ts, sig) = (h("webhook-id"), h("webhook-timestamp"), h("webhook-signature"));
    let verified = verify(secret, &id, &ts, &body, &sig);
    rx.got.lock().unwrap().push(Received {
        path: path.clone(),
        id,
        timestamp: ts.parse().unwrap_or(0),
        verified,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        at: Instant::now(),
    });
    let answer = rx.script.lock().unwrap().get_mut(&path).and_then(|q| q.pop_front()).unwrap_or(Answer::Status(200));
    match answer {
        Answer::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Answer::Slow(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Answer::Redirect => (StatusCode::MOVED_PERMANENTLY, [("location", "/moved")]).into_response(),
    }
}

/// Serves the receiver on `listener` until the returned task is aborted.
fn serve(listener: tokio::net::TcpListener, rx: Arc<Receiver>) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().fallback(receive).with_state(rx);
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

async fn receiver() -> (Arc<Receiver>, String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let rx = Arc::new(Receiver::default());
    (rx.clone(), base, serve(listener, rx))
}

fn webhooks_config(allow_loopback: bool, extra: &str) -> String {
    format!(
        r#"
[webhooks]
secret = "{SECRET}"
allow_loopback = {allow_loopback}
backoff_initial_ms = 200
backoff_max_ms = 1000
timeout_ms = 1000
retry_for_s = 120
{extra}
"#
    )
}

fn noop_job(url: &str, events: &[WebhookEvent]) -> SubmitRequest {
    SubmitRequest {
        model: "noop".into(),
        webhook: Some(WebhookSpec { url: url.to_string(), events: events.to_vec() }),
        ..Default::default()
    }
}

async fn cluster_with(config_extra: &str) -> TestCluster {
    let mut cluster = TestCluster::new();
    let config = node_config(&cluster, config_extra);
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    cluster
}

fn node_config(cluster: &TestCluster, config_extra: &str) -> String {
    config_toml(&cluster.url(), &["cpu:0"], 10_000, &format!("{NOOP_MODEL}\n{config_extra}"))
}

/// Waits until `check` holds, or fails with `what` and the node logs' tails.
async fn wait_for(cluster: &TestCluster, limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let ok = eventually(limit, || {
        let v = check();
        async move { v }
    })
    .await;
    let logs: Vec<String> = cluster.nodes.iter().map(|n| format!("{}:\n{}", n.name, n.log_tail(30))).collect();
    assert!(ok, "{what} within {limit:?}; logs:\n{}", logs.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_is_retried_after_a_500_logged_and_redelivered_over_http() {
    let (rx, base, _server) = receiver().await;
    let cluster = cluster_with(&webhooks_config(true, "")).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw", &node_config(&cluster, &webhooks_config(true, "")), &cluster.url());
    rx.script("/hook", &[Answer::Status(500)]);

    // Submitted over HTTP: the webhook is part of the shared SubmitRequest.
    let http = http();
    let submitted: serde_json::Value = http
        .post(gateway.url("/v1/jobs"))
        .json(&serde_json::json!({"model": "noop", "webhook": {"url": format!("{base}/hook")}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = submitted["job_id"].as_str().expect("a job id").to_string();
    wait_for(&cluster, Duration::from_secs(30), "two requests (a 500, then a 200)", || rx.got("/hook").len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rx.got("/hook");
    assert_eq!(got.len(), 2, "delivered once, after one retry: {got:#?}");
    assert!(got.iter().all(|r| r.verified), "every request is signed with the job webhooks' secret: {got:#?}");
    assert_eq!(got[0].id, got[1].id, "the webhook-id stays the same across retries");
    assert!(got[1].at - got[0].at >= Duration::from_millis(100), "the retry waited its backoff");
    let now_s = kiln_core::now_ms() / 1000;
    assert!(got.iter().all(|r| r.timestamp.abs_diff(now_s) < 60), "webhook-timestamp is unix seconds, now");
    let body = &got[1].body;
    assert_eq!(body["type"], "job.completed");
    assert_eq!(body["data"]["job_id"], job_id.as_str());
    assert_eq!(body["data"]["model"], "noop");
    assert_eq!(body["data"]["status"], "completed");
    assert_eq!(body["data"]["flag"], true, "seed 000's names too: {body}");
    assert!(body["data"]["artifacts"].as_array().is_some_and(|a| !a.is_empty()), "the results' references: {body}");
    assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");

    // The log, over HTTP: both attempts, with their codes and latencies (an attempt is logged
    // once the receiver has answered: waited for).
    let log_url = gateway.url(&format!("/v1/jobs/{job_id}/webhooks"));
    let read_log = || async { http.get(&log_url).send().await.ok()?.json::<serde_json::Value>().await.ok() };
    let logged = eventually(Duration::from_secs(10), || async {
        read_log().await.is_some_and(|l| l["attempts"].as_array().is_some_and(|a| a.len() >= 2))
    })
    .await;
    assert!(logged, "{:?}", read_log().await);
    let log = read_log().await.expect("the log");
    let attempts = log["attempts"].as_array().expect("attempts");
    let summary: Vec<(u64, &str)> =
        attempts.iter().map(|a| (a["status_code"].as_u64().unwrap_or(0), a["outcome"].as_str().unwrap_or(""))).collect();
    assert_eq!(summary, [(500, "retrying"), (200, "delivered")], "{log}");
    assert!(attempts.iter().all(|a| a["latency_ms"].is_u64() && a["webhook_id"] == got[0].id.as_str()), "{log}");

    // Manual redelivery: the same message again, a new attempt in the log marked manual.
    let redeliver = http.post(gateway.url(&format!("/v1/jobs/{job_id}/webhooks/redeliver"))).send().await.unwrap();
    assert_eq!(redeliver.status(), 202);
    let reply: serde_json::Value = redeliver.json().await.unwrap();
    assert_eq!(reply["queued"], 1, "{reply}");
    wait_for(&cluster, Duration::from_secs(20), "the redelivered message", || rx.got("/hook").len() >= 3).await;
    let again = &rx.got("/hook")[2];
    assert!(again.verified && again.id == got[0].id, "{again:#?}");
    assert_eq!(again.body, got[1].body, "the same message");
    let client = cluster.client().await;
    let ok = eventually(Duration::from_secs(10), || async {
        client.webhooks(&job_id).await.is_ok_and(|l| l.attempts.len() == 3 && l.attempts[2].manual && l.attempts[2].outcome == "delivered")
    })
    .await;
    assert!(ok, "the NATS API shows the manual attempt: {:#?}", client.webhooks(&job_id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_redirects_and_413_are_recorded_and_given_up() {
    let (rx, base, _server) = receiver().await;
    let cluster = cluster_with(&webhooks_config(true, "")).await;
    let client = cluster.client().await;
    rx.script("/slow", &[Answer::Slow(Duration::from_secs(3))]);
    rx.script("/redirect", &[Answer::Redirect]);
    rx.script("/big", &[Answer::Status(413)]);
    let mut jobs = BTreeMap::new();
    for path in ["/slow", "/redirect", "/big"] {
        let reply = client.submit(&noop_job(&format!("{base}{path}"), &[])).await.unwrap();
        jobs.insert(path, reply.job_id);
    }
    let log_of = |path: &'static str| {
        let (client, job_id) = (client.clone(), jobs[path].clone());
        async move { client.webhooks(&job_id).await.map(|l| l.attempts).unwrap_or_default() }
    };
    let ok = eventually(Duration::from_secs(30), || async {
        log_of("/slow").await.last().is_some_and(|a| a.outcome == "delivered")
            && log_of("/redirect").await.last().is_some_and(|a| a.outcome == "gave_up")
            && log_of("/big").await.last().is_some_and(|a| a.outcome == "gave_up")
    })
    .await;
    assert!(ok, "slow: {:#?}\nredirect: {:#?}\nbig: {:#?}", log_of("/slow").await, log_of("/redirect").await, log_of("/big").await);

    let slow = log_of("/slow").await;
    assert_eq!(slow.len(), 2, "{slow:#?}");
    assert_eq!((slow[0].error.as_deref(), slow[0].outcome.as_str(), slow[0].status_code), (Some("timeout"), "retrying", None));
    assert!(slow[0].latency_ms >= 900 && slow[0].latency_ms < 3000, "cut at timeout_ms: {slow:#?}");
    assert_eq!(slow[1].status_code, Some(200));

    let redirect = log_of("/redirect").await;
    assert_eq!(redirect.len(), 1, "a redirect is not retried: {redirect:#?}");
    assert_eq!(redirect[0].status_code, Some(301));
    assert!(redirect[0].error.as_deref().is_some_and(|e| e.starts_with("redirect") && e.contains("/moved")), "{redirect:#?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rx.got("/moved").is_empty(), "the redirect was not followed");

    let big = log_of("/big").await;
    assert_eq!((big.len(), big[0].status_code, big[0].outcome.as_str()), (1, Some(413), "gave_up"), "{big:#?}");
    assert!(big[0].error.as_deref().is_some_and(|e| e.contains("payload_too_large")), "{big:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_gets_its_messages_when_it_comes_up_even_across_a_node_crash() {
    // A port with nothing on it: every attempt is refused until the receiver binds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cluster = cluster_with(&webhooks_config(true, "")).await;
    let client = cluster.client().await;
    let mut jobs = vec![];
    for _ in 0..5 {
        jobs.push(client.submit(&noop_job(&format!("{base}/down"), &[])).await.unwrap().job_id);
    }
    for job in &jobs {
        assert_eq!(wait_terminal(&client, job, Duration::from_secs(30)).await.status, JobState::Completed);
    }
    // Each message has failed at least once: pending, held or in its backoff.
    let ok = eventually(Duration::from_secs(20), || async {
        for job in &jobs {
            let log = client.webhooks(job).await.map(|l| l.attempts).unwrap_or_default();
            if !log.iter().any(|a| a.outcome == "retrying" && a.error.as_deref().is_some_and(|e| e.starts_with("connect"))) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(ok, "every message failed to connect and waits for a retry");

    // The only node dies with all five pending; the receiver stays down for ~10 s more.
    cluster.nodes[0].signal(libc::SIGKILL);
    cluster.nodes[0].wait_exit(Duration::from_secs(10));
    let down_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rx = Arc::new(Receiver::default());
    let _server = serve(tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap(), rx.clone());
    cluster.nodes[0].start();

    wait_for(&cluster, Duration::from_secs(60), "all five messages after the restart", || {
        let got = rx.got("/down");
        jobs.iter().all(|j| got.iter().any(|r| r.body["data"]["job_id"] == j.as_str()))
    })
    .await;
    let got = rx.got("/down");
    assert!(got.iter().all(|r| r.verified), "{got:#?}");
    println!("receiver down for {:?}; all 5 delivered after it came up and the node restarted", down_since.elapsed());
    // The attempt is logged once the receiver has answered (and the restarted node's API may
    // still be joining): each job's log ends delivered, after failed attempts, soon after.
    for job in &jobs {
        let ok = eventually(Duration::from_secs(20), || async {
            client.webhooks(job).await.is_ok_and(|l| l.attempts.len() >= 2 && l.attempts.last().is_some_and(|a| a.outcome == "delivered"))
        })
        .await;
        assert!(ok, "failed attempts before, then the delivery: {:#?}", client.webhooks(job).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_refused_unless_allowed_at_submit_and_on_each_attempt() {
    let (rx, base, _server) = receiver().await;
    // A configured endpoint on loopback: taken by the config (it names what the operator
    // chose), refused on each attempt while allow_loopback is off, and recorded so.
    let endpoint = format!(
        "[[webhooks.endpoints]]\nname = \"ops\"\nurl = \"{base}/cfg\"\nsecret = \"{OTHER_SECRET}\"\nmodels = [\"noop\"]\nevents = [\"started\", \"completed\"]\n"
    );
    let cluster = cluster_with(&webhooks_config(false, &endpoint)).await;
    let client = cluster.client().await;

    // A job's own webhook naming a loopback address: refused at submit, coded.
    for url in [format!("{base}/hook"), "http://localhost:9/x".to_string(), "http://169.254.169.254/latest".to_string()] {
        let refused = client.submit(&noop_job(&url, &[])).await.expect_err("loopback refused");
        match refused {
            kiln::client::ClientError::Api(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.contains("allow_loopback"), "{}", e.message);
            }
            other => panic!("{other}"),
        }
    }
    // Unknown events and bad URLs are refused too.
    let bad = client
        .request::<_, serde_json::Value>(
            "submit",
            &serde_json::json!({"model": "noop", "webhook": {"url": "https://example.com/h", "events": ["finished"]}}),
        )
        .await;
    assert!(bad.as_ref().is_err_and(|e| e.to_string().starts_with("bad_request") && e.to_string().contains("finished")), "{bad:?}");
    let bad = client.submit(&noop_job("ftp://example.com/h", &[])).await;
    assert!(bad.as_ref().is_err_and(|e| e.to_string().contains("http or https")), "{bad:?}");

    // A job without a webhook of its own: the configured endpoint's attempts are refused.
    let job = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap().job_id;
    let ok = eventually(Duration::from_secs(20), || async {
        client.webhooks(&job).await.is_ok_and(|l| {
            l.attempts.len() >= 2
                && l.attempts.iter().all(|a| a.outcome == "gave_up" && a.error.as_deref().unwrap_or("").starts_with("address_refused"))
        })
    })
    .await;
    assert!(ok, "{:#?}", client.webhooks(&job).await);
    let kinds: Vec<String> = client.webhooks(&job).await.unwrap().attempts.iter().map(|a| a.kind.clone()).collect();
    assert!(kinds.contains(&"job.started".to_string()) && kinds.contains(&"job.completed".to_string()), "{kinds:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rx.got("/cfg").is_empty(), "nothing reached the loopback receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_endpoints_get_their_models_events_signed_with_their_own_secret() {
    let (rx, base, _server) = receiver().await;
    let endpoint = format!(
        "[[webhooks.endpoints]]\nname = \"ops\"\nurl = \"{base}/cfg\"\nsecret = \"{OTHER_SECRET}\"\nmodels = [\"noop\"]\nevents = [\"started\", \"completed\"]\n"
    );
    let cluster = cluster_with(&webhooks_config(true, &endpoint)).await;
    let client = cluster.client().await;
    let job = client.submit(&noop_job(&format!("{base}/hook"), &[WebhookEvent::Completed])).await.unwrap().job_id;
    wait_for(&cluster, Duration::from_secs(20), "the job's and the endpoint's messages", || {
        rx.got("/hook").len() == 1 && rx.got("/cfg").len() == 2
    })
    .await;
    let cfg = rx.got("/cfg");
    assert!(cfg.iter().all(|r| r.verified), "signed with the endpoint's own secret: {cfg:#?}");
    // Messages are delivered concurrently: their order at the receiver is not the events'.
    let mut types: Vec<&str> = cfg.iter().map(|r| r.body["type"].as_str().unwrap_or("")).collect();
    types.sort();
    assert_eq!(types, ["job.completed", "job.started"]);
    assert!(cfg.iter().all(|r| r.body["data"]["job_id"] == job.as_str()));
    assert!(cfg.iter().all(|r| r.id != rx.got("/hook")[0].id), "each endpoint's message has its own webhook-id");
}

/// An endpoint's `api_keys` select jobs by the `api_key` label, which a gateway with
/// `[[http.api_keys]]` sets to the key's name on every job it submits (a single job and each
/// item of a batch), replacing one the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_keys_endpoint_gets_the_jobs_submitted_with_that_key_only() {
    const TEAM_A: &str = "team-a-key-5d1f07";
    const TEAM_B: &str = "team-b-key-9a3c44";
    let (rx, base, _server) = receiver().await;
    let endpoint =
        format!("[[webhooks.endpoints]]\nname = \"team-a\"\nurl = \"{base}/cfg\"\nsecret = \"{OTHER_SECRET}\"\napi_keys = [\"team-a\"]\n");
    let cluster = cluster_with(&webhooks_config(true, &endpoint)).await;
    let keys = format!(
        "[http]\n[[http.api_keys]]\nname = \"team-a\"\nsha256 = \"{}\"\n[[http.api_keys]]\nname = \"team-b\"\nsha256 = \"{}\"\n",
        kiln::gateway::hash_key(TEAM_A),
        kiln::gateway::hash_key(TEAM_B)
    );
    let gateway_config = format!("{}\n{keys}", node_config(&cluster, &webhooks_config(true, &endpoint)));
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw", &gateway_config, &cluster.url());
    let http = http();
    let submit = |key: &'static str, labels: serde_json::Value| {
        let request = http.post(gateway.url("/v1/jobs")).bearer_auth(key).json(&serde_json::json!({"model": "noop", "labels": labels}));
        async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 201);
            r.json::<serde_json::Value>().await.unwrap()["job_id"].as_str().unwrap().to_string()
        }
    };
    let a = submit(TEAM_A, serde_json::json!({"user_id": "u1"})).await;
    // team-b's client claims to be team-a: the gateway's label wins.
    let b = submit(TEAM_B, serde_json::json!({"api_key": "team-a", "user_id": "u1"})).await;
    let batch: serde_json::Value = http
        .post(gateway.url("/v1/batches"))
        .bearer_auth(TEAM_A)
        .json(&serde_json::json!({"model": "noop", "items": [{"labels": {"api_key": "team-b"}}, {}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items: Vec<String> = batch["items"].as_array().expect("items").iter().map(|i| i["job_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(items.len(), 2, "{batch}");

    let client = cluster.client().await;
    for id in [&a, &b].into_iter().chain(&items) {
        let view = wait_terminal(&client, id, Duration::from_secs(30)).await;
        assert_eq!(view.status, JobState::Completed);
        let key = if id == &b { "team-b" } else { "team-a" };
        assert_eq!(view.labels.get("api_key").map(String::as_str), Some(key), "{view:?}");
    }
    assert_eq!(client.status(&a).await.unwrap().labels.get("user_id").map(String::as_str), Some("u1"), "the client's labels stay");
    let distinct = || rx.got("/cfg").iter().map(|r| r.id.clone()).collect::<std::collections::BTreeSet<_>>().len();
    wait_for(&cluster, Duration::from_secs(20), "team-a's three completions", || distinct() >= 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = rx.got("/cfg");
    // At least once: a message delivered twice (same webhook-id) counts once, as a receiver
    // de-duplicates.
    let delivered: std::collections::BTreeSet<(String, String)> =
        got.iter().map(|r| (r.body["data"]["job_id"].as_str().unwrap_or("").to_string(), r.id.clone())).collect();
    let jobs: Vec<&str> = delivered.iter().map(|(job, _)| job.as_str()).collect();
    let mut expected = vec![a.as_str(), items[0].as_str(), items[1].as_str()];
    expected.sort();
    assert_eq!(jobs, expected, "team-a's jobs, one message each, and not team-b's {b}: {got:#?}");
    assert!(got.iter().all(|r| r.verified && r.body["type"] == "job.completed"), "{got:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_preview_messages_are_throttled_to_one_per_interval() {
    let (rx, base, _server) = receiver().await;
    let mut cluster = TestCluster::new();
    let extra = format!("{}\n{}", demo_model("demo", &[], 3, 60_000), webhooks_config(true, "progress_interval_ms = 400"));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &extra));
    cluster.wait_node_ready("n1", 1).await;
    let client = cluster.client().await;
    // 30 steps of 50 ms: 30 progress events in about 1.5 s.
    let mut request = prompt_request("demo", "a fox", serde_json::json!({"steps": 30, "step_ms": 50}));
    request.webhook = Some(WebhookSpec {
        url: format!("{base}/hook"),
        events: vec![WebhookEvent::Started, WebhookEvent::Progress, WebhookEvent::Preview, WebhookEvent::Completed],
    });
    let job = client.submit(&request).await.unwrap().job_id;
    let view = wait_terminal(&client, &job, Duration::from_secs(60)).await;
    assert_eq!(view.status, JobState::Completed);
    let events = history(&client, &job).await;
    let progress_events = events.iter().filter(|e| e.kind == kiln_core::protocol::EventKind::Progress).count();
    wait_for(&cluster, Duration::from_secs(20), "the completed message", || {
        rx.got("/hook").iter().any(|r| r.body["type"] == "job.completed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = rx.got("/hook");
    let progress: Vec<&Received> = got.iter().filter(|r| r.body["type"] == "job.progress").collect();
    assert!(got.iter().any(|r| r.body["type"] == "job.started"), "{got:#?}");
    assert!(got.iter().all(|r| r.verified));
    // The run lasts about 1.5 s; one message per 400 ms is at most 5 or so, against 30+ events.
    assert!(progress_events >= 30, "the worker reported every step: {progress_events}");
    assert!(
        !progress.is_empty() && progress.len() <= 6,
        "{} progress messages for {progress_events} events: {progress:#?}",
        progress.len()
    );
    assert!(progress.iter().all(|r| r.body["data"]["progress"].is_number()), "{progress:#?}");
    // Live previews (the demo worker sends one per 500 ms, the model's default interval): named,
    // not carried.
    let previews: Vec<&Received> = got.iter().filter(|r| r.body["type"] == "job.preview").collect();
    assert!(!previews.is_empty() && previews.len() <= 6, "{previews:#?}");
    for p in &previews {
        assert_eq!(p.body["data"]["preview"]["content_type"], "image/png", "{p:#?}");
        assert!(p.body["data"]["preview"]["size"].as_u64().is_some_and(|s| s > 0), "{p:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_delivers_what_a_killed_node_had_pending() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cluster = TestCluster::new();
    let config = node_config(&cluster, &webhooks_config(true, ""));
    cluster.add_node("n1", &config);
    cluster.add_node("n2", &config);
    cluster.wait_node_ready("n1", 1).await;
    cluster.wait_node_ready("n2", 1).await;
    let client = cluster.client().await;
    let mut jobs = vec![];
    for _ in 0..6 {
        jobs.push(client.submit(&noop_job(&format!("{base}/down"), &[])).await.unwrap().job_id);
    }
    let ok = eventually(Duration::from_secs(30), || async {
        for job in &jobs {
            let log = client.webhooks(job).await.map(|l| l.attempts).unwrap_or_default();
            if !log.iter().any(|a| a.outcome == "retrying") {
                return false;
            }
        }
        true
    })
    .await;
    assert!(ok, "every message failed once and waits for a retry");
    // n1 dies for good, in the middle of whatever it was doing; n2 is the cluster now.
    cluster.nodes[0].signal(libc::SIGKILL);
    cluster.nodes[0].wait_exit(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rx = Arc::new(Receiver::default());
    let _server = serve(tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap(), rx.clone());
    wait_for(&cluster, Duration::from_secs(60), "all six messages, from the node left", || {
        let got = rx.got("/down");
        jobs.iter().all(|j| got.iter().any(|r| r.body["data"]["job_id"] == j.as_str()))
    })
    .await;
    assert!(rx.got("/down").iter().all(|r| r.verified));
}
