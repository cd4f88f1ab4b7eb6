#!/usr/bin/env python3
"""A demo "prompt-to-image" model for Kiln's `process` engine.

It is a real long-lived worker: Kiln starts it once per slot and model, it "loads its model"
(sleeps KILN_DEMO_LOAD_MS), prints {"type":"ready"}, then runs jobs one after another for as
long as Kiln keeps it. It speaks the JSON-lines protocol of `core/src/engine/process.rs`
(also in docs/PROTOCOL.md):

  stdin  (from Kiln)  {"type":"job","job_id":..,"attempt":1,"inputs":{..},"params":{..},"output_dir":".."}
                      {"type":"cancel","job_id":..}
  stdout (to Kiln)    {"type":"ready"}
                      {"type":"progress","job_id":..,"stage":..,"progress":0..100,"message":..}
                      {"type":"log","job_id":..,"message":..}
                      {"type":"result","job_id":..,"artifacts":[{"name","path","content_type"}]}
                      {"type":"error","job_id":..,"message":..,"retryable":bool}
                      {"type":"cancelled","job_id":..}

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

import hashlib
import json
import os
import queue
import struct
import sys
import threading
import time
import zlib

DEFAULT_STEPS = 5
MAX_STEPS = 1000
DEFAULT_STEP_MS = 100
MAX_STEP_MS = 60_000
DEFAULT_SIZE = 64
MAX_SIZE = 1024
# Longest stdin line we accept. Kiln's job lines are bounded by its request limit (256 KiB by
# default); anything far beyond that is a broken writer, not a job.
MAX_LINE_BYTES = 4 * 1024 * 1024

# Marks the end of stdin in the job queue.
EOF = object()


def diag(message):
    """A diagnostic for people: stderr only, never the protocol channel."""
    print(f"demo_worker[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class Output:
    """Writes protocol lines to stdout. Both threads write (the reader warns about malformed
    lines), so writes go through one lock and are flushed one whole line at a time."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, **message):
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except BrokenPipeError:
                # Kiln is gone (it closed our stdout): nobody is left to report to.
                os._exit(0)


class UserError(Exception):
    """The job's request is wrong: retrying cannot help (retryable false)."""


class RetryableError(Exception):
    """A transient failure: Kiln may retry the job (retryable true)."""


class Cancelled(Exception):
    """Kiln asked us to stop this job."""


class Job:
    """One job line as received, plus the event the reader thread sets when Kiln cancels it."""

    def __init__(self, line):
        self.job_id = line["job_id"]
        self.attempt = line.get("attempt", 1)
        self.inputs = line.get("inputs", {})
        self.params = line.get("params", {})
        self.output_dir = line.get("output_dir")
        self.cancel = threading.Event()


class Reader(threading.Thread):
    """Reads stdin so that a `cancel` line is seen while the main thread runs a job.

    Job lines go into the job queue; cancel lines set the cancel event of the job they name.
    Kiln sends one job at a time, so the jobs in `self.active` are the one running and at most
    one not yet started; a cancel for any other id (a job that already finished) is ignored.
    """

    def __init__(self, stdin, out, jobs):
        super().__init__(name="stdin-reader", daemon=True)
        self._stdin = stdin
        self._out = out
        self._jobs = jobs
        self._lock = threading.Lock()
        self.active = {}  # job_id -> Job, from receipt until the main thread finishes it

    def finished(self, job):
        with self._lock:
            if self.active.get(job.job_id) is job:
                del self.active[job.job_id]

    def warn(self, message, job_id=None):
        diag(message)
        if job_id is None:
            self._out.send(type="log", message=f"warning: {message}")
        else:
            self._out.send(type="log", job_id=job_id, message=f"warning: {message}")

    def run(self):
        try:
            while True:
                raw = self._stdin.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    # Skip the rest of the over-long line, then carry on with the next one.
                    while raw and not raw.endswith(b"\n"):
                        raw = self._stdin.readline(MAX_LINE_BYTES)
                    self.warn(f"ignored a stdin line over {MAX_LINE_BYTES} bytes")
                    continue
                self.handle(raw.decode("utf-8", errors="replace").strip())
        except Exception as e:  # never let the reader die silently
            diag(f"stdin reader failed: {e!r}")
        self._jobs.put(EOF)

    def handle(self, text):
        if not text:
            return
        try:
            line = json.loads(text)
        except ValueError:
            self.warn(f"ignored a stdin line that is not JSON: {text[:200]!r}")
            return
        if not isinstance(line, dict):
            self.warn(f"ignored a stdin line that is not a JSON object: {text[:200]!r}")
            return
        kind = line.get("type")
        job_id = line.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            self.warn(f"ignored a {kind!r} line without a job_id")
            return
        if kind == "job":
            try:
                job = Job(line)
            except Exception as e:
                self.warn(f"ignored a malformed job line: {e!r}", job_id)
                return
            with self._lock:
                self.active[job.job_id] = job
            self._jobs.put(job)
        elif kind == "cancel":
            with self._lock:
                job = self.active.get(job_id)
            if job is None:
                diag(f"cancel for job {job_id}, which is not running: ignored")
            else:
                job.cancel.set()
        else:
            self.warn(f"ignored a line of unknown type {kind!r}", job_id)


