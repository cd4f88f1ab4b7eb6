//! The cluster registry that replaces the seeds' `gpu_status:{id}` keys: one KV key per GPU
//! slot (`kiln_gpus`, key `<node>.<slot-key>`) and one per node (`kiln_nodes`).
//!
//! Writers put each key with a per-message TTL (`Nats-TTL`, server 2.11+) and refresh it on
//! every heartbeat; a node that stops refreshing has its keys removed by the server, which
//! leaves a delete marker that every watcher sees. Readers drop entries whose heartbeat is older
//! than the TTL, so a reader never shows a dead node as alive even between the expiry and the
//! marker.
//!
//! Every node keeps a local [`RegistryCache`] of the *node* entries (a dashmap fed by a KV
//! watch): the loss detector needs every heartbeat. It does not watch the GPU entries: those
//! change with every job on every slot, so a watch on each node would cost the cluster
//! (slot changes) × (nodes) messages, growing with the square of its size. A node reads them
//! from the server when a request needs them ([`Resources::gpu_entries`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use dashmap::DashMap;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Resources, StoreError};
use crate::config::slot_key;
use crate::protocol::{GpuEntry, HeldJobs, NodeEntry};
use crate::task::{self, TaskGuard, TaskKind};

/// The key a survivor creates (once) to hand back the jobs of one life of a lost node.
pub fn lost_claim_key(node: &str, started_ms: u64) -> String {
    format!("_lost.{node}.{started_ms}")
}

impl Resources {
    pub fn gpu_key(node: &str, slot: &str) -> String {
        format!("{node}.{}", slot_key(slot))
    }

