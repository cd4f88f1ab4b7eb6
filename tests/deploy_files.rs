//! The deployment files, checked against the code without a cluster or a running systemd (none
//! is here): the Kubernetes manifests of `deploy/k8s` (a kustomization), the official NATS
//! chart's values, and the systemd units of `deploy/systemd`.
//!
//! What a file names must exist in Kiln, and mean what the file assumes:
//! - every image is one `scripts/images.sh` builds, at this package's version;
//! - every environment variable goes, with the config file the pod mounts, through the config
//!   layers exactly as the process will load them (`ClusterConfig::load_layers`): a misspelt
//!   `KILN_<SECTION>__<KEY>` or a value of the wrong type fails here, not in a crash loop;
//! - every probed or published port is the one that merged configuration serves on, on an
//!   address the kubelet can reach; every probed path is one the process answers (the node's:
//!   asked of a real `kiln node`; the gateway's: its route table, public);
//! - every `kiln` command line is one the built binary accepts;
//! - every stop timeout outlasts the node's drain grace; nodes ask for one GPU per `cuda` slot;
//! - the NATS values make the JetStream cluster (file store, three servers) the pods connect to;
//! - the units pass `systemd-analyze verify` where it exists.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_core::config::{ClusterConfig, Layers};
use serde::Deserialize;
use serde_json::Value;

const K8S: &str = "deploy/k8s";
const SYSTEMD: &str = "deploy/systemd";
/// Where a host's config file lives with systemd, and the example installed there
/// (docs/DEPLOY.md): the same file the Kubernetes ConfigMap is made from.
const HOST_CONFIG: &str = "/etc/kiln/cluster.toml";
const EXAMPLE_CONFIG: &str = "deploy/k8s/cluster.toml";
/// The time a node needs after its drain grace: leaving the registry, stopping its actors and
/// worker processes. A supervisor's stop timeout must leave at least this much.
const STOP_MARGIN_S: u64 = 10;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file, as JSON values (`v["spec"]["template"]` is Null when absent).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn kustomization() -> Value {
    yaml_documents(&repo().join(K8S).join("kustomization.yaml")).remove(0)
}

/// The manifests the kustomization applies, each with the file it is in.
fn manifests() -> Vec<(String, Value)> {
    let k = kustomization();
    let files = k["resources"].as_array().expect("kustomization.yaml lists resources");
    files
        .iter()
        .flat_map(|f| {
            let f = f.as_str().unwrap().to_string();
            yaml_documents(&repo().join(K8S).join(&f)).into_iter().map(move |d| (f.clone(), d))
        })
        .collect()
}

/// A Deployment or StatefulSet: its pod spec, and the name its pods get.
struct Workload {
    kind: String,
    name: String,
    /// The pods' labels, what Services select.
    labels: Value,
    pod: Value,
}

impl Workload {
    /// `metadata.name` of one of its pods, what a `fieldRef` to it reads.
    fn pod_name(&self) -> String {
        match self.kind.as_str() {
            "StatefulSet" => format!("{}-0", self.name),
            _ => format!("{}-7c9f8d6b5-x2kq7", self.name),
        }
    }

    /// The one container of the pod.
    fn container(&self) -> &Value {
        let containers = self.pod["containers"].as_array().unwrap_or_else(|| panic!("{} has no containers", self.name));
        assert_eq!(containers.len(), 1, "{}: one container per pod", self.name);
        &containers[0]
    }

    /// The container's port named or numbered `port` (a probe's or a Service's target).
    fn container_port(&self, port: &Value) -> u16 {
        let ports = self.container()["ports"].as_array().cloned().unwrap_or_default();
        let found = match port {
            Value::String(name) => ports.iter().find(|p| p["name"] == *name),
            Value::Number(n) => ports.iter().find(|p| p["containerPort"].as_u64() == n.as_u64()),
            _ => None,
        };
        let found = found.unwrap_or_else(|| panic!("{}: no container port {port}", self.name));
        found["containerPort"].as_u64().unwrap() as u16
    }

    fn env(&self) -> Vec<(String, String)> {
        container_env(self, self.container())
    }
}

