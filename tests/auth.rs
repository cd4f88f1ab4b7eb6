//! NATS credentials and TLS, against real nats-server processes configured for each, and real
//! `kiln node` processes: a node and a client that hold the right credentials run a job; one
//! with wrong ones stops at start with an error that names the refusal (and no secret).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use kiln::client::Client;
use kiln_core::config::{NatsConfig, NatsRules};
use kiln_core::job::JobState;
use kiln_core::nats::{resources, NatsServer};

const PASSWORD: &str = "s3cret-node-pw-7731";
const WRONG_PASSWORD: &str = "not-the-password-4242";

/// A server started with `conf` as its config file (kept in `dir`).
fn server_with(dir: &Path, conf: &str, tls: bool) -> NatsServer {
    let path = dir.join("nats-server.conf");
    std::fs::write(&path, conf).unwrap();
    NatsServer::start_with_config(&path, tls).expect("nats-server with a config file")
}

/// Runs one demo job through `client` and downloads its artifacts: the whole client path
/// (request/reply, events, results bucket) works with these credentials.
async fn run_demo_job(client: &Client) {
    let reply = client.submit(&prompt_request("demo", "a locked door", serde_json::json!({"steps": 2, "step_ms": 10}))).await.unwrap();
    let view = client.wait(&reply.job_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(view.status, JobState::Completed, "{view:?}");
    let dir = tempfile::tempdir().unwrap();
    for a in &view.artifacts {
        client.download(a, &dir.path().join(&a.name)).await.unwrap();
    }
    assert_eq!(view.artifacts.len(), 2);
}

/// Waits for a node that must fail at start; its log.
fn expect_start_failure(node: &mut NodeProcess) -> String {
    let code = node.wait_exit(Duration::from_secs(30));
    let log = node.log();
    assert!(matches!(code, Some(c) if c != 0), "the node must exit non-zero, got {code:?}; log:\n{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_let_a_node_and_a_client_run_a_job_and_a_wrong_password_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), &format!("authorization {{ user: kiln, password: \"{PASSWORD}\" }}\n"), false);
    let mut cluster = TestCluster::with_server(server);
    cluster.client_nats.user = "kiln".into();
    cluster.client_nats.password = PASSWORD.into();

    // The user in the file, the password from the environment (as SECURITY.md advises).
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &demo_model("demo", &[], 3, 60_000))
        .replace("[nats]\n", "[nats]\nuser = \"kiln\"\n");
    cluster.add_node_with_env("n1", &config, &[("KILN_NATS_PASSWORD", PASSWORD)]);
    cluster.wait_node_ready("n1", 1).await;
    run_demo_job(&cluster.client().await).await;

    // No credentials, or the wrong password: refused, and the error says so.
    let anonymous = Client::connect(&cluster.url(), "kiln").await.err().expect("an anonymous client is refused").to_string();
    assert!(anonymous.contains("authentication failed") && anonymous.contains("no credentials"), "{anonymous}");
    let mut wrong = cluster.client_nats.clone();
    wrong.password = WRONG_PASSWORD.into();
    let err = Client::connect_with(&wrong).await.err().expect("a wrong password is refused").to_string();
    assert!(err.contains("authentication failed") && err.contains("user \"kiln\"") && !err.contains(WRONG_PASSWORD), "{err}");

    let mut bad = NodeProcess::spawn_with_env(cluster.dir.path(), "n2", &config, &[("KILN_NATS_PASSWORD", WRONG_PASSWORD)]);
    let log = expect_start_failure(&mut bad);
    assert!(log.contains("authentication failed") && log.contains("authorization violation"), "{log}");
    assert!(!log.contains(WRONG_PASSWORD) && !log.contains(PASSWORD), "no password in the log:\n{log}");
    // The refusal is final at once, not after connect_timeout_ms of retries.
    assert!(!log.contains("within"), "{log}");
}

/// Connects with `nats` and makes one request round trip through the server.
async fn round_trip(nats: &NatsConfig) -> Result<(), String> {
    let client = resources::connect(nats, "auth-test").await.map_err(|e| e.to_string())?;
    let mut sub = client.subscribe("auth.echo").await.map_err(|e| e.to_string())?;
    let responder = client.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        if let Some(m) = sub.next().await {
            let _ = responder.publish(m.reply.unwrap(), m.payload).await;
        }
    });
    let reply = client.request("auth.echo", "hi".into()).await.map_err(|e| e.to_string())?;
    assert_eq!(&reply.payload[..], b"hi");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_accepted_and_a_wrong_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), "authorization { token: \"tok-8c1f\" }\n", false);
    let nats = NatsConfig { token: "tok-8c1f".into(), ..NatsConfig::for_url(&server.url()) };
    round_trip(&nats).await.unwrap();
    let err = round_trip(&NatsConfig { token: "tok-0000".into(), ..nats.clone() }).await.unwrap_err();
    assert!(err.contains("authentication failed") && err.contains("nats.token") && !err.contains("tok-0000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_seed_file_is_accepted_and_another_key_refused() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let server = server_with(dir.path(), &format!("authorization {{ users: [ {{ nkey: \"{}\" }} ] }}\n", user.public_key()), false);
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();
    let nats = NatsConfig { nkey_seed_file: seed_file.display().to_string(), ..NatsConfig::for_url(&server.url()) };
    round_trip(&nats).await.unwrap();

    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let err = round_trip(&NatsConfig { nkey_seed_file: other.display().to_string(), ..nats.clone() }).await.unwrap_err();
    assert!(err.contains("authentication failed") && err.contains("nats.nkey_seed_file"), "{err}");
    std::fs::write(&other, "not a seed").unwrap();
    let err = round_trip(&NatsConfig { nkey_seed_file: other.display().to_string(), ..nats }).await.unwrap_err();
    assert!(err.contains("nats.nkey_seed_file") && err.contains("no user seed"), "{err}");
}

/// A NATS JWT (v2) with `claims`, issued and signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": kiln_core::now_ms() / 1000,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_is_accepted_by_an_operator_mode_server_and_a_foreign_one_refused() {
    // An operator, an account and a user, as `nsc` would make them, signed here offline.
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(&operator, &operator.public_key(), "kiln-test-operator", serde_json::json!({"type": "operator", "version": 2}));
    let unlimited =
        serde_json::json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1});
    let account_jwt =
        jwt(&operator, &account.public_key(), "acme", serde_json::json!({"limits": unlimited, "type": "account", "version": 2}));
    // JetStream (on in every test server) needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", serde_json::json!({"limits": unlimited, "type": "account", "version": 2}));
    let creds = |user: &nkeys::KeyPair, signer: &nkeys::KeyPair| {
        let user_jwt = jwt(
            signer,
            &user.public_key(),
            "acme-node",
            serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let conf = format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {acc}: {account_jwt}\n  {sys}: {system_jwt}\n}}\n",
        acc = account.public_key(),
        sys = system.public_key()
    );
    let server = server_with(dir.path(), &conf, false);
    let good = dir.path().join("acme-node.creds");
    std::fs::write(&good, creds(&nkeys::KeyPair::new_user(), &account)).unwrap();
    let nats = NatsConfig { creds_file: good.display().to_string(), ..NatsConfig::for_url(&server.url()) };
    nats.validate().unwrap();
    round_trip(&nats).await.unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log()));

    // A user signed by an account the operator does not know is refused.
    let foreign = dir.path().join("foreign.creds");
    std::fs::write(&foreign, creds(&nkeys::KeyPair::new_user(), &nkeys::KeyPair::new_account())).unwrap();
    let err = round_trip(&NatsConfig { creds_file: foreign.display().to_string(), ..nats }).await.unwrap_err();
    assert!(err.contains("authentication failed") && err.contains("nats.creds_file"), "{err}");
}

