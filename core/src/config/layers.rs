//! Configuration in layers: the defaults, then the file, then the environment, then the
//! command's flags, each layer replacing the keys it sets, validated ONCE after all of them
//! (a flag can fix what the file and the environment alone would make invalid:
//! `KILN_NATS_REPLICAS=3 kiln node --nats a,b,c` on a file whose `nats.url` is "embedded").
//!
//! # The file
//! `--config PATH`, else `KILN_CONFIG`, else `./cluster.toml` if it exists, else none (the
//! defaults, the environment and the flags only). A file named by the flag or the variable
//! that cannot be read is an error. Relative paths in it (workers, credentials, includes)
//! resolve against its folder; the same paths set by a variable or a flag stay relative to
//! the working folder, as a shell would read them.
//!
//! # The environment
//! Every key of a section is `KILN_<SECTION>__<KEY>`: the key path upper-cased, `__` between
//! levels (`KILN_NATS__URL` is `nats.url`, `KILN_NODE__DRAIN_GRACE_S` is
//! `node.drain_grace_s`). The value is read as the key's type: a number, a boolean (`true`,
//! `false`, `1`, `0`, `yes`, `no`), a string, or a list of strings, comma-separated
//! (`KILN_NODE__SLOTS=cuda:0,cuda:1`). Tables and lists of tables (`[[models]]`,
//! `[[http.routes]]`, `[[http.api_keys]]`) are set in the file only. A `KILN_X__Y` that names
//! no key is an error naming the variable (a typo must not be silently ignored); a `KILN_`
//! variable without `__` is not configuration (`KILN_LOG`, `KILN_CACHE`, `KILN_CONFIG`...)
//! and is ignored, except the older names of [`ALIASES`], which keep working (a new name
//! set too wins over its alias).
//!
//! # Where a value came from
//! Each value carries the layer that set it last (figment's metadata: one provider per file,
//! per variable and per flag), so a parse or validation error names the file, the variable
//! or the flag, not only the key (`KILN_NATS_REPLICAS: invalid config: `nats.replicas` ...`).
//!
//! Why figment without its own TOML and environment providers: the file is parsed with the
//! workspace's `toml` (its error messages have line and column, and one TOML version is
//! built), and figment's `Env` guesses a value's type from its text, so `cuda:0,cuda:1` would
//! stay a string; here the type comes from the key's default, and the unknown-variable check
//! needs the list of keys anyway. figment still merges the layers and keeps each value's source.

use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Num, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::connection::{NatsConfig, NatsRules};
use super::error::{invalid, ConfigError};
use super::load::ClusterConfig;

/// The older environment names, kept working: each is the key it sets.
pub const ALIASES: [(&str, &str); 17] = [
    ("KILN_NATS_URL", "nats.url"),
    ("KILN_STATE_DIR", "nats.state_dir"),
    ("KILN_NATS_USER", "nats.user"),
    ("KILN_NATS_PASSWORD", "nats.password"),
    ("KILN_NATS_TOKEN", "nats.token"),
    ("KILN_NATS_NKEY_SEED_FILE", "nats.nkey_seed_file"),
    ("KILN_NATS_CREDS_FILE", "nats.creds_file"),
    ("KILN_NATS_TLS_CA_FILE", "nats.tls_ca_file"),
    ("KILN_NATS_TLS_CERT_FILE", "nats.tls_cert_file"),
    ("KILN_NATS_TLS_KEY_FILE", "nats.tls_key_file"),
    ("KILN_NATS_TLS_REQUIRED", "nats.tls_required"),
    ("KILN_ACK_WAIT_MS", "nats.ack_wait_ms"),
    ("KILN_NATS_REPLICAS", "nats.replicas"),
    ("KILN_NODE_NAME", "node.name"),
    ("KILN_SLOTS", "node.slots"),
    ("KILN_METRICS_ADDR", "node.metrics_addr"),
    ("KILN_CLUSTER_COOKIE", "cluster.cookie"),
];

/// The variable that names the file when `--config` does not.
pub const CONFIG_VAR: &str = "KILN_CONFIG";

