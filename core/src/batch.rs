//! Batches: one request with N items, run as N ordinary child jobs, and a parent record that
//! follows them to a summary (`succeeded`, `partial`, `failed`).
//!
//! The children are plain jobs (queue, attempts, fencing, cancel all unchanged); each carries
//! a [`ParentRef`]. The parent record (KV `kiln_batches`) lists the items and the terminal
//! state each one reached. Whoever writes a child's terminal state *settles* it into the
//! parent (a compare-and-set, see `nats::batches`) before acking the child's delivery, so a
//! crash in between redelivers the child, which finds itself terminal and settles again:
//! settling is idempotent, and a batch can neither miss an item nor count one twice.
//!
//! Terminal states stay final. Retrying the failed items makes a *new* batch of just those
//! items (`retry_of` the old one), so a finished batch's summary never changes after the fact.

use serde::{Deserialize, Serialize};

use crate::job::{JobRecord, JobState};

/// Namespace of batch-derived ids (uuid v5), so a resubmission with the same idempotency key,
/// a retried submission and a retry-of-failed request all land on the same ids.
const BATCH_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b696c6e_6261_7463_6865_730000000001);

/// The id of child `index` of batch `batch_id`: derived, so a half-finished submission that is
/// retried creates the missing children under the ids the batch record already lists.
pub fn child_job_id(batch_id: &str, index: u32) -> String {
    uuid::Uuid::new_v5(&BATCH_NAMESPACE, format!("item\0{batch_id}\0{index}").as_bytes()).to_string()
}

/// Child `index` of batch `batch_id`, queued, before its inputs and options are filled in.
pub fn child_record(batch_id: &str, index: u32, model: &str, max_attempts: u32, now_ms: u64) -> JobRecord {
    JobRecord {
        parent: Some(ParentRef { batch_id: batch_id.to_string(), index }),
        ..JobRecord::queued(&child_job_id(batch_id, index), model, max_attempts, now_ms)
    }
}

/// The id of a batch submitted with an idempotency key.
pub fn idempotent_batch_id(model: &str, key: &str) -> String {
    uuid::Uuid::new_v5(&BATCH_NAMESPACE, format!("batch\0{model}\0{key}").as_bytes()).to_string()
}

/// The id of the batch that retries the failed items of `batch_id`: one per batch, so two
/// concurrent retry requests make one retry batch.
pub fn retry_batch_id(batch_id: &str) -> String {
    uuid::Uuid::new_v5(&BATCH_NAMESPACE, format!("retry\0{batch_id}").as_bytes()).to_string()
}

/// A child job's link to its batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ParentRef {
    pub batch_id: String,
    /// The item's index in the original request; a retry batch keeps the original indices, so
    /// frame 7 of a storyboard stays item 7 however often it is retried.
    pub index: u32,
}

/// One item of a batch as the parent record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    pub index: u32,
    pub job_id: String,
    /// `queued` until the child's terminal state is settled here; then that state.
    pub state: JobState,
}

/// Where a batch is: running until every item is terminal, then its summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Running,
    /// Every item completed.
    Succeeded,
    /// Some items completed, some failed or were cancelled.
    Partial,
    /// No item completed.
    Failed,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Running => "running",
            BatchStatus::Succeeded => "succeeded",
            BatchStatus::Partial => "partial",
            BatchStatus::Failed => "failed",
        }
    }
}

/// Counts of a batch's items, and the status they add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchSummary {
    pub status: BatchStatus,
    pub total: u32,
    pub completed: u32,
    pub failed: u32,
    pub cancelled: u32,
}

/// The parent record of a batch (KV `kiln_batches`, key = batch id). Every write after
/// creation is a compare-and-set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub batch_id: String,
    pub model: String,
    pub items: Vec<BatchItem>,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The batch whose failed items this one retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// The batch that retries this one's failed items (at most one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_by: Option<String>,
}

/// What settling one child's terminal state did to the parent record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The item is now recorded; `finished` when it was the last one.
    Settled { finished: bool },
    /// It was recorded before (a redelivery settling again): nothing to write.
    Already { finished: bool },
    /// The batch has no such item (a stale or forged parent reference): nothing to write.
    UnknownItem,
}

impl BatchRecord {
    /// A new batch of `children` (made by [`child_record`]), every item queued.
    pub fn new(batch_id: &str, model: &str, children: &[JobRecord], now_ms: u64) -> BatchRecord {
        let items = children
            .iter()
            .filter_map(|c| Some(BatchItem { index: c.parent.as_ref()?.index, job_id: c.job_id.clone(), state: JobState::Queued }))
            .collect();
        BatchRecord {
            batch_id: batch_id.to_string(),
            model: model.to_string(),
            items,
            created_ms: now_ms,
            updated_ms: now_ms,
            finished_ms: None,
            idempotency_key: None,
            retry_of: None,
            retried_by: None,
        }
    }

