//! Uploaded inputs (`kiln_files`) and result artifacts (`kiln_results_<model>`) in the
//! JetStream object store. Each bucket has a TTL (default 24 h: the seeds' temp-file API), and
//! every object Kiln stores carries its size, content type and sha256 in its metadata.

use std::collections::HashMap;
use std::path::Path;

use async_nats::jetstream::object_store;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{Resources, StoreError};
use crate::protocol::Artifact;

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

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The object name of one attempt's artifact: `<job_id>/<attempt>/<name>`.
pub fn artifact_object(job_id: &str, attempt: u32, name: &str) -> String {
    format!("{job_id}/{attempt}/{name}")
}

impl Resources {
    fn results_store(&self, model: &str) -> Result<object_store::ObjectStore, StoreError> {
        self.results.get(model).map(|s| s.clone()).ok_or_else(|| StoreError::NotFound(format!("results bucket of model {model}")))
    }

    /// Stores a result file of one attempt as `<job_id>/<attempt>/<name>` in the model's
    /// results bucket. Each attempt writes only its own names: an older attempt fenced out
    /// (its node stopped, the job handed to another) that resumes late can never replace the
    /// objects the record of the finished job points to. An outside storm saw that happen
    /// when every attempt wrote `<job_id>/<name>`.
    pub async fn store_artifact(
        &self,
        model: &str,
        job_id: &str,
        attempt: u32,
        name: &str,
        path: &Path,
        content_type: Option<&str>,
    ) -> Result<Artifact, StoreError> {
        let content_type = content_type.unwrap_or_else(|| content_type_for(name));
        let bucket = self.names.results_bucket(model);
        let object = artifact_object(job_id, attempt, name);
        // A small file is read whole in one trip to the blocking pool; a large one streams.
        let small = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<Vec<u8>>> {
                if std::fs::metadata(&path)?.len() <= ONE_SHOT_MAX_BYTES {
                    Ok(Some(std::fs::read(&path)?))
                } else {
                    Ok(None)
                }
            })
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))??
        };
        let stored = match small {
            Some(data) => put_new(&self.js, &bucket, &object, content_type, &data).await?,
            // Large outputs stream from the file, never whole in memory.
            None => put_stream(&self.js, &bucket, &object, content_type, &mut tokio::fs::File::open(path).await?).await?,
        };
        Ok(Artifact { name: name.to_string(), bucket, object, size: stored.size, content_type: stored.content_type, sha256: stored.sha256 })
    }

    /// Removes an artifact a fenced attempt stored: no record or event refers to it.
    pub async fn delete_artifact(&self, model: &str, artifact: &Artifact) -> Result<(), StoreError> {
        self.results_store(model)?.delete(&artifact.object).await.map_err(StoreError::nats)
    }

    /// Size and content digest (the object store's `SHA-256=...`) of an uploaded input, or
    /// `NotFound` (missing, or expired).
    pub async fn file_info(&self, name: &str) -> Result<(u64, String), StoreError> {
        match self.files.info(name).await {
            Ok(info) if !info.deleted => Ok((info.size as u64, info.digest.unwrap_or_default())),
            Ok(_) => Err(StoreError::NotFound(format!("object {name:?}"))),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Err(StoreError::NotFound(format!("object {name:?}"))),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    /// Downloads an uploaded input to `dest`.
    pub async fn download_file(&self, name: &str, dest: &Path) -> Result<u64, StoreError> {
        download(&self.files, name, dest).await
    }
}

async fn download(store: &object_store::ObjectStore, name: &str, dest: &Path) -> Result<u64, StoreError> {
    let mut object = match store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Err(StoreError::NotFound(format!("object {name:?}"))),
        Err(e) => return Err(StoreError::nats(e)),
    };
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut file = tokio::fs::File::create(dest).await?;
    let n = tokio::io::copy(&mut object, &mut file).await?;
    file.flush().await?;
    Ok(n)
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
const ONE_SHOT_MAX_BYTES: u64 = 4 * STREAM_CHUNK_BYTES as u64;

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
    if !crate::ids::is_valid_object_name(name) {
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
    if !crate::ids::is_valid_object_name(name) {
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
            let purge = purge_chunks(stream, std::mem::take(&mut self.subject), std::mem::take(&mut self.acks));
            crate::task::spawn_on(&runtime, crate::task::TaskKind::Cleanup, "purge abandoned chunks", purge);
        }
    }
}