    async fn put_with_ttl<T: Serialize>(&self, bucket: &str, key: &str, value: &T, ttl: Duration) -> Result<(), StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        // The server reads whole seconds; round up so a short TTL is never zero (= forever).
        let ttl_s = ttl.as_millis().div_ceil(1000).max(1) as u64;
        headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl_s.to_string().as_str());
        let body = serde_json::to_vec(value).expect("registry entries serialize");
        self.js
            .publish_with_headers(format!("$KV.{bucket}.{key}"), headers, body.into())
            .await
            .map_err(StoreError::nats)?
            .await
            .map_err(StoreError::nats)?;
        Ok(())
    }

    pub async fn put_gpu(&self, entry: &GpuEntry) -> Result<(), StoreError> {
        self.put_with_ttl(&self.names.gpus_bucket(), &Self::gpu_key(&entry.node, &entry.slot), entry, self.registry_ttl).await
    }

    pub async fn put_node(&self, entry: &NodeEntry) -> Result<(), StoreError> {
        self.put_with_ttl(&self.names.nodes_bucket(), &entry.node, entry, self.registry_ttl).await
    }

    /// Writes the deliveries a node holds, refreshed with every heartbeat while it holds any.
    /// They outlive the node entry: kept for the ack wait (JetStream redelivers them by itself
    /// after it), so that a node restarted under the same name, however long after the crash
    /// within the ack wait, still finds its previous life's deliveries and hands them back.
    /// (With the registry TTL, a restart that watched its old entry for one TTL found them
    /// expired, `jobs=0`, and the job waited out the ack wait: issue 23 item 4.)
    pub async fn put_held(&self, held: &HeldJobs) -> Result<(), StoreError> {
        self.put_with_ttl(&self.names.held_bucket(), &held.node, held, self.registry_ttl.max(self.ack_wait)).await
    }

    /// The deliveries `node` holds, as it last wrote them (read from the server).
    pub async fn held_jobs(&self, node: &str) -> Result<Option<HeldJobs>, StoreError> {
        match self.held_kv.get(node).await.map_err(StoreError::nats)? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| StoreError::Decode(e.to_string())),
            None => Ok(None),
        }
    }

    /// Creates `key` in the nodes bucket only if absent, with the registry TTL: true for the
    /// one caller that created it. Several survivors notice a lost node; one acts.
    pub async fn claim_once(&self, key: &str) -> Result<bool, StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let ttl_s = (self.registry_ttl.as_millis().div_ceil(1000).max(1) * 10) as u64;
        headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl_s.to_string().as_str());
        let ack = self
            .js
            .publish_with_headers(format!("$KV.{}.{key}", self.names.nodes_bucket()), headers, "claimed".into())
            .await
            .map_err(StoreError::nats)?;
        Ok(ack.await.is_ok())
    }

    /// Whether a claim made with [`claim_once`](Self::claim_once) is still there.
    pub async fn claim_exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.nodes_kv.get(key).await.map_err(StoreError::nats)?.is_some())
    }

    /// A node's entry read from the server (not the watch-fed cache), if it exists.
    pub async fn node_entry_fresh(&self, node: &str) -> Result<Option<NodeEntry>, StoreError> {
        match self.nodes_kv.get(node).await.map_err(StoreError::nats)? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| StoreError::Decode(e.to_string())),
            None => Ok(None),
        }
    }

    pub async fn delete_node_entry(&self, node: &str) -> Result<(), StoreError> {
        self.nodes_kv.delete(node).await.map_err(StoreError::nats)
    }

    pub async fn delete_node_entries(&self, node: &str, slots: &[String]) -> Result<(), StoreError> {
        for slot in slots {
            self.gpus_kv.delete(Self::gpu_key(node, slot)).await.map_err(StoreError::nats)?;
        }
        self.held_kv.delete(node).await.map_err(StoreError::nats)?;
        self.nodes_kv.delete(node).await.map_err(StoreError::nats)?;
        Ok(())
    }

    /// Starts a watch-fed cache of the node entries. The cache fills with the current entries
    /// before this returns, then follows every change until the returned cache is dropped.
    pub async fn registry_cache(&self) -> Result<RegistryCache, StoreError> {
        let nodes = Arc::new(DashMap::new());
        let task = spawn_watch(self.nodes_kv.clone(), nodes.clone()).await?;
        Ok(RegistryCache { nodes, ttl: self.registry_ttl, _task: Arc::new(task) })
    }

    /// The GPU entries in the registry now, of one node or of all, sorted by node then slot,
    /// read from the server as one snapshot ([`last_per_subject`](Self::last_per_subject); a
    /// cluster of more than [`MULTI_LAST_MOST`] slots is read node by node). Entries whose
    /// heartbeat is older than the TTL (a dead node's, not yet removed) are left out unless
    /// `include_stale`.
    pub async fn gpu_entries(&self, node: Option<&str>, include_stale: bool) -> Result<Vec<GpuEntry>, StoreError> {
        let of = |node: Option<&str>| match node {
            Some(node) => format!("{}{node}.>", self.gpus_kv.prefix),
            None => format!("{}>", self.gpus_kv.prefix),
        };
        let stream = &self.gpus_kv.stream_name;
        let messages = match self.last_per_subject(stream, &of(node)).await? {
            Some(messages) => messages,
            None if node.is_none() => {
                let mut messages = vec![];
                for node in self.registered_node_names().await? {
                    let of_node = self.last_per_subject(stream, &of(Some(&node))).await?;
                    messages.extend(of_node.ok_or_else(|| StoreError::Nats(format!("node {node} has over {MULTI_LAST_MOST} slots")))?);
                }
                messages
            }
            None => return Err(StoreError::Nats(format!("node {} has over {MULTI_LAST_MOST} slots", node.unwrap_or_default()))),
        };
        let mut entries: Vec<GpuEntry> = messages.iter().filter_map(decode_kv_put).collect();
        let fresh = |g: &GpuEntry| crate::now_ms().saturating_sub(g.heartbeat_ms) <= self.registry_ttl.as_millis() as u64;
        entries.retain(|g| include_stale || fresh(g));
        entries.sort_by(|a, b| (&a.node, &a.slot).cmp(&(&b.node, &b.slot)));
        Ok(entries)
    }

    /// The names of the nodes with an entry in the registry now, read from the server.
    async fn registered_node_names(&self) -> Result<Vec<String>, StoreError> {
        let filter = format!("{}>", self.nodes_kv.prefix);
        let messages = self
            .last_per_subject(&self.nodes_kv.stream_name, &filter)
            .await?
            .ok_or_else(|| StoreError::Nats(format!("the registry has over {MULTI_LAST_MOST} nodes")))?;
        Ok(messages.iter().filter_map(decode_kv_put::<NodeEntry>).map(|n| n.node).collect())
    }

    /// The last message of each subject under `filter` in `stream`, as one point-in-time
    /// snapshot: a batched direct get (`multi_last`, [`super::direct`]; every KV stream allows
    /// direct gets). `None` when more than [`MULTI_LAST_MOST`] subjects match: the server
    /// answers no more at once (`413 Too Many Results`).
    ///
    /// Why not an ordered consumer over the last message per subject, read until its pending
    /// count says 0 (what this was): while keys were rewritten, that read now and then ended
    /// one key short (4 reads in 100 with two writers: `core/tests/store.rs`), and `models`
    /// once answered without a slot written a second before (tests/models_cluster.rs in CI).
    pub async fn last_per_subject(&self, stream: &str, filter: &str) -> Result<Option<Vec<async_nats::Message>>, StoreError> {
        self.direct_batch(stream, &serde_json::json!({ "multi_last": [filter] }), filter).await
    }
}

