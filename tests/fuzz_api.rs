//! Structured fuzzing of every client endpoint (proptest) against one real node over NATS:
//! mutations of valid requests (random and duplicated fields, wrong types, huge, empty and
//! unicode strings, wildcard and path characters in names, numbers out of range, deep nesting,
//! big arrays, truncated bodies, random bytes, invalid UTF-8). Each reply must come within a
//! bound and be either the endpoint's success reply or an error with a known code (never
//! `internal`) and a short human message; afterwards the node still serves and is alive.
//!
//! `PROPTEST_CASES` sets the cases per endpoint (default 300), `PROPTEST_RNG_SEED` the seed.
//! The pure validators get their own, in-process properties at the end.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use kiln::api::{ENDPOINTS, MAX_ERROR_MESSAGE_BYTES};
use kiln_core::ids;
use kiln_core::job::JobState;
use kiln_core::protocol::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// The node under test. No generated string is this name, so drain and restart_gpu only ever
/// reach nodes that do not exist; ping gets it on purpose.
const NODE: &str = "fuzz-n1";
/// Every reply must come within this.
const REPLY_BOUND: Duration = Duration::from_secs(10);
/// The node's request limit in this test (smaller than the default, so oversize cases are cheap).
const MAX_REQUEST_BYTES: usize = 65_536;
const MAX_BATCH_ITEMS: usize = 40;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(300)
}

// ---- strategies -------------------------------------------------------------------------

/// Strings a client might send where a name is expected: valid ones, wildcards, paths,
/// separators, control and unicode characters, boundary lengths, and (rarely) huge ones.
fn nasty_string() -> BoxedStrategy<String> {
    let fixed = vec![
        "",
        "*",
        ">",
        ".",
        "..",
        "../../etc/passwd",
        "a/../b",
        "/etc/passwd",
        "a//b",
        "a.b",
        "a.*",
        "kiln.jobs.>",
        "$SRV.PING",
        "_INBOX.x",
        "noop",
        "needs-prompt",
        "NOOP",
        "prompt",
        "uploads/x.png",
        "uploads/",
        "a b",
        "\0",
        "\u{202e}evil",
        "é",
        "🙂",
        "null",
        "{}",
        "\\",
        "\"",
        "cpu:0",
        "a\nb",
        "%2e%2e",
        "..\\..\\x",
    ];
    prop_oneof![
        4 => prop::sample::select(fixed).prop_map(String::from),
        3 => "[a-z0-9_-]{1,70}",
        3 => "[a-zA-Z0-9./*> _:\\\\-]{0,80}",
        2 => any::<String>(),
        1 => (prop::sample::select(vec![63usize, 64, 65, 255, 256, 257, 4097, 70_000]), any::<char>())
            .prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
    ]
    .boxed()
}

/// Like [`nasty_string`] without the huge ones: for values nested inside others.
fn small_string() -> BoxedStrategy<String> {
    prop_oneof![prop::sample::select(vec!["", "*", ">", "..", "a/../b", "noop", "x"]).prop_map(String::from), any::<String>(),].boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        prop::sample::select(vec![json!(0), json!(-1), json!(1), json!(255), json!(256), json!(u32::MAX as u64 + 1), json!(u64::MAX)]),
    ]
    .boxed()
}

/// Any JSON value, a few levels deep.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool), number(), small_string().prop_map(Value::String)];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(small_string(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// JSON text no serializer writes: numbers out of every integer range, lone surrogates,
/// leading zeros, bare words, fragments.
fn raw_literal() -> BoxedStrategy<String> {
    prop::sample::select(vec![
        "18446744073709551616",
        "-18446744073709551617",
        "1e400",
        "-1e400",
        "-0",
        "1.0",
        "1.5",
        "NaN",
        "Infinity",
        "01",
        "\"\\ud800\"",
        "\"\\u0000\"",
        "[",
        "}",
        "",
        "tru",
        "\"unterminated",
    ])
    .prop_map(String::from)
    .boxed()
}

/// One field's value as JSON text: mostly the valid kind, else any value or a raw literal.
fn field(valid: BoxedStrategy<Value>) -> BoxedStrategy<String> {
    prop_oneof![16 => valid.prop_map(|v| v.to_string()), 1 => any_json().prop_map(|v| v.to_string()), 1 => raw_literal()].boxed()
}

fn string_field(valid: BoxedStrategy<String>) -> BoxedStrategy<String> {
    field(prop_oneof![8 => valid, 1 => nasty_string()].prop_map(Value::String).boxed())
}