/// The file read when neither `--config` nor `KILN_CONFIG` names one, if it exists.
pub const DEFAULT_FILE: &str = "cluster.toml";

/// Keys whose values are lists of tables: the file only.
const FILE_ONLY: [&str; 3] = ["models", "http.routes", "http.api_keys"];

/// The sources of one configuration, in the order they apply.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// The file, if any (see [`Layers::from_process`] for how it is chosen).
    pub file: Option<PathBuf>,
    /// The environment, as `(name, value)`: only `KILN_*__*` names and [`ALIASES`] are read.
    pub env: Vec<(String, String)>,
    /// The command's flags that were given, last layer.
    pub flags: Vec<Flag>,
}

/// One command-line flag given: `--slots cpu:0,cpu:1` sets `node.slots`, its value read as
/// the key's type like a variable's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// As typed, `--slots`: what an error names.
    pub flag: String,
    /// The key it sets, `node.slots`.
    pub key: String,
    pub value: String,
}

impl Flag {
    pub fn new(flag: impl Into<String>, key: impl Into<String>, value: impl Into<String>) -> Flag {
        Flag { flag: flag.into(), key: key.into(), value: value.into() }
    }

    /// The flags that were given, as the last layer: `(flag, key it sets, value if given)`.
    pub fn given<const N: usize>(flags: [(&str, &str, Option<String>); N]) -> Vec<Flag> {
        flags.into_iter().filter_map(|(flag, key, value)| Some(Flag::new(flag, key, value?))).collect()
    }
}

impl Layers {
    /// The layers of this process: the file of `config_flag`, else of `KILN_CONFIG`, else
    /// `./cluster.toml` if it exists; the process's environment; `flags`.
    pub fn from_process(config_flag: Option<PathBuf>, flags: Vec<Flag>) -> Layers {
        Layers::from_env(config_flag, std::env::vars().collect(), flags)
    }

    /// [`Layers::from_process`] with the environment given (tests inject theirs: the
    /// process's own is shared by every test thread).
    pub fn from_env(config_flag: Option<PathBuf>, env: Vec<(String, String)>, flags: Vec<Flag>) -> Layers {
        let file = choose_file(config_flag, &env, Path::new(DEFAULT_FILE).is_file());
        Layers { file, env, flags }
    }
}

impl ClusterConfig {
    /// The layers merged (defaults < file < environment < flags), the file's relative paths
    /// resolved against its folder, its included tables added: NOT validated (see
    /// [`Self::load_layers`]). An error names the file, variable or flag at fault.
    pub fn merge(layers: &Layers) -> Result<Self, ConfigError> {
        Ok(merge_layers(layers)?.config)
    }

    /// The layers merged and validated once, after all of them: what `kiln up`, `kiln node`
    /// and `kiln demo` run with. A refused value is named with the layer that set it.
    pub fn load_layers(layers: &Layers) -> Result<Self, ConfigError> {
        let merged = merge_layers(layers)?;
        merged.config.validate().map_err(|e| merged.attribute(e))?;
        Ok(merged.config)
    }

    /// What `kiln gateway` needs of the layers: `[nats]` and `[http]`, validated. The rest may
    /// be absent (a gateway runs no model); when models are listed, the routes' models must be
    /// among them.
    pub fn load_gateway_layers(layers: &Layers) -> Result<Self, ConfigError> {
        let merged = merge_layers(layers)?;
        let config = &merged.config;
        config.nats.validate().map_err(|e| merged.attribute(e))?;
        config.telemetry.validate().map_err(|e| merged.attribute(e))?;
        config.log.validate().map_err(|e| merged.attribute(e))?;
        let any_model = config.models.is_empty();
        config.http.validate(|m| any_model || config.model(m).is_some()).map_err(|e| merged.attribute(e))?;
        Ok(merged.config)
    }

