"""kiln_worker: write a model worker for Kiln's `process` engine in Python.

The model author writes `load()` and `run(job)`; the SDK speaks the worker protocol
(docs/PROTOCOL.md, "The process engine worker protocol"): it says `ready` after the load, reads
stdin on a thread of its own so a `cancel` is seen while a job runs, runs one job at a time,
turns exceptions into retryable or final errors, and keeps stdout for protocol lines only.

    from kiln_worker import Worker

    class Upper(Worker):
        def load(self):
            self.table = str.maketrans("abc", "ABC")   # the model, loaded once

        def run(self, job):
            job.progress(50, stage="inference")
            job.write_text("upper.txt", job.inputs["text"].translate(self.table))

    if __name__ == "__main__":
        Upper().serve()

Modules:

| module      | what                                                                          |
| ----------- | ----------------------------------------------------------------------------- |
| `worker`    | `Worker` (`load`, `run`, `serve`) and `serve(run, load=..)`: the process's life |
| `job`       | `Job`: inputs, params, progress, logs, cancel, output files                   |
| `errors`    | `UserError` (`InputError`), `RetryableError`, `Cancelled`, `ArtifactNameError` |
| `artifacts` | `Artifact` and the artifact name rule                                         |
| `reader`    | the stdin reader thread (job and cancel lines)                                |
| `protocol`  | the line writer and the protocol's limits                                     |
| `trace`     | the job's W3C trace: `TRACEPARENT` while it runs, spans when OpenTelemetry is set up |
"""

from __future__ import annotations

from .artifacts import MAX_ARTIFACT_NAME_BYTES, Artifact, check_artifact_name
from .errors import ArtifactNameError, Cancelled, InputError, RetryableError, UserError
from .job import Job, RunResult
from .protocol import MAX_LINE_BYTES, MAX_MESSAGE_CHARS
from .worker import Worker, serve

__version__ = "0.1.0"

__all__ = [
    "MAX_ARTIFACT_NAME_BYTES",
    "MAX_LINE_BYTES",
    "MAX_MESSAGE_CHARS",
    "Artifact",
    "ArtifactNameError",
    "Cancelled",
    "InputError",
    "Job",
    "RetryableError",
    "RunResult",
    "UserError",
    "Worker",
    "check_artifact_name",
    "serve",
]
