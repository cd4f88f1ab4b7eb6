"""The SDK's pieces in-process: names, params, progress lines, and a whole serve() on streams."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
from harness import SRC  # noqa: F401  (puts the checkout's source on the path first)

import kiln_worker
from kiln_worker import Artifact, ArtifactNameError, Cancelled, Job, UserError, Worker, check_artifact_name
from kiln_worker.protocol import MAX_MESSAGE_CHARS, MAX_PREVIEW_BYTES, LineWriter, clip


def test_the_checkout_source_is_tested() -> None:
    assert Path(kiln_worker.__file__).resolve().is_relative_to(SRC.resolve())


@pytest.mark.parametrize("name", ["image.png", "a", "A-Z_0.9", ".hidden", "x" * 256, "..."])
def test_plain_file_names_are_artifact_names(name: str) -> None:
    assert check_artifact_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/abs", "sp ace", "é.png", "x" * 257, "a\\b", 5, None])
def test_other_names_are_refused(name: Any) -> None:
    with pytest.raises(ArtifactNameError, match="is not a plain file name"):
        check_artifact_name(name)


def test_an_artifact_checks_its_name() -> None:
    with pytest.raises(ArtifactNameError):
        Artifact("a/b", "a/b")
    assert Artifact("v.mp4", "v.mp4", "video/mp4").to_wire() == {"name": "v.mp4", "path": "v.mp4", "content_type": "video/mp4"}
    assert Artifact("v.mp4", "/abs/v.mp4").to_wire() == {"name": "v.mp4", "path": "/abs/v.mp4"}


class Lines(io.StringIO):
    def lines(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


def make_job(tmp_path: Path, **line: Any) -> "tuple[Job, Lines]":
    out = Lines()
    fields = {"job_id": "j", "attempt": 2, "inputs": {}, "params": {}, "output_dir": str(tmp_path / "out")}
    fields.update(line)
    return Job(fields, LineWriter(out)), out


def test_params(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, params={"steps": 20, "cfg": 7, "flag": True, "bad": True, "far": 5000, "ratio": 0.5})
    assert job.int_param("steps", 5, 1, 100) == 20
    assert job.int_param("absent", 5) == 5
    assert job.number_param("cfg", 2.5, 0, 20) == 7 and isinstance(job.number_param("cfg"), int)
    assert job.number_param("ratio") == 0.5
    assert job.bool_param("flag", False) is True
    with pytest.raises(UserError, match="^param bad must be an integer, got true$"):
        job.int_param("bad", 1)
    with pytest.raises(UserError, match="^param far must be between 1 and 1024, got 5000$"):
        job.int_param("far", 1, 1, 1024)
    with pytest.raises(UserError, match="^param far must be at most 10, got 5000$"):
        job.int_param("far", 1, high=10)
    with pytest.raises(UserError, match="^param missing is required: an integer$"):
        job.int_param("missing")
    with pytest.raises(UserError, match="^param steps must be true or false$"):
        job.bool_param("steps", False)


def test_a_malformed_job_line_is_a_user_error_where_it_is_read(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, inputs=[1], params="x", output_dir=None)
    with pytest.raises(UserError, match="^inputs must be a JSON object$"):
        job.inputs
    with pytest.raises(UserError, match="^params must be a JSON object$"):
        job.params
    with pytest.raises(UserError, match="^the job line names no output_dir$"):
        job.output_dir


def test_input_path(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, inputs={"image": {"path": "/in/cat.png"}, "prompt": "a cat"})
    assert job.input_path("image") == Path("/in/cat.png")
    with pytest.raises(UserError, match=r'^input audio is required: a file \({"path": ..}\)$'):
        job.input_path("audio")
    with pytest.raises(UserError, match=r'^input prompt must be a file \({"path": ..}\), got "a cat"$'):
        job.input_path("prompt")


def test_progress_lines(tmp_path: Path) -> None:
    job, out = make_job(tmp_path)
    job.progress(40, stage="inference", message="step 8/20")
    job.progress(150.5)
    job.progress(-3, stage="s")
    job.progress(float("nan"), message="m")
    job.progress(stage="x" * 5000)
    job.log("y" * (MAX_MESSAGE_CHARS + 10))
    lines = out.lines()
    assert lines[0] == {"type": "progress", "job_id": "j", "stage": "inference", "progress": 40, "message": "step 8/20"}
    assert lines[1] == {"type": "progress", "job_id": "j", "progress": 100}
    assert lines[2] == {"type": "progress", "job_id": "j", "stage": "s", "progress": 0}
    assert lines[3] == {"type": "progress", "job_id": "j", "message": "m"}
    assert len(lines[4]["stage"]) == 1024
    assert lines[5]["message"] == clip("y" * (MAX_MESSAGE_CHARS + 10), MAX_MESSAGE_CHARS)
    assert len(lines[5]["message"]) == MAX_MESSAGE_CHARS
    with pytest.raises(TypeError):
        job.progress("50")  # type: ignore[arg-type]


def test_previews_go_at_most_once_per_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from kiln_worker import job as job_module

    ms = 1_000_000
    clock = [1000 * ms]
    monkeypatch.setattr(job_module.time, "monotonic_ns", lambda: clock[0])
    job, out = make_job(tmp_path, preview_interval_ms=300)
    assert job.preview_interval_ms == 300
    assert job.preview_due()
    assert job.preview(b"\x89PNG one") is True
    # Sooner than the interval: dropped, and said so before anything is encoded.
    clock[0] += 299 * ms
    assert not job.preview_due()
    assert job.preview(b"two", "image/jpeg") is False
    clock[0] += 1 * ms
    assert job.preview_due()
    assert job.preview(b"three", "image/jpeg") is True
    lines = out.lines()
    assert lines == [
        {"type": "preview", "job_id": "j", "content_type": "image/png", "data": base64.b64encode(b"\x89PNG one").decode()},
        {"type": "preview", "job_id": "j", "content_type": "image/jpeg", "data": base64.b64encode(b"three").decode()},
    ]
    # A flood over two simulated seconds lets through one per interval, the first included.
    job, out = make_job(tmp_path, preview_interval_ms=300)
    sent = 0
    for _ in range(200):
        sent += job.preview(b"x")
        clock[0] += 10 * ms
    assert sent == 7 and len(out.lines()) == 7  # at 0, 0.3, ..., 1.8 s of 2 s


def test_previews_off_too_big_or_not_bytes(tmp_path: Path) -> None:
    job, out = make_job(tmp_path, preview_interval_ms=0)
    assert not job.preview_due() and job.preview(b"x") is False
    job, out = make_job(tmp_path)
    assert job.preview_interval_ms == 500, "an older Kiln's job line names none: the default"
    with pytest.raises(ValueError, match="over the 262144-byte limit"):
        job.preview(b"x" * (MAX_PREVIEW_BYTES + 1))
    with pytest.raises(TypeError):
        job.preview("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        job.preview(b"")
    assert out.lines() == [], "nothing is sent for a refused preview"
    assert job.preview(b"x" * MAX_PREVIEW_BYTES) is True, "the limit itself goes"


def test_cancel(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path)
    assert not job.cancelled
    job.check_cancelled()
    job.sleep(0)
    job._request_cancel()
    assert job.cancelled
    with pytest.raises(Cancelled):
        job.check_cancelled()
    with pytest.raises(Cancelled):
        job.sleep(60)
    # A model's `except Exception` does not swallow it.
    assert not issubclass(Cancelled, Exception)


def test_writes_are_recorded_in_order(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path)
    job.write_bytes("b.bin", b"\x00\x01")
    job.write_json("meta.json", {"k": [1, 2]})
    job.write_text("b.bin", "again")
    assert [a.name for a in job.artifacts] == ["b.bin", "meta.json"]
    assert (tmp_path / "out" / "b.bin").read_text() == "again"
    assert (tmp_path / "out" / "meta.json").read_text() == json.dumps({"k": [1, 2]}, indent=2)
    with pytest.raises(ArtifactNameError):
        job.write_bytes("sub/x", b"")
    job.output_path("own.dat").write_bytes(b"mine")
    assert job.artifact("own.dat", "application/x-mine") == Artifact("own.dat", "own.dat", "application/x-mine")
    with pytest.raises(ValueError, match="is not a file"):
        job.artifact("never.dat")


def test_serve_on_streams() -> None:
    class Echo(Worker):
        def load(self) -> None:
            self.loaded = True

        def run(self, job: Job) -> kiln_worker.RunResult:
            assert self.loaded
            job.progress(100, stage="echo")
            if job.params.get("bad"):
                raise UserError("bad")
            return job.write_text("echo.txt", job.inputs["text"])

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        lines_in = [
            {"type": "job", "job_id": "a", "inputs": {"text": "hi"}, "params": {}, "output_dir": f"{tmp}/a"},
            {"type": "job", "job_id": "b", "inputs": {"text": "hi"}, "params": {"bad": True}, "output_dir": f"{tmp}/b"},
        ]
        stdin = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines_in).encode())
        out = Lines()
        Echo().serve(stdin=stdin, stdout=out)
        assert out.lines() == [
            {"type": "ready"},
            {"type": "progress", "job_id": "a", "stage": "echo", "progress": 100},
            {"type": "result", "job_id": "a", "artifacts": [{"name": "echo.txt", "path": "echo.txt"}]},
            {"type": "progress", "job_id": "b", "stage": "echo", "progress": 100},
            {"type": "error", "job_id": "b", "message": "bad", "retryable": False},
        ]
        assert Path(tmp, "a", "echo.txt").read_text() == "hi"


def test_the_jobs_trace_is_exposed_and_in_the_environment_only_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import tempfile

    # No collector: job.span() does nothing, and no OpenTelemetry module is needed.
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("TRACEPARENT", "outer")
    monkeypatch.delenv("TRACESTATE", raising=False)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    seen: List[Any] = []

    class Traced(Worker):
        def run(self, job: Job) -> None:
            with job.span("inner", steps=3) as span:
                seen.append((job.traceparent, job.tracestate, os.environ.get("TRACEPARENT"), os.environ.get("TRACESTATE"), span))
            return job.write_text("x.txt", "x")

    with tempfile.TemporaryDirectory() as tmp:
        lines_in = [
            {"type": "job", "job_id": "a", "inputs": {}, "params": {}, "output_dir": f"{tmp}/a", "traceparent": parent, "tracestate": "k=v"},
            {"type": "job", "job_id": "b", "inputs": {}, "params": {}, "output_dir": f"{tmp}/b"},
        ]
        stdin = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines_in).encode())
        Traced().serve(stdin=stdin, stdout=Lines())
    assert seen == [(parent, "k=v", parent, "k=v", None), (None, None, None, None, None)]
    assert os.environ.get("TRACEPARENT") == "outer"
