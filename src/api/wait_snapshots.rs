//! The lanes' wait snapshots (`Resources::lane_wait_snapshot`: slots, queues, recent run time)
//! that a waiting job's `pending` is judged by, kept for [`SNAPSHOT_TTL`]: clients poll their
//! queued jobs' status, and reading the snapshot for each poll (a listing of the queue's
//! consumers, a registry read and a read of the results feed) slowed a node serving 2,000
//! queued jobs' polls to a third of its throughput (tests/fair_share.rs: 103 s against 28 s).
//! A job's own position is counted at each poll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use kiln_core::nats::queue::LaneWaitSnapshot;
use kiln_core::nats::{Lane, Resources, StoreError};

/// How old a snapshot may be.
pub const SNAPSHOT_TTL: Duration = Duration::from_millis(500);

/// Each lane's last snapshot, by model.
#[derive(Default)]
pub struct WaitSnapshots {
    snapshots: DashMap<(String, Lane), (Instant, Arc<LaneWaitSnapshot>)>,
}

impl WaitSnapshots {
    /// The lane's snapshot, read again when older than [`SNAPSHOT_TTL`]. Polls that come
    /// together while it is read may each read it (they then keep the last).
    pub async fn get(&self, resources: &Resources, model: &str, lane: Lane) -> Result<Arc<LaneWaitSnapshot>, StoreError> {
        let key = (model.to_string(), lane);
        if let Some(entry) = self.snapshots.get(&key) {
            if entry.0.elapsed() < SNAPSHOT_TTL {
                return Ok(entry.1.clone());
            }
        }
        let fresh = Arc::new(resources.lane_wait_snapshot(model, lane).await?);
        self.snapshots.insert(key, (Instant::now(), fresh.clone()));
        Ok(fresh)
    }
}
