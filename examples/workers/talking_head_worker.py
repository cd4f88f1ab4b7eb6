#!/usr/bin/env python3
"""An example "talking-head video" model for Kiln's `process` engine.

It stands in for the EchoMimic worker service (one reference face image plus one driving audio
file in, one lip-synced video out): the same inputs, params and stages, hosted by Kiln instead
of a Redis queue, a Pub/Sub progress channel and a temp-file API. Kiln downloads the inputs,
publishes the progress events and stores the video, so all that is left here is the model.

Like demo_worker.py it is a long-lived worker: Kiln starts it once per slot and model, it
"loads its model" (sleeps KILN_DEMO_LOAD_MS), prints {"type":"ready"}, then runs jobs one after
another. It is written on the kiln_worker SDK (python/kiln-worker), which speaks the JSON-lines
protocol of `core/src/engine/process.rs` (docs/PROTOCOL.md): `load()` and `run(job)` below
are the whole model.

stdout carries protocol lines only; diagnostics go to stderr (Kiln keeps its tail to explain
a crash).

Inputs (both required; a client uploads them to the files bucket and submits
{"object": ".."}, and Kiln hands the worker a local copy as {"path": ".."}):
  ref_image  {"path": ".."}: the reference face, a PNG or JPEG
  audio      {"path": ".."}: the driving audio (any format; only its size is used)
A missing, empty or unreadable input, or a ref_image that is not a PNG or JPEG, is a user
error (retryable false) naming the input.

Params (all optional; unknown ones, such as the seed service's task_id and session_id, are
ignored):
  steps      int 1..200 (default 25)        inference steps, one progress event each
  cfg        number 0..20 (default 2.5)     guidance scale
  seed       int (default 0)
  frames_num int 1..10000 (default: one frame per 3200 bytes of audio, 1..250)
  step_ms    number 0..60000 (default 60)   simulated time per step

Stages, in order, with their progress:
  downloading    5       both input files are there and readable
  face_detecting 10, 15  the ref_image header is read (format and size)
  inference      15..90  one event per step; a cancel is seen between steps
  merging_audio  95      the outputs are written
then the result.

Environment:
  KILN_DEMO_LOAD_MS   simulated model load time before "ready" (default 200)

Outputs in the job's output_dir: video.mp4 (about 4 KiB, not playable: an MP4 `ftyp` box and
an `mdat` box of bytes derived from sha256(ref_image bytes + audio bytes + "seed:steps"); same
inputs, seed and steps, same bytes) and meta.json.

Try it by hand (with any PNG or JPEG at /tmp/face.png and any non-empty file at /tmp/voice.wav):
  printf '%s\n' '{"type":"job","job_id":"j1","attempt":1,"inputs":{"ref_image":{"path":"/tmp/face.png"},"audio":{"path":"/tmp/voice.wav"}},"params":{"steps":3},"output_dir":"/tmp/j1"}' \
    | python3 examples/workers/talking_head_worker.py
"""

import hashlib
import os
import struct
import sys
import time
from pathlib import Path

try:
    from kiln_worker import Job, UserError, Worker
except ImportError:  # run from a checkout without the SDK installed: use its source, beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "kiln-worker" / "src"))
    from kiln_worker import Job, UserError, Worker

DEFAULT_STEPS = 25
MAX_STEPS = 200
DEFAULT_CFG = 2.5
MAX_CFG = 20
DEFAULT_STEP_MS = 60
MAX_STEP_MS = 60_000
MAX_FRAMES = 10_000
# Without a frames_num param the video is as long as the audio: one frame per this many bytes
# of it, at most DEFAULT_MAX_FRAMES frames.
AUDIO_BYTES_PER_FRAME = 3200
DEFAULT_MAX_FRAMES = 250
# video.mp4 is this long: the ftyp box, then one mdat box filling the rest.
VIDEO_BYTES = 4096
FTYP = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


NAME = "talking_head_worker"


