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
//! Three options change which jobs an item gets, all decided here, on the record alone:
//!
//! - **reuse**: identical items (same inputs by content, same params for every model) share
//!   one job, the first one's; its end settles every item sharing it.
//! - **max_concurrency**: at most that many of the batch's jobs are queued or running; the
//!   other items are *held* (no job yet) and each settle launches the next ones.
//! - **fallback models**: an item whose job failed on Kiln's side ([`falls_back`]) moves to a
//!   new job on the next model; its end is the end of its last job.
//!
//! A job made after the submission (a held item's, a fallback's) is written into the record
//! first, as launched by the end that caused it (`launched_by`), and made afterwards from the
//! batch's [`BatchPlan`]: a crash in between leaves the causing child unacked, and its
//! redelivery, settling again ([`Settle::Already`]), makes the job (ids are derived, so a
//! launch repeated is the same job).
//!
//! Terminal states stay final. Retrying the failed items makes a *new* batch of just those
//! items (`retry_of` the old one), so a finished batch's summary never changes after the fact.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::job::{JobRecord, JobState};
use crate::params::ParamDecl;
use crate::protocol::{BatchItemEvent, Event, EventKind};
pub use crate::protocol::{BatchStatus, BatchSummary, ParentRef};
use crate::protocol::{ErrorCode, InputValue, Labels};

/// Namespace of batch-derived ids (uuid v5), so a resubmission with the same idempotency key,
/// a retried submission and a retry-of-failed request all land on the same ids.
const BATCH_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b696c6e_6261_7463_6865_730000000001);

/// The id of child `index` of batch `batch_id`: derived, so a half-finished submission that is
/// retried creates the missing children under the ids the batch record already lists.
pub fn child_job_id(batch_id: &str, index: u32) -> String {
    uuid::Uuid::new_v5(&BATCH_NAMESPACE, format!("item\0{batch_id}\0{index}").as_bytes()).to_string()
}

/// The id of item `index`'s job on the model at position `pos` of the batch's models (`model`,
/// then `fallback_models`): the first model's is [`child_job_id`]; a fallback's also derives
/// from the position and the model, so every model an item tries gets a job of its own, and a
/// launch repeated after a crash lands on the same one.
pub fn item_job_id(batch_id: &str, index: u32, pos: u32, model: &str) -> String {
    if pos == 0 {
        return child_job_id(batch_id, index);
    }
    uuid::Uuid::new_v5(&BATCH_NAMESPACE, format!("fallback\0{batch_id}\0{index}\0{pos}\0{model}").as_bytes()).to_string()
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

/// Whether a child that ended as `record` says is run again on the batch's next model: it
/// failed for a reason on Kiln's side (the model would not load, its worker failed, it ran out
/// of attempts on infrastructure errors: `engine_failed`, or `dead_letter`). A user error (the
/// worker rejected the input, the deadline passed) fails the item: another model would not
/// help.
pub fn falls_back(record: &JobRecord) -> bool {
    record.state == JobState::Failed && (record.dead_letter || record.error.as_ref().is_some_and(|e| e.code == ErrorCode::EngineFailed))
}

/// One item of a batch as the parent record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchItem {
    pub index: u32,
    /// The item's job: its own, the one it shares with an identical earlier item (`reuse`), or
    /// its fallback's. Known from the submission on, even while the item is held.
    pub job_id: String,
    /// `queued` until the child's terminal state is settled here; then that state.
    pub state: JobState,
    /// Position of the model `job_id` runs in the batch's models (0: `model`, 1: the first
    /// fallback...).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub model: u32,
    /// No job was made for it: waiting for the batch's `max_concurrency` (or, once terminal,
    /// cancelled before it got one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// The job whose end launched `job_id` (a held item's launch, a fallback): settling that
    /// end again launches `job_id` again if it is missing. Cleared once the item ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_by: Option<String>,
    /// The item's labels, kept only when it shares another item's job (`reuse`) and its labels
    /// differ from that job's; else the job's are the item's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl BatchItem {
    fn new(index: u32, job_id: String) -> BatchItem {
        BatchItem { index, job_id, state: JobState::Queued, model: 0, held: false, launched_by: None, labels: None }
    }

    /// Launched and not ended: its job is queued or running.
    fn is_open(&self) -> bool {
        !self.held && !self.state.is_terminal()
    }
}

/// What it takes to make any job of a batch after its submission (a held item's, a
/// fallback's, a retry's): the request's shared fields once, each item's own, and each model's
/// rules as they were at submit. Stored once beside the batch record (it never changes) for a
/// batch that may need it ([`BatchRecord::has_plan`]), so the settle path needs neither the
/// request nor the config, and the record written at every settle stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchPlan {
    /// `model`, then each fallback model, in order.
    pub models: Vec<PlanModel>,
    /// The params every item gets (an item's own win).
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The labels every item gets (an item's own win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default)]
    pub priority: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// In index order.
    pub items: Vec<PlanItem>,
    /// The W3C trace of the submit (its `kiln.submit_batch` span): every item's job joins it,
    /// those launched later (held, a fallback, a retry of this plan) too. Absent in plans of an
    /// older Kiln (their jobs start traces of their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TraceContext>,
}

