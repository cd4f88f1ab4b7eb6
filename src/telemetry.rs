//! The process's logs and traces, set up once: the log filter (`KILN_LOG`, else `RUST_LOG`,
//! else the command's default), the log format (`text`, or `json` from `[log] format` or
//! `KILN_LOG_FORMAT`), and, when an OTLP endpoint is configured, OpenTelemetry spans exported
//! over OTLP/HTTP (protobuf) in batches. `kiln_core::telemetry` is the other half: how a job's
//! spans join its trace.
//!
//! Off (no endpoint), no OpenTelemetry layer is installed at all: the spans the runtime opens
//! are plain `tracing` spans, which the log filter disables below their level (a node at the
//! default `info` keeps them for its log lines' context). On, the OpenTelemetry layer has its
//! own filter (Kiln's `kiln.*` spans and `info` events), so `KILN_LOG=warn` quietens the logs
//! without losing the spans.

use std::time::Duration;

use kiln_core::config::{LogConfig, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Where the spans go, from the config and the environment: the config's endpoint (a base URL
/// gets `/v1/traces`), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (taken as it is, as the
/// OpenTelemetry spec says), else `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL). Returns the
/// traces URL and the base a worker is handed. Pure: the caller reads the variables.
pub fn traces_endpoint(config: &str, traces_var: Option<&str>, base_var: Option<&str>) -> Option<(String, String)> {
    let nonempty = |s: Option<&str>| s.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
    let with_path = |base: String| {
        let base = base.trim_end_matches('/').to_string();
        match base.strip_suffix("/v1/traces") {
            Some(root) => (base.clone(), root.to_string()),
            None => (format!("{base}/v1/traces"), base),
        }
    };
    if let Some(c) = nonempty(Some(config)) {
        return Some(with_path(c));
    }
    if let Some(t) = nonempty(traces_var) {
        let root = t.trim_end_matches('/').strip_suffix("/v1/traces").unwrap_or(&t).to_string();
        return Some((t, root));
    }
    nonempty(base_var).map(with_path)
}

/// The log filter: `KILN_LOG` (Kiln's own, as before), else `RUST_LOG`, else `default`. A value
/// that does not parse falls back to the next.
pub fn log_filter(kiln_log: Option<&str>, rust_log: Option<&str>, default: &str) -> EnvFilter {
    [kiln_log, rust_log]
        .into_iter()
        .flatten()
        .filter(|v| !v.trim().is_empty())
        .find_map(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(default))
}

/// Whether the lines are JSON: `KILN_LOG_FORMAT` if set, else `[log] format`.
pub fn json_logs(var: Option<&str>, config: &LogConfig) -> bool {
    var.map(str::trim).filter(|v| !v.is_empty()).unwrap_or(&config.format) == "json"
}

/// Held for the process's life: flushes the spans still in the batch on [`Telemetry::shutdown`]
/// or drop (a stop signal's drain ends with it, so the last jobs' spans are not lost).
#[must_use = "dropping it stops the span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still batched and stops the exporter (at most a few seconds).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            // On a thread of its own: the exporter's blocking HTTP client must not be dropped
            // on an async runtime's thread (it owns a runtime of its own).
            let done = std::thread::spawn(move || {
                let _ = provider.force_flush();
                let _ = provider.shutdown_with_timeout(Duration::from_secs(5));
            });
            let _ = done.join();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the process's subscriber. `default` is the filter without `KILN_LOG`/`RUST_LOG`.
/// An OTLP endpoint that cannot be set up is reported and the process runs without export.
pub fn init(default: &str, log: &LogConfig, telemetry: &TelemetryConfig) -> Telemetry {
    let var = |name: &str| std::env::var(name).ok();
    let filter = log_filter(var("KILN_LOG").as_deref(), var("RUST_LOG").as_deref(), default);
    // Colours only for a person at a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = if json_logs(var("KILN_LOG_FORMAT").as_deref(), log) {
        // One object per line, the event's fields at the top, and the fields of every span it
        // happened in (`job_id`, `attempt`, `trace_id` of `kiln.job`...) in `spans`.
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi).with_writer(std::io::stderr).with_filter(filter).boxed()
    };
    let endpoint = traces_endpoint(
        &telemetry.otlp_endpoint,
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").as_deref(),
        var("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
    );
    let service = [Some(telemetry.service_name.clone()), var("OTEL_SERVICE_NAME")]
        .into_iter()
        .flatten()
        .find(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "kiln".to_string());
    let (provider, error) = match endpoint.as_ref().map(|(url, _)| build_provider(url, &service)) {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(kiln_core::telemetry::TRACER)).with_filter(filter_fn(exported)));
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
        let (url, base) = endpoint.expect("a provider has an endpoint");
        kiln_core::telemetry::set_exporting(Some(base));
        tracing::info!(endpoint = %url, service = %service, "exporting spans over OTLP/HTTP");
    }
    if let Some(e) = error {
        tracing::warn!(error = %e, "cannot set up the OTLP exporter; no spans are exported");
    }
    Telemetry { provider }
}

