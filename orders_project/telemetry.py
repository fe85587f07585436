"""OpenTelemetry tracing for every process: Django (web), Celery (workers) and psycopg.

Configured by the standard OpenTelemetry environment variables, and off when none says
where spans go:

- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): export over
  OTLP, by `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc`
  (the Python SDK's default; compose: `http://jaeger:4317`) or `http/protobuf` (the
  specification's default, e.g. `http://jaeger:4318`, spans POSTed to `/v1/traces`).
  `OTEL_TRACES_EXPORTER` may name `otlp`,
  `console` or `none` (comma-separated); `OTEL_SDK_DISABLED=true` turns everything off.
- `OTEL_SERVICE_NAME` names the process; by default `web` or `worker-<CELERY_SERVICE>`.
- Everything else the SDK reads itself: `OTEL_BSP_*` (batching), `OTEL_TRACES_SAMPLER`,
  `OTEL_PROPAGATORS`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, ...

The web process sets up in `wsgi.py`, before Django builds its middleware. A Celery
worker sets up in each pool process (`worker_process_init`, orders_project.celery): an
exporter's threads and gRPC channel do not survive a fork, so they are made after it.

One order is one trace. Celery carries the context in the message headers from the POST
through every chain step, link and errback sent by a pool process; the saga stores the
POST's context (`SagaInstance.trace_context`) and publishes every later chain under it
(`saga.tracing`), so a sweeper re-publish, an operator's retry or a cancel join the same
trace, and the saga worker adopts it for an errback the worker's main process sent
without one (a hard time limit).

Our own before/after-publish hooks replace those of opentelemetry-instrumentation-celery:
for a task not registered in the publishing process (here: every task of another
service, which is how this system calls them) it opens the publish span and makes it
current, but keeps no reference to it, and its after-publish hook returns early for such
a task. In CPython the span's context manager is then garbage-collected as the
before-publish hook returns, which ends the span there: the publish span ends before the
message is sent, so it never covers the publish or records its failure. (This module's
earlier note said the span was never ended and its context leaked; measured on 0.66b1
under CPython, it ends at once instead.) Ours keep the span until after_task_publish.
Upstream: open-telemetry/opentelemetry-python-contrib#609 (publishing a task another app
registers; still open), whose fix #1407 ("Add support for anonymous tasks") taught
`_trace_before_publish` to open a span for such a task but not `_trace_after_publish` to
end it. Written for PATCHED_CELERY_INSTRUMENTATION only (the hooks refuse another
release); orders_project/tests/test_library_patches.py fails once upstream keeps that span
open until after the publish: then remove `_before_publish` / `_after_publish`.
"""

import logging
import os
import threading
from typing import Any

logger = logging.getLogger(__name__)

_configured = False
_lock = threading.Lock()
# Publish spans between before_task_publish and after_task_publish, by (thread, task id).
_publishing: dict[tuple[int, str | None], Any] = {}
_PUBLISHING_MAX = 10_000  # publishes that failed never see after_task_publish
# The opentelemetry-instrumentation-celery release whose publish hooks ours replace.
PATCHED_CELERY_INSTRUMENTATION = "0.66b1"
UPSTREAM_ISSUE = "open-telemetry/opentelemetry-python-contrib#609"