/// One model of a [`BatchPlan`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlanModel {
    pub name: String,
    /// The batch's `max_attempts` capped by this model's.
    pub max_attempts: u32,
    /// The params the model declares (defaults filled in for each item's job).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamDecl>,
}

/// One item of a [`BatchPlan`]: what the request gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlanItem {
    pub index: u32,
    #[serde(default)]
    pub inputs: BTreeMap<String, InputValue>,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

impl BatchPlan {
    pub fn item(&self, index: u32) -> Option<&PlanItem> {
        self.items.binary_search_by_key(&index, |i| i.index).ok().map(|at| &self.items[at])
    }

    /// The item's labels: the batch's, then its own.
    pub fn labels_of(&self, item: &PlanItem) -> Labels {
        let mut labels = self.labels.clone();
        labels.extend(item.labels.clone());
        labels
    }

    /// The item's params for the model at `pos`: the batch's, then its own, checked against
    /// what the model declares with its defaults filled in (`Err` says why they do not fit; a
    /// submission checks every item against every model first).
    pub fn params_for(&self, item: &PlanItem, pos: usize) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let mut params = self.params.clone();
        params.extend(item.params.clone());
        let model = self.models.get(pos).ok_or_else(|| format!("the batch has no model at position {pos}"))?;
        crate::params::check_params(&model.params, &params).map_err(|why| format!("model {:?}: {why}", model.name))
    }

    /// The job of item `index` on the model at `pos`, queued, under its derived id. `None` when
    /// the plan has no such item or model, or the item's params do not fit the model.
    pub fn child_record(&self, batch_id: &str, index: u32, pos: u32, now_ms: u64) -> Option<JobRecord> {
        let item = self.item(index)?;
        let model = self.models.get(pos as usize)?;
        let params = self.params_for(item, pos as usize).ok()?;
        Some(JobRecord {
            inputs: item.inputs.clone(),
            params,
            priority: self.priority,
            deadline_ms: self.deadline_ms,
            labels: self.labels_of(item),
            parent: Some(ParentRef { batch_id: batch_id.to_string(), index }),
            trace: self.trace.clone(),
            ..JobRecord::queued(&item_job_id(batch_id, index, pos, &model.name), &model.name, model.max_attempts, now_ms)
        })
    }

    /// The same plan for some of the items only (a retry of the failed ones).
    pub fn subset(&self, indices: &[u32]) -> BatchPlan {
        BatchPlan { items: self.items.iter().filter(|i| indices.contains(&i.index)).cloned().collect(), ..self.clone() }
    }
}

/// The parent record of a batch (KV `kiln_batches`, key = batch id). Every write after
/// creation is a compare-and-set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// The models an item tries after `model`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_models: Vec<String>,
    /// At most this many of the batch's jobs queued or running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Identical items share one job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse: bool,
    /// `cancel_batch` was asked: nothing more is launched, and held items end cancelled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
}

/// What settling one child's terminal state did to the parent record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The record changed (write it): see [`Settled`].
    Settled(Settled),
    /// It was recorded before (a redelivery settling again): nothing to write. `launch`: the
    /// jobs that end launched and that have not ended, to make again if a crash came between
    /// that write and their launch (making one that exists does nothing).
    Already { launch: Vec<Launch>, finished: bool },
    /// The batch has no such item (a stale or forged parent reference): nothing to write.
    UnknownItem,
}

/// A change to write into the parent record, and what must happen around the write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Items that ended with the child (every item sharing its job): one item event each,
    /// before the write. Empty when the child fell back to its next model.
    pub ended: Vec<u32>,
    /// Held items that ended cancelled (the batch is being cancelled; they never got a job):
    /// one item event each, before the write.
    pub cancelled: Vec<u32>,
    /// Jobs to make after the write: held items launched, a fallback.
    pub launch: Vec<Launch>,
    /// Every item has ended.
    pub finished: bool,
}

/// A job to make for a batch: the job of item `index` (the first item sharing it) on the
/// model at position `model`, under the derived id `job_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub index: u32,
    pub job_id: String,
    pub model: u32,
}

/// How a child job ended, as its batch needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildEnd<'a> {
    /// The child's `parent.index`.
    pub index: u32,
    pub job_id: &'a str,
    /// Terminal.
    pub state: JobState,
    /// It failed on Kiln's side ([`falls_back`]): run the item on the next model, if any.
    pub falls_back: bool,
}

