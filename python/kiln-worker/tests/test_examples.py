"""The example workers of examples/workers, on the SDK: the same lines and the same bytes as
before it (the demo worker is the fault injector of Kiln's Rust tests, and its image is
compared by sha256 across runs). The golden values were taken from the workers as they were
before the SDK."""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from pathlib import Path
from typing import Any, Dict, List

import pytest
from harness import REPO, WorkerProcess

EXAMPLES = REPO / "examples" / "workers"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_pids(lines: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    for line in lines:
        if "message" in line:
            line["message"] = re.sub(r"^worker pid \d+ ", "worker pid N ", line["message"])
        if line.get("type") == "preview":
            # A preview's bytes, as the size its PNG header says.
            png = base64.b64decode(line["data"])
            assert png.startswith(b"\x89PNG\r\n\x1a\n"), line
            line["data"] = "PNG %dx%d" % struct.unpack(">II", png[16:24])
    return lines


def run_jobs(script: Path, jobs: List[Dict[str, Any]], **worker_args: Any) -> List[Dict[str, Any]]:
    w = WorkerProcess(script, KILN_DEMO_LOAD_MS="0", **worker_args)
    try:
        assert w.next(30) == {"type": "ready"}
        lines: List[Dict[str, Any]] = []
        for job in jobs:
            w.send(job)
            lines += w.until_end(30)
        return without_pids(lines)
    finally:
        w.close()


def test_demo_worker_lines_and_bytes(tmp_path: Path) -> None:
    jobs = [
        {"type": "job", "job_id": "d1", "attempt": 1, "inputs": {"prompt": "a lighthouse at dawn"},
         "params": {"steps": 2, "step_ms": 0, "seed": 7}, "output_dir": str(tmp_path / "d1")},
        {"type": "job", "job_id": "d2", "attempt": 1, "inputs": {"prompt": "ünïcode ☃"},
         "params": {"steps": 1, "step_ms": 0, "seed": -5, "width": 33, "height": 17}, "output_dir": str(tmp_path / "d2")},
    ]  # fmt: skip
    artifacts = [
        {"name": "image.png", "path": "image.png", "content_type": "image/png"},
        {"name": "meta.json", "path": "meta.json", "content_type": "application/json"},
    ]
    assert run_jobs(EXAMPLES / "demo_worker.py", jobs) == [
        {"type": "log", "job_id": "d1", "message": "worker pid N running job d1 attempt 1"},
        {"type": "progress", "job_id": "d1", "stage": "preparing", "progress": 0},
        {"type": "progress", "job_id": "d1", "stage": "inference", "progress": 50.0, "message": "step 1/2"},
        # The first step's preview goes; the second comes sooner than the default 500 ms after.
        {"type": "preview", "job_id": "d1", "content_type": "image/png", "data": "PNG 32x32"},
        {"type": "progress", "job_id": "d1", "stage": "inference", "progress": 100.0, "message": "step 2/2"},
        {"type": "progress", "job_id": "d1", "stage": "encoding", "progress": 100},
        {"type": "result", "job_id": "d1", "artifacts": artifacts},
        {"type": "log", "job_id": "d2", "message": "worker pid N running job d2 attempt 1"},
        {"type": "progress", "job_id": "d2", "stage": "preparing", "progress": 0},
        {"type": "progress", "job_id": "d2", "stage": "inference", "progress": 100.0, "message": "step 1/1"},
        {"type": "preview", "job_id": "d2", "content_type": "image/png", "data": "PNG 32x17"},
        {"type": "progress", "job_id": "d2", "stage": "encoding", "progress": 100},
        {"type": "result", "job_id": "d2", "artifacts": artifacts},
    ]
    assert sha256(tmp_path / "d1" / "image.png") == "9b851ac4f2f6e54a30736f98597378160e0b0e18b02461e1d90d79ef219b7c6f"
    assert sha256(tmp_path / "d1" / "meta.json") == "8157fd610fc6531c07cb7ffb2d3e61cd0bb780f1a0b2c6505d9aa1847c594bf0"
    assert sha256(tmp_path / "d2" / "image.png") == "165996587a7e909715acb3e071972193021746d2994fbbe2ae23369489ba3ced"
    assert sha256(tmp_path / "d2" / "meta.json") == "d8f2f42ebda4201c34fb75fdc74245bcfb027a975f356edf3b88db98b6055d2c"


@pytest.mark.parametrize(
    "params, message, retryable",
    [
        ({"fail": "fatal"}, "injected fatal failure (param fail=fatal)", False),
        ({"fail": "retryable"}, "injected retryable failure (param fail=retryable)", True),
        ({"require_file": "/nonexistent/marker"}, "required file /nonexistent/marker does not exist (param require_file)", False),
        ({"width": 5000}, "param width must be between 1 and 1024, got 5000", False),
        ({"hang_on_attempts": "1"}, "param hang_on_attempts must be a list of integers", False),
    ],
)
def test_demo_worker_faults(tmp_path: Path, params: Dict[str, Any], message: str, retryable: bool) -> None:
    job = {"type": "job", "job_id": "f", "attempt": 1, "inputs": {"prompt": "p"}, "params": params, "output_dir": str(tmp_path)}
    end = run_jobs(EXAMPLES / "demo_worker.py", [job])[-1]
    assert end == {"type": "error", "job_id": "f", "message": message, "retryable": retryable}


def test_demo_worker_crash_exits_3_after_the_first_step(tmp_path: Path) -> None:
    w = WorkerProcess(EXAMPLES / "demo_worker.py", KILN_DEMO_LOAD_MS="0")
    try:
        assert w.next(30) == {"type": "ready"}
        w.send({"type": "job", "job_id": "c", "attempt": 2, "inputs": {"prompt": "p"},
                "params": {"crash_on_attempts": [2], "step_ms": 0}, "output_dir": str(tmp_path)})  # fmt: skip
        lines = w.rest(30)
        assert w.proc.wait(10) == 3
        assert b'"message":"step 1/5"' in lines[-1], lines
    finally:
        w.close()


def test_demo_worker_load_failure(tmp_path: Path) -> None:
    w = WorkerProcess(EXAMPLES / "demo_worker.py", KILN_DEMO_LOAD_MS="0", KILN_DEMO_LOAD_FAIL="1")
    try:
        assert w.expect_eof(30) == 1
        assert "injected load failure (KILN_DEMO_LOAD_FAIL)" in w.stderr
    finally:
        w.close()


def test_talking_head_worker_lines_and_bytes(tmp_path: Path) -> None:
    face = tmp_path / "face.png"
    face.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x28\x00\x00\x00\x30" + b"\x00" * 20)
    voice = tmp_path / "voice.wav"
    voice.write_bytes(b"RIFF" + b"x" * 20000)
    job = {"type": "job", "job_id": "t1", "attempt": 1,
           "inputs": {"ref_image": {"path": str(face)}, "audio": {"path": str(voice)}},
           "params": {"steps": 3, "step_ms": 0, "seed": 42, "cfg": 3.0}, "output_dir": str(tmp_path / "t1")}  # fmt: skip
    assert run_jobs(EXAMPLES / "talking_head_worker.py", [job]) == [
        {"type": "log", "job_id": "t1", "message": "worker pid N running job t1 attempt 1"},
        {"type": "progress", "job_id": "t1", "stage": "downloading", "progress": 5, "message": "ref_image 44 bytes, audio 20004 bytes"},
        {"type": "progress", "job_id": "t1", "stage": "face_detecting", "progress": 10, "message": "reading ref_image"},
        {"type": "progress", "job_id": "t1", "stage": "face_detecting", "progress": 15, "message": "face found in a 40x48 PNG"},
        {"type": "log", "job_id": "t1", "message": "frames_num 6, from the audio's 20004 bytes"},
        {"type": "progress", "job_id": "t1", "stage": "inference", "progress": 40.0, "message": "step 1/3"},
        {"type": "progress", "job_id": "t1", "stage": "inference", "progress": 65.0, "message": "step 2/3"},
        {"type": "progress", "job_id": "t1", "stage": "inference", "progress": 90.0, "message": "step 3/3"},
        {"type": "progress", "job_id": "t1", "stage": "merging_audio", "progress": 95, "message": "muxing 6 frames with the audio"},
        {"type": "result", "job_id": "t1", "artifacts": [
            {"name": "video.mp4", "path": "video.mp4", "content_type": "video/mp4"},
            {"name": "meta.json", "path": "meta.json", "content_type": "application/json"},
        ]},
    ]  # fmt: skip
    assert sha256(tmp_path / "t1" / "video.mp4") == "a0a6bf36bfdd0e4d938efcbbbc84adac2d5e625f460474328e9f5a7161baa5a0"
    assert sha256(tmp_path / "t1" / "meta.json") == "683b4565f79123f2fe842519b86d7176b05a6e8f53f383216548cc0f60f003fa"


def test_talking_head_worker_names_a_bad_input(tmp_path: Path) -> None:
    job = {"type": "job", "job_id": "t", "attempt": 1, "inputs": {"ref_image": {"path": str(tmp_path)}},
           "params": {}, "output_dir": str(tmp_path / "out")}  # fmt: skip
    end = run_jobs(EXAMPLES / "talking_head_worker.py", [job])[-1]
    assert end == {"type": "error", "job_id": "t", "message": 'input audio is required: a file ({"path": ..})', "retryable": False}


@pytest.mark.parametrize("script", ["minimal_worker.py", "demo_worker.py", "talking_head_worker.py"])
def test_examples_run_from_the_checkout_without_the_package(script: str) -> None:
    # -S: no site-packages, so an installed kiln_worker cannot be found; the example falls back
    # to the checkout's source.
    w = WorkerProcess(EXAMPLES / script, python_args=("-S",), sdk_on_path=False, KILN_DEMO_LOAD_MS="0")
    try:
        assert w.next(30) == {"type": "ready"}
    finally:
        w.close()


def test_the_minimal_worker(tmp_path: Path) -> None:
    assert len((EXAMPLES / "minimal_worker.py").read_text().splitlines()) < 20
    job = {"type": "job", "job_id": "m", "attempt": 1, "inputs": {"text": "a cat"}, "params": {}, "output_dir": str(tmp_path)}
    assert run_jobs(EXAMPLES / "minimal_worker.py", [job]) == [
        {"type": "progress", "job_id": "m", "stage": "inference", "progress": 50},
        {"type": "result", "job_id": "m", "artifacts": [{"name": "upper.txt", "path": "upper.txt"}]},
    ]
    assert (tmp_path / "upper.txt").read_text() == "A CAT"


def test_the_protocol_doc_shows_the_minimal_worker_as_it_is() -> None:
    doc = (REPO / "docs" / "PROTOCOL.md").read_text()
    section = doc.split("### Writing a worker with the Python SDK", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == (EXAMPLES / "minimal_worker.py").read_text()
