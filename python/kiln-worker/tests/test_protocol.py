"""The worker protocol, spoken by a real SDK worker process (tests/workers/sdk_worker.py) over
its stdin and stdout, as Kiln's process engine speaks it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import pytest
from harness import WORKERS, WorkerProcess

from kiln_worker import MAX_LINE_BYTES


@pytest.fixture
def worker() -> Iterator[WorkerProcess]:
    w = WorkerProcess(WORKERS / "sdk_worker.py")
    try:
        assert w.next() == {"type": "ready"}
        yield w
    finally:
        w.close()


def test_ready_comes_first_even_when_load_prints() -> None:
    w = WorkerProcess(WORKERS / "sdk_worker.py", SDK_TEST_LOAD_PRINT="1")
    try:
        assert w.next() == {"type": "ready"}
        assert "stray print during load" in w.stderr or _eventually(lambda: "stray print during load" in w.stderr)
    finally:
        w.close()


def test_warmup_runs_after_load_before_ready_and_a_memory_report_comes_before_ready(tmp_path: Path) -> None:
    w = WorkerProcess(WORKERS / "sdk_worker.py", SDK_TEST_MEMORY="123456")
    try:
        assert w.next() == {"type": "memory", "bytes": 123456}
        assert w.next() == {"type": "ready"}
        w.job("j1", tmp_path, {"text": "x"})
        lines = w.until_end()
        assert lines[-1]["type"] == "result", lines
        assert json.loads((tmp_path / "info.json").read_text())["warmed"] is True
    finally:
        w.close()


def test_a_failed_warmup_exits_1_without_ready() -> None:
    w = WorkerProcess(WORKERS / "sdk_worker.py", SDK_TEST_WARMUP_FAIL="1")
    try:
        assert w.expect_eof() == 1
        assert _eventually(lambda: "injected warm-up failure" in w.stderr)
    finally:
        w.close()


def test_a_failed_load_exits_1_without_ready() -> None:
    w = WorkerProcess(WORKERS / "sdk_worker.py", SDK_TEST_LOAD_FAIL="1")
    try:
        assert w.expect_eof() == 1
        assert "load failed: RuntimeError('injected load failure')" in w.stderr
        assert "Traceback" in w.stderr
    finally:
        w.close()


def test_progress_logs_and_result(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "j1", steps=4, step_ms=1, stage="denoising")
    lines = worker.until_end()
    assert lines[0]["type"] == "log" and lines[0]["job_id"] == "j1" and lines[0]["message"].startswith("pid ")
    progress = [line for line in lines if line["type"] == "progress"]
    assert [(p["stage"], p["progress"], p["message"]) for p in progress] == [
        ("denoising", 25.0, "step 1/4"),
        ("denoising", 50.0, "step 2/4"),
        ("denoising", 75.0, "step 3/4"),
        ("denoising", 100.0, "step 4/4"),
    ]
    assert all(p["job_id"] == "j1" for p in progress)
    result = lines[-1]
    assert result == {
        "type": "result",
        "job_id": "j1",
        "artifacts": [
            {"name": "out.txt", "path": "out.txt", "content_type": "text/plain"},
            {"name": "info.json", "path": "info.json", "content_type": "application/json"},
        ],
    }
    assert (tmp_path / "j1" / "out.txt").read_text() == "HELLO"
    assert json.loads((tmp_path / "j1" / "info.json").read_text())["attempt"] == 1


def test_one_process_serves_job_after_job(worker: WorkerProcess, tmp_path: Path) -> None:
    pids = set()
    for i in range(3):
        worker.job(f"j{i}", tmp_path / f"j{i}", steps=1, step_ms=0)
        lines = worker.until_end()
        assert lines[-1]["type"] == "result"
        pids.add(json.loads((tmp_path / f"j{i}" / "info.json").read_text())["pid"])
    assert len(pids) == 1


def test_an_uploaded_file_arrives_as_a_path(worker: WorkerProcess, tmp_path: Path) -> None:
    upload = tmp_path / "in.bin"
    upload.write_bytes(b"uploaded bytes")
    worker.job("j1", tmp_path / "out", inputs={"text": "t", "file": {"path": str(upload)}}, steps=0)
    assert worker.until_end()[-1]["type"] == "result"
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["file_sha256"] == hashlib.sha256(b"uploaded bytes").hexdigest()


def test_a_file_input_given_inline_is_a_user_error(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "out", inputs={"text": "t", "file": "not a file"}, steps=0)
    end = worker.until_end()[-1]
    message = 'input file must be a file ({"path": ..}), got "not a file"'
    assert end == {"type": "error", "job_id": "j1", "message": message, "retryable": False}


def test_a_user_error_is_not_retryable(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "out", fail="user")
    end = worker.until_end()[-1]
    assert end == {"type": "error", "job_id": "j1", "message": "the text 'hello' is not acceptable (param fail=user)", "retryable": False}


def test_a_bad_param_is_a_user_error(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "out", steps="many")
    end = worker.until_end()[-1]
    assert end == {"type": "error", "job_id": "j1", "message": 'param steps must be an integer, got "many"', "retryable": False}


def test_a_retryable_error_is_retryable(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "out", fail="retryable")
    end = worker.until_end()[-1]
    assert end == {"type": "error", "job_id": "j1", "message": "the GPU is busy (param fail=retryable)", "retryable": True}


def test_an_unexpected_exception_is_retryable_with_its_traceback_on_stderr(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "out", fail="exception")
    end = worker.until_end()[-1]
    assert end["type"] == "error" and end["retryable"] is True
    assert end["message"].startswith("worker error: ZeroDivisionError('division by zero') at sdk_worker.py:"), end
    assert end["message"].endswith(" in run"), end
    assert _eventually(lambda: "ZeroDivisionError: division by zero" in worker.stderr), worker.stderr
    assert "Traceback (most recent call last)" in worker.stderr
    # The worker keeps serving.
    worker.job("j2", tmp_path / "j2", steps=0)
    assert worker.until_end()[-1]["type"] == "result"


def test_cancel_mid_run_is_answered_at_once(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("long", tmp_path / "long", steps=1000, step_ms=50)
    while worker.next()["type"] != "progress":
        pass
    sent = time.monotonic()
    worker.send({"type": "cancel", "job_id": "long"})
    lines = worker.until_end()
    assert lines[-1] == {"type": "cancelled", "job_id": "long"}
    assert time.monotonic() - sent < 1.0, "the reader thread saw the cancel while the job ran"
    assert len(lines) < 20
    # The same process takes the next job.
    worker.job("next", tmp_path / "next", steps=1, step_ms=0)
    assert worker.until_end()[-1]["type"] == "result"


def test_a_cancel_for_another_job_is_ignored(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "j1", steps=5, step_ms=20)
    worker.send({"type": "cancel", "job_id": "an-earlier-job"})
    assert worker.until_end()[-1]["type"] == "result"
    assert _eventually(lambda: "cancel for job an-earlier-job, which is not running: ignored" in worker.stderr)


def test_stray_output_never_reaches_stdout(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "j1", stray=True, steps=1, step_ms=0)
    lines = worker.until_end()  # next() fails on any line that is not JSON
    assert lines[-1]["type"] == "result"
    # A child that read stdin got nothing, and took none of Kiln's lines.
    assert {"type": "log", "job_id": "j1", "message": "a child read 0 bytes of stdin"} in lines
    for marker in ("stray print()", "stray sys.stdout.write", "stray sys.__stdout__", "stray os.write(1)", "stray child process"):
        assert _eventually(lambda: marker in worker.stderr), f"{marker!r} not on stderr:\n{worker.stderr}"
    worker.job("j2", tmp_path / "j2", steps=0)
    assert worker.until_end()[-1]["type"] == "result"


def test_a_bad_artifact_name_fails_early_with_a_clear_error(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "j1", artifact_name="../escape.txt", steps=0)
    end = worker.until_end()[-1]
    assert end["type"] == "error" and end["retryable"] is True
    assert "artifact name '../escape.txt' is not a plain file name" in end["message"], end
    assert not (tmp_path / "escape.txt").exists()


def test_returned_names_are_the_artifacts(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "j1", returns="names", steps=0)
    end = worker.until_end()[-1]
    assert end == {
        "type": "result",
        "job_id": "j1",
        "artifacts": [{"name": "out.txt", "path": "out.txt"}, {"name": "info.json", "path": "info.json"}],
    }


def test_a_returned_name_without_its_file_is_an_error(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "j1", returns="missing", steps=0)
    end = worker.until_end()[-1]
    assert end["type"] == "error" and end["retryable"] is True
    assert "artifact 'never-written.bin'" in end["message"] and "is not a file" in end["message"], end


def test_long_messages_are_clipped_under_the_line_limit(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("j1", tmp_path / "j1", big_log=3 * MAX_LINE_BYTES, steps=0)
    lines = worker.until_end()
    big = [line for line in lines if line["type"] == "log" and line["message"].startswith("xxx")]
    assert len(big) == 1
    assert len(json.dumps(big[0])) < MAX_LINE_BYTES
    assert big[0]["message"].endswith("…")
    assert lines[-1]["type"] == "result"


def test_malformed_lines_are_logged_and_skipped(worker: WorkerProcess, tmp_path: Path) -> None:
    assert worker.proc.stdin is not None
    worker.proc.stdin.write(b"not json\n[1]\n{\"type\":\"job\"}\n")
    worker.proc.stdin.flush()
    warnings = [worker.next() for _ in range(3)]
    assert [w["message"] for w in warnings] == [
        "warning: ignored a stdin line that is not JSON: 'not json'",
        "warning: ignored a stdin line that is not a JSON object: '[1]'",
        "warning: ignored a 'job' line without a job_id",
    ]
    worker.job("j1", tmp_path / "j1", steps=0)
    assert worker.until_end()[-1]["type"] == "result"


def test_jobs_received_before_stdin_ends_still_run(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.job("a", tmp_path / "a", steps=2, step_ms=20)
    worker.job("b", tmp_path / "b", steps=2, step_ms=20)
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    assert worker.until_end()[-1] == {"type": "result", "job_id": "a", "artifacts": _default_artifacts()}
    assert worker.until_end()[-1] == {"type": "result", "job_id": "b", "artifacts": _default_artifacts()}
    assert worker.expect_eof() == 0


def _default_artifacts() -> list:
    return [
        {"name": "out.txt", "path": "out.txt", "content_type": "text/plain"},
        {"name": "info.json", "path": "info.json", "content_type": "application/json"},
    ]


def _eventually(check, limit_s: float = 5) -> bool:
    """stderr is read by a thread of its own: give it a moment."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())
