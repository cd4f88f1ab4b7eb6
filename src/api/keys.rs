//! The ids and keys derived from a request's content: a job id from an idempotency key, and the
//! content keys of result reuse. Pure, and kept together in this one file: they are part of the
//! wire contract (a client, the gateway, computes the same job id), so they can move into a
//! crate of their own as they are.

use std::collections::BTreeMap;

use kiln_core::batch::BatchPlan;
use kiln_core::protocol::InputValue;

/// The content key of a request for result reuse: the model, each input (inline values as
/// canonical JSON, uploaded files by their content digest, so a re-upload under another name
/// still matches) and the params, hashed.
pub(super) fn reuse_key(
    model: &str,
    inputs: &BTreeMap<String, InputValue>,
    digests: &BTreeMap<String, String>,
    params: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let inputs: BTreeMap<&String, serde_json::Value> = inputs
        .iter()
        .map(|(name, v)| {
            let v = match v {
                InputValue::Inline(v) => serde_json::json!({ "inline": v }),
                InputValue::Object { .. } => serde_json::json!({ "content": digests.get(name) }),
            };
            (name, v)
        })
        .collect();
    // serde_json's maps are ordered by key, so this is canonical.
    let body = serde_json::json!({ "model": model, "inputs": inputs, "params": params });
    kiln_core::nats::objects::sha256_hex(body.to_string().as_bytes())
}

/// The content keys of a batch's items for `reuse` within the batch: each item's inputs
/// (uploaded files by content, `digests[i]` for item `i` of the plan) and its params for every
/// model it may run, so two items share a job only if they would be the same job on each.
pub(super) fn batch_reuse_keys(plan: &BatchPlan, digests: &[BTreeMap<String, String>]) -> Vec<String> {
    let models: Vec<&str> = plan.models.iter().map(|m| m.name.as_str()).collect();
    plan.items
        .iter()
        .zip(digests)
        .map(|(item, digests)| {
            let params: serde_json::Map<String, serde_json::Value> = (0..plan.models.len())
                .map(|pos| {
                    let params = plan.params_for(item, pos).map(serde_json::Value::Object).unwrap_or_default();
                    (pos.to_string(), params)
                })
                .collect();
            reuse_key(&models.join(","), &item.inputs, digests, &params)
        })
        .collect()
}

/// Namespace of job ids derived from idempotency keys (uuid v5).
const IDEMPOTENCY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b696c6e_6964_656d_706f_74656e637921);

/// The job id a submission with an idempotency key gets: the same key (for the same model)
/// always maps to the same id, which is what makes the second submission find the first.
pub fn idempotent_job_id(model: &str, key: &str) -> String {
    uuid::Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, format!("{model}\0{key}").as_bytes()).to_string()
}
