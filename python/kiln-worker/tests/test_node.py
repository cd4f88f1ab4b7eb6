"""An SDK worker hosted by a real kiln node (the `cluster` fixture), driven through the NATS API
with nats-py as any client would: submit, follow `kiln.events.<job_id>`, read the job, download
the artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, TypeVar

import pytest
from conftest import Cluster

T = TypeVar("T")

TERMINAL = ("completed", "failed", "cancelled")


class Api:
    """The client side of docs/PROTOCOL.md: requests on `kiln.api.<endpoint>`, events, objects."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def call(self, endpoint: str, body: Dict[str, Any]) -> Dict[str, Any]:
        reply = json.loads((await self.nc.request(f"kiln.api.{endpoint}", json.dumps(body).encode(), timeout=10)).data)
        if set(reply) == {"error"}:
            raise AssertionError(f"kiln.api.{endpoint}: {reply['error']}")
        return reply

    async def submit(self, inputs: Dict[str, Any], params: Dict[str, Any], **fields: Any) -> str:
        reply = await self.call("submit", {"model": "sdk", "inputs": inputs, "params": params, **fields})
        return str(reply["job_id"])

    async def events(
        self, job_id: str, on_event: Optional[Callable[[Dict[str, Any]], Awaitable[None]]] = None, limit_s: float = 60
    ) -> List[Dict[str, Any]]:
        """The job's whole history, replayed then followed, up to its terminal status event."""
        from nats.js.api import DeliverPolicy

        subject = f"kiln.events.{job_id}"
        sub = await self.js.subscribe(subject, stream="KILN_EVENTS", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        events: List[Dict[str, Any]] = []
        deadline = time.monotonic() + limit_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"job {job_id} did not end within {limit_s} s: {events}"
                event = json.loads((await sub.next_msg(timeout=remaining)).data)
                events.append(event)
                if on_event is not None:
                    await on_event(event)
                if event["type"] == "status" and event["status"] in TERMINAL:
                    return events
        finally:
            await sub.unsubscribe()

    async def download(self, artifact: Dict[str, Any]) -> bytes:
        store = await self.js.object_store(artifact["bucket"])
        return bytes((await store.get(artifact["object"])).data)


def with_api(cluster: Cluster, test: Callable[[Api], Awaitable[T]]) -> T:
    import nats

    async def main() -> T:
        nc = await nats.connect(cluster.url)
        try:
            return await test(Api(nc))
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except BaseException:
        print(f"---- node log ----\n{cluster.logs()}")
        raise


def statuses(events: List[Dict[str, Any]]) -> List[str]:
    return [e["status"] for e in events if e["type"] == "status"]


def test_a_job_completes_with_its_artifacts_and_stages(cluster: Cluster) -> None:
    async def test(api: Api) -> None:
        files = await api.js.object_store("kiln_files")
        await files.put("uploads/sdk-test/in.bin", b"uploaded through the files bucket")
        job_id = await api.submit(
            {"text": "hello kiln", "file": {"object": "uploads/sdk-test/in.bin"}}, {"steps": 3, "step_ms": 20, "stage": "denoising"}
        )
        events = await api.events(job_id)
        assert statuses(events) == ["queued", "running", "completed"], events
        progress = [e for e in events if e["type"] == "progress" and e.get("stage") == "denoising"]
        assert [(e["progress"], e["message"]) for e in progress] == [
            (pytest.approx(33.333, abs=0.01), "step 1/3"),
            (pytest.approx(66.667, abs=0.01), "step 2/3"),
            (100.0, "step 3/3"),
        ], events
        assert any(e["type"] == "message" and e["message"].startswith("pid ") for e in events), events

        view = await api.call("status", {"job_id": job_id})
        assert (view["status"], view["attempt"]) == ("completed", 1)
        by_name = {a["name"]: a for a in view["artifacts"]}
        assert sorted(by_name) == ["info.json", "out.txt"]
        for artifact in view["artifacts"]:
            data = await api.download(artifact)
            assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
            assert len(data) == artifact["size"]
        assert await api.download(by_name["out.txt"]) == b"HELLO KILN"
        assert by_name["out.txt"]["content_type"] == "text/plain"
        assert by_name["info.json"]["content_type"] == "application/json"
        info = json.loads(await api.download(by_name["info.json"]))
        assert info["file_sha256"] == hashlib.sha256(b"uploaded through the files bucket").hexdigest()

    with_api(cluster, test)


def test_a_user_error_fails_the_job_at_once(cluster: Cluster) -> None:
    async def test(api: Api) -> None:
        job_id = await api.submit({"text": "rude"}, {"fail": "user"})
        events = await api.events(job_id)
        assert statuses(events) == ["queued", "running", "failed"], events
        view = await api.call("status", {"job_id": job_id})
        assert (view["status"], view["attempt"], view["dead_letter"]) == ("failed", 1, False)
        assert view["error"]["code"] == "bad_request"
        assert view["error"]["message"] == "the text 'rude' is not acceptable (param fail=user)"

    with_api(cluster, test)


def test_a_retryable_error_is_retried(cluster: Cluster) -> None:
    async def test(api: Api) -> None:
        job_id = await api.submit({"text": "again"}, {"fail_on_attempts": [1], "steps": 1, "step_ms": 0})
        events = await api.events(job_id)
        assert statuses(events) == ["queued", "running", "retrying", "running", "completed"], events
        retrying = next(e for e in events if e.get("status") == "retrying")
        assert "transient failure on attempt 1" in retrying["error"]["message"], retrying
        view = await api.call("status", {"job_id": job_id})
        assert (view["status"], view["attempt"]) == ("completed", 2)

    with_api(cluster, test)


def test_an_unexpected_exception_is_retried_until_the_dead_letter(cluster: Cluster) -> None:
    async def test(api: Api) -> None:
        job_id = await api.submit({"text": "boom"}, {"fail": "exception"}, max_attempts=2)
        events = await api.events(job_id)
        assert statuses(events) == ["queued", "running", "retrying", "running", "failed"], events
        view = await api.call("status", {"job_id": job_id})
        assert (view["attempt"], view["dead_letter"]) == (2, True)
        assert view["error"]["message"].startswith("worker error: ZeroDivisionError('division by zero') at sdk_worker.py:"), view

    with_api(cluster, test)


def test_cancel_ends_the_job_cancelled_and_the_worker_serves_on(cluster: Cluster) -> None:
    async def test(api: Api) -> None:
        job_id = await api.submit({"text": "long"}, {"steps": 2000, "step_ms": 50})
        cancel_sent: List[float] = []
        pids: List[str] = []

        async def on_event(event: Dict[str, Any]) -> None:
            if event["type"] == "message" and event["message"].startswith("pid "):
                pids.append(event["message"].split()[1])
            if event["type"] == "progress" and event.get("stage") == "thinking" and not cancel_sent:
                cancel_sent.append(time.monotonic())
                view = await api.call("cancel", {"job_id": job_id})
                assert view["cancel_requested"], view

        events = await api.events(job_id, on_event)
        assert statuses(events) == ["queued", "running", "cancelled"], events
        # The SDK answered the cancel: Kiln did not have to kill the worker after its 3 s grace.
        assert time.monotonic() - cancel_sent[0] < 2.5
        steps = [e for e in events if e["type"] == "progress"]
        assert len(steps) < 100, f"the worker stopped early ({len(steps)} steps)"

        # The same worker process runs the next job: it was not killed and restarted.
        after = await api.submit({"text": "after"}, {"steps": 1, "step_ms": 0})
        assert statuses(await api.events(after)) == ["queued", "running", "completed"]
        view = await api.call("status", {"job_id": after})
        info = json.loads(await api.download(next(a for a in view["artifacts"] if a["name"] == "info.json")))
        assert [str(info["pid"])] == pids, (info, pids)

    with_api(cluster, test)
