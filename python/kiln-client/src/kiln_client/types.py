"""The wire types of docs/PROTOCOL.md as Python types.

Replies are returned as the JSON objects Kiln sent (plain `dict`s), typed with `TypedDict`s
so an editor and a type checker know their fields; fields Kiln adds later simply show up in
the dict. Events are the one exception: each is an `Event` dataclass, because it also carries
its stream sequence (`seq`, the handle to resume from).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, TypedDict, Union, cast

JSON = Any
"""Any JSON value (what `json.loads` returns)."""

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
"""Job statuses after which nothing changes (docs/PROTOCOL.md, "Job statuses")."""

JOB_STATUSES = ("queued", "running", "retrying", "completed", "failed", "cancelled")

RetryReason = Literal[
    "node_lost", "ack_wait_expired", "worker_crashed", "slot_restarted", "timeout", "load_failed", "engine_failed"
]
"""Why a job's attempt after the first runs: a `retrying` event's `reason` (docs/PROTOCOL.md,
"Job statuses")."""

RETRY_REASONS: Tuple[RetryReason, ...] = (
    "node_lost",
    "ack_wait_expired",
    "worker_crashed",
    "slot_restarted",
    "timeout",
    "load_failed",
    "engine_failed",
)
"""Every `RetryReason`, in the order docs/PROTOCOL.md lists them."""

InputValue = JSON
"""An input: `{"object": "<name in kiln_files>"}` for an uploaded file, anything else inline."""


class _ApiErrorBodyRequired(TypedDict):
    code: str
    message: str


class ApiErrorBody(_ApiErrorBodyRequired, total=False):
    """`{code, message}`: a reply's error, or a job's (`JobView.error`, `Event.error`);
    `retry_after_ms` with `quota_exceeded` (when to try again)."""

    retry_after_ms: int


class Artifact(TypedDict):
    """A stored result (docs/PROTOCOL.md, "Artifacts")."""

    name: str
    bucket: str
    object: str
    size: int
    content_type: str
    sha256: str


class SubmitReply(TypedDict):
    job_id: str
    status: str
    duplicate: bool
    reused: bool


class ParentRef(TypedDict):
    """A batch item's job points at its batch."""

    batch_id: str
    index: int


class _JobViewRequired(TypedDict):
    job_id: str
    model: str
    status: str
    attempt: int
    max_attempts: int
    priority: int
    created_ms: int
    artifacts: List[Artifact]
    cancel_requested: bool
    dead_letter: bool


class _PendingRequired(TypedDict):
    reason: str
    """`no_slot`, `slots_busy`, `fair_share`, `quota`, `model_loading`, `node_lost`,
    `retry_backoff` or `starting` (docs/PROTOCOL.md, "Why a job waits")."""
    message: str


class Pending(_PendingRequired, total=False):
    """Why a waiting job waits, where it stands and when it may start."""

    position: int
    ahead: int
    eta_ms: int


class JobView(_JobViewRequired, total=False):
    """The reply of `status`, `cancel`, and each entry of `jobs`."""

    started_ms: int
    finished_ms: int
    node: str
    slot: str
    error: ApiErrorBody
    batch: ParentRef
    inputs: Dict[str, InputValue]
    params: Dict[str, JSON]
    labels: Dict[str, str]
    pending: Pending
    """`status` only, while the job waits."""


class _ResultReplyRequired(TypedDict):
    job_id: str
    status: str
    artifacts: List[Artifact]


class ResultReply(_ResultReplyRequired, total=False):
    error: ApiErrorBody


class _ModelInfoRequired(TypedDict):
    name: str
    engine: str
    max_attempts: int
    timeout_ms: int
    required_inputs: List[str]
    slots: List[str]
    warm_on: List[str]
    params: List[Dict[str, Any]]


class ModelInfo(_ModelInfoRequired, total=False):
    nodes: List[str]
    """The live nodes that serve it (any node accepts its submits)."""
    conflict: bool
    """Two of those nodes declare it differently (the longest-running node's definition holds)."""


class ModelsReply(TypedDict):
    """`models()`: the cluster's models, sorted by name."""

    models: List[ModelInfo]


class KeyQueue(TypedDict):
    """One fair-share key's queue in a lane: its label value (None: the jobs without it)."""

    key: Optional[str]
    queued: int
    running: int


class _LaneQueueRequired(TypedDict):
    lane: str
    queued: int
    running: int


class LaneQueue(_LaneQueueRequired, total=False):
    """One lane (`high`, `normal`) of a model's queue: jobs waiting, jobs delivered."""

    keys: List[KeyQueue]
    """By fair-share key, most queued first; absent when no key has jobs."""


class _ModelQueueRequired(TypedDict):
    model: str
    queued: int
    lanes: List[LaneQueue]
    running: int
    slots: int
    busy_slots: int
    service_samples: int
    desired_slots: int


class ModelQueue(_ModelQueueRequired, total=False):
    """One model's queue (docs/PROTOCOL.md, `kiln.api.queue`, says how exact each figure is)."""

    oldest_wait_ms: int
    """Absent when nothing waits."""
    mean_service_ms: int
    """Absent before any job of the model finished."""


class QueueReply(TypedDict):
    """`queue()`: each model's queue, sorted by name, and the target wait of `desired_slots`."""

    measured_ms: int
    target_wait_s: int
    models: List[ModelQueue]


class ListJobsReply(TypedDict):
    """`jobs()`: the jobs, newest first."""

    jobs: List["JobView"]


class _ResidentModelRequired(TypedDict):
    model: str
    bytes: int
    #: "declared", "measured" or "estimated".
    source: str


class ResidentModel(_ResidentModelRequired, total=False):
    """One model resident on a slot and the bytes its memory budget counts for it."""

    measured_bytes: int
    pinned: bool


