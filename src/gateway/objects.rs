//! Files and artifacts over HTTP: uploads streamed into the files bucket (never held whole in
//! memory, never left half stored), downloads streamed out of the object store with
//! `Content-Type`, `Content-Length`, an `ETag` of the sha256 and single `Range`s.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{Stream, TryStreamExt};
use kiln_core::nats::objects::{content_type_for, put_stream, StoredObject, META_CONTENT_TYPE, META_SHA256};
use kiln_core::task::{self, TaskKind};
use tokio::io::AsyncReadExt;

use super::error::HttpError;

/// A byte range of an object, inclusive: what one `Range: bytes=...` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// A `Range` no byte of the object satisfies (416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses a `Range` header against an object of `size` bytes. `Ok(None)`: serve it whole (no
/// header, or one Kiln does not serve: several ranges, another unit, which RFC 9110 lets a
/// server ignore). `Err`: the range cannot be satisfied (416).
pub fn parse_range(value: Option<&str>, size: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let (first, last) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        // The last N bytes.
        let n: u64 = last.parse().map_err(|_| Unsatisfiable)?;
        if n == 0 || size == 0 {
            return Err(Unsatisfiable);
        }
        ByteRange { start: size.saturating_sub(n), end: size - 1 }
    } else {
        let start: u64 = first.parse().map_err(|_| Unsatisfiable)?;
        let end = if last.is_empty() {
            size.saturating_sub(1)
        } else {
            last.parse::<u64>().map_err(|_| Unsatisfiable)?.min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(Unsatisfiable);
        }
        ByteRange { start, end }
    };
    Ok(Some(range))
}

/// Bytes read from the object store per body frame of a download.
const DOWNLOAD_READ_BYTES: usize = 256 * 1024;

/// What a download serves: the object's size, type and digest from its metadata.
pub struct Download {
    pub object: async_nats::jetstream::object_store::Object,
    pub size: u64,
    pub content_type: String,
    pub sha256: String,
}

/// Opens object `name` of `bucket` for a download (`not_found` when missing or expired).
pub async fn open(js: &async_nats::jetstream::Context, bucket: &str, name: &str) -> Result<Download, HttpError> {
    let store = js.get_object_store(bucket).await.map_err(|e| HttpError::unavailable(format!("bucket {bucket}: {e}")))?;
    let object = match store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Err(HttpError::not_found(format!("object {name:?} does not exist (or has expired)")))
        }
        Err(e) => return Err(HttpError::unavailable(format!("object store: {e}"))),
    };
    let info = object.info();
    let meta = |k: &str| info.metadata.get(k).cloned();
    Ok(Download {
        size: info.size as u64,
        content_type: meta(META_CONTENT_TYPE).unwrap_or_else(|| content_type_for(name).to_string()),
        sha256: meta(META_SHA256).unwrap_or_default(),
        object,
    })
}

/// The response of a download: 304 for a matching `If-None-Match`, 206 for a `Range`, else 200
/// with the whole object, streamed.
pub async fn respond(mut download: Download, request: &HeaderMap, file_name: Option<&str>) -> Result<Response, HttpError> {
    let etag = format!("\"{}\"", download.sha256);
    if !download.sha256.is_empty() && request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(&etag)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let range = match parse_range(request.get(header::RANGE).and_then(|v| v.to_str().ok()), download.size) {
        Ok(r) => r,
        Err(Unsatisfiable) => {
            let mut e = HttpError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the object has {} bytes", download.size),
            )
            .into_response();
            e.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{}", download.size)).expect("ascii"));
            return Ok(e);
        }
    };
    let (status, start, len) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.end - r.start + 1),
        None => (StatusCode::OK, 0, download.size),
    };
    if start > 0 {
        // The object store reads from the first chunk: skip to the range's start.
        tokio::io::copy(&mut (&mut download.object).take(start), &mut tokio::io::sink())
            .await
            .map_err(|e| HttpError::unavailable(format!("object store: {e}")))?;
    }
    let body = Body::from_stream(read_ahead(download.object.take(len)));
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, download.content_type.as_str())
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes");
    if !download.sha256.is_empty() {
        response = response.header(header::ETAG, etag);
    }
    if let Some(r) = range {
        response = response.header(header::CONTENT_RANGE, format!("bytes {}-{}/{}", r.start, r.end, download.size));
    }
    if let Some(name) = file_name {
        let safe: String = name.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\').collect();
        response = response.header(header::CONTENT_DISPOSITION, format!("inline; filename=\"{safe}\""));
    }
    response.body(body).map_err(|e| HttpError::internal(e.to_string()))
}

/// Frames read from the object store before the client has taken them: reading the next
/// chunks overlaps with writing the last ones to the socket.
const DOWNLOAD_FRAMES_AHEAD: usize = 8;

