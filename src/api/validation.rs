//! Request validation, as pure functions: what a request must be before anything is read or
//! written for it. Each refusal is an [`ApiError`] with a stable code (`bad_request`,
//! `unknown_model`, `payload_too_large`, `deadline_exceeded`) and a message that names the
//! field; the handlers call these in the order the checks were always made, so the first
//! problem found is the one reported. The checks that need the store (an uploaded input
//! exists, a job or batch exists) stay with the handlers.

use std::collections::BTreeMap;

use kiln_core::batch::PlanModel;
use kiln_core::config::Limits;
use kiln_core::ids;
use kiln_core::models::ClusterModel;
use kiln_core::protocol::*;

/// A JSON object of params, as requests carry them.
pub type Params = serde_json::Map<String, serde_json::Value>;

/// `payload_too_large` for a body over `max_request_bytes`: checked before the body is parsed.
pub fn check_request_size(len: usize, limits: &Limits) -> Result<(), ApiError> {
    if len > limits.max_request_bytes {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request is {len} bytes; the limit is {} (upload large inputs to the files bucket)", limits.max_request_bytes),
        ));
    }
    Ok(())
}

/// Ids end up in KV keys and subjects: a token, or `bad_request` naming the field.
pub fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if ids::is_valid_token(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{field} {id:?} must be 1-64 letters, digits, '-' or '_'")))
    }
}

/// An idempotency key, if given, is 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes (any UTF-8: it is
/// hashed into the id, never used as a name).
pub fn check_idempotency_key(key: Option<&str>) -> Result<(), ApiError> {
    match key {
        Some(key) if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES => {
            Err(ApiError::bad_request(format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes")))
        }
        _ => Ok(()),
    }
}

/// The definition of one of the cluster's `models`; `unknown_model` naming `what` (the
/// request's field) and listing the cluster's models when no live node declares it.
pub fn cluster_model(models: &BTreeMap<String, ClusterModel>, name: &str, what: &str) -> Result<ModelDecl, ApiError> {
    if let Some(model) = models.get(name) {
        return Ok(model.decl.clone());
    }
    let known: Vec<&str> = models.keys().map(String::as_str).collect();
    Err(ApiError::new(
        ErrorCode::UnknownModel,
        format!("{what} {name:?} is served by no live node of the cluster; known models: {}", known.join(", ")),
    ))
}

/// A submission checked against its model's definition, at time `now_ms`; returns its params
/// checked against the model's declared ones, defaults filled in (see `kiln_core::params`).
pub fn validate_submit(req: &SubmitRequest, model: &ModelDecl, limits: &Limits, now_ms: u64) -> Result<Params, ApiError> {
    if req.inputs.len() > limits.max_inputs {
        return Err(ApiError::bad_request(format!("{} inputs; at most {} are allowed", req.inputs.len(), limits.max_inputs)));
    }
    for (name, value) in &req.inputs {
        if !ids::is_valid_input_name(name) {
            return Err(ApiError::bad_request(format!("input name {name:?} must be 1-64 letters, digits, '-' or '_'")));
        }
        match value {
            InputValue::Object { object } if !ids::is_valid_object_name(object) => {
                return Err(ApiError::bad_request(format!("input {name:?}: object name {object:?} is invalid (letters, digits, '-', '_', '.', '/' separators; no '..' or empty segments)")));
            }
            InputValue::Inline(v) if ids::json_depth(v) > limits.max_params_depth => {
                return Err(ApiError::bad_request(format!("input {name:?} nests deeper than {} levels", limits.max_params_depth)));
            }
            _ => {}
        }
    }
    for required in &model.required_inputs {
        if !req.inputs.contains_key(required) {
            return Err(ApiError::bad_request(format!("model {:?} needs input {required:?}", model.name)));
        }
    }
    let depth = req.params.values().map(ids::json_depth).max().unwrap_or(0) + 1;
    if depth > limits.max_params_depth {
        return Err(ApiError::bad_request(format!("params nest deeper than {} levels", limits.max_params_depth)));
    }
    if let Some(why) = invalid_labels(&req.labels) {
        return Err(ApiError::bad_request(why));
    }
    check_idempotency_key(req.idempotency_key.as_deref())?;
    if req.max_attempts == Some(0) {
        return Err(ApiError::bad_request("max_attempts must be at least 1"));
    }
    if req.deadline_ms.is_some_and(|d| d <= now_ms) {
        return Err(ApiError::new(ErrorCode::DeadlineExceeded, "deadline_ms is already in the past"));
    }
    kiln_core::params::check_params(&model.params, &req.params)
        .map_err(|why| ApiError::bad_request(format!("model {:?}: {why}", model.name)))
}

/// The checks of a batch that do not look at its items or models: at least one item and at
/// most `max_batch_items`, its idempotency key, `max_concurrency`, its labels.
pub fn check_batch(req: &BatchSubmitRequest, limits: &Limits) -> Result<(), ApiError> {
    let limit = limits.max_batch_items;
    if req.items.is_empty() {
        return Err(ApiError::bad_request("a batch needs at least one item"));
    }
    if req.items.len() > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("{} items; a batch holds at most {limit} (split it)", req.items.len()),
        ));
    }
    check_idempotency_key(req.idempotency_key.as_deref())?;
    if req.max_concurrency == Some(0) {
        return Err(ApiError::bad_request("max_concurrency must be at least 1"));
    }
    if let Some(why) = invalid_labels(&req.labels) {
        return Err(ApiError::bad_request(why));
    }
    Ok(())
}

