//! Errors as the gateway answers them: an HTTP status and the NATS API's `{code, message}`
//! body. The status of each code is a pure function ([`http_status`]), so HTTP clients and NATS
//! clients branch on the same codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_core::protocol::{ApiError, ErrorCode};

use crate::client::ClientError;

/// An error body. `code` is one of the NATS API's codes, or one of the few that only HTTP has:
/// `unauthorized` (401), `method_not_allowed` (405), `range_not_satisfiable` (416),
/// `unavailable` (503: no node answered, NATS is away).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct HttpError {
    pub code: String,
    pub message: String,
    /// As the NATS API's: when to try again, in milliseconds (`quota_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Not in the body: the status it is sent with.
    #[serde(skip)]
    pub status: u16,
    /// Not in the body: seconds for `Retry-After`.
    #[serde(skip)]
    pub retry_after_s: Option<u32>,
    /// Not in Kiln's body: the request field the error is about, for a configured route's
    /// own error shape (`$field`, see `[[http.routes]] error`).
    #[serde(skip)]
    pub field: Option<String>,
}

/// The HTTP status of a NATS API error code.
pub fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::UnknownModel => StatusCode::NOT_FOUND,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        // Admission control: this client should slow down.
        ErrorCode::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        // Over its key's quota: this client (user) should slow down.
        ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::DeadlineExceeded => StatusCode::BAD_REQUEST,
        ErrorCode::Cancelled => StatusCode::CONFLICT,
        ErrorCode::EngineFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl HttpError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> HttpError {
        HttpError {
            code: code.to_string(),
            message: message.into(),
            retry_after_ms: None,
            status: status.as_u16(),
            retry_after_s: None,
            field: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// A `bad_request` about one request field (or multipart part).
    pub fn bad_field(field: &str, message: impl Into<String>) -> HttpError {
        HttpError { field: Some(field.to_string()), ..HttpError::bad_request(message) }
    }
    pub fn not_found(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn too_large(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    pub fn internal(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    /// NATS or every node is away for now: retry shortly.
    pub fn unavailable(message: impl Into<String>) -> HttpError {
        HttpError { retry_after_s: Some(1), ..HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message) }
    }
    pub fn unauthorized() -> HttpError {
        HttpError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid API key is needed: `Authorization: Bearer <key>`")
    }
}

/// `Retry-After` (whole seconds) for an error with `code` and `retry_after_ms`: the error's own
/// figure rounded up (at least 1: `Retry-After: 0` would invite an immediate retry), else 1 for
/// `overloaded`, else none.
pub fn retry_after_s(code: ErrorCode, retry_after_ms: Option<u64>) -> Option<u32> {
    match retry_after_ms {
        Some(ms) => Some(u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX).max(1)),
        None => (code == ErrorCode::Overloaded || code == ErrorCode::QuotaExceeded).then_some(1),
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> HttpError {
        let retry_after_s = retry_after_s(e.code, e.retry_after_ms);
        HttpError {
            code: e.code.as_str().to_string(),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
            status: http_status(e.code).as_u16(),
            retry_after_s,
            field: None,
        }
    }
}

impl From<ClientError> for HttpError {
    fn from(e: ClientError) -> HttpError {
        match e {
            ClientError::Api(api) => api.into(),
            ClientError::NoResponders(_) => HttpError::unavailable("no Kiln node answers on this gateway's NATS; retry shortly"),
            ClientError::Timeout(what) => HttpError {
                retry_after_s: Some(1),
                ..HttpError::new(StatusCode::GATEWAY_TIMEOUT, "unavailable", format!("{what} timed out"))
            },
            // NATS errors can name a server address; they say nothing secret (credentials are
            // never part of them), but keep the message short.
            ClientError::Nats(m) => HttpError::unavailable(format!("NATS: {m}")),
            ClientError::Decode(m) => HttpError::internal(format!("cannot decode Kiln's reply: {m}")),
            ClientError::Io(e) => HttpError::internal(format!("io: {e}")),
        }
    }
}

impl From<kiln_core::nats::StoreError> for HttpError {
    fn from(e: kiln_core::nats::StoreError) -> HttpError {
        match e {
            kiln_core::nats::StoreError::NotFound(what) => HttpError::not_found(format!("{what} not found")),
            kiln_core::nats::StoreError::Nats(m) => HttpError::unavailable(format!("NATS: {m}")),
            other => HttpError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.retry_after_s;
        let mut response = (status, axum::Json(self)).into_response();
        if let Some(s) = retry {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Turns an error that axum or a layer answered in plain text (a path that does not decode, a
/// timeout, a method not allowed) into the coded JSON body every other error has.
pub async fn coded_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "bad_request",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let message = if text.trim().is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text.trim().to_string() };
    let mut coded = HttpError::new(status, code, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            coded.headers_mut().insert(name.clone(), value.clone());
        }
    }
    coded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_the_status_the_docs_name() {
        let expected = [
            (ErrorCode::BadRequest, 400),
            (ErrorCode::UnknownModel, 404),
            (ErrorCode::NotFound, 404),
            (ErrorCode::PayloadTooLarge, 413),
            (ErrorCode::Overloaded, 429),
            (ErrorCode::QuotaExceeded, 429),
            (ErrorCode::DeadlineExceeded, 400),
            (ErrorCode::Cancelled, 409),
            (ErrorCode::EngineFailed, 502),
            (ErrorCode::Internal, 500),
        ];
        for (code, status) in expected {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
            let e: HttpError = ApiError::new(code, "m").into();
            assert_eq!(e.code, code.as_str());
            assert_eq!(e.retry_after_s.is_some(), matches!(code, ErrorCode::Overloaded | ErrorCode::QuotaExceeded));
        }
    }

    #[test]
    fn quota_exceeded_says_when_to_retry_in_whole_seconds_rounded_up() {
        let e: HttpError = ApiError::quota_exceeded("over", 1001).into();
        assert_eq!((e.status, e.retry_after_s, e.retry_after_ms), (429, Some(2), Some(1001)));
        assert_eq!(retry_after_s(ErrorCode::QuotaExceeded, Some(1000)), Some(1));
        assert_eq!(retry_after_s(ErrorCode::QuotaExceeded, Some(3)), Some(1), "never 0");
        assert_eq!(retry_after_s(ErrorCode::QuotaExceeded, Some(0)), Some(1));
        assert_eq!(retry_after_s(ErrorCode::NotFound, None), None);
        let body = serde_json::to_value(&e).unwrap();
        assert_eq!(body, serde_json::json!({"code": "quota_exceeded", "message": "over", "retry_after_ms": 1001}));
        let plain = serde_json::to_value(HttpError::not_found("x")).unwrap();
        assert!(plain.get("retry_after_ms").is_none(), "only where there is one");
    }
}
