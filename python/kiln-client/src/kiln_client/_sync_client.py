"""`Client`: the same API without `await`, for scripts and threaded programs.

It runs an asyncio event loop of its own on a background thread, holds an `AsyncClient` on
it, and hands each call over with `asyncio.run_coroutine_threadsafe`, blocking the caller
until the result comes back. Any thread may call it; calls from several threads run
concurrently on the one connection. Event iterators pull one event per step, so a `for`
loop over `events()` runs in the caller's thread, and leaving the loop early closes the
consumer underneath.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
from typing import Any, AsyncGenerator, Coroutine, Dict, Iterator, List, Mapping, Optional, Sequence, TypeVar, Union

from ._async_client import AsyncClient, EventCallback, connect
from .errors import ErrorCode, KilnError
from .types import (
    JSON,
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

T = TypeVar("T")

_END = object()


class Client:
    """Kiln's client API, blocking. `Client(url)` connects at once (see
    `kiln_client.connect` for the arguments); use it as a context manager, or call
    `close()`, which also stops its thread.

        with kiln_client.Client("nats://127.0.0.1:4222") as kiln:
            job = kiln.submit("demo", {"prompt": "a cat"}, {"steps": 8})
            view = kiln.wait(job["job_id"], on_event=print)
            kiln.download(view, "out/")
    """

    def __init__(
        self,
        url: Union[str, List[str], None] = None,
        *,
        prefix: str = "kiln",
        timeout: float = 10.0,
        name: str = "kiln-python-client",
        **nats_options: Any,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="kiln-client-loop", daemon=True)
        self._thread.start()
        try:
            self._aio: AsyncClient = self._call(connect(url, prefix=prefix, timeout=timeout, name=name, **nats_options))
        except BaseException:
            self._stop_loop()
            raise

    # -- the loop thread --------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        try:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("kiln_client.Client called from its own loop thread (from an on_event callback?)")
        if not self._loop.is_running():
            coro.close()
            raise KilnError(ErrorCode.UNREACHABLE, "the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C in the caller: stop the work on the loop too.
            if not future.done():
                future.cancel()
            raise

    def _iterate(self, events: AsyncGenerator[T, None], deadline: Optional[float] = None, what: str = "") -> Iterator[T]:
        async def step() -> Any:
            try:
                if deadline is None:
                    return await events.__anext__()
                left = deadline - time.monotonic()
                try:
                    return await asyncio.wait_for(events.__anext__(), max(left, 0.0))
                except asyncio.TimeoutError:
                    raise KilnError(ErrorCode.TIMEOUT, f"{what} did not end in time") from None
            except StopAsyncIteration:
                return _END

        try:
            while True:
                event = self._call(step())
                if event is _END:
                    return
                yield event
        finally:
            if self._loop.is_running():
                self._call(_aclose(events))

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def aio(self) -> AsyncClient:
        """The `AsyncClient` underneath (its coroutines run on this client's loop only)."""
        return self._aio

    @property
    def prefix(self) -> str:
        return self._aio.prefix

    def close(self) -> None:
        """Drains the connection and stops the loop thread. Safe to call twice."""
        if self._loop.is_running():
            try:
                self._call(self._aio.close())
            finally:
                self._stop_loop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, endpoint: str, body: Optional[Mapping[str, Any]] = None, *, timeout: Optional[float] = None) -> Any:
        """See `AsyncClient.request`."""
        return self._call(self._aio.request(endpoint, body, timeout=timeout))

    # -- jobs -------------------------------------------------------------------------------

    def submit(
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
        """See `AsyncClient.submit`."""
        return self._call(
            self._aio.submit(
                model,
                inputs,
                params,
                files=files,
                priority=priority,
                idempotency_key=idempotency_key,
                deadline_ms=deadline_ms,
                max_attempts=max_attempts,
                reuse=reuse,
                labels=labels,
                extra=extra,
            )
        )

    def status(self, job_id: str) -> JobView:
        """See `AsyncClient.status`."""
        return self._call(self._aio.status(job_id))

    def result(self, job_id: str) -> ResultReply:
        """See `AsyncClient.result`."""
        return self._call(self._aio.result(job_id))

    def cancel(self, job_id: str) -> JobView:
        """See `AsyncClient.cancel`."""
        return self._call(self._aio.cancel(job_id))

    def jobs(
        self,
        *,
        status: Optional[str] = None,
        model: Optional[str] = None,
        dead_letter: Optional[bool] = None,
        limit: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        extra: Optional[Mapping[str, JSON]] = None,
    ) -> ListJobsReply:
        """See `AsyncClient.jobs`."""
        return self._call(self._aio.jobs(status=status, model=model, dead_letter=dead_letter, limit=limit, labels=labels, extra=extra))

    def models(self) -> ModelsReply:
        """See `AsyncClient.models`."""
        return self._call(self._aio.models())

    def cluster(self) -> ClusterReply:
        """See `AsyncClient.cluster`."""
        return self._call(self._aio.cluster())

    def queue(self, model: Optional[str] = None) -> QueueReply:
        """See `AsyncClient.queue`."""
        return self._call(self._aio.queue(model))

    def ping(self, wait: float = 1.0) -> List[Dict[str, Any]]:
        """See `AsyncClient.ping`."""
        return self._call(self._aio.ping(wait))

    # -- files ------------------------------------------------------------------------------

    def upload(self, source: Union[StrPath, bytes], name: Optional[str] = None) -> str:
        """See `AsyncClient.upload`."""
        return self._call(self._aio.upload(source, name))

    def download_artifact(self, artifact: Artifact, dest: StrPath) -> pathlib.Path:
        """See `AsyncClient.download_artifact`."""
        return self._call(self._aio.download_artifact(artifact, dest))

    def download(
        self,
        job: Union[str, Mapping[str, Any], Sequence[Artifact]],
        directory: StrPath,
        *,
        per_job: bool = True,
        overwrite: bool = False,
    ) -> List[pathlib.Path]:
        """See `AsyncClient.download`: into `directory/<job_id>/` unless `per_job=False`;
        other content under a name already there only with `overwrite=True`."""
        return self._call(self._aio.download(job, directory, per_job=per_job, overwrite=overwrite))

    # -- events -----------------------------------------------------------------------------

    def finished(self, consumer: str, *, model: Optional[str] = None, idle_timeout: Optional[float] = None) -> Iterator[JobView]:
        """The results feed through durable consumer `consumer`; see `AsyncClient.finished`."""
        return self._iterate(self._aio.finished(consumer, model=model, idle_timeout=idle_timeout))

    def preview(self, job_id: str) -> Optional[Preview]:
        """See `AsyncClient.preview`: the newest live preview of a job, or None."""
        return self._call(self._aio.preview(job_id))

    def events(self, job_id: str, *, after_seq: Optional[int] = None) -> Iterator[Event]:
        """See `AsyncClient.events`: `for event in kiln.events(job_id, after_seq=last): ...`."""
        return self._iterate(self._aio.events(job_id, after_seq=after_seq))

    def batch_events(self, batch_id: str, *, after_seq: Optional[int] = None) -> Iterator[Event]:
        """See `AsyncClient.batch_events`."""
        return self._iterate(self._aio.batch_events(batch_id, after_seq=after_seq))

    def wait(
        self,
        job_id: str,
        *,
        timeout: Optional[float] = None,
        on_event: Optional[EventCallback] = None,
        after_seq: Optional[int] = None,
    ) -> JobView:
        """See `AsyncClient.wait`. `on_event` runs in the caller's thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._iterate(self._aio.events(job_id, after_seq=after_seq), deadline, f"job {job_id}"):
            if on_event is not None:
                on_event(event)
        return self._call(self._aio.settled_status(job_id))

    # -- batches ----------------------------------------------------------------------------

    def submit_batch(
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
        """See `AsyncClient.submit_batch`."""
        return self._call(
            self._aio.submit_batch(
                model,
                items,
                params,
                priority=priority,
                idempotency_key=idempotency_key,
                deadline_ms=deadline_ms,
                max_attempts=max_attempts,
                labels=labels,
                reuse=reuse,
                max_concurrency=max_concurrency,
                fallback_models=fallback_models,
                extra=extra,
            )
        )

    def batch(self, batch_id: str) -> BatchView:
        """See `AsyncClient.batch`."""
        return self._call(self._aio.batch(batch_id))

    def batch_items(self, batch_id: str) -> List[BatchItemView]:
        """See `AsyncClient.batch_items`."""
        return self._call(self._aio.batch_items(batch_id))

    def cancel_batch(self, batch_id: str) -> BatchView:
        """See `AsyncClient.cancel_batch`."""
        return self._call(self._aio.cancel_batch(batch_id))

    def retry_batch(self, batch_id: str) -> BatchReply:
        """See `AsyncClient.retry_batch`."""
        return self._call(self._aio.retry_batch(batch_id))

    def wait_batch(
        self,
        batch_id: str,
        *,
        timeout: Optional[float] = None,
        on_event: Optional[EventCallback] = None,
        after_seq: Optional[int] = None,
    ) -> BatchView:
        """See `AsyncClient.wait_batch`. `on_event` runs in the caller's thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._iterate(self._aio.batch_events(batch_id, after_seq=after_seq), deadline, f"batch {batch_id}"):
            if on_event is not None:
                on_event(event)
        return self._call(self._aio.batch(batch_id))


async def _aclose(events: AsyncGenerator[Any, None]) -> None:
    # run_coroutine_threadsafe wants a coroutine; aclose() gives an awaitable.
    await events.aclose()