def diag(message):
    """A diagnostic for people: stderr only, never the protocol channel."""
    print(f"{NAME}[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Validation


class Settings:
    """A job's inputs and params, checked before any work starts. Params not named here
    (task_id, session_id, whatever a client passes along) are ignored."""

    def __init__(self, job: Job):
        # Read in this order so that a malformed job line names its first fault.
        _, p, _ = job.inputs, job.params, job.output_dir

        # Kiln passes each uploaded file as {"path": ..}; a missing or inline one is a user error.
        self.ref_image_path = str(job.input_path("ref_image"))
        self.audio_path = str(job.input_path("audio"))

        self.steps = job.int_param("steps", DEFAULT_STEPS, 1, MAX_STEPS)
        self.cfg = job.number_param("cfg", DEFAULT_CFG, 0, MAX_CFG)
        self.seed = job.int_param("seed", 0)
        # None: derived from the audio once its size is known.
        self.frames_num = None
        if "frames_num" in p:
            self.frames_num = job.int_param("frames_num", None, 1, MAX_FRAMES)
        self.step_ms = job.number_param("step_ms", DEFAULT_STEP_MS, 0, MAX_STEP_MS)


def input_size(name, path):
    """Checks that a downloaded input can be opened and is not empty; returns its size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # Opening a directory works on some systems; reading it does not.
            f.read(1)
    except OSError as e:
        raise UserError(f"cannot read input {name}: {e.strerror} ({path})") from e
    if size == 0:
        raise UserError(f"input {name} is empty ({path})")
    return size


# ---------------------------------------------------------------------------------------------
# The "model"

# JPEG start-of-frame markers (baseline, progressive, lossless, ...): they carry the image size.
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(f):
    """(width, height) from the first start-of-frame segment of a JPEG, or None. `f` is
    positioned just after the SOI marker."""
    while True:
        byte = f.read(1)
        if byte != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD7:  # markers without a segment
            continue
        if code in (0xD9, 0xDA):  # end of image, or the scan began before any frame header
            return None
        length = f.read(2)
        if len(length) < 2:
            return None
        (length,) = struct.unpack(">H", length)
        if code in JPEG_SOF:
            body = f.read(5)
            if len(body) < 5:
                return None
            _precision, height, width = struct.unpack(">BHH", body)
            return width, height
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)


def image_header(path):
    """("PNG" or "JPEG", width, height), read from the file's header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                width, height = struct.unpack(">II", head[16:24])
                kind = "PNG"
            elif head[:2] == b"\xff\xd8":
                f.seek(2)
                size = jpeg_size(f)
                if size is None:
                    raise UserError(f"input ref_image is a JPEG without a readable frame header ({path})")
                width, height = size
                kind = "JPEG"
            else:
                raise UserError(f"input ref_image is not a PNG or JPEG image ({path})")
    except OSError as e:
        raise UserError(f"cannot read input ref_image: {e.strerror} ({path})") from e
    if width == 0 or height == 0:
        raise UserError(f"input ref_image has no pixels ({kind} {width}x{height}, {path})")
    return kind, width, height


def hash_file(h, path):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def render_video(ref_image_path, audio_path, seed, steps):
    """video.mp4's bytes: an ftyp box, then an mdat box whose payload is a sha256 stream
    seeded with sha256(ref_image bytes + audio bytes + "seed:steps")."""
    h = hashlib.sha256()
    hash_file(h, ref_image_path)
    hash_file(h, audio_path)
    h.update(f"{seed}:{steps}".encode("ascii"))
    key = h.digest()
    payload_len = VIDEO_BYTES - len(FTYP) - 8
    blocks = (payload_len + 31) // 32
    payload = b"".join(hashlib.sha256(key + struct.pack(">I", i)).digest() for i in range(blocks))
    mdat = struct.pack(">I", 8 + payload_len) + b"mdat" + payload[:payload_len]
    return FTYP + mdat


class TalkingHeadWorker(Worker):
    name = NAME

    def load(self):
        load_ms = env_int("KILN_DEMO_LOAD_MS", 200)
        diag(
            f"loading model {os.environ.get('KILN_MODEL', '?')} on slot {os.environ.get('KILN_SLOT', '?')} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, {load_ms} ms)"
        )
        time.sleep(load_ms / 1000.0)

    def run(self, job: Job):
        job.log(f"worker pid {os.getpid()} running job {job.job_id} attempt {job.attempt}")
        s = Settings(job)

        # Kiln has already downloaded both files; the seed service fetched them here.
        image_bytes = input_size("ref_image", s.ref_image_path)
        audio_bytes = input_size("audio", s.audio_path)
        job.progress(5, stage="downloading", message=f"ref_image {image_bytes} bytes, audio {audio_bytes} bytes")
        job.check_cancelled()

        job.progress(10, stage="face_detecting", message="reading ref_image")
        kind, width, height = image_header(s.ref_image_path)
        job.progress(15, stage="face_detecting", message=f"face found in a {width}x{height} {kind}")
        job.check_cancelled()

        frames_num = s.frames_num
        if frames_num is None:
            frames_num = min(DEFAULT_MAX_FRAMES, max(1, audio_bytes // AUDIO_BYTES_PER_FRAME))
            job.log(f"frames_num {frames_num}, from the audio's {audio_bytes} bytes")

        for step in range(1, s.steps + 1):
            # Sleeping is the step's "work": a cancel ends it at once (raising Cancelled).
            job.sleep(s.step_ms / 1000.0)
            job.progress(round(15 + 75.0 * step / s.steps, 2), stage="inference", message=f"step {step}/{s.steps}")
        job.check_cancelled()

        job.progress(95, stage="merging_audio", message=f"muxing {frames_num} frames with the audio")
        video = render_video(s.ref_image_path, s.audio_path, s.seed, s.steps)
        job.write_bytes("video.mp4", video, content_type="video/mp4")
        meta = {
            "frames_num": frames_num,
            "steps": s.steps,
            "cfg": s.cfg,
            "seed": s.seed,
            "ref_image_bytes": image_bytes,
            "ref_image_format": kind,
            "ref_image_width": width,
            "ref_image_height": height,
            "audio_bytes": audio_bytes,
        }
        job.write_json("meta.json", meta, content_type="application/json")
        job.check_cancelled()
        # None: the result names the files written above, video.mp4 then meta.json.
        return None


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
    TalkingHeadWorker().serve()
