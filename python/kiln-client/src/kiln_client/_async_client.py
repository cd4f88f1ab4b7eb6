"""`AsyncClient`: the whole client API on asyncio, over one nats-py connection.

Every method maps to one piece of docs/PROTOCOL.md:

| method                                  | what it does on the wire                                  |
| --------------------------------------- | --------------------------------------------------------- |
| `request`                               | any `<prefix>.api.<endpoint>`, error envelope → KilnError |
| `submit`, `status`, `result`, `cancel`  | the job endpoints; `submit(files=..)` uploads first       |
| `jobs`, `models`, `cluster`             | the listings                                              |
| `upload`                                | an object store put to `<prefix>_files`                  |
| `events`, `wait`                        | an ordered consumer on `<prefix>.events.<job_id>` in the  |
|                                         | events stream, from the start or after a stream sequence |
| `download`, `download_artifact`         | object store gets from `kiln_results_<model>`, sha256    |
|                                         | checked against the artifact's recorded digest           |
| `submit_batch`, `batch`, `batch_items`, | the batch endpoints; `batch_events`, `wait_batch` follow |
| `cancel_batch`, `retry_batch`           | `<prefix>.events.<batch_id>`                             |
| `ping`                                  | `$SRV.PING.<prefix>-api`, every instance's reply          |
| `finished`                              | a durable consumer on the results feed                   |
|                                         | (`<prefix>.finished.<model>` in `KILN_FINISHED`)         |
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pathlib
import re
import time
import uuid
from typing import (
    Any,
    AsyncGenerator,
    Callable,
    Coroutine,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
    cast,
)

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.object_store import ObjectStore

from .errors import ChecksumError, ErrorCode, KilnError
from .types import (
    JSON,
    TERMINAL_STATUSES,
    Artifact,
    BatchItem,
    BatchItemView,
    BatchReply,
    BatchView,
    ClusterReply,
    Event,
    JobView,
    ListJobsReply,
    ModelsReply,
    Preview,
    QueueReply,
    ResultReply,
    StrPath,
    SubmitReply,
)

log = logging.getLogger("kiln_client")

DEFAULT_URL = "nats://127.0.0.1:4222"

# While following events: after this long without one, ask whether the job (or batch) ended
# anyway. Its history may have expired (the events stream keeps 24 h) or lost its terminal
# event; without the check such a follow would wait for ever.
FOLLOW_CHECK_S = 5.0
# Once a status check says the job ended, how long more to wait for its terminal event (the
# record and the event are two writes: the event may be a moment behind).
END_GRACE_S = 1.0
# After the terminal event, how long `wait` polls for the record to say the same.
SETTLE_S = 2.0

EventCallback = Callable[[Event], Any]
T = TypeVar("T")


async def connect(
    url: Union[str, List[str], None] = None,
    *,
    prefix: str = "kiln",
    timeout: float = 10.0,
    name: str = "kiln-python-client",
    **nats_options: Any,
) -> "AsyncClient":
    """Connects to NATS and returns an `AsyncClient` that owns the connection.

    `url` is a NATS URL or a list of them (default `$KILN_NATS_URL`, else
    `nats://127.0.0.1:4222`); `prefix` is Kiln's `nats.prefix`; `timeout` (seconds) bounds
    each request and the first connection. `nats_options` go to `nats.connect` as they are
    (`user`, `password`, `token`, `user_credentials`, `tls`, `max_reconnect_attempts`, ...).

    Raises `KilnError("unreachable")` when no server could be reached within `timeout`.
    Once connected, a lost connection is re-established by nats-py as it always does.
    """
    servers = url if url is not None else os.environ.get("KILN_NATS_URL", DEFAULT_URL)
    nc = NATS()

    async def log_nats_error(error: Exception) -> None:
        # nats-py's default prints a traceback for each failed attempt. A library logs instead:
        # failed first attempts at debug level (connect raises if none succeeds in time), the
        # asynchronous errors of a live connection (a slow consumer, a lost link) as warnings.
        log.log(logging.WARNING if nc.is_connected or nc.is_reconnecting else logging.DEBUG, "nats: %r", error)

    options: Dict[str, Any] = {"name": name, "error_cb": log_nats_error}
    options.update(nats_options)
    # nats-py retries a first connection as often as a reconnection (60 times, 2 s apart by
    # default); a caller wants to hear within `timeout` that nothing listens at `url`.
    attempt = asyncio.ensure_future(nc.connect(servers, **options))
    try:
        done, _ = await asyncio.wait({attempt}, timeout=timeout)
    except BaseException:
        attempt.cancel()
        raise
    if not done:
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)
        await _close_quietly(nc)
        raise KilnError(ErrorCode.UNREACHABLE, f"cannot connect to NATS at {servers} within {timeout} s")
    error = attempt.exception()
    if error is not None:
        await _close_quietly(nc)
        raise KilnError(ErrorCode.UNREACHABLE, f"cannot connect to NATS at {servers}: {error!r}") from error
    return AsyncClient(nc, prefix=prefix, timeout=timeout, owns_connection=True)


async def _close_quietly(nc: NATS) -> None:
    try:
        await nc.close()
    except Exception:  # already closed, or never opened
        pass


class AsyncClient:
    """Kiln's client API on asyncio. Make one with `await kiln_client.connect(url)`, or wrap a
    nats-py connection the application already has with `AsyncClient(nc)`.

    Use it as `async with await kiln_client.connect(url) as kiln: ...`, or call `close()`.
    Methods raise `KilnError` for error replies (`.code` as in docs/PROTOCOL.md) and for the
    client's own failures (`no_responders`, `timeout`, `sha256_mismatch`, ...).
    """

    def __init__(self, nc: NATS, *, prefix: str = "kiln", timeout: float = 10.0, owns_connection: bool = False) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._prefix = prefix
        self._timeout = timeout
        # close() drains a connection made by connect(), never one the caller lent us.
        self._owns_connection = owns_connection
        # Object store handles by bucket: opening one is a JetStream API round trip.
        self._stores: Dict[str, ObjectStore] = {}

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        """The nats-py connection underneath."""
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self._js

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def events_stream(self) -> str:
        """`KILN_EVENTS` for prefix `kiln` (upper case, `-` becomes `_`)."""
        return self._prefix.upper().replace("-", "_") + "_EVENTS"

    @property
    def finished_stream(self) -> str:
        """`KILN_FINISHED` for prefix `kiln`: the results feed."""
        return self._prefix.upper().replace("-", "_") + "_FINISHED"

    @property
    def previews_stream(self) -> str:
        """`KILN_PREVIEWS` for prefix `kiln`: the newest live preview of each job."""
        return self._prefix.upper().replace("-", "_") + "_PREVIEWS"

    @property
    def files_bucket(self) -> str:
        return f"{self._prefix}_files"

    async def close(self) -> None:
        """Drains and closes the connection if `connect()` made it; otherwise does nothing."""
        if self._owns_connection and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except Exception:
                await _close_quietly(self._nc)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, endpoint: str, body: Optional[Mapping[str, Any]] = None, *, timeout: Optional[float] = None) -> Any:
        """Sends `body` (JSON) to `<prefix>.api.<endpoint>` and returns the decoded reply.
        An error envelope `{"error": {code, message}}` raises `KilnError(code, message)`."""
        subject = f"{self._prefix}.api.{endpoint}"
        wait = self._timeout if timeout is None else timeout
        payload = json.dumps({} if body is None else body).encode()
        try:
            msg = await self._nc.request(subject, payload, timeout=wait)
        except nats.errors.NoRespondersError:
            raise KilnError(ErrorCode.NO_RESPONDERS, f"no Kiln node answers on {subject}; is a node running?") from None
        except nats.errors.TimeoutError:
            raise KilnError(ErrorCode.TIMEOUT, f"no reply on {subject} within {wait} s") from None
        return _decode_reply(subject, msg.data, msg.headers)

    # -- jobs -------------------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        inputs: Optional[Mapping[str, JSON]] = None,
        params: Optional[Mapping[str, JSON]] = None,
        *,
        files: Optional[Mapping[str, StrPath]] = None,
        priority: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        deadline_ms: Optional[int] = None,
        max_attempts: Optional[int] = None,
        reuse: Optional[bool] = None,
        labels: Optional[Mapping[str, str]] = None,
        extra: Optional[Mapping[str, JSON]] = None,
    ) -> SubmitReply:
        """Submits a job (`kiln.api.submit`) and returns `{job_id, status, duplicate, reused}`.

        `files` maps input names to local paths: each is uploaded to the files bucket first
        and passed as `{"object": name}`. The other arguments are the request's fields, left
        out when `None` (Kiln's defaults apply); `extra` adds fields this client does not
        know yet.
        """
        body: Dict[str, Any] = {"model": model, "inputs": dict(inputs or {})}
        for input_name, path in (files or {}).items():
            if input_name in body["inputs"]:
                raise ValueError(f"input {input_name!r} is given both inline and as a file")
            body["inputs"][input_name] = {"object": await self.upload(path)}
        if params is not None:
            body["params"] = dict(params)
        _put_optional(
            body,
            priority=priority,
            idempotency_key=idempotency_key,
            deadline_ms=deadline_ms,
            max_attempts=max_attempts,
            reuse=reuse,
            labels=dict(labels) if labels is not None else None,
        )
        body.update(extra or {})
        return cast(SubmitReply, await self.request("submit", body))

    async def status(self, job_id: str) -> JobView:
        """The job's `JobView` (`kiln.api.status`); `not_found` for an unknown job."""
        return cast(JobView, await self.request("status", {"job_id": job_id}))

    async def result(self, job_id: str) -> ResultReply:
        """`{job_id, status, artifacts, error?}` (`kiln.api.result`)."""
        return cast(ResultReply, await self.request("result", {"job_id": job_id}))

    async def cancel(self, job_id: str) -> JobView:
        """Cancels a job (`kiln.api.cancel`); returns its view once the cancel is recorded.
        Follow its events, or `wait`, to see it end `cancelled`."""
        return cast(JobView, await self.request("cancel", {"job_id": job_id}))

    async def jobs(
        self,
        *,
        status: Optional[str] = None,
        model: Optional[str] = None,
        dead_letter: Optional[bool] = None,
        limit: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        extra: Optional[Mapping[str, JSON]] = None,
    ) -> ListJobsReply:
        """Jobs newest first (`kiln.api.jobs`), filtered by what is given: the reply object,
        `{"jobs": [JobView, ...]}`."""
        body: Dict[str, Any] = {}
        _put_optional(
            body,
            status=status,
            model=model,
            dead_letter=dead_letter,
            limit=limit,
            labels=dict(labels) if labels is not None else None,
        )
        body.update(extra or {})
        reply = await self.request("jobs", body)
        return cast(ListJobsReply, reply)

    async def models(self) -> ModelsReply:
        """The cluster's models, with the live nodes and slots serving each (`kiln.api.models`):
        the reply object, `{"models": [ModelInfo, ...]}`."""
        return cast(ModelsReply, await self.request("models", {}))

    async def cluster(self) -> ClusterReply:
        """The live nodes and GPU slots (`kiln.api.cluster`)."""
        return cast(ClusterReply, await self.request("cluster", {}))

    async def queue(self, model: Optional[str] = None) -> QueueReply:
        """Each model's queue now, or only `model`'s (`kiln.api.queue`): jobs waiting by lane,
        the oldest wait, running, the slots serving it and the slots that would drain it."""
        return cast(QueueReply, await self.request("queue", {"model": model} if model is not None else {}))

    async def ping(self, wait: float = 1.0) -> List[Dict[str, Any]]:
        """Every instance of the API service (one per node) that answers `$SRV.PING` within
        `wait` seconds. Each answers, so this collects replies instead of taking the first."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        instances: List[Dict[str, Any]] = []
        try:
            await self._nc.publish(f"$SRV.PING.{self._prefix}-api", b"", reply=inbox)
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=left)
                except nats.errors.TimeoutError:
                    break
                try:
                    instances.append(json.loads(msg.data))
                except ValueError:
                    continue
        finally:
            await sub.unsubscribe()
        return instances

    # -- files ------------------------------------------------------------------------------

    async def upload(self, source: Union[StrPath, bytes], name: Optional[str] = None) -> str:
        """Uploads a file (a path, streamed) or `bytes` to the files bucket and returns its
        object name, to pass as `{"object": name}`. The default name is
        `uploads/<uuid>/<file name>`. The bucket's TTL (24 h by default) removes it later."""
        store = await self._store(self.files_bucket)
        if isinstance(source, (bytes, bytearray, memoryview)):
            name = name or f"uploads/{uuid.uuid4().hex}/data"
            await store.put(name, bytes(source))
            return name
        path = os.fspath(source)
        name = name or f"uploads/{uuid.uuid4().hex}/{_object_segment(os.path.basename(path))}"
        with open(path, "rb") as f:
            # A file object is read in chunks on a worker thread, never whole into memory.
            await store.put(name, f)
        return name

    async def download_artifact(self, artifact: Artifact, dest: StrPath) -> pathlib.Path:
        """Downloads one artifact to `dest` and checks its sha256 against `artifact["sha256"]`
        (the digest Kiln recorded in the job view and the artifact event). The bytes go to
        `<dest>.part` and are renamed over `dest` only when they match; on a mismatch the
        part file is removed and `ChecksumError` (code `sha256_mismatch`) is raised.

        Raises `KilnError("not_found")` if the object is gone (past the result TTL), and
        `KilnError("timeout")` if no data arrives for `timeout` seconds."""
        dest_path = pathlib.Path(dest)
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        part = dest_path.with_name(dest_path.name + ".part")
        try:
            store = await asyncio.wait_for(self._store(artifact["bucket"]), self._timeout)
        except asyncio.TimeoutError:
            raise KilnError(ErrorCode.TIMEOUT, f"opening bucket {artifact['bucket']} took over {self._timeout} s") from None
        except nats.js.errors.NotFoundError:
            raise KilnError(ErrorCode.NOT_FOUND, f"bucket {artifact['bucket']} does not exist") from None
        try:
            with open(part, "wb") as f:
                writer = _HashingWriter(f)
                await self._get_watched(store, artifact["object"], writer)
            got = writer.sha256.hexdigest()
            if got != artifact["sha256"]:
                raise ChecksumError(f"{artifact['object']}: sha256 {got} does not match the recorded {artifact['sha256']}")
            os.replace(part, dest_path)
        except BaseException:
            try:
                os.unlink(part)
            except OSError:
                pass
            raise
        return dest_path

    async def download(
        self,
        job: Union[str, Mapping[str, Any], Sequence[Artifact]],
        directory: StrPath,
        *,
        per_job: bool = True,
        overwrite: bool = False,
    ) -> List[pathlib.Path]:
        """Downloads every artifact of a job, each under its artifact name, sha256 checked.
        `job` is a job id (its result is fetched), a job view, result or batch item (anything
        with `artifacts`), or a list of artifacts. Returns the paths written, in the
        artifacts' order.

        The files go to `directory/<job_id>/` (created if needed), so the jobs downloaded into
        one folder keep their own files (every job of a model names its artifacts alike);
        `per_job=False` puts them in `directory` itself. A file already there with other
        content is never replaced silently: `KilnError("file_exists")` is raised before anything
        is written, unless `overwrite=True` (the same content again is fine)."""
        if isinstance(job, str):
            artifacts: Sequence[Artifact] = (await self.result(job))["artifacts"]
        elif isinstance(job, Mapping):
            artifacts = job.get("artifacts", [])
        else:
            artifacts = job
        out = pathlib.Path(directory)
        if per_job and artifacts:
            out = out / _file_name(_job_id_of(job, artifacts))
        dests = [out / _file_name(artifact["name"]) for artifact in artifacts]
        if not overwrite:
            for artifact, dest in zip(artifacts, dests):
                if dest.exists() and _sha256_of_file(dest) != artifact["sha256"]:
                    raise KilnError(
                        ErrorCode.FILE_EXISTS,
                        f"{dest} exists with other content (download per job, or pass overwrite=True)",
                    )
        paths = []
        for artifact, dest in zip(artifacts, dests):
            paths.append(await self.download_artifact(artifact, dest))
        return paths

    async def _store(self, bucket: str) -> ObjectStore:
        store = self._stores.get(bucket)
        if store is None:
            store = await self._js.object_store(bucket)
            self._stores[bucket] = store
        return store

    async def _get_watched(self, store: ObjectStore, name: str, writer: "_HashingWriter") -> None:
        """An object store get into `writer`, given up when no data came for `timeout`
        seconds (nats-py's own get waits for ever on chunks that never come)."""
        get = asyncio.ensure_future(store.get(name, writeinto=writer))  # type: ignore[arg-type]
        seen = -1
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=self._timeout)
                if done:
                    break
                if writer.written == seen:
                    raise KilnError(ErrorCode.TIMEOUT, f"download of {name} stalled: no data for {self._timeout} s")
                seen = writer.written
            get.result()
        except nats.js.errors.ObjectNotFoundError:
            raise KilnError(ErrorCode.NOT_FOUND, f"object {name} is not in bucket (expired, or never stored)") from None
        except nats.js.errors.DigestMismatchError:
            raise ChecksumError(f"{name}: the object store's own digest does not match its chunks") from None
        finally:
            if not get.done():
                get.cancel()
                await asyncio.gather(get, return_exceptions=True)

    # -- live previews ------------------------------------------------------------------------

    async def preview(self, job_id: str) -> Optional[Preview]:
        """The newest live preview of a job while `KILN_PREVIEWS` keeps it (10 minutes after it
        was sent), or None: none yet, a model that sends none, expired, no such job. Live ones
        come on core NATS subject `<prefix>.previews.<job_id>` (subscribe with `nc`)."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id):
            return None
        try:
            msg = await self._js.get_last_msg(self.previews_stream, f"{self._prefix}.previews.{job_id}")
        except nats.js.errors.NotFoundError:
            return None
        return preview_of(msg.headers or {}, msg.data or b"")

    # -- events -----------------------------------------------------------------------------

    def events(self, job_id: str, *, after_seq: Optional[int] = None) -> AsyncGenerator[Event, None]:
        """The job's events, oldest first, ending after its terminal status event.

        The history is replayed from the events stream, so this works however late it is
        called. `after_seq` (an `Event.seq` seen before) continues right after that event:
        a follower that stopped, crashed or lost its connection resumes with the last
        sequence it handled and sees every later event exactly once.

            async for event in kiln.events(job_id, after_seq=last):
                handle(event); last = event.seq
        """
        return self._follow(job_id, after_seq, batch=False)

    def batch_events(self, batch_id: str, *, after_seq: Optional[int] = None) -> AsyncGenerator[Event, None]:
        """The batch's events (`item_completed` or `item_failed` per item, `batch_progress`
        counts), ending after `batch_finished`; resumable with `after_seq` like `events`."""
        return self._follow(batch_id, after_seq, batch=True)

    async def wait(
        self,
        job_id: str,
        *,
        timeout: Optional[float] = None,
        on_event: Optional[EventCallback] = None,
        after_seq: Optional[int] = None,
    ) -> JobView:
        """Follows the job until it ends (calling `on_event` with each event) and returns its
        final `JobView`. Raises `KilnError("timeout")` after `timeout` seconds."""

        async def follow() -> JobView:
            await _drive(self.events(job_id, after_seq=after_seq), on_event)
            return await self.settled_status(job_id)

        return await _bounded(follow(), timeout, f"job {job_id} did not end within {timeout} s")

    async def settled_status(self, job_id: str) -> JobView:
        """The job's view once it says terminal (its terminal event may come a moment before
        its record says so); the last view read if it does not within 2 s."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            view = await self.status(job_id)
            if view["status"] in TERMINAL_STATUSES or time.monotonic() > deadline:
                return view
            await asyncio.sleep(0.05)

    async def _follow(self, id: str, after_seq: Optional[int], batch: bool) -> AsyncGenerator[Event, None]:
        subject = f"{self._prefix}.events.{id}"
        if after_seq is not None and await self._ended_by(subject, after_seq):
            return
        if after_seq is None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1)
        # An ordered consumer: ephemeral, in order, no acks; nats-py recreates it from the last
        # delivered sequence if a message is lost, so nothing is skipped or repeated.
        sub = await self._js.subscribe(subject, stream=self.events_stream, ordered_consumer=True, config=config)
        try:
            ending = False
            while True:
                try:
                    msg = await sub.next_msg(timeout=END_GRACE_S if ending else FOLLOW_CHECK_S)
                except nats.errors.TimeoutError:
                    if ending:
                        return
                    ending = await self._has_ended(id, batch)
                    continue
                try:
                    obj = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(obj, dict):
                    continue
                event = Event.from_json(msg.metadata.sequence.stream, obj)
                yield event
                if event.terminal:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is closing or gone; the consumer is ephemeral
                pass

    async def _ended_by(self, subject: str, seq: int) -> bool:
        """Whether the last event stored on `subject` is a terminal one at or before `seq`: a
        follower resuming after the end gets nothing more, at once (without it, it would
        learn so only from the status check after `FOLLOW_CHECK_S` of quiet)."""
        try:
            last = await self._js.get_last_msg(self.events_stream, subject)
        except nats.js.errors.NotFoundError:
            return False
        if last.seq is None or last.seq > seq or not last.data:
            return False
        try:
            obj = json.loads(last.data)
        except ValueError:
            return False
        return isinstance(obj, dict) and Event.from_json(last.seq, obj).terminal

    async def _has_ended(self, id: str, batch: bool) -> bool:
        if batch:
            return (await self.batch(id))["status"] != "running"
        return (await self.status(id))["status"] in TERMINAL_STATUSES

    # -- the results feed -------------------------------------------------------------------

    async def finished(
        self,
        consumer: str,
        *,
        model: Optional[str] = None,
        idle_timeout: Optional[float] = None,
        batch: int = 16,
    ) -> AsyncGenerator[JobView, None]:
        """Every ended job (completed, failed, cancelled) from the results feed, oldest first,
        as its final `JobView`, through the durable consumer `consumer` (created on first use,
        `model`'s jobs only if given). A job is acknowledged when the loop asks for the next
        one, so a consumer that stops (or crashes) in the middle of handling a job gets it
        again on its next start, and resumes after the last one it finished with. Delivery is
        at least once: de-duplicate by `job_id`. Ends after `idle_timeout` seconds without a
        job (`None`: follows for ever).

            async for job in kiln.finished("billing"):
                record(job["job_id"], job["status"], job["artifacts"], job["labels"])
        """
        subject = f"{self._prefix}.finished.{model or '*'}"
        sub = await self._js.pull_subscribe(subject, durable=consumer, stream=self.finished_stream)
        idle_since = time.monotonic()
        # Fetched and not yet finished with: handed back (nak) when the loop stops, so that the
        # next start gets them at once instead of after the consumer's ack wait.
        pending: List[Any] = []
        try:
            while True:
                wait = self._timeout if idle_timeout is None else min(self._timeout, max(idle_timeout - (time.monotonic() - idle_since), 0.05))
                try:
                    msgs = await sub.fetch(batch, timeout=wait)
                except nats.errors.TimeoutError:
                    if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                        return
                    continue
                idle_since = time.monotonic()
                pending = list(msgs)
                while pending:
                    msg = pending[0]
                    try:
                        job = json.loads(msg.data)
                    except ValueError:
                        await msg.term()  # not a job view: never deliver it again
                        pending.pop(0)
                        continue
                    yield cast(JobView, job)
                    await msg.ack()
                    pending.pop(0)
        finally:
            try:
                for msg in pending:
                    await msg.nak()
                await sub.unsubscribe()
            except Exception:  # the connection is closing or gone; the durable consumer stays
                pass

    # -- batches ----------------------------------------------------------------------------

    async def submit_batch(
        self,
        model: str,
        items: Sequence[Union[BatchItem, Mapping[str, Any]]],
        params: Optional[Mapping[str, JSON]] = None,
        *,
        priority: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        deadline_ms: Optional[int] = None,
        max_attempts: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        reuse: Optional[bool] = None,
        max_concurrency: Optional[int] = None,
        fallback_models: Optional[Sequence[str]] = None,
        extra: Optional[Mapping[str, JSON]] = None,
    ) -> BatchReply:
        """Submits N items of one model as one batch (`kiln.api.submit_batch`). Each item is
        `{"inputs": {..}, "params": {..}, "labels": {..}}`; `params` and `labels` apply to
        every item (an item's own win). `reuse` runs identical items once, `max_concurrency`
        bounds the batch's jobs queued or running at once, `fallback_models` are tried in order
        when an item fails on Kiln's side. Returns `{batch_id, items: [{index, job_id}],
        duplicate}`."""
        body: Dict[str, Any] = {"model": model, "items": [dict(item) for item in items]}
        if params is not None:
            body["params"] = dict(params)
        _put_optional(
            body,
            priority=priority,
            idempotency_key=idempotency_key,
            deadline_ms=deadline_ms,
            max_attempts=max_attempts,
            labels=dict(labels) if labels is not None else None,
            reuse=reuse,
            max_concurrency=max_concurrency,
            fallback_models=list(fallback_models) if fallback_models is not None else None,
        )
        body.update(extra or {})
        return cast(BatchReply, await self.request("submit_batch", body))

    async def batch(self, batch_id: str) -> BatchView:
        """The batch's view: status, summary, and every item as its job is now."""
        return cast(BatchView, await self.request("batch", {"batch_id": batch_id}))

    async def batch_items(self, batch_id: str) -> List[BatchItemView]:
        """The batch's items (`index`, `job_id`, `status`, `error`, `artifacts`), by index."""
        items = (await self.batch(batch_id))["items"]
        return sorted(items, key=lambda item: item["index"])

    async def cancel_batch(self, batch_id: str) -> BatchView:
        """Cancels every item that has not ended."""
        return cast(BatchView, await self.request("cancel_batch", {"batch_id": batch_id}))

    async def retry_batch(self, batch_id: str) -> BatchReply:
        """A new batch of the finished batch's failed and cancelled items (`retry_of` names the
        old one); asking again answers the same retry batch with `duplicate: true`."""
        return cast(BatchReply, await self.request("retry_batch", {"batch_id": batch_id}))

    async def wait_batch(
        self,
        batch_id: str,
        *,
        timeout: Optional[float] = None,
        on_event: Optional[EventCallback] = None,
        after_seq: Optional[int] = None,
    ) -> BatchView:
        """Follows the batch until `batch_finished`, then returns its view."""

        async def follow() -> BatchView:
            await _drive(self.batch_events(batch_id, after_seq=after_seq), on_event)
            return await self.batch(batch_id)

        return await _bounded(follow(), timeout, f"batch {batch_id} did not finish within {timeout} s")


