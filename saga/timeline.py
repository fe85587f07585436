"""The failed step's timeline, carried on its failure report.

A chain's progress travels in the context's `_steps` (common.steps) and reaches the store
at the pivot and at the chain's end. When a step fails, the steps before it committed, and
their records are in the failed task's own arguments; but the result backend stores only
the arguments' repr (`argsrepr`, which keeps the context out of results and Flower), so
the coordinator could not read them back and used to mark those steps succeeded with no
attempt and no times.

`attach_failure_timeline` (a `before_task_publish` receiver, connected in every process by
saga.apps) adds the failing task's `_steps`, its own attempt (number, worker, start and
end) and the order id of the message it verified to the headers of the failure report
(`saga.step_failed`) the failing worker publishes: no extra message, a few hundred bytes
on the failure path only. An errback sent from a worker's main process (a hard time limit)
has no current task and carries nothing: the coordinator then says the earlier steps'
outcome is unknown rather than inventing one, and looks the order up for its log lines.
"""

from typing import Any

from celery import current_task
from django.utils import timezone

from common.steps import STARTED_AT_ATTR, VERIFIED_ORDER_ATTR

TIMELINE_HEADER = "saga_timeline"
ATTEMPT_HEADER = "saga_failed_attempt"
# The order of the failed step's verified message: what the coordinator's log lines name
# (orders_project.log reads it from the request), so the report needs no query for it.
ORDER_HEADER = "saga_order_id"
STEP_FAILED_TASK = "saga.step_failed"
MAX_ENTRIES = 16  # a chain is a handful of steps (common.steps.MAX_TIMELINE)


def attach_failure_timeline(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if sender != STEP_FAILED_TASK or not isinstance(headers, dict):
        return
    task = current_task
    request = getattr(task, "request", None) if task else None
    if order_id := getattr(request, VERIFIED_ORDER_ATTR, None):
        headers[ORDER_HEADER] = order_id
    args = getattr(request, "args", None) if request is not None else None
    if not args or not isinstance(args[0], dict):
        return
    steps = args[0].get("_steps")
    if isinstance(steps, list):
        headers[TIMELINE_HEADER] = [meta for meta in steps[-MAX_ENTRIES:] if isinstance(meta, dict)]
    headers[ATTEMPT_HEADER] = {
        "attempt": (getattr(request, "retries", 0) or 0) + 1,
        "worker": getattr(request, "hostname", None) or "",
        # The failed attempt's own times: it started at this, and failed just now (Celery
        # sends the errback as the attempt ends).
        "started_at": getattr(request, STARTED_AT_ATTR, None),
        "finished_at": timezone.now().isoformat(),
    }
