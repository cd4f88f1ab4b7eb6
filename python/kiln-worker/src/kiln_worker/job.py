"""`Job`: one job as `run(job)` sees it: its inputs and params, progress and logs, cancel, and
the files it writes."""

from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
from collections.abc import Iterable as AnyIterable
from collections.abc import Mapping as AnyMapping
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from .artifacts import Artifact, check_artifact_name
from .errors import Cancelled, UserError
from .protocol import DEFAULT_PREVIEW_INTERVAL_MS, MAX_MESSAGE_CHARS, MAX_PREVIEW_BYTES, MAX_STAGE_CHARS, LineWriter, clip

__all__ = ["Job", "RunResult"]

#: What `run(job)` may return: None (the files written with `Job.write_*` and `Job.artifact`,
#: in order), or the artifacts themselves: an `Artifact`, a file name in the output directory,
#: a `{"name", "path", "content_type"}` mapping, or a list of those.
RunResult = Union[None, Artifact, str, Iterable[Union[Artifact, str, Mapping[str, Any]]]]


class Job:
    """One job, from its `job` line to the line that ends it.

    Kiln's job line is taken as it came; `inputs`, `params` and `output_dir` are checked when
    the model first reads them, and a malformed one raises `UserError` there.
    """

    def __init__(self, line: Mapping[str, Any], writer: LineWriter) -> None:
        job_id = line.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError("a job line needs a job_id")
        #: Kiln's id of the job (the same in every attempt).
        self.job_id: str = job_id
        attempt = line.get("attempt", 1)
        #: 1 for the first attempt, 2 for the first retry, ...
        self.attempt: int = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1
        model = line.get("model")
        #: The model's name in Kiln's config.
        self.model: Optional[str] = model if isinstance(model, str) else os.environ.get("KILN_MODEL")
        #: The job line as Kiln sent it, for fields this class does not name.
        self.raw: Dict[str, Any] = dict(line)
        self._writer = writer
        # Set by the stdin reader when Kiln sends `cancel` for this job.
        self._cancel = threading.Event()
        # Artifacts recorded by write_* and artifact(), by name, in the order first written.
        self._recorded: Dict[str, Artifact] = {}
        interval = line.get("preview_interval_ms", DEFAULT_PREVIEW_INTERVAL_MS)
        #: At most one preview per this many ms reaches Kiln (the model's `preview_interval_ms`,
        #: from the job line); 0: previews are off.
        self.preview_interval_ms: int = (
            interval if isinstance(interval, int) and not isinstance(interval, bool) and interval >= 0 else DEFAULT_PREVIEW_INTERVAL_MS
        )
        # When the last preview went (monotonic ms), None before the first.
        self._last_preview: Optional[int] = None
        self._preview_lock = threading.Lock()

        tp = line.get("traceparent")
        #: The W3C `traceparent` of Kiln's span around this run (None for a job without a
        #: trace): parent your own spans on it. Also `TRACEPARENT` while `run(job)` runs.
        self.traceparent: Optional[str] = tp if isinstance(tp, str) and tp else None
        ts = line.get("tracestate")
        #: The W3C `tracestate` that goes with it, if the caller sent one.
        self.tracestate: Optional[str] = ts if isinstance(ts, str) and ts else None

    def __repr__(self) -> str:
        return f"Job(job_id={self.job_id!r}, attempt={self.attempt})"

    def span(self, name: str, **attributes: Any) -> Any:
        """A context manager: a span named `name` in the job's trace (a child of the SDK's
        `kiln.worker.run`), exported when OpenTelemetry is installed and
        `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise it does nothing. Yields the span, or
        None.

            with job.span("denoise", steps=20):
                ...
        """
        from .trace import tracing

        return tracing.span(name, self.traceparent, self.tracestate, dict(attributes, job_id=self.job_id))

    # -----------------------------------------------------------------------------------------
    # Inputs and params

    @property
    def inputs(self) -> Dict[str, Any]:
        """The job's inputs: inline values as submitted; each uploaded file as
        `{"path": "/abs/file"}`, a local copy (see `input_path`)."""
        inputs = self.raw.get("inputs", {})
        if not isinstance(inputs, dict):
            raise UserError("inputs must be a JSON object")
        return inputs

    @property
    def params(self) -> Dict[str, Any]:
        """The job's params, as submitted."""
        params = self.raw.get("params", {})
        if not isinstance(params, dict):
            raise UserError("params must be a JSON object")
        return params

    @property
    def output_dir(self) -> Path:
        """The directory, owned by this job, where its artifacts go (it may not exist yet:
        `output_path` and the `write_*` helpers create it)."""
        output_dir = self.raw.get("output_dir")
        if not isinstance(output_dir, str) or not output_dir:
            raise UserError("the job line names no output_dir")
        return Path(output_dir)

    def input_path(self, name: str) -> Path:
        """The local path of the uploaded file input `name` (submitted as `{"object": ..}`,
        handed over as `{"path": ..}`). Raises `UserError` naming the input when it is missing
        or not a file."""
        value = self.inputs.get(name)
        if value is None:
            raise UserError(f'input {name} is required: a file ({{"path": ..}})')
        if not (isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]):
            raise UserError(f'input {name} must be a file ({{"path": ..}}), got {json.dumps(value)[:200]}')
        return Path(value["path"])

    def int_param(self, name: str, default: Optional[int] = None, low: Optional[int] = None, high: Optional[int] = None) -> int:
        """Param `name`, an integer within `low`..`high` (each bound optional), or `default`
        when absent. Raises `UserError` otherwise (or when absent without a default)."""
        value = self._param(name, default, "an integer")
        # bool is an int in Python; JSON true is not a number of steps.
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"param {name} must be an integer, got {json.dumps(value)}")
        _check_range(name, value, low, high)
        return value

    def number_param(
        self, name: str, default: Optional[float] = None, low: Optional[float] = None, high: Optional[float] = None
    ) -> float:
        """Param `name`, a number (integer or not) within `low`..`high`, or `default` when
        absent. The value is returned as submitted (an int stays an int)."""
        value = self._param(name, default, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise UserError(f"param {name} must be a number, got {json.dumps(value)}")
        _check_range(name, value, low, high)
        return value

    def bool_param(self, name: str, default: Optional[bool] = None) -> bool:
        """Param `name`, true or false, or `default` when absent."""
        value = self._param(name, default, "true or false")
        if not isinstance(value, bool):
            raise UserError(f"param {name} must be true or false")
        return value

    def _param(self, name: str, default: Any, kind: str) -> Any:
        params = self.params
        if name in params:
            return params[name]
        if default is None:
            raise UserError(f"param {name} is required: {kind}")
        return default

    # -----------------------------------------------------------------------------------------
    # Progress, logs and cancel

    def progress(self, percent: Optional[float] = None, *, stage: Optional[str] = None, message: Optional[str] = None) -> None:
        """Reports progress: a percentage (clamped to 0-100), the stage the job is in
        (`downloading`, `inference`, ...) and a message (`step 8/20`); each may be left out.
        Kiln publishes it as a `progress` event."""
        line: Dict[str, Any] = {"type": "progress", "job_id": self.job_id}
        if stage is not None:
            line["stage"] = clip(str(stage), MAX_STAGE_CHARS)
        if percent is not None:
            if isinstance(percent, bool) or not isinstance(percent, (int, float)):
                raise TypeError(f"progress percent must be a number, got {percent!r}")
            if not math.isnan(percent):
                # Clamped without changing the type of an in-range value (100.0 stays 100.0).
                line["progress"] = 0 if percent < 0 else 100 if percent > 100 else percent
        if message is not None:
            line["message"] = clip(str(message), MAX_MESSAGE_CHARS)
        self._writer.send(line)

    def log(self, message: str) -> None:
        """A log line for this job, published as a `message` event (clients see it; for
        diagnostics that only operators need, print to stderr instead)."""
        self._writer.send({"type": "log", "job_id": self.job_id, "message": clip(str(message), MAX_MESSAGE_CHARS)})

    def preview_due(self) -> bool:
        """True when a preview sent now would go out: none went yet, or the model's
        `preview_interval_ms` passed since the last one. Check it before encoding an image, so a
        step that would be dropped costs nothing."""
        return _preview_due(self._last_preview, _now_ms(), self.preview_interval_ms)

    def preview(self, data: bytes, content_type: str = "image/png") -> bool:
        """Shows `data`, a small image of the job in progress (an intermediate step), to whoever
        follows the job, live: not an artifact, not kept beyond the newest one. At most one per
        the model's `preview_interval_ms` goes (Kiln enforces the same on its side): a preview
        sent sooner than that after the last one is dropped. True if it went, False if dropped.
        Raises ValueError over MAX_PREVIEW_BYTES (256 KiB): send a smaller image."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a preview is bytes (an encoded image), got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise ValueError("a preview needs some bytes")
        if len(data) > MAX_PREVIEW_BYTES:
            raise ValueError(f"a preview of {len(data)} bytes is over the {MAX_PREVIEW_BYTES}-byte limit: send a smaller image")
        with self._preview_lock:
            now = _now_ms()
            if not _preview_due(self._last_preview, now, self.preview_interval_ms):
                return False
            self._last_preview = now
        line = {"type": "preview", "job_id": self.job_id, "content_type": clip(str(content_type), 100), "data": base64.b64encode(data).decode("ascii")}
        self._writer.send(line)
        return True

    @property
    def cancelled(self) -> bool:
        """True once Kiln asked to cancel this job."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raises `Cancelled` if Kiln asked to cancel this job. Call it between steps: a worker
        that has not answered 3 s after a cancel is killed (and reloaded for the next job)."""
        if self._cancel.is_set():
            raise Cancelled()

    def sleep(self, seconds: float) -> None:
        """Waits `seconds`, raising `Cancelled` as soon as Kiln cancels the job."""
        if self._cancel.wait(max(0.0, seconds)):
            raise Cancelled()

    def wait_cancelled(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the job is cancelled or `timeout` passes; True if it was cancelled (for
        a thread that watches for the cancel while another computes)."""
        return self._cancel.wait(timeout)

    def _request_cancel(self) -> None:
        self._cancel.set()

    # -----------------------------------------------------------------------------------------
    # Outputs

    def output_path(self, name: str) -> Path:
        """Where to write the artifact `name` (a plain file name, checked now), creating the
        output directory. Record it with `artifact(name)` or return it from `run`."""
        check_artifact_name(name)
        output_dir = self.output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        return output_dir / name

    def write_bytes(self, name: str, data: bytes, content_type: Optional[str] = None) -> Artifact:
        """Writes `data` as the artifact `name` and records it (`content_type` None lets Kiln
        guess from the extension)."""
        self.output_path(name).write_bytes(data)
        return self._record(Artifact(name, name, content_type))

    def write_text(self, name: str, text: str, content_type: Optional[str] = None, encoding: str = "utf-8") -> Artifact:
        """Writes `text` as the artifact `name` and records it."""
        return self.write_bytes(name, text.encode(encoding), content_type)

    def write_json(self, name: str, value: Any, content_type: Optional[str] = "application/json", indent: Optional[int] = 2) -> Artifact:
        """Writes `value` as JSON (`json.dumps(value, indent=indent)`) as the artifact `name`
        and records it."""
        return self.write_text(name, json.dumps(value, indent=indent), content_type)

    def artifact(self, name: str, content_type: Optional[str] = None) -> Artifact:
        """Records the artifact `name`, a file the model wrote itself at `output_path(name)`."""
        artifact = Artifact(name, name, content_type)
        _check_exists(artifact, self.output_dir)
        return self._record(artifact)

    @property
    def artifacts(self) -> List[Artifact]:
        """The artifacts recorded so far, in the order first written."""
        return list(self._recorded.values())

    def _record(self, artifact: Artifact) -> Artifact:
        # Writing a name again replaces its file; it keeps its place in the result.
        self._recorded[artifact.name] = artifact
        return artifact

    def _result(self, outcome: RunResult) -> List[Artifact]:
        """The artifacts of the result line, from what `run` returned; checked here so that a
        mistake shows as a clear error instead of Kiln's refusal."""
        if outcome is None:
            return self.artifacts
        items: Iterable[Any] = [outcome] if isinstance(outcome, (Artifact, str)) else outcome
        if isinstance(outcome, (bytes, AnyMapping)) or not isinstance(items, AnyIterable):
            raise TypeError(
                f"run(job) returned {type(outcome).__name__}: return None, an Artifact, a file name, or a list of those"
            )
        output_dir = self.output_dir
        artifacts: List[Artifact] = []
        for item in items:
            if isinstance(item, Artifact):
                artifact = item
            elif isinstance(item, str):
                artifact = self._recorded.get(item) or Artifact(item, item)
            elif isinstance(item, AnyMapping):
                name = item.get("name")
                artifact = Artifact(name, item.get("path", name), item.get("content_type"))  # type: ignore[arg-type]
            else:
                raise TypeError(f"run(job) returned an artifact of type {type(item).__name__}: use an Artifact, a file name or a mapping")
            _check_exists(artifact, output_dir)
            if any(a.name == artifact.name for a in artifacts):
                raise ValueError(f"run(job) returned artifact {artifact.name!r} twice")
            artifacts.append(artifact)
        return artifacts


def _now_ms() -> int:
    """Monotonic milliseconds, whole: the interval is compared exactly, as Kiln does."""
    return time.monotonic_ns() // 1_000_000


def _preview_due(last_ms: Optional[int], now_ms: int, interval_ms: int) -> bool:
    """Kiln's rule (`kiln_contract::preview::preview_due`): the first preview goes, then one
    per interval; an interval of 0 lets none through."""
    if interval_ms <= 0:
        return False
    return last_ms is None or now_ms - last_ms >= interval_ms


def _check_range(name: str, value: float, low: Optional[float], high: Optional[float]) -> None:
    if (low is None or value >= low) and (high is None or value <= high):
        return
    if low is not None and high is not None:
        raise UserError(f"param {name} must be between {low} and {high}, got {value}")
    if low is not None:
        raise UserError(f"param {name} must be at least {low}, got {value}")
    raise UserError(f"param {name} must be at most {high}, got {value}")


def _check_exists(artifact: Artifact, output_dir: Path) -> None:
    """Kiln takes only regular files inside the job's output directory."""
    path = artifact.file(output_dir)
    if not path.is_file():
        raise ValueError(f"artifact {artifact.name!r}: {path} is not a file (write it to job.output_path({artifact.name!r}))")
    try:
        path.resolve().relative_to(output_dir.resolve())
    except ValueError:
        raise ValueError(f"artifact {artifact.name!r}: {path} lies outside the job's output directory {output_dir}") from None