/// An object with the given fields, each present (required ones mostly), plus random extra
/// fields and sometimes a duplicated one, written as raw text so keys can repeat.
fn object(fields: Vec<(&'static str, bool, BoxedStrategy<String>)>) -> BoxedStrategy<Vec<u8>> {
    let parts: Vec<BoxedStrategy<Option<(String, String)>>> = fields
        .into_iter()
        .map(|(name, required, value)| {
            prop::option::weighted(if required { 0.9 } else { 0.5 }, value).prop_map(move |v| v.map(|v| (name.to_string(), v))).boxed()
        })
        .collect();
    let extras = prop::collection::vec((nasty_string(), any_json().prop_map(|v| v.to_string())), 0..2);
    (parts, prop::option::weighted(0.1, extras), prop::bool::weighted(0.1), any::<prop::sample::Index>())
        .prop_map(|(parts, extras, duplicate, which)| {
            let mut kv: Vec<(String, String)> = parts.into_iter().flatten().collect();
            kv.extend(extras.unwrap_or_default());
            if duplicate && !kv.is_empty() {
                let (k, _) = kv[which.index(kv.len())].clone();
                kv.push((k, "\"duplicate\"".into()));
            }
            let body: Vec<String> = kv.iter().map(|(k, v)| format!("{}:{v}", Value::String(k.clone()))).collect();
            format!("{{{}}}", body.join(",")).into_bytes()
        })
        .boxed()
}

fn model() -> BoxedStrategy<String> {
    string_field(prop::sample::select(vec!["noop", "needs-prompt"]).prop_map(String::from).boxed())
}

fn object_name() -> BoxedStrategy<String> {
    prop_oneof![nasty_string(), "[a-z]{1,8}(/[a-z0-9._-]{1,12}){0,3}"].boxed()
}

fn inputs() -> BoxedStrategy<String> {
    let value = prop_oneof![
        3 => small_string().prop_map(Value::String),
        1 => number(),
        2 => object_name().prop_map(|o| json!({ "object": o })),
        1 => any_json(),
    ];
    let name = prop_oneof![3 => Just("prompt".to_string()), 2 => "[a-z_]{1,10}", 1 => nasty_string()];
    field(prop::collection::btree_map(name, value, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())).boxed())
}

fn params() -> BoxedStrategy<String> {
    field(prop::collection::btree_map("[a-z]{1,6}", any_json(), 0..4).prop_map(|m| Value::Object(m.into_iter().collect())).boxed())
}

fn deadline() -> BoxedStrategy<String> {
    let now = kiln_core::now_ms();
    field(prop_oneof![Just(json!(now + 3_600_000)), Just(json!(1)), Just(json!(0)), Just(json!(u64::MAX))].boxed())
}

fn common_submit_fields() -> Vec<(&'static str, bool, BoxedStrategy<String>)> {
    vec![
        ("priority", false, field((0u64..=300).prop_map(Value::from).boxed())),
        ("idempotency_key", false, string_field("[a-z0-9]{1,20}".boxed())),
        ("deadline_ms", false, deadline()),
        ("max_attempts", false, field((0u64..=5).prop_map(Value::from).boxed())),
    ]
}

