//! The gateway's own metrics: each request counted by its route's template (axum's
//! [`MatchedPath`]: `/v1/jobs/{id}`, never a job id), method and status, and its latency until
//! the response's head; the open SSE streams are counted where they are made
//! ([`super::events::sse_response`]). `GET /metrics` renders them with the rest of the
//! process's (a `kiln up` gateway shares its node's recorder).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_core::metrics as m;

use super::error::HttpError;

/// The `route` label of a request no route matched (a 404 of the fallback, a probe for
/// `/wp-admin`): one value, so scanners cannot grow the label set.
pub const UNMATCHED: &str = "unmatched";

/// The `method` label: the methods the gateway serves by name, the rest as `other` (bounded).
pub fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Middleware (a `Router::layer`, so it runs after routing and sees [`MatchedPath`]).
pub async fn track(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| UNMATCHED.to_string());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "route" => route.clone(), "method" => method).record(started.elapsed().as_secs_f64());
    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "method" => method, "status" => status).increment(1);
    response
}

/// `GET /metrics`: the process's Prometheus text.
pub async fn serve() -> Response {
    match crate::metrics::recorder() {
        Ok(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        Err(e) => HttpError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_a_bounded_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(method_label(&Method::PATCH), "other");
    }
}
