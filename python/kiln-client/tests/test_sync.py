"""The blocking `kiln_client.Client` against a real node (see conftest.py)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
import uuid
from typing import Any, Dict, Iterator, List

import pytest

import kiln_client
from kiln_client import Client, Event, JobView, KilnError

FAST = {"steps": 3, "step_ms": 10}


def sha256_of(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submit_wait_download_checks_sha256(client: Client, tmp_path: pathlib.Path) -> None:
    reply = client.submit("demo", {"prompt": "a cat from the sync client"}, FAST, priority=1, idempotency_key=str(uuid.uuid4()))
    assert reply["status"] == "queued" and not reply["duplicate"] and not reply["reused"]
    seen: List[Event] = []
    view = client.wait(reply["job_id"], timeout=60, on_event=seen.append)
    assert view["status"] == "completed", view
    assert view["priority"] == 1
    assert [e.status for e in seen if e.type == "status"] == ["queued", "running", "completed"]
    assert any(e.type == "progress" and e.stage == "inference" for e in seen)
    assert [e.seq for e in seen] == sorted(e.seq for e in seen) and len({e.seq for e in seen}) == len(seen)
    assert seen[-1].terminal

    paths = client.download(view, tmp_path / "out")
    assert [p.name for p in paths] == ["image.png", "meta.json"]
    assert all(p.parent == tmp_path / "out" / reply["job_id"] for p in paths), paths
    for path, artifact in zip(paths, view["artifacts"]):
        assert path.stat().st_size == artifact["size"] > 0
        assert sha256_of(path) == artifact["sha256"]
    assert not list((tmp_path / "out").glob("**/*.part"))
    # The same by job id (the result endpoint names the artifacts).
    again = client.download(reply["job_id"], tmp_path / "again")
    assert [sha256_of(p) for p in again] == [sha256_of(p) for p in paths]
    assert client.result(reply["job_id"])["artifacts"] == view["artifacts"]


def test_labels_are_echoed_and_select_jobs(client: Client) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    labels = {"user_id": user, "session_id": "s-77"}
    job_id = client.submit("noop", labels=labels)["job_id"]
    other = client.submit("noop", labels={"user_id": "someone-else"})["job_id"]
    view = client.wait(job_id, timeout=30)
    assert view["labels"] == labels
    assert all(e.labels == labels for e in client.events(job_id))
    assert [j["job_id"] for j in client.jobs(labels={"user_id": user})["jobs"]] == [job_id]
    assert [j["job_id"] for j in client.jobs(labels={"user_id": user, "session_id": "s-1"})["jobs"]] == []
    assert other in [j["job_id"] for j in client.jobs(model="noop", labels={"user_id": "someone-else"})["jobs"]]
    with pytest.raises(KilnError) as e:
        client.submit("noop", labels={"bad name!": "x"})
    assert e.value.code == "bad_request"


def test_two_jobs_downloaded_into_one_folder_keep_their_own_files(client: Client, tmp_path: pathlib.Path) -> None:
    one = client.wait(client.submit("demo", {"prompt": "the first"}, FAST)["job_id"], timeout=60)
    two = client.wait(client.submit("demo", {"prompt": "the second"}, FAST)["job_id"], timeout=60)
    assert one["status"] == two["status"] == "completed"
    assert [a["name"] for a in one["artifacts"]] == [a["name"] for a in two["artifacts"]]
    # By default each job gets its own subfolder: the second does not overwrite the first.
    first = client.download(one, tmp_path)
    second = client.download(two["job_id"], tmp_path)
    assert [p.parent for p in first] == [tmp_path / one["job_id"]] * 2
    assert [p.parent for p in second] == [tmp_path / two["job_id"]] * 2
    assert [sha256_of(p) for p in first] == [a["sha256"] for a in one["artifacts"]]
    assert [sha256_of(p) for p in second] == [a["sha256"] for a in two["artifacts"]]
    # Straight into the folder: the same content again is fine; other content under a name
    # already there is refused before anything is written, unless overwrite=True.
    flat = tmp_path / "flat"
    assert [p.parent for p in client.download(one, flat, per_job=False)] == [flat] * 2
    client.download(one, flat, per_job=False)
    with pytest.raises(KilnError) as e:
        client.download(two, flat, per_job=False)
    assert e.value.code == "file_exists" and "image.png" in e.value.message
    assert [sha256_of(flat / a["name"]) for a in one["artifacts"]] == [a["sha256"] for a in one["artifacts"]]
    client.download(two, flat, per_job=False, overwrite=True)
    assert [sha256_of(flat / a["name"]) for a in two["artifacts"]] == [a["sha256"] for a in two["artifacts"]]


def test_a_wrong_sha256_is_refused_and_nothing_is_written(client: Client, tmp_path: pathlib.Path) -> None:
    view = client.wait(client.submit("noop")["job_id"], timeout=30)
    assert view["status"] == "completed", view
    (artifact,) = view["artifacts"]
    forged = dict(artifact, sha256="0" * 64)
    with pytest.raises(kiln_client.ChecksumError) as e:
        client.download_artifact(forged, tmp_path / "x.bin")  # type: ignore[arg-type]
    assert e.value.code == "sha256_mismatch"
    assert list(tmp_path.iterdir()) == []
    assert sha256_of(client.download_artifact(artifact, tmp_path / "x.bin")) == artifact["sha256"]


def test_submit_with_a_local_file(client: Client, tmp_path: pathlib.Path) -> None:
    data = b"reference image bytes " * 1000
    path = tmp_path / "my ref.png"
    path.write_bytes(data)
    reply = client.submit("demo", {"prompt": "a cat with a reference"}, FAST, files={"image": path})
    view = client.wait(reply["job_id"], timeout=60)
    assert view["status"] == "completed", view
    name = view["inputs"]["image"]["object"]
    assert name.startswith("uploads/") and name.endswith("/my_ref.png"), name
    # The worker got the file: it logs its size.
    messages = [e.message or "" for e in client.events(reply["job_id"])]
    assert any(f"input image my_ref.png: {len(data)} bytes" in m for m in messages), messages
    # An upload of bytes, passed by hand.
    obj = client.upload(b"inline bytes", name=f"uploads/{uuid.uuid4().hex}/raw.bin")
    view = client.wait(client.submit("demo", {"prompt": "p", "image": {"object": obj}}, FAST)["job_id"], timeout=60)
    assert view["status"] == "completed", view
    with pytest.raises(ValueError):
        client.submit("demo", {"image": "x"}, files={"image": path})


def test_events_resume_after_the_last_sequence(client: Client) -> None:
    job_id = client.submit("demo", {"prompt": "resume me"}, {"steps": 8, "step_ms": 30})["job_id"]
    first: List[Event] = []
    for event in client.events(job_id):
        first.append(event)
        if len(first) == 4:
            break  # leaving the loop closes the consumer
    rest = list(client.events(job_id, after_seq=first[-1].seq))
    assert rest and rest[-1].terminal and rest[-1].status == "completed"
    whole = list(client.events(job_id))
    assert [e.seq for e in first + rest] == [e.seq for e in whole]
    assert [e.raw for e in first + rest] == [e.raw for e in whole]
    assert len({e.seq for e in whole}) == len(whole)
    # Resuming after the terminal event sees nothing more, and ends at once.
    started = time.monotonic()
    assert list(client.events(job_id, after_seq=whole[-1].seq)) == []
    assert time.monotonic() - started < 4  # not FOLLOW_CHECK_S (5 s) of waiting
    # Resuming right before the terminal event gets just that.
    started = time.monotonic()
    assert list(client.events(job_id, after_seq=whole[-1].seq - 1)) == [whole[-1]]
    assert time.monotonic() - started < 4  # not FOLLOW_CHECK_S (5 s) of waiting


def test_a_quiet_follow_asks_whether_the_job_exists(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # No event for a while: the follow asks the status endpoint (a job whose history expired
    # would end there; one that does not exist is an error).
    monkeypatch.setattr("kiln_client._async_client.FOLLOW_CHECK_S", 0.3)
    with pytest.raises(KilnError) as e:
        list(client.events("no-such-job"))
    assert e.value.code == "not_found"


def test_cancel_a_running_job(client: Client) -> None:
    job_id = client.submit("demo", {"prompt": "a long one"}, {"steps": 400, "step_ms": 50})["job_id"]
    for event in client.events(job_id):
        if event.type == "progress":
            break
    view = client.cancel(job_id)
    assert view["job_id"] == job_id
    view = client.wait(job_id, timeout=30)
    assert view["status"] == "cancelled", view
    assert view["error"]["code"] == "cancelled"
    # Cancelling a job that ended changes nothing.
    assert client.cancel(job_id)["status"] == "cancelled"


def test_coded_errors(client: Client) -> None:
    with pytest.raises(KilnError) as e:
        client.submit("no-such-model", {"prompt": "x"})
    assert e.value.code == kiln_client.ErrorCode.UNKNOWN_MODEL == "unknown_model"
    assert "no-such-model" in e.value.message
    with pytest.raises(KilnError) as e:
        client.submit("demo", {"prompt": "x"}, extra={"prioirty": 1})
    assert e.value.code == "bad_request", e.value
    with pytest.raises(KilnError) as e:
        client.submit("demo", {"prompt": "x"}, priority=256)
    assert e.value.code == "bad_request"
    with pytest.raises(KilnError) as e:
        client.status("0190c7e2a41b7d3f9e5c2b6a8d4f1e07")
    assert e.value.code == "not_found"
    with pytest.raises(KilnError) as e:
        client.submit("demo", {"prompt": "x", "image": {"object": "uploads/nope/none.png"}})
    assert e.value.code == "not_found"
    with pytest.raises(KilnError) as e:
        client.request("jobs", {"limit": "many"})
    assert e.value.code == "bad_request"
    # A job that fails carries its error in its view, not as a raised error.
    view = client.wait(client.submit("demo", {"prompt": "x"}, {"fail": "fatal", "steps": 1, "step_ms": 0})["job_id"], timeout=30)
    assert view["status"] == "failed" and view["error"]["code"] == "bad_request", view


def test_batch_end_to_end(client: Client, tmp_path: pathlib.Path) -> None:
    flag = tmp_path / "dependency"
    items: List[Dict[str, Any]] = [
        {"inputs": {"prompt": "frame 1"}},
        {"inputs": {"prompt": "frame 2"}, "params": {"require_file": str(flag)}},
        {"inputs": {"prompt": "frame 3"}, "params": {"seed": 7}},
    ]
    reply = client.submit_batch("demo", items, FAST, idempotency_key=str(uuid.uuid4()))
    assert [i["index"] for i in reply["items"]] == [0, 1, 2] and not reply["duplicate"]
    events = list(client.batch_events(reply["batch_id"]))
    assert sorted(e.item["index"] for e in events[:-1] if e.item) == [0, 1, 2]
    assert events[-1].type == "batch_finished" and events[-1].summary is not None
    assert events[-1].summary["status"] == "partial"
    view = client.wait_batch(reply["batch_id"], timeout=60)
    assert view["summary"] == {"status": "partial", "total": 3, "completed": 2, "failed": 1, "cancelled": 0}
    items_now = client.batch_items(reply["batch_id"])
    assert [i["status"] for i in items_now] == ["completed", "failed", "completed"]
    assert items_now[1]["error"]["code"] == "bad_request"
    assert client.status(items_now[0]["job_id"])["batch"] == {"batch_id": reply["batch_id"], "index": 0}
    paths = client.download(items_now[2], tmp_path / "frame3")
    assert [sha256_of(p) for p in paths] == [a["sha256"] for a in items_now[2]["artifacts"]]

    flag.write_text("here now")
    retry = client.retry_batch(reply["batch_id"])
    assert retry["retry_of"] == reply["batch_id"] and [i["index"] for i in retry["items"]] == [1]
    done = client.wait_batch(retry["batch_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert client.retry_batch(reply["batch_id"])["duplicate"] is True
    assert client.batch(reply["batch_id"])["retried_by"] == retry["batch_id"]
    with pytest.raises(KilnError) as e:
        client.retry_batch(retry["batch_id"])
    assert e.value.code == "bad_request"


def test_cluster_models_jobs_and_ping(client: Client, kiln_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = client.cluster()
    assert [n["node"] for n in cluster["nodes"]] == ["py1"]
    assert sorted(g["slot"] for g in cluster["gpus"]) == ["cpu:0", "cpu:1"]
    models = {m["name"]: m for m in client.models()["models"]}
    assert models["demo"]["engine"] == "process" and models["demo"]["required_inputs"] == ["prompt"]
    assert models["noop"]["engine"] == "noop"
    assert sorted(models["noop"]["slots"]) == ["py1/cpu:0", "py1/cpu:1"]
    job_id = client.submit("noop")["job_id"]
    client.wait(job_id, timeout=30)
    assert models["noop"]["nodes"] == ["py1"] and models["noop"]["conflict"] is False
    queue = client.queue("noop")
    assert [q["model"] for q in queue["models"]] == ["noop"] and queue["target_wait_s"] == 60
    noop = queue["models"][0]
    assert (noop["slots"], [lane["lane"] for lane in noop["lanes"]]) == (2, ["high", "normal"])
    assert noop["queued"] == sum(lane["queued"] for lane in noop["lanes"])
    assert noop["service_samples"] >= 1 and "mean_service_ms" in noop and "oldest_wait_ms" not in noop
    assert sorted(q["model"] for q in client.queue()["models"]) == sorted(models)
    listed = client.jobs(model="noop", status="completed", limit=1000)["jobs"]
    assert job_id in [j["job_id"] for j in listed] and all(j["model"] == "noop" for j in listed)
    assert len(client.jobs(limit=1)["jobs"]) == 1
    assert client.jobs(dead_letter=True) == {"jobs": []}
    instances = client.ping(wait=0.5)
    assert [i["name"] for i in instances] == ["kiln-api"]


def test_connecting_nowhere_fails_fast() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(KilnError) as e:
        Client(f"nats://127.0.0.1:{port}", timeout=1.5)
    assert e.value.code == "unreachable"
    assert time.monotonic() - started < 10


def test_the_results_feed_resumes_where_its_consumer_stopped(client: Client) -> None:
    # Jobs end before the consumer exists: it still reads them (the stream keeps every end).
    mark = uuid.uuid4().hex
    ids = [client.submit("noop", labels={"run": mark, "n": str(i)})["job_id"] for i in range(3)]
    for job_id in ids:
        client.wait(job_id, timeout=30)
    consumer = f"feed-{mark}"

    def ours(jobs: Iterator[JobView]) -> Iterator[JobView]:
        return (j for j in jobs if j.get("labels", {}).get("run") == mark)

    first = []
    for job in ours(client.finished(consumer, model="noop", idle_timeout=3)):
        first.append(job["job_id"])
        if len(first) == 2:
            break  # the second was being handled, not finished with: it comes again
    # The feed is in the order the jobs ended, which on two slots need not be the order
    # they were submitted in.
    assert len(first) == 2 and set(first) <= set(ids), (first, ids)
    rest = [job["job_id"] for job in ours(client.finished(consumer, model="noop", idle_timeout=3))]
    unread = [i for i in ids if i not in first]
    assert rest == [first[1], *unread], "resumed at the one not acknowledged, then the rest, once each"
    view = client.status(ids[0])
    assert view["status"] == "completed" and view["labels"] == {"run": mark, "n": "0"}


def test_a_batch_with_reuse_and_a_concurrency_limit(client: Client) -> None:
    # Seed 004's storyboard: repeated prompts run once, and the batch takes at most one slot.
    items = [{"inputs": {"prompt": p}} for p in ["dawn", "dusk", "dawn", "noon"]]
    reply = client.submit_batch("demo", items, {"steps": 1, "step_ms": 1}, reuse=True, max_concurrency=1)
    jobs = [i["job_id"] for i in reply["items"]]
    assert jobs[0] == jobs[2] and len(set(jobs)) == 3, reply
    view = client.wait_batch(reply["batch_id"], timeout=60)
    assert view["status"] == "succeeded" and view["max_concurrency"] == 1 and view["reuse"], view
    assert [i["status"] for i in view["items"]] == ["completed"] * 4


def test_a_retrying_event_carries_its_reason_as_the_protocol_lists_them() -> None:
    protocol = (pathlib.Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md").read_text()
    table = protocol.split("| `reason` | the previous attempt... |", 1)[1].split("\n\n", 1)[0]
    listed = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert list(kiln_client.RETRY_REASONS) == listed
    line = next(ln for ln in protocol.splitlines() if ln.startswith("{") and '"type":"retrying"' in ln and "node_lost" in ln)
    event = Event.from_json(7, json.loads(line))
    assert (event.type, event.attempt, event.reason, event.status) == ("retrying", 2, "node_lost", None)
    assert event.message is not None and "gpu-a" in event.message


def test_a_quota_refusal_carries_when_to_retry() -> None:
    # The reply's decoding alone (no node): `quota_exceeded` keeps `retry_after_ms`, which
    # survives pickling; other errors have none.
    from kiln_client._async_client import _decode_reply
    import pickle

    body = {"error": {"code": "quota_exceeded", "message": "quota: key \"A\" ...", "retry_after_ms": 1000}}
    with pytest.raises(KilnError) as refused:
        _decode_reply("kiln.api.submit", json.dumps(body).encode(), None)
    assert refused.value.code == kiln_client.ErrorCode.QUOTA_EXCEEDED and refused.value.retry_after_ms == 1000
    assert pickle.loads(pickle.dumps(refused.value)).retry_after_ms == 1000
    with pytest.raises(KilnError) as other:
        _decode_reply("kiln.api.status", json.dumps({"error": {"code": "not_found", "message": "m"}}).encode(), None)
    assert other.value.retry_after_ms is None


def test_the_newest_live_preview_is_kept_and_not_an_artifact(client: Client) -> None:
    # The demo worker sends a small PNG of a step whenever one is due (one per 500 ms by
    # default): 6 steps of 200 ms send some, of which the newest is kept.
    reply = client.submit("demo", {"prompt": "a preview"}, {"steps": 6, "step_ms": 200})
    view = client.wait(reply["job_id"], timeout=60)
    assert view["status"] == "completed", view
    preview = client.preview(reply["job_id"])
    assert preview is not None
    assert (preview["job_id"], preview["attempt"], preview["content_type"]) == (reply["job_id"], 1, "image/png")
    assert preview["seq"] >= 2 and preview["ts_ms"] > 0
    assert preview["data"].startswith(b"\x89PNG\r\n\x1a\n")
    assert [a["name"] for a in view["artifacts"]] == ["image.png", "meta.json"]
    # None for a job that sent none, one that does not exist, and an id that is no job's.
    noop = client.submit("noop", {}, {})
    client.wait(noop["job_id"], timeout=60)
    for job_id in [noop["job_id"], "no-such-job", "*", "a.b"]:
        assert client.preview(job_id) is None, job_id