/// A request body for `endpoint` in the shape it expects, mutated at the field level.
fn template(endpoint: &str, job_ids: &[String], batch_ids: &[String]) -> BoxedStrategy<Vec<u8>> {
    let job_id = string_field(prop::sample::select(job_ids.to_vec()).boxed());
    let batch_id = string_field(prop::sample::select(batch_ids.to_vec()).boxed());
    match endpoint {
        "submit" => {
            let mut f = vec![("model", true, model()), ("inputs", false, inputs()), ("params", false, params())];
            f.extend(common_submit_fields());
            f.push(("reuse", false, field(any::<bool>().prop_map(Value::Bool).boxed())));
            let url = prop::sample::select(vec!["https://example.com/h", "http://127.0.0.1:9/x", "ftp://x", "", "http://[::1]/"]);
            let events = prop::collection::vec(prop::sample::select(vec!["started", "progress", "completed", "finished", ""]), 0..4);
            let webhook = (url, events).prop_map(|(url, events)| json!({"url": url, "events": events}));
            f.push(("webhook", false, field(webhook.boxed())));
            object(f)
        }
        "status" | "cancel" | "result" | "webhooks" | "webhooks_redeliver" => object(vec![("job_id", true, job_id)]),
        "batch" | "cancel_batch" | "retry_batch" => object(vec![("batch_id", true, batch_id)]),
        "jobs" => {
            let states =
                prop::sample::select(vec!["queued", "running", "retrying", "completed", "failed", "cancelled"]).prop_map(String::from);
            object(vec![
                ("status", false, string_field(states.boxed())),
                ("model", false, model()),
                ("dead_letter", false, field(any::<bool>().prop_map(Value::Bool).boxed())),
                ("limit", false, field(prop_oneof![0u64..20, Just(1000), Just(100_000)].prop_map(Value::from).boxed())),
            ])
        }
        "queue" => object(vec![("model", false, model())]),
        // These take no body; whatever comes is ignored (but size-checked).
        "models" | "cluster" => prop_oneof![Just(Vec::new()), any_json().prop_map(|v| v.to_string().into_bytes())].boxed(),
        "control" => {
            let ping = Just(serde_json::to_vec(&json!({"action": "ping", "node": NODE})).unwrap());
            let action = prop::sample::select(vec!["ping", "drain", "restart_gpu"]).prop_map(String::from);
            let other = object(vec![
                ("action", true, string_field(action.boxed())),
                ("node", true, string_field(Just("other-node".to_string()).boxed())),
                ("slot", false, string_field(Just("cpu:0".to_string()).boxed())),
            ]);
            prop_oneof![1 => ping, 6 => other].boxed()
        }
        "submit_batch" => {
            let item = prop_oneof![
                4 => (inputs(), params()).prop_map(|(i, p)| format!(r#"{{"inputs":{i},"params":{p}}}"#)),
                1 => any_json().prop_map(|v| v.to_string()),
            ];
            let items = prop_oneof![
                4 => prop::collection::vec(item, 0..6).prop_map(|v| format!("[{}]", v.join(","))),
                1 => (MAX_BATCH_ITEMS..MAX_BATCH_ITEMS + 5).prop_map(|n| format!("[{}]", vec!["{}"; n].join(","))),
                1 => any_json().prop_map(|v| v.to_string()),
            ];
            let mut f = vec![("model", true, model()), ("items", true, items.boxed()), ("params", false, params())];
            f.extend(common_submit_fields());
            object(f)
        }
        other => panic!("no template for {other}"),
    }
}

/// Byte-level damage to a body.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Flip(prop::sample::Index, u8),
    InvalidUtf8(prop::sample::Index),
    Delete(prop::sample::Index, usize),
    Double,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::InvalidUtf8),
        (any::<prop::sample::Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        Just(Mutation::Double),
    ]
}

fn mutate(mut body: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let at = |i: &prop::sample::Index, len: usize| if len == 0 { 0 } else { i.index(len) };
    match m {
        Mutation::Truncate(i) => body.truncate(at(i, body.len())),
        Mutation::Insert(i, b) => body.insert(at(i, body.len()), *b),
        Mutation::Flip(i, b) if !body.is_empty() => {
            let i = at(i, body.len());
            body[i] ^= b | 1;
        }
        Mutation::Flip(..) => {}
        Mutation::InvalidUtf8(i) => {
            let i = at(i, body.len());
            body.splice(i..i, [0xff, 0xfe, 0xc3]);
        }
        Mutation::Delete(i, n) => {
            let i = at(i, body.len());
            body.drain(i..(i + n).min(body.len()));
        }
        Mutation::Double => body = [body.clone(), body].concat(),
    }
    body
}

