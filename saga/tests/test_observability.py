"""Tracing context and log fields, without workers (the system tests cover them end to end:
tests/test_tracing.py)."""

import json
import logging
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from celery import current_task
from django.db import connections
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from common.signing import AUTHORITY_KWARG, authority_mint
from common.steps import VERIFIED_ORDER_ATTR, saga_step_task
from orders_project.celery import app
from orders_project.log import JsonFormatter, TaskContextFilter, TextFormatter
from orders_project.telemetry import exporters
from saga import timeline
from saga.models import SagaInstance, fingerprint_of, fingerprint_parts
from saga.tracing import adopt_saga_trace, saga_trace_context, trace_carrier, trace_id_of

SAGA_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
OTHER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C


def carrier(trace_id: int, span_id: int = 0x00F067AA0BA902B7) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}


def span_in(trace_id: int, span_id: int = 0x1234) -> NonRecordingSpan:
    return NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1)))


def current() -> tuple[int, int]:
    context = trace.get_current_span().get_span_context()
    return context.trace_id, context.span_id


def test_a_sweeper_or_an_operator_publishes_in_the_sagas_trace() -> None:
    with trace.use_span(span_in(OTHER_TRACE)):
        with saga_trace_context(carrier(SAGA_TRACE)):
            assert current()[0] == SAGA_TRACE
            assert trace_id_of(trace_carrier()) == f"{SAGA_TRACE:032x}"
        assert current()[0] == OTHER_TRACE
    with saga_trace_context(carrier(SAGA_TRACE)):  # no current span at all (beat, a shell)
        assert current()[0] == SAGA_TRACE


def test_inside_the_sagas_trace_the_publisher_stays_the_parent() -> None:
    with trace.use_span(span_in(SAGA_TRACE, 0x42)), saga_trace_context(carrier(SAGA_TRACE)):
        assert current() == (SAGA_TRACE, 0x42)


@pytest.mark.parametrize("stored", [{}, None, {"traceparent": "garbage"}])
def test_a_saga_without_a_trace_changes_nothing(stored: dict | None) -> None:
    with trace.use_span(span_in(OTHER_TRACE, 0x7)), saga_trace_context(stored):
        assert current() == (OTHER_TRACE, 0x7)
    assert trace_id_of(stored) == ""


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4317/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, []),
    ],
)
def test_tracing_is_off_unless_the_environment_says_where_spans_go(environ: dict, expected: list) -> None:
    assert exporters(environ) == expected


def test_fingerprints_group_failures_by_exception_type_and_step() -> None:
    assert fingerprint_of("TransientError", "notify_customer") == "TransientError @ notify_customer"
    assert fingerprint_parts("TransientError @ notify_customer") == ("TransientError", "notify_customer")
    assert fingerprint_of("", "") == ""
    with pytest.raises(ValueError):
        fingerprint_parts("TransientError")


@app.task(name="saga.tests.log_probe")
def log_probe(ctx: object, **kwargs: object) -> None:
    logging.getLogger("saga.tests.probe").warning("probing")


@pytest.fixture
def captured() -> list[logging.LogRecord]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(TaskContextFilter())
    logger = logging.getLogger("saga.tests.probe")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_every_line_a_task_writes_names_its_saga_order_and_trace(captured: list[logging.LogRecord]) -> None:
    with trace.use_span(span_in(SAGA_TRACE)):
        log_probe.apply(args=[{"saga_id": "s-1", "order_id": "o-1"}])
    logging.getLogger("saga.tests.probe").warning("outside any task")

    in_task, outside = captured
    entry = json.loads(JsonFormatter().format(in_task))
    assert (entry["saga_id"], entry["order_id"], entry["trace_id"]) == ("s-1", "o-1", f"{SAGA_TRACE:032x}")
    assert (entry["task_name"], entry["message"], entry["level"]) == ("saga.tests.log_probe", "probing", "WARNING")
    assert f"[saga=s-1 order=o-1 trace={SAGA_TRACE:032x}] probing" in TextFormatter().format(in_task)
    assert json.loads(JsonFormatter().format(outside))["saga_id"] is None
    assert TextFormatter().format(outside).endswith("saga.tests.probe outside any task")


EXPORT_SPAN = """
from opentelemetry import trace
from orders_project import telemetry
assert telemetry.setup(service_name="protocol-check")
with trace.get_tracer("check").start_as_current_span("one span"):
    pass
trace.get_tracer_provider().force_flush()
"""


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
def test_spans_go_over_otlp_http_when_the_protocol_says_so(variable: str) -> None:
    """`http/protobuf` (the specification's default) POSTs spans to <endpoint>/v1/traces."""
    import os
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, list[str]]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
            names = [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
            received.append((self.path, names))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OTEL_") and key not in ("CELERY_SERVICE",)
    }
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}", variable: "http/protobuf"})
    try:
        run = subprocess.run([sys.executable, "-c", EXPORT_SPAN], env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr
    assert received == [("/v1/traces", ["one span"])]


# --- The order a failure report names ----------------------------------------------------

ORDER_PROBE = "saga.tests.order_probe"


@saga_step_task(ORDER_PROBE)
def order_probe(ctx: dict) -> dict:
    return {"verified_order": getattr(current_task.request, VERIFIED_ORDER_ATTR, None)}


def test_a_step_keeps_the_order_of_the_message_it_verified_for_its_failure_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = {"saga_id": str(uuid.uuid4()), "order_id": str(uuid.uuid4())}
    authority = authority_mint(
        saga_id=ctx["saga_id"], step="probe", task=ORDER_PROBE, phase="forward", generation=0, context=ctx
    )
    assert order_probe.apply(args=[ctx], kwargs={AUTHORITY_KWARG: authority}).get()["verified_order"] == ctx["order_id"]

    # The failing worker's report names that order; one without a verified message names none.
    request = SimpleNamespace(args=[ctx], retries=0, hostname="w@h", **{VERIFIED_ORDER_ATTR: ctx["order_id"]})
    monkeypatch.setattr(timeline, "current_task", SimpleNamespace(request=request))
    headers: dict = {}
    timeline.attach_failure_timeline(sender="saga.step_failed", headers=headers)
    assert headers[timeline.ORDER_HEADER] == ctx["order_id"]
    delattr(request, VERIFIED_ORDER_ATTR)
    headers = {}
    timeline.attach_failure_timeline(sender="saga.step_failed", headers=headers)
    assert timeline.ORDER_HEADER not in headers


@pytest.mark.django_db(databases=["orders"])
def test_a_failure_report_that_names_its_order_costs_the_coordinator_no_query(
    django_assert_num_queries: Any,
) -> None:
    saga = SagaInstance.objects.create(definition="place_order", order_id=uuid.uuid4())
    kwargs = {"saga_id": str(saga.id), "step": "charge_payment"}
    named = SimpleNamespace(name="saga.step_failed", request=SimpleNamespace(**{timeline.ORDER_HEADER: "o-1"}))
    with django_assert_num_queries(0, connection=connections["orders"]):
        adopt_saga_trace(task=named, kwargs=kwargs)
    assert named.request.saga_order_id == "o-1"

    # One from a worker's main process (a hard time limit) names none: the order is looked up.
    unnamed = SimpleNamespace(name="saga.step_failed", request=SimpleNamespace())
    with django_assert_num_queries(1, connection=connections["orders"]):
        adopt_saga_trace(task=unnamed, kwargs=kwargs)
    assert unnamed.request.saga_order_id == str(saga.order_id)
