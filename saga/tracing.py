"""One trace per saga, whoever publishes its next chain (orders_project.telemetry).

Celery carries the trace in message headers wherever a message is sent from inside a
traced task or request: chain steps, links, errbacks sent by a pool process. Three
publishers are not inside the order's trace, and these helpers put them back in it:

- the recovery sweeper (a beat-driven task of its own) and an operator's retry or
  compensation (an admin request): `saga_trace_context` publishes under the context the
  saga stored when it was created (`SagaInstance.trace_context`), with a span that links
  to what asked for it;
- an errback the worker's *main* process sends (a hard time limit killed the task): the
  message has no context, so `adopt_saga_trace`, run in the saga worker before the Celery
  instrumentation reads the headers, gives the coordinator's task the saga's context.

With tracing off every function here is a no-op (the stored context is empty).
"""

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from .timeline import ORDER_HEADER

logger = logging.getLogger(__name__)

# Coordinator tasks that carry `saga_id` as a keyword argument.
COORDINATOR_TASKS = ("saga.step_succeeded", "saga.step_failed")


def trace_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (traceparent, ...); empty when not tracing."""
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def trace_id_of(carrier: Mapping[str, str] | None) -> str:
    """The trace id (32 hex digits) a stored context belongs to, or ''."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    if not carrier:
        return ""
    context = trace.get_current_span(extract(dict(carrier))).get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


@contextlib.contextmanager
def saga_trace_context(carrier: Mapping[str, str] | None, *, why: str = "saga.publish") -> Iterator[None]:
    """Make the saga's own trace current while publishing its chain.

    Inside that trace already (the POST that created the saga, a step's errback), nothing
    changes and the publish is a child of what caused it. Elsewhere (the sweeper, an
    admin request, a cancel), a `why` span in the saga's trace, linked to the current
    span, becomes the parent of what is published.
    """
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    stored = extract(dict(carrier)) if carrier else None
    stored_span = trace.get_current_span(stored).get_span_context() if stored is not None else None
    current = trace.get_current_span().get_span_context()
    if (
        stored_span is None
        or not stored_span.is_valid
        or (current.is_valid and current.trace_id == stored_span.trace_id)
    ):
        yield
        return
    links = [trace.Link(current)] if current.is_valid else None
    with trace.get_tracer(__name__).start_as_current_span(why, context=stored, links=links):
        yield


def tracing_enabled() -> bool:
    from orders_project.telemetry import tracing_enabled as enabled

    return enabled()


def adopt_saga_trace(task: Any = None, kwargs: Mapping[str, Any] | None = None, **_: Any) -> None:
    """task_prerun receiver of the saga worker, connected before the Celery instrumentation's.

    A coordinator task's message without a trace context (sent by a worker's main process)
    gets the saga's stored one, so its span joins the order's trace; a failure report that
    does not name its order (saga.timeline.ORDER_HEADER: one from a worker's main process)
    also learns the order id, for its log lines (orders_project.log). The header is only
    what the failing worker said: a forged report may name another order in its log
    lines, and is then ignored (saga.failure: it has no stored failure).
    """
    from .models import SagaInstance

    if task is None or task.name not in COORDINATOR_TASKS:
        return
    request = task.request
    has_context = bool(getattr(request, "traceparent", None))
    if has_context and task.name != "saga.step_failed":
        return
    if getattr(request, ORDER_HEADER, None) and (has_context or not tracing_enabled()):
        # The failing worker named the order (saga.timeline), and there is no trace to
        # adopt: no query on the failure path.
        return
    if task.name == "saga.step_succeeded" and not tracing_enabled():
        # No trace to join, and the report's own context names the order for the log
        # lines (orders_project.log): not worth a query on every report.
        return
    saga_id = (kwargs or {}).get("saga_id")
    try:
        row = SagaInstance.objects.filter(id=saga_id).values_list("order_id", "trace_context").first()  # type: ignore[misc]
    except Exception:  # a malformed id: the task itself rejects it
        return
    if row is None:
        return
    order_id, carrier = row
    request.saga_order_id = str(order_id)
    if not has_context:
        for key, value in (carrier or {}).items():
            setattr(request, key, value)
