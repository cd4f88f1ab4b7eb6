"""Paths, the environment of the processes the tests start, and a worker process the tests talk
JSON lines to, as Kiln's process engine does."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent
SRC = PACKAGE / "src"
REPO = PACKAGE.parents[1]
WORKERS = TESTS / "workers"

# The tests exercise the checkout's source, even where an older kiln-worker is installed.
sys.path.insert(0, str(SRC))


def worker_env(**extra: str) -> Dict[str, str]:
    """The environment of the processes the tests start: the checkout's SDK first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


TERMINAL = ("result", "error", "cancelled")


class WorkerProcess:
    """Starts `python [python_args] script`, with the checkout's SDK on PYTHONPATH unless
    `sdk_on_path` is false; every stdout line must be a JSON object (the SDK keeps stdout for
    protocol lines only), which `next()` checks."""

    def __init__(self, script: Path, python_args: Sequence[str] = (), sdk_on_path: bool = True, **env: str) -> None:
        if sdk_on_path:
            environment = worker_env(**env)
        else:
            environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            environment.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, *python_args, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
        self._lines: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._stderr: List[bytes] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode("utf-8", errors="replace")

    def send(self, line: Dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(line) + "\n").encode())
        self.proc.stdin.flush()

    def job(self, job_id: str, output_dir: Path, inputs: Optional[Dict[str, Any]] = None, attempt: int = 1, **params: Any) -> None:
        self.send(
            {
                "type": "job",
                "job_id": job_id,
                "attempt": attempt,
                "model": "sdk",
                "inputs": {"text": "hello"} if inputs is None else inputs,
                "params": params,
                "output_dir": str(output_dir),
            }
        )

    def next(self, timeout: float = 10) -> Dict[str, Any]:
        """The next stdout line, parsed; fails on anything but a JSON object."""
        try:
            raw = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the worker within {timeout} s; stderr:\n{self.stderr}") from None
        if raw is None:
            self._lines.put(None)
            raise AssertionError(f"the worker closed stdout (exit {self.proc.poll()}); stderr:\n{self.stderr}")
        try:
            line = json.loads(raw)
        except ValueError:
            raise AssertionError(f"stdout carried a line that is not JSON: {raw[:300]!r}; stderr:\n{self.stderr}") from None
        assert isinstance(line, dict), raw
        return line

    def until_end(self, timeout: float = 10) -> List[Dict[str, Any]]:
        """Lines up to and including the one that ends the current job."""
        lines: List[Dict[str, Any]] = []
        while True:
            line = self.next(timeout)
            lines.append(line)
            if line["type"] in TERMINAL:
                return lines

    def rest(self, timeout: float = 10) -> List[bytes]:
        """Every stdout line left, raw, until stdout closes."""
        lines: List[bytes] = []
        while True:
            try:
                raw = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError("the worker kept stdout open") from None
            if raw is None:
                self._lines.put(None)
                return lines
            lines.append(raw)

    def expect_eof(self, timeout: float = 10) -> int:
        """Waits for stdout to close without another line; the exit status."""
        try:
            raw = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the worker kept stdout open") from None
        assert raw is None, f"one more line: {raw!r}"
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