/// The bytes of `reader` as a stream of frames, read by a task of its own up to
/// [`DOWNLOAD_FRAMES_AHEAD`] frames ahead of the consumer (large reads: the default 4 KiB would
/// make a frame, and a poll, of every 4 KiB). The task ends, dropping the reader, when the
/// stream is dropped (the client went away).
fn read_ahead(reader: impl tokio::io::AsyncRead + Send + Unpin + 'static) -> impl Stream<Item = std::io::Result<bytes::Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(DOWNLOAD_FRAMES_AHEAD);
    task::spawn(TaskKind::Feed, "download read-ahead", async move {
        let mut frames = tokio_util::io::ReaderStream::with_capacity(reader, DOWNLOAD_READ_BYTES);
        while let Some(frame) = futures::StreamExt::next(&mut frames).await {
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A body stream that fails once it has yielded more than `limit` bytes: an upload without a
/// `Content-Length` (or lying about it) is cut at the limit, and [`put_stream`] purges what it
/// stored.
pub struct Limited<S> {
    inner: S,
    seen: u64,
    limit: u64,
}

impl<S> Limited<S> {
    pub fn new(inner: S, limit: u64) -> Self {
        Limited { inner, seen: 0, limit }
    }
}

/// The error a [`Limited`] stream fails with.
pub const TOO_LARGE: &str = "upload larger than the limit";

impl<S, B, E> Stream for Limited<S>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    type Item = std::io::Result<B>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen += chunk.as_ref().len() as u64;
                if self.seen > self.limit {
                    return Poll::Ready(Some(Err(std::io::Error::other(TOO_LARGE))));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e.to_string())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Stores a request body (or a multipart part) as object `name` of `bucket`, at most `limit`
/// bytes. A client that goes away mid-upload, or sends more than the limit, leaves nothing.
pub async fn upload<S, B, E>(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    name: &str,
    content_type: &str,
    body: S,
    limit: u64,
) -> Result<StoredObject, HttpError>
where
    S: Stream<Item = Result<B, E>> + Unpin + Send,
    B: AsRef<[u8]> + Into<bytes::Bytes> + Send,
    E: std::fmt::Display,
{
    if !kiln_core::ids::is_valid_object_name(name) {
        return Err(HttpError::bad_request(format!(
            "file name {name:?} is invalid (letters, digits, '-', '_', '.', '/' separators; no '..' or empty segments)"
        )));
    }
    let limited = Limited::new(body, limit).map_ok(Into::into);
    let mut reader = tokio_util::io::StreamReader::new(limited);
    match put_stream(js, bucket, name, content_type, &mut reader).await {
        Ok(stored) => Ok(stored),
        Err(kiln_core::nats::StoreError::Io(e)) if e.to_string().contains(TOO_LARGE) => {
            Err(HttpError::too_large(format!("the file is larger than the limit of {limit} bytes (http.max_upload_bytes)")))
        }
        Err(kiln_core::nats::StoreError::Io(e)) => Err(HttpError::bad_request(format!("the upload was cut: {e}"))),
        Err(e) => Err(e.into()),
    }
}

/// The seeds' `file_type`: `image`, `audio`, `video` or `file`, from a content type.
pub fn file_kind(content_type: &str) -> &'static str {
    match content_type.split('/').next() {
        Some("image") => "image",
        Some("audio") => "audio",
        Some("video") => "video",
        _ => "file",
    }
}

/// A file name as a client sent it, reduced to what an object name may hold.
pub fn safe_file_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let cleaned = cleaned.trim_start_matches('.').to_string();
    if cleaned.is_empty() {
        "file".into()
    } else {
        cleaned.chars().take(128).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        let r = |s: &str, size| parse_range(Some(s), size);
        assert_eq!(r("bytes=0-9", 100), Ok(Some(ByteRange { start: 0, end: 9 })));
        assert_eq!(r("bytes=90-", 100), Ok(Some(ByteRange { start: 90, end: 99 })));
        assert_eq!(r("bytes=-10", 100), Ok(Some(ByteRange { start: 90, end: 99 })));
        assert_eq!(r("bytes=-1000", 100), Ok(Some(ByteRange { start: 0, end: 99 })));
        assert_eq!(r("bytes=50-1000", 100), Ok(Some(ByteRange { start: 50, end: 99 })));
        assert_eq!(r("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(r("bytes=9-3", 100), Err(Unsatisfiable));
        assert_eq!(r("bytes=x-3", 100), Err(Unsatisfiable));
        assert_eq!(r("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(r("items=0-1", 100), Ok(None));
        assert_eq!(parse_range(None, 100), Ok(None));
    }

    proptest::proptest! {
        /// Whatever the header, a range served lies inside the object and is never empty.
        #[test]
        fn a_served_range_lies_inside_the_object(a in 0u64..2000, b in 0u64..2000, size in 0u64..1500, form in 0u8..3) {
            let header = match form { 0 => format!("bytes={a}-{b}"), 1 => format!("bytes={a}-"), _ => format!("bytes=-{b}") };
            if let Ok(Some(r)) = parse_range(Some(&header), size) {
                proptest::prop_assert!(r.start <= r.end && r.end < size);
            }
        }
    }

    #[test]
    fn file_names_lose_their_paths_and_odd_characters() {
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name("C:\\x\\face photo.jpg"), "face_photo.jpg");
        assert_eq!(safe_file_name(".."), "file");
        assert_eq!(safe_file_name(""), "file");
    }
}
