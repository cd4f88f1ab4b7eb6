//! Objects in Kiln's JetStream object store (uploaded inputs, result artifacts), moved the
//! way every Kiln program moves them: streamed, with the sha256 and content type in each
//! object's metadata, whole or not at all. The layout is the object store's own, so any NATS
//! client reads what these write.

use std::collections::HashMap;

use async_nats::jetstream::object_store;
use sha2::{Digest, Sha256};

use crate::error::StoreError;

pub const META_SHA256: &str = "sha256";

pub const META_CONTENT_TYPE: &str = "content-type";

/// Guesses a content type from a file name; engines may name their own.
pub fn content_type_for(name: &str) -> &'static str {
    match name.rsplit('.').next().map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        Some("ppm") => "image/x-portable-pixmap",
        Some("json") => "application/json",
        Some("txt") => "text/plain",
        Some("ply") => "application/x-ply",
        Some("mp4") => "video/mp4",
        Some("wav") => "audio/wav",
        _ => "application/octet-stream",
    }
}

/// What [`put_stream`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub name: String,
    pub size: u64,
    /// Hex sha256 of the content (also in the object's metadata, as for every object Kiln
    /// stores).
    pub sha256: String,
    pub content_type: String,
}

/// Chunk size of streamed uploads: the object store's default.
const STREAM_CHUNK_BYTES: usize = 128 * 1024;

/// Objects up to this size are stored by [`put_new`] (one round trip); larger ones stream.
pub const ONE_SHOT_MAX_BYTES: u64 = 4 * STREAM_CHUNK_BYTES as u64;

/// Stores `data` as object `name`, a name nothing else writes (an attempt's artifact: the
/// attempt is in the name), in one round trip: every chunk and then the metadata are
/// published at once and their acks awaited together. The object store's own `put` reads the
/// old version's info, then waits for each chunk's ack and the metadata's, one after another:
/// three round trips for a small artifact, on every job's critical path.
///
/// Chunks and metadata go to the same stream on one connection, so the server stores them in
/// the order sent: the metadata that makes the object visible lands after its chunks. If any
/// publish fails, both the chunks and the metadata are purged: nothing refers to the name yet.
pub async fn put_new(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    name: &str,
    content_type: &str,
    data: &[u8],
) -> Result<StoredObject, StoreError> {
    if !kiln_contract::ids::is_valid_object_name(name) {
        return Err(StoreError::Decode(format!("object name {name:?} is invalid")));
    }
    let nuid = uuid::Uuid::new_v4().simple().to_string();
    let chunk_subject = format!("$O.{bucket}.C.{nuid}");
    let digest = Sha256::digest(data);
    let chunks = data.chunks(STREAM_CHUNK_BYTES);
    let count = chunks.len();
    let mut acks = Vec::with_capacity(count + 1);
    let published = async {
        for chunk in chunks {
            acks.push(js.publish(chunk_subject.clone(), bytes::Bytes::copy_from_slice(chunk)).await.map_err(StoreError::nats)?);
        }
        let (meta_subject, headers, body) = object_meta(bucket, name, content_type, &nuid, data.len() as u64, count, &digest)?;
        acks.push(js.publish_with_headers(meta_subject, headers, body).await.map_err(StoreError::nats)?);
        Ok::<_, StoreError>(())
    }
    .await;
    let mut outcome = published;
    for ack in acks {
        let stored = ack.await.map_err(StoreError::nats);
        if outcome.is_ok() {
            outcome = stored.map(|_| ());
        }
    }
    if let Err(e) = outcome {
        if let Ok(stream) = js.get_stream(format!("OBJ_{bucket}")).await {
            let _ = stream.purge().filter(&chunk_subject).await;
            let _ = stream.purge().filter(meta_subject_of(bucket, name)).await;
        }
        return Err(e);
    }
    Ok(StoredObject {
        name: name.to_string(),
        size: data.len() as u64,
        sha256: hex::encode(digest),
        content_type: content_type.to_string(),
    })
}

/// The subject of an object's metadata: `$O.<bucket>.M.<base64url(name)>`.
fn meta_subject_of(bucket: &str, name: &str) -> String {
    use base64::Engine;
    format!("$O.{bucket}.M.{}", base64::engine::general_purpose::URL_SAFE.encode(name))
}

/// The metadata message that makes an object visible, in the object store's own format (so
/// every NATS client reads it): its subject, the rollup header (it replaces an older
/// version's metadata) and the `ObjectInfo` body, carrying Kiln's sha256 and content type.
fn object_meta(
    bucket: &str,
    name: &str,
    content_type: &str,
    nuid: &str,
    size: u64,
    chunks: usize,
    digest: &[u8],
) -> Result<(String, async_nats::HeaderMap, bytes::Bytes), StoreError> {
    use base64::Engine;
    let info = object_store::ObjectInfo {
        name: name.to_string(),
        description: None,
        metadata: HashMap::from([
            (META_SHA256.to_string(), hex::encode(digest)),
            (META_CONTENT_TYPE.to_string(), content_type.to_string()),
        ]),
        headers: None,
        options: Some(object_store::ObjectOptions { link: None, max_chunk_size: Some(STREAM_CHUNK_BYTES) }),
        bucket: bucket.to_string(),
        nuid: nuid.to_string(),
        size: size as usize,
        chunks,
        modified: Some(time::OffsetDateTime::now_utc()),
        digest: Some(format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(digest))),
        deleted: false,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let body = serde_json::to_vec(&info).map_err(|e| StoreError::Decode(e.to_string()))?;
    Ok((meta_subject_of(bucket, name), headers, body.into()))
}