impl<'a> ChildEnd<'a> {
    pub fn of(record: &'a JobRecord) -> Option<ChildEnd<'a>> {
        let parent = record.parent.as_ref()?;
        record.is_terminal().then(|| ChildEnd {
            index: parent.index,
            job_id: &record.job_id,
            state: record.state,
            falls_back: falls_back(record),
        })
    }
}

impl BatchRecord {
    /// A new batch of `children` (made by [`child_record`]), every item queued.
    pub fn new(batch_id: &str, model: &str, children: &[JobRecord], now_ms: u64) -> BatchRecord {
        let items = children.iter().filter_map(|c| Some(BatchItem::new(c.parent.as_ref()?.index, c.job_id.clone()))).collect();
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
            fallback_models: vec![],
            max_concurrency: None,
            reuse: false,
            cancel_requested: false,
        }
    }

    /// A new batch of `plan`'s items, each to run on the model at position `start` of the plan's
    /// models. With `reuse_keys` (one per plan item, its content), items with equal keys share
    /// the first one's job. With `max_concurrency`, the jobs past the first that many are held.
    pub fn from_plan(
        batch_id: &str,
        plan: &BatchPlan,
        start: u32,
        max_concurrency: Option<u32>,
        reuse_keys: Option<&[String]>,
        now_ms: u64,
    ) -> BatchRecord {
        let model_at = |pos: u32| plan.models.get(pos as usize).map(|m| m.name.as_str()).unwrap_or_default();
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut items: Vec<BatchItem> = Vec::with_capacity(plan.items.len());
        for (at, planned) in plan.items.iter().enumerate() {
            let key = reuse_keys.and_then(|keys| keys.get(at)).map(String::as_str);
            let shared = key.and_then(|k| first_with_key.get(k)).copied();
            let mut item = match shared {
                Some(first) => {
                    let labels = plan.labels_of(planned);
                    let differ = plan.item(items[first].index).is_none_or(|f| plan.labels_of(f) != labels);
                    BatchItem { labels: differ.then_some(labels), ..BatchItem::new(planned.index, items[first].job_id.clone()) }
                }
                None => {
                    if let Some(k) = key {
                        first_with_key.insert(k, items.len());
                    }
                    BatchItem::new(planned.index, item_job_id(batch_id, planned.index, start, model_at(start)))
                }
            };
            item.model = start;
            items.push(item);
        }
        let mut record = BatchRecord {
            fallback_models: plan.models.iter().skip(1).map(|m| m.name.clone()).collect(),
            max_concurrency,
            reuse: reuse_keys.is_some(),
            items,
            ..BatchRecord::new(batch_id, model_at(0), &[], now_ms)
        };
        if let Some(limit) = max_concurrency {
            let mut launched: Vec<&str> = vec![];
            let mut held = vec![];
            for (at, item) in record.items.iter().enumerate() {
                if !launched.contains(&item.job_id.as_str()) {
                    if launched.len() >= limit as usize {
                        held.push(at);
                        continue;
                    }
                    launched.push(&item.job_id);
                }
            }
            // An item that shares a launched job is launched with it; one that shares a held
            // job is held with it.
            let held_jobs: std::collections::HashSet<String> = held.iter().map(|at| record.items[*at].job_id.clone()).collect();
            for item in &mut record.items {
                item.held = held_jobs.contains(&item.job_id);
            }
        }
        record
    }

    /// Whether this batch keeps a [`BatchPlan`]: it may make jobs after its submission, or its
    /// items' own fields are not all in their jobs (items sharing a job).
    pub fn has_plan(&self) -> bool {
        self.reuse || self.max_concurrency.is_some() || !self.fallback_models.is_empty()
    }

