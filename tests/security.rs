//! The example server config of docs/SECURITY.md (`examples/security/nats-server.conf`, loaded
//! as shipped): two tenants, `acme` and `beta`, each a NATS account with a node user and a client
//! user. Nodes work fully with the node user (registry, queue, events, results, the actor-cluster
//! mesh); a client can submit, follow events, upload and download its results, and the server
//! refuses it (a permissions violation it reports back) everything else tested here.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kiln_core::config::NatsConfig;
use kiln_core::job::JobState;
use kiln_core::nats::{resources, NatsServer};
use kiln_core::protocol::InputValue;

fn example_conf() -> std::path::PathBuf {
    repo().join("examples/security/nats-server.conf")
}

fn user(server: &NatsServer, prefix: &str, role: &str) -> NatsConfig {
    NatsConfig {
        prefix: prefix.into(),
        user: format!("{prefix}-{role}"),
        password: format!("example-{prefix}-{role}-password"),
        connect_timeout_ms: 3_000,
        ..NatsConfig::for_url(&server.url())
    }
}

/// A raw connection with Kiln's connect options that records the errors the server sends it
/// (a permissions violation comes back as `-ERR 'Permissions Violation for ...'`).
struct Watched {
    client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Watched {
    async fn connect(nats: &NatsConfig) -> Watched {
        let errors: Arc<Mutex<Vec<String>>> = Default::default();
        let sink = errors.clone();
        let options = resources::connect_options(nats, "security-test").await.unwrap().event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    sink.lock().unwrap().push(e.to_string());
                }
            }
        });
        Watched { client: options.connect(nats.url.as_str()).await.unwrap(), errors }
    }

    /// Waits for the server to report a violation for `what` on `subject`.
    async fn refused(&self, what: &str, subject: &str) {
        let needle = format!("Permissions Violation for {what} to \"{subject}\"").to_lowercase();
        let seen =
            eventually(Duration::from_secs(5), || async { self.errors.lock().unwrap().iter().any(|e| e.to_lowercase().contains(&needle)) })
                .await;
        assert!(seen, "expected a refusal {needle:?}; server errors seen: {:?}", self.errors.lock().unwrap());
    }

    fn js(&self) -> async_nats::jetstream::Context {
        let mut js = async_nats::jetstream::new(self.client.clone());
        js.set_timeout(Duration::from_secs(2));
        js
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_lets_nodes_and_clients_work_and_refuses_clients_the_rest() {
    let server = NatsServer::start_with_config(&example_conf(), false).expect("nats-server with the example config");
    let acme_client = user(&server, "acme", "client");
    let acme_node = user(&server, "acme", "node");
    let mut cluster = TestCluster::with_server(server);
    cluster.client_nats = acme_client.clone();

    // Two acme nodes with the node user: they create every stream and bucket, register, open
    // an actor-cluster session through the tunnel subjects, and run jobs.
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000))
        .replace("[nats]\n", "[nats]\nprefix = \"acme\"\nuser = \"acme-node\"\n");
    let env = [("KILN_NATS_PASSWORD", acme_node.password.as_str())];
    cluster.add_node_with_env("n1", &config, &env);
    cluster.add_node_with_env("n2", &config, &env);
    cluster.wait_node_ready("n1", 1).await;
    cluster.wait_node_ready("n2", 1).await;
    // The operator (node user) makes n1 call n2: the session opens through the tunnel subjects.
    cluster.client_nats = acme_node.clone();
    cluster.wait_mesh(&["n1", "n2"], Duration::from_secs(20)).await;
    cluster.client_nats = acme_client.clone();

    // The client: upload an input, submit, follow the events, read the result, download it.
    let client = cluster.client().await;
    client.upload("uploads/s1/ref.png", b"\x89PNG\r\n\x1a\nnot really").await.unwrap();
    let mut request = prompt_request("demo", "a walled garden", serde_json::json!({"steps": 2, "step_ms": 10}));
    request.inputs.insert("image".into(), InputValue::Object { object: "uploads/s1/ref.png".into() });
    let reply = client.submit(&request).await.unwrap();
    let events = history(&client, &reply.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "completed"], "{events:#?}");
    let result = client.result(&reply.job_id).await.unwrap();
    assert_eq!(result.status, JobState::Completed);
    let dir = tempfile::tempdir().unwrap();
    for a in &result.artifacts {
        client.download(a, &dir.path().join(&a.name)).await.unwrap();
    }
    assert_eq!(result.artifacts.len(), 2);
    assert!(!client.cluster().await.unwrap().gpus.is_empty());

    // Everything else is refused, by the server, to the client.
    let w = Watched::connect(&acme_client).await;
    let js = w.js();
    for (bucket, key) in [("acme_gpus", "n1.cpu-0"), ("acme_nodes", "n1"), ("acme_jobs", "forged-job")] {
        let subject = format!("$KV.{bucket}.{key}");
        assert!(js.publish(subject.clone(), "{}".into()).await.unwrap().await.is_err(), "{subject} must not be written");
        w.refused("Publish", &subject).await;
    }
    for subject in ["acme.tunnel.open.n1", "acme.jobs.demo.high", "acme.events.forged", "acme.api.control", "acme.tunnel.want.n1"] {
        w.client.publish(subject, "x".into()).await.unwrap();
        w.client.flush().await.unwrap();
        w.refused("Publish", subject).await;
    }
    // Listening in on the tunnels, the queue, or a node's diagnostics.
    for subject in ["acme.tunnel.>", "acme.jobs.>", "acme.node.n1.ping"] {
        let _sub = w.client.subscribe(subject).await.unwrap();
        w.client.flush().await.unwrap();
        w.refused("Subscription", subject).await;
    }
    // Reading the files bucket back, the registry, or the job records directly.
    assert!(js.get_key_value("acme_jobs").await.is_err());
    w.refused("Publish", "$JS.API.STREAM.INFO.KV_acme_jobs").await;

    // Another tenant's results: beta's node writes a result; beta's client reads it; acme's
    // client is refused, and even acme's node (another account) does not see the bucket.
    let beta_node = Watched::connect(&user(&cluster.server, "beta", "node")).await;
    let store = beta_node
        .js()
        .create_object_store(async_nats::jetstream::object_store::Config { bucket: "beta_results_demo".into(), ..Default::default() })
        .await
        .unwrap();
    store.put("job-1/secret.txt", &mut &b"beta's result"[..]).await.unwrap();
    let beta_client = Watched::connect(&user(&cluster.server, "beta", "client")).await;
    let mut object = beta_client.js().get_object_store("beta_results_demo").await.unwrap().get("job-1/secret.txt").await.unwrap();
    let mut data = vec![];
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut data).await.unwrap();
    assert_eq!(data, b"beta's result");
    // A large one too: its download needs the flow-control replies the client may send.
    let big: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
    store.put("job-1/big.bin", &mut &big[..]).await.unwrap();
    let mut object = beta_client.js().get_object_store("beta_results_demo").await.unwrap().get("job-1/big.bin").await.unwrap();
    let mut data = vec![];
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut data).await.unwrap();
    assert!(data == big, "the large result arrives whole");

    assert!(js.get_object_store("beta_results_demo").await.is_err());
    w.refused("Publish", "$JS.API.STREAM.INFO.OBJ_beta_results_demo").await;
    assert!(js.get_stream("OBJ_beta_results_demo").await.is_err());
    let acme_node_conn = Watched::connect(&acme_node).await;
    let err = acme_node_conn.js().get_object_store("beta_results_demo").await.err().expect("accounts are isolated").to_string();
    assert!(err.to_lowercase().contains("not found"), "{err}");
    assert!(acme_node_conn.errors.lock().unwrap().is_empty(), "the node user is not refused its own account's API");

    // The server logs each refusal with the user it refused.
    let log = cluster.server.log();
    for l in log.lines().filter(|l| l.contains("Violation")) {
        eprintln!("DBG {l}");
    }
    assert!(log.contains(r#""ACME/user:acme-client" - Publish Violation - Subject "$KV.acme_gpus.n1.cpu-0""#), "{log}");
    assert!(log.contains(r#""ACME/user:acme-client" - Subscription Violation - Subject "acme.tunnel.>""#), "{log}");
    let by_others: Vec<&str> = log.lines().filter(|l| l.contains("Violation") && !l.contains("ACME/user:acme-client")).collect();
    assert!(by_others.is_empty(), "only the client was refused anything: {by_others:#?}");
}
