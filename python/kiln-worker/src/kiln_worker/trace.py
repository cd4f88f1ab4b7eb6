"""A job's place in its W3C trace, for the worker.

Kiln's job line carries the `traceparent` (and `tracestate`) of the node's `kiln.run` span. The
SDK always:

- exposes them as `job.traceparent` and `job.tracestate`, so any tracing library can parent
  its spans on them;
- puts them in the environment (`TRACEPARENT`, `TRACESTATE`) while `run(job)` runs, so a
  command the model starts inherits the trace.

When OpenTelemetry for Python is installed (`opentelemetry-sdk` and
`opentelemetry-exporter-otlp-proto-http`) and `OTEL_EXPORTER_OTLP_ENDPOINT` is set (a node that
exports spans hands its own endpoint to its workers), the SDK also exports spans: one
`kiln.worker.run` around each `run(job)`, a child of `kiln.run`, and whatever the model opens
with `job.span("name")` beneath it. They leave in batches every `OTEL_BSP_SCHEDULE_DELAY` ms
(500 unless set: a worker is killed, not asked, when its node stops, so the last batch is kept
short) and at the worker's exit; a flush is never waited for by a job, so a slow or absent
collector does not slow the jobs. Without either, `job.span()` is a context manager that does
nothing, and the SDK imports no OpenTelemetry module.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from typing import Any, Dict, Iterator, Optional

__all__ = ["Tracing", "tracing"]


class Tracing:
    """The process's span export, set up on first use (or found off)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._tracer: Any = None
        self._provider: Any = None
        self._propagator: Any = None
        self._trace_api: Any = None

    def _setup(self) -> None:
        with self._lock:
            if self._ready:
                return
            self._ready = True
            if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
                return
            try:
                from opentelemetry import trace as trace_api
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import BatchSpanProcessor
                from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            except ImportError:
                return
            service = os.environ.get("OTEL_SERVICE_NAME") or f"kiln-worker-{os.environ.get('KILN_MODEL', 'model')}"
            # A provider of our own, not the global one: a model that sets up OpenTelemetry itself
            # keeps its own, and can parent on `job.traceparent`.
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            delay = int(os.environ.get("OTEL_BSP_SCHEDULE_DELAY") or 500)
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=delay))
            atexit.register(provider.shutdown)
            self._provider = provider
            self._tracer = provider.get_tracer("kiln_worker")
            self._propagator = TraceContextTextMapPropagator()
            self._trace_api = trace_api

    @property
    def enabled(self) -> bool:
        self._setup()
        return self._tracer is not None

    @contextlib.contextmanager
    def span(self, name: str, traceparent: Optional[str], tracestate: Optional[str], attributes: Optional[Dict[str, Any]] = None) -> Iterator[Any]:
        """A span named `name`, a child of the span current in this thread if any, else of
        `traceparent`; yields the span (None when export is off)."""
        if not self.enabled:
            yield None
            return
        context = None
        if self._trace_api.get_current_span().get_span_context().is_valid:
            context = None  # the current span is the parent
        elif traceparent:
            carrier = {"traceparent": traceparent}
            if tracestate:
                carrier["tracestate"] = tracestate
            context = self._propagator.extract(carrier=carrier)
        with self._tracer.start_as_current_span(name, context=context, attributes=attributes or {}) as s:
            yield s

    def flush(self, timeout_millis: int = 5000) -> None:
        """Exports the spans batched so far (the worker's exit does it by itself)."""
        if self._provider is not None:
            self._provider.force_flush(timeout_millis=timeout_millis)


#: The process's one `Tracing`.
tracing = Tracing()


@contextlib.contextmanager
def job_environment(traceparent: Optional[str], tracestate: Optional[str]) -> Iterator[None]:
    """`TRACEPARENT` and `TRACESTATE` set to the job's while it runs, restored after."""
    saved = {k: os.environ.get(k) for k in ("TRACEPARENT", "TRACESTATE")}
    for key, value in (("TRACEPARENT", traceparent), ("TRACESTATE", tracestate)):
        if value:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