# -- helpers ---------------------------------------------------------------------------------


class _HashingWriter:
    """What nats-py's object store get writes chunks into: the file, and a running sha256."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.written += len(data)
        return int(self._f.write(data))


def _decode_reply(subject: str, data: bytes, headers: Optional[Dict[str, str]]) -> Any:
    try:
        reply = json.loads(data) if data else None
    except ValueError:
        reply = None
    # The error envelope is an object whose only key is "error". A job view or a result may
    # carry an "error" too, next to "job_id": that is the job's error, not the reply's.
    if isinstance(reply, dict) and set(reply) == {"error"} and isinstance(reply["error"], dict):
        err = reply["error"]
        retry = err.get("retry_after_ms")
        retry_after_ms = retry if isinstance(retry, int) and not isinstance(retry, bool) else None
        raise KilnError(str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", "")), retry_after_ms)
    if reply is None:
        # A NATS service framework error (headers only), or something that is not Kiln.
        headers = headers or {}
        if "Nats-Service-Error" in headers:
            raise KilnError(headers.get("Nats-Service-Error-Code", ErrorCode.INTERNAL), headers["Nats-Service-Error"])
        raise KilnError(ErrorCode.BAD_REPLY, f"reply on {subject} is not JSON: {data[:200]!r}")
    return reply


def _put_optional(body: Dict[str, Any], **fields: Any) -> None:
    """Adds the fields that are not None: Kiln's defaults apply to the others."""
    for key, value in fields.items():
        if value is not None:
            body[key] = value