/// A KV message's value, unless it is a delete marker (or does not decode: logged).
fn decode_kv_put<T: DeserializeOwned>(message: &async_nats::Message) -> Option<T> {
    if message.headers.as_ref().and_then(|h| h.get("KV-Operation")).is_some_and(|op| op.as_str() != "PUT") {
        return None;
    }
    serde_json::from_slice(&message.payload)
        .map_err(|e| tracing::warn!(subject = %message.subject, error = %e, "undecodable registry entry"))
        .ok()
}

/// The most subjects one batched direct get answers (nats-server's limit).
pub const MULTI_LAST_MOST: usize = 1024;

/// Spawns a task that mirrors a KV bucket into `map`, returning once the initial values are in;
/// the task stops when its guard drops (with the last clone of the cache).
async fn spawn_watch<T: DeserializeOwned + Send + Sync + 'static>(
    store: kv::Store,
    map: Arc<DashMap<String, T>>,
) -> Result<TaskGuard<()>, StoreError> {
    let initial = store.status().await.map_err(StoreError::nats)?.values();
    let mut watch = store.watch_with_history(">").await.map_err(StoreError::nats)?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = task::spawn(TaskKind::OwnerLoop, "registry watch", async move {
        let mut ready_tx = Some(ready_tx);
        let mut seen = 0u64;
        if initial == 0 {
            let _ = ready_tx.take().map(|tx| tx.send(()));
        }
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { continue };
            // `_`-prefixed keys are bookkeeping (claims), not entries.
            if entry.key.starts_with('_') {
                seen += 1;
                continue;
            }
            match entry.operation {
                kv::Operation::Put => match serde_json::from_slice::<T>(&entry.value) {
                    Ok(v) => {
                        map.insert(entry.key.clone(), v);
                    }
                    Err(e) => tracing::warn!(key = %entry.key, error = %e, "undecodable registry entry"),
                },
                kv::Operation::Delete | kv::Operation::Purge => {
                    map.remove(&entry.key);
                }
            }
            seen += 1;
            if entry.delta == 0 || seen >= initial {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
    Ok(task)
}

/// A local, always-fresh view of the registry's node entries.
#[derive(Clone)]
pub struct RegistryCache {
    nodes: Arc<DashMap<String, NodeEntry>>,
    ttl: Duration,
    _task: Arc<TaskGuard<()>>,
}

impl RegistryCache {
    fn fresh(&self, heartbeat_ms: u64) -> bool {
        crate::now_ms().saturating_sub(heartbeat_ms) <= self.ttl.as_millis() as u64
    }

    pub fn nodes(&self) -> Vec<NodeEntry> {
        let mut v: Vec<NodeEntry> = self.nodes.iter().map(|e| e.value().clone()).filter(|n| self.fresh(n.heartbeat_ms)).collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Every node entry still in the bucket, fresh or not (the loss detector's view).
    pub fn nodes_including_stale(&self) -> Vec<NodeEntry> {
        self.nodes.iter().map(|e| e.value().clone()).collect()
    }

    pub fn node(&self, node: &str) -> Option<NodeEntry> {
        self.nodes.get(node).map(|e| e.value().clone()).filter(|n| self.fresh(n.heartbeat_ms))
    }
}