# ---------------------------------------------------------------------------------------------
# Validation


def int_param(params, name, default, low, high):
    value = params.get(name, default)
    # bool is an int in Python; JSON true is not a number of steps.
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"param {name} must be an integer, got {json.dumps(value)}")
    if low is not None and value < low or high is not None and value > high:
        raise UserError(f"param {name} must be between {low} and {high}, got {value}")
    return value


def number_param(params, name, default, low, high):
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"param {name} must be a number, got {json.dumps(value)}")
    if not low <= value <= high:
        raise UserError(f"param {name} must be between {low} and {high}, got {value}")
    return value


class Settings:
    """A job's inputs and params, checked before any work starts."""

    def __init__(self, job):
        if not isinstance(job.inputs, dict):
            raise UserError("inputs must be a JSON object")
        if not isinstance(job.params, dict):
            raise UserError("params must be a JSON object")
        if not isinstance(job.output_dir, str) or not job.output_dir:
            raise UserError("the job line names no output_dir")
        p = job.params

        prompt = job.inputs.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UserError("input prompt is required and must be a non-empty string")
        self.prompt = prompt

        image = job.inputs.get("image")
        if image is not None and not (isinstance(image, dict) and isinstance(image.get("path"), str)):
            raise UserError('input image must be a file ({"path": ..})')
        self.image_path = image["path"] if image is not None else None

        self.steps = int_param(p, "steps", DEFAULT_STEPS, 1, MAX_STEPS)
        self.step_ms = number_param(p, "step_ms", DEFAULT_STEP_MS, 0, MAX_STEP_MS)
        self.seed = int_param(p, "seed", 0, None, None)
        self.width = int_param(p, "width", DEFAULT_SIZE, 1, MAX_SIZE)
        self.height = int_param(p, "height", DEFAULT_SIZE, 1, MAX_SIZE)

        # Fault injection.
        crash = p.get("crash")
        if crash not in (None, "always"):
            raise UserError(f'param crash must be "always", got {json.dumps(crash)}')
        attempts = p.get("crash_on_attempts", [])
        if not isinstance(attempts, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in attempts):
            raise UserError("param crash_on_attempts must be a list of integers")
        self.crash = crash == "always" or job.attempt in attempts
        self.fail = p.get("fail")
        if self.fail not in (None, "retryable", "fatal"):
            raise UserError(f'param fail must be "retryable" or "fatal", got {json.dumps(self.fail)}')
        self.hang = p.get("hang", False)
        if not isinstance(self.hang, bool):
            raise UserError("param hang must be true or false")
        hang_attempts = p.get("hang_on_attempts", [])
        if not isinstance(hang_attempts, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in hang_attempts):
            raise UserError("param hang_on_attempts must be a list of integers")
        self.hang = self.hang or job.attempt in hang_attempts
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