fn workloads() -> Vec<Workload> {
    manifests()
        .into_iter()
        .filter(|(_, d)| matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        .map(|(_, d)| Workload {
            kind: d["kind"].as_str().unwrap().into(),
            name: d["metadata"]["name"].as_str().unwrap().into(),
            labels: d["spec"]["template"]["metadata"]["labels"].clone(),
            pod: d["spec"]["template"]["spec"].clone(),
        })
        .collect()
}

fn workload(name: &str) -> Workload {
    workloads().into_iter().find(|w| w.name == name).unwrap_or_else(|| panic!("no workload {name}"))
}

/// The container's environment as the process sees it: literal values, the pod's name for a
/// `fieldRef`, and a stand-in for a Secret's value (which lives in the cluster, not here).
fn container_env(w: &Workload, c: &Value) -> Vec<(String, String)> {
    let mut env = vec![];
    for e in c["env"].as_array().cloned().unwrap_or_default() {
        let name = e["name"].as_str().expect("env name").to_string();
        let value = if !e["value"].is_null() {
            // Kubernetes refuses a number or a boolean here: `"3"`, not `3`.
            e["value"].as_str().unwrap_or_else(|| panic!("{}: env {name} must be a string, got {}", w.name, e["value"])).to_string()
        } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            assert_eq!(field, "metadata.name", "{}: env {name}: only the pod's name is read here", w.name);
            w.pod_name()
        } else if let Some(secret) = e["valueFrom"]["secretKeyRef"].as_object() {
            format!("from-secret-{}-{}", secret["name"].as_str().unwrap(), secret["key"].as_str().unwrap())
        } else {
            panic!("{}: env {name}: a value, a fieldRef or a secretKeyRef", w.name)
        };
        env.push((name, value));
    }
    env
}

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The local file behind the container's `KILN_CONFIG`: the path must be a file of a mounted
/// ConfigMap that the kustomization generates from a file of deploy/k8s.
fn mounted_config_file(w: &Workload) -> PathBuf {
    let env = w.env();
    let config = env_value(&env, "KILN_CONFIG").unwrap_or_else(|| panic!("{}: KILN_CONFIG names the config file", w.name));
    let (dir, file) = config.rsplit_once('/').unwrap();
    let mounts = w.container()["volumeMounts"].as_array().cloned().unwrap_or_default();
    let mount = mounts.iter().find(|m| m["mountPath"] == dir).unwrap_or_else(|| panic!("{}: nothing mounted at {dir}", w.name));
    let volumes = w.pod["volumes"].as_array().cloned().unwrap_or_default();
    let volume = volumes.iter().find(|v| v["name"] == mount["name"]).expect("the mount's volume");
    let map = volume["configMap"]["name"].as_str().unwrap_or_else(|| panic!("{}: {dir} is not a ConfigMap", w.name));
    let generators = kustomization()["configMapGenerator"].as_array().cloned().unwrap_or_default();
    let generator = generators.iter().find(|g| g["name"] == map).unwrap_or_else(|| panic!("no configMapGenerator {map}"));
    let files: Vec<&str> = generator["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(files.contains(&file), "{}: ConfigMap {map} has no {file} (it has {files:?})", w.name);
    repo().join(K8S).join(file)
}

/// The workload's configuration, merged from its mounted file and its environment the way
/// the process does it, and validated as `kiln node` (or, for the gateway, `kiln gateway`)
/// validates it.
fn loaded_config(w: &Workload, as_gateway: bool) -> ClusterConfig {
    let layers = Layers { file: Some(mounted_config_file(w)), env: w.env(), flags: vec![] };
    let loaded = if as_gateway { ClusterConfig::load_gateway_layers(&layers) } else { ClusterConfig::load_layers(&layers) };
    loaded.unwrap_or_else(|e| panic!("{}: its config and environment do not load: {e}", w.name))
}

/// A `KILN_` variable that is not a `KILN_<SECTION>__<KEY>` is not configuration: the loader
/// ignores it, so a misspelling (`KILN_NODENAME`) would pass unseen. The only ones allowed are
/// those the process reads itself.
fn check_non_config_vars(env: &[(String, String)], whose: &str) {
    for (name, _) in env {
        if name.starts_with("KILN_") && !name.contains("__") {
            assert_eq!(name, kiln_core::config::CONFIG_VAR, "{whose}: {name} is no configuration key (KILN_<SECTION>__<KEY>)");
        }
    }
}

/// The port of a `host:port` address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("{addr:?} is not host:port"))
}

