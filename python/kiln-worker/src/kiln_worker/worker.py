"""`Worker`: the process's life: take stdio, load, say ready, run jobs one at a time until stdin
ends, and turn each job's outcome into its protocol line."""

from __future__ import annotations

import os
import queue
import sys
import traceback
from pathlib import Path
from typing import BinaryIO, Callable, Optional, TextIO, Tuple, Union

from .errors import Cancelled, RetryableError, UserError
from .job import Job, RunResult
from .protocol import MAX_MESSAGE_CHARS, LineWriter, clip
from .reader import StdinReader, _Eof
from .trace import job_environment, tracing

__all__ = ["Worker", "serve"]


class Worker:
    """A model hosted by Kiln's `process` engine. Subclass it, write `load()` and `run(job)`,
    and call `serve()`:

        class Upper(Worker):
            def run(self, job):
                job.write_text("upper.txt", job.inputs["text"].upper())

        if __name__ == "__main__":
            Upper().serve()
    """

    #: The name diagnostics on stderr start with; None: the script's file name without `.py`.
    name: Optional[str] = None

    def load(self) -> None:
        """Loads the model, once per process, before the first job. An exception here exits
        the process with status 1 without saying ready, and Kiln fails the attempt (and
        retries it, as an infrastructure error)."""

    def warmup(self) -> None:
        """Runs once after `load()` and before the worker says ready: a first pass through the
        model (a dummy input, a compile, a cache fill) so that the first real job does not pay
        for it. Kiln counts it as part of the load: a model kept warm by `min_warm` is loaded
        and warmed before its first job arrives. An exception here is treated like one in
        `load()`. Default: nothing."""

    def report_memory(self, nbytes: int) -> None:
        """Tells Kiln how many bytes of GPU memory this worker holds (a `memory` line). On a
        `cuda:N` slot the slot's memory budget counts it for a model that declares no
        `memory_bytes`. Call it from `load()`, `warmup()` or `run()`, whenever it changes much.
        Not needed with PyTorch: after the warm-up the SDK reports CUDA's reserved memory
        itself unless this was called."""
        self._memory_reported = True
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.send({"type": "memory", "bytes": max(0, int(nbytes))})

    def run(self, job: Job) -> RunResult:
        """Runs one job. Report progress with `job.progress`, check `job.check_cancelled()`
        between steps, write artifacts with `job.write_bytes` (or to `job.output_path(name)`),
        and return None (the artifacts written) or the artifacts. Raise `UserError` for a bad
        request, `RetryableError` for a transient failure."""
        raise NotImplementedError("a Worker subclass must define run(job)")

    def diag(self, message: str) -> None:
        """A diagnostic for people: stderr only (Kiln logs it at debug level and keeps its tail
        to explain a crash), never the protocol channel."""
        name = self.name or Path(sys.argv[0] or "worker").stem or "worker"
        print(f"{name}[{os.getpid()}]: {message}", file=sys.stderr, flush=True)

    def serve(self, *, stdin: Optional[BinaryIO] = None, stdout: Optional[TextIO] = None) -> None:
        """Serves Kiln until stdin ends: loads, prints ready, then runs jobs one at a time
        (jobs already received still run after stdin ends, so piping lines in by hand works).

        By default it speaks on the process's own stdin and stdout, which it takes over first:
        afterwards the process's stdout (`print`, C libraries, child processes) goes to stderr
        and its stdin reads nothing, so nothing but the SDK can write to or read from Kiln's
        channel. `stdin` and `stdout` give it other streams instead (for tests), untouched."""
        if stdin is None or stdout is None:
            stdin, stdout = _take_stdio()
        writer = LineWriter(stdout)
        self._writer = writer
        try:
            self._load()
            jobs: "queue.Queue[Union[Job, _Eof]]" = queue.Queue()
            reader = StdinReader(stdin, writer, jobs, self.diag)
            reader.start()
            writer.send({"type": "ready"})
            self.diag("ready")
            while True:
                job = jobs.get()
                if isinstance(job, _Eof):
                    self.diag("stdin closed; exiting")
                    return
                try:
                    self._run_job(job, writer)
                finally:
                    reader.finished(job)
        except KeyboardInterrupt:
            pass

    def _load(self) -> None:
        try:
            self.load()
            self.warmup()
        except Exception as e:
            self.diag(f"load failed: {e!r}\n{traceback.format_exc().rstrip()}")
            raise SystemExit(1) from None
        if not getattr(self, "_memory_reported", False):
            nbytes = _cuda_reserved_bytes()
            if nbytes:
                self.report_memory(nbytes)

    def _run_job(self, job: Job, writer: LineWriter) -> None:
        """Runs `job` and writes the one line that ends it."""
        if job.cancelled:
            # Cancelled while it waited behind the previous job.
            writer.send({"type": "cancelled", "job_id": job.job_id})
            return
        try:
            with job_environment(job.traceparent, job.tracestate), tracing.span(
                "kiln.worker.run", job.traceparent, job.tracestate, {"job_id": job.job_id, "attempt": job.attempt}
            ):
                outcome = self.run(job)
            line = {"type": "result", "job_id": job.job_id, "artifacts": [a.to_wire() for a in job._result(outcome)]}
            writer.send(line)
        except Cancelled:
            if job.cancelled:
                writer.send({"type": "cancelled", "job_id": job.job_id})
            else:
                # Only Kiln cancels a job; a model that raised Cancelled itself has a bug.
                self._error(writer, job, "worker error: run(job) raised Cancelled, but Kiln did not cancel the job", retryable=True)
        except UserError as e:
            self._error(writer, job, _message(e), retryable=False)
        except RetryableError as e:
            self._error(writer, job, _message(e), retryable=True)
        except Exception as e:
            # Also a result line over the protocol's limit (LineTooLong, a ValueError), which
            # Kiln itself would treat as a broken worker.
            if job.cancelled:
                # Stopping for the cancel is what made it fail (a closed stream, a killed child).
                self.diag(f"job {job.job_id} failed after its cancel: {e!r}")
                writer.send({"type": "cancelled", "job_id": job.job_id})
                return
            # An unexpected failure is the worker's, not the user's (a full disk, a bug): let
            # Kiln retry it, and keep serving. The traceback ends on stderr, whose tail Kiln keeps.
            self.diag(f"job {job.job_id} failed unexpectedly: {e!r}\n{traceback.format_exc().rstrip()}")
            where = _where(e)
            self._error(writer, job, f"worker error: {e!r}" + (f" at {where}" if where else ""), retryable=True)

    def _error(self, writer: LineWriter, job: Job, message: str, retryable: bool) -> None:
        writer.send({"type": "error", "job_id": job.job_id, "message": clip(message, MAX_MESSAGE_CHARS), "retryable": retryable})


