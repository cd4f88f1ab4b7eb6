//! API keys and tenants over HTTP, against the example server config of docs/SECURITY.md (two
//! NATS accounts, `acme` and `beta`): one gateway serves both tenants, each API key mapped to
//! that tenant's `-gateway` NATS user and prefix. A key sees its tenant only; no key, or a wrong
//! one, gets 401; no key or NATS password ever reaches the gateway's log or an error body.

mod common;

use std::time::Duration;

use common::*;
use kiln_core::nats::NatsServer;
use serde_json::{json, Value};

const ACME_KEY: &str = "acme-api-key-3f9c2e7a";
const BETA_KEY: &str = "beta-api-key-81d04b6c";

fn node_config(url: &str, tenant: &str) -> String {
    config_toml(url, &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000))
        .replace("[nats]\n", &format!("[nats]\nprefix = \"{tenant}\"\nuser = \"{tenant}-node\"\n"))
}

fn gateway_config(url: &str) -> String {
    // The gateway's own connection (readiness) is acme's gateway user; each key has its own.
    format!(
        r#"
[nats]
url = "{url}"
prefix = "acme"
user = "acme-gateway"
password = "example-acme-gateway-password"
[http]
[[http.api_keys]]
name = "acme"
sha256 = "{acme}"
prefix = "acme"
user = "acme-gateway"
password = "example-acme-gateway-password"
[[http.api_keys]]
name = "beta"
sha256 = "{beta}"
prefix = "beta"
user = "beta-gateway"
password = "example-beta-gateway-password"
{models}
"#,
        acme = kiln::gateway::hash_key(ACME_KEY),
        beta = kiln::gateway::hash_key(BETA_KEY),
        models = demo_model("demo", &[], 3, 60_000),
    )
}