async def _drive(events: AsyncGenerator[Event, None], on_event: Optional[EventCallback]) -> None:
    """Runs a follow to its end, closing it (its consumer) however it stops."""
    try:
        async for event in events:
            if on_event is not None:
                on_event(event)
    finally:
        await events.aclose()


async def _bounded(coro: Coroutine[Any, Any, T], timeout: Optional[float], message: str) -> T:
    if timeout is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise KilnError(ErrorCode.TIMEOUT, message) from None


def _object_segment(name: str) -> str:
    """Object names allow `A-Z a-z 0-9 - _ .` in a segment (core/src/ids.rs); keep the file
    name readable and replace anything else."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "file"
    return cleaned[:128]


def _job_id_of(job: Union[str, Mapping[str, Any], Sequence[Artifact]], artifacts: Sequence[Artifact]) -> str:
    """The id of the job whose artifacts these are: given, or the first segment of an
    artifact's object name (`<job_id>/<attempt>/<name>`)."""
    if isinstance(job, str):
        return job
    if isinstance(job, Mapping) and isinstance(job.get("job_id"), str) and job["job_id"]:
        return str(job["job_id"])
    return artifacts[0]["object"].split("/", 1)[0]


def _sha256_of_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_name(name: str) -> str:
    """An artifact name as a file name in the download directory: never a path."""
    if name != os.path.basename(name) or name in ("", ".", "..") or "\\" in name:
        raise KilnError(ErrorCode.BAD_REPLY, f"artifact name {name!r} is not a plain file name")
    return name


def preview_of(headers: Mapping[str, str], data: bytes) -> Preview:
    """A `Preview` from a message on `<prefix>.previews.<job_id>` (live, or the newest kept)."""

    def number(name: str) -> int:
        try:
            return int(headers.get(name, "0"))
        except ValueError:
            return 0

    return Preview(
        job_id=headers.get("Kiln-Job-Id", ""),
        attempt=number("Kiln-Attempt"),
        seq=number("Kiln-Preview-Seq"),
        content_type=headers.get("Content-Type", "application/octet-stream"),
        ts_ms=number("Kiln-Ts-Ms"),
        data=bytes(data),
    )
