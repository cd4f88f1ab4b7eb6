"""Fixtures: a real Kiln cluster (a nats-server with JetStream and one `kiln node`) for the
tests against a node. (harness.py puts the checkout's SDK source first on every path.)

The cluster needs the kiln binary: `$KILN_BIN`, else `<repo>/target/debug/kiln` (cargo build);
without it those tests are skipped. The nats-server is `$KILN_NATS_SERVER`, else `nats-server`
next to this Python (scripts/setup.sh installs it in the venv), else on PATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
from harness import REPO, WORKERS, worker_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen, limit_s: float, log: Path) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on {port}; its log:\n{log.read_text(errors='replace')}")


def find_nats_server() -> str:
    candidates: List[Optional[str]] = [
        os.environ.get("KILN_NATS_SERVER"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError("no nats-server: set KILN_NATS_SERVER or run scripts/setup.sh")


def stop(process: Optional[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; always reaped."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Cluster:
    """A running nats-server and kiln node; `model` runs tests/workers/sdk_worker.py."""

    url: str
    dir: Path
    node_log: Path
    model: str = "sdk"

    def logs(self) -> str:
        return self.node_log.read_text(errors="replace")


MODEL_TOML = """
[[models]]
name = "sdk"
engine = {{ kind = "process", command = [{python}, {worker}], ready_timeout_ms = 20000 }}
timeout_ms = 60000
max_attempts = 3
required_inputs = ["text"]
"""

# As tests/common/mod.rs's config_toml: fast heartbeats and retries, no metrics port.
CONFIG_TOML = """
[nats]
url = "{url}"
ack_wait_ms = 10000
[node]
slots = ["cpu:0"]
metrics_addr = ""
heartbeat_ms = 300
registry_ttl_ms = 2000
loss_after_ms = 1000
[retry]
backoff_initial_ms = 100
backoff_max_ms = 1000
[restart]
max_restarts = 5
window_ms = 60000
backoff_initial_ms = 50
backoff_max_ms = 500
"""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    kiln = Path(os.environ.get("KILN_BIN") or REPO / "target" / "debug" / "kiln")
    if not kiln.is_file():
        pytest.skip(f"no kiln binary at {kiln}: build it (cargo build) or set KILN_BIN")
    import nats  # noqa: F401  (fail here, not in every test, when nats-py is missing)

    work = tmp_path_factory.mktemp("kiln")
    server_log = work / "nats-server.log"
    node_log = work / "node.log"
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server: Optional[subprocess.Popen] = None
    node: Optional[subprocess.Popen] = None
    try:
        with open(server_log, "ab") as log:
            server = subprocess.Popen(
                [find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(work / "jetstream")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_port(port, server, 10, server_log)

        config = work / "node.toml"
        model = MODEL_TOML.format(python=json.dumps(sys.executable), worker=json.dumps(str(WORKERS / "sdk_worker.py")))
        config.write_text(CONFIG_TOML.format(url=url) + model)
        with open(node_log, "ab") as log:
            node = subprocess.Popen(
                [str(kiln), "node", "--config", str(config), "--nats", url, "--node-name", "sdk-test", "--drain-grace-s", "2"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=work,
                env=worker_env(KILN_LOG="info,async_nats=warn"),
            )
        running = Cluster(url=url, dir=work, node_log=node_log)
        if not asyncio.run(_wait_ready(url, node, 30)):
            raise RuntimeError(f"the kiln node did not register its slot; its log:\n{running.logs()}")
        yield running
    finally:
        # The node first: it stops its worker (the worker's process group dies with it).
        stop(node, 10)
        stop(server, 10)


async def _wait_ready(url: str, node: subprocess.Popen, limit_s: float) -> bool:
    """Until `kiln.api.cluster` lists the node's slot."""
    import nats

    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and node.poll() is None:
            try:
                reply = json.loads((await nc.request("kiln.api.cluster", b"{}", timeout=2)).data)
                if any(g.get("node") == "sdk-test" for g in reply.get("gpus", [])):
                    return True
            except Exception:  # no responders yet, or a timeout while the node starts
                pass
            await asyncio.sleep(0.1)
        return False
    finally:
        await nc.close()