def exporters(environ: os._Environ | dict[str, str] = os.environ) -> list[str]:
    """The span exporters the environment asks for; empty means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    return [name for name in names if name != "none"]


OTLP_PROTOCOLS = ("grpc", "http/protobuf")


def otlp_protocol(environ: os._Environ | dict[str, str] = os.environ) -> str:
    """The OTLP transport the environment asks for (the signal's own variable first)."""
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol not in OTLP_PROTOCOLS:
        logger.warning("OTLP protocol %s is not supported here (grpc, http/protobuf); using grpc", protocol)
        return "grpc"
    return protocol


def tracing_enabled(environ: os._Environ | dict[str, str] = os.environ) -> bool:
    return bool(exporters(environ))


def default_service_name(environ: os._Environ | dict[str, str] = os.environ) -> str:
    service = environ.get("CELERY_SERVICE", "").strip()
    return f"worker-{service}" if service else "web"


def _tracer_provider(service_name: str) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; ours is
    # only the fallback.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters():
        if name == "otlp" and otlp_protocol() == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            provider.add_span_processor(BatchSpanProcessor(HttpExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            logger.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console, none); ignored", name)
    return provider


def setup(*, service_name: str | None = None, django: bool = False, celery: bool = False) -> bool:
    """Install the tracer provider and instrumentations once per process; False when off."""
    global _configured
    if not tracing_enabled():
        return False
    with _lock:
        if _configured:
            return True
        from opentelemetry import trace
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

        trace.set_tracer_provider(_tracer_provider(service_name or default_service_name()))
        PsycopgInstrumentor().instrument(enable_commenter=False)
        if django:
            from opentelemetry.instrumentation.django import DjangoInstrumentor

            DjangoInstrumentor().instrument(request_hook=_path_only)
        if celery:
            _instrument_celery()
        _configured = True
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name or default_service_name()
    logger.info("tracing on: exporting spans (%s, %s) as %s", ",".join(exporters()), otlp_protocol(), name)
    return True


def _path_only(span: Any, request: Any) -> None:
    """A request's span names its path, not its query string: the admin's searches put the
    customers' emails and phone numbers there (`?q=`), and traces are kept and read more
    widely than the database. The access log leaves the query out too (gunicorn.conf.py)."""
    if not span.is_recording():
        return
    attributes = getattr(span, "attributes", None) or {}
    # The old semantic conventions' names (the default) and the stable ones'
    # (OTEL_SEMCONV_STABILITY_OPT_IN=http): the target, the full URL, the query itself.
    if "http.target" in attributes:
        span.set_attribute("http.target", request.path)
    if "http.url" in attributes:
        span.set_attribute("http.url", str(attributes["http.url"]).split("?", 1)[0])
    if "url.full" in attributes:
        span.set_attribute("url.full", str(attributes["url.full"]).split("?", 1)[0])
    if "url.query" in attributes:
        span.set_attribute("url.query", "")


def shutdown() -> None:
    """Flush the spans still batched (a pool process about to exit)."""
    if not _configured:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def _instrument_celery() -> None:
    from celery import signals
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.celery.version import __version__ as version

    if version != PATCHED_CELERY_INSTRUMENTATION:
        raise RuntimeError(
            f"orders_project.telemetry replaces the publish hooks of opentelemetry-instrumentation-celery "
            f"{PATCHED_CELERY_INSTRUMENTATION}, not {version}: check whether {UPSTREAM_ISSUE} is fixed in it (then "
            "use its own hooks) or re-check ours and update PATCHED_CELERY_INSTRUMENTATION"
        )
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument()
    # See the module docstring: its publish hooks lose the span of an unregistered task.
    signals.before_task_publish.disconnect(instrumentor._trace_before_publish)
    signals.after_task_publish.disconnect(instrumentor._trace_after_publish)
    signals.before_task_publish.connect(_before_publish, weak=False)
    signals.after_task_publish.connect(_after_publish, weak=False)
    # After the instrumentation's own task_prerun receiver, which makes the run span current.
    signals.task_prerun.connect(_annotate_run_span, weak=False)


def _before_publish(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    task_id = (headers or {}).get("id")
    if headers is None or not task_id:
        return
    name = getattr(sender, "name", sender)
    span = trace.get_tracer(__name__).start_span(
        f"apply_async/{name}",
        kind=trace.SpanKind.PRODUCER,
        attributes={"celery.action": "apply_async", "celery.task_name": str(name), "messaging.message.id": task_id},
    )
    inject(headers, context=trace.set_span_in_context(span))
    if len(_publishing) >= _PUBLISHING_MAX:
        for key in list(_publishing)[: _PUBLISHING_MAX // 10]:
            if (stale := _publishing.pop(key, None)) is not None:
                stale.end()
    _publishing[(threading.get_ident(), task_id)] = span


def _after_publish(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    span = _publishing.pop((threading.get_ident(), (headers or {}).get("id")), None)
    if span is not None:
        span.end()


def _annotate_run_span(task: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    from opentelemetry import trace

    from orders_project.log import task_ids

    span = trace.get_current_span()
    if not span.is_recording() or task is None:
        return
    saga_id, order_id = task_ids(task.request)
    if saga_id:
        span.set_attribute("saga.id", saga_id)
    if order_id:
        span.set_attribute("order.id", order_id)
    step = (kwargs or {}).get("step")
    if isinstance(step, str):
        span.set_attribute("saga.step", step)


def current_trace_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as hex, or empty strings."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
