//! `name=value` arguments: a job's inputs and params, labels.

/// `name=value` pairs as labels (values kept as written).
pub fn parse_labels(pairs: &[String]) -> Result<kiln_core::protocol::Labels, String> {
    pairs
        .iter()
        .map(|s| s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not name=value")))
        .collect()
}

/// `name=value` with the value as JSON if it parses, else as a string.
pub fn split_pair(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not name=value"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}