/// Whether the kubelet (another network namespace) can reach an address the process binds.
fn reachable_from_outside(addr: &str) -> bool {
    let host = addr.rsplit_once(':').unwrap().0;
    !(host.starts_with("127.") || host == "localhost" || host == "[::1]")
}

#[test]
fn the_kustomization_lists_every_manifest_and_each_is_well_formed() {
    let k = kustomization();
    let listed: BTreeSet<String> = k["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(repo().join(K8S))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml" && f != "nats-values.yaml")
        .collect();
    assert_eq!(listed, on_disk, "every manifest of {K8S} is applied by kustomization.yaml");
    let namespace = k["namespace"].as_str().expect("kustomization sets the namespace");
    let mut names = BTreeSet::new();
    for (file, doc) in manifests() {
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file}: a document without kind"));
        assert!(doc["apiVersion"].is_string(), "{file}: {kind} without apiVersion");
        let name = doc["metadata"]["name"].as_str().unwrap_or_else(|| panic!("{file}: {kind} without a name"));
        assert!(names.insert((kind.to_string(), name.to_string())), "{file}: {kind} {name} twice");
        if kind == "Namespace" {
            assert_eq!(name, namespace, "the Namespace manifest is the kustomization's namespace");
        }
        // A selector that misses its own pods selects nothing (a Service without endpoints).
        if let Some(selector) = doc["spec"]["selector"]["matchLabels"].as_object() {
            if !doc["spec"]["template"].is_null() {
                let labels = &doc["spec"]["template"]["metadata"]["labels"];
                for (k, v) in selector {
                    assert_eq!(&labels[k], v, "{file}: {kind} {name} selects {k}={v}, its pods lack it");
                }
            }
        }
    }
    // Every Service and PodDisruptionBudget selects the pods of some workload.
    let pod_labels: Vec<Value> = manifests()
        .into_iter()
        .filter(|(_, d)| !d["spec"]["template"].is_null())
        .map(|(_, d)| d["spec"]["template"]["metadata"]["labels"].clone())
        .collect();
    for (file, doc) in manifests() {
        let selector = match doc["kind"].as_str() {
            Some("Service") => doc["spec"]["selector"].clone(),
            Some("PodDisruptionBudget") => doc["spec"]["selector"]["matchLabels"].clone(),
            _ => continue,
        };
        let selector = selector.as_object().unwrap_or_else(|| panic!("{file}: a selector"));
        assert!(
            pod_labels.iter().any(|labels| selector.iter().all(|(k, v)| &labels[k] == v)),
            "{file}: {} selects no workload's pods",
            doc["metadata"]["name"]
        );
    }
}

/// The images `scripts/images.sh` builds: its `build_image <Dockerfile> <name>` lines, each
/// Dockerfile present.
fn images_built() -> BTreeSet<String> {
    let script = read(&repo().join("scripts/images.sh"));
    let mut names = BTreeSet::new();
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["build_image", dockerfile, name] = words.as_slice() {
            assert!(repo().join(dockerfile).is_file(), "scripts/images.sh builds from {dockerfile}, which is missing");
            names.insert(name.to_string());
        }
    }
    assert!(names.contains("kiln"), "scripts/images.sh builds kiln (found {names:?})");
    names
}