    /// Only the `[nats]` section of the layers, validated (the rest of the file is parsed but
    /// neither needed nor validated): what a client command (`kiln submit`) connects with.
    pub fn load_nats_layers(layers: &Layers) -> Result<NatsConfig, ConfigError> {
        let merged = merge_layers(layers)?;
        merged.config.nats.validate().map_err(|e| merged.attribute(e))?;
        Ok(merged.config.nats)
    }

    /// [`Self::load_layers`] of a file and the process's environment, no flags.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_layers(&Layers::from_process(Some(path.to_path_buf()), vec![]))
    }

    /// [`Self::load_gateway_layers`] of a file and the process's environment, no flags.
    pub fn load_gateway(path: &Path) -> Result<Self, ConfigError> {
        Self::load_gateway_layers(&Layers::from_process(Some(path.to_path_buf()), vec![]))
    }

    /// [`Self::load_nats_layers`] of a file (`None`: the defaults) and the process's
    /// environment, no flags.
    pub fn load_nats(path: Option<&Path>) -> Result<NatsConfig, ConfigError> {
        let env = std::env::vars().collect();
        Self::load_nats_layers(&Layers { file: path.map(Path::to_path_buf), env, flags: vec![] })
    }
}

/// Which file a process reads: the flag's, else `KILN_CONFIG`'s (an empty one counts as
/// unset), else `./cluster.toml` when it exists.
pub fn choose_file(config_flag: Option<PathBuf>, env: &[(String, String)], default_exists: bool) -> Option<PathBuf> {
    let from_env = env.iter().rev().find(|(k, v)| k == CONFIG_VAR && !v.is_empty()).map(|(_, v)| PathBuf::from(v));
    config_flag.or(from_env).or_else(|| default_exists.then(|| PathBuf::from(DEFAULT_FILE)))
}

/// A merged configuration with the figment that knows where each value came from.
struct Merged {
    pub config: ClusterConfig,
    figment: Figment,
}

impl Merged {
    /// `error` with the source of its key in front (the file, variable or flag that set it
    /// last); an error about a key still at its default is returned as it is.
    pub fn attribute(&self, error: ConfigError) -> ConfigError {
        let ConfigError::Invalid { key, reason } = error else { return error };
        // `node.slots[0]` was set as `node.slots`; `nats.user/nats.password` as `nats.user`.
        let path: String = key.split('/').next().unwrap_or(&key).split('[').next().unwrap_or(&key).to_string();
        let mut probe = path.as_str();
        loop {
            if let Some(meta) = self.figment.find_metadata(probe) {
                if meta.name != DEFAULTS {
                    return ConfigError::Sourced { origin: meta.name.to_string(), key, reason };
                }
                break;
            }
            match probe.rsplit_once('.') {
                Some((parent, _)) => probe = parent,
                None => break,
            }
        }
        ConfigError::Invalid { key, reason }
    }

    /// Whether the value at `key` came from the file.
    fn set_by_file(&self, key: &str, file: &Path) -> bool {
        self.figment.find_metadata(key).is_some_and(|m| m.name == file.display().to_string())
    }
}

/// The metadata name of the defaults layer.
const DEFAULTS: &str = "default";

