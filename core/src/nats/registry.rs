//! The cluster registry that replaces the seeds' `gpu_status:{id}` keys: one KV key per GPU
//! slot (`kiln_gpus`, key `<node>.<slot-key>`) and one per node (`kiln_nodes`).
//!
//! Writers put each key with a per-message TTL (`Nats-TTL`, server 2.11+) and refresh it on
//! every heartbeat; a node that stops refreshing has its keys removed by the server, which
//! leaves a delete marker that every watcher sees. Readers keep a local [`RegistryCache`] (a
//! dashmap fed by a KV watch) and also drop entries whose heartbeat is older than the TTL, so a
//! reader never shows a dead node as alive even between the expiry and the marker.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use dashmap::DashMap;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Resources, StoreError};
use crate::config::slot_key;
use crate::protocol::{GpuEntry, NodeEntry};

/// The key a survivor creates (once) to hand back the jobs of one life of a lost node.
pub fn lost_claim_key(node: &str, started_ms: u64) -> String {
    format!("_lost.{node}.{started_ms}")
}

impl Resources {
    pub fn gpu_key(node: &str, slot: &str) -> String {
        format!("{node}.{}", slot_key(slot))
    }

    async fn put_with_ttl<T: Serialize>(&self, bucket: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        // The server reads whole seconds; round up so a short TTL is never zero (= forever).
        let ttl_s = self.registry_ttl.as_millis().div_ceil(1000).max(1) as u64;
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
        self.put_with_ttl(&self.names.gpus_bucket(), &Self::gpu_key(&entry.node, &entry.slot), entry).await
    }

    pub async fn put_node(&self, entry: &NodeEntry) -> Result<(), StoreError> {
        self.put_with_ttl(&self.names.nodes_bucket(), &entry.node, entry).await
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
        self.nodes_kv.delete(node).await.map_err(StoreError::nats)?;
        Ok(())
    }

    /// Starts a watch-fed cache of the registry. The cache fills with the current entries
    /// before this returns, then follows every change until the returned cache is dropped.
    pub async fn registry_cache(&self) -> Result<RegistryCache, StoreError> {
        let cache = RegistryCache {
            gpus: Arc::new(DashMap::new()),
            nodes: Arc::new(DashMap::new()),
            ttl: self.registry_ttl,
            _tasks: Arc::new(Vec::new()),
        };
        let gpus = spawn_watch(self.gpus_kv.clone(), cache.gpus.clone()).await?;
        let nodes = spawn_watch(self.nodes_kv.clone(), cache.nodes.clone()).await?;
        Ok(RegistryCache { _tasks: Arc::new(vec![gpus, nodes]), ..cache })
    }
}

/// Aborts its watch tasks when the last clone drops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns a task that mirrors a KV bucket into `map`, returning once the initial values are in.
async fn spawn_watch<T: DeserializeOwned + Send + Sync + 'static>(
    store: kv::Store,
    map: Arc<DashMap<String, T>>,
) -> Result<AbortOnDrop, StoreError> {
    let initial = store.status().await.map_err(StoreError::nats)?.values();
    let mut watch = store.watch_with_history(">").await.map_err(StoreError::nats)?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
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
    Ok(AbortOnDrop(task))
}

/// A local, always-fresh view of the registry.
#[derive(Clone)]
pub struct RegistryCache {
    gpus: Arc<DashMap<String, GpuEntry>>,
    nodes: Arc<DashMap<String, NodeEntry>>,
    ttl: Duration,
    _tasks: Arc<Vec<AbortOnDrop>>,
}

impl RegistryCache {
    fn fresh(&self, heartbeat_ms: u64) -> bool {
        crate::now_ms().saturating_sub(heartbeat_ms) <= self.ttl.as_millis() as u64
    }

    /// Live GPU entries, sorted by node then slot.
    pub fn gpus(&self) -> Vec<GpuEntry> {
        let mut v: Vec<GpuEntry> = self.gpus.iter().map(|e| e.value().clone()).filter(|g| self.fresh(g.heartbeat_ms)).collect();
        v.sort_by(|a, b| (&a.node, &a.slot).cmp(&(&b.node, &b.slot)));
        v
    }

    pub fn nodes(&self) -> Vec<NodeEntry> {
        let mut v: Vec<NodeEntry> = self.nodes.iter().map(|e| e.value().clone()).filter(|n| self.fresh(n.heartbeat_ms)).collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    pub fn gpu(&self, node: &str, slot: &str) -> Option<GpuEntry> {
        self.gpus.get(&Resources::gpu_key(node, slot)).map(|e| e.value().clone()).filter(|g| self.fresh(g.heartbeat_ms))
    }

    /// Every node entry still in the bucket, fresh or not (the loss detector's view).
    pub fn nodes_including_stale(&self) -> Vec<NodeEntry> {
        self.nodes.iter().map(|e| e.value().clone()).collect()
    }

    /// Every GPU entry of `node` still in the bucket, fresh or not.
    pub fn gpus_of(&self, node: &str) -> Vec<GpuEntry> {
        self.gpus.iter().map(|e| e.value().clone()).filter(|g| g.node == node).collect()
    }

    pub fn node(&self, node: &str) -> Option<NodeEntry> {
        self.nodes.get(node).map(|e| e.value().clone()).filter(|n| self.fresh(n.heartbeat_ms))
    }
}