class _GpuEntryRequired(TypedDict):
    node: str
    slot: str
    state: str
    models: List[str]
    warm_models: List[str]
    restarts: int
    heartbeat_ms: int


class GpuEntry(_GpuEntryRequired, total=False):
    current_job: str
    last_error: str
    group: List[str]
    memory_budget_bytes: int
    resident: List[ResidentModel]


class _NodeEntryRequired(TypedDict):
    node: str
    version: str
    slots: List[str]
    started_ms: int
    heartbeat_ms: int
    running_jobs: int


class NodeEntry(_NodeEntryRequired, total=False):
    peers: List[str]
    models: List[Dict[str, Any]]


class ClusterReply(TypedDict):
    nodes: List[NodeEntry]
    gpus: List[GpuEntry]


class BatchItem(TypedDict, total=False):
    """One item of `submit_batch`: its inputs, and its own params and labels (each over the
    batch's)."""

    inputs: Dict[str, InputValue]
    params: Dict[str, JSON]
    labels: Dict[str, str]


class BatchItemRef(TypedDict):
    index: int
    job_id: str


class _BatchReplyRequired(TypedDict):
    batch_id: str
    items: List[BatchItemRef]
    duplicate: bool


class BatchReply(_BatchReplyRequired, total=False):
    retry_of: str


class BatchSummary(TypedDict):
    status: str
    total: int
    completed: int
    failed: int
    cancelled: int


class _BatchItemViewRequired(TypedDict):
    index: int
    job_id: str
    status: str
    artifacts: List[Artifact]


class BatchItemView(_BatchItemViewRequired, total=False):
    error: ApiErrorBody
    labels: Dict[str, str]


class _BatchViewRequired(TypedDict):
    batch_id: str
    model: str
    status: str
    summary: BatchSummary
    created_ms: int
    items: List[BatchItemView]


class BatchView(_BatchViewRequired, total=False):
    finished_ms: int
    retry_of: str
    retried_by: str
    fallback_models: List[str]
    max_concurrency: int
    reuse: bool


class _BatchItemEventRequired(TypedDict):
    index: int
    job_id: str
    status: str


class BatchItemEvent(_BatchItemEventRequired, total=False):
    artifacts: List[Artifact]
    labels: Dict[str, str]


@dataclasses.dataclass(frozen=True)
class Event:
    """One event of a job (`kiln.events.<job_id>`) or a batch (`kiln.events.<batch_id>`).

    `seq` is its sequence in the events stream (`KILN_EVENTS`): pass the last one seen as
    `after_seq` to `events()` to continue exactly after it. The other fields are the event's
    JSON fields (docs/PROTOCOL.md, "Progress events"); `raw` is the whole object.
    """

    seq: int
    job_id: str
    attempt: int
    type: str
    ts_ms: int
    status: Optional[str] = None
    stage: Optional[str] = None
    progress: Optional[float] = None
    message: Optional[str] = None
    artifact: Optional[Artifact] = None
    error: Optional[ApiErrorBody] = None
    item: Optional[BatchItemEvent] = None
    summary: Optional[BatchSummary] = None
    labels: Optional[Dict[str, str]] = None
    reason: Optional[RetryReason] = None
    """`type == "retrying"` only: why attempt `attempt` runs (`message` says it in words). A
    code this client does not know (a newer cluster's) is kept as sent."""
    raw: Mapping[str, JSON] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        """True for the event that ends a history: a job's terminal status, a batch's
        `batch_finished`. Nothing follows it."""
        if self.type == "status":
            return self.status in TERMINAL_STATUSES
        return self.type == "batch_finished"

    @classmethod
    def from_json(cls, seq: int, obj: Mapping[str, JSON]) -> "Event":
        def opt(key: str) -> Any:
            return obj.get(key)

        progress = opt("progress")
        return cls(
            seq=seq,
            job_id=str(obj.get("job_id", "")),
            attempt=int(obj.get("attempt", 0)),
            type=str(obj.get("type", "")),
            ts_ms=int(obj.get("ts_ms", 0)),
            status=opt("status"),
            stage=opt("stage"),
            progress=float(progress) if isinstance(progress, (int, float)) else None,
            message=opt("message"),
            artifact=opt("artifact"),
            error=opt("error"),
            item=opt("item"),
            summary=opt("summary"),
            labels=opt("labels"),
            reason=cast(Optional[RetryReason], opt("reason")),
            raw=dict(obj),
        )


StrPath = Union[str, "os.PathLike[str]"]
"""A file system path: a `str` or a `pathlib.Path`."""

__all__ = [
    "JSON",
    "TERMINAL_STATUSES",
    "JOB_STATUSES",
    "RetryReason",
    "RETRY_REASONS",
    "InputValue",
    "ApiErrorBody",
    "Artifact",
    "SubmitReply",
    "ParentRef",
    "JobView",
    "ResultReply",
    "ModelInfo",
    "LaneQueue",
    "ModelQueue",
    "QueueReply",
    "GpuEntry",
    "ResidentModel",
    "NodeEntry",
    "ClusterReply",
    "BatchItem",
    "BatchItemRef",
    "BatchReply",
    "BatchSummary",
    "BatchItemView",
    "BatchView",
    "BatchItemEvent",
    "Event",
    "StrPath",
]


class Preview(TypedDict):
    """A job's live preview (docs/PROTOCOL.md "Live previews"): a small image of its work in
    progress, from the headers and body of its message on `kiln.previews.<job_id>`."""

    job_id: str
    attempt: int
    #: 1, 2, ... among the attempt's previews that the node let through.
    seq: int
    content_type: str
    #: When the node let it through, Unix ms.
    ts_ms: int
    data: bytes
