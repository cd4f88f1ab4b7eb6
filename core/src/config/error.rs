//! The one error of loading a configuration: a file that cannot be read, TOML that does not
//! parse (or names an unknown key), a value that `validate()` refuses, named by its key and,
//! once the layers are merged, by the file, variable or flag that set it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file `KILN_CONFIG` names cannot be read.
    #[error("cannot read config {path} (named by KILN_CONFIG): {source}")]
    ReadNamedByEnv { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config: `{key}` {reason}")]
    Invalid { key: String, reason: String },
    /// A value refused, named by the layer that set it: the file (its path), the variable
    /// (`KILN_NODE__SLOTS`) or the flag (`--slots`).
    #[error("invalid config: {origin}: `{key}` {reason}")]
    Sourced { origin: String, key: String, reason: String },
    #[error("{name} is not a configuration variable: no key `{key}` (KILN_<SECTION>__<KEY> names a key of cluster.toml)")]
    UnknownVariable { name: String, key: String },
}

pub(super) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}
