//! The Grafana dashboard (deploy/grafana/kiln.json) against live processes: a real nats-server,
//! a real `kiln node` and a standalone `kiln gateway`, after a job ran through the gateway (so
//! its histograms have samples). Every metric name any panel's PromQL (or a template variable's
//! query) names must be a series that the node's or the gateway's `/metrics` exports: a panel
//! querying a name no process exports fails here. Also: every exported `kiln_*` metric has its
//! help text, both processes say `kiln_build_info`, the gateway labels requests by route
//! template, never by a raw path, and no source file names a metric outside the central list.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The metric names in a PromQL expression: identifiers that start with `kiln_` (label names,
/// functions and label values never do; a label value is quoted, and skipped).
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            rest = quoted.find('"').map(|end| &quoted[end + 1..]).unwrap_or("");
            continue;
        }
        let c = rest.chars().next().unwrap();
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            let word = &rest[..end];
            if word.starts_with("kiln_") {
                names.insert(word.to_string());
            }
            rest = &rest[end..];
        } else {
            rest = &rest[c.len_utf8()..];
        }
    }
    names
}

/// Every PromQL expression of the dashboard: each panel's targets (rows' nested panels too) and
/// each template variable's query, with where it is.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = vec![];
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without `expr`"));
                out.push((format!("panel {title:?}"), expr.to_string()));
            }
            panels(&panel["panels"], out);
        }
    }
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap_or("");
        out.push((format!("variable {:?}", var["name"]), query.to_string()));
    }
    out
}

/// The series names of a Prometheus text page (`kiln_run_seconds_bucket`, ...).
fn exported(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l[..l.find(['{', ' ']).unwrap_or(l.len())].to_string())
        .collect()
}

/// The metric a series belongs to: `kiln_run_seconds_bucket` is `kiln_run_seconds`'s.
fn metric_of(series: &str) -> &str {
    let known = |n: &str| kiln_core::metrics::ALL.iter().any(|m| m.name == n);
    if known(series) {
        return series;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix).filter(|b| known(b)) {
            return base;
        }
    }
    series
}