#[test]
fn every_image_is_one_the_image_script_builds_at_this_version() {
    let built = images_built();
    let version = env!("CARGO_PKG_VERSION");
    let mut seen = 0;
    for w in workloads() {
        for c in w.pod["containers"].as_array().into_iter().chain(w.pod["initContainers"].as_array()).flatten() {
            let image = c["image"].as_str().unwrap_or_else(|| panic!("{}: a container without image", w.name));
            let (name, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{}: {image} has no tag", w.name));
            assert!(built.contains(name), "{}: {image} is not an image scripts/images.sh builds ({built:?})", w.name);
            assert_eq!(tag, version, "{}: {image}: the images are tagged with the package version", w.name);
            seen += 1;
        }
    }
    assert!(seen >= 2, "a node and a gateway");
    // A TorchScript model needs the engine, which only kiln-node-torch has.
    let node = workload("kiln-node");
    let config = loaded_config(&node, false);
    let torch = config.models.iter().any(|m| matches!(m.engine, kiln_core::config::EngineConfig::Torchscript { .. }));
    let image = node.container()["image"].as_str().unwrap();
    assert!(!torch || image.starts_with("kiln-node-torch:"), "TorchScript models in the config, and the node image is {image}");
}

#[test]
fn every_pod_environment_loads_through_the_config_layers() {
    let nats = nats_values();
    for (name, as_gateway) in [("kiln-node", false), ("kiln-gateway", true)] {
        let w = workload(name);
        let env = w.env();
        check_non_config_vars(&env, name);
        let config = loaded_config(&w, as_gateway);
        // The variables were read, not ignored: each names what the process now runs with.
        let urls: Vec<&str> = config.nats.url.split(',').collect();
        assert_eq!(urls, nats.urls.iter().map(String::as_str).collect::<Vec<_>>(), "{name}: every NATS server of nats-values.yaml");
        if !as_gateway {
            assert_eq!(config.node.name, w.pod_name(), "{name}: KILN_NODE__NAME is the pod's name");
            assert_eq!(config.nats.replicas, 3, "{name}: replicated streams on the three servers");
            assert!(config.nats.replicas <= nats.servers, "{name}: {} replicas on {} servers", config.nats.replicas, nats.servers);
            assert!(config.cluster.cookie.starts_with("from-secret-"), "{name}: the cluster cookie comes from a Secret");
        }
    }
}

#[test]
fn probes_and_services_point_at_the_ports_and_paths_the_processes_serve() {
    let node = workload("kiln-node");
    let config = loaded_config(&node, false);
    let metrics = &config.node.metrics_addr;
    assert!(reachable_from_outside(metrics), "node.metrics_addr {metrics} must listen beyond loopback for the kubelet's probes");
    let gateway = workload("kiln-gateway");
    let http = loaded_config(&gateway, true).http;
    assert!(reachable_from_outside(&http.addr), "http.addr {} must listen beyond loopback for the Service", http.addr);
    // The gateway refuses to serve beyond loopback without API keys.
    assert!(!http.api_keys.is_empty(), "a gateway beyond loopback needs [[http.api_keys]]");

    for (w, port, paths) in [(&node, port_of(metrics), node_paths()), (&gateway, port_of(&http.addr), gateway_paths())] {
        let c = w.container();
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            if c[probe].is_null() {
                continue;
            }
            let get = &c[probe]["httpGet"];
            assert!(!get.is_null(), "{}: {probe} is an httpGet", w.name);
            assert_eq!(w.container_port(&get["port"]), port, "{}: {probe} on the port the process serves", w.name);
            let path = get["path"].as_str().unwrap();
            assert!(paths.contains(path), "{}: {probe} on {path}, which is not served ({paths:?})", w.name);
        }
        for probe in ["livenessProbe", "readinessProbe"] {
            assert!(!c[probe].is_null(), "{}: has a {probe}", w.name);
        }
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{}: liveness is the process, not its dependencies", w.name);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{}", w.name);
        // Every Service of these pods reaches the port the process serves.
        let mut services = 0;
        for (file, doc) in manifests() {
            if doc["kind"] != "Service" {
                continue;
            }
            let selector = doc["spec"]["selector"].as_object().unwrap();
            if !selector.iter().all(|(k, v)| &w.labels[k] == v) {
                continue;
            }
            for p in doc["spec"]["ports"].as_array().unwrap() {
                let target = if p["targetPort"].is_null() { &p["port"] } else { &p["targetPort"] };
                assert_eq!(w.container_port(target), port, "{file}: Service port {} reaches {}'s served port", p["port"], w.name);
            }
            services += 1;
        }
        assert!(services > 0, "{}: a Service selects its pods", w.name);
    }
}

