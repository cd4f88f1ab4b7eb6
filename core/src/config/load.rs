//! The whole configuration, [`ClusterConfig`]: loading (through the layers of
//! [`super::layers`]: defaults, the file, the environment, the flags; included route tables,
//! relative paths resolved against the file's folder) and validation, once, of everything serde
//! cannot check.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::connection::NatsRules;
use super::connection::{ClusterLink, NatsConfig};
use super::error::{invalid, ConfigError};
use super::http::HttpConfig;
use super::models::{EngineConfig, ModelConfig, StageConfig};
use super::node::{
    parse_slot, AutoscaleConfig, CompressionConfig, FairShareConfig, KeyQuota, Limits, NodeConfig, QuotaConfig, RestartPolicy, RetryPolicy,
    StorageConfig,
};
use super::telemetry::{LogConfig, TelemetryConfig};
use crate::ids;

/// The most `quota.max_running` may be: the `max_ack_pending` a key's consumers have without
/// a quota (`Resources`).
pub const MAX_RUNNING_QUOTA: u64 = 100_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub nats: NatsConfig,
    pub node: NodeConfig,
    pub limits: Limits,
    pub storage: StorageConfig,
    pub retry: RetryPolicy,
    pub restart: RestartPolicy,
    pub cluster: ClusterLink,
    pub compression: CompressionConfig,
    /// The queue figures for autoscalers (`kiln.api.queue`, the queue gauges).
    pub autoscale: AutoscaleConfig,
    /// Fair share of each model's slots between the values of a label.
    pub fair_share: FairShareConfig,
    /// Limits per fair-share key: queued, running, submit rate.
    pub quota: QuotaConfig,
    /// The HTTP + SSE gateway (`kiln gateway`, and the one `kiln up` starts).
    pub http: HttpConfig,
    /// Signed HTTP callbacks of job events: the secret, retry, refusal of private addresses,
    /// endpoints per model.
    pub webhooks: super::webhooks::WebhooksConfig,
    pub models: Vec<ModelConfig>,
    /// OpenTelemetry traces over OTLP/HTTP (off unless an endpoint is set).
    pub telemetry: TelemetryConfig,
    /// The log lines' format (text or JSON).
    pub log: LogConfig,
}

