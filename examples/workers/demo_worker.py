#!/usr/bin/env python3
"""A demo "prompt-to-image" model for Kiln's `process` engine.

It is a real long-lived worker: Kiln starts it once per slot and model, it "loads its model"
(sleeps KILN_DEMO_LOAD_MS), prints {"type":"ready"}, then runs jobs one after another for as
long as Kiln keeps it. It is written on the kiln_worker SDK (python/kiln-worker), which speaks
the JSON-lines protocol of `core/src/engine/process.rs` (docs/PROTOCOL.md): `load()` and
`run(job)` below are the whole model; the SDK reads stdin on a thread of its own (so a cancel
is seen between steps), reports progress and turns exceptions into error lines.

stdout carries protocol lines only; diagnostics go to stderr (Kiln keeps its tail to explain
a crash).

Inputs:
  prompt  string, required
  image   optional {"path": ".."}: a file Kiln downloaded from the files bucket; its size is logged

Params (all optional):
  steps   int 1..1000 (default 5)       inference steps, one progress event each
  step_ms number 0..60000 (default 100) simulated time per step
  seed    int (default 0)
  width, height  int 1..1024 (default 64)
  previews       "due" (default): a small preview image of the step, only when one is due
                 (job.preview_due(), the model's preview_interval_ms); "every_step": one each
                 step through job.preview (the SDK drops those sent too soon); "raw": one each
                 step as a bare protocol line, bypassing the SDK's throttle (Kiln's must hold);
                 "off": none

Fault injection, for Kiln's tests:
  "crash": "always"            os._exit(3) right after the first step
  "crash_on_attempts": [1, 2]  the same, only when the job's attempt is in the list
  "fail": "retryable"          report an error with retryable true (an infrastructure error)
  "fail": "fatal"              report an error with retryable false (a user error)
  "hang": true                 after the first step, ignore cancel and never finish
  "hang_on_attempts": [1]      the same, only when the job's attempt is in the list
  "require_file": "/some/path" fail with a user error unless that file exists (a dependency
                               that appears later: the batch retry test creates it)

Environment:
  KILN_DEMO_LOAD_MS   simulated model load time before "ready" (default 200)
  KILN_DEMO_LOAD_FAIL if set and not "0", exit 1 during the load (never prints "ready")

Outputs in the job's output_dir: image.png (a deterministic RGB pattern derived from
sha256(prompt + str(seed)); same prompt and seed, same bytes) and meta.json.

Try it by hand:
  printf '%s\n' '{"type":"job","job_id":"j1","attempt":1,"inputs":{"prompt":"a cat"},"params":{"steps":3},"output_dir":"/tmp/j1"}' \
    | python3 examples/workers/demo_worker.py
"""

import base64
import hashlib
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

try:
    from kiln_worker import Job, RetryableError, UserError, Worker
except ImportError:  # run from a checkout without the SDK installed: use its source, beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "kiln-worker" / "src"))
    from kiln_worker import Job, RetryableError, UserError, Worker

DEFAULT_STEPS = 5
MAX_STEPS = 1000
DEFAULT_STEP_MS = 100
MAX_STEP_MS = 60_000
DEFAULT_SIZE = 64
MAX_SIZE = 1024

NAME = "demo_worker"


