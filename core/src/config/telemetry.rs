//! `[telemetry]` (OpenTelemetry traces over OTLP) and `[log]` (the log lines' format). Both are
//! read once, when the process sets up its tracing (`kiln::telemetry`); the standard
//! OpenTelemetry variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`) and
//! `KILN_LOG_FORMAT` are read there too, beside these keys.

use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};

/// OpenTelemetry traces. Off unless an endpoint is set here or in `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); off, nothing beyond the log layer is installed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP (protobuf) collector, as `OTEL_EXPORTER_OTLP_ENDPOINT` reads:
    /// `http://collector:4318` (spans go to its `/v1/traces`), or a URL that already ends in
    /// `/v1/traces`. Empty: the variables decide, and without them no spans are exported.
    pub otlp_endpoint: String,
    /// The spans' `service.name`; empty: `OTEL_SERVICE_NAME`, else `kiln`.
    pub service_name: String,
}

/// The format of the log lines on stderr.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (the default: one readable line per event) or `json` (one JSON object per line,
    /// with the fields of the spans it happened in: `job_id`, `trace_id`...).
    /// `KILN_LOG_FORMAT` overrides it.
    pub format: String,
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = self.otlp_endpoint.trim();
        if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
            return Err(invalid("telemetry.otlp_endpoint", "must be an http:// or https:// URL (OTLP over HTTP)"));
        }
        Ok(())
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.format.as_str(), "" | "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        Ok(())
    }
}