/// Merges the layers (not validated): the file's relative paths resolved against its folder,
/// its included tables added.
fn merge_layers(layers: &Layers) -> Result<Merged, ConfigError> {
    let defaults = to_dict(ClusterConfig::default())?;
    let mut figment = Figment::new().merge(Layer::new(DEFAULTS, defaults.clone()));
    if let Some(path) = &layers.file {
        let named_by_env = layers.env.iter().any(|(k, v)| k == CONFIG_VAR && Path::new(v) == path);
        let text = std::fs::read_to_string(path).map_err(|source| {
            if named_by_env {
                ConfigError::ReadNamedByEnv { path: path.clone(), source }
            } else {
                ConfigError::Read { path: path.clone(), source }
            }
        })?;
        let origin = path.display().to_string();
        // Parsed whole first: an unknown key or a wrong type is reported with its line.
        ClusterConfig::from_toml(&text, &origin)?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse { path: origin.clone(), message: e.to_string() })?;
        figment = figment.merge(Layer::new(origin, to_dict(table)?));
    }
    // The last value of a name wins, as in a shell's environment.
    let env_value = |name: &str| layers.env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    // Aliases first (in their table's order), so that a new name set beside its alias wins;
    // then the new names in name order, so that the outcome does not hang on the order of the
    // environment.
    let mut settings: Vec<(&str, String)> =
        ALIASES.iter().filter(|(alias, _)| env_value(alias).is_some()).map(|(alias, key)| (*alias, key.to_string())).collect();
    let mut named: Vec<&str> = layers.env.iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with("KILN_") && k.contains("__")).collect();
    named.sort();
    named.dedup();
    for name in named {
        settings.push((name, key_of_variable(name, &defaults)?));
    }
    for (name, key) in settings {
        figment = figment.merge(Layer::new(name.to_string(), setting(&key, env_value(name).unwrap_or(""), &defaults, name)?));
    }
    for flag in &layers.flags {
        figment = figment.merge(Layer::new(flag.flag.clone(), setting(&flag.key, &flag.value, &defaults, &flag.flag)?));
    }
    let config: ClusterConfig = figment.extract().map_err(from_figment)?;
    let mut merged = Merged { config, figment };
    if let Some(path) = &layers.file {
        let folder = path.parent().unwrap_or(Path::new("."));
        // Only what the file set is relative to its folder: a credential path from a variable
        // or a flag is relative to where the command runs.
        let nats_paths = ["nkey_seed_file", "creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file"];
        let not_from_file: Vec<&str> = nats_paths.into_iter().filter(|k| !merged.set_by_file(&format!("nats.{k}"), path)).collect();
        let not_from_file: Vec<(&str, String)> =
            not_from_file.into_iter().map(|k| (k, nats_field(&mut merged.config, k).clone())).collect();
        merged.config.resolve_paths(folder);
        for (key, value) in not_from_file {
            *nats_field(&mut merged.config, key) = value;
        }
        merged.config.include_tables(folder).map_err(|e| merged.attribute(e))?;
    } else {
        merged.config.include_tables(Path::new(".")).map_err(|e| merged.attribute(e))?;
    }
    Ok(merged)
}

fn nats_field<'a>(config: &'a mut ClusterConfig, key: &str) -> &'a mut String {
    let n = &mut config.nats;
    match key {
        "nkey_seed_file" => &mut n.nkey_seed_file,
        "creds_file" => &mut n.creds_file,
        "tls_ca_file" => &mut n.tls_ca_file,
        "tls_cert_file" => &mut n.tls_cert_file,
        _ => &mut n.tls_key_file,
    }
}

/// `KILN_NODE__DRAIN_GRACE_S` → `node.drain_grace_s`, if that key exists.
fn key_of_variable(name: &str, defaults: &Dict) -> Result<String, ConfigError> {
    let rest = name.strip_prefix("KILN_").unwrap_or(name);
    let key = rest.split("__").map(|part| part.to_ascii_lowercase()).collect::<Vec<_>>().join(".");
    let known = lookup(defaults, &key).is_some() && key.contains('.') && !key.split('.').any(str::is_empty);
    if !known {
        return Err(ConfigError::UnknownVariable { name: name.to_string(), key });
    }
    Ok(key)
}

/// The variable of a key: `node.drain_grace_s` → `KILN_NODE__DRAIN_GRACE_S`.
pub fn variable_of_key(key: &str) -> String {
    format!("KILN_{}", key.split('.').map(|p| p.to_ascii_uppercase()).collect::<Vec<_>>().join("__"))
}

fn lookup<'a>(dict: &'a Dict, key: &str) -> Option<&'a Value> {
    let (first, rest) = key.split_once('.').map_or((key, None), |(a, b)| (a, Some(b)));
    let value = dict.get(first)?;
    match rest {
        None => Some(value),
        Some(rest) => match value {
            Value::Dict(_, inner) => lookup(inner, rest),
            _ => None,
        },
    }
}

