"""The exceptions a model raises to tell Kiln how a job ended.

The SDK turns each into the protocol line Kiln expects:

| raised by `run(job)`            | line                                   | Kiln                          |
| ------------------------------- | -------------------------------------- | ----------------------------- |
| `UserError` (alias `InputError`) | `{"type":"error","retryable":false}`  | the job fails at once, `bad_request` |
| `RetryableError`                | `{"type":"error","retryable":true}`    | the job is retried            |
| any other `Exception`           | `{"type":"error","retryable":true}`    | retried; traceback on stderr  |
| `Cancelled`                     | `{"type":"cancelled"}`                 | the job ends `cancelled`      |
"""

from __future__ import annotations

__all__ = ["ArtifactNameError", "Cancelled", "InputError", "RetryableError", "UserError"]


class UserError(Exception):
    """The job's request is wrong (a missing input, a param out of range, a file that is not
    an image): retrying cannot help, so the job fails at once (`retryable: false`; the job's
    error code is `bad_request`). The message is what the client sees: name the input or param
    and say what was expected."""


InputError = UserError
"""Another name for `UserError`, for code that reads better with it."""


class RetryableError(Exception):
    """A transient failure (out of GPU memory, a dependency that is down): Kiln retries the job,
    with backoff, until the model's `max_attempts` are used (`retryable: true`)."""


class Cancelled(BaseException):
    """Kiln cancelled the job: raised by `Job.check_cancelled()` and `Job.sleep()`. The SDK
    answers `cancelled`.

    It derives from `BaseException`, as `asyncio.CancelledError` does, so that a model's
    `except Exception:` around a step does not swallow it; if you catch it, raise it again."""


class ArtifactNameError(ValueError):
    """An artifact name that is not a plain file name (1 to 256 of `A-Z a-z 0-9 - _ .`, not `.`
    or `..`). It is raised where the name is first used (`Job.output_path`, `Job.write_bytes`,
    ...), before any file is written; like any bug in the worker, the job then fails with a
    retryable error."""
