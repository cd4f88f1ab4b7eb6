//! Every HTTP request in a span of its own, `kiln.http` (`method`, `path`, `request_id`): its
//! log lines carry them (the JSON lines' `spans`), and with span export on it is the gateway's
//! span in the caller's W3C trace (`traceparent` header), the parent of what the nodes do for
//! the request (a submit's `kiln.submit`). The request id is the client's `x-request-id` when
//! it sends a sane one, else a new one; the response carries it back in `x-request-id`.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use kiln_core::telemetry::{self, TraceContext, TRACEPARENT, TRACESTATE};
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

/// A client's request id if it is 1 to 128 visible ASCII characters; otherwise none (a new one
/// is made): it goes into log lines and a response header as it is.
pub fn client_request_id(value: Option<&str>) -> Option<&str> {
    value.filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|c| c.is_ascii_graphic()))
}

pub async fn layer(mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let request_id = client_request_id(get(REQUEST_ID)).map(str::to_string).unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let trace = TraceContext::from_headers(get(TRACEPARENT), get(TRACESTATE));
    let span = tracing::info_span!("kiln.http", method = %request.method(), path = %request.uri().path(), request_id = %request_id);
    telemetry::set_parent(&span, trace.as_ref());
    // What a handler forwards to the nodes: this span's context when exporting, else the
    // caller's as it came (see `v1::submit`).
    let forward = telemetry::context_of(&span, trace.as_ref().and_then(|t| t.tracestate.clone())).or(trace);
    if let Some(forward) = forward {
        request.extensions_mut().insert(Forward(forward));
    }
    let mut response = next.run(request).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// The trace context a handler hands on to the nodes (in the NATS request's headers).
#[derive(Clone, Debug)]
pub struct Forward(pub TraceContext);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_client_request_id_is_kept_and_any_other_replaced() {
        assert_eq!(client_request_id(Some("req-42")), Some("req-42"));
        assert_eq!(client_request_id(Some("")), None);
        assert_eq!(client_request_id(Some("a b")), None);
        assert_eq!(client_request_id(Some(&"x".repeat(129))), None);
        assert_eq!(client_request_id(Some("é")), None);
        assert_eq!(client_request_id(None), None);
    }
}