class _FunctionWorker(Worker):
    def __init__(
        self,
        run: Callable[[Job], RunResult],
        load: Optional[Callable[[], None]],
        name: Optional[str],
        warmup: Optional[Callable[[], None]] = None,
    ) -> None:
        self._run = run
        self._load_fn = load
        self._warmup_fn = warmup
        self.name = name

    def load(self) -> None:
        if self._load_fn is not None:
            self._load_fn()

    def warmup(self) -> None:
        if self._warmup_fn is not None:
            self._warmup_fn()

    def run(self, job: Job) -> RunResult:
        return self._run(job)


def serve(
    run: Callable[[Job], RunResult],
    *,
    load: Optional[Callable[[], None]] = None,
    name: Optional[str] = None,
    warmup: Optional[Callable[[], None]] = None,
) -> None:
    """`Worker.serve()` for a worker written as functions: `serve(run, load=load, warmup=warmup)`."""
    _FunctionWorker(run, load, name, warmup).serve()


def _cuda_reserved_bytes() -> int:
    """CUDA's reserved memory summed over the visible devices, when the model imported torch
    and CUDA is there (Kiln sets CUDA_VISIBLE_DEVICES to the slot's GPU); else 0. torch is
    never imported here: a worker that does not use it does not pay for it."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return 0
        return sum(int(torch.cuda.memory_reserved(i)) for i in range(torch.cuda.device_count()))
    except Exception:
        return 0


def _message(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _where(e: BaseException) -> str:
    """`file.py:line in function` of the innermost frame of `e`'s traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def _take_stdio() -> Tuple[BinaryIO, TextIO]:
    """Takes the process's stdin and stdout for the protocol.

    At the file-descriptor level: the protocol gets private copies of fds 0 and 1 (not
    inherited by child processes), fd 1 becomes a copy of stderr and fd 0 reads /dev/null. So a
    stray `print`, a C library's banner or a child process (ffmpeg reads stdin!) can neither
    corrupt Kiln's channel nor eat its lines. Where the streams have no file descriptors (an
    embedding that replaced them), only the Python objects are swapped."""
    try:
        sys.stdout.flush()
        out_fd, in_fd, err_fd = sys.stdout.fileno(), sys.stdin.fileno(), sys.stderr.fileno()
        proto_out = os.dup(out_fd)
        proto_in = os.dup(in_fd)
    except (AttributeError, OSError, ValueError):
        stdin = sys.stdin.buffer
        stdout = sys.stdout
        sys.stdout = sys.stderr
        return stdin, stdout
    os.dup2(err_fd, out_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, in_fd)
    os.close(devnull)
    sys.stdout = sys.stderr
    return open(proto_in, "rb"), open(proto_out, "w", encoding="utf-8", newline="\n")

