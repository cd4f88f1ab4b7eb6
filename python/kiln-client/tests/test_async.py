"""The asyncio `kiln_client.AsyncClient` against a real node (see conftest.py).

Each test is a plain function running its coroutine with `asyncio.run`, so no pytest plugin
is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import uuid
from typing import Any, Awaitable, Callable, Dict, List

import pytest

import kiln_client
from kiln_client import AsyncClient, Event, KilnError

FAST = {"steps": 3, "step_ms": 10}


def run(url: str, test: Callable[[AsyncClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with await kiln_client.connect(url, timeout=10) as kiln:
            return await test(kiln)

    return asyncio.run(main())


def test_submit_wait_download(url: str, tmp_path: pathlib.Path) -> None:
    async def test(kiln: AsyncClient) -> None:
        reply = await kiln.submit("demo", {"prompt": "a cat from asyncio"}, FAST, reuse=True, deadline_ms=None)
        seen: List[Event] = []
        view = await kiln.wait(reply["job_id"], timeout=60, on_event=seen.append)
        assert view["status"] == "completed", view
        assert [e.type for e in seen].count("artifact") == 2
        artifact_events = {e.artifact["name"]: e.artifact for e in seen if e.artifact}
        paths = await kiln.download(view, tmp_path)
        for path in paths:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == artifact_events[path.name]["sha256"]
        # Reuse: the same request again gives the same job.
        again = await kiln.submit("demo", {"prompt": "a cat from asyncio"}, FAST, reuse=True)
        assert again["reused"] and again["job_id"] == reply["job_id"]

    run(url, test)


def test_submit_with_a_local_file(url: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "input.bin"
    path.write_bytes(bytes(range(256)) * 300)

    async def test(kiln: AsyncClient) -> None:
        reply = await kiln.submit("demo", {"prompt": "with a file"}, FAST, files={"image": str(path)})
        view = await kiln.wait(reply["job_id"], timeout=60)
        assert view["status"] == "completed", view
        assert view["inputs"]["image"]["object"].endswith("/input.bin")
        logs = [e.message async for e in kiln.events(reply["job_id"]) if e.type == "message"]
        assert any("input image input.bin: 76800 bytes" in (m or "") for m in logs), logs

    run(url, test)


def test_events_resume_on_a_new_connection(url: str) -> None:
    """A follower reads part of a history, loses its connection, and a new one continues
    after the last sequence it handled: every event once, in order."""

    async def first_part(kiln: AsyncClient) -> Any:
        job_id = (await kiln.submit("demo", {"prompt": "resume"}, {"steps": 10, "step_ms": 30}))["job_id"]
        got: List[Event] = []
        events = kiln.events(job_id)
        async for event in events:
            got.append(event)
            if event.type == "progress":
                break
        await events.aclose()
        return job_id, got

    job_id, first = run(url, first_part)
    assert first[-1].type == "progress" and not first[-1].terminal

    async def second_part(kiln: AsyncClient) -> Any:
        rest = [e async for e in kiln.events(job_id, after_seq=first[-1].seq)]
        whole = [e async for e in kiln.events(job_id)]
        return rest, whole

    rest, whole = run(url, second_part)
    assert rest[-1].status == "completed"
    assert [e.seq for e in first + rest] == [e.seq for e in whole]
    assert first + rest == whole


def test_cancel(url: str) -> None:
    async def test(kiln: AsyncClient) -> None:
        job_id = (await kiln.submit("demo", {"prompt": "cancel me"}, {"steps": 400, "step_ms": 50}))["job_id"]
        async for event in kiln.events(job_id):
            if event.type == "status" and event.status == "running":
                break
        await kiln.cancel(job_id)
        statuses: List[str] = []
        view = await kiln.wait(job_id, timeout=30, on_event=lambda e: statuses.append(e.status or ""))
        assert view["status"] == "cancelled" and view["error"]["code"] == "cancelled", view
        assert statuses[-1] == "cancelled"

    run(url, test)


def test_coded_errors(url: str) -> None:
    async def test(kiln: AsyncClient) -> None:
        with pytest.raises(KilnError) as e:
            await kiln.submit("sdxl", {"prompt": "x"})
        assert (e.value.code, type(e.value)) == ("unknown_model", KilnError)
        with pytest.raises(KilnError) as e:
            await kiln.submit("demo", {})  # the model requires a prompt
        assert e.value.code == "bad_request"
        with pytest.raises(KilnError) as e:
            await kiln.jobs(status="sleeping")
        assert e.value.code == "bad_request"
        with pytest.raises(KilnError) as e:
            await kiln.batch("nope")
        assert e.value.code == "not_found"
        slow = (await kiln.submit("demo", {"prompt": "slow"}, {"steps": 100, "step_ms": 50}))["job_id"]
        with pytest.raises(KilnError) as e:
            await kiln.wait(slow, timeout=0.5)
        assert e.value.code == "timeout"
        await kiln.cancel(slow)
        assert (await kiln.wait(slow, timeout=30))["status"] == "cancelled"

    run(url, test)


def test_batch(url: str, tmp_path: pathlib.Path) -> None:
    async def test(kiln: AsyncClient) -> None:
        items: List[Dict[str, Any]] = [{"inputs": {"prompt": f"view {i}"}} for i in range(4)]
        items[3]["labels"] = {"view": "back", "storyboard_id": "sb-own"}
        reply = await kiln.submit_batch("demo", items, FAST, labels={"storyboard_id": "sb-3"})
        item_events: List[Event] = []
        view = await kiln.wait_batch(reply["batch_id"], timeout=60, on_event=item_events.append)
        assert view["status"] == "succeeded", view
        assert view["summary"]["completed"] == 4
        assert sorted(e.item["index"] for e in item_events if e.type == "item_completed" and e.item) == [0, 1, 2, 3]
        assert item_events[-1].type == "batch_finished" and item_events[-1].terminal
        items_now = await kiln.batch_items(reply["batch_id"])
        assert [i["labels"] for i in items_now] == [{"storyboard_id": "sb-3"}] * 3 + [{"view": "back", "storyboard_id": "sb-own"}]
        tagged = await kiln.jobs(labels={"storyboard_id": "sb-3"})
        assert sorted(j["job_id"] for j in tagged["jobs"]) == sorted(i["job_id"] for i in items_now[:3])
        for item in items_now:
            paths = await kiln.download(item, tmp_path / str(item["index"]))
            assert len(paths) == 2
        # Resuming the batch's events after its second event replays the rest only.
        rest = [e async for e in kiln.batch_events(reply["batch_id"], after_seq=item_events[1].seq)]
        assert rest == item_events[2:]
        # Nothing to retry: every item completed.
        with pytest.raises(KilnError) as e:
            await kiln.retry_batch(reply["batch_id"])
        assert e.value.code == "bad_request"

        # cancel_batch stops items that have not ended.
        slow = await kiln.submit_batch("demo", [{"inputs": {"prompt": "slow"}}] * 3, {"steps": 400, "step_ms": 50})
        await kiln.cancel_batch(slow["batch_id"])
        done = await kiln.wait_batch(slow["batch_id"], timeout=30)
        assert done["summary"]["cancelled"] == 3 and done["status"] == "failed", done

    run(url, test)


def test_cluster_and_models(url: str) -> None:
    async def test(kiln: AsyncClient) -> None:
        cluster = await kiln.cluster()
        assert cluster["nodes"][0]["slots"] == ["cpu:0", "cpu:1"]
        assert sorted(g["slot"] for g in cluster["gpus"]) == ["cpu:0", "cpu:1"]
        names = sorted(m["name"] for m in (await kiln.models())["models"])
        assert names == ["demo", "noop"]
        assert len(await kiln.ping(wait=0.3)) == 1

    run(url, test)


def test_an_async_client_on_a_connection_of_ones_own(url: str) -> None:
    import nats

    async def main() -> None:
        nc = await nats.connect(url)
        kiln = AsyncClient(nc)
        assert (await kiln.submit("noop"))["status"] == "queued"
        await kiln.close()  # not its connection: left open
        assert nc.is_connected
        await nc.close()

    asyncio.run(main())


def test_an_idempotency_key_gives_one_job(url: str) -> None:
    async def test(kiln: AsyncClient) -> None:
        key = str(uuid.uuid4())
        a = await kiln.submit("noop", idempotency_key=key)
        b = await kiln.submit("noop", idempotency_key=key)
        assert a["job_id"] == b["job_id"] and b["duplicate"]

    run(url, test)
