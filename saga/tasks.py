"""The coordinator's tasks. Registered only in the saga worker (CELERY_SERVICE=saga)."""

from typing import Any

from celery import shared_task
from django.db import InterfaceError, OperationalError

from common.signing import failure_report_verify
from common.steps import RedactedReprTask, require_str, require_uuid

from . import settlement
from .failure import saga_step_failed
from .progress import report_verified, saga_step_succeeded
from .sweeper import saga_sweep
from .timeline import ATTEMPT_HEADER, TIMELINE_HEADER

RETRY: dict[str, Any] = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": None,  # the saga store must learn of every step outcome
}


def _check_report(saga_id: Any, step: Any) -> None:
    # Issue 6: a malformed report is rejected (the task fails, logged) before any query.
    require_uuid({"saga_id": saga_id}, "saga_id")
    require_str({"step": step}, "step", max_length=64)


# Its argument is a step's whole output: a retry keeps the redacted repr (common.steps).
# Reports now reach the coordinator through the result backend (saga.engine); this task
# stays for the messages of chains published before that.
@shared_task(name="saga.step_succeeded", base=RedactedReprTask, **RETRY)
def step_succeeded(result: Any, *, saga_id: str, step: str) -> None:
    _check_report(saga_id, step)
    report = report_verified(result, saga_id, step)
    saga_step_succeeded(saga_id=saga_id, step_name=step, result=report)


# Its kwargs hold the report's authority: a retry keeps the redacted reprs (common.steps).
@shared_task(name="saga.step_failed", base=RedactedReprTask, bind=True, **RETRY)
def step_failed(self: Any, task_id: str, *, saga_id: str, step: str, authority: Any = None) -> None:
    _check_report(saga_id, step)
    require_str({"task_id": task_id}, "task_id")
    # Only the errback the coordinator published with this task (saga.engine) may report
    # it: the failure it names is read from the result backend, and acting on it
    # compensates the saga.
    failure_report_verify(authority, saga_id=saga_id, step=step, task_id=task_id)
    # What the failing worker knew of the chain (saga.timeline): the records of the steps
    # before the failed one, and the failed attempt's number and worker.
    saga_step_failed(
        saga_id=saga_id,
        step_name=step,
        task_id=task_id,
        timeline=getattr(self.request, TIMELINE_HEADER, None),
        attempt=getattr(self.request, ATTEMPT_HEADER, None),
        # Returned to its queue because the worker that took it died (kombu's restore,
        # saga.recovery's watchdog, RabbitMQ's requeue): that worker may have recorded the
        # decision and died before publishing it.
        redelivered=bool((self.request.delivery_info or {}).get("redelivered")),
    )


@shared_task(name="saga.sweep", ignore_result=True)
def sweep() -> dict[str, int]:
    """The coordinator's watchdog, run by celery beat every SAGA_SWEEP_INTERVAL seconds."""
    return saga_sweep()


# Its argument is a sealed batch: a retry keeps the redacted repr (common.steps).
@shared_task(name="saga.settled", base=RedactedReprTask, **RETRY)
def settled(output: Any, *, step: str) -> int:
    """Record a settled batch (saga.settlement): the last task of a settlement's chain."""
    require_str({"step": step}, "step", max_length=64)
    return settlement.saga_settled(step=step, output=output)
