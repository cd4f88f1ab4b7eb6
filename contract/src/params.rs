//! Declared params: a model may list the params it takes (`params = [{ name = "steps", kind =
//! "int", min = 1, max = 100, default = 20 }]`), and then a submission's params are checked
//! against the list at submit: an unknown name (`stpes`), a wrong type or a value out of range
//! is a `bad_request` before anything is queued, instead of a param the worker silently
//! ignores. Defaults are filled in, so the worker (and the job view) sees every declared param.
//!
//! A model that declares nothing takes any params, as before.

use serde::{Deserialize, Serialize};

/// The JSON type a declared param must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeclaredKind {
    /// A whole number (`5`, not `5.5` or `"5"`).
    Int,
    /// Any number.
    Float,
    Bool,
    /// A string.
    Str,
    /// Anything (an object, a list): only presence is checked.
    Any,
}

impl DeclaredKind {
    fn as_str(self) -> &'static str {
        match self {
            DeclaredKind::Int => "an integer",
            DeclaredKind::Float => "a number",
            DeclaredKind::Bool => "true or false",
            DeclaredKind::Str => "a string",
            DeclaredKind::Any => "any value",
        }
    }
}

/// One param a model declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamDecl {
    pub name: String,
    pub kind: DeclaredKind,
    /// Lowest value allowed (numbers), inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Highest value allowed (numbers), inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The only values allowed (strings), when not empty.
    #[serde(default)]
    pub choices: Vec<String>,
    /// Filled in when a submission leaves the param out. Without one the param is optional
    /// and stays absent, unless `required`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    /// A submission must set it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
}

impl ParamDecl {
    /// Why `value` is not acceptable for this param, if it is not.
    fn refuse(&self, value: &serde_json::Value) -> Option<String> {
        let name = &self.name;
        let fits = match self.kind {
            DeclaredKind::Int => value.as_i64().is_some() || value.as_u64().is_some(),
            DeclaredKind::Float => value.is_number(),
            DeclaredKind::Bool => value.is_boolean(),
            DeclaredKind::Str => value.is_string(),
            DeclaredKind::Any => true,
        };
        if !fits {
            return Some(format!("param {name:?} must be {}, not {value}", self.kind.as_str()));
        }
        if let Some(number) = value.as_f64() {
            if self.min.is_some_and(|min| number < min) || self.max.is_some_and(|max| number > max) {
                return Some(format!("param {name:?} is {value}; allowed: {}", self.range()));
            }
        }
        if let (false, Some(text)) = (self.choices.is_empty(), value.as_str()) {
            if !self.choices.iter().any(|c| c == text) {
                return Some(format!("param {name:?} is {value}; allowed: {}", self.choices.join(", ")));
            }
        }
        None
    }

    fn range(&self) -> String {
        match (self.min, self.max) {
            (Some(min), Some(max)) => format!("{min} to {max}"),
            (Some(min), None) => format!("at least {min}"),
            (None, Some(max)) => format!("at most {max}"),
            (None, None) => "any".into(),
        }
    }

    /// Why this declaration cannot be used (checked once, when the config is loaded).
    pub fn invalid(&self) -> Option<String> {
        if self.name.is_empty() {
            return Some("a declared param needs a name".into());
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min > max {
                return Some(format!("param {:?}: min {min} is above max {max}", self.name));
            }
        }
        if (self.min.is_some() || self.max.is_some()) && !matches!(self.kind, DeclaredKind::Int | DeclaredKind::Float) {
            return Some(format!("param {:?}: min and max apply to int and float params only", self.name));
        }
        if !self.choices.is_empty() && self.kind != DeclaredKind::Str {
            return Some(format!("param {:?}: choices apply to str params only", self.name));
        }
        if let Some(default) = &self.default {
            if let Some(why) = self.refuse(default) {
                return Some(format!("its default does not fit: {why}"));
            }
        }
        None
    }
}

