//! The gateway's API description against real processes (a nats-server, a `kiln node` with the
//! demo worker, a `kiln gateway` that asks for an API key):
//!
//! - `/docs` and `/redoc` need no key and load every asset from the gateway itself: the bytes
//!   vendored in `src/gateway/assets/vendor/`, with their content types and cache headers;
//! - every operation `/openapi.json` lists is served (the other direction, every served route
//!   documented, is the unit tests' in `src/gateway/openapi.rs`);
//! - a TypeScript client generated from the live document with openapi-typescript, compiled
//!   by tsc with openapi-fetch, submits a job, reads it and fetches its result: the exact
//!   commands and program of docs/HTTP.md ("A TypeScript client");
//! - Swagger UI and ReDoc, in a headless chromium, render every operation, and the pages ask
//!   nothing of any other host.
//!
//! Needs what `scripts/setup.sh` installs (node, openapi-typescript, openapi-fetch, typescript,
//! @types/node, chromium, puppeteer-core) and `scripts/env.sh` exports; without them the tests
//! fail, saying so.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The API key the test's gateway asks for.
const KEY: &str = "openapi-client-test-key";

/// A node and a gateway that asks for [`KEY`] (loopback, but with a key configured, as a
/// gateway on another address must be).
async fn start() -> (TestCluster, GatewayProcess) {
    let mut cluster = TestCluster::new();
    let keys = format!("\n[[http.api_keys]]\nname = \"client\"\nsha256 = \"{}\"\n", kiln::gateway::hash_key(KEY));
    let model = with_checkout_sdk(&demo_model("demo", &[], 3, 60_000));
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &format!("{model}{keys}"));
    cluster.add_node("n1", &config);
    cluster.wait_node_ready("n1", 1).await;
    let gateway = GatewayProcess::spawn(cluster.dir.path(), "gw", &config, &cluster.url());
    (cluster, gateway)
}

/// `KILN_NODE_MODULES`, checked to hold the TypeScript tools `scripts/setup.sh` pins.
fn node_modules_with_typescript_tools() -> PathBuf {
    const FIX: &str = "run scripts/setup.sh (it installs openapi-typescript, openapi-fetch, typescript and @types/node into the \
                       npm cache), then `source scripts/env.sh`";
    let modules = PathBuf::from(std::env::var("KILN_NODE_MODULES").unwrap_or_else(|_| panic!("KILN_NODE_MODULES is not set: {FIX}")));
    for package in ["openapi-typescript", "openapi-fetch", "typescript", "@types/node"] {
        let file = modules.join(package).join("package.json");
        assert!(file.is_file(), "no {package} in KILN_NODE_MODULES={} ({} is missing): {FIX}", modules.display(), file.display());
    }
    modules
}

/// The version `scripts/setup.sh` pins in `NAME=version`.
fn pinned(name: &str) -> String {
    let setup = std::fs::read_to_string(repo().join("scripts/setup.sh")).unwrap();
    let line = setup.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).unwrap_or_else(|| panic!("setup.sh pins no {name}"));
    line.trim().to_string()
}