/// A test CA, and a server certificate for 127.0.0.1 signed by it (openssl CLI), in `dir`.
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("the openssl command");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn make_certs(dir: &Path) -> Certs {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        dir,
        &[&["req", "-x509"], &ec[..], &["-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kiln test CA"]].concat(),
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, cert, ext) = (format!("{who}-key.pem"), format!("{who}.csr"), format!("{who}.pem"), format!("{who}.ext"));
        openssl(dir, &[&["req"], &ec[..], &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN=kiln test {who}")]].concat());
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_node_with_the_ca_runs_a_job_and_one_without_it_stops() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let conf = format!("tls {{ cert_file: {:?}, key_file: {:?} }}\n", certs.server_cert, certs.server_key);
    let server = server_with(certs_dir.path(), &conf, true);
    assert!(server.url().starts_with("tls://"));
    let mut cluster = TestCluster::with_server(server);
    cluster.client_nats.tls_ca_file = certs.ca.display().to_string();

    let model = demo_model("demo", &[], 3, 60_000);
    let base = config_toml(&cluster.url(), &["cpu:0"], 10_000, &model);
    let config = base.replace("[nats]\n", &format!("[nats]\ntls_ca_file = {:?}\n", certs.ca.display().to_string()));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    run_demo_job(&cluster.client().await).await;

    // Without the CA the server's certificate is not trusted: the node stops, naming TLS.
    let mut untrusting = NodeProcess::spawn(cluster.dir.path(), "n2", &base);
    let log = expect_start_failure(&mut untrusting);
    assert!(log.contains("TLS with the NATS server") && log.contains("nats.tls_ca_file"), "{log}");
    // And a plain nats:// client that does not ask for TLS cannot talk to this server either.
    let plain = NatsConfig::for_url(&cluster.url().replace("tls://", "nats://"));
    let err = Client::connect_with(&NatsConfig { connect_timeout_ms: 1_000, ..plain }).await.err().expect("TLS is required").to_string();
    assert!(err.contains("TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_verifies_clients_accepts_the_client_certificate_only() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let conf =
        format!("tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n", certs.server_cert, certs.server_key, certs.ca);
    let server = server_with(dir.path(), &conf, true);
    let nats = NatsConfig {
        tls_ca_file: certs.ca.display().to_string(),
        tls_cert_file: certs.client_cert.display().to_string(),
        tls_key_file: certs.client_key.display().to_string(),
        ..NatsConfig::for_url(&server.url())
    };
    nats.validate().unwrap();
    round_trip(&nats).await.unwrap();
    let no_cert = NatsConfig { tls_cert_file: String::new(), tls_key_file: String::new(), connect_timeout_ms: 1_000, ..nats };
    assert!(round_trip(&no_cert).await.is_err(), "a client without a certificate is refused");
}