/// The models a batch's items may run, in order, each the cluster's (else `unknown_model`)
/// and named once, with the batch's `max_attempts` capped by each model's; and their
/// definitions, to validate the items with.
pub fn batch_models(
    cluster: &BTreeMap<String, ClusterModel>,
    model: &str,
    fallbacks: &[String],
    max_attempts: Option<u32>,
) -> Result<(Vec<PlanModel>, Vec<ModelDecl>), ApiError> {
    let mut models: Vec<PlanModel> = Vec::with_capacity(1 + fallbacks.len());
    let mut decls = Vec::with_capacity(1 + fallbacks.len());
    for (pos, name) in std::iter::once(model).chain(fallbacks.iter().map(String::as_str)).enumerate() {
        let what = if pos == 0 { "model".to_string() } else { format!("fallback_models[{}]: model", pos - 1) };
        let config = cluster_model(cluster, name, &what)?;
        if models.iter().any(|m| m.name == name) {
            return Err(ApiError::bad_request(format!("model {name:?} is listed twice in model and fallback_models")));
        }
        models.push(PlanModel {
            name: config.name.clone(),
            max_attempts: max_attempts.map(|a| a.min(config.max_attempts)).unwrap_or(config.max_attempts),
            params: config.params.clone(),
        });
        decls.push(config);
    }
    Ok((models, decls))
}

/// One item's submission checked against every model it may run (`decls`, in order): the first
/// refusal, its message prefixed with `item <index>: `.
pub fn validate_batch_item(
    single: &mut SubmitRequest,
    index: usize,
    decls: &[ModelDecl],
    limits: &Limits,
    now_ms: u64,
) -> Result<(), ApiError> {
    for model in decls {
        single.model = model.name.clone();
        validate_submit(single, model, limits, now_ms).map_err(|e| at_item(index, e))?;
    }
    Ok(())
}

/// A refusal about one item of a batch: the same code, the item's index in front.
pub fn at_item(index: impl std::fmt::Display, e: ApiError) -> ApiError {
    ApiError::new(e.code, format!("item {index}: {}", e.message))
}

/// `payload_too_large` when `size` bytes (a serialized value, plus `room` for what later writes
/// add) would not fit in one KV value of a server whose `max_payload` is `max`.
pub fn check_storable(what: &str, size: usize, room: usize, max: usize) -> Result<(), ApiError> {
    let size = size.saturating_add(room);
    if size > max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("{what} would take {size} bytes, over the server's limit of {max} for one stored value; split the batch"),
        ));
    }
    Ok(())
}