/// What the OpenTelemetry layer sees: Kiln's own spans (`kiln.*`), not the libraries' (ractor
/// opens an `Actor` span per actor, a job actor's included: exported, each would be a trace of
/// its own per job), and the `info` events inside them (as span events).
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    if meta.is_span() {
        meta.name().starts_with("kiln.")
    } else {
        *meta.level() <= tracing::Level::INFO
    }
}

fn build_provider(url: &str, service: &str) -> Result<SdkTracerProvider, String> {
    let (url, service) = (url.to_string(), service.to_string());
    // Built on a thread of its own: the blocking HTTP client may not be made (nor dropped)
    // on an async runtime's thread.
    std::thread::spawn(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .map_err(|e| e.to_string())?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    })
    .join()
    .map_err(|_| "the exporter's setup panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_config_wins_then_the_traces_variable_then_the_base_one() {
        let t = |c, tv, bv| traces_endpoint(c, tv, bv);
        assert_eq!(t("", None, None), None);
        assert_eq!(t("  ", Some(""), Some(" ")), None);
        assert_eq!(
            t("http://c:4318", Some("http://t/x"), Some("http://b")),
            Some(("http://c:4318/v1/traces".into(), "http://c:4318".into()))
        );
        assert_eq!(t("http://c:4318/v1/traces", None, None), Some(("http://c:4318/v1/traces".into(), "http://c:4318".into())));
        assert_eq!(t("", Some("http://t/custom"), Some("http://b")), Some(("http://t/custom".into(), "http://t/custom".into())));
        assert_eq!(t("", None, Some("http://b:4318/")), Some(("http://b:4318/v1/traces".into(), "http://b:4318".into())));
    }

    #[test]
    fn kiln_log_wins_over_rust_log_and_a_bad_one_falls_through() {
        assert_eq!(log_filter(Some("debug"), Some("error"), "info").to_string(), "debug");
        assert_eq!(log_filter(None, Some("error"), "info").to_string(), "error");
        assert_eq!(log_filter(Some(""), None, "warn").to_string(), "warn");
        assert_eq!(log_filter(Some("[bad"), Some("error"), "info").to_string(), "error");
    }

    #[test]
    fn the_variable_decides_the_format_over_the_config() {
        let json = LogConfig { format: "json".into() };
        assert!(json_logs(None, &json));
        assert!(!json_logs(Some("text"), &json));
        assert!(json_logs(Some("json"), &LogConfig::default()));
        assert!(!json_logs(None, &LogConfig::default()));
    }

    proptest! {
        /// Whatever the inputs, a traces URL ends where the spans go and its base is a prefix.
        #[test]
        fn an_endpoint_is_a_traces_url_over_its_base(c in "(http://h(:[0-9]{1,4})?(/v1/traces)?/?)?", b in proptest::option::of("http://b(/v1/traces)?")) {
            if let Some((url, base)) = traces_endpoint(&c, None, b.as_deref()) {
                prop_assert!(url.ends_with("/v1/traces"));
                prop_assert!(url.starts_with(&base));
                prop_assert!(!base.ends_with("/v1/traces"));
            } else {
                prop_assert!(c.is_empty() && b.is_none());
            }
        }
    }
}
