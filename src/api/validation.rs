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
            format!(
                "request is {len} bytes; the limit is {} (upload large inputs to the files bucket)",
                limits.max_request_bytes
            ),
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
    kiln_core::params::check_params(&model.params, &req.params).map_err(|why| ApiError::bad_request(format!("model {:?}: {why}", model.name)))
}

/// The checks of a batch that do not look at its items or models: at least one item and at
/// most `max_batch_items`, its idempotency key, `max_concurrency`, its labels.
pub fn check_batch(req: &BatchSubmitRequest, limits: &Limits) -> Result<(), ApiError> {
    let limit = limits.max_batch_items;
    if req.items.is_empty() {
        return Err(ApiError::bad_request("a batch needs at least one item"));
    }
    if req.items.len() > limit {
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, format!("{} items; a batch holds at most {limit} (split it)", req.items.len())));
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

/// An item of a batch as the submission it is: the batch's params and labels under the
/// item's own, the batch's options.
pub fn batch_item_submission(req: &BatchSubmitRequest, item: &BatchItemRequest) -> SubmitRequest {
    let mut params = req.params.clone();
    params.extend(item.params.clone());
    let mut labels = req.labels.clone();
    labels.extend(item.labels.clone());
    SubmitRequest {
        model: req.model.clone(),
        inputs: item.inputs.clone(),
        params,
        priority: req.priority,
        idempotency_key: None,
        deadline_ms: req.deadline_ms,
        max_attempts: req.max_attempts,
        reuse: false,
        labels,
    }
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