async fn text(url: &str) -> String {
    let r = http().get(url).timeout(Duration::from_secs(10)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.text().await.unwrap()
}

#[test]
fn the_expression_parser_finds_every_name_and_only_names() {
    let e = r#"histogram_quantile(0.99, sum by (le, route) (rate(kiln_http_request_duration_seconds_bucket{route="kiln_not_a_name"}[5m]))) / kiln_b:x"#;
    assert_eq!(names_in(e).into_iter().collect::<Vec<_>>(), ["kiln_b:x", "kiln_http_request_duration_seconds_bucket"]);
    assert_eq!(metric_of("kiln_run_seconds_bucket"), "kiln_run_seconds");
    assert_eq!(metric_of("kiln_jobs_finished_total"), "kiln_jobs_finished_total");
}

/// Every metric is recorded under a constant of `kiln_core::metrics` (whose `ALL` describes it),
/// never under a string literal that the list, its help text and the docs would not know.
#[test]
fn no_metric_is_named_outside_the_central_list() {
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.ends_with("target") && !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = vec![];
    for dir in ["src", "actors", "core", "client", "contract", "tools"] {
        sources(&repo().join(dir), &mut files);
    }
    assert!(files.len() > 50, "{files:?}");
    let mut literal = vec![];
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for mac in ["counter!(", "gauge!(", "histogram!("] {
                if code.split(mac).skip(1).any(|rest| rest.trim_start().starts_with('"')) {
                    literal.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(literal.is_empty(), "metric names outside kiln_core::metrics:\n{}", literal.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_queries_is_exported_by_a_live_node_or_gateway() {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/kiln.json")).unwrap()).unwrap();
    let queries = expressions(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for (place, expr) in &queries {
        let names = names_in(expr);
        assert!(!names.is_empty() || place.starts_with("variable"), "{place}: queries no kiln metric: {expr}");
        for name in names {
            assert!(
                kiln_core::metrics::ALL.iter().any(|m| m.name == metric_of(&name)),
                "{place}: {name} is not in kiln_core::metrics::ALL"
            );
            wanted.insert(name);
        }
    }

    let mut cluster = TestCluster::new();
    let port = kiln_core::nats::server::free_port().unwrap();
    let models = format!("{}preview_interval_ms = 0\n", demo_model("demo", &[], 3, 60_000));
    let config = config_toml(&cluster.url(), &["cpu:0"], 10_000, &models);
    let node_config = config.replace("metrics_addr = \"\"", &format!("metrics_addr = \"127.0.0.1:{port}\""));
    cluster.add_node("n1", &node_config);
    cluster.wait_node_ready("n1", 1).await;
    let gw = GatewayProcess::spawn(cluster.dir.path(), "gw", &config, &cluster.url());
    let h = http();

    // A job through the gateway, followed to its end over SSE, and a request no route matches.
    let r = h
        .post(gw.url("/v1/jobs"))
        .json(&json!({"model": "demo", "inputs": {"prompt": "a dashboard"}, "params": {"steps": 3, "step_ms": 20}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();
    let events = read_sse(h.get(gw.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap(), Duration::from_secs(60)).await;
    assert!(events.last().is_some_and(|(_, _, data)| data.contains("\"completed\"")), "{events:?}");
    assert_eq!(h.get(gw.url("/no/such/path/123")).send().await.unwrap().status(), 404);

    // The queue gauges come at the exporter's next refresh, and the ended stream is uncounted
    // when the server drops it: wait for both.
    let open_streams = |page: &str| page.lines().find(|l| l.starts_with("kiln_http_sse_clients ")).map(|l| l.to_string());
    let node_url = format!("http://127.0.0.1:{port}/metrics");
    let gateway_url = gw.url("/metrics");
    let started = Instant::now();
    let (node_page, gateway_page, missing) = loop {
        let (node_page, gateway_page) = (text(&node_url).await, text(&gateway_url).await);
        let all: BTreeSet<String> = exported(&node_page).union(&exported(&gateway_page)).cloned().collect();
        let missing: Vec<String> = wanted.iter().filter(|n| !all.contains(*n)).cloned().collect();
        let settled = open_streams(&gateway_page).as_deref() == Some("kiln_http_sse_clients 0");
        if (missing.is_empty() && settled) || started.elapsed() > Duration::from_secs(20) {
            break (node_page, gateway_page, missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        missing.is_empty(),
        "the dashboard queries series that neither a node nor a gateway exports: {missing:?}\n--- node:\n{node_page}\n--- gateway:\n{gateway_page}"
    );
    println!("{} series queried by {} expressions, all exported (found in {:?})", wanted.len(), queries.len(), started.elapsed());

    // The gateway's own: by route template and status, its latency, the streams open.
    let gateway_series = exported(&gateway_page);
    for name in ["kiln_http_requests_total", "kiln_http_request_duration_seconds_bucket", "kiln_http_sse_clients", "kiln_build_info"] {
        assert!(gateway_series.contains(name), "the standalone gateway exports {name}:\n{gateway_page}");
    }
    for line in [
        r#"kiln_http_requests_total{route="/v1/jobs",method="POST",status="201"} 1"#,
        r#"kiln_http_requests_total{route="/v1/jobs/{id}/events",method="GET",status="200"} 1"#,
        r#"kiln_http_requests_total{route="unmatched",method="GET",status="404"} 1"#,
    ] {
        assert!(gateway_page.contains(line), "{line}\n{gateway_page}");
    }
    assert!(!gateway_page.contains(&id), "no job id in any label:\n{gateway_page}");
    assert_eq!(open_streams(&gateway_page).as_deref(), Some("kiln_http_sse_clients 0"), "the stream ended, so it is not counted");

    // Build info on both, with the commit `kiln --version` names.
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let commit = version.split("(commit ").nth(1).and_then(|r| r.split(')').next()).expect("kiln --version names a commit").to_string();
    for (who, page) in [("node", &node_page), ("gateway", &gateway_page)] {
        let info = page.lines().find(|l| l.starts_with("kiln_build_info{")).unwrap_or_else(|| panic!("{who}: no kiln_build_info:\n{page}"));
        assert!(
            info.contains(&format!("commit=\"{commit}\"")) && info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{who}: {info}"
        );
        assert!(info.ends_with(" 1"), "{who}: {info}");
        // Every kiln metric it exports is described: `# HELP` and `# TYPE` lines.
        for series in exported(page).iter().filter(|s| s.starts_with("kiln_")) {
            let metric = metric_of(series);
            assert!(page.contains(&format!("# HELP {metric} ")), "{who}: {metric} has no help text:\n{page}");
        }
    }
    // One outcome vocabulary: the job and its attempt both say `completed`.
    assert!(node_page.contains(r#"kiln_jobs_finished_total{model="demo",outcome="completed"} 1"#), "{node_page}");
    assert!(node_page.contains(r#"kiln_run_seconds_count{model="demo",outcome="completed"} 1"#), "{node_page}");
}