/// The gateway's probe paths: routes of its table that answer GET without an API key (a probe
/// sends none; the route table is what a test of the gateway checks against its router).
fn gateway_paths() -> BTreeSet<String> {
    kiln::gateway::api_routes()
        .operations()
        .iter()
        .filter(|op| op.method == kiln::gateway::openapi::Method::Get && kiln::gateway::is_public(op.path))
        .map(|op| op.path.to_string())
        .collect()
}

/// The node's probe paths, as a real `kiln node` answers them: started with the manifest's own
/// config file and environment, but a NATS that does not answer (it keeps connecting, so
/// /readyz must say 503 and /healthz 200) and its endpoint on a free loopback port. Every
/// other path must be 404: a server answering any path would make the probes meaningless.
fn node_paths() -> BTreeSet<String> {
    let node = workload("kiln-node");
    let port = kiln_core::nats::server::free_port().unwrap();
    let silent_nats = kiln_core::nats::server::free_port().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    let log = work.path().join("node.log");
    let log_file = std::fs::File::create(&log).unwrap();
    command.arg("node").current_dir(work.path()).stdin(Stdio::null()).stdout(log_file.try_clone().unwrap()).stderr(log_file);
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("KILN_")) {
        command.env_remove(name);
    }
    for (name, value) in node.env() {
        command.env(name, value);
    }
    command
        .env("KILN_CONFIG", mounted_config_file(&node))
        .env("KILN_NATS__URL", format!("nats://127.0.0.1:{silent_nats}"))
        .env("KILN_NATS__REPLICAS", "1")
        .env("KILN_NATS__CONNECT_TIMEOUT_MS", "120000")
        .env("KILN_NODE__METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("KILN_NODE__SLOTS", "cpu:0")
        .env("KILN_NODE__WORK_DIR", work.path().join("work"));
    let mut child = command.spawn().unwrap();
    let status = |path: &str| http_status(port, path);
    let started = Instant::now();
    while status("/healthz").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
        }
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("kiln node ({exit}) never served /healthz on 127.0.0.1:{port}:\n{}", read(&log));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers: Vec<(&str, Option<u16>)> =
        ["/healthz", "/readyz", "/metrics", "/no-such-path"].into_iter().map(|p| (p, status(p))).collect();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        answers,
        [("/healthz", Some(200)), ("/readyz", Some(503)), ("/metrics", Some(200)), ("/no-such-path", Some(404))],
        "what kiln node answers while it cannot reach NATS"
    );
    answers.into_iter().filter(|(_, s)| *s != Some(404)).map(|(p, _)| p.to_string()).collect()
}

/// The status of `GET path` on a loopback port; None when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[test]
fn nodes_stop_within_their_grace_and_ask_for_a_gpu_per_slot() {
    let node = workload("kiln-node");
    let config = loaded_config(&node, false);
    let grace = config.node.drain_grace_s;
    let termination = node.pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds is set");
    assert!(
        termination >= grace + STOP_MARGIN_S,
        "terminationGracePeriodSeconds {termination} must outlast node.drain_grace_s {grace} by {STOP_MARGIN_S} s"
    );
    // A job started just before the drain can finish where it runs.
    let longest = config.models.iter().map(|m| m.timeout_ms).max().unwrap();
    assert!(grace * 1000 >= longest, "node.drain_grace_s {grace} is shorter than a model's timeout_ms {longest}");
    // SIGTERM is the drain: it must reach kiln itself, not a shell that would not pass it on.
    let argv = container_argv(node.container());
    assert!(argv.first().is_some_and(|a| a == "kiln" || a.ends_with("/kiln")), "the node's command is kiln itself: {argv:?}");

    let resources = &node.container()["resources"];
    let gpus = resources["limits"]["nvidia.com/gpu"].as_u64().expect("the node's limits ask for nvidia.com/gpu");
    if !resources["requests"]["nvidia.com/gpu"].is_null() {
        assert_eq!(resources["requests"]["nvidia.com/gpu"].as_u64(), Some(gpus), "an extended resource's request equals its limit");
    }
    let cuda: Vec<&String> = config.node.slots.iter().filter(|s| s.starts_with("cuda:")).collect();
    assert_eq!(cuda.len() as u64, gpus, "one cuda slot per GPU the pod gets ({:?})", config.node.slots);
    // The device plugin shows the pod its GPUs as devices 0..n-1.
    for (i, slot) in cuda.iter().enumerate() {
        assert_eq!(**slot, format!("cuda:{i}"), "the pod's GPUs are cuda:0..{}", gpus - 1);
    }
}