/// The one-key dictionary that sets `key` to `text`, read as the type of the key's default;
/// `origin` (the variable or the flag) names it in errors.
fn setting(key: &str, text: &str, defaults: &Dict, origin: &str) -> Result<Dict, ConfigError> {
    let sourced = |reason: String| ConfigError::Sourced { origin: origin.to_string(), key: key.to_string(), reason };
    let Some(default) = lookup(defaults, key) else {
        return Err(sourced("is not a configuration key".into()));
    };
    let value = match default {
        _ if FILE_ONLY.contains(&key) => return Err(sourced("is a list of tables: set it in the file".into())),
        Value::Dict(..) => return Err(sourced("is a table: set its keys one by one".into())),
        Value::String(..) | Value::Char(..) | Value::Empty(..) => Value::from(text.to_string()),
        Value::Bool(..) => match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" => Value::from(true),
            "0" | "false" | "no" | "" => Value::from(false),
            _ => return Err(sourced(format!("must be true or false, got {text:?}"))),
        },
        Value::Num(_, num) if num.to_f64().is_some() => {
            Value::from(text.trim().parse::<f64>().map_err(|_| sourced(format!("must be a number, got {text:?}")))?)
        }
        Value::Num(..) => match (text.trim().parse::<u64>(), text.trim().parse::<i64>()) {
            (Ok(n), _) => Value::Num(Tag::Default, Num::U64(n)),
            (_, Ok(n)) => Value::Num(Tag::Default, Num::I64(n)),
            _ => return Err(sourced(format!("must be a whole number, got {text:?}"))),
        },
        Value::Array(..) => Value::from(text.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<_>>()),
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut dict = Dict::new();
    dict.insert(last.to_string(), value);
    for part in parts.into_iter().rev() {
        let mut outer = Dict::new();
        outer.insert(part.to_string(), Value::from(dict));
        dict = outer;
    }
    Ok(dict)
}

fn to_dict(value: impl serde::Serialize) -> Result<Dict, ConfigError> {
    match Value::serialize(value).map_err(from_figment)? {
        Value::Dict(_, dict) => Ok(dict),
        _ => Err(invalid("", "is not a table")),
    }
}

/// A figment error (a value of the wrong type, out of range) as the error of the key and of
/// the layer that set it.
fn from_figment(error: figment::Error) -> ConfigError {
    let error = error.into_iter().next().expect("a figment error holds at least one");
    let key = error.path.join(".");
    let reason = error.kind.to_string();
    match error.metadata {
        Some(meta) if meta.name != DEFAULTS => ConfigError::Sourced { origin: meta.name.to_string(), key, reason },
        _ => ConfigError::Invalid { key, reason },
    }
}

/// One layer: a dictionary under a name (the file's path, the variable, the flag, "default").
struct Layer {
    name: String,
    dict: Dict,
}

