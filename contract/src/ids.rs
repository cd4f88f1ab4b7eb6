//! Syntax of every name a client controls. Job ids, model names and object names end up in
//! NATS subjects, KV keys and file paths, so wildcard (`*`, `>`), separator (`.`, `/`) and
//! path (`..`) characters are refused here, before anything else sees them.

/// Letters, digits, `-`, `_`; 1 to 64 characters. Job ids, node names, the subject prefix.
pub fn is_valid_token(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Model names also name a bucket: lowercase only, 1 to 32 characters.
pub fn is_valid_model_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Object names in the files bucket: 1 to 256 characters of letters, digits, `-`, `_`, `.`
/// and `/` separators, with no empty, `.` or `..` segment and no leading `/`.
pub fn is_valid_object_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 256 {
        return false;
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')) {
        return false;
    }
    s.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// Input names become file names in the worker's directory: a token.
pub fn is_valid_input_name(s: &str) -> bool {
    is_valid_token(s)
}

/// Depth of a JSON value: a scalar is 1, `[1]` is 2.
pub fn json_depth(v: &serde_json::Value) -> usize {
    // Iterative so that a hostile 10,000-deep value cannot overflow the stack here.
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            serde_json::Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            serde_json::Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_refuse_wildcards_and_separators() {
        assert!(is_valid_token("0190a1b2-c3d4_x"));
        for bad in ["", "a.b", "a*", ">", "a b", "a/b", &"x".repeat(65)] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn object_names_refuse_path_tricks() {
        assert!(is_valid_object_name("uploads/cat.png"));
        for bad in ["", "/etc/passwd", "a/../b", "..", "a//b", "a/./b", "a*b", "a>b", "a b"] {
            assert!(!is_valid_object_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn depth_is_counted_without_recursion() {
        let mut v = serde_json::json!(1);
        for _ in 0..10_000 {
            v = serde_json::Value::Array(vec![v]);
        }
        assert_eq!(json_depth(&v), 10_001);
        // Dropping a 10,000-deep value recursively is serde_json's own business; forget it
        // so this test checks only our counter.
        std::mem::forget(v);
    }
}