/// The node a control request names must be a name (then it is looked up among the live ones).
pub fn check_node_name(node: &str) -> Result<(), ApiError> {
    if ids::is_valid_token(node) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{node:?} is not a node name")))
    }
}

/// A submit's `webhook`, if any: the cluster signs job webhooks (`[webhooks] secret` set), the
/// URL is `http(s)` with a host and, unless `[webhooks] allow_loopback`, names no private,
/// loopback or link-local address (a host name that resolves to one is refused at each
/// attempt instead, recorded `address_refused` in the job's delivery log). Unknown event names
/// are refused when the body is parsed.
pub fn check_webhook(webhook: Option<&WebhookSpec>, config: &kiln_core::config::WebhooksConfig) -> Result<(), ApiError> {
    let Some(webhook) = webhook else { return Ok(()) };
    if config.secret.is_empty() {
        return Err(ApiError::bad_request(
            "webhook: this cluster has no [webhooks] secret to sign job webhooks with, so it takes none (ask its operator to set one)",
        ));
    }
    kiln_core::webhook::check_url(&webhook.url, config.allow_loopback).map_err(|why| {
        ApiError::bad_request(format!("webhook.url {:?} {why}", kiln_core::protocol::truncate_utf8(webhook.url.clone(), 200)))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000_000;

    /// A model as `demo` declares it: a required `prompt`, `steps` 1 to 100 (default 20), a
    /// `style` out of two.
    fn demo() -> ModelDecl {
        ModelDecl {
            name: "demo".into(),
            engine: "noop".into(),
            max_attempts: 3,
            timeout_ms: 60_000,
            result_ttl_s: 3600,
            required_inputs: vec!["prompt".into()],
            params: serde_json::from_value(json!([
                {"name": "steps", "kind": "int", "min": 1, "max": 100, "default": 20},
                {"name": "style", "kind": "str", "choices": ["oil", "ink"]},
            ]))
            .expect("param declarations"),
            gpus: 1,
        }
    }

    /// A model that declares nothing: any params, no required input.
    fn open_model(name: &str, max_attempts: u32) -> ModelDecl {
        ModelDecl { name: name.into(), max_attempts, required_inputs: vec![], params: vec![], ..demo() }
    }

    fn cluster(models: &[ModelDecl]) -> BTreeMap<String, ClusterModel> {
        models.iter().map(|m| (m.name.clone(), ClusterModel { decl: m.clone(), nodes: vec!["n1".into()], conflict: false })).collect()
    }

    fn submit(json: serde_json::Value) -> SubmitRequest {
        let mut body = json!({"model": "demo", "inputs": {"prompt": "a fox"}});
        body.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
        serde_json::from_value(body).expect("a submit request")
    }

    /// The refusal of `req` against `demo`, which must be one.
    fn refusal(req: &SubmitRequest) -> ApiError {
        validate_submit(req, &demo(), &Limits::default(), NOW).expect_err("refused")
    }

    fn nested(depth: usize) -> serde_json::Value {
        (1..depth).fold(json!(1), |v, _| json!([v]))
    }

    #[test]
    fn a_valid_submit_passes_with_defaults_filled_in() {
        let params = validate_submit(&submit(json!({"params": {"style": "ink"}})), &demo(), &Limits::default(), NOW).expect("valid");
        assert_eq!(params, json!({"steps": 20, "style": "ink"}).as_object().unwrap().clone());
        let open = validate_submit(&submit(json!({"params": {"anything": [1, 2]}})), &open_model("m", 1), &Limits::default(), NOW);
        assert_eq!(open.expect("a model that declares nothing takes any params")["anything"], json!([1, 2]));
    }

    #[test]
    fn each_submit_rule_refuses_with_its_code_and_names_the_field() {
        let limits = Limits::default();
        let many: serde_json::Map<String, serde_json::Value> =
            (0..=limits.max_inputs).map(|i| (format!("in{i}"), json!(i))).chain([("prompt".to_string(), json!("x"))]).collect();
        let cases: Vec<(SubmitRequest, ErrorCode, &str)> = vec![
            (submit(json!({"inputs": many})), ErrorCode::BadRequest, "at most 32 are allowed"),
            (submit(json!({"inputs": {"prompt": "x", "a b": 1}})), ErrorCode::BadRequest, "input name \"a b\""),
            (submit(json!({"inputs": {"prompt": "x", "img": {"object": "a/../b"}}})), ErrorCode::BadRequest, "object name \"a/../b\""),
            (submit(json!({"inputs": {"prompt": nested(33)}})), ErrorCode::BadRequest, "input \"prompt\" nests deeper than 32"),
            (submit(json!({"inputs": {"image": "x"}})), ErrorCode::BadRequest, "needs input \"prompt\""),
            (submit(json!({"params": {"steps": nested(32)}})), ErrorCode::BadRequest, "params nest deeper than 32"),
            (submit(json!({"labels": {"a b": "x"}})), ErrorCode::BadRequest, "label name \"a b\""),
            (submit(json!({"idempotency_key": ""})), ErrorCode::BadRequest, "idempotency_key must be 1 to 256 bytes"),
            (submit(json!({"idempotency_key": "k".repeat(257)})), ErrorCode::BadRequest, "idempotency_key must be 1 to 256 bytes"),
            (submit(json!({"max_attempts": 0})), ErrorCode::BadRequest, "max_attempts must be at least 1"),
            (submit(json!({"deadline_ms": NOW})), ErrorCode::DeadlineExceeded, "deadline_ms is already in the past"),
            (submit(json!({"params": {"stpes": 10}})), ErrorCode::BadRequest, "model \"demo\": unknown param \"stpes\""),
            (submit(json!({"params": {"steps": 0}})), ErrorCode::BadRequest, "param \"steps\" is 0; allowed: 1 to 100"),
            (submit(json!({"params": {"steps": 2.5}})), ErrorCode::BadRequest, "param \"steps\" must be an integer"),
            (submit(json!({"params": {"style": "pastel"}})), ErrorCode::BadRequest, "allowed: oil, ink"),
        ];
        for (req, code, says) in cases {
            let e = refusal(&req);
            assert_eq!(e.code, code, "{req:?}: {e:?}");
            assert!(e.message.contains(says), "{req:?}: {:?} does not say {says:?}", e.message);
        }
        // The bounds themselves are allowed.
        let inputs: serde_json::Map<String, serde_json::Value> =
            (1..limits.max_inputs).map(|i| (format!("in{i}"), json!(i))).chain([("prompt".to_string(), json!("x"))]).collect();
        let labels: serde_json::Map<String, serde_json::Value> = (0..MAX_LABELS).map(|i| (format!("l{i}"), json!("v"))).collect();
        for fine in [
            submit(json!({"inputs": inputs, "labels": labels})),
            submit(json!({"idempotency_key": "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES)})),
            submit(json!({"deadline_ms": NOW + 1, "max_attempts": 1})),
            submit(json!({"inputs": {"prompt": nested(32)}})),
            submit(json!({"params": {"steps": 100}})),
            submit(json!({"inputs": {"prompt": "x", "img": {"object": "uploads/a.b/c.png"}}})),
        ] {
            validate_submit(&fine, &demo(), &limits, NOW).unwrap_or_else(|e| panic!("{fine:?}: {e:?}"));
        }
    }

    #[test]
    fn request_size_ids_and_stored_values_are_bounded_at_their_limits() {
        let limits = Limits::default();
        assert!(check_request_size(limits.max_request_bytes, &limits).is_ok());
        let e = check_request_size(limits.max_request_bytes + 1, &limits).expect_err("over");
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert!(e.message.contains(&format!("the limit is {}", limits.max_request_bytes)), "{}", e.message);

        assert!(check_id("job_id", "0b6f-x_1").is_ok());
        assert!(check_id("job_id", &"a".repeat(64)).is_ok());
        for bad in ["", "a.b", "a b", "a*", "kiln.>", &"a".repeat(65)] {
            let e = check_id("batch_id", bad).expect_err(bad);
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.starts_with("batch_id "), "{}", e.message);
        }

        assert!(check_storable("the plan", 900, 100, 1000).is_ok());
        let e = check_storable("the plan", 901, 100, 1000).expect_err("over");
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert!(e.message.starts_with("the plan would take 1001 bytes"), "{}", e.message);
        assert!(check_storable("x", usize::MAX, 64, usize::MAX - 1).is_err(), "no overflow");

        assert!(check_node_name("node-1").is_ok());
        assert_eq!(check_node_name("node.1").expect_err("not a token").code, ErrorCode::BadRequest);
    }

    #[test]
    fn an_unknown_model_is_refused_with_the_clusters_models() {
        let models = cluster(&[demo(), open_model("noop", 1)]);
        assert_eq!(cluster_model(&models, "noop", "model").expect("known").name, "noop");
        let e = cluster_model(&models, "sdxl", "model").expect_err("unknown");
        assert_eq!(e.code, ErrorCode::UnknownModel);
        assert_eq!(e.message, "model \"sdxl\" is served by no live node of the cluster; known models: demo, noop");
        let e = cluster_model(&BTreeMap::new(), "demo", "model").expect_err("an empty cluster knows none");
        assert_eq!(e.code, ErrorCode::UnknownModel);
    }

    #[test]
    fn a_batch_is_checked_before_its_items() {
        let limits = Limits::default();
        let batch = |json: serde_json::Value| -> BatchSubmitRequest {
            let mut body = json!({"model": "demo", "items": [{}]});
            body.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
            serde_json::from_value(body).expect("a batch request")
        };
        assert!(check_batch(&batch(json!({})), &limits).is_ok());
        let too_many = vec![json!({}); limits.max_batch_items + 1];
        let cases = [
            (batch(json!({"items": []})), ErrorCode::BadRequest, "at least one item"),
            (batch(json!({"items": too_many})), ErrorCode::PayloadTooLarge, "a batch holds at most 1000"),
            (batch(json!({"idempotency_key": ""})), ErrorCode::BadRequest, "idempotency_key"),
            (batch(json!({"max_concurrency": 0})), ErrorCode::BadRequest, "max_concurrency must be at least 1"),
            (batch(json!({"labels": {"": "x"}})), ErrorCode::BadRequest, "label name \"\""),
        ];
        for (req, code, says) in cases {
            let e = check_batch(&req, &limits).expect_err(says);
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.message.contains(says), "{:?} does not say {says:?}", e.message);
        }
    }

    #[test]
    fn a_batchs_models_are_known_distinct_and_cap_its_attempts() {
        let models = cluster(&[demo(), open_model("fast", 2), open_model("slow", 9)]);
        let (plan, decls) = batch_models(&models, "demo", &["fast".into(), "slow".into()], Some(5)).expect("valid");
        let attempts: Vec<(&str, u32)> = plan.iter().map(|m| (m.name.as_str(), m.max_attempts)).collect();
        assert_eq!(attempts, [("demo", 3), ("fast", 2), ("slow", 5)], "the batch's max_attempts capped by each model's");
        assert_eq!(decls.len(), 3);
        assert_eq!(plan[0].params, demo().params);

        let e = batch_models(&models, "demo", &["fast".into(), "sdxl".into()], None).expect_err("unknown fallback");
        assert_eq!(e.code, ErrorCode::UnknownModel);
        assert!(e.message.starts_with("fallback_models[1]: model \"sdxl\""), "{}", e.message);
        let e = batch_models(&models, "demo", &["fast".into(), "demo".into()], None).expect_err("twice");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("listed twice"), "{}", e.message);
    }

    #[test]
    fn an_item_is_checked_against_every_model_it_may_run() {
        let req: BatchSubmitRequest = serde_json::from_value(json!({
            "model": "demo", "fallback_models": ["fast"], "params": {"steps": 5}, "labels": {"run": "1", "who": "batch"},
            "items": [{"inputs": {"prompt": "a"}, "labels": {"who": "item"}}, {"inputs": {"image": "x"}}],
        }))
        .unwrap();
        let decls = [demo(), open_model("fast", 2)];
        let mut first = req.item_submission(&req.items[0]);
        assert_eq!(first.params["steps"], json!(5), "the batch's params");
        assert_eq!(first.labels["who"], "item", "an item's own label wins");
        assert_eq!(first.labels["run"], "1");
        validate_batch_item(&mut first, 0, &decls, &Limits::default(), NOW).expect("valid on both");

        let mut second = req.item_submission(&req.items[1]);
        let e = validate_batch_item(&mut second, 1, &decls, &Limits::default(), NOW).expect_err("demo needs a prompt");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(e.message, "item 1: model \"demo\" needs input \"prompt\"");

        // Valid on the first model, not on the fallback: still refused, naming the fallback.
        let strict = ModelDecl { name: "strict".into(), required_inputs: vec!["mask".into()], ..open_model("strict", 1) };
        let mut first = req.item_submission(&req.items[0]);
        let e = validate_batch_item(&mut first, 0, &[open_model("demo", 1), strict], &Limits::default(), NOW).expect_err("strict");
        assert_eq!(e.message, "item 0: model \"strict\" needs input \"mask\"");
    }

    /// Any JSON value up to a few levels deep, scalars included.
    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(|b| json!(b)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
            ".{0,12}".prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(40, 200, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|m| json!(m)),
            ]
        })
    }

    fn any_name() -> impl Strategy<Value = String> {
        prop_oneof![Just("prompt".to_string()), Just("steps".to_string()), Just("style".to_string()), "[a-z_.]{1,8}", ".{0,70}"]
    }

    fn any_input() -> impl Strategy<Value = InputValue> {
        prop_oneof![any_json().prop_map(InputValue::Inline), "[a-z./]{0,12}|.{0,20}".prop_map(|object| InputValue::Object { object })]
    }

    prop_compose! {
        fn any_submit()(
            model in prop_oneof![Just("demo".to_string()), ".{0,10}"],
            // Mostly a few inputs; now and then past the limit of 32.
            inputs in prop_oneof![4 => prop::collection::btree_map(any_name(), any_input(), 0..6), 1 => prop::collection::btree_map("[a-z]{1,6}", any_input(), 30..36)],
            params in prop::collection::btree_map(any_name(), any_json(), 0..4),
            priority in any::<u8>(),
            idempotency_key in prop::option::of(".{0,3}|[a-z]{250,260}"),
            deadline_ms in prop::option::of(prop_oneof![Just(NOW), NOW - 10..NOW + 10, any::<u64>()]),
            max_attempts in prop::option::of(0u32..4),
            labels in prop::collection::btree_map(any_name(), ".{0,10}", 0..20),
        ) -> SubmitRequest {
            SubmitRequest { model, inputs, params: params.into_iter().collect(), priority, idempotency_key, deadline_ms, max_attempts, labels, ..Default::default() }
        }
    }

    prop_compose! {
        /// Submissions that break no rule of `demo`'s.
        fn valid_submit()(
            prompt in any_json().prop_filter("shallow", |v| ids::json_depth(v) <= 32),
            others in prop::collection::btree_map("[A-Za-z0-9_-]{1,64}", "[a-z0-9]{1,8}(/[a-z0-9_-][a-z0-9._-]{0,7}){0,3}", 0..8),
            steps in prop::option::of(1i64..=100),
            style in prop::option::of(prop_oneof![Just("oil"), Just("ink")]),
            idempotency_key in prop::option::of(".{1,64}"),
            deadline_ms in prop::option::of(NOW + 1..u64::MAX),
            max_attempts in prop::option::of(1u32..),
            labels in prop::collection::btree_map("[A-Za-z0-9._-]{1,64}", ".{0,64}", 0..16),
        ) -> SubmitRequest {
            let mut inputs: BTreeMap<String, InputValue> = others.into_iter().map(|(name, object)| (name, InputValue::Object { object })).collect();
            inputs.insert("prompt".into(), InputValue::Inline(prompt));
            let mut params = serde_json::Map::new();
            if let Some(steps) = steps { params.insert("steps".into(), json!(steps)); }
            if let Some(style) = style { params.insert("style".into(), json!(style)); }
            SubmitRequest { model: "demo".into(), inputs, params, idempotency_key, deadline_ms, max_attempts, labels, ..Default::default() }
        }
    }

    proptest! {

        /// Whatever a client sends, the checks answer (no panic), and a refusal is one of the
        /// codes a client can act on, with a message; an acceptance fills in every declared
        /// param that has a default and keeps the values sent.
        #[test]
        fn validation_never_panics_and_every_refusal_is_coded(req in any_submit()) {
            let models = cluster(&[demo()]);
            let checked = cluster_model(&models, &req.model, "model")
                .and_then(|model| validate_submit(&req, &model, &Limits::default(), NOW));
            match checked {
                Ok(params) => {
                    prop_assert_eq!(&req.model, "demo");
                    prop_assert!(params.contains_key("steps"), "the default is filled in");
                    for (name, value) in &req.params {
                        prop_assert_eq!(params.get(name), Some(value));
                    }
                }
                Err(e) => {
                    prop_assert!(
                        matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownModel | ErrorCode::DeadlineExceeded),
                        "{:?}", e
                    );
                    prop_assert!(!e.message.is_empty());
                    prop_assert_eq!(e.code == ErrorCode::UnknownModel, req.model != "demo");
                }
            }
        }

        /// A request that keeps every rule always passes.
        #[test]
        fn a_valid_submit_always_passes(req in valid_submit()) {
            let params = validate_submit(&req, &demo(), &Limits::default(), NOW);
            prop_assert!(params.is_ok(), "{:?}: {:?}", req, params);
        }

        /// The same holds for a batch's own checks and its models.
        #[test]
        fn batch_checks_never_panic_and_every_refusal_is_coded(
            items in 0usize..3,
            key in prop::option::of(".{0,3}"),
            max_concurrency in prop::option::of(0u32..3),
            model in prop_oneof![Just("demo".to_string()), ".{0,6}"],
            fallbacks in prop::collection::vec(prop_oneof![Just("demo".to_string()), Just("fast".to_string()), ".{0,6}"], 0..3),
            max_attempts in prop::option::of(any::<u32>()),
        ) {
            let req = BatchSubmitRequest {
                model: model.clone(), items: vec![BatchItemRequest::default(); items], idempotency_key: key, max_concurrency,
                fallback_models: fallbacks.clone(), max_attempts, ..Default::default()
            };
            let models = cluster(&[demo(), open_model("fast", 2)]);
            let checked = check_batch(&req, &Limits::default()).and_then(|()| batch_models(&models, &model, &fallbacks, max_attempts));
            match checked {
                Ok((plan, decls)) => {
                    prop_assert_eq!(plan.len(), 1 + fallbacks.len());
                    prop_assert_eq!(decls.len(), plan.len());
                    for (m, d) in plan.iter().zip(&decls) {
                        prop_assert_eq!(m.max_attempts, max_attempts.map_or(d.max_attempts, |a| a.min(d.max_attempts)));
                    }
                }
                Err(e) => {
                    prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownModel | ErrorCode::PayloadTooLarge), "{:?}", e);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}