    /// The model at position `pos` of the batch's models (`model`, then the fallbacks).
    pub fn model_at(&self, pos: u32) -> &str {
        match pos {
            0 => &self.model,
            n => self.fallback_models.get(n as usize - 1).map(String::as_str).unwrap_or_default(),
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

    /// The jobs that should exist and have not ended: one per job (items sharing one name the
    /// first of them), held items left out. What a submission launches, and repeats.
    pub fn launches(&self) -> Vec<Launch> {
        let mut seen = std::collections::HashSet::new();
        self.items
            .iter()
            .filter(|i| i.is_open() && seen.insert(i.job_id.as_str()))
            .map(|i| Launch { index: i.index, job_id: i.job_id.clone(), model: i.model })
            .collect()
    }

    /// Jobs queued or running (as far as this record knows): what `max_concurrency` bounds.
    pub fn open_jobs(&self) -> usize {
        self.launches().len()
    }

    /// The item a child's parent reference names, if the child is (or was) its job: `Ok(true)`
    /// for its current job, `Ok(false)` for an earlier one it fell back from.
    fn item_of(&self, index: u32, job_id: &str) -> Option<(usize, bool)> {
        let at = self.items.iter().position(|i| i.index == index)?;
        let item = &self.items[at];
        if item.job_id == job_id {
            return Some((at, true));
        }
        let earlier = (0..item.model).any(|pos| item_job_id(&self.batch_id, index, pos, self.model_at(pos)) == job_id);
        earlier.then_some((at, false))
    }

    /// Records that the child `end` names reached its terminal state: every item sharing its
    /// job ends with it, or (a failure on Kiln's side, with a model left to try, the batch not
    /// being cancelled) moves to a new job on its next model. Then held items are launched up
    /// to `max_concurrency`, or, once a cancel was asked, end cancelled. A terminal item is
    /// never changed again, so a late or repeated settle cannot rewrite a batch's history.
    pub fn settle(&mut self, end: &ChildEnd, now_ms: u64) -> Settle {
        debug_assert!(end.state.is_terminal());
        let Some((at, current)) = self.item_of(end.index, end.job_id) else {
            return Settle::UnknownItem;
        };
        if !current || self.items[at].state.is_terminal() {
            return Settle::Already { launch: self.launched_by(end.job_id), finished: self.is_finished() };
        }
        let mut out = Settled::default();
        let next_pos = self.items[at].model + 1;
        let fallback = end.falls_back && !self.cancel_requested && (next_pos as usize) <= self.fallback_models.len();
        let next_job = fallback.then(|| item_job_id(&self.batch_id, end.index, next_pos, self.model_at(next_pos)));
        for item in self.items.iter_mut().filter(|i| i.job_id == end.job_id) {
            match &next_job {
                Some(job_id) => {
                    item.job_id = job_id.clone();
                    item.model = next_pos;
                    item.launched_by = Some(end.job_id.to_string());
                }
                None => {
                    item.state = end.state;
                    item.launched_by = None;
                    out.ended.push(item.index);
                }
            }
        }
        if let Some(job_id) = next_job {
            out.launch.push(Launch { index: end.index, job_id, model: next_pos });
        }
        self.follow_up(end.job_id, &mut out, now_ms);
        Settle::Settled(out)
    }

    /// After an item's job ended: launch held items while fewer than `max_concurrency` jobs are
    /// open (each launched by `by`, the job whose end made room), or, once a cancel was asked,
    /// end every held item cancelled. Then stamp the change.
    fn follow_up(&mut self, by: &str, out: &mut Settled, now_ms: u64) {
        if self.cancel_requested {
            out.cancelled.extend(self.cancel_held());
        } else if let Some(limit) = self.max_concurrency {
            while self.open_jobs() < limit as usize {
                let Some(next) = self.items.iter().find(|i| i.held && !i.state.is_terminal()) else { break };
                let launch = Launch { index: next.index, job_id: next.job_id.clone(), model: next.model };
                for item in self.items.iter_mut().filter(|i| i.job_id == launch.job_id) {
                    item.held = false;
                    item.launched_by = Some(by.to_string());
                }
                out.launch.push(launch);
            }
        }
        self.updated_ms = now_ms;
        out.finished = self.is_finished();
        if out.finished {
            self.finished_ms = Some(now_ms);
        }
    }

    /// Held items end cancelled (they never got a job); their indices.
    fn cancel_held(&mut self) -> Vec<u32> {
        let mut cancelled = vec![];
        for item in self.items.iter_mut().filter(|i| i.held && !i.state.is_terminal()) {
            item.state = JobState::Cancelled;
            cancelled.push(item.index);
        }
        cancelled
    }

    /// `cancel_batch`'s first step: from now on nothing more is launched. `false` when there is
    /// nothing to change (asked before, or the batch has ended).
    pub fn request_cancel(&mut self, now_ms: u64) -> bool {
        if self.cancel_requested || self.is_finished() {
            return false;
        }
        self.cancel_requested = true;
        self.updated_ms = now_ms;
        true
    }

    /// `cancel_batch`'s second step, once [`request_cancel`](Self::request_cancel) is written
    /// (so no settle launches a held item any more, and the held items are the same in every
    /// round of the write): the held items end cancelled. `None` when there are none.
    pub fn end_held(&mut self, now_ms: u64) -> Option<Settled> {
        if !self.cancel_requested || !self.items.iter().any(|i| i.held && !i.state.is_terminal()) {
            return None;
        }
        let mut out = Settled::default();
        self.follow_up("", &mut out, now_ms);
        Some(out)
    }

    /// The jobs `job_id`'s end launched that have not ended.
    fn launched_by(&self, job_id: &str) -> Vec<Launch> {
        self.launches()
            .into_iter()
            .filter(|l| self.items.iter().any(|i| i.job_id == l.job_id && i.launched_by.as_deref() == Some(job_id)))
            .collect()
    }

    /// The items a retry runs again: those that failed or were cancelled.
    pub fn unsuccessful_items(&self) -> Vec<&BatchItem> {
        self.items.iter().filter(|i| matches!(i.state, JobState::Failed | JobState::Cancelled)).collect()
    }
}

impl Event {
    /// An item of batch `batch_id` ended as `record` says.
    pub fn batch_item(batch_id: &str, index: u32, record: &JobRecord) -> Self {
        let kind = if record.state == JobState::Completed { EventKind::ItemCompleted } else { EventKind::ItemFailed };
        let item = BatchItemEvent {
            index,
            job_id: record.job_id.clone(),
            status: record.state,
            artifacts: record.artifacts.clone(),
            labels: record.labels.clone(),
        };
        let mut event = Event { kind, status: None, item: Some(item), ..Event::status(batch_id, 0, JobState::Running) };
        if let Some(e) = &record.error {
            event = event.with_error(e.clone());
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOL: lists are always sent, empty or not (maps and options are left out when
    /// empty or absent).
    #[test]
    fn lists_in_replies_and_events_are_sent_when_empty() {
        let mut failed = JobRecord::queued("j1", "m", 3, 1);
        failed.state = JobState::Failed;
        let event = serde_json::to_value(Event::batch_item("b1", 0, &failed)).unwrap();
        assert_eq!(event["item"]["artifacts"], serde_json::json!([]), "{event}");
        let decl: crate::params::ParamDecl = toml::from_str("name = \"steps\"\nkind = \"int\"").unwrap();
        let decl = serde_json::to_value(decl).unwrap();
        assert_eq!(decl["choices"], serde_json::json!([]), "{decl}");
    }

    fn batch(n: u32) -> BatchRecord {
        let children: Vec<JobRecord> = (0..n).map(|i| child_record("b", i, "m", 1, 0)).collect();
        BatchRecord::new("b", "m", &children, 0)
    }

    fn end(index: u32, job_id: &str, state: JobState) -> ChildEnd<'_> {
        ChildEnd { index, job_id, state, falls_back: false }
    }

    fn settled(s: Settle) -> Settled {
        match s {
            Settle::Settled(s) => s,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    /// A plan of `n` items on `models`, item `i` with prompt `prompts[i % len]`.
    fn plan(n: u32, models: &[&str], prompts: &[&str]) -> BatchPlan {
        BatchPlan {
            models: models.iter().map(|m| PlanModel { name: m.to_string(), max_attempts: 1, params: vec![] }).collect(),
            params: Default::default(),
            labels: [("storyboard".to_string(), "sb".to_string())].into(),
            priority: 0,
            deadline_ms: None,
            trace: None,
            items: (0..n)
                .map(|i| PlanItem {
                    index: i,
                    inputs: [("prompt".to_string(), InputValue::Inline(prompts[i as usize % prompts.len()].into()))].into(),
                    params: Default::default(),
                    labels: [("frame".to_string(), i.to_string())].into(),
                })
                .collect(),
        }
    }

    fn keys(plan: &BatchPlan) -> Vec<String> {
        plan.items.iter().map(|i| serde_json::to_string(&i.inputs).unwrap()).collect()
    }

    #[test]
    fn the_summary_follows_the_items() {
        let mut b = batch(3);
        assert_eq!(b.summary().status, BatchStatus::Running);
        assert_eq!(settled(b.settle(&end(0, &child_job_id("b", 0), JobState::Completed), 1)).ended, [0]);
        assert!(!settled(b.settle(&end(1, &child_job_id("b", 1), JobState::Failed), 2)).finished);
        assert_eq!(b.summary().status, BatchStatus::Running);
        assert!(settled(b.settle(&end(2, &child_job_id("b", 2), JobState::Cancelled), 3)).finished);
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
            ok.settle(&end(i, &child_job_id("b", i), JobState::Completed), 1);
            bad.settle(&end(i, &child_job_id("b", i), if i == 0 { JobState::Failed } else { JobState::Cancelled }), 1);
        }
        assert_eq!(ok.summary().status, BatchStatus::Succeeded);
        assert_eq!(bad.summary().status, BatchStatus::Failed);
    }

    #[test]
    fn settling_twice_changes_nothing_and_an_unknown_item_is_refused() {
        let mut b = batch(2);
        b.settle(&end(0, &child_job_id("b", 0), JobState::Completed), 1);
        let before = b.clone();
        assert_eq!(b.settle(&end(0, &child_job_id("b", 0), JobState::Failed), 9), Settle::Already { launch: vec![], finished: false });
        assert_eq!(b, before, "a terminal item is final");
        assert_eq!(b.settle(&end(1, "someone-else", JobState::Completed), 9), Settle::UnknownItem);
        assert_eq!(b.settle(&end(7, &child_job_id("b", 7), JobState::Completed), 9), Settle::UnknownItem);
        assert_eq!(b, before);
    }

    #[test]
    fn a_record_written_before_the_options_existed_still_reads() {
        let old = r#"{"batch_id":"b","model":"m","items":[{"index":0,"job_id":"j","state":"queued"}],"created_ms":1,"updated_ms":1}"#;
        let b: BatchRecord = serde_json::from_str(old).unwrap();
        assert!(!b.has_plan());
        assert_eq!(b.launches(), [Launch { index: 0, job_id: "j".into(), model: 0 }]);
        // ... and a plain batch is written as before: none of the new fields.
        assert_eq!(serde_json::to_string(&b).unwrap(), old);
    }

    #[test]
    fn identical_items_share_one_job_and_end_with_it() {
        // Items 0, 2, 4 are identical, so are 1 and 3.
        let p = plan(5, &["m"], &["a", "b"]);
        let mut b = BatchRecord::from_plan("b", &p, 0, None, Some(&keys(&p)), 0);
        let jobs: Vec<&str> = b.items.iter().map(|i| i.job_id.as_str()).collect();
        assert_eq!(jobs, [jobs[0], jobs[1], jobs[0], jobs[1], jobs[0]]);
        assert_eq!(jobs[0], child_job_id("b", 0));
        assert_eq!(b.launches().iter().map(|l| l.index).collect::<Vec<_>>(), [0, 1], "one job per distinct item");
        // The items sharing a job keep their own labels (the job has the first one's).
        assert_eq!(b.items[2].labels.as_ref().unwrap()["frame"], "2");
        assert_eq!(b.items[0].labels, None);

        let a = child_job_id("b", 0);
        let s = settled(b.settle(&end(0, &a, JobState::Completed), 1));
        assert_eq!((s.ended, s.finished), (vec![0, 2, 4], false), "every item sharing the job ends with it");
        assert_eq!(b.summary().completed, 3);
        let before = b.clone();
        assert!(matches!(b.settle(&end(0, &a, JobState::Completed), 2), Settle::Already { .. }));
        assert_eq!(b, before);
        let s = settled(b.settle(&end(1, &child_job_id("b", 1), JobState::Failed), 3));
        assert_eq!((s.ended, s.finished), (vec![1, 3], true));
        let s = b.summary();
        assert_eq!((s.completed, s.failed, s.total), (3, 2, 5));
    }

    #[test]
    fn held_items_launch_as_earlier_ones_end() {
        let p = plan(5, &["m"], &["a", "b", "c", "d", "e"]);
        let mut b = BatchRecord::from_plan("b", &p, 0, Some(2), None, 0);
        assert_eq!(b.launches().iter().map(|l| l.index).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(b.items.iter().filter(|i| i.held).count(), 3);
        let s = settled(b.settle(&end(1, &child_job_id("b", 1), JobState::Completed), 1));
        assert_eq!(s.launch, [Launch { index: 2, job_id: child_job_id("b", 2), model: 0 }]);
        assert_eq!(b.open_jobs(), 2);
        // A crash after that write: settling item 1 again launches item 2 again (a no-op if it
        // exists), and nothing else.
        let again = b.clone().settle(&end(1, &child_job_id("b", 1), JobState::Completed), 2);
        assert_eq!(again, Settle::Already { launch: s.launch.clone(), finished: false });
        // Once item 2 has ended, there is nothing of item 1's to launch again.
        settled(b.settle(&end(2, &child_job_id("b", 2), JobState::Failed), 3));
        assert_eq!(b.settle(&end(1, &child_job_id("b", 1), JobState::Completed), 4), Settle::Already { launch: vec![], finished: false });
        assert_eq!(b.launches().iter().map(|l| l.index).collect::<Vec<_>>(), [0, 3]);
    }

    #[test]
    fn an_infrastructure_failure_moves_the_item_to_its_next_model() {
        let p = plan(3, &["a", "b", "c"], &["x", "y", "x"]);
        let mut b = BatchRecord::from_plan("b", &p, 0, None, Some(&keys(&p)), 0);
        let first = child_job_id("b", 0);
        let failed = ChildEnd { index: 0, job_id: &first, state: JobState::Failed, falls_back: true };
        let s = settled(b.settle(&failed, 1));
        let on_b = item_job_id("b", 0, 1, "b");
        assert_eq!(
            (s.ended.clone(), s.launch.clone()),
            (vec![], vec![Launch { index: 0, job_id: on_b.clone(), model: 1 }]),
            "no item event yet"
        );
        assert_eq!((b.items[0].job_id.as_str(), b.items[2].job_id.as_str()), (on_b.as_str(), on_b.as_str()), "items sharing move together");
        assert_eq!((b.items[0].model, b.model_at(b.items[0].model)), (1, "b"));
        assert_eq!(b.summary().status, BatchStatus::Running);
        // The first job's end settled again (a redelivery): the fallback is launched again.
        assert_eq!(b.clone().settle(&failed, 2), Settle::Already { launch: s.launch.clone(), finished: false });
        // A user error on the fallback ends the items: no third model.
        let s = settled(b.settle(&ChildEnd { index: 0, job_id: &on_b, state: JobState::Failed, falls_back: false }, 3));
        assert_eq!((s.ended, s.launch), (vec![0, 2], vec![]));
        // The last model's infrastructure failure ends the item: nothing left to try.
        let mut b = BatchRecord::from_plan("b", &p, 2, None, None, 0);
        let on_c = item_job_id("b", 1, 2, "c");
        assert_eq!(b.items[1].job_id, on_c, "the items started on the third model");
        let s = settled(b.settle(&ChildEnd { index: 1, job_id: &on_c, state: JobState::Failed, falls_back: true }, 1));
        assert_eq!((s.ended, s.launch), (vec![1], vec![]));
    }

    #[test]
    fn a_cancelled_batch_launches_nothing_more_and_its_held_items_end() {
        let p = plan(4, &["a", "b"], &["1", "2", "3", "4"]);
        let mut b = BatchRecord::from_plan("b", &p, 0, Some(1), None, 0);
        assert!(b.request_cancel(1));
        assert!(!b.request_cancel(2), "once");
        // A settle racing the cancel ends the held items itself, and does not fall back.
        let mut raced = b.clone();
        let s = settled(raced.settle(&ChildEnd { index: 0, job_id: &child_job_id("b", 0), state: JobState::Failed, falls_back: true }, 3));
        assert_eq!((s.ended, s.cancelled, s.launch, s.finished), (vec![0], vec![1, 2, 3], vec![], true));
        // cancel_batch's own second step.
        let s = b.end_held(3).unwrap();
        assert_eq!((s.cancelled, s.finished), (vec![1, 2, 3], false));
        assert_eq!(b.end_held(4), None, "nothing more to end");
        assert!(b.items[1].held && b.items[1].state == JobState::Cancelled, "never got a job");
        let s = settled(b.settle(&end(0, &child_job_id("b", 0), JobState::Cancelled), 5));
        assert_eq!((s.ended, s.cancelled, s.finished), (vec![0], vec![], true));
        assert_eq!(b.summary().cancelled, 4);
    }

    #[test]
    fn a_plan_makes_the_same_job_a_submission_would() {
        let mut p = plan(2, &["a", "b"], &["x"]);
        p.params = serde_json::json!({"steps": 5, "cfg": 1}).as_object().unwrap().clone();
        p.items[1].params = serde_json::json!({"steps": 9}).as_object().unwrap().clone();
        p.models[1].params = vec![serde_json::from_value(serde_json::json!({"name": "steps", "kind": "int"})).unwrap()];
        let child = p.child_record("b", 1, 0, 7).unwrap();
        assert_eq!((child.job_id.as_str(), child.model.as_str()), (child_job_id("b", 1).as_str(), "a"));
        assert_eq!(serde_json::Value::Object(child.params), serde_json::json!({"steps": 9, "cfg": 1}));
        assert_eq!(child.labels, [("storyboard".to_string(), "sb".to_string()), ("frame".to_string(), "1".to_string())].into());
        assert_eq!(child.parent, Some(ParentRef { batch_id: "b".into(), index: 1 }));
        // Model b does not declare cfg: the item does not fit it (a submission refuses that).
        assert_eq!(p.child_record("b", 1, 1, 7), None);
        assert_eq!(p.subset(&[1]).items.len(), 1);
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(child_job_id("b", 1), child_job_id("b", 1));
        assert_ne!(child_job_id("b", 1), child_job_id("b", 2));
        assert_ne!(child_job_id("b", 1), child_job_id("c", 1));
        assert_eq!(retry_batch_id("b"), retry_batch_id("b"));
        assert_ne!(retry_batch_id("b"), idempotent_batch_id("m", "b"));
        assert!(crate::ids::is_valid_token(&child_job_id("b", 1)));
        assert_eq!(item_job_id("b", 1, 0, "m"), child_job_id("b", 1));
        assert_ne!(item_job_id("b", 1, 1, "m"), item_job_id("b", 1, 2, "m"));
        assert_ne!(item_job_id("b", 1, 1, "m"), item_job_id("b", 1, 1, "n"));
        assert!(crate::ids::is_valid_token(&item_job_id("b", 1, 1, "m")));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// What happens next to a batch: a job that exists ends (`which` picks among them) as
        /// `outcome` says, an end already settled is settled again, or a cancel comes.
        #[derive(Debug, Clone)]
        enum Op {
            End { which: usize, outcome: u8 },
            Again { which: usize },
            Cancel,
        }

        fn any_op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (any::<usize>(), 0u8..4).prop_map(|(which, outcome)| Op::End { which, outcome }),
                2 => any::<usize>().prop_map(|which| Op::Again { which }),
                1 => Just(Op::Cancel),
            ]
        }

        fn outcome(n: u8) -> (JobState, bool) {
            match n {
                0 => (JobState::Completed, false),
                1 => (JobState::Failed, false),
                2 => (JobState::Failed, true),
                _ => (JobState::Cancelled, false),
            }
        }

        proptest! {
            /// For any batch (items sharing jobs or not, any limit, one to three models) and any
            /// order of ends, repeats and a cancel: at most `max_concurrency` jobs are open; a job
            /// is launched only once, and only after the write that lists it; an item event comes
            /// once per item; a settle repeated changes nothing; ended items stay ended; and
            /// once every job that exists has ended, so has the batch, its summary counting each
            /// item once.
            #[test]
            fn settling_keeps_the_batch_rules(
                n in 1u32..10,
                models in 1usize..4,
                distinct in 1usize..6,
                reuse in any::<bool>(),
                limit in proptest::option::of(1u32..4),
                ops in proptest::collection::vec(any_op(), 0..40),
            ) {
                let names = ["a", "b", "c"];
                let prompts: Vec<String> = (0..distinct).map(|i| format!("p{i}")).collect();
                let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
                let p = plan(n, &names[..models], &prompts);
                let keys = keys(&p);
                let mut b = BatchRecord::from_plan("b", &p, 0, limit, reuse.then_some(&keys[..]), 0);
                // Jobs made (launched) and not ended, and ends settled so far.
                let mut live: Vec<Launch> = b.launches();
                let mut settled_ends: Vec<(u32, String, JobState, bool)> = vec![];
                let mut events: Vec<u32> = vec![];
                let mut made: Vec<String> = live.iter().map(|l| l.job_id.clone()).collect();
                let mut now = 1;
                let check = |b: &BatchRecord, events: &[u32]| -> Result<(), TestCaseError> {
                    if let Some(limit) = b.max_concurrency {
                        prop_assert!(b.open_jobs() <= limit as usize, "{} open jobs, limit {}", b.open_jobs(), limit);
                    }
                    let mut sorted = events.to_vec();
                    sorted.sort_unstable();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), events.len(), "an item event came twice: {:?}", events);
                    let ended: Vec<u32> = b.items.iter().filter(|i| i.state.is_terminal()).map(|i| i.index).collect();
                    prop_assert_eq!(sorted, ended, "item events and ended items differ");
                    let s = b.summary();
                    prop_assert_eq!(s.completed + s.failed + s.cancelled, events.len() as u32);
                    Ok(())
                };
                let apply = |b: &mut BatchRecord, live: &mut Vec<Launch>, made: &mut Vec<String>, events: &mut Vec<u32>, result: Settle| -> Result<(), TestCaseError> {
                    if let Settle::Settled(s) = result {
                        events.extend(&s.ended);
                        events.extend(&s.cancelled);
                        for l in s.launch {
                            prop_assert!(b.launches().contains(&l), "launched {:?}, which the record does not list", l);
                            prop_assert!(!made.contains(&l.job_id), "{} launched twice", l.job_id);
                            made.push(l.job_id.clone());
                            live.push(l);
                        }
                        prop_assert_eq!(s.finished, b.is_finished());
                    }
                    Ok(())
                };
                for op in ops {
                    now += 1;
                    match op {
                        Op::End { which, outcome: o } if !live.is_empty() => {
                            let l = live.remove(which % live.len());
                            let (state, falls_back) = outcome(o);
                            let before = b.clone();
                            let result = b.settle(&ChildEnd { index: l.index, job_id: &l.job_id, state, falls_back }, now);
                            prop_assert!(matches!(result, Settle::Settled(_)), "a live job's end is new: {:?}", result);
                            for (old, new) in before.items.iter().zip(&b.items) {
                                if old.state.is_terminal() {
                                    prop_assert_eq!(old, new, "an ended item changed");
                                }
                            }
                            apply(&mut b, &mut live, &mut made, &mut events, result)?;
                            settled_ends.push((l.index, l.job_id, state, falls_back));
                        }
                        Op::Again { which } if !settled_ends.is_empty() => {
                            let (index, job_id, state, falls_back) = settled_ends[which % settled_ends.len()].clone();
                            let before = b.clone();
                            let result = b.settle(&ChildEnd { index, job_id: &job_id, state, falls_back }, now);
                            let Settle::Already { launch, finished } = result else {
                                return Err(TestCaseError::fail(format!("a repeated settle wrote: {result:?}")));
                            };
                            prop_assert_eq!(&b, &before);
                            prop_assert_eq!(finished, b.is_finished());
                            for l in launch {
                                prop_assert!(made.contains(&l.job_id) && b.launches().contains(&l), "launched again what it never launched: {:?}", l);
                            }
                        }
                        Op::Cancel if b.request_cancel(now) => {
                            if let Some(s) = b.end_held(now) {
                                apply(&mut b, &mut live, &mut made, &mut events, Settle::Settled(s))?;
                            }
                        }
                        _ => {}
                    }
                    check(&b, &events)?;
                }
                // Every job that exists ends: so does the batch.
                while let Some(l) = live.pop() {
                    now += 1;
                    let result = b.settle(&end(l.index, &l.job_id, JobState::Completed), now);
                    apply(&mut b, &mut live, &mut made, &mut events, result)?;
                    check(&b, &events)?;
                }
                prop_assert!(b.is_finished(), "{:#?}", b);
                prop_assert_eq!(events.len() as u32, n);
                prop_assert_eq!(b.launches(), vec![]);
            }
        }
    }
}