/// The values of `attr="..."` in an HTML text.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let needle = format!("{attr}=\"");
    html.match_indices(&needle).map(|(i, _)| &html[i + needle.len()..]).map(|rest| &rest[..rest.find('"').expect("closed")]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_and_redoc_load_their_assets_from_the_gateway_without_a_key() {
    let (_cluster, gateway) = start().await;
    let http = http();
    // The key is needed for the API...
    let models = http.get(gateway.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401, "the gateway asks for a key");
    // ... and not for the description, its pages and their assets.
    let mut assets = 0;
    for page in ["/docs", "/redoc"] {
        let response = http.get(gateway.url(page)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{page}");
        let header = |r: &reqwest::Response, name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        assert!(header(&response, "content-type").starts_with("text/html"), "{page}");
        assert_eq!(header(&response, "cache-control"), "no-cache", "{page}");
        let html = response.text().await.unwrap();
        assert!(!html.contains("http://") && !html.contains("https://"), "{page} names another host:\n{html}");
        let mut refs = attribute_values(&html, "src");
        refs.extend(attribute_values(&html, "href"));
        refs.extend(attribute_values(&html, "spec-url"));
        assert!(html.contains(r#"url: "/openapi.json""#) || refs.contains(&"/openapi.json"), "{page} reads /openapi.json:\n{html}");
        assert!(!refs.is_empty(), "{page}:\n{html}");
        for r in refs.into_iter().filter(|r| !r.starts_with("data:")) {
            assert!(r.starts_with('/') && !r.starts_with("//"), "{page} refers to {r}, not a path of the gateway");
            let asset = http.get(gateway.url(r)).send().await.unwrap();
            assert_eq!(asset.status(), 200, "{page}: {r}");
            let content_type = header(&asset, "content-type");
            let cache = header(&asset, "cache-control");
            let body = asset.bytes().await.unwrap();
            if r == "/openapi.json" {
                assert!(content_type.starts_with("application/json"), "{r}: {content_type}");
                continue;
            }
            let want = if r.ends_with(".js") {
                "text/javascript"
            } else if r.ends_with(".css") {
                "text/css"
            } else {
                "?"
            };
            assert!(content_type.starts_with(want), "{page}: {r} is {content_type}");
            assert_eq!(cache, "public, max-age=31536000, immutable", "{r}: its URL carries the version");
            // Exactly the vendored bytes (src/gateway/assets/vendor/<package>/<file>).
            let file = r.rsplit('/').next().unwrap();
            let package = if r.contains("/swagger-ui-dist-") { "swagger-ui-dist" } else { "redoc" };
            let mut vendored = std::fs::read(repo().join("src/gateway/assets/vendor").join(package).join(file)).unwrap();
            if package == "redoc" {
                // Served without the one URL of another host it loads (its footer's logo).
                let text = String::from_utf8(vendored).unwrap();
                assert!(text.contains("https://cdn.redoc.ly/redoc/logo-mini.svg"));
                vendored = text.replace("https://cdn.redoc.ly/redoc/logo-mini.svg", "data:,").into_bytes();
            }
            assert!(body.len() > 100_000 && body[..] == vendored[..], "{r}: {} bytes, not the vendored {package}/{file}", body.len());
            assets += 1;
        }
    }
    assert_eq!(assets, 3, "swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js");

    // The document a keyed gateway serves: the key is required (no `{}` among the ways in).
    let doc: Value = http.get(gateway.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}, {"access_token": []}]), "{}", doc["security"]);

    // Every operation it lists is served: no `no such route` 404, no 405 (with the key, path
    // parameters as `x`; what each then answers is the other tests' business).
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let url = gateway.url(&path.replace("{id}", "x").replace("{name}", "x"));
            let request = http.request(method.to_uppercase().parse().unwrap(), &url).bearer_auth(KEY);
            // An event stream of a job that does not exist is a 404 of that job, at once.
            let response = tokio::time::timeout(Duration::from_secs(10), request.send()).await.expect("answers").unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert!(status != 405 && !body.contains("no such route"), "{method} {path}: {status} {body}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} operations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typescript_client_generated_from_the_live_document_submits_reads_and_fetches() {
    let modules = node_modules_with_typescript_tools();
    let doc = std::fs::read_to_string(repo().join("docs/HTTP.md")).unwrap();
    let section = doc_section(&doc, "### A TypeScript client");
    // The install lines name the versions setup.sh pins (and the test uses).
    for (package, var) in [
        ("openapi-fetch", "OPENAPI_FETCH_VERSION"),
        ("openapi-typescript", "OPENAPI_TYPESCRIPT_VERSION"),
        ("typescript", "TYPESCRIPT_VERSION"),
        ("@types/node", "TYPES_NODE_VERSION"),
    ] {
        let want = format!("{package}@{}", pinned(var));
        assert!(section.contains(&format!(" {want}")), "docs/HTTP.md's install lines do not say {want}");
    }
    let commands = fenced_blocks(section, "bash");
    let programs = fenced_blocks(section, "ts");
    assert_eq!((commands.len(), programs.len()), (1, 1), "the section has one block of commands and one program");

    let (cluster, gateway) = start().await;
    let work = tempfile::tempdir().unwrap();
    // As after the section's `npm install`: the packages in ./node_modules.
    std::os::unix::fs::symlink(&modules, work.path().join("node_modules")).unwrap();
    std::fs::write(work.path().join("kiln.mts"), &programs[0]).unwrap();

    let started = Instant::now();
    let mut command = tokio::process::Command::new("bash");
    command
        .arg("-c")
        .arg(format!("set -euxo pipefail\n{}", commands[0]))
        .current_dir(work.path())
        .env("KILN", &gateway.base)
        .env("KILN_API_KEY", KEY)
        // npx finds the packages in ./node_modules; it must not ask the registry.
        .env("npm_config_offline", "true");
    let run = run_program(command, "", Duration::from_secs(180)).await;
    run.assert_success("the TypeScript client of docs/HTTP.md (generate, compile, run)");
    println!("generated, compiled and ran in {:?}:\n{}", started.elapsed(), run.stderr);

    // The generated types name every operation by its id, and the program used them.
    let types = std::fs::read_to_string(work.path().join("kiln-api.d.ts")).unwrap();
    for id in ["submitJob", "getJob", "getArtifact", "listJobs", "uploadFiles", "putFile", "jobEvents", "healthz"] {
        assert!(types.contains(&format!("{id}: {{")), "kiln-api.d.ts has no operation {id}");
    }
    assert!(work.path().join("kiln.mjs").is_file(), "tsc wrote kiln.mjs");

    // What the program printed is what the gateway holds.
    let line = run.stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON line:\n{}", run.stdout));
    let out: Value = serde_json::from_str(line).unwrap();
    assert_eq!(out["status"], "completed", "{out}");
    let job_id = out["job_id"].as_str().expect("job_id");
    let client = cluster.client().await;
    let job = client.status(job_id).await.unwrap();
    let artifact = job.artifacts.iter().find(|a| a.name == out["artifact"].as_str().unwrap()).expect("the artifact it fetched");
    assert_eq!((out["bytes"].as_u64(), out["sha256"].as_str()), (Some(artifact.size), Some(artifact.sha256.as_str())), "{out}");
    assert!(out["status_events"].as_u64().unwrap() >= 2, "the events it read: {out}");
    assert!(out["listed"].as_array().unwrap().iter().any(|j| j == job_id), "GET /v1/jobs?status=completed&model=demo: {out}");

    // The types are the document's, not `any`: each line below must fail to compile, and
    // `@ts-expect-error` fails the compile when it does not.
    let checks = r#"
import createClient from "openapi-fetch";
import type { paths, components } from "./kiln-api.js";
const kiln = createClient<paths>({ baseUrl: "http://127.0.0.1:1" });
export async function checks(): Promise<string | undefined> {
  // @ts-expect-error: no such path
  await kiln.GET("/v1/no-such-route");
  // @ts-expect-error: a job's path needs its id
  await kiln.GET("/v1/jobs/{id}", {});
  // @ts-expect-error: a status is one of JobState's names
  await kiln.GET("/v1/jobs", { params: { query: { status: "sleeping" } } });
  // @ts-expect-error: a submit needs its model
  await kiln.POST("/v1/jobs", { body: { inputs: {} } });
  const r = await kiln.GET("/v1/jobs/{id}", { params: { path: { id: "x" } } });
  // @ts-expect-error: JobView has no such field
  r.data?.no_such_field;
  const state: components["schemas"]["JobState"] | undefined = r.data?.status;
  // Errors are typed as the HttpError body.
  const code: string | undefined = r.error?.code;
  return state ?? code;
}
"#;
    std::fs::write(work.path().join("checks.mts"), checks).unwrap();
    let mut tsc = tokio::process::Command::new(modules.join(".bin/tsc"));
    tsc.args(["--strict", "--module", "nodenext", "--target", "es2022", "--skipLibCheck", "--noEmit", "checks.mts"])
        .current_dir(work.path());
    run_program(tsc, "", Duration::from_secs(120)).await.assert_success("tsc on checks.mts (the generated types are not specific)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swagger_ui_and_redoc_render_every_operation_from_the_gateway_alone_and_try_it_out_runs_a_job() {
    require_browser_tools();
    let (cluster, gateway) = start().await;
    let out_dir = cluster.dir.path().join("browser");
    let started = Instant::now();
    let mut command = tokio::process::Command::new("node");
    // Then "Try it out" on POST /v1/jobs with this body, authorized with the key.
    let body = r#"{"model": "demo", "inputs": {"prompt": "a fox from swagger"}, "params": {"steps": 2, "step_ms": 10}}"#;
    command.arg(repo().join("tests/browser/docs.mjs")).args([&gateway.base, out_dir.to_str().unwrap(), KEY, body]);
    let run = run_program(command, "", Duration::from_secs(170)).await;
    let line = run.stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}");
    let r: Value = serde_json::from_str(line).unwrap_or(Value::Null);
    assert!(run.status.success() && r["done"] == true, "docs.mjs failed ({}): {r:#}\n--- stderr\n{}", run.status, run.stderr);
    println!("docs.mjs took {:?}: swagger {} ms, redoc {} ms", started.elapsed(), r["swagger"]["elapsed_ms"], r["redoc"]["elapsed_ms"]);
    let operations = r["operations"].as_u64().unwrap();
    assert!(operations >= 20, "{r}");
    for page in ["swagger", "redoc"] {
        assert_eq!(r[page]["rendered"].as_array().map(Vec::len), Some(operations as usize), "{page}: {r}");
    }
    assert_eq!(r["elsewhere"], serde_json::json!([]), "the pages asked other hosts: {r}");
    assert_eq!(r["console_errors"], serde_json::json!([]), "the pages logged errors: {r}");
    for shot in r["screenshots"].as_array().unwrap() {
        assert!(Path::new(shot.as_str().unwrap()).is_file(), "{shot}");
    }

    // "Try it out" submitted a real job, which runs, carrying the key's name.
    let tried = &r["try_it_out"];
    assert_eq!(tried["status"], "201", "Swagger UI shows the submit's status: {tried}");
    let reply: Value = serde_json::from_str(tried["body"].as_str().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {tried}"));
    let job_id = reply["job_id"].as_str().unwrap_or_else(|| panic!("no job_id: {reply}"));
    let view = wait_terminal(&cluster.client().await, job_id, Duration::from_secs(60)).await;
    assert_eq!(view.status.as_str(), "completed", "{view:?}");
    assert_eq!(view.labels.get("api_key").map(String::as_str), Some("client"), "{view:?}");
}

/// Fails, naming the fix, when the browser tools are missing: the test never skips.
fn require_browser_tools() {
    const FIX: &str = "run scripts/setup.sh (it installs Debian's chromium and puppeteer-core), then `source scripts/env.sh`";
    let chromium = std::env::var("KILN_CHROMIUM").unwrap_or_else(|_| panic!("KILN_CHROMIUM is not set: {FIX}"));
    assert!(Path::new(&chromium).is_file(), "KILN_CHROMIUM={chromium} does not exist: {FIX}");
    let modules = std::env::var("KILN_NODE_MODULES").unwrap_or_else(|_| panic!("KILN_NODE_MODULES is not set: {FIX}"));
    assert!(Path::new(&modules).join("puppeteer-core/package.json").is_file(), "no puppeteer-core in {modules}: {FIX}");
}
