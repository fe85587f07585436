"""The coordinator's writes. Every function changes one saga under a row lock on it.

Messages that reach these functions may be duplicated or late (see ARCHITECTURE.md);
each function is therefore a state transition that is a no-op when the saga or step is
already past it.
"""

import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from celery.result import AsyncResult
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from orders_project.celery import app

from .definition import SagaDefinition, Step, get_definition
from .engine import build_chain, task_id_for
from .models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus

logger = logging.getLogger(__name__)

DB = "orders"
OUTCOME_FAILED = "failed"
OUTCOME_CANCELLED = "cancelled"


def _publish(signature: Any, saga_id: uuid.UUID) -> None:
    # A failure to publish leaves the step running with a deadline: the recovery
    # sweeper re-publishes it. Not raising keeps the already-committed request intact.
    try:
        signature.apply_async()
    except Exception:
        logger.exception("saga %s: publishing its next steps failed; the sweeper will retry", saga_id)


def _publish_on_commit(steps: tuple[Step, ...], saga: SagaInstance) -> None:
    signature = build_chain(steps, saga_id=saga.id, generation=saga.generation, context=saga.context)
    transaction.on_commit(partial(_publish, signature, saga.id), using=DB)


def _mark_running(
    step: SagaStep, spec: Step, *, now: datetime, generation: int, saga_id: uuid.UUID, queued_at: datetime | None = None
) -> None:
    step.status = StepStatus.RUNNING
    # The chain published this step when the previous one finished, which may be before
    # the coordinator heard of it: queue wait is measured from there.
    step.queued_at = queued_at or now
    step.deadline_at = now + timedelta(seconds=spec.timeout)
    step.celery_task_id = task_id_for(saga_id, spec.name, generation)


def saga_start(*, definition: SagaDefinition, order_id: uuid.UUID, context: Mapping[str, Any]) -> SagaInstance:
    """Create the saga and its forward steps, and publish its chain when the transaction commits.

    Precondition: inside `transaction.atomic(using="orders")`, in the same transaction that
    created the order, so an order never exists without its saga (and the chain is never
    published for an order that rolled back).
    """
    saga_id = uuid.uuid4()
    now = timezone.now()
    saga = SagaInstance.objects.using(DB).create(
        id=saga_id,
        definition=definition.name,
        order_id=order_id,
        status=SagaStatus.RUNNING,
        current_step=definition.steps[0].name,
        context={**context, "saga_id": str(saga_id), "order_id": str(order_id)},
    )
    steps = [
        SagaStep(saga=saga, phase=StepPhase.FORWARD, position=i, name=spec.name, task_name=spec.task)
        for i, spec in enumerate(definition.steps)
    ]
    _mark_running(steps[0], definition.steps[0], now=now, generation=saga.generation, saga_id=saga.id)
    SagaStep.objects.using(DB).bulk_create(steps)
    _publish_on_commit(definition.steps, saga)
    return saga


def _lock_saga(saga_id: uuid.UUID | str) -> SagaInstance | None:
    return SagaInstance.objects.using(DB).select_for_update().filter(id=saga_id).first()


def _apply_timing(step: SagaStep, meta: Mapping[str, Any]) -> None:
    started = parse_datetime(meta["started_at"]) if meta.get("started_at") else None
    finished = parse_datetime(meta["finished_at"]) if meta.get("finished_at") else None
    step.started_at = started or step.started_at
    step.finished_at = finished or timezone.now()
    step.attempts = max(step.attempts, int(meta.get("attempt") or 1))
    step.worker = str(meta.get("worker") or "")[:255]


def saga_step_succeeded(*, saga_id: uuid.UUID | str, step_name: str, result: Mapping[str, Any]) -> None:
    """Record that a step committed and move the saga to its next step or its end.

    The chain itself has already published the next step; this only keeps the store in
    step with it. Idempotent: a duplicate report of a succeeded step changes nothing.
    """
    result = dict(result or {})
    meta = result.pop("_step", {}) or {}
    with transaction.atomic(using=DB):
        saga = _lock_saga(saga_id)
        if saga is None:
            logger.error("step %s succeeded for unknown saga %s; ignored", step_name, saga_id)
            return
        steps = {s.name: s for s in saga.steps.all()}
        step = steps.get(step_name)
        if step is None:
            logger.error("saga %s has no step %s; success report ignored", saga_id, step_name)
            return
        if step.status == StepStatus.SUCCEEDED:
            return
        now = timezone.now()
        step.status = StepStatus.SUCCEEDED
        step.deadline_at = None
        step.result = meta.get("output") or {}
        _apply_timing(step, meta)
        changed = [step]
        # Later steps need what this one produced (e.g. the amount); a re-publish (sweeper,
        # operator retry) starts from this context.
        saga.context = {**saga.context, **{k: v for k, v in result.items() if not k.startswith("_")}}

        definition = get_definition(saga.definition)
        if step.phase == StepPhase.FORWARD:
            nxt = definition.steps[step.position + 1] if step.position + 1 < len(definition.steps) else None
            if saga.status == SagaStatus.RUNNING:
                if nxt is None:
                    saga.status = SagaStatus.COMPLETED
                    saga.current_step = ""
                    saga.finished_at = now
                else:
                    nxt_row = steps[nxt.name]
                    _mark_running(
                        nxt_row, nxt, now=now, generation=saga.generation, saga_id=saga.id, queued_at=step.finished_at
                    )
                    saga.current_step = nxt.name
                    changed.append(nxt_row)
        else:
            plan = definition.compensation_steps()
            nxt = plan[step.position + 1] if step.position + 1 < len(plan) else None
            if saga.status == SagaStatus.COMPENSATING:
                if nxt is None:
                    saga.status = SagaStatus.COMPENSATED
                    saga.current_step = ""
                    saga.finished_at = now
                else:
                    nxt_row = steps[nxt.name]
                    _mark_running(
                        nxt_row, nxt, now=now, generation=saga.generation, saga_id=saga.id, queued_at=step.finished_at
                    )
                    saga.current_step = nxt.name
                    changed.append(nxt_row)
        SagaStep.objects.using(DB).bulk_update(
            changed,
            [
                "status",
                "queued_at",
                "started_at",
                "finished_at",
                "deadline_at",
                "attempts",
                "worker",
                "celery_task_id",
                "result",
            ],
        )
        saga.save(using=DB)


