//! What every handler shares: parsing a request body, encoding a reply, and the errors that
//! several endpoints answer with. A leaf: the handlers' files and the service loop use it, it
//! uses neither.

use kiln_core::protocol::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A handler's answer: the JSON body of a success, or a coded error.
pub type Reply = Result<Vec<u8>, ApiError>;

/// The largest message the server takes, as it announces it (`max_payload`); 0, not announced,
/// is the server's default of 1 MiB.
pub fn max_payload(announced: usize) -> usize {
    match announced {
        0 => 1024 * 1024,
        n => n,
    }
}

pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde_json's recursion limit (128) bounds the parse of hostile nesting; deeper is refused.
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed request: {e}")))
}

/// For the endpoints whose every field is optional: an empty body is the defaults.
pub fn parse_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(body)
}

pub fn encode<T: Serialize>(value: T) -> Reply {
    Ok(serde_json::to_vec(&value).expect("replies serialize"))
}

/// A reply larger than the server's `max_payload` (a listing of many big records) could not be
/// delivered, so the client gets `payload_too_large` instead of a timeout.
pub fn bound_reply(reply: Reply, max_reply: usize) -> Reply {
    match reply {
        Ok(body) if body.len() > max_reply => Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the reply would be {} bytes, over the server's limit of {max_reply}; ask for less (a smaller limit)", body.len()),
        )),
        other => other,
    }
}

pub fn job_not_found(job_id: &str) -> ApiError {
    ApiError::not_found(format!("no job {job_id:?} (never submitted, or expired)"))
}

pub fn batch_not_found(batch_id: &str) -> ApiError {
    ApiError::not_found(format!("no batch {batch_id:?} (never submitted, or expired)"))
}

/// A store failure: logged here, answered `internal` (the client may retry).
pub fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "internal error serving a request");
    ApiError::internal(format!("internal error: {e}"))
}
