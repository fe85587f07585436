"""One order is one trace, from the POST through every step, compensation and notification.

The session's processes export their spans over OTLP to a receiver in this process
(tests/otlp.py), configured by the same OTEL_* variables compose gives them for Jaeger.
"""

import re
import uuid
from collections import Counter
from pathlib import Path

import pytest

from common.signing import failure_report_mint
from devstack.topology import Topology, wait_for
from orders_project.celery import app
from saga.models import SagaInstance, SagaStep

from .api import Api, make_product, result_wait
from .otlp import OtlpReceiver, ReceivedSpan

pytestmark = [pytest.mark.integration, pytest.mark.broker]

# A declined payment: reserve, charge (declined), the failure report, then the
# compensations (no refund: the decline is final); every task once. The compensation
# chain's record (its last step's result, with the timing the steps before it carried
# down the chain: saga.engine) is drained by the sweeper, under a `saga.record` span in
# the same trace.
DECLINED_ORDER_RUNS = Counter(
    {
        "run/inventory.reserve": 1,
        "run/payments.charge": 1,
        "run/saga.step_failed": 1,
        "run/inventory.release": 1,
        "run/orders.fail": 1,
        "run/notifications.notify": 1,
    }
)


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[str]:
    names = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        names.append(span.name)
    return names


def test_a_compensated_order_is_one_trace_covering_every_step(
    api: Api, otlp: OtlpReceiver, topology: Topology, sku: str
) -> None:
    make_product(sku, on_hand=2)
    order = api.wait_until_final(api.place_order([(sku, 1)], token="tok_chargeDeclined")["id"])
    assert (order["status"], order["saga"]["status"]) == ("failed", "compensated")
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    assert re.fullmatch(r"[0-9a-f]{32}", saga.trace_id), saga.trace_id

    def whole_trace() -> list[ReceivedSpan] | None:
        spans = otlp.spans(trace_ids=[saga.trace_id])
        ids = {span.span_id for span in spans}
        runs = Counter(span.name for span in spans if span.name.startswith("run/"))
        parents_arrived = all(not span.parent_span_id or span.parent_span_id in ids for span in spans)
        recorded = any(span.name == "saga.record" for span in spans)
        return spans if runs >= DECLINED_ORDER_RUNS and recorded and parents_arrived else None

    spans = wait_for(whole_trace, timeout=30, what="every span of the order's trace")

    # Exactly one trace: every span that names this saga or order is in it.
    mine = [
        span
        for span in otlp.spans()
        if span.attributes.get("saga.id") == str(saga.id) or span.attributes.get("order.id") == str(saga.order_id)
    ]
    assert {span.trace_id for span in mine} == {saga.trace_id}
    # Every step and compensation ran once, each inside the trace.
    assert Counter(span.name for span in spans if span.name.startswith("run/")) == DECLINED_ORDER_RUNS
    # Parent-linked: one tree, rooted at the web request that placed the order.
    [root] = [span for span in spans if not span.parent_span_id]
    assert (root.service, root.name) == ("web", "POST api/orders/")
    by_id = {span.span_id: span for span in spans}
    runs = {span.name: span for span in spans if span.name.startswith("run/")}
    assert ancestors(runs["run/inventory.reserve"], by_id)[-1] == root.name
    # The compensations descend from the failure report that started them, which descends
    # from the declined charge (its errback).
    assert "run/saga.step_failed" in ancestors(runs["run/inventory.release"], by_id)
    assert "run/payments.refund" not in runs
    assert "run/payments.charge" in ancestors(runs["run/saga.step_failed"], by_id)
    assert "run/orders.fail" in ancestors(runs["run/notifications.notify"], by_id)
    # Each service reported its own spans.
    assert {span.service for span in spans} >= {
        "web",
        "worker-inventory",
        "worker-payments",
        "worker-orders",
        "worker-notifications",
        "worker-saga",
    }
    assert otlp.database_spans > 0  # psycopg is traced too (those spans are not kept)

    # A failure report that arrives without a trace context (as an errback sent by a
    # worker's main process does, after a hard time limit; here a duplicate sent from this
    # untraced process) is adopted into the saga's trace by the saga worker.
    charge = SagaStep.objects.get(saga=saga, name="charge_payment")
    authority = failure_report_mint(saga_id=saga.id, step=charge.name, task_id=charge.celery_task_id)
    report = app.signature(
        "saga.step_failed",
        args=(charge.celery_task_id,),
        kwargs={"saga_id": str(saga.id), "step": charge.name, "authority": authority},
    ).apply_async(ignore_result=False)
    result_wait(report, 30, propagate=True)
    adopted = wait_for(
        lambda: [
            span
            for span in otlp.spans(trace_ids=[saga.trace_id])
            if span.name == "run/saga.step_failed" and span.span_id not in by_id
        ],
        timeout=30,
        what="the duplicate failure report's span in the order's trace",
    )
    assert [span.parent_span_id for span in adopted] == [root.span_id]  # the stored context: the POST

    # Every line a task wrote about this saga names its saga, order and trace.
    ids = f"saga={saga.id} order={saga.order_id} trace={saga.trace_id}"
    for worker, mention in [
        ("payments", f"payments.charge[{saga.id}-charge_payment-g0]"),
        ("inventory", f"inventory.release[{saga.id}-release_inventory-g1]"),
        # The coordinator's failure report carries only the saga id: it looks the order up.
        ("saga", f"saga={saga.id} "),
    ]:
        log = Path(topology.processes[worker].log_path).read_text(errors="replace").splitlines()
        lines = [line for line in log if mention in line and " celery.app.trace " in line]
        assert lines, f"{worker}: no task log line mentions {mention}"
        assert all(ids in line for line in lines), lines
    assert any("saga.step_failed[" in line for line in lines)


def test_a_requests_query_string_is_in_neither_the_access_log_nor_its_span(
    api: Api, otlp: OtlpReceiver, topology: Topology
) -> None:
    """The admin searches by a customer's email or phone, in the query string (`?q=`): whoever
    reads the web's log or its traces must not collect them (docs/SECURITY.md)."""
    searched = f"searched-{uuid.uuid4().hex[:8]}@example.com"
    response = api.get(f"/api/orders/?limit=1&q={searched}")
    assert response.status_code == 200
    web_log = Path(topology.processes["web"].log_path)

    def logged() -> list[str] | None:
        lines = [line for line in web_log.read_text(errors="replace").splitlines() if '"GET /api/orders/ ' in line]
        return lines or None

    assert wait_for(logged, timeout=15, what="the request's access log line")
    spans = wait_for(
        lambda: [s for s in otlp.spans() if s.attributes.get("http.route") == "api/orders/"] or None,
        timeout=30,
        what="the request's span",
    )
    assert searched not in web_log.read_text(errors="replace")
    assert not [s.attributes for s in spans if searched in str(s.attributes)]
    assert {s.attributes.get("http.target") for s in spans} == {"/api/orders/"}