def _failure_from_backend(task_id: str) -> tuple[str, str]:
    """(exception type, message) of a failed task, as its worker stored it."""
    try:
        exc = AsyncResult(task_id, app=app).result
    except Exception as error:  # a corrupt or foreign record must not stop compensation
        return type(error).__name__, f"could not read the failure of task {task_id}: {error}"
    if isinstance(exc, BaseException):
        return type(exc).__name__, str(exc)
    return "UnknownError", f"task {task_id} failed; the result backend has no exception for it"


def saga_step_failed(*, saga_id: uuid.UUID | str, step_name: str, task_id: str) -> None:
    """Handle a step that failed for good (its own retries exhausted or a business failure).

    Before the pivot: compensate. After the pivot, or in the compensation phase: the saga
    needs an operator. Idempotent: a second errback for the same failure changes nothing.
    """
    error_type, error = _failure_from_backend(task_id)
    with transaction.atomic(using=DB):
        saga = _lock_saga(saga_id)
        if saga is None:
            logger.error("step %s failed for unknown saga %s; ignored", step_name, saga_id)
            return
        step = saga.steps.filter(name=step_name).first()
        if step is None:
            logger.error("saga %s has no step %s; failure report ignored", saga_id, step_name)
            return
        if step.status == StepStatus.SUCCEEDED:
            # A late duplicate failed after the original committed: nothing to undo here.
            logger.warning("saga %s step %s: duplicate failed after success: %s", saga_id, step_name, error)
            return
        if step.status == StepStatus.FAILED and step.celery_task_id == task_id:
            return
        step.status = StepStatus.FAILED
        step.finished_at = timezone.now()
        step.deadline_at = None
        step.last_error = f"{error_type}: {error}"
        step.attempts = max(step.attempts, 1)
        step.save(using=DB)

        definition = get_definition(saga.definition)
        if step.phase == StepPhase.FORWARD:
            if saga.status != SagaStatus.RUNNING:
                # Already compensating (e.g. a cancel): this step refusing is expected.
                return
            if definition.is_after_pivot(step_name):
                _needs_attention(saga, step_name, error_type, error)
            else:
                saga_begin_compensation(
                    saga, outcome=OUTCOME_FAILED, failure_step=step_name, failure_type=error_type, reason=error
                )
        elif saga.status == SagaStatus.COMPENSATING:
            _needs_attention(saga, step_name, error_type, error)


def _needs_attention(saga: SagaInstance, step_name: str, error_type: str, error: str) -> None:
    saga.status = SagaStatus.NEEDS_ATTENTION
    saga.failure_step = step_name
    saga.failure_type = error_type
    saga.failure_reason = error
    saga.save(using=DB)


def saga_begin_compensation(
    saga: SagaInstance, *, outcome: str, failure_step: str, failure_type: str, reason: str
) -> None:
    """Switch a running saga to compensating and publish its compensations on commit.

    Precondition: inside `transaction.atomic(using="orders")` holding `select_for_update`
    on `saga`, whose status is running.
    """
    if saga.status != SagaStatus.RUNNING:
        raise ValueError(f"saga {saga.id} is {saga.status}, not running")
    definition = get_definition(saga.definition)
    plan = definition.compensation_steps()
    now = timezone.now()
    saga.status = SagaStatus.COMPENSATING
    saga.outcome = outcome
    saga.failure_step = failure_step
    saga.failure_type = failure_type
    saga.failure_reason = reason
    saga.generation += 1
    saga.current_step = plan[0].name
    saga.context = {**saga.context, "outcome": outcome, "failure_reason": reason}
    saga.save(using=DB)

    # Forward steps that never reported back will not: their compensations cover them.
    saga.steps.filter(phase=StepPhase.FORWARD, status=StepStatus.RUNNING).update(deadline_at=None)
    rows = [
        SagaStep(saga=saga, phase=StepPhase.COMPENSATION, position=i, name=spec.name, task_name=spec.task)
        for i, spec in enumerate(plan)
    ]
    _mark_running(rows[0], plan[0], now=now, generation=saga.generation, saga_id=saga.id)
    SagaStep.objects.using(DB).bulk_create(rows)
    _publish_on_commit(plan, saga)