/// The command line a container runs: `command` then `args`.
fn container_argv(c: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .flat_map(|k| c[*k].as_array().cloned().unwrap_or_default())
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The NATS cluster the official chart makes from nats-values.yaml.
struct NatsCluster {
    servers: usize,
    /// A client URL per server, by the pods' names behind the chart's headless Service.
    urls: Vec<String>,
}

fn nats_values() -> NatsCluster {
    let v = yaml_documents(&repo().join(K8S).join("nats-values.yaml")).remove(0);
    let config = &v["config"];
    assert_eq!(config["jetstream"]["enabled"], true, "JetStream on");
    assert_eq!(config["jetstream"]["fileStore"]["enabled"], true, "JetStream on files");
    assert_eq!(config["jetstream"]["fileStore"]["pvc"]["enabled"], true, "the file store on a PersistentVolume");
    assert_ne!(config["jetstream"]["memoryStore"]["enabled"], true, "no memory store");
    assert_eq!(config["cluster"]["enabled"], true, "a cluster of servers");
    let servers = config["cluster"]["replicas"].as_u64().expect("config.cluster.replicas") as usize;
    assert_eq!(servers, 3, "three servers");
    let fullname = v["fullnameOverride"].as_str().expect("fullnameOverride: the pods' names must not depend on the release's");
    let port = config["nats"]["port"].as_u64().unwrap_or(4222);
    let urls = (0..servers).map(|i| format!("nats://{fullname}-{i}.{fullname}-headless:{port}")).collect();
    NatsCluster { servers, urls }
}

#[test]
fn the_nats_values_are_a_jetstream_cluster_of_three_file_stores() {
    let nats = nats_values();
    assert_eq!(nats.urls.len(), 3);
}

/// `kiln <args> --help` succeeds only if every subcommand and flag in `args` exists (clap
/// refuses an unknown one before it prints help).
fn kiln_accepts(args: &[String]) -> Result<(), String> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).arg("--help").stdin(Stdio::null()).output().unwrap();
    match out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Usage:") {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

#[test]
fn every_kiln_command_line_is_one_the_binary_accepts() {
    // The check itself can fail.
    assert!(kiln_accepts(&["nod".into()]).is_err() && kiln_accepts(&["node".into(), "--slotz".into(), "cpu:0".into()]).is_err());
    let mut checked = 0;
    for w in workloads() {
        let c = w.container();
        let mut lines = vec![container_argv(c)];
        for hook in ["postStart", "preStop"] {
            if let Some(exec) = c["lifecycle"][hook]["exec"]["command"].as_array() {
                lines.push(exec.iter().map(|a| a.as_str().unwrap().to_string()).collect());
            }
        }
        for argv in lines {
            let Some((program, args)) = argv.split_first() else { continue };
            if program == "kiln" || program.ends_with("/kiln") {
                kiln_accepts(args).unwrap_or_else(|e| panic!("{}: kiln refuses {args:?}: {e}", w.name));
                checked += 1;
            } else {
                assert!(!argv.iter().any(|a| a.contains("kiln ")), "{}: write kiln's command lines in exec form: {argv:?}", w.name);
            }
        }
    }
    for unit in ["kiln-node.service", "kiln-gateway.service"] {
        let exec = unit_values(&read_unit(unit), "ExecStart").pop().unwrap_or_else(|| panic!("{unit}: ExecStart"));
        let argv: Vec<String> = exec.split_whitespace().map(String::from).collect();
        assert_eq!(argv[0], "/usr/local/bin/kiln", "{unit}: runs the installed kiln");
        kiln_accepts(&argv[1..]).unwrap_or_else(|e| panic!("{unit}: kiln refuses {:?}: {e}", &argv[1..]));
        checked += 1;
    }
    assert!(checked >= 4, "the node's and the gateway's, in both deployments");
}

