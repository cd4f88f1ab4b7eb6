//! The response templates of configured routes (`response = { task_id = "$job_id" }`): a JSON
//! value whose strings of the form `$name` are replaced by values of the request at hand, a
//! field whose value is absent being left out. Pure, so every seed's body shape is tested
//! without a server.

use serde_json::{Map, Value};

/// Looks up a dotted path in `vars`. Keys may themselves hold dots (`artifacts.video.mp4.size`
/// finds the key `video.mp4`): at each level the longest key that matches wins.
pub fn lookup<'a>(vars: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(vars);
    }
    let map = vars.as_object()?;
    let segments: Vec<&str> = path.split('.').collect();
    for take in (1..=segments.len()).rev() {
        let key = segments[..take].join(".");
        if let Some(v) = map.get(&key) {
            let rest = segments[take..].join(".");
            if let Some(found) = lookup(v, &rest) {
                return Some(found);
            }
        }
    }
    None
}

/// Renders `template` against `vars`. `"$name"` becomes the value at that path (a field whose
/// path has no value, or a null one, is dropped from its object); `"$$x"` is the literal
/// `"$x"`; every other value is copied.
pub fn render(template: &Value, vars: &Value) -> Value {
    render_value(template, vars).unwrap_or(Value::Null)
}

fn render_value(template: &Value, vars: &Value) -> Option<Value> {
    match template {
        Value::String(s) if s.starts_with("$$") => Some(Value::String(s[1..].to_string())),
        Value::String(s) if s.starts_with('$') => lookup(vars, &s[1..]).filter(|v| !v.is_null()).cloned(),
        Value::Object(fields) => {
            let mut out = Map::new();
            for (k, v) in fields {
                if let Some(v) = render_value(v, vars) {
                    out.insert(k.clone(), v);
                }
            }
            Some(Value::Object(out))
        }
        Value::Array(items) => Some(Value::Array(items.iter().filter_map(|v| render_value(v, vars)).collect())),
        other => Some(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn variables_are_replaced_and_absent_ones_dropped() {
        let vars = json!({
            "job_id": "j1",
            "status": "completed",
            "params": {"session_id": "s1"},
            "artifacts": {"video.mp4": {"object": "j1/1/video.mp4"}},
            "error": null,
        });
        let template = json!({
            "task_id": "$job_id",
            "session_id": "$params.session_id",
            "status": "$status",
            "video_file_id": "$artifacts.video.mp4.object",
            "error": "$error",
            "progress": "$progress",
            "message": "null",
            "price": "$$5",
            "list": ["$job_id", "$nothing", 3],
        });
        assert_eq!(
            render(&template, &vars),
            json!({
                "task_id": "j1",
                "session_id": "s1",
                "status": "completed",
                "video_file_id": "j1/1/video.mp4",
                "message": "null",
                "price": "$5",
                "list": ["j1", 3],
            })
        );
    }

    #[test]
    fn a_template_without_variables_is_itself() {
        let t = json!({"status": "healthy", "n": [1, 2, {"a": true}]});
        assert_eq!(render(&t, &json!({})), t);
    }
}
