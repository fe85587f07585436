"""A local OTLP/gRPC trace receiver: what Jaeger is in compose, for the tests to read.

The session's processes export to it exactly as they export to Jaeger (the
OTEL_EXPORTER_OTLP_ENDPOINT below), so the tracing test checks the shipped
configuration, not a test-only exporter. Database spans (psycopg, every query) are
counted but not kept: they are leaves, and a session makes tens of thousands.
"""

import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: int
    attributes: dict[str, Any] = field(hash=False)
    links: tuple[tuple[str, str], ...] = ()


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.database_spans = 0
        self._server: grpc.Server | None = None
        self.port = 0

    # --- the OTLP TraceService ---------------------------------------------------------

    def Export(self, request: Any, context: Any) -> Any:
        received = []
        database = 0
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {kv.key: _value(kv.value) for kv in span.attributes}
                    if "db.system" in attributes or "db.system.name" in attributes:
                        database += 1
                        continue
                    received.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            service=str(resource.get("service.name", "")),
                            kind=span.kind,
                            attributes=attributes,
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        )
                    )
        with self._lock:
            self._spans.extend(received)
            self.database_spans += database
        return trace_service_pb2.ExportTraceServiceResponse()

    # --- for the tests -----------------------------------------------------------------

    def start(self) -> "OtlpReceiver":
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1)

    def exporter_env(self) -> dict[str, str]:
        """What every process of the topology is given: the standard OTEL_* variables."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            # Export every 100 ms rather than every 5 s, so a test waits for spans briefly.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def spans(self, *, trace_ids: Iterable[str] | None = None) -> list[ReceivedSpan]:
        with self._lock:
            spans = list(self._spans)
        if trace_ids is None:
            return spans
        wanted = set(trace_ids)
        return [span for span in spans if span.trace_id in wanted]
