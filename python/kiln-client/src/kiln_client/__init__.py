"""A Python client for Kiln, over plain NATS (nats-py).

Two faces, one API (docs/PROTOCOL.md is the contract underneath):

| name                        | what                                                          |
| --------------------------- | ------------------------------------------------------------- |
| `connect`, `AsyncClient`    | asyncio: `kiln = await kiln_client.connect(url)`              |
| `Client`                    | blocking, its own event loop on a background thread          |
| `KilnError`, `ErrorCode`    | every failure, with a stable `.code` and a `.message`         |
| `ChecksumError`             | a download whose sha256 is not the one Kiln recorded          |
| `Event`                     | one job or batch event, with `seq` to resume from             |
| `types`                     | the replies as `TypedDict`s (`JobView`, `BatchView`, ...)      |

    import kiln_client

    with kiln_client.Client("nats://127.0.0.1:4222") as kiln:
        job = kiln.submit("demo", {"prompt": "a red fox"}, {"steps": 8}, files={"image": "fox.png"})
        view = kiln.wait(job["job_id"], on_event=lambda e: print(e.type, e.status or e.stage))
        print(kiln.download(view, "results/"))
"""

from ._async_client import AsyncClient, connect
from ._sync_client import Client
from .errors import ChecksumError, ErrorCode, KilnError
from .types import (
    RETRY_REASONS,
    TERMINAL_STATUSES,
    ApiErrorBody,
    Artifact,
    BatchItem,
    BatchItemView,
    BatchReply,
    BatchView,
    ClusterReply,
    Event,
    GpuEntry,
    JobView,
    ListJobsReply,
    ModelInfo,
    ModelQueue,
    ModelsReply,
    NodeEntry,
    Preview,
    QueueReply,
    ResultReply,
    RetryReason,
    SubmitReply,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "connect",
    "KilnError",
    "ChecksumError",
    "ErrorCode",
    "Event",
    "TERMINAL_STATUSES",
    "RETRY_REASONS",
    "RetryReason",
    "ApiErrorBody",
    "Artifact",
    "BatchItem",
    "BatchItemView",
    "BatchReply",
    "BatchView",
    "ClusterReply",
    "GpuEntry",
    "JobView",
    "ListJobsReply",
    "ModelInfo",
    "ModelQueue",
    "QueueReply",
    "ModelsReply",
    "NodeEntry",
    "Preview",
    "ResultReply",
    "SubmitReply",
    "__version__",
]
