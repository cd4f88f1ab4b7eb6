"""The SDK's test worker: every behaviour the tests check, chosen by a job's params.

Inputs:
  text   string (default ""): upper-cased into out.txt
  file   optional uploaded file ({"path": ..}): its sha256 goes into info.json

Params (all optional):
  steps, step_ms      progress steps (default 3) and the time each takes (default 10 ms)
  stage               the stage progress events name (default "thinking")
  fail                "user" (UserError), "retryable" (RetryableError) or "exception" (1/0)
  fail_on_attempts    [n, ..]: RetryableError on those attempts
  stray               true: write to stdout every way a model can, and run a child that reads stdin
  artifact_name       write one artifact under this name (a bad one fails)
  returns             "names": return the file names; "missing": name a file never written
  big_log             log a message of this many characters

Environment: SDK_TEST_LOAD_FAIL=1 fails the load; SDK_TEST_LOAD_PRINT=1 prints during it;
SDK_TEST_MEMORY=N reports N bytes of memory from load(); SDK_TEST_WARMUP_FAIL=1 fails warmup().

Outputs: out.txt and info.json ({"attempt", "pid", "file_sha256", "warmed"}).
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

try:
    from kiln_worker import Job, RetryableError, UserError, Worker
except ImportError:  # run without the package installed: the checkout's source
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from kiln_worker import Job, RetryableError, UserError, Worker


class SdkTestWorker(Worker):
    def load(self) -> None:
        if os.environ.get("SDK_TEST_LOAD_PRINT") == "1":
            print("stray print during load")
        if os.environ.get("SDK_TEST_LOAD_FAIL") == "1":
            raise RuntimeError("injected load failure")
        if os.environ.get("SDK_TEST_MEMORY"):
            self.report_memory(int(os.environ["SDK_TEST_MEMORY"]))
        self.loaded = True
        self.warmed = False

    def warmup(self) -> None:
        if os.environ.get("SDK_TEST_WARMUP_FAIL") == "1":
            raise RuntimeError("injected warm-up failure")
        self.warmed = self.loaded

    def run(self, job: Job):
        job.log(f"pid {os.getpid()} attempt {job.attempt}")
        text = job.inputs.get("text", "")
        if not isinstance(text, str):
            raise UserError(f"input text must be a string, got {text!r}")
        steps = job.int_param("steps", 3, 0, 100_000)
        step_ms = job.number_param("step_ms", 10, 0, 60_000)
        stage = job.params.get("stage", "thinking")

        fail = job.params.get("fail")
        if fail == "user":
            raise UserError(f"the text {text!r} is not acceptable (param fail=user)")
        if fail == "retryable":
            raise RetryableError("the GPU is busy (param fail=retryable)")
        if fail == "exception":
            print(1 / 0)
        if job.attempt in job.params.get("fail_on_attempts", []):
            raise RetryableError(f"transient failure on attempt {job.attempt} (param fail_on_attempts)")
        if job.params.get("stray"):
            stray(job)
        if "big_log" in job.params:
            job.log("x" * job.params["big_log"])

        for step in range(1, steps + 1):
            job.sleep(step_ms / 1000.0)
            job.progress(100.0 * step / steps, stage=stage, message=f"step {step}/{steps}")
        job.check_cancelled()

        if "artifact_name" in job.params:
            job.write_bytes(job.params["artifact_name"], b"named")
        file_sha256 = None
        if "file" in job.inputs:
            file_sha256 = hashlib.sha256(job.input_path("file").read_bytes()).hexdigest()

        returns = job.params.get("returns")
        if returns == "names":
            job.output_path("out.txt").write_text(text.upper())
            job.output_path("info.json").write_text("{}")
            return ["out.txt", "info.json"]
        if returns == "missing":
            return ["never-written.bin"]
        job.write_text("out.txt", text.upper(), content_type="text/plain")
        job.write_json("info.json", {"attempt": job.attempt, "pid": os.getpid(), "file_sha256": file_sha256, "warmed": self.warmed})
        return None


def stray(job: Job) -> None:
    """Every way a model writes to stdout or reads stdin by mistake."""
    print("stray print()")
    sys.stdout.write("stray sys.stdout.write\n")
    sys.stdout.flush()
    if sys.__stdout__ is not None:
        sys.__stdout__.write("stray sys.__stdout__\n")
        sys.__stdout__.flush()
    os.write(1, b"stray os.write(1)\n")
    subprocess.run(["echo", "stray child process"], check=True)
    # A child that reads its inherited stdin (as ffmpeg does) must find nothing there, and
    # must not eat Kiln's next lines.
    eaten = subprocess.run(["cat"], stdout=subprocess.PIPE, check=True, timeout=5).stdout
    job.log(f"a child read {len(eaten)} bytes of stdin")


if __name__ == "__main__":
    SdkTestWorker().serve()
