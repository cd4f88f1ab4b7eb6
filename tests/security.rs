//! docs/SECURITY.md is a contract: two tenants, `acme` and `beta`, each a NATS account with a
//! node user and a client user (`examples/security/nats-server.conf`). The server runs that file
//! with the acme client given exactly the permissions the doc's `ACME_CLIENT` block lists, read
//! from the doc (and the file's own block must be the same). Nodes work fully with the node user
//! (registry, queue, events, results, the actor-cluster mesh). A client does everything
//! docs/PROTOCOL.md says a client does, through async-nats, through real nats-py and through
//! real nats.js, without one permission violation; the server refuses it (a permissions
//! violation it reports back) everything else tested here.

mod common;

use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln::client::Client;
use kiln_core::config::NatsConfig;
use kiln_core::job::JobState;
use kiln_core::nats::{resources, NatsServer};
use kiln_core::protocol::{BatchItemRequest, BatchSubmitRequest, Event, InputValue, ListJobsRequest};

fn example_conf() -> PathBuf {
    repo().join("examples/security/nats-server.conf")
}

/// The `NAME = { ... }` block of a nats-server config: from its first line to the next line
/// that is a lone `}`.
fn conf_block<'a>(conf: &'a str, name: &str) -> Option<&'a str> {
    let opening = format!("{name} = {{");
    let start = conf.find(&format!("\n{opening}")).map(|i| i + 1).or_else(|| conf.starts_with(&opening).then_some(0))?;
    let end = start + conf[start..].find("\n}")? + 2;
    Some(&conf[start..end])
}

/// The client permissions docs/SECURITY.md documents: the `ACME_CLIENT` block of the config it
/// shows under "What a client needs".
fn documented_client_permissions() -> String {
    let doc = std::fs::read_to_string(repo().join("docs/SECURITY.md")).unwrap();
    let section = doc_section(&doc, "## What a client needs");
    let blocks = fenced_blocks(section, "conf");
    let block = blocks.iter().find_map(|b| conf_block(b, "ACME_CLIENT")).expect("docs/SECURITY.md shows the ACME_CLIENT block");
    block.to_string()
}

/// The example config with its `ACME_CLIENT` block replaced by the documented one, written to
/// `dir`: what the server of these tests runs.
fn conf_with_documented_client(dir: &Path) -> PathBuf {
    let example = std::fs::read_to_string(example_conf()).unwrap();
    let shipped = conf_block(&example, "ACME_CLIENT").expect("the example config has ACME_CLIENT");
    let path = dir.join("nats-server.conf");
    std::fs::write(&path, example.replace(shipped, &documented_client_permissions())).unwrap();
    path
}

/// A config block's content, without comments and blank space: what nats-server reads of it.
fn permissions_of(block: &str) -> String {
    block.lines().map(|l| l.split('#').next().unwrap().trim()).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
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

/// The lines of the server's log that report a permissions violation.
fn violations(server: &NatsServer) -> Vec<String> {
    server.log().lines().filter(|l| l.contains("Violation")).map(str::to_string).collect()
}

/// Prints the server's permission violations if the test fails while it is alive: what a
/// client was refused explains most failures here.
struct ViolationsOnPanic<'a>(&'a NatsServer);

impl Drop for ViolationsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- permission violations in the nats-server log ----\n{}", violations(self.0).join("\n"));
        }
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

/// The object's meta subject, as every client library names it.
fn meta_subject(bucket: &str, object: &str) -> String {
    use base64::Engine;
    format!("$O.{bucket}.M.{}", base64::engine::general_purpose::URL_SAFE.encode(object))
}

/// What nats-py's and nats.js's object store do before a `put` or a `get`, which async-nats's
/// own does differently: look the object's info up with `$JS.API.STREAM.MSG.GET` (not a direct
/// get). Returns whether the object exists.
async fn lookup_as_nats_py_does(js: &async_nats::jetstream::Context, bucket: &str, object: &str) -> bool {
    let stream = js.get_stream(format!("OBJ_{bucket}")).await.expect("stream info");
    match stream.get_last_raw_message_by_subject(&meta_subject(bucket, object)).await {
        Ok(_) => true,
        Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => false,
        Err(e) => panic!("{bucket}/{object}: the info lookup nats-py makes failed: {e}"),
    }
}

