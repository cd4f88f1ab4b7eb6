//! A job's spans in its W3C trace: the glue between `tracing` spans (what the runtime's code
//! opens), the job's [`TraceContext`] (what the record keeps and the worker is handed) and
//! OpenTelemetry (what is exported). The process sets up the export once (the binary's
//! `kiln::telemetry::init`) and says so here with [`set_exporting`]; until then, and in every
//! process that exports nothing, each function here is a check of one flag and returns: the
//! spans stay plain `tracing` spans (cheap, or disabled by the log filter) and a job's trace
//! is only carried, never extended.
//!
//! The spans of a job (docs/PROTOCOL.md, "Traces"):
//!
//! ```text
//! caller's span (traceparent header, HTTP or NATS; none: the submit starts the trace)
//! └── (kiln.http                      the gateway's, for a request over HTTP)
//!     kiln.submit                     the API node; its context is the record's `trace`
//!                                     (kiln.submit_batch / kiln.retry_batch: every item's job)
//!     ├── kiln.queue_wait             created -> claimed (made afterwards: past_span)
//!     └── kiln.job                    one per attempt, on the node that runs it
//!         ├── kiln.claim              (past_span)
//!         ├── kiln.inputs
//!         ├── kiln.run                the engine; its traceparent is the worker's
//!         │   └── (the worker's own spans: the SDK's `kiln.worker.run`, ...)
//!         ├── kiln.stage (one per stage)
//!         ├── kiln.artifacts
//!         └── kiln.terminal_write
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer};
pub use opentelemetry::KeyValue;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use kiln_contract::trace::{TraceContext, TraceParent, TRACEPARENT, TRACEPARENT_ENV, TRACESTATE};

/// The name of the tracer (the instrumentation scope) of every span Kiln makes.
pub const TRACER: &str = "kiln";

static EXPORTING: AtomicBool = AtomicBool::new(false);
static WORKER_ENDPOINT: OnceLock<String> = OnceLock::new();

/// Called once by the process's telemetry setup when spans are exported, with the collector's
/// base URL as `OTEL_EXPORTER_OTLP_ENDPOINT` reads it (handed to process workers that have none).
pub fn set_exporting(worker_endpoint: Option<String>) {
    if let Some(e) = worker_endpoint {
        let _ = WORKER_ENDPOINT.set(e);
    }
    EXPORTING.store(true, Ordering::Release);
}

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// The collector a process worker should export its own spans to, when this node exports.
pub fn worker_endpoint() -> Option<&'static str> {
    exporting().then(|| WORKER_ENDPOINT.get().map(String::as_str)).flatten()
}

/// The OpenTelemetry context of a job's trace: a remote parent span.
pub fn remote_context(trace: &TraceContext) -> Option<opentelemetry::Context> {
    let p = trace.parent()?;
    let state = trace.tracestate.as_deref().and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
    let span = SpanContext::new(TraceId::from_bytes(p.trace_id), SpanId::from_bytes(p.span_id), TraceFlags::new(p.flags), true, state);
    Some(opentelemetry::Context::new().with_remote_span_context(span))
}

/// Makes `span` a child of the job's trace (a no-op unless exporting). Called before the span
/// is first entered: its context is built then.
pub fn set_parent(span: &tracing::Span, trace: Option<&TraceContext>) {
    if !exporting() {
        return;
    }
    if let Some(cx) = trace.and_then(remote_context) {
        let _ = span.set_parent(cx);
    }
}

/// `span`'s own context as a `traceparent` (with `tracestate` kept from the job), when this
/// process exports and the span is recorded; `None` otherwise.
pub fn context_of(span: &tracing::Span, tracestate: Option<String>) -> Option<TraceContext> {
    if !exporting() {
        return None;
    }
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if !sc.is_valid() {
        return None;
    }
    let parent = TraceParent { trace_id: sc.trace_id().to_bytes(), span_id: sc.span_id().to_bytes(), flags: sc.trace_flags().to_u8() };
    Some(TraceContext { traceparent: parent.to_string(), tracestate })
}

/// The trace a submitted job keeps: its submit span's context when this process exports
/// spans; otherwise the caller's as it came, or a fresh trace, so that a job always has a
/// trace id (its logs and its worker name it) and a node that exports resumes it.
pub fn submitted_trace(submit_span: &tracing::Span, incoming: Option<TraceContext>) -> TraceContext {
    let tracestate = incoming.as_ref().and_then(|t| t.tracestate.clone());
    context_of(submit_span, tracestate)
        .or(incoming)
        .unwrap_or_else(|| TraceContext { traceparent: TraceParent::fresh().to_string(), tracestate: None })
}

/// The trace id of a job's trace in hex, for the spans' `trace_id` field ("" without one).
pub fn trace_id(trace: Option<&TraceContext>) -> String {
    trace.and_then(TraceContext::trace_id).unwrap_or_default()
}

/// A span already over, made once its start and end are known (the queue wait, learnt at the
/// claim): `tracing` spans start when they are made. A no-op unless exporting.
pub fn past_span(name: &'static str, parent: &opentelemetry::Context, start: SystemTime, end: SystemTime, attributes: Vec<KeyValue>) {
    if !exporting() {
        return;
    }
    let tracer = opentelemetry::global::tracer(TRACER);
    let mut span = tracer.span_builder(name).with_start_time(start).with_attributes(attributes).start_with_context(&tracer, parent);
    opentelemetry::trace::Span::end_with_timestamp(&mut span, end.max(start));
}

/// The OpenTelemetry context of a `tracing` span, for [`past_span`]'s parent.
pub fn otel_context(span: &tracing::Span) -> opentelemetry::Context {
    span.context()
}

/// Unix milliseconds as a [`SystemTime`].
pub fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_context_keeps_the_ids_flags_and_state() {
        let t = TraceContext::from_headers(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), Some("k=v")).unwrap();
        let cx = remote_context(&t).unwrap();
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format!("{}", sc.trace_id()), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(format!("{}", sc.span_id()), "00f067aa0ba902b7");
        assert_eq!(sc.trace_state().get("k"), Some("v"));
    }

    #[test]
    fn without_export_a_submit_keeps_the_callers_trace_or_starts_one() {
        let span = tracing::Span::none();
        let t = TraceContext::from_headers(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), None).unwrap();
        assert_eq!(submitted_trace(&span, Some(t.clone())), t);
        let fresh = submitted_trace(&span, None);
        assert!(fresh.parent().is_some());
        assert_eq!(trace_id(Some(&t)), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id(None), "");
    }
}