/// `params` checked against `declared`, with defaults filled in; `Err` says what is wrong (the
/// first problem, by param name). An empty declaration accepts anything unchanged.
pub fn check_params(
    declared: &[ParamDecl],
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if declared.is_empty() {
        return Ok(params.clone());
    }
    for name in params.keys() {
        if !declared.iter().any(|d| &d.name == name) {
            let names: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
            return Err(format!("unknown param {name:?}; this model takes: {}", names.join(", ")));
        }
    }
    let mut checked = params.clone();
    for decl in declared {
        match params.get(&decl.name) {
            Some(value) => {
                if let Some(why) = decl.refuse(value) {
                    return Err(why);
                }
            }
            None => match &decl.default {
                Some(default) => {
                    checked.insert(decl.name.clone(), default.clone());
                }
                None if decl.required => return Err(format!("param {:?} is required", decl.name)),
                None => {}
            },
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    fn steps() -> ParamDecl {
        ParamDecl {
            name: "steps".into(),
            kind: DeclaredKind::Int,
            min: Some(1.0),
            max: Some(100.0),
            choices: vec![],
            default: Some(json!(20)),
            required: false,
        }
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_misspelt_param_is_refused_and_names_the_declared_ones() {
        let err = check_params(&[steps()], &params(json!({"stpes": 10}))).unwrap_err();
        assert!(err.contains("\"stpes\"") && err.contains("steps"), "{err}");
    }

    #[test]
    fn defaults_are_filled_in_and_given_values_kept() {
        assert_eq!(check_params(&[steps()], &Map::new()).unwrap(), params(json!({"steps": 20})));
        assert_eq!(check_params(&[steps()], &params(json!({"steps": 7}))).unwrap(), params(json!({"steps": 7})));
    }

    #[test]
    fn types_ranges_choices_and_required_are_checked() {
        let style = ParamDecl {
            name: "style".into(),
            kind: DeclaredKind::Str,
            min: None,
            max: None,
            choices: vec!["a".into(), "b".into()],
            default: None,
            required: true,
        };
        let declared = [steps(), style];
        for bad in [
            json!({"style": "a", "steps": 5.5}),
            json!({"style": "a", "steps": "5"}),
            json!({"style": "a", "steps": 0}),
            json!({"style": "c"}),
            json!({}),
        ] {
            assert!(check_params(&declared, &params(bad.clone())).is_err(), "{bad}");
        }
        assert!(check_params(&declared, &params(json!({"style": "b", "steps": 100}))).is_ok());
    }

    #[test]
    fn an_empty_declaration_takes_anything() {
        let p = params(json!({"anything": [1, 2], "x": "y"}));
        assert_eq!(check_params(&[], &p).unwrap(), p);
    }

    #[test]
    fn unusable_declarations_are_found_at_load() {
        let mut d = steps();
        d.default = Some(json!(0));
        assert!(d.invalid().is_some());
        let mut d = steps();
        d.kind = DeclaredKind::Bool;
        assert!(d.invalid().is_some());
        assert!(steps().invalid().is_none());
    }

    proptest! {
        /// Whatever is submitted, an accepted result holds every given param unchanged, only
        /// declared names, and each value within its range.
        #[test]
        fn accepted_params_are_declared_in_range_and_unchanged(given in proptest::collection::btree_map("[a-z]{1,6}", -5i64..150, 0..4)) {
            let declared = [steps()];
            let p: Map<String, Value> = given.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            if let Ok(checked) = check_params(&declared, &p) {
                for (k, v) in &p {
                    prop_assert_eq!(checked.get(k), Some(v));
                }
                prop_assert!(checked.keys().all(|k| k == "steps"));
                let steps = checked["steps"].as_i64().unwrap();
                prop_assert!((1..=100).contains(&steps));
            } else {
                prop_assert!(p.keys().any(|k| k != "steps") || p.get("steps").and_then(Value::as_i64).is_some_and(|s| !(1..=100).contains(&s)));
            }
        }
    }
}
