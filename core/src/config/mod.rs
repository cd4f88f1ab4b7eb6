//! Typed configuration in layers: the defaults, then `cluster.toml`, then the environment
//! (`KILN_<SECTION>__<KEY>`), then the command's flags, validated once after all of them by
//! [`ClusterConfig::validate`] (see `layers.rs` for the rules).
//!
//! Every field has a documented default so the shortest useful file names only the models.
//! Unknown keys are refused (`deny_unknown_fields`) so a typo fails at start instead of being
//! silently ignored; validation errors name the key (`models[1].timeout_ms`).
//!
//! | file            | what                                                                      |
//! |-----------------|---------------------------------------------------------------------------|
//! | `connection.rs` | `[nats]` (URLs, credentials, TLS, replicas, prefix), `[cluster]` (the link) |
//! | `node.rs`       | `[node]` and its slots, `[limits]`, `[storage]`, `[retry]`, `[restart]`, `[compression]`, `[autoscale]`, `[fair_share]`, `[quota]` |
//! | `models.rs`     | `[[models]]`: engines (process, torchscript and its specs, noop), stages    |
//! | [`http`]        | `[http]`: the gateway's address, limits, API keys, seed routes            |
//! | `webhooks.rs`   | `[webhooks]`: the job webhooks' secret, retry, address refusal, `[[webhooks.endpoints]]` per model |
//! | `telemetry.rs`  | `[telemetry]` (OTLP traces: endpoint, service name), `[log]` (text or JSON lines) |
//! | `load.rs`       | [`ClusterConfig`], the whole configuration: includes, paths, `validate()` |
//! | `layers.rs`     | [`Layers`]: defaults < file < environment < flags merged (figment), the env mapping, each value's source; `ClusterConfig::load_layers` |
//! | `error.rs`      | [`ConfigError`], naming the key at fault and the layer that set it        |
//!
//! Every public name is re-exported here (`kiln_core::config::NatsConfig`), and `http` is also
//! `kiln_core::http`. The files import each other (each through `super::<file>`), never this
//! root, and nothing here imports the engines: they take their settings from configuration,
//! not the other way round, so configuration builds without them.

mod connection;
mod error;
pub mod http;
mod layers;
mod load;
mod models;
mod node;
mod telemetry;
mod webhooks;

pub use connection::{ClusterLink, NatsAuth, NatsConfig, NatsRules};
pub use error::ConfigError;
pub use layers::{choose_file, variable_of_key, Flag, Layers, ALIASES, CONFIG_VAR, DEFAULT_FILE};
pub use load::ClusterConfig;
pub use models::{EngineConfig, InputKind, InputSpec, ModelConfig, OutputCodec, OutputSpec, ParamKind, ParamSpec, StageConfig, NO_TORCH};
pub use node::{
    parse_slot, slot_key, AutoscaleConfig, CompressionConfig, FairShareConfig, KeyQuota, Limits, NodeConfig, QuotaConfig, QuotaOverride,
    RestartPolicy, RetryPolicy, SlotDevice, StorageConfig,
};
pub use telemetry::{LogConfig, TelemetryConfig};
pub use webhooks::{WebhookEndpoint, WebhooksConfig};