/// A valid-looking request with one field nested `depth` levels (up to 20,000).
fn deep(endpoint: &str) -> BoxedStrategy<Vec<u8>> {
    let endpoint = endpoint.to_string();
    let depth = prop_oneof![1usize..70, prop::sample::select(vec![127, 128, 129, 1000, 10_000, 20_000])];
    (depth, any::<bool>())
        .prop_map(move |(depth, arrays)| {
            let (open, close) = if arrays { ("[", "]") } else { (r#"{"a":"#, "}") };
            let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let field = match endpoint.as_str() {
                "submit" | "submit_batch" => format!(r#""model":"noop","params":{{"p":{nested}}}"#),
                _ => format!(r#""job_id":{nested}"#),
            };
            let body = if endpoint == "submit_batch" {
                format!(r#"{{{field},"items":[{{"inputs":{{"prompt":{nested}}}}}]}}"#)
            } else {
                format!("{{{field}}}")
            };
            body.into_bytes()
        })
        .boxed()
}

fn body(endpoint: &str, job_ids: &[String], batch_ids: &[String]) -> BoxedStrategy<Vec<u8>> {
    let t = template(endpoint, job_ids, batch_ids);
    prop_oneof![
        8 => t.clone(),
        2 => any_json().prop_map(|v| v.to_string().into_bytes()),
        3 => (t, prop::collection::vec(mutation(), 1..3)).prop_map(|(b, ms)| ms.iter().fold(b, mutate)),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => deep(endpoint),
    ]
    // Drain and restart only ever name nodes that do not exist.
    .prop_filter("never drains the node under test", |b| {
        let text = String::from_utf8_lossy(b);
        !(text.contains(NODE) && (text.contains("drain") || text.contains("restart")))
    })
    .boxed()
}

// ---- checks ----------------------------------------------------------------------------

/// `Ok(None)` for a success reply of the endpoint's type, `Ok(Some(code))` for a coded error.
fn check_reply(endpoint: &str, raw: &[u8]) -> Result<Option<ErrorCode>, String> {
    if let Ok(e) = serde_json::from_slice::<ErrorReply>(raw) {
        let m = &e.error.message;
        if m.trim().is_empty() {
            return Err(format!("{:?} with an empty message", e.error.code));
        }
        if m.len() > MAX_ERROR_MESSAGE_BYTES {
            return Err(format!("a {} byte message", m.len()));
        }
        if m.contains("Error {") {
            return Err(format!("a debug string, not a message: {m}"));
        }
        if e.error.code == ErrorCode::Internal {
            return Err(format!("internal error for client input: {m}"));
        }
        return Ok(Some(e.error.code));
    }
    fn is<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<(), String> {
        serde_json::from_slice::<T>(raw).map(|_| ()).map_err(|e| e.to_string())
    }
    let parsed = match endpoint {
        "submit" => is::<SubmitReply>(raw),
        "status" | "cancel" => is::<JobView>(raw),
        "result" => is::<ResultReply>(raw),
        "jobs" => is::<ListJobsReply>(raw),
        "models" => is::<ModelsReply>(raw),
        "cluster" => is::<ClusterReply>(raw),
        "queue" => is::<QueueReply>(raw),
        "control" => is::<ControlReply>(raw),
        "submit_batch" | "retry_batch" => is::<BatchReply>(raw),
        "batch" | "cancel_batch" => is::<BatchView>(raw),
        "webhooks" => is::<WebhooksReply>(raw),
        "webhooks_redeliver" => is::<RedeliverReply>(raw),
        other => Err(format!("unknown endpoint {other}")),
    };
    parsed.map(|_| None).map_err(|e| format!("neither an error nor a {endpoint} reply ({e}): {}", String::from_utf8_lossy(raw)))
}

#[derive(Default)]
struct Tally {
    ok: u64,
    codes: BTreeMap<&'static str, u64>,
    slowest: Duration,
}

#[test]
fn every_endpoint_survives_structured_fuzzing() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut cluster = TestCluster::new();
    let models = format!(
        r#"{NOOP_MODEL}
[[models]]
name = "needs-prompt"
engine = {{ kind = "noop" }}
required_inputs = ["prompt"]
[limits]
max_request_bytes = {MAX_REQUEST_BYTES}
max_batch_items = {MAX_BATCH_ITEMS}
"#
    );
    cluster.add_node(NODE, &config_toml(&cluster.url(), &["cpu:0", "cpu:1"], 10_000, &models));
    rt.block_on(cluster.wait_node_ready(NODE, 2));
    let pid = cluster.nodes[0].pid();
    let client = rt.block_on(cluster.client()).with_timeout(REPLY_BOUND);

    // Real ids, so that some cases hit existing jobs and batches.
    let (job_ids, batch_ids) = rt.block_on(async {
        let mut jobs = vec![];
        for _ in 0..3 {
            jobs.push(client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap().job_id);
        }
        let batch = BatchSubmitRequest { model: "noop".into(), items: vec![Default::default(); 2], ..Default::default() };
        let batch: BatchReply = client.request("submit_batch", &batch).await.unwrap();
        jobs.extend(batch.items.iter().map(|i| i.job_id.clone()));
        (jobs, vec![batch.batch_id])
    });

    // `jobs` reads every record, so it goes first, before the fuzzed submits add hundreds.
    let mut order: Vec<&str> = ENDPOINTS.to_vec();
    order.sort_by_key(|e| match *e {
        "jobs" => 0,
        "submit" | "submit_batch" => 2,
        _ => 1,
    });
    let started = Instant::now();
    let mut report = vec![];
    for endpoint in order {
        let tally = RefCell::new(Tally::default());
        let config = Config { cases: cases(), failure_persistence: None, max_shrink_iters: 64, ..Config::default() };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&body(endpoint, &job_ids, &batch_ids), |body| {
            let sent = Instant::now();
            let raw = rt.block_on(client.request_raw(endpoint, body.clone()));
            let took = sent.elapsed();
            let preview = String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
            let raw = raw.map_err(|e| TestCaseError::fail(format!("{endpoint}: no reply within {REPLY_BOUND:?} ({e}) to {preview}")))?;
            let code = check_reply(endpoint, &raw).map_err(|e| TestCaseError::fail(format!("{endpoint}: {e}\nrequest: {preview}")))?;
            if std::env::var_os("KILN_FUZZ_VERBOSE").is_some() {
                println!("{endpoint} {preview} -> {}", String::from_utf8_lossy(&raw[..raw.len().min(300)]));
            }
            prop_assert!(process_alive(pid), "the node died on {endpoint}: {preview}");
            let mut t = tally.borrow_mut();
            t.slowest = t.slowest.max(took);
            match code {
                None => t.ok += 1,
                Some(c) => *t.codes.entry(c.as_str()).or_default() += 1,
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{endpoint}: {e}\n---- node log ----\n{}", cluster.nodes[0].log());
        }
        let t = tally.into_inner();
        report.push(format!("{endpoint:>12}: {} ok, errors {:?}, slowest reply {:?}", t.ok, t.codes, t.slowest));
    }
    let elapsed = started.elapsed();

    // The node still serves: it lists its models and runs a job to the end.
    rt.block_on(async {
        let models = client.models().await.unwrap();
        assert!(models.models.iter().any(|m| m.name == "noop"));
        let ok = client.submit(&SubmitRequest { model: "noop".into(), ..Default::default() }).await.unwrap();
        assert_eq!(wait_terminal(&client, &ok.job_id, Duration::from_secs(30)).await.status, JobState::Completed);
    });
    assert!(process_alive(pid), "the node process is gone");
    println!("fuzzed {} cases per endpoint in {elapsed:.1?}:", cases());
    for line in report {
        println!("{line}");
    }
    println!("node RSS after the run: {} KiB", rss_kib(pid).unwrap_or(0));
}

// ---- pure validators, in process ---------------------------------------------------------

proptest! {
    #![proptest_config(Config { cases: 2000, failure_persistence: None, ..Config::default() })]

    #[test]
    fn a_valid_token_has_no_wildcard_separator_or_path(s in prop_oneof![nasty_string(), any::<String>()]) {
        if ids::is_valid_token(&s) {
            prop_assert!((1..=64).contains(&s.len()));
            prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{s:?}");
        }
        if ids::is_valid_model_name(&s) {
            prop_assert!(ids::is_valid_token(&s));
        }
    }

    #[test]
    fn a_valid_object_name_cannot_escape_its_bucket(s in prop_oneof![nasty_string(), object_name(), "[a./]{0,12}"]) {
        if ids::is_valid_object_name(&s) {
            prop_assert!(!s.starts_with('/') && !s.contains('*') && !s.contains('>') && !s.contains('\\'), "{s:?}");
            prop_assert!(s.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."), "{s:?}");
            prop_assert!(s.len() <= 256 && s.is_ascii() && !s.chars().any(char::is_control), "{s:?}");
        }
    }

    #[test]
    fn json_depth_matches_a_recursive_count(v in any_json()) {
        fn depth(v: &Value) -> usize {
            1 + match v {
                Value::Array(a) => a.iter().map(depth).max().unwrap_or(0),
                Value::Object(o) => o.values().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }
        prop_assert_eq!(ids::json_depth(&v), depth(&v));
    }

    #[test]
    fn truncation_keeps_a_prefix_within_the_bound(s in any::<String>(), max in 0usize..64) {
        let cut = truncate_utf8(s.clone(), max);
        prop_assert!(cut.len() <= max, "{} bytes cut to {max} gave {}", s.len(), cut.len());
        if s.len() <= max {
            prop_assert_eq!(cut, s);
        } else {
            prop_assert!(s.starts_with(cut.trim_end_matches('…')));
        }
    }
}