impl ClusterConfig {
    /// Parses TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
    }

    /// Adds the `[[models]]` and `[[http.routes]]` of each `http.include` file (relative to
    /// `base`, this file's folder), their relative paths resolved against their own folder:
    /// a seed's table serves from wherever it lives, beside other tables. An included file
    /// includes nothing further, and its other sections are ignored.
    pub fn include_tables(&mut self, base: &Path) -> Result<(), ConfigError> {
        for (i, name) in std::mem::take(&mut self.http.include).into_iter().enumerate() {
            let path = base.join(&name);
            let text = read(&path)?;
            let mut table = Self::from_toml(&text, &path.display().to_string())?;
            if !table.http.include.is_empty() {
                return Err(invalid(format!("http.include[{i}]"), format!("{name:?} includes other files itself; include them here")));
            }
            table.resolve_paths(path.parent().unwrap_or(Path::new(".")));
            self.models.append(&mut table.models);
            self.http.routes.append(&mut table.http.routes);
        }
        Ok(())
    }

    /// Makes relative program paths in process commands absolute (against `base`), so a node
    /// started from any folder finds the worker scripts named in the file.
    pub fn resolve_paths(&mut self, base: &Path) {
        self.nats.resolve_paths(base);
        for key in &mut self.http.api_keys {
            for path in [&mut key.nkey_seed_file, &mut key.creds_file] {
                if !path.is_empty() && !path.starts_with('/') {
                    *path = base.join(&*path).display().to_string();
                }
            }
        }
        for model in &mut self.models {
            match &mut model.engine {
                EngineConfig::Process { command, cwd, .. } => {
                    if let Some(dir) = cwd.as_mut().filter(|d| !d.starts_with('/')) {
                        *dir = base.join(&*dir).display().to_string();
                    }
                    for (i, arg) in command.iter_mut().enumerate() {
                        // The program without a '/' is looked up on PATH (`python3`), as a shell
                        // would; any other relative word that names a file or folder beside the
                        // config is that file (`worker.py`), whatever folder the node runs in.
                        let looks_like_path = (i > 0 || arg.contains('/')) && !arg.starts_with('/') && !arg.starts_with('-');
                        if looks_like_path && !arg.is_empty() && base.join(&*arg).exists() {
                            *arg = base.join(&*arg).canonicalize().unwrap_or_else(|_| base.join(&*arg)).display().to_string();
                        }
                    }
                }
                // A missing model file is reported when a job needs it, not at start: the
                // node serves its other models meanwhile.
                EngineConfig::Torchscript { path, .. } if !path.starts_with('/') => *path = base.join(&*path).display().to_string(),
                _ => {}
            }
        }
    }

    /// `[quota]`: each key's limits (the defaults, and each override over them) in range; a
    /// quota needs the fair-share key whose values it limits.
    fn validate_quota(&self) -> Result<(), ConfigError> {
        let quota = &self.quota;
        if quota.is_on() && self.fair_share.key.is_empty() {
            return Err(invalid("quota", "limits the values of fair_share.key: set it (quotas need the key fair share uses)"));
        }
        let check = |key: String, limits: KeyQuota| {
            if !limits.submits_per_s.is_finite() || limits.submits_per_s < 0.0 {
                return Err(invalid(format!("{key}submits_per_s"), "must be 0 (no limit) or a positive number"));
            }
            if limits.submits_per_s > 0.0 && limits.burst == 0 {
                return Err(invalid(format!("{key}burst"), "must be at least 1 where submits_per_s is set"));
            }
            if limits.max_running > MAX_RUNNING_QUOTA {
                return Err(invalid(format!("{key}max_running"), format!("must be at most {MAX_RUNNING_QUOTA}")));
            }
            Ok(())
        };
        check("quota.".into(), quota.defaults())?;
        for (name, over) in &quota.keys {
            if name.is_empty() || name.trim_end_matches('*').contains('*') {
                return Err(invalid(format!("quota.keys.{name:?}"), "must be a value, or a class ending in one `*`"));
            }
            check(format!("quota.keys.{name:?}."), over.over(quota.defaults()))?;
        }
        Ok(())
    }

    /// Checks everything serde cannot: names, ranges, references between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.telemetry.validate()?;
        self.log.validate()?;
        if !self.node.name.is_empty() && !ids::is_valid_token(&self.node.name) {
            return Err(invalid("node.name", "must be letters, digits, '-' or '_'"));
        }
        if self.node.slots.is_empty() {
            return Err(invalid("node.slots", "must name at least one slot"));
        }
        for (i, slot) in self.node.slots.iter().enumerate() {
            if parse_slot(slot).is_none() {
                return Err(invalid(format!("node.slots[{i}]"), format!("{slot:?} is not `cuda:N` or `cpu:N`")));
            }
            if self.node.slots[..i].contains(slot) {
                return Err(invalid(format!("node.slots[{i}]"), format!("{slot:?} is listed twice")));
            }
        }
        if self.node.heartbeat_ms == 0 || self.node.registry_ttl_ms < 2 * self.node.heartbeat_ms {
            return Err(invalid("node.registry_ttl_ms", "must be at least twice node.heartbeat_ms"));
        }
        if self.node.loss_after_ms < 2 * self.node.heartbeat_ms || self.node.loss_after_ms > self.node.registry_ttl_ms {
            return Err(invalid("node.loss_after_ms", "must be at least twice node.heartbeat_ms and at most node.registry_ttl_ms"));
        }
        if self.autoscale.target_wait_s == 0 {
            return Err(invalid("autoscale.target_wait_s", "must be positive"));
        }
        if self.fair_share.default_weight == 0 {
            return Err(invalid("fair_share.default_weight", "must be at least 1"));
        }
        if let Some((value, _)) = self.fair_share.weights.iter().find(|(_, w)| **w == 0) {
            return Err(invalid(format!("fair_share.weights.{value}"), "must be at least 1"));
        }
        self.validate_quota()?;
        self.webhooks.validate()?;
        if self.autoscale.refresh_ms == 0 {
            return Err(invalid("autoscale.refresh_ms", "must be positive"));
        }
        if self.compression.queue_limit == 0 {
            return Err(invalid("compression.queue_limit", "must be positive"));
        }
        for (i, model) in self.models.iter().enumerate() {
            for (j, stage) in model.stages.iter().enumerate() {
                let key = format!("models[{i}].stages[{j}]");
                if !ids::is_valid_token(stage.name()) {
                    return Err(invalid(format!("{key}.name"), "must be letters, digits, '-' or '_'"));
                }
                match stage {
                    StageConfig::Command { command, input, output, timeout_ms, max_attempts, .. } => {
                        if command.is_empty() {
                            return Err(invalid(format!("{key}.command"), "must name a program"));
                        }
                        for placeholder in ["{input}", "{output}"] {
                            if !command.iter().any(|a| a.contains(placeholder)) {
                                return Err(invalid(format!("{key}.command"), format!("must contain {placeholder}")));
                            }
                        }
                        if input == output || !ids::is_valid_object_name(input) || !ids::is_valid_object_name(output) {
                            return Err(invalid(format!("{key}.output"), "input and output must be two artifact file names"));
                        }
                        if *timeout_ms == 0 || *max_attempts == 0 {
                            return Err(invalid(format!("{key}.timeout_ms"), "timeout_ms and max_attempts must be positive"));
                        }
                    }
                    StageConfig::CameraMetadata { output, default_focal, .. } => {
                        if !ids::is_valid_object_name(output) || default_focal.is_nan() || *default_focal <= 0.0 {
                            return Err(invalid(format!("{key}.output"), "needs an artifact file name and a positive default_focal"));
                        }
                    }
                }
            }
        }
        if self.cluster.cookie.is_empty() {
            return Err(invalid("cluster.cookie", "must not be empty"));
        }
        if self.cluster.heartbeat_ms == 0 || self.cluster.silence_ms < 2 * self.cluster.heartbeat_ms {
            return Err(invalid("cluster.silence_ms", "must be at least twice cluster.heartbeat_ms"));
        }
        if self.cluster.frame_bytes < 1024 || self.cluster.frame_bytes > 512 * 1024 {
            return Err(invalid("cluster.frame_bytes", "must be between 1024 and 524288 (half the NATS payload limit)"));
        }
        if self.cluster.window_bytes < 2 * self.cluster.frame_bytes {
            return Err(invalid("cluster.window_bytes", "must be at least twice cluster.frame_bytes"));
        }
        if self.cluster.redial_ms == 0 {
            return Err(invalid("cluster.redial_ms", "must be positive"));
        }
        if self.limits.max_batch_items == 0 || self.limits.max_batch_items > 5000 {
            // The parent record lists every item and must fit one KV value (1 MiB payload).
            return Err(invalid("limits.max_batch_items", "must be between 1 and 5000"));
        }
        if self.limits.max_request_bytes == 0 || self.limits.max_request_bytes > 1024 * 1024 {
            return Err(invalid("limits.max_request_bytes", "must be between 1 and 1048576 (the NATS payload limit)"));
        }
        if self.restart.backoff_initial_ms == 0 || self.restart.backoff_max_ms < self.restart.backoff_initial_ms {
            return Err(invalid("restart.backoff_max_ms", "must be at least restart.backoff_initial_ms, which must be above 0"));
        }
        if self.retry.backoff_multiplier < 1.0 {
            return Err(invalid("retry.backoff_multiplier", "must be at least 1.0"));
        }
        if self.models.is_empty() {
            return Err(invalid("models", "must configure at least one model"));
        }
        for (i, m) in self.models.iter().enumerate() {
            let key = |field: &str| format!("models[{i}].{field}");
            if !ids::is_valid_model_name(&m.name) {
                return Err(invalid(key("name"), format!("{:?} must be 1-32 lowercase letters, digits, '-' or '_'", m.name)));
            }
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return Err(invalid(key("name"), format!("{:?} is configured twice", m.name)));
            }
            if m.timeout_ms == 0 {
                return Err(invalid(key("timeout_ms"), "must be above 0"));
            }
            if m.max_attempts == 0 || m.max_attempts > 100 {
                return Err(invalid(key("max_attempts"), "must be between 1 and 100"));
            }
            if m.result_ttl_s == Some(0) {
                return Err(invalid(key("result_ttl_s"), "must be above 0"));
            }
            for (j, decl) in m.params.iter().enumerate() {
                if let Some(why) = decl.invalid() {
                    return Err(invalid(key(&format!("params[{j}]")), why));
                }
                if m.params[..j].iter().any(|o| o.name == decl.name) {
                    return Err(invalid(key(&format!("params[{j}]")), format!("{:?} is declared twice", decl.name)));
                }
            }
            for s in &m.slots {
                if parse_slot(s).is_none() {
                    return Err(invalid(key("slots"), format!("{s:?} is not `cuda:N` or `cpu:N`")));
                }
            }
            if m.gpus == 0 {
                return Err(invalid(key("gpus"), "must be at least 1"));
            }
            if m.gpus > 1 && !matches!(m.engine, EngineConfig::Process { .. }) {
                // A TorchScript module runs on its slot's one device (and noop on none): only
                // a worker process can spread a model over several GPUs.
                return Err(invalid(
                    key("gpus"),
                    format!("only the `process` engine may use more than 1 GPU; a {} model runs on its slot's one device", m.engine.kind()),
                ));
            }
            if m.gpus > 1 && !m.slots.is_empty() && m.slots.len() < m.gpus {
                return Err(invalid(key("gpus"), format!("{} GPUs cannot fit on the {} slots the model may use", m.gpus, m.slots.len())));
            }
            match &m.engine {
                EngineConfig::Process { command, .. } if command.is_empty() => {
                    return Err(invalid(key("engine.command"), "must name a program"))
                }
                EngineConfig::Process { cwd: Some(dir), .. } if !Path::new(dir).is_dir() => {
                    return Err(invalid(key("engine.cwd"), format!("{dir:?} is not a folder")))
                }
                EngineConfig::Torchscript { .. } if !cfg!(feature = "torch") => {
                    return Err(invalid(key("engine.kind"), super::models::NO_TORCH))
                }
                EngineConfig::Torchscript { path, device, inputs, params, max_batch, max_batch_delay_ms, .. } => {
                    if *max_batch == 0 || *max_batch > 1024 {
                        return Err(invalid(key("engine.max_batch"), "must be between 1 and 1024"));
                    }
                    if *max_batch_delay_ms > 10_000 {
                        return Err(invalid(key("engine.max_batch_delay_ms"), "must be at most 10000"));
                    }
                    if path.is_empty() {
                        return Err(invalid(key("engine.path"), "must name a .pt file"));
                    }
                    if device != "slot" && device != "cpu" {
                        return Err(invalid(key("engine.device"), format!("{device:?} is not \"slot\" or \"cpu\"")));
                    }
                    let mut names: Vec<&str> =
                        inputs.iter().map(|i| i.name.as_str()).chain(params.iter().map(|p| p.name.as_str())).collect();
                    names.sort();
                    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                        return Err(invalid(key("engine"), format!("{:?} is both an input and a param, or listed twice", w[0])));
                    }
                }
                _ => {}
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.min_warm > 0 && !matches!(m.engine, EngineConfig::Process { .. }) {
                return Err(invalid(format!("models[{i}].min_warm"), "applies to process models only"));
            }
        }
        // What min_warm keeps loaded can never be evicted: where the models declare their
        // memory, a pool over a slot's budget is known now (a measured one, only once loaded).
        for slot in &self.node.slots {
            let pool = self.warm_pool(slot);
            let declared: u64 = pool
                .iter()
                .filter_map(|m| match self.model(m).map(|m| &m.engine) {
                    Some(EngineConfig::Process { memory_bytes, .. }) => *memory_bytes,
                    _ => None,
                })
                .sum();
            if declared > self.node.slot_memory_bytes {
                return Err(invalid(
                    "models",
                    format!(
                        "the min_warm models of slot {slot} ({}) declare {declared} bytes, over node.slot_memory_bytes ({})",
                        pool.join(", "),
                        self.node.slot_memory_bytes
                    ),
                ));
            }
        }
        self.http.validate(|m| self.model(m).is_some())?;
        Ok(())
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The models a slot keeps loaded for their `min_warm`: a model with `min_warm = N` is
    /// kept on the first N slots of `node.slots` that serve it.
    pub fn warm_pool(&self, slot: &str) -> Vec<String> {
        let serves = |m: &ModelConfig, s: &str| m.slots.is_empty() || m.slots.iter().any(|x| x == s);
        self.models
            .iter()
            .filter(|m| m.min_warm > 0)
            .filter(|m| self.node.slots.iter().filter(|s| serves(m, s)).take(m.min_warm as usize).any(|s| s == slot))
            .map(|m| m.name.clone())
            .collect()
    }

    /// The models a slot of this node serves: those allowed on it, less any that needs more
    /// GPUs (`gpus`) than this node has slots serving it (another node may serve it; here its
    /// jobs are never taken).
    pub fn models_for_slot(&self, slot: &str) -> Vec<String> {
        self.models.iter().filter(|m| allowed_on(m, slot) && self.fits_on_node(m)).map(|m| m.name.clone()).collect()
    }

    /// Whether this node has as many slots allowed to serve `model` as it needs at once.
    pub fn fits_on_node(&self, model: &ModelConfig) -> bool {
        model.gpus <= 1 || self.node.slots.iter().filter(|s| allowed_on(model, s)).count() >= model.gpus
    }

    pub fn result_ttl_s(&self, model: &ModelConfig) -> u64 {
        model.result_ttl_s.unwrap_or(self.storage.result_ttl_s)
    }

    /// What this node publishes of each model it declares (see
    /// [`crate::protocol::ModelDecl`]): every one of its `[[models]]`, even one that none of its
    /// slots serves now, so that a configured model is known (its jobs wait, or a batch falls
    /// back at submit) as it was before the registry decided.
    pub fn model_decls(&self) -> Vec<crate::protocol::ModelDecl> {
        self.models
            .iter()
            .map(|m| crate::protocol::ModelDecl {
                name: m.name.clone(),
                engine: m.engine.kind().to_string(),
                max_attempts: m.max_attempts,
                timeout_ms: m.timeout_ms,
                result_ttl_s: self.result_ttl_s(m),
                required_inputs: m.required_inputs.clone(),
                params: m.params.clone(),
                gpus: m.gpus,
            })
            .collect()
    }
}

