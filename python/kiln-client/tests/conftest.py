"""A real Kiln for the client's tests: a nats-server with JetStream on a free port in a temp
dir, and one `kiln up` node on it with two CPU slots and two models:

  demo  the process engine running examples/workers/demo_worker.py (small steps/step_ms)
  noop  the noop engine (one small artifact at once)

`KILN_BIN` names the kiln binary (default <repo>/target/debug/kiln; the tests are skipped,
with the reason, when it does not exist). `KILN_NATS_SERVER` names nats-server (default:
the one on PATH). Both processes are stopped when the session ends.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Generator, Iterator, List, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
SRC = REPO / "python" / "kiln-client" / "src"
# The tests run against this checkout's package, installed or not.
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import kiln_client  # noqa: E402

SLOTS = ["cpu:0", "cpu:1"]
NODE = "py1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: pathlib.Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: Optional["subprocess.Popen[bytes]"], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; waits for the process."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def config_toml(url: str, python: str) -> str:
    worker = REPO / "examples" / "workers" / "demo_worker.py"
    slots = ", ".join(f'"{s}"' for s in SLOTS)
    # Like tests/common/mod.rs's config_toml: fast heartbeats, short retry backoff.
    return f"""
[nats]
url = "{url}"
ack_wait_ms = 10000
[node]
slots = [{slots}]
metrics_addr = ""
heartbeat_ms = 300
registry_ttl_ms = 2000
loss_after_ms = 1000
[retry]
backoff_initial_ms = 100
backoff_max_ms = 1000

[[models]]
name = "demo"
engine = {{ kind = "process", command = [{json.dumps(python)}, {json.dumps(str(worker))}], ready_timeout_ms = 20000, env = {{ KILN_DEMO_LOAD_MS = "50", PYTHONPATH = {json.dumps(str(REPO / "python" / "kiln-worker" / "src"))} }} }}
timeout_ms = 60000
max_attempts = 3
required_inputs = ["prompt"]

[[models]]
name = "noop"
engine = {{ kind = "noop" }}
"""


class KilnCluster:
    """The running server and node: `url` to connect to, logs for failure reports."""

    def __init__(self, root: pathlib.Path, kiln_bin: pathlib.Path, nats_server: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.nats_log = root / "nats-server.log"
        self.node_log = root / f"{NODE}.log"
        self.nats: Optional["subprocess.Popen[bytes]"] = None
        self.node: Optional["subprocess.Popen[bytes]"] = None
        self.kiln_bin = kiln_bin
        self.nats_server = nats_server

    def start(self) -> None:
        store = self.root / "jetstream"
        store.mkdir()
        with open(self.nats_log, "ab") as log:
            self.nats = subprocess.Popen(
                [self.nats_server, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self._wait_port()
        config = self.root / f"{NODE}.toml"
        config.write_text(config_toml(self.url, sys.executable))
        # The node's NATS comes from --nats only: not from a KILN_NATS_* of the caller's shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_NATS_")}
        env["KILN_LOG"] = "info,async_nats=warn"
        with open(self.node_log, "ab") as log:
            self.node = subprocess.Popen(
                [str(self.kiln_bin), "up", "--config", str(config), "--nats", self.url, "--node-name", NODE, "--http-addr", "", "--drain-grace-s", "5"],
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._wait_node()

    def _wait_port(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.nats is not None
                if self.nats.poll() is not None:
                    break
                time.sleep(0.02)
        raise RuntimeError(f"nats-server did not start on port {self.port}:\n{tail(self.nats_log)}")

    def _wait_node(self) -> None:
        """Until every slot of the node shows in the registry (`kiln.api.cluster`)."""
        deadline = time.monotonic() + 60
        with kiln_client.Client(self.url, timeout=2) as kiln:
            while time.monotonic() < deadline:
                assert self.node is not None
                if self.node.poll() is not None:
                    break
                try:
                    gpus = kiln.cluster()["gpus"]
                    if sum(1 for g in gpus if g["node"] == NODE) == len(SLOTS):
                        return
                except kiln_client.KilnError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"kiln node {NODE} did not register its slots:\n{tail(self.node_log)}")

    def stop(self) -> None:
        # The node first (it drains its workers), then the server it talks to.
        stop(self.node, 15)
        stop(self.nats, 5)

    def logs(self) -> str:
        return f"---- kiln node log (tail) ----\n{tail(self.node_log)}\n---- nats-server log (tail) ----\n{tail(self.nats_log, 20)}"


_cluster: List[KilnCluster] = []


@pytest.fixture(scope="session")
def kiln_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnCluster]:
    kiln_bin = pathlib.Path(os.environ.get("KILN_BIN") or REPO / "target" / "debug" / "kiln")
    if not kiln_bin.is_file():
        pytest.skip(f"no kiln binary at {kiln_bin} (build it with `cargo build`, or set KILN_BIN)")
    nats_server = os.environ.get("KILN_NATS_SERVER") or shutil.which("nats-server")
    if not nats_server or not pathlib.Path(nats_server).exists():
        pytest.fail("no nats-server: set KILN_NATS_SERVER or put nats-server on PATH (scripts/setup.sh installs one)")
    cluster = KilnCluster(tmp_path_factory.mktemp("kiln"), kiln_bin, nats_server)
    _cluster.append(cluster)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        _cluster.remove(cluster)


@pytest.fixture
def url(kiln_cluster: KilnCluster) -> str:
    return kiln_cluster.url


@pytest.fixture
def client(url: str) -> Iterator[kiln_client.Client]:
    """A blocking client, closed (its thread stopped) after the test."""
    with kiln_client.Client(url, timeout=10) as kiln:
        yield kiln


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: "pytest.CallInfo[None]") -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _cluster:
        report.sections.append(("kiln logs", _cluster[0].logs()))