impl Layer {
    fn new(name: impl Into<String>, dict: Dict) -> Layer {
        Layer { name: name.into(), dict }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// For tests: `file` (TOML text, written to a temporary folder), the environment `env` and
/// `flags` as `(flag, key, value)`, merged and not validated.
#[cfg(test)]
pub(super) fn merged_with(file: Option<&str>, env: &[(&str, &str)], flags: &[(&str, &str, &str)]) -> Result<ClusterConfig, ConfigError> {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("cluster.toml");
    if let Some(text) = file {
        std::fs::write(&path, text).expect("the test's config file");
    }
    ClusterConfig::merge(&test_layers(file.map(|_| path.as_path()), env, flags))
}

#[cfg(test)]
fn test_layers(file: Option<&Path>, env: &[(&str, &str)], flags: &[(&str, &str, &str)]) -> Layers {
    Layers {
        file: file.map(Path::to_path_buf),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        flags: flags.iter().map(|(f, k, v)| Flag::new(*f, *k, *v)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "[[models]]\nname = \"demo\"\nengine = { kind = \"noop\" }\n";

    /// A file in a folder of its own, with the demo model after `text`.
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, format!("{text}\n{MODEL}")).unwrap();
        (dir, path)
    }

    fn load(file: Option<&Path>, env: &[(&str, &str)], flags: &[(&str, &str, &str)]) -> Result<ClusterConfig, String> {
        ClusterConfig::load_layers(&test_layers(file, env, flags)).map_err(|e| e.to_string())
    }

    #[test]
    fn each_layer_wins_over_the_one_before() {
        let (_dir, path) = file("[node]\nslots = [\"cpu:1\"]\ndrain_grace_s = 40");
        let slots = |env: &[(&str, &str)], flags: &[(&str, &str, &str)]| load(Some(&path), env, flags).unwrap().node.slots;
        assert_eq!(
            load(None, &[], &[("--x", "models", "")]).unwrap_err(),
            "invalid config: --x: `models` is a list of tables: set it in the file"
        );
        assert_eq!(ClusterConfig::merge(&Layers::default()).unwrap().node.slots, ["cpu:0"], "the default");
        assert_eq!(slots(&[], &[]), ["cpu:1"], "the file over the default");
        assert_eq!(slots(&[("KILN_NODE__SLOTS", "cpu:2, cpu:3")], &[]), ["cpu:2", "cpu:3"], "the environment over the file");
        assert_eq!(slots(&[("KILN_SLOTS", "cpu:5")], &[]), ["cpu:5"], "the older name too");
        assert_eq!(slots(&[("KILN_NODE__SLOTS", "cpu:2"), ("KILN_SLOTS", "cpu:5")], &[]), ["cpu:2"], "the new name over its alias");
        let flag = [("--slots", "node.slots", "cpu:4")];
        assert_eq!(slots(&[("KILN_NODE__SLOTS", "cpu:2"), ("KILN_SLOTS", "cpu:5")], &flag), ["cpu:4"], "the flag over both");

        // Numbers, booleans and floats are read as their key's type.
        let c = load(Some(&path), &[], &[]).unwrap();
        assert_eq!((c.node.drain_grace_s, c.nats.tls_required), (40, false));
        let env = [("KILN_NODE__DRAIN_GRACE_S", "45"), ("KILN_NATS__TLS_REQUIRED", "yes"), ("KILN_RETRY__BACKOFF_MULTIPLIER", "2.5")];
        let c = ClusterConfig::merge(&test_layers(Some(&path), &env, &[])).unwrap();
        assert_eq!((c.node.drain_grace_s, c.nats.tls_required, c.retry.backoff_multiplier), (45, true, 2.5));
        let c = ClusterConfig::merge(&test_layers(Some(&path), &env, &[("--drain-grace-s", "node.drain_grace_s", "5")])).unwrap();
        assert_eq!(c.node.drain_grace_s, 5);
        assert_eq!(ClusterConfig::merge(&Layers::default()).unwrap().node.drain_grace_s, 30);
        // Every old name still sets its key.
        for (alias, key) in ALIASES {
            let value = if key == "nats.tls_required" {
                "true"
            } else if key.ends_with("_ms") || key.ends_with("replicas") {
                "3000"
            } else {
                "cpu:7"
            };
            let merged = merge_layers(&test_layers(None, &[(alias, value)], &[])).unwrap();
            assert_eq!(merged.figment.find_metadata(key).map(|m| m.name.to_string()), Some(alias.to_string()), "{alias}");
        }
    }

    /// The start: a file with the embedded server, three replicas from the environment,
    /// the cluster's URLs from a flag. Validated once, after every layer.
    #[test]
    fn validation_runs_once_after_every_layer() {
        let (_dir, path) = file("[nats]\nurl = \"embedded\"");
        let env = [("KILN_NATS_REPLICAS", "3")];
        let c = load(Some(&path), &env, &[("--nats", "nats.url", "nats://a:4222,nats://b:4222,nats://c:4222")]).unwrap();
        assert_eq!((c.nats.replicas, c.nats.urls().len()), (3, 3));
        let without_the_flag = load(Some(&path), &env, &[]).unwrap_err();
        assert_eq!(
            without_the_flag,
            "invalid config: KILN_NATS_REPLICAS: `nats.replicas` must be 1 with the embedded server (one nats-server); point nats.url at a cluster"
        );
    }

    #[test]
    fn an_error_names_the_file_the_variable_or_the_flag_that_set_the_value() {
        let (_dir, path) = file("[node]\nslots = [\"cpu:0\", \"gpu0\"]");
        let shown = path.display().to_string();
        assert_eq!(
            load(Some(&path), &[], &[]).unwrap_err(),
            format!("invalid config: {shown}: `node.slots[1]` \"gpu0\" is not `cuda:N` or `cpu:N`")
        );
        assert!(load(Some(&path), &[("KILN_NODE__SLOTS", "cpu:0,gpu1")], &[]).unwrap_err().contains("KILN_NODE__SLOTS: `node.slots[1]`"));
        assert!(load(Some(&path), &[("KILN_SLOTS", "gpu1")], &[]).unwrap_err().contains("KILN_SLOTS: `node.slots[0]`"));
        let flagged = load(Some(&path), &[("KILN_SLOTS", "gpu1")], &[("--slots", "node.slots", "cpu:0,cpu:0")]).unwrap_err();
        assert!(flagged.contains("--slots: `node.slots[1]` \"cpu:0\" is listed twice"), "{flagged}");
        // A value of the wrong type.
        let parse = load(Some(&path), &[("KILN_NATS__REPLICAS", "three")], &[]).unwrap_err();
        assert_eq!(parse, "invalid config: KILN_NATS__REPLICAS: `nats.replicas` must be a whole number, got \"three\"");
        assert!(load(None, &[], &[("--heartbeat", "node.heartbeat_ms", "soon")]).unwrap_err().contains("--heartbeat: `node.heartbeat_ms`"));
        assert!(load(None, &[("KILN_NATS__REPLICAS", "99999999999999999999")], &[]).unwrap_err().contains("KILN_NATS__REPLICAS"));
        // A bad value in the file, of the wrong type or under an unknown key: its path and key.
        let (_d, bad) = file("[node]\nheartbeat_ms = \"soon\"");
        let err = load(Some(&bad), &[], &[]).unwrap_err();
        assert!(err.contains(&bad.display().to_string()) && err.contains("heartbeat_ms"), "{err}");
        let (_d, typo) = file("[node]\nslotz = []");
        assert!(load(Some(&typo), &[], &[]).unwrap_err().contains("slotz"));
        // Between two keys, the one set last: the password from the environment.
        let (_d, user) = file("[nats]\ntoken = \"t\"");
        assert!(load(Some(&user), &[("KILN_NATS__USER", "u"), ("KILN_NATS__PASSWORD", "p")], &[]).unwrap_err().contains("nats.token"));
        let (_d, cookie) = file("[cluster]\ncookie = \"\"");
        assert!(load(Some(&cookie), &[], &[]).unwrap_err().starts_with(&format!("invalid config: {}: `cluster.cookie`", cookie.display())));
        // A value still at its default is named by its key alone.
        assert_eq!(load(None, &[], &[]).unwrap_err(), "invalid config: `models` must configure at least one model");
    }

    #[test]
    fn an_unknown_variable_is_an_error_and_other_kiln_variables_are_not_config() {
        let err = load(None, &[("KILN_NODE__SLOTZ", "cpu:0")], &[]).unwrap_err();
        assert!(err.starts_with("KILN_NODE__SLOTZ is not a configuration variable: no key `node.slotz`"), "{err}");
        assert!(load(None, &[("KILN_NOPE__X", "1")], &[]).unwrap_err().contains("KILN_NOPE__X"));
        assert!(load(None, &[("KILN_NODE__", "1")], &[]).unwrap_err().contains("KILN_NODE__"));
        let routes = load(None, &[("KILN_HTTP__ROUTES", "x")], &[]).unwrap_err();
        assert!(routes.contains("KILN_HTTP__ROUTES") && routes.contains("in the file"), "{routes}");
        assert!(load(None, &[("KILN_NODE__SLOTS__X", "1")], &[]).unwrap_err().contains("KILN_NODE__SLOTS__X"));
        let (_dir, path) = file("");
        let ignored = [
            ("KILN_LOG", "debug"),
            ("KILN_CONFIG", "/nope.toml"),
            ("KILN_CACHE", "/tmp"),
            ("KILN_NATS_SERVER", "/bin/false"),
            ("KILN_PYTHON", "x"),
            ("KILN_COMMIT", "abc"),
            ("KILN_NODE", "x"),
            ("KILN_SLOT", "x"),
            ("PATH", "/bin"),
        ];
        assert_eq!(load(Some(&path), &ignored, &[]).unwrap().node.slots, ["cpu:0"]);
    }

    /// Every key of every section can be set from the environment under its derived name.
    #[test]
    fn every_key_has_a_variable() {
        let defaults = to_dict(ClusterConfig::default()).unwrap();
        let mut checked = 0;
        for (section, value) in &defaults {
            let Value::Dict(_, keys) = value else { continue };
            for key in keys.keys() {
                let key = format!("{section}.{key}");
                let name = variable_of_key(&key);
                assert_eq!(key_of_variable(&name, &defaults).unwrap(), key);
                checked += 1;
            }
        }
        assert!(checked > 50, "{checked} keys");
        assert_eq!(variable_of_key("node.drain_grace_s"), "KILN_NODE__DRAIN_GRACE_S");
    }

    #[test]
    fn the_file_is_the_flag_s_else_kiln_config_s_else_cluster_toml_if_it_exists() {
        let env = |v: &str| vec![(CONFIG_VAR.to_string(), v.to_string())];
        assert_eq!(choose_file(Some("a.toml".into()), &env("b.toml"), true), Some("a.toml".into()));
        assert_eq!(choose_file(None, &env("b.toml"), true), Some("b.toml".into()));
        assert_eq!(choose_file(None, &env(""), true), Some(DEFAULT_FILE.into()));
        assert_eq!(choose_file(None, &[], true), Some(DEFAULT_FILE.into()));
        assert_eq!(choose_file(None, &[], false), None);
        // A file named but missing is an error naming it, and KILN_CONFIG when that named it.
        let err = load(Some(Path::new("/no/such/cluster.toml")), &[], &[]).unwrap_err();
        assert!(err.starts_with("cannot read config /no/such/cluster.toml: "), "{err}");
        let env = env("/no/such/kiln.toml");
        let err = ClusterConfig::load_layers(&Layers::from_env(None, env.clone(), vec![])).unwrap_err().to_string();
        assert!(err.starts_with("cannot read config /no/such/kiln.toml (named by KILN_CONFIG): "), "{err}");
        // KILN_CONFIG's file is read, and --config wins over it.
        let (_dir, path) = file("[node]\nslots = [\"cpu:3\"]");
        let layers = Layers::from_env(None, vec![(CONFIG_VAR.into(), path.display().to_string())], vec![]);
        assert_eq!(ClusterConfig::load_layers(&layers).unwrap().node.slots, ["cpu:3"]);
        let (_dir2, flagged) = file("[node]\nslots = [\"cpu:4\"]");
        let layers = Layers::from_env(Some(flagged), env, vec![]);
        assert_eq!(ClusterConfig::load_layers(&layers).unwrap().node.slots, ["cpu:4"]);
    }

    /// The file's relative paths are relative to its folder; a variable's to the working folder.
    #[test]
    fn relative_paths_resolve_against_the_folder_of_the_file_that_set_them() {
        let (dir, path) = file("[nats]\ncreds_file = \"node.creds\"");
        let c = ClusterConfig::merge(&test_layers(Some(&path), &[], &[])).unwrap();
        assert_eq!(c.nats.creds_file, dir.path().join("node.creds").display().to_string());
        let c = ClusterConfig::merge(&test_layers(Some(&path), &[("KILN_NATS__CREDS_FILE", "mine.creds")], &[])).unwrap();
        assert_eq!(c.nats.creds_file, "mine.creds");
    }
}