/// Whether `model` may run on `slot` (its `slots`, or every slot when none are listed).
fn allowed_on(model: &ModelConfig, slot: &str) -> bool {
    model.slots.is_empty() || model.slots.iter().any(|s| s == slot)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

/// The shortest valid file: one model, every other key at its default.
#[cfg(test)]
pub(super) const MINIMAL: &str = r#"
[[models]]
name = "demo"
engine = { kind = "noop" }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_cluster_toml_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml");
        let config = ClusterConfig::load(&path).expect("shipped cluster.toml must be valid");
        assert!(!config.models.is_empty());
        assert_eq!(config.nats.url, "embedded");
    }

    #[test]
    fn defaults_fill_everything_but_models() {
        let c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.nats.prefix, "kiln");
        assert_eq!(c.models[0].max_attempts, 3);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = ClusterConfig::from_toml("[node]\nslotz = []\n", "t").unwrap_err().to_string();
        assert!(err.contains("slotz"), "{err}");
        let err = ClusterConfig::from_toml("[[models]]\nname='a'\nengine={kind='noop', delay=1}\n", "t").unwrap_err().to_string();
        assert!(err.contains("delay"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.node.slots = vec!["gpu0".into()];
        assert!(c.validate().unwrap_err().to_string().contains("node.slots[0]"));
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.models[0].name = "Bad Name".into();
        assert!(c.validate().unwrap_err().to_string().contains("models[0].name"));
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.models[0].max_attempts = 0;
        assert!(c.validate().unwrap_err().to_string().contains("models[0].max_attempts"));
    }

    #[test]
    fn multi_gpu_models_are_checked_and_served_only_where_they_fit() {
        let model = |engine: &str, gpus: usize, slots: &str| {
            format!("[node]\nslots = [\"cuda:0\", \"cuda:1\", \"cuda:2\"]\n[[models]]\nname = \"big\"\nengine = {engine}\ngpus = {gpus}\nslots = [{slots}]\n")
        };
        let process = r#"{ kind = "process", command = ["python3", "w.py"] }"#;
        let check = |toml: String| ClusterConfig::from_toml(&toml, "t").unwrap().validate().map_err(|e| e.to_string());
        assert!(check(model(process, 0, "")).unwrap_err().contains("models[0].gpus"));
        let torch = r#"{ kind = "torchscript", path = "m.pt" }"#;
        let err = check(model(torch, 2, "")).unwrap_err();
        assert!(err.contains("models[0].gpus") && err.contains("only the `process` engine"), "{err}");
        assert!(check(model(r#"{ kind = "noop" }"#, 2, "")).unwrap_err().contains("models[0].gpus"));
        let err = check(model(process, 3, r#""cuda:0", "cuda:1""#)).unwrap_err();
        assert!(err.contains("models[0].gpus") && err.contains("2 slots"), "{err}");
        check(model(process, 2, r#""cuda:0", "cuda:1""#)).unwrap();
        // A node with too few slots serving it does not serve it; with enough, every one does.
        let mut c = ClusterConfig::from_toml(&model(process, 2, r#""cuda:1", "cuda:2""#), "t").unwrap();
        assert_eq!((c.models_for_slot("cuda:0"), c.models_for_slot("cuda:1")), (vec![], vec!["big".to_string()]));
        c.node.slots = vec!["cuda:1".into()];
        assert!(c.models_for_slot("cuda:1").is_empty());
    }

    #[test]
    fn a_warm_pool_takes_the_first_slots_that_serve_the_model_and_must_fit_their_budget() {
        let toml = |a_bytes: u64| {
            format!(
                r#"
[node]
slots = ["cpu:0", "cpu:1", "cpu:2"]
slot_memory_bytes = 1000
[[models]]
name = "a"
engine = {{ kind = "process", command = ["w"], memory_bytes = {a_bytes} }}
min_warm = 2
[[models]]
name = "b"
engine = {{ kind = "process", command = ["w"], memory_bytes = 400 }}
slots = ["cpu:1", "cpu:2"]
min_warm = 1
[[models]]
name = "c"
engine = {{ kind = "process", command = ["w"] }}
"#
            )
        };
        let c = ClusterConfig::from_toml(&toml(600), "t").unwrap();
        c.validate().expect("600 + 400 fit in 1000");
        assert_eq!(c.warm_pool("cpu:0"), ["a"]);
        assert_eq!(c.warm_pool("cpu:1"), ["a", "b"]);
        assert!(c.warm_pool("cpu:2").is_empty(), "a has its 2 slots, b its 1");
        let err = ClusterConfig::from_toml(&toml(700), "t").unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("slot cpu:1 (a, b) declare 1100 bytes"), "{err}");
        let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        c.models[0].min_warm = 1;
        assert!(c.validate().unwrap_err().to_string().contains("models[0].min_warm"), "a noop model has no warm pool");
    }

    #[test]
    fn the_cluster_link_is_checked() {
        let check = |toml: &str| ClusterConfig::from_toml(toml, "t").unwrap().validate().unwrap_err().to_string();
        assert!(check("[cluster]\ncookie = \"\"").contains("cluster.cookie"));
        assert!(check("[cluster]\nheartbeat_ms = 500\nsilence_ms = 600").contains("cluster.silence_ms"));
        assert!(check("[cluster]\nframe_bytes = 2000000").contains("cluster.frame_bytes"));
        assert!(check("[cluster]\nwindow_bytes = 1000").contains("cluster.window_bytes"));
        let c = super::super::layers::merged_with(None, &[("KILN_CLUSTER_COOKIE", "s3cret")], &[]).unwrap();
        assert_eq!(c.cluster.cookie, "s3cret");
    }

    #[test]
    fn quotas_are_off_by_default_checked_and_set_by_file_or_environment() {
        let c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
        assert!(!c.quota.is_on(), "off by default");
        let check =
            |toml: &str| ClusterConfig::from_toml(&format!("{MINIMAL}\n{toml}"), "t").unwrap().validate().map_err(|e| e.to_string());
        assert!(check("[quota]\nsubmits_per_s = 2").unwrap_err().contains("quota.burst"));
        assert!(check("[quota]\nsubmits_per_s = -1\nburst = 1").unwrap_err().contains("quota.submits_per_s"));
        assert!(check("[quota]\nmax_running = 100001").unwrap_err().contains("quota.max_running"));
        assert!(check("[quota.keys.\"a*b\"]\nmax_queued = 1").unwrap_err().contains("a*b"));
        assert!(check("[quota.keys.\"free-*\"]\nsubmits_per_s = 1").unwrap_err().contains("quota.keys.\"free-*\".burst"));
        assert!(check("[fair_share]\nkey = \"\"\n[quota]\nmax_queued = 1").unwrap_err().contains("fair_share.key"));
        check("[quota]\nsubmits_per_s = 0.5\nburst = 2\n[quota.keys.\"free-*\"]\nmax_queued = 10\nburst = 5").expect("valid");
        let c = super::super::layers::merged_with(None, &[("KILN_QUOTA__MAX_QUEUED", "10"), ("KILN_QUOTA__SUBMITS_PER_S", "2.5")], &[])
            .unwrap();
        assert_eq!((c.quota.max_queued, c.quota.submits_per_s), (10, 2.5));
    }

    #[test]
    fn included_tables_add_their_models_and_routes_with_paths_of_their_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("seeds/http")).unwrap();
        std::fs::create_dir_all(dir.path().join("seeds/workers")).unwrap();
        std::fs::write(dir.path().join("seeds/workers/w.py"), "").unwrap();
        let table = r#"
[compression]
max_workers = 7
[[models]]
name = "talker"
engine = { kind = "process", command = ["python3", "../workers/w.py"] }
[[http.routes]]
method = "POST"
path = "/api/tasks"
kind = "submit"
model = "talker"
"#;
        std::fs::write(dir.path().join("seeds/http/t.toml"), table).unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, format!("[http]\ninclude = [\"seeds/http/t.toml\"]\n{MINIMAL}")).unwrap();
        let c = ClusterConfig::load(&path).unwrap();
        assert_eq!(c.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["demo", "talker"]);
        let EngineConfig::Process { command, .. } = &c.model("talker").unwrap().engine else { panic!("a process engine") };
        let worker = dir.path().join("seeds/workers/w.py").canonicalize().unwrap();
        assert_eq!(command[1], worker.display().to_string(), "relative to the table, not to the including file");
        assert_eq!((c.http.routes.len(), c.compression.max_workers), (1, 0), "routes come, other sections do not");
        assert!(ClusterConfig::load_gateway(&path).is_ok());

        // Twice the same table: its model is configured twice.
        std::fs::write(&path, format!("[http]\ninclude = [\"seeds/http/t.toml\", \"seeds/http/t.toml\"]\n{MINIMAL}")).unwrap();
        assert!(ClusterConfig::load(&path).unwrap_err().to_string().contains("configured twice"));
        // An included file includes nothing further; a missing one is named.
        std::fs::write(dir.path().join("seeds/http/nested.toml"), "[http]\ninclude = [\"t.toml\"]\n").unwrap();
        std::fs::write(&path, format!("[http]\ninclude = [\"seeds/http/nested.toml\"]\n{MINIMAL}")).unwrap();
        assert!(ClusterConfig::load(&path).unwrap_err().to_string().contains("http.include[0]"));
        std::fs::write(&path, format!("[http]\ninclude = [\"nope.toml\"]\n{MINIMAL}")).unwrap();
        assert!(ClusterConfig::load(&path).unwrap_err().to_string().contains("nope.toml"));
    }

    #[test]
    fn credential_paths_resolve_against_the_config_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.creds"), "x").unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, format!("[nats]\ncreds_file = \"node.creds\"\ntls_ca_file = \"ca.pem\"\n{MINIMAL}")).unwrap();
        let c = ClusterConfig::load(&path).unwrap();
        assert_eq!(c.nats.creds_file, dir.path().join("node.creds").display().to_string());
        // A client reads only the [nats] section: no models needed.
        std::fs::write(&path, "[nats]\nurl = \"nats://h:1\"\nprefix = \"acme\"\ntls_ca_file = \"ca.pem\"\n").unwrap();
        let n = ClusterConfig::load_nats(Some(&path)).unwrap();
        assert_eq!((n.url.as_str(), n.prefix.as_str()), ("nats://h:1", "acme"));
        assert!(n.tls() && n.tls_ca_file.starts_with('/'));
    }

    /// PROTOCOL: "Relative paths in `command` resolve against the config file's folder": a bare
    /// `worker.py` beside the config too, not only `./worker.py` (issue 23: it ran against the
    /// node's folder). The program word without a '/' stays a PATH lookup.
    #[test]
    fn worker_paths_in_a_command_resolve_against_the_config_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("worker.py"), "x").unwrap();
        std::fs::create_dir(dir.path().join("weights")).unwrap();
        let path = dir.path().join("cluster.toml");
        let model = r#"
[[models]]
name = "w"
engine = { kind = "process", command = ["python3", "worker.py", "--weights", "weights", "--mode", "fast", "./worker.py"] }
"#;
        std::fs::write(&path, model).unwrap();
        let c = ClusterConfig::load(&path).unwrap();
        let EngineConfig::Process { command, .. } = &c.models[0].engine else { panic!() };
        let folder = dir.path().canonicalize().unwrap();
        let at = |name: &str| folder.join(name).display().to_string();
        assert_eq!(
            command,
            &["python3".to_string(), at("worker.py"), "--weights".into(), at("weights"), "--mode".into(), "fast".into(), at("worker.py")]
        );
    }
}