/// Every event a core NATS subscription gets until the terminal one.
async fn live_events(sub: &mut async_nats::Subscriber) -> Vec<Event> {
    let mut events = vec![];
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
        let event: Event = serde_json::from_slice(&msg.payload).unwrap();
        let done = event.is_terminal();
        events.push(event);
        if done {
            break;
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_permissions_let_nodes_and_clients_work_and_refuse_clients_the_rest() {
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_with_documented_client(conf_dir.path());
    let server = NatsServer::start_with_config(&conf, false).expect("nats-server with the example config");
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

    let _report = ViolationsOnPanic(&cluster.server);

    // The client, on one watched connection: everything PROTOCOL says a client does.
    let w = Watched::connect(&acme_client).await;
    let js = w.js();
    let client = Client::from_nats(w.client.clone(), "acme").with_timeout(Duration::from_secs(10));

    // Uploads: Kiln's client, async-nats's object store, and the info lookup nats-py and
    // nats.js make before their put.
    client.upload("uploads/s1/ref.png", b"\x89PNG\r\n\x1a\nnot really").await.unwrap();
    let files = js.get_object_store("acme_files").await.unwrap();
    files.put("uploads/s1/notes.txt", &mut &b"uploaded by async-nats"[..]).await.unwrap();
    assert!(!lookup_as_nats_py_does(&js, "acme_files", "uploads/s1/as-nats-py.txt").await);
    files.put("uploads/s1/as-nats-py.txt", &mut &b"uploaded as nats-py does"[..]).await.unwrap();

    // Submit with the upload; follow it live with a core subscription, read its view, replay
    // its history from the stream, download its artifacts.
    let mut request = prompt_request("demo", "a walled garden", serde_json::json!({"steps": 10, "step_ms": 100}));
    request.inputs.insert("image".into(), InputValue::Object { object: "uploads/s1/ref.png".into() });
    let reply = client.submit(&request).await.unwrap();
    let mut live = w.client.subscribe(format!("acme.events.{}", reply.job_id)).await.unwrap();
    let view = client.status(&reply.job_id).await.unwrap();
    assert_eq!(view.job_id, reply.job_id);
    let seen_live = live_events(&mut live).await;
    assert_eq!(seen_live.last().and_then(|e| e.status), Some(JobState::Completed), "live events: {seen_live:#?}");
    let events = history(&client, &reply.job_id).await;
    assert_eq!(statuses(&events), ["queued", "running", "completed"], "{events:#?}");
    let result = client.result(&reply.job_id).await.unwrap();
    assert_eq!(result.status, JobState::Completed);
    assert_eq!(result.artifacts.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    for a in &result.artifacts {
        client.download(a, &dir.path().join(&a.name)).await.unwrap();
        // nats-py and nats.js: account info (nats.js checks it first), the info lookup, and
        // the stream holding the chunks (nats-py finds it by subject).
        assert!(lookup_as_nats_py_does(&js, &a.bucket, &a.object).await);
        js.query_account().await.expect("$JS.API.INFO");
        let chunks = format!("$O.{}.C.x", a.bucket);
        assert_eq!(js.stream_by_subject(chunks).await.expect("$JS.API.STREAM.NAMES"), format!("OBJ_{}", a.bucket));
    }
    // A large result (24 MiB, written by the node user as a node writes artifacts): its
    // download stalls without the flow-control replies the client sends.
    let big: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
    let node_js = Watched::connect(&acme_node).await.js();
    node_js.get_object_store("acme_results_demo").await.unwrap().put("big-job/1/big.bin", &mut &big[..]).await.unwrap();
    let mut object = js.get_object_store("acme_results_demo").await.unwrap().get("big-job/1/big.bin").await.unwrap();
    let mut data = vec![];
    let read = tokio::time::timeout(Duration::from_secs(60), tokio::io::AsyncReadExt::read_to_end(&mut object, &mut data));
    read.await.expect("the 24 MiB download stalled").unwrap();
    assert!(data == big, "the large result arrives whole");

    // Cancel a long job (queued or running).
    let slow = client.submit(&prompt_request("demo", "a slow one", serde_json::json!({"steps": 1000, "step_ms": 50}))).await.unwrap();
    client.cancel(&slow.job_id).await.unwrap();
    assert_eq!(wait_terminal(&client, &slow.job_id, Duration::from_secs(30)).await.status, JobState::Cancelled);

    // Batches: one to its end (its events replayed), one cancelled, retried and cancelled.
    let item = |prompt: &str| BatchItemRequest {
        inputs: [("prompt".to_string(), InputValue::Inline(prompt.into()))].into(),
        ..Default::default()
    };
    let quick = BatchSubmitRequest {
        model: "demo".into(),
        items: vec![item("frame 1"), item("frame 2")],
        params: params(serde_json::json!({"steps": 1, "step_ms": 0})),
        ..Default::default()
    };
    let batch = client.submit_batch(&quick).await.unwrap();
    let done = client.wait_batch(&batch.batch_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(done.summary.completed, 2, "{done:#?}");
    let long = BatchSubmitRequest { params: params(serde_json::json!({"steps": 1000, "step_ms": 50})), ..quick };
    let batch = client.submit_batch(&long).await.unwrap();
    client.cancel_batch(&batch.batch_id).await.unwrap();
    client.wait_batch(&batch.batch_id, Duration::from_secs(30), |_| {}).await.unwrap();
    let retry = client.retry_batch(&batch.batch_id).await.unwrap();
    client.cancel_batch(&retry.batch_id).await.unwrap();
    assert_eq!(client.batch(&retry.batch_id).await.unwrap().retry_of.as_deref(), Some(batch.batch_id.as_str()));

    // The cluster, the models, the jobs, and service discovery.
    assert!(!client.cluster().await.unwrap().gpus.is_empty());
    assert!(client.models().await.unwrap().models.iter().any(|m| m.name == "demo"));
    assert!(!client.jobs(&ListJobsRequest::default()).await.unwrap().jobs.is_empty());
    for verb in ["PING", "INFO", "STATS"] {
        let reply = w.client.request(format!("$SRV.{verb}.acme-api"), "".into()).await.unwrap();
        assert!(String::from_utf8_lossy(&reply.payload).contains("acme-api"), "$SRV.{verb}");
    }

    // All of it without one refusal.
    w.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.errors.lock().unwrap().is_empty(), "the client was refused: {:?}", w.errors.lock().unwrap());
    let refused = violations(&cluster.server);
    assert!(refused.is_empty(), "what PROTOCOL says a client does was refused: {refused:#?}");

    // Everything else is refused, by the server, to the client.
    for (bucket, key) in [("acme_gpus", "n1.cpu-0"), ("acme_nodes", "n1"), ("acme_jobs", "forged-job")] {
        let subject = format!("$KV.{bucket}.{key}");
        assert!(js.publish(subject.clone(), "{}".into()).await.unwrap().await.is_err(), "{subject} must not be written");
        w.refused("Publish", &subject).await;
    }
    // (A node's cancel notices too: a client cancels through the API, which checks the record.)
    for subject in [
        "acme.tunnel.open.n1",
        "acme.jobs.demo.high",
        "acme.events.forged",
        "acme.api.control",
        "acme.tunnel.want.n1",
        "acme.node.n1.cancel",
    ] {
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
    // The registry and the job records directly; consuming or purging the files bucket.
    assert!(js.get_key_value("acme_jobs").await.is_err());
    w.refused("Publish", "$JS.API.STREAM.INFO.KV_acme_jobs").await;
    for subject in ["$JS.API.CONSUMER.CREATE.OBJ_acme_files", "$JS.API.STREAM.PURGE.OBJ_acme_files"] {
        w.client.publish(subject, "{}".into()).await.unwrap();
        w.client.flush().await.unwrap();
        w.refused("Publish", subject).await;
    }

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

    assert!(js.get_object_store("beta_results_demo").await.is_err());
    w.refused("Publish", "$JS.API.STREAM.INFO.OBJ_beta_results_demo").await;
    assert!(js.get_stream("OBJ_beta_results_demo").await.is_err());
    let acme_node_conn = Watched::connect(&acme_node).await;
    let err = acme_node_conn.js().get_object_store("beta_results_demo").await.err().expect("accounts are isolated").to_string();
    assert!(err.to_lowercase().contains("not found"), "{err}");
    assert!(acme_node_conn.errors.lock().unwrap().is_empty(), "the node user is not refused its own account's API");

    // The server logs each refusal with the user it refused.
    let log = cluster.server.log();
    assert!(log.contains(r#""ACME/user:acme-client" - Publish Violation - Subject "$KV.acme_gpus.n1.cpu-0""#), "{log}");
    assert!(log.contains(r#""ACME/user:acme-client" - Subscription Violation - Subject "acme.tunnel.>""#), "{log}");
    let by_others: Vec<&str> = log.lines().filter(|l| l.contains("Violation") && !l.contains("ACME/user:acme-client")).collect();
    assert!(by_others.is_empty(), "only the client was refused anything: {by_others:#?}");

    // The example file gives its client what the doc documents.
    let example = std::fs::read_to_string(example_conf()).unwrap();
    assert_eq!(
        permissions_of(conf_block(&example, "ACME_CLIENT").unwrap()),
        permissions_of(&documented_client_permissions()),
        "examples/security/nats-server.conf and docs/SECURITY.md must give the acme client the same permissions"
    );
}

/// A nats-py client as acme-client: everything PROTOCOL says a client does, the way nats-py
/// does it (its object store looks objects up with `$JS.API.STREAM.MSG.GET`, finds a stream by
/// subject, replays with a push ordered consumer that needs flow-control replies). Exits 1 on
/// any error the server sent it.
const NATS_PY_CLIENT: &str = r#"
import asyncio, hashlib, json, os, nats
from nats.js.api import DeliverPolicy

URL, PREFIX, MODEL = os.environ["KILN_URL"], os.environ["KILN_PREFIX"], os.environ["KILN_MODEL"]
TERMINAL = ("completed", "failed", "cancelled")

async def main():
    errors = []
    async def on_error(e):
        errors.append(str(e))
    nc = await nats.connect(URL, user=os.environ["KILN_USER"], password=os.environ["KILN_PASSWORD"], error_cb=on_error)
    js = nc.jetstream()

    async def call(endpoint, body):
        reply = json.loads((await nc.request(f"{PREFIX}.api.{endpoint}", json.dumps(body).encode(), timeout=10)).data)
        if set(reply) == {"error"}:
            raise RuntimeError(f"{endpoint}: {reply['error']}")
        return reply

    async def replay(subject, until):
        sub = await js.subscribe(subject, stream=f"{PREFIX.upper()}_EVENTS", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        events = []
        while not events or not until(events[-1]):
            events.append(json.loads((await sub.next_msg(timeout=30)).data))
        await sub.unsubscribe()
        return events

    files = await js.object_store(f"{PREFIX}_files")
    await files.put("uploads/nats-py/hello.txt", b"hello from nats-py")
    job = await call("submit", {"model": MODEL, "inputs": {"prompt": "a fox", "image": {"object": "uploads/nats-py/hello.txt"}},
                                "params": {"steps": 10, "step_ms": 100}})
    live = await nc.subscribe(f"{PREFIX}.events.{job['job_id']}")
    while True:
        event = json.loads((await live.next_msg(timeout=60)).data)
        if event["type"] == "status" and event["status"] in TERMINAL:
            break
    await live.unsubscribe()
    print("live:", event["status"])
    print("view:", (await call("status", {"job_id": job["job_id"]}))["status"])
    history = await replay(f"{PREFIX}.events.{job['job_id']}", lambda e: e["type"] == "status" and e["status"] in TERMINAL)
    print("replayed:", " ".join(e["status"] for e in history if e["type"] == "status"))

    result = await call("result", {"job_id": job["job_id"]})
    for a in result["artifacts"]:
        obj = await (await js.object_store(a["bucket"])).get(a["object"])
        assert hashlib.sha256(obj.data).hexdigest() == a["sha256"], a
        print("downloaded", a["name"], len(obj.data), "bytes; object metadata exposed:", hasattr(obj.info, "metadata"))

    slow = await call("submit", {"model": MODEL, "inputs": {"prompt": "slow"}, "params": {"steps": 1000, "step_ms": 50}})
    await call("cancel", {"job_id": slow["job_id"]})
    for _ in range(300):
        if (await call("status", {"job_id": slow["job_id"]}))["status"] == "cancelled":
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the cancelled job did not end cancelled")
    print("cancelled")

    batch = await call("submit_batch", {"model": MODEL, "params": {"steps": 1, "step_ms": 0},
                                        "items": [{"inputs": {"prompt": "a"}}, {"inputs": {"prompt": "b"}}]})
    await replay(f"{PREFIX}.events.{batch['batch_id']}", lambda e: e["type"] == "batch_finished")
    print("batch:", (await call("batch", {"batch_id": batch["batch_id"]}))["status"])
    await call("models", {})
    await call("cluster", {})
    print("service:", json.loads((await nc.request(f"$SRV.PING.{PREFIX}-api", b"", timeout=5)).data)["name"])

    # The results feed, as PROTOCOL's consumer reads it: a durable pull consumer, acked.
    feed = await js.pull_subscribe(f"{PREFIX}.finished.>", durable="backend", stream=f"{PREFIX.upper()}_FINISHED")
    ended = set()
    while job["job_id"] not in ended:
        for m in await feed.fetch(10, timeout=10):
            ended.add(json.loads(m.data)["job_id"])
            await m.ack()
    print("feed:", len(ended), "ended jobs")

    long = os.environ.get("KILN_LONG_HISTORY")
    if long:
        count = int(os.environ["KILN_LONG_HISTORY_EVENTS"])
        sub = await js.subscribe(f"{PREFIX}.events.{long}", stream=f"{PREFIX.upper()}_EVENTS", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        for _ in range(count):
            await sub.next_msg(timeout=10)
        await sub.unsubscribe()
        print("long history:", count, "events")

    await nc.close()
    if errors:
        raise SystemExit(f"the server refused: {errors}")
    print("nats-py client: ok")

asyncio.run(main())
"#;

/// The same as a nats.js (2.29.3) client: its object store checks the account (`$JS.API.INFO`)
/// and looks objects up with `$JS.API.STREAM.MSG.GET`; it replays with an ordered pull consumer.
const NATS_JS_CLIENT: &str = r#"
const { connect } = require("nats");
const crypto = require("node:crypto");
const { KILN_URL, KILN_PREFIX: PREFIX, KILN_MODEL: MODEL, KILN_USER, KILN_PASSWORD } = process.env;
const TERMINAL = ["completed", "failed", "cancelled"];

async function main() {
  const nc = await connect({ servers: KILN_URL, user: KILN_USER, pass: KILN_PASSWORD });
  const errors = [];
  (async () => { for await (const s of nc.status()) if (s.type === "error") errors.push(`${s.data}`); })();
  const js = nc.jetstream();
  async function call(endpoint, body) {
    const reply = (await nc.request(`${PREFIX}.api.${endpoint}`, JSON.stringify(body), { timeout: 10000 })).json();
    if (Object.keys(reply).length === 1 && reply.error) throw new Error(`${endpoint}: ${JSON.stringify(reply.error)}`);
    return reply;
  }
  async function replay(id, until) {
    const consumer = await js.consumers.get(`${PREFIX.toUpperCase()}_EVENTS`, { filterSubjects: `${PREFIX}.events.${id}` });
    const events = [];
    for await (const m of await consumer.consume()) {
      events.push(m.json());
      if (until(events[events.length - 1])) break;
    }
    return events;
  }

  const files = await js.views.os(`${PREFIX}_files`);
  await files.putBlob({ name: "uploads/nats-js/hello.txt" }, new TextEncoder().encode("hello from nats.js"));
  const job = await call("submit", { model: MODEL, inputs: { prompt: "a fox", image: { object: "uploads/nats-js/hello.txt" } },
                                     params: { steps: 10, step_ms: 100 } });
  const live = nc.subscribe(`${PREFIX}.events.${job.job_id}`);
  let last;
  for await (const m of live) {
    last = m.json();
    if (last.type === "status" && TERMINAL.includes(last.status)) break;
  }
  console.log("live:", last.status);
  console.log("view:", (await call("status", { job_id: job.job_id })).status);
  const history = await replay(job.job_id, (e) => e.type === "status" && TERMINAL.includes(e.status));
  console.log("replayed:", history.filter((e) => e.type === "status").map((e) => e.status).join(" "));

  const result = await call("result", { job_id: job.job_id });
  for (const a of result.artifacts) {
    const object = await (await js.views.os(a.bucket)).get(a.object);
    const chunks = [];
    for await (const chunk of object.data) chunks.push(chunk);
    const data = Buffer.concat(chunks);
    const sha256 = crypto.createHash("sha256").update(data).digest("hex");
    if (sha256 !== a.sha256) throw new Error(`${a.object}: sha256 ${sha256}, the job says ${a.sha256}`);
    console.log("downloaded", a.name, data.length, "bytes; object metadata sha256:", object.info.metadata.sha256 === a.sha256);
  }

  const slow = await call("submit", { model: MODEL, inputs: { prompt: "slow" }, params: { steps: 1000, step_ms: 50 } });
  await call("cancel", { job_id: slow.job_id });
  for (let i = 0; ; i++) {
    if ((await call("status", { job_id: slow.job_id })).status === "cancelled") break;
    if (i === 300) throw new Error("the cancelled job did not end cancelled");
    await new Promise((r) => setTimeout(r, 100));
  }
  console.log("cancelled");

  const batch = await call("submit_batch", { model: MODEL, params: { steps: 1, step_ms: 0 },
                                             items: [{ inputs: { prompt: "a" } }, { inputs: { prompt: "b" } }] });
  await replay(batch.batch_id, (e) => e.type === "batch_finished");
  console.log("batch:", (await call("batch", { batch_id: batch.batch_id })).status);
  await call("models", {});
  await call("cluster", {});
  console.log("service:", (await nc.request(`$SRV.PING.${PREFIX}-api`, "", { timeout: 5000 })).json().name);

  await nc.close();
  if (errors.length > 0) throw new Error(`the server refused: ${errors}`);
  console.log("nats.js client: ok");
}
main().catch((err) => { console.error(err); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_and_nats_js_clients_work_with_the_documented_permissions() {
    let node_modules = node_modules_with_nats();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_with_documented_client(conf_dir.path());
    let server = NatsServer::start_with_config(&conf, false).expect("nats-server with the example config");
    let acme_client = user(&server, "acme", "client");
    let acme_node = user(&server, "acme", "node");
    let mut cluster = TestCluster::with_server(server);
    cluster.client_nats = acme_client.clone();
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000))
        .replace("[nats]\n", "[nats]\nprefix = \"acme\"\nuser = \"acme-node\"\n");
    cluster.add_node_with_env("n1", &config, &[("KILN_NATS_PASSWORD", acme_node.password.as_str())]);
    cluster.wait_node_ready("n1", 1).await;
    let _report = ViolationsOnPanic(&cluster.server);

    // A job's history long enough (4.5 MB) that replaying it with nats-py's push ordered
    // consumer needs its flow-control replies: written by the node user, as nodes write events.
    const LONG_EVENTS: usize = 1500;
    let node = Watched::connect(&acme_node).await;
    let js = node.js();
    let pad = "x".repeat(3000);
    let mut acks = futures::stream::FuturesOrdered::new();
    for i in 0..LONG_EVENTS {
        let event = serde_json::json!({"job_id": "long-history", "attempt": 1, "type": "message", "ts_ms": i, "message": pad});
        acks.push_back(js.publish("acme.events.long-history", event.to_string().into()).await.unwrap().into_future());
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }

    let env = [
        ("KILN_URL", cluster.url()),
        ("KILN_PREFIX", "acme".to_string()),
        ("KILN_MODEL", "demo".to_string()),
        ("KILN_USER", acme_client.user.clone()),
        ("KILN_PASSWORD", acme_client.password.clone()),
        ("KILN_LONG_HISTORY", "long-history".to_string()),
        ("KILN_LONG_HISTORY_EVENTS", LONG_EVENTS.to_string()),
    ];
    let work = tempfile::tempdir().unwrap();
    let mut python = tokio::process::Command::new(python_with_nats());
    python.arg("-").current_dir(work.path()).envs(env.clone());
    let run = run_program(python, NATS_PY_CLIENT, Duration::from_secs(120)).await;
    run.assert_success("the nats-py client");
    for line in ["live: completed", "view: completed", "replayed: queued running completed", "downloaded image.png", "cancelled"] {
        assert!(run.stdout.contains(line), "nats-py printed no {line:?}:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("batch: succeeded") && run.stdout.contains("service: acme-api"), "{}", run.stdout);
    assert!(run.stdout.contains("feed: "), "the results feed: {}", run.stdout);
    assert!(run.stdout.contains(&format!("long history: {LONG_EVENTS} events")), "{}", run.stdout);
    assert!(run.stdout.contains("nats-py client: ok"), "{}", run.stdout);
    eprintln!("nats-py:\n{}", run.stdout);

    let mut node_js = tokio::process::Command::new("node");
    node_js.arg("-").current_dir(work.path()).envs(env).env("NODE_PATH", &node_modules);
    let run = run_program(node_js, NATS_JS_CLIENT, Duration::from_secs(120)).await;
    run.assert_success("the nats.js client");
    for line in ["live: completed", "view: completed", "replayed: queued running completed", "downloaded image.png", "cancelled"] {
        assert!(run.stdout.contains(line), "nats.js printed no {line:?}:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("batch: succeeded") && run.stdout.contains("service: acme-api"), "{}", run.stdout);
    assert!(run.stdout.contains("nats.js client: ok"), "{}", run.stdout);
    eprintln!("nats.js:\n{}", run.stdout);

    let refused = violations(&cluster.server);
    assert!(refused.is_empty(), "nats-py or nats.js was refused what PROTOCOL says a client does: {refused:#?}");
}
