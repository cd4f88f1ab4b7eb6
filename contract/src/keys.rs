//! Ids and keys derived from what a client sent, so that the same request always maps to the
//! same thing: the job id of an idempotency key, and the content key that `reuse` matches.
//! Any program that must predict them (the API, the gateway's seed routes, a client) computes
//! them here, one way.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::batch::BatchPlan;
use crate::protocol::InputValue;

/// Namespace of job ids derived from idempotency keys (uuid v5).
const IDEMPOTENCY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b696c6e_6964_656d_706f_74656e637921);

/// Hex sha256 of `data`: object digests, reuse keys.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The job id a submission with an idempotency key gets: the same key (for the same model)
/// always maps to the same id, which is what makes the second submission find the first.
pub fn idempotent_job_id(model: &str, key: &str) -> String {
    uuid::Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, format!("{model}\0{key}").as_bytes()).to_string()
}

/// The content key of a request for result reuse: the model, each input (inline values as
/// canonical JSON, uploaded files by their content digest, so a re-upload under another name
/// still matches) and the params, hashed.
pub fn reuse_key(
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
    sha256_hex(body.to_string().as_bytes())
}

/// The content keys of a batch's items for `reuse` within the batch: each item's inputs
/// (uploaded files by content, `digests[i]` for item `i` of the plan) and its params for every
/// model it may run, so two items share a job only if they would be the same job on each.
pub fn batch_reuse_keys(plan: &BatchPlan, digests: &[BTreeMap<String, String>]) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_gives_the_same_job_and_another_model_another() {
        assert_eq!(idempotent_job_id("m", "k"), idempotent_job_id("m", "k"));
        assert_ne!(idempotent_job_id("m", "k"), idempotent_job_id("n", "k"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(idempotent_job_id("ab", "c"), idempotent_job_id("a", "bc"));
    }

    #[test]
    fn a_reuse_key_matches_uploads_by_content_not_by_name() {
        let upload = |name: &str| BTreeMap::from([("image".to_string(), InputValue::Object { object: name.into() })]);
        let digest = BTreeMap::from([("image".to_string(), "abc".to_string())]);
        let params = serde_json::Map::new();
        assert_eq!(reuse_key("m", &upload("uploads/a.png"), &digest, &params), reuse_key("m", &upload("uploads/b.png"), &digest, &params));
        let other = BTreeMap::from([("image".to_string(), "abd".to_string())]);
        assert_ne!(reuse_key("m", &upload("uploads/a.png"), &digest, &params), reuse_key("m", &upload("uploads/a.png"), &other, &params));
    }
}