/// A unit file as (section, key, value) lines.
fn read_unit(name: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = vec![];
    for line in read(&repo().join(SYSTEMD).join(name)).lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    entries
}

/// Every value of a `[Service]` key, in order.
fn unit_values(unit: &[(String, String, String)], key: &str) -> Vec<String> {
    unit.iter().filter(|(s, k, _)| s == "Service" && k == key).map(|(_, _, v)| v.clone()).collect()
}

/// A `KEY=value` file (an EnvironmentFile).
fn env_file(path: &Path) -> Vec<(String, String)> {
    read(path)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{}: {l:?} is not KEY=value", path.display()));
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

/// A systemd time span in seconds: `150`, `150s`, `2min 30s`.
fn seconds(span: &str) -> u64 {
    let mut total = 0;
    for part in span.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.parse().unwrap_or_else(|_| panic!("{span:?} is not a time span"));
        total += match &part[digits.len()..] {
            "" | "s" | "sec" => n,
            "m" | "min" => n * 60,
            "h" => n * 3600,
            unit => panic!("{span:?}: unit {unit:?} not read here"),
        };
    }
    total
}

#[test]
fn the_systemd_units_load_their_config_and_outlast_the_drain() {
    for (unit_name, as_gateway) in [("kiln-node.service", false), ("kiln-gateway.service", true)] {
        let unit = read_unit(unit_name);
        let one = |key: &str| unit_values(&unit, key).pop().unwrap_or_else(|| panic!("{unit_name}: {key} is set"));
        // The environment the process gets: Environment= lines, then the EnvironmentFile,
        // which is the example of the same name in deploy/systemd.
        let mut env = vec![];
        for line in unit_values(&unit, "Environment") {
            for pair in line.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap();
                env.push((k.to_string(), v.to_string()));
            }
        }
        let file = one("EnvironmentFile");
        let example = repo().join(SYSTEMD).join(Path::new(file.trim_start_matches('-')).file_name().unwrap());
        assert!(example.is_file(), "{unit_name}: EnvironmentFile {file} has its example in {SYSTEMD}");
        env.extend(env_file(&example));
        check_non_config_vars(&env, unit_name);
        assert_eq!(env_value(&env, "KILN_CONFIG"), Some(HOST_CONFIG), "{unit_name}: KILN_CONFIG");
        let layers = Layers { file: Some(repo().join(EXAMPLE_CONFIG)), env: env.clone(), flags: vec![] };
        let loaded = if as_gateway { ClusterConfig::load_gateway_layers(&layers) } else { ClusterConfig::load_layers(&layers) };
        let config = loaded.unwrap_or_else(|e| panic!("{unit_name} with {}: {e}", example.display()));

        assert_eq!(one("Restart"), "on-failure", "{unit_name}");
        assert_eq!(one("KillSignal"), "SIGTERM", "{unit_name}");
        assert!(!["root", "0"].contains(&one("User").as_str()), "{unit_name}: a dedicated user");
        let stop = seconds(&one("TimeoutStopSec"));
        if as_gateway {
            let open = reachable_from_outside(&config.http.addr);
            assert!(!open || !config.http.api_keys.is_empty(), "{unit_name}: a gateway beyond loopback needs [[http.api_keys]]");
        } else {
            let grace = config.node.drain_grace_s;
            assert_eq!(env_value(&env, "KILN_NODE__DRAIN_GRACE_S").map(|g| g.parse::<u64>().unwrap()), Some(grace));
            assert!(
                stop >= grace + STOP_MARGIN_S,
                "{unit_name}: TimeoutStopSec {stop} must outlast node.drain_grace_s {grace} by {STOP_MARGIN_S} s"
            );
            // SIGTERM to the node only: its worker processes finish the jobs the drain waits for.
            assert_eq!(one("KillMode"), "mixed", "{unit_name}");
        }
        systemd_analyze_verify(unit_name);
    }
}