async fn body(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_api_key_sees_its_own_tenant_and_nothing_else() {
    let server = NatsServer::start_with_config(&repo().join("examples/security/nats-server.conf"), false).expect("nats-server");
    let mut cluster = TestCluster::with_server(server);
    let url = cluster.url();
    cluster.add_node_with_env("acme-n1", &node_config(&url, "acme"), &[("KILN_NATS_PASSWORD", "example-acme-node-password")]);
    cluster.add_node_with_env("beta-n1", &node_config(&url, "beta"), &[("KILN_NATS_PASSWORD", "example-beta-node-password")]);
    let gw = GatewayProcess::spawn(cluster.dir.path(), "gw", &gateway_config(&url), &url);
    let h = http();

    // Both nodes up, each seen through its own key only.
    let ready = eventually(Duration::from_secs(30), || async {
        let r = h.get(gw.url("/v1/cluster")).bearer_auth(ACME_KEY).send().await.unwrap();
        r.status() == 200 && body(r).await.1["gpus"].as_array().is_some_and(|g| !g.is_empty())
    })
    .await;
    assert!(ready, "acme's node is not ready; log:\n{}", gw.log());
    let (_, acme_cluster) = body(h.get(gw.url("/v1/cluster")).bearer_auth(ACME_KEY).send().await.unwrap()).await;
    assert!(acme_cluster["nodes"].as_array().unwrap().iter().all(|n| n["node"] == "acme-n1"), "{acme_cluster}");
    let beta_ready = eventually(Duration::from_secs(30), || async {
        let (_, c) = body(h.get(gw.url("/v1/cluster")).bearer_auth(BETA_KEY).send().await.unwrap()).await;
        c["nodes"].as_array().is_some_and(|n| n.len() == 1 && n[0]["node"] == "beta-n1")
    })
    .await;
    assert!(beta_ready);

    // No key, a wrong key, a malformed header: 401, coded, with the challenge.
    for request in [
        h.get(gw.url("/v1/jobs")),
        h.get(gw.url("/v1/jobs")).bearer_auth("not-a-key"),
        h.get(gw.url("/v1/jobs")).header("authorization", "Basic YWNtZTp4"),
        h.get(gw.url("/v1/jobs?access_token=wrong")),
    ] {
        let r = request.send().await.unwrap();
        assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
        let (status, err) = body(r).await;
        assert_eq!((status, err["code"].as_str()), (401, Some("unauthorized")), "{err}");
    }
    // The probes and the console's assets need no key (the console asks for one itself).
    for path in ["/healthz", "/readyz", "/metrics", "/", "/console/app.js", "/openapi.json"] {
        assert_eq!(h.get(gw.url(path)).send().await.unwrap().status(), 200, "{path}");
    }

    // acme submits with a file (uploaded with acme's gateway user), follows its events with the
    // key in the query (as EventSource must), downloads the result.
    let form = reqwest::multipart::Form::new()
        .text("model", "demo")
        .text("prompt", "a tenant's fox")
        .text("params", r#"{"steps": 2, "step_ms": 10}"#)
        .part("image", reqwest::multipart::Part::bytes(vec![1u8; 2048]).file_name("fox.png"));
    let (status, reply) = body(h.post(gw.url("/v1/jobs")).bearer_auth(ACME_KEY).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, 201, "{reply}");
    let id = reply["job_id"].as_str().unwrap().to_string();
    let events =
        read_sse(h.get(gw.url(&format!("/v1/jobs/{id}/events?access_token={ACME_KEY}"))).send().await.unwrap(), Duration::from_secs(60))
            .await;
    assert!(events.last().unwrap().2.contains("\"completed\""), "{events:?}");
    let png = h.get(gw.url(&format!("/v1/jobs/{id}/artifacts/image.png"))).bearer_auth(ACME_KEY).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));
    let (_, view) = body(h.get(gw.url(&format!("/v1/jobs/{id}"))).bearer_auth(ACME_KEY).send().await.unwrap()).await;
    let upload = view["inputs"]["image"]["object"].as_str().unwrap().to_string();
    assert_eq!(h.get(gw.url(&format!("/v1/files/{upload}"))).bearer_auth(ACME_KEY).send().await.unwrap().status(), 200);

    // beta's key cannot see any of it: another account, another prefix.
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/events"), format!("/v1/jobs/{id}/artifacts/image.png")] {
        let (status, err) = body(h.get(gw.url(&path)).bearer_auth(BETA_KEY).send().await.unwrap()).await;
        assert_eq!((status, err["code"].as_str()), (404, Some("not_found")), "{path}: {err}");
    }
    let (_, beta_jobs) = body(h.get(gw.url("/v1/jobs")).bearer_auth(BETA_KEY).send().await.unwrap()).await;
    assert!(beta_jobs["jobs"].as_array().unwrap().is_empty());
    let beta_file = h.get(gw.url(&format!("/v1/files/{upload}"))).bearer_auth(BETA_KEY).send().await.unwrap();
    assert_eq!(beta_file.status(), 404);
    // beta's own job runs on beta's node.
    let (status, reply) = body(
        h.post(gw.url("/v1/jobs"))
            .bearer_auth(BETA_KEY)
            .json(&json!({"model": "demo", "inputs": {"prompt": "beta"}, "params": {"steps": 1, "step_ms": 10}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let beta_id = reply["job_id"].as_str().unwrap();
    let done = eventually(Duration::from_secs(60), || async {
        let (_, v) = body(h.get(gw.url(&format!("/v1/jobs/{beta_id}"))).bearer_auth(BETA_KEY).send().await.unwrap()).await;
        v["status"] == "completed" && v["node"] == "beta-n1"
    })
    .await;
    assert!(done);

    // Never a key or a NATS password in the gateway's log.
    let log = gw.log();
    for secret in [ACME_KEY, BETA_KEY, "example-acme-gateway-password", "example-beta-gateway-password"] {
        assert!(!log.contains(secret), "{secret} leaked into the log:\n{log}");
    }
}

#[test]
fn a_gateway_without_keys_refuses_an_address_others_can_reach() {
    let server = NatsServer::start_temp().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, format!("[nats]\nurl = \"{}\"\n", server.url())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["gateway", "--config"])
        .arg(&config)
        .args(["--http-addr", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without API keys"), "{stderr}");
    // `--hash-key` prints what `[[http.api_keys]] sha256` stores.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(["gateway", "--hash-key", "secret"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), kiln::gateway::hash_key("secret"));
}