def diag(message):
    """A diagnostic for people: stderr only, never the protocol channel."""
    print(f"{NAME}[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Validation


def attempt_list(params, name):
    value = params.get(name, [])
    if not isinstance(value, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in value):
        raise UserError(f"param {name} must be a list of integers")
    return value


class Settings:
    """A job's inputs and params, checked before any work starts."""

    def __init__(self, job: Job):
        # Read in this order so that a malformed job line names its first fault.
        inputs, p, _ = job.inputs, job.params, job.output_dir

        prompt = inputs.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UserError("input prompt is required and must be a non-empty string")
        self.prompt = prompt

        image = inputs.get("image")
        if image is not None and not (isinstance(image, dict) and isinstance(image.get("path"), str)):
            raise UserError('input image must be a file ({"path": ..})')
        self.image_path = image["path"] if image is not None else None

        self.steps = job.int_param("steps", DEFAULT_STEPS, 1, MAX_STEPS)
        self.step_ms = job.number_param("step_ms", DEFAULT_STEP_MS, 0, MAX_STEP_MS)
        self.seed = job.int_param("seed", 0)
        self.width = job.int_param("width", DEFAULT_SIZE, 1, MAX_SIZE)
        self.height = job.int_param("height", DEFAULT_SIZE, 1, MAX_SIZE)

        # Fault injection.
        crash = p.get("crash")
        if crash not in (None, "always"):
            raise UserError(f'param crash must be "always", got {json.dumps(crash)}')
        self.crash = crash == "always" or job.attempt in attempt_list(p, "crash_on_attempts")
        self.fail = p.get("fail")
        if self.fail not in (None, "retryable", "fatal"):
            raise UserError(f'param fail must be "retryable" or "fatal", got {json.dumps(self.fail)}')
        self.hang = job.bool_param("hang", False)
        self.hang = self.hang or job.attempt in attempt_list(p, "hang_on_attempts")
        self.previews = p.get("previews", "due")
        if self.previews not in ("due", "every_step", "raw", "off"):
            raise UserError(f'param previews must be "due", "every_step", "raw" or "off", got {json.dumps(self.previews)}')
        self.require_file = p.get("require_file")
        if self.require_file is not None and not isinstance(self.require_file, str):
            raise UserError("param require_file must be a path")


# ---------------------------------------------------------------------------------------------
# The "model"


def png_bytes(width, height, rgb_rows):
    """Encodes 8-bit RGB rows (each `width * 3` bytes) as a PNG, with nothing but zlib."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    # Every scanline starts with filter type 0 (none).
    raw = b"".join(b"\x00" + row for row in rgb_rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def render(prompt, seed, width, height):
    """A deterministic pattern: a red gradient across, a green one down and a blue checker,
    with offsets, cell size and shades taken from sha256(prompt + str(seed)), so every
    (prompt, seed) gives its own, repeatable image."""
    d = hashlib.sha256((prompt + str(seed)).encode("utf-8")).digest()
    cell = 4 + d[2] % 29
    # Per-column parts are computed once; a row then only applies its own offsets.
    red = bytes((x * 256 // width + d[0]) & 0xFF for x in range(width))
    column_cell = [(x // cell) % 2 for x in range(width)]
    rows = []
    for y in range(height):
        green = (y * 256 // height + d[1]) & 0xFF
        shade = d[3 + (y // cell) % 16]
        blue_on, blue_off = shade, shade ^ 0x80
        row = bytearray(width * 3)
        row[0::3] = red
        row[1::3] = bytes([green]) * width
        row[2::3] = bytes(blue_on if c else blue_off for c in column_cell)
        rows.append(bytes(row))
    return png_bytes(width, height, rows)


class DemoWorker(Worker):
    name = NAME

    def load(self):
        load_ms = env_int("KILN_DEMO_LOAD_MS", 200)
        diag(
            f"loading model {os.environ.get('KILN_MODEL', '?')} on slot {os.environ.get('KILN_SLOT', '?')} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, {load_ms} ms)"
        )
        time.sleep(load_ms / 1000.0)
        if os.environ.get("KILN_DEMO_LOAD_FAIL", "0") not in ("", "0"):
            diag("injected load failure (KILN_DEMO_LOAD_FAIL)")
            sys.exit(1)

    def run(self, job: Job):
        # Kiln's tests find the worker's pid here (to kill it mid-job).
        job.log(f"worker pid {os.getpid()} running job {job.job_id} attempt {job.attempt}")
        job.progress(0, stage="preparing")
        s = Settings(job)
        if s.image_path is not None:
            try:
                with open(s.image_path, "rb") as f:
                    size = len(f.read())
            except OSError as e:
                raise UserError(f"cannot read input image: {e.strerror} ({s.image_path})") from e
            job.log(f"input image {os.path.basename(s.image_path)}: {size} bytes")
        job.check_cancelled()
        if s.fail == "retryable":
            raise RetryableError("injected retryable failure (param fail=retryable)")
        if s.fail == "fatal":
            raise UserError("injected fatal failure (param fail=fatal)")
        if s.require_file is not None and not os.path.exists(s.require_file):
            raise UserError(f"required file {s.require_file} does not exist (param require_file)")

        for step in range(1, s.steps + 1):
            # Sleeping is the step's "work": a cancel ends it at once (raising Cancelled).
            job.sleep(s.step_ms / 1000.0)
            job.progress(round(100.0 * step / s.steps, 2), stage="inference", message=f"step {step}/{s.steps}")
            if step == 1 and s.crash:
                diag(f"injected crash in job {job.job_id} attempt {job.attempt}")
                os._exit(3)
            if step == 1 and s.hang:
                diag(f"injected hang in job {job.job_id}: ignoring cancel, never finishing")
                while True:
                    time.sleep(3600)
            send_preview(job, s, step)
        job.check_cancelled()

        job.progress(100, stage="encoding")
        job.write_bytes("image.png", render(s.prompt, s.seed, s.width, s.height), content_type="image/png")
        meta = {"prompt": s.prompt, "seed": s.seed, "steps": s.steps, "width": s.width, "height": s.height}
        job.write_json("meta.json", meta, content_type="application/json")
        job.check_cancelled()
        # None: the result names the files written above, image.png then meta.json.
        return None


def send_preview(job: Job, s: "Settings", step: int):
    """A small image of the step (at most 32x32: a preview is shown live, not kept), encoded
    only when it would go out."""
    if not hasattr(job, "preview_due"):
        return  # a kiln_worker older than live previews (an install not refreshed by set-up)
    if s.previews == "off" or (s.previews == "due" and not job.preview_due()):
        return
    image = render(s.prompt, s.seed + step, min(s.width, 32), min(s.height, 32))
    if s.previews == "raw":
        line = {"type": "preview", "job_id": job.job_id, "content_type": "image/png", "data": base64.b64encode(image).decode()}
        job._writer.send(line)  # noqa: SLF001 (on purpose: a worker without the SDK's throttle)
    else:
        job.preview(image, "image/png")


def env_int(name, default):
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return max(0, int(text))
    except ValueError:
        diag(f"{name}={text!r} is not an integer; using {default}")
        return default


if __name__ == "__main__":
    DemoWorker().serve()
