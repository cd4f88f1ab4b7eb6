//! Uploaded inputs (`kiln_files`) and result artifacts (`kiln_results_<model>`) in the
//! JetStream object store. Each bucket has a TTL (default 24 h: the seeds' temp-file API), and
//! every object Kiln stores carries its size, content type and sha256 in its metadata.

use std::path::Path;

use async_nats::jetstream::object_store;
use tokio::io::AsyncWriteExt;

use super::{Resources, StoreError};
// Moving objects is the client's: the node stores its artifacts the same way.
use crate::protocol::Artifact;
pub use kiln_client::objects::{content_type_for, put_new, put_stream, StoredObject, META_CONTENT_TYPE, META_SHA256, ONE_SHOT_MAX_BYTES};

pub use crate::keys::sha256_hex;

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