/// Chunks published before their acks are awaited: a large upload streams at the link's rate
/// instead of one round trip per chunk (the object store's own `put` waits for each ack).
const STREAM_ACKS_IN_FLIGHT: usize = 32;

/// Streams `data` into object store `bucket` as object `name`, computing its sha256 on the way,
/// without holding it in memory. The object appears whole or not at all: the metadata that
/// makes it visible is written last, and when anything fails first (the reader errs because
/// its HTTP client went away or passed the size limit, NATS fails) the chunks already stored
/// are purged. Replacing an object purges the old version's chunks after the new one is
/// visible, as the object store's own `put` does. The layout (chunks on
/// `$O.<bucket>.C.<nuid>`, a rolled-up `ObjectInfo` on `$O.<bucket>.M.<base64url(name)>`) is
/// the object store's, so every NATS client reads the object as usual.
pub async fn put_stream(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    name: &str,
    content_type: &str,
    data: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<StoredObject, StoreError> {
    use tokio::io::AsyncReadExt;
    if !kiln_contract::ids::is_valid_object_name(name) {
        return Err(StoreError::Decode(format!("object name {name:?} is invalid")));
    }
    let stream = js.get_stream(format!("OBJ_{bucket}")).await.map_err(StoreError::nats)?;
    let store = js.get_object_store(bucket).await.map_err(StoreError::nats)?;
    let previous = store.info(name).await.ok().filter(|i| !i.deleted);
    let nuid = uuid::Uuid::new_v4().simple().to_string();
    let chunk_subject = format!("$O.{bucket}.C.{nuid}");
    // Cleans up if this future is dropped before the object is whole (an HTTP server drops a
    // request's handler when its client goes away mid-upload); holds the acks in flight.
    let mut guard = Abandoned { stream: Some(stream.clone()), subject: chunk_subject.clone(), acks: Default::default() };
    let upload = async {
        let mut sha = Sha256::new();
        let (mut size, mut chunks) = (0u64, 0usize);
        loop {
            let mut chunk = bytes::BytesMut::with_capacity(STREAM_CHUNK_BYTES);
            while chunk.len() < STREAM_CHUNK_BYTES {
                if data.read_buf(&mut chunk).await? == 0 {
                    break;
                }
            }
            if chunk.is_empty() {
                break;
            }
            sha.update(&chunk);
            size += chunk.len() as u64;
            chunks += 1;
            let ack = js.publish(chunk_subject.clone(), chunk.freeze()).await.map_err(StoreError::nats)?;
            guard.acks.push_back(Box::pin(std::future::IntoFuture::into_future(ack)));
            if guard.acks.len() >= STREAM_ACKS_IN_FLIGHT {
                futures::StreamExt::next(&mut guard.acks).await.expect("not empty").map_err(StoreError::nats)?;
            }
        }
        while let Some(ack) = futures::StreamExt::next(&mut guard.acks).await {
            ack.map_err(StoreError::nats)?;
        }
        let digest = sha.finalize();
        let sha256 = hex::encode(digest);
        let (meta_subject, headers, body) = object_meta(bucket, name, content_type, &nuid, size, chunks, &digest)?;
        js.publish_with_headers(meta_subject, headers, body).await.map_err(StoreError::nats)?.await.map_err(StoreError::nats)?;
        Ok::<_, StoreError>(StoredObject { name: name.to_string(), size, sha256, content_type: content_type.to_string() })
    };
    match upload.await {
        Ok(stored) => {
            guard.stream = None;
            if let Some(old) = previous.filter(|p| p.nuid != nuid) {
                let _ = stream.purge().filter(format!("$O.{bucket}.C.{}", old.nuid)).await;
            }
            Ok(stored)
        }
        Err(e) => {
            // Nothing refers to these chunks: without the purge they would fill the bucket
            // until its TTL.
            guard.stream = None;
            purge_chunks(stream, chunk_subject, std::mem::take(&mut guard.acks)).await;
            Err(e)
        }
    }
}

/// A chunk publish whose ack has not come back yet.
type ChunkAck = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<async_nats::jetstream::publish::PublishAck, async_nats::jetstream::context::PublishError>>
            + Send,
    >,
>;

/// Purges an abandoned upload's chunks, once the publishes still in flight are stored: a purge
/// that overtook them would leave them behind (the server stores a publish and serves a purge
/// request on separate paths).
async fn purge_chunks(stream: async_nats::jetstream::stream::Stream, subject: String, mut acks: futures::stream::FuturesOrdered<ChunkAck>) {
    while futures::StreamExt::next(&mut acks).await.is_some() {}
    if let Err(e) = stream.purge().filter(&subject).await {
        tracing::warn!(subject, error = %e, "cannot purge the chunks of an abandoned upload");
    }
}

/// An upload in progress: if dropped while it still holds the stream, its chunks are purged
/// (after the acks in flight), by a task of its own.
struct Abandoned {
    stream: Option<async_nats::jetstream::stream::Stream>,
    subject: String,
    acks: futures::stream::FuturesOrdered<ChunkAck>,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let (Some(stream), Ok(runtime)) = (self.stream.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(purge_chunks(stream, std::mem::take(&mut self.subject), std::mem::take(&mut self.acks)));
        }
    }
}
