"""A small OTLP/HTTP trace receiver for the tests (tests/tracing.rs): decodes each
ExportTraceServiceRequest posted to /v1/traces with OpenTelemetry's own protocol package
(`opentelemetry-proto`, pinned in scripts/setup.sh) and appends one JSON line per span to a file.

    python tests/otlp_receiver.py SPANS.jsonl

prints `listening <port>` once it serves (127.0.0.1, a free port), then serves until killed.
Each line: {"service", "scope", "name", "trace_id", "span_id", "parent_span_id", "start_ns",
"end_ns", "attributes": {key: value as text}} with ids in lowercase hex ("" for no parent).
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

LOCK = threading.Lock()


def value_text(v) -> str:
    kind = v.WhichOneof("value")
    return "" if kind is None else str(getattr(v, kind))


def spans_of(request: ExportTraceServiceRequest):
    for rs in request.resource_spans:
        service = next((value_text(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
        for ss in rs.scope_spans:
            for span in ss.spans:
                yield {
                    "service": service,
                    "scope": ss.scope.name,
                    "name": span.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "attributes": {a.key: value_text(a.value) for a in span.attributes},
                }


def main() -> None:
    out_path = sys.argv[1]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding", "") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or "protobuf" not in self.headers.get("Content-Type", ""):
                self.send_response(404 if self.path != "/v1/traces" else 415)
                self.end_headers()
                return
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            with LOCK, open(out_path, "a") as out:
                for span in spans_of(request):
                    out.write(json.dumps(span) + "\n")
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