class Worker:
    def __init__(self, out, reader, jobs):
        self.out = out
        self.reader = reader
        self.jobs = jobs

    def serve(self):
        """Runs jobs until stdin ends. Jobs already received still run (so piping a few lines
        in by hand works); Kiln itself kills the process group when it is done with us."""
        while True:
            job = self.jobs.get()
            if job is EOF:
                diag("stdin closed; exiting")
                return
            try:
                self.run_job(job)
            finally:
                self.reader.finished(job)

    def progress(self, job, stage, progress, message=None):
        line = {"type": "progress", "job_id": job.job_id, "stage": stage, "progress": progress}
        if message is not None:
            line["message"] = message
        self.out.send(**line)

    def log(self, job, message):
        self.out.send(type="log", job_id=job.job_id, message=message)

    def run_job(self, job):
        try:
            self.log(job, f"worker pid {os.getpid()} running job {job.job_id} attempt {job.attempt}")
            artifacts = self.generate(job)
        except Cancelled:
            self.out.send(type="cancelled", job_id=job.job_id)
        except UserError as e:
            self.out.send(type="error", job_id=job.job_id, message=str(e), retryable=False)
        except RetryableError as e:
            self.out.send(type="error", job_id=job.job_id, message=str(e), retryable=True)
        except Exception as e:
            # An unexpected failure here is ours, not the user's (a full disk, a bug): let
            # Kiln retry it, and keep serving.
            diag(f"job {job.job_id} failed unexpectedly: {e!r}")
            self.out.send(type="error", job_id=job.job_id, message=f"worker error: {e!r}", retryable=True)
        else:
            self.out.send(type="result", job_id=job.job_id, artifacts=artifacts)

    def check_cancel(self, job):
        if job.cancel.is_set():
            raise Cancelled()

    def generate(self, job):
        self.progress(job, "preparing", 0)
        s = Settings(job)
        if s.image_path is not None:
            try:
                with open(s.image_path, "rb") as f:
                    size = len(f.read())
            except OSError as e:
                raise UserError(f"cannot read input image: {e.strerror} ({s.image_path})") from e
            self.log(job, f"input image {os.path.basename(s.image_path)}: {size} bytes")
        self.check_cancel(job)
        if s.fail == "retryable":
            raise RetryableError("injected retryable failure (param fail=retryable)")
        if s.fail == "fatal":
            raise UserError("injected fatal failure (param fail=fatal)")
        if s.require_file is not None and not os.path.exists(s.require_file):
            raise UserError(f"required file {s.require_file} does not exist (param require_file)")

        for step in range(1, s.steps + 1):
            # Waiting on the event is the step's "work": a cancel ends it at once.
            if job.cancel.wait(s.step_ms / 1000.0):
                raise Cancelled()
            self.progress(job, "inference", round(100.0 * step / s.steps, 2), f"step {step}/{s.steps}")
            if step == 1 and s.crash:
                diag(f"injected crash in job {job.job_id} attempt {job.attempt}")
                os._exit(3)
            if step == 1 and s.hang:
                diag(f"injected hang in job {job.job_id}: ignoring cancel, never finishing")
                while True:
                    time.sleep(3600)
        self.check_cancel(job)

        self.progress(job, "encoding", 100)
        os.makedirs(job.output_dir, exist_ok=True)
        image = render(s.prompt, s.seed, s.width, s.height)
        with open(os.path.join(job.output_dir, "image.png"), "wb") as f:
            f.write(image)
        meta = {"prompt": s.prompt, "seed": s.seed, "steps": s.steps, "width": s.width, "height": s.height}
        with open(os.path.join(job.output_dir, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        self.check_cancel(job)
        return [
            {"name": "image.png", "path": "image.png", "content_type": "image/png"},
            {"name": "meta.json", "path": "meta.json", "content_type": "application/json"},
        ]


def env_int(name, default):
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return max(0, int(text))
    except ValueError:
        diag(f"{name}={text!r} is not an integer; using {default}")
        return default


def main():
    # Protocol lines are text on stdout; stdin is read as bytes so a bad encoding cannot kill us.
    out = Output(sys.stdout)
    load_ms = env_int("KILN_DEMO_LOAD_MS", 200)
    diag(
        f"loading model {os.environ.get('KILN_MODEL', '?')} on slot {os.environ.get('KILN_SLOT', '?')} "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, {load_ms} ms)"
    )
    time.sleep(load_ms / 1000.0)
    if os.environ.get("KILN_DEMO_LOAD_FAIL", "0") not in ("", "0"):
        diag("injected load failure (KILN_DEMO_LOAD_FAIL)")
        sys.exit(1)

    # Unbounded on purpose: Kiln sends one job at a time, so it holds at most a couple.
    jobs = queue.Queue()
    reader = Reader(sys.stdin.buffer, out, jobs)
    reader.start()
    out.send(type="ready")
    diag("ready")
    Worker(out, reader, jobs).serve()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