/// `systemd-analyze verify` of a unit, with ExecStart pointed at the built binary (the check
/// that the program exists is then real, not a complaint about this machine having no
/// /usr/local/bin/kiln). Any message about the unit (an unknown key, a bad value) fails.
fn systemd_analyze_verify(unit_name: &str) {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].into_iter().map(Path::new).find(|p| p.exists()) else {
        eprintln!("no systemd-analyze here: {unit_name} not verified");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = read(&repo().join(SYSTEMD).join(unit_name));
    assert!(text.contains("ExecStart=/usr/local/bin/kiln "), "{unit_name}: ExecStart=/usr/local/bin/kiln ...");
    let text = text.replace("ExecStart=/usr/local/bin/kiln ", &format!("ExecStart={} ", env!("CARGO_BIN_EXE_kiln")));
    let path = dir.path().join(unit_name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(analyze).args(["verify", "--man=no"]).arg(&path).stdin(Stdio::null()).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains(unit_name)).collect();
    assert!(out.status.success() && about_unit.is_empty(), "systemd-analyze verify {unit_name}:\n{said}");
}

/// The gauges a node exports for autoscalers (`kiln::queue_gauges`; `tests/queue.rs` reads them
/// on a real node's `/metrics`).
const QUEUE_GAUGES: [&str; 5] = [
    kiln_core::metrics::QUEUE_DEPTH,
    kiln_core::metrics::QUEUE_OLDEST_WAIT_SECONDS,
    kiln_core::metrics::MODEL_RUNNING,
    kiln_core::metrics::MODEL_SLOTS,
    kiln_core::metrics::MODEL_DESIRED_SLOTS,
];

/// The `kiln_*` names a PromQL query reads.
fn kiln_metrics_in(query: &str) -> Vec<String> {
    query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|word| word.starts_with("kiln_")).map(str::to_string).collect()
}

/// The KEDA example (`deploy/k8s/keda/`, outside the kustomization: it needs KEDA's CRDs) scales
/// the node StatefulSet of node.yaml, in the kustomization's namespace, on gauges Kiln exports,
/// with a threshold of one node's slots; it keeps a node (the gauges come from one) and removes
/// nodes no faster than one drain.
#[test]
fn the_keda_example_scales_the_node_statefulset_on_gauges_kiln_exports() {
    let docs = yaml_documents(&repo().join(K8S).join("keda/scaledobject.yaml"));
    let scaled = docs.iter().find(|d| d["kind"] == "ScaledObject").expect("a ScaledObject");
    assert_eq!(scaled["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(scaled["metadata"]["namespace"], kustomization()["namespace"], "the namespace of the manifests");
    let target = &scaled["spec"]["scaleTargetRef"];
    assert_eq!((target["apiVersion"].as_str(), target["kind"].as_str()), (Some("apps/v1"), Some("StatefulSet")));
    let node = workload(target["name"].as_str().expect("scaleTargetRef.name"));
    assert_eq!(node.kind, "StatefulSet", "the target is the nodes' StatefulSet");
    let slots_per_node = loaded_config(&node, false).node.slots.len() as f64;

    let triggers = scaled["spec"]["triggers"].as_array().expect("triggers");
    assert!(!triggers.is_empty());
    for trigger in triggers {
        assert_eq!(trigger["type"], "prometheus", "{trigger}");
        let query = trigger["metadata"]["query"].as_str().expect("a query");
        let read = kiln_metrics_in(query);
        assert!(read.iter().any(|m| m == kiln_core::metrics::MODEL_DESIRED_SLOTS), "{query} reads the desired slots");
        for metric in &read {
            assert!(QUEUE_GAUGES.contains(&metric.as_str()), "{query}: {metric} is not a gauge Kiln exports");
        }
        assert!(query.contains("max by (model)"), "one node exports each model's figures, the others 0: {query}");
        let threshold: f64 = trigger["metadata"]["threshold"].as_str().and_then(|t| t.parse().ok()).expect("a threshold");
        assert_eq!(threshold, slots_per_node, "replicas = desired slots / slots per node");
    }
    assert!(scaled["spec"]["minReplicaCount"].as_u64().is_some_and(|n| n >= 1), "a node exports the gauges: keep one");
    let termination = node.pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let policies = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"].as_array().unwrap();
    for policy in policies {
        assert!(policy["periodSeconds"].as_u64().is_some_and(|p| p >= termination), "one drain at a time: {policy}");
    }
}