    pub fn summary(&self) -> BatchSummary {
        let count = |s: JobState| self.items.iter().filter(|i| i.state == s).count() as u32;
        let (completed, failed, cancelled) = (count(JobState::Completed), count(JobState::Failed), count(JobState::Cancelled));
        let total = self.items.len() as u32;
        let status = if completed + failed + cancelled < total {
            BatchStatus::Running
        } else if completed == total {
            BatchStatus::Succeeded
        } else if completed == 0 {
            BatchStatus::Failed
        } else {
            BatchStatus::Partial
        };
        BatchSummary { status, total, completed, failed, cancelled }
    }

    pub fn is_finished(&self) -> bool {
        self.items.iter().all(|i| i.state.is_terminal())
    }

    /// Records that child `index` (`job_id`) reached terminal `state`. A terminal item is never
    /// changed again, so a late or repeated settle cannot rewrite a batch's history.
    pub fn settle(&mut self, index: u32, job_id: &str, state: JobState, now_ms: u64) -> Settle {
        debug_assert!(state.is_terminal());
        let Some(item) = self.items.iter_mut().find(|i| i.index == index && i.job_id == job_id) else {
            return Settle::UnknownItem;
        };
        if item.state.is_terminal() {
            return Settle::Already { finished: self.is_finished() };
        }
        item.state = state;
        self.updated_ms = now_ms;
        let finished = self.is_finished();
        if finished {
            self.finished_ms = Some(now_ms);
        }
        Settle::Settled { finished }
    }

    /// The items a retry runs again: those that failed or were cancelled.
    pub fn unsuccessful_items(&self) -> Vec<&BatchItem> {
        self.items.iter().filter(|i| matches!(i.state, JobState::Failed | JobState::Cancelled)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u32) -> BatchRecord {
        BatchRecord {
            batch_id: "b".into(),
            model: "m".into(),
            items: (0..n).map(|i| BatchItem { index: i, job_id: child_job_id("b", i), state: JobState::Queued }).collect(),
            created_ms: 0,
            updated_ms: 0,
            finished_ms: None,
            idempotency_key: None,
            retry_of: None,
            retried_by: None,
        }
    }

    #[test]
    fn the_summary_follows_the_items() {
        let mut b = batch(3);
        assert_eq!(b.summary().status, BatchStatus::Running);
        assert_eq!(b.settle(0, &child_job_id("b", 0), JobState::Completed, 1), Settle::Settled { finished: false });
        assert_eq!(b.settle(1, &child_job_id("b", 1), JobState::Failed, 2), Settle::Settled { finished: false });
        assert_eq!(b.summary().status, BatchStatus::Running);
        assert_eq!(b.settle(2, &child_job_id("b", 2), JobState::Cancelled, 3), Settle::Settled { finished: true });
        let s = b.summary();
        assert_eq!((s.status, s.total, s.completed, s.failed, s.cancelled), (BatchStatus::Partial, 3, 1, 1, 1));
        assert_eq!(b.finished_ms, Some(3));
        assert_eq!(b.unsuccessful_items().iter().map(|i| i.index).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn all_completed_is_succeeded_and_none_completed_is_failed() {
        let mut ok = batch(2);
        let mut bad = batch(2);
        for i in 0..2 {
            ok.settle(i, &child_job_id("b", i), JobState::Completed, 1);
            bad.settle(i, &child_job_id("b", i), if i == 0 { JobState::Failed } else { JobState::Cancelled }, 1);
        }
        assert_eq!(ok.summary().status, BatchStatus::Succeeded);
        assert_eq!(bad.summary().status, BatchStatus::Failed);
    }

    #[test]
    fn settling_twice_changes_nothing_and_an_unknown_item_is_refused() {
        let mut b = batch(2);
        b.settle(0, &child_job_id("b", 0), JobState::Completed, 1);
        let before = b.clone();
        assert_eq!(b.settle(0, &child_job_id("b", 0), JobState::Failed, 9), Settle::Already { finished: false });
        assert_eq!(b, before, "a terminal item is final");
        assert_eq!(b.settle(1, "someone-else", JobState::Completed, 9), Settle::UnknownItem);
        assert_eq!(b.settle(7, &child_job_id("b", 7), JobState::Completed, 9), Settle::UnknownItem);
        assert_eq!(b, before);
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(child_job_id("b", 1), child_job_id("b", 1));
        assert_ne!(child_job_id("b", 1), child_job_id("b", 2));
        assert_ne!(child_job_id("b", 1), child_job_id("c", 1));
        assert_eq!(retry_batch_id("b"), retry_batch_id("b"));
        assert_ne!(retry_batch_id("b"), idempotent_batch_id("m", "b"));
        assert!(crate::ids::is_valid_token(&child_job_id("b", 1)));
    }
}
