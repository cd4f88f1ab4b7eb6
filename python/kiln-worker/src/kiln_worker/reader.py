"""The stdin reader: a thread that reads Kiln's lines while the main thread runs a job, so a
`cancel` is seen at once."""

from __future__ import annotations

import json
import queue
import threading
from typing import BinaryIO, Callable, Dict, Optional, Union

from .job import Job
from .protocol import MAX_STDIN_LINE_BYTES, LineWriter

__all__ = ["EOF", "StdinReader"]


class _Eof:
    def __repr__(self) -> str:
        return "EOF"


#: Marks the end of stdin in the job queue.
EOF = _Eof()

class StdinReader(threading.Thread):
    """Reads stdin until it ends. Job lines go into the job queue; a cancel line sets the
    cancel flag of the job it names.

    Kiln sends one job at a time, so the jobs in `_active` are the one running and at most one
    not yet started; a cancel for any other id (a job that already ended) is ignored. For the
    same reason the job queue is unbounded: it never holds more than a couple.
    """

    def __init__(
        self, stdin: BinaryIO, writer: LineWriter, jobs: "queue.Queue[Union[Job, _Eof]]", diag: Callable[[str], None]
    ) -> None:
        super().__init__(name="kiln-worker-stdin", daemon=True)
        self._stdin = stdin
        self._writer = writer
        self._jobs = jobs
        self._diag = diag
        self._lock = threading.Lock()
        # job_id -> Job, from its line until the main thread has ended it.
        self._active: Dict[str, Job] = {}

    def finished(self, job: Job) -> None:
        """The main thread ended `job`: a later cancel for it is stale."""
        with self._lock:
            if self._active.get(job.job_id) is job:
                del self._active[job.job_id]

    def run(self) -> None:
        try:
            while True:
                raw = self._stdin.readline(MAX_STDIN_LINE_BYTES + 1)
                if not raw:
                    break
                if len(raw) > MAX_STDIN_LINE_BYTES and not raw.endswith(b"\n"):
                    # Skip the rest of the over-long line, then carry on with the next one.
                    while raw and not raw.endswith(b"\n"):
                        raw = self._stdin.readline(MAX_STDIN_LINE_BYTES)
                    self._warn(f"ignored a stdin line over {MAX_STDIN_LINE_BYTES} bytes")
                    continue
                self._handle(raw.decode("utf-8", errors="replace").strip())
        except Exception as e:  # never let the reader die silently
            self._diag(f"stdin reader failed: {e!r}")
        self._jobs.put(EOF)

    def _warn(self, message: str, job_id: Optional[str] = None) -> None:
        self._diag(message)
        if job_id is None:
            self._writer.send({"type": "log", "message": f"warning: {message}"})
        else:
            self._writer.send({"type": "log", "job_id": job_id, "message": f"warning: {message}"})

    def _handle(self, text: str) -> None:
        if not text:
            return
        try:
            line = json.loads(text)
        except ValueError:
            self._warn(f"ignored a stdin line that is not JSON: {text[:200]!r}")
            return
        if not isinstance(line, dict):
            self._warn(f"ignored a stdin line that is not a JSON object: {text[:200]!r}")
            return
        kind = line.get("type")
        job_id = line.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            self._warn(f"ignored a {kind!r} line without a job_id")
            return
        if kind == "job":
            job = Job(line, self._writer)
            with self._lock:
                self._active[job.job_id] = job
            self._jobs.put(job)
        elif kind == "cancel":
            with self._lock:
                cancelled = self._active.get(job_id)
            if cancelled is None:
                self._diag(f"cancel for job {job_id}, which is not running: ignored")
            else:
                cancelled._request_cancel()
        else:
            self._warn(f"ignored a line of unknown type {kind!r}", job_id)
