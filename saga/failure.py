"""Steps that failed for good: record the failure, then compensate (before the pivot) or
stop the saga for an operator (after it, or when a compensation fails).

A failing step's `link_error` queues `saga.step_failed` with the failed task's id; the
failure itself, with the records of the steps before it, is read from the result backend.
Reports may be duplicated or late: a second errback for the same failure changes nothing.
"""

import contextlib
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery.result import AsyncResult
from django.db import transaction
from django.utils import timezone

from common.signing import FAILURE_SEAL_FIELD, failure_seal_valid
from orders_project.celery import app

from . import store
from .definition import get_definition
from .models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus
from .publish import OUTCOME_FAILED, publish_on_commit, saga_begin_compensation
from .store import DB, UNSETTLED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredFailure:
    error_type: str
    error: str
    timeline: Any = None  # the `_steps` the failed task received: the steps before it
    # Whether the failing step sealed this error type (common.signing.failure_seal): only
    # then may it skip a compensation (Step.final_failures).
    attested: bool = False


def _failure_from_backend(task_id: str, *, saga_id: Any, step: str) -> StoredFailure | None:
    """The failure of a task as its worker stored it (with its arguments: the result
    backend is extended); None when the result backend has no failure for that task id."""
    try:
        result: AsyncResult = AsyncResult(task_id, app=app)
        exc = result.result if result.state == "FAILURE" else None
    except Exception as error:  # a corrupt or foreign record must not stop compensation
        return StoredFailure(type(error).__name__, f"could not read the failure of task {task_id}: {error}")
    if not isinstance(exc, BaseException):
        return None
    error_type, timeline, sealed = type(exc).__name__, None, None
    with contextlib.suppress(Exception):  # the timing is nice to have, never a reason to stop
        args = result.args or ()
        if isinstance(args, str):
            # A step stores its ids and timing as its argsrepr, not its context (common.steps).
            args = json.loads(args)
        if args and isinstance(args[0], dict):
            timeline, sealed = args[0].get("_steps"), args[0].get(FAILURE_SEAL_FIELD)
    attested = failure_seal_valid(sealed, saga_id=saga_id, step=step, task_id=task_id, error_type=error_type)
    return StoredFailure(error_type, str(exc), timeline, attested)


def saga_step_failed(
    *,
    saga_id: uuid.UUID | str,
    step_name: str,
    task_id: str,
    timeline: Any = None,
    attempt: Any = None,
    redelivered: bool = False,
) -> None:
    """Handle a step that failed for good (its own retries exhausted or a business failure).

    Before the pivot: compensate. After the pivot, or in the compensation phase: the saga
    needs an operator. A forward step refused because the saga was already compensating
    is recorded `refused`, not failed. `timeline` is the failed task's `_steps` (the
    records of the steps before it) and `attempt` its attempt number and worker, as the
    failure report carries them (saga.timeline). Idempotent: a second errback for the same
    failure changes nothing, but for one thing: a report the broker `redelivered` (its
    first delivery's worker died holding it) publishes again the compensation chain its
    first delivery decided on, in case that worker died between its commit and its publish
    (`_compensation_published_again`).
    """
    failure = _failure_from_backend(task_id, saga_id=saga_id, step=step_name)
    if failure is None:
        # Celery stores the failure before it sends the errback, so a report without one
        # is forged or foreign: acting on it would compensate a healthy saga. A step that
        # really vanished is the sweeper's to find.
        logger.error("saga %s: failure report for task %s has no stored failure; ignored", saga_id, task_id)
        return
    error_type, error = failure.error_type, failure.error
    if error_type == "InvalidMessage":
        # The participant refused a malformed or unsigned message before acting: nothing
        # happened that needs undoing, and a forged message must not steer the saga. If
        # the real step is lost, the sweeper finds it.
        logger.error("saga %s: step %s refused a message (%s); ignored", saga_id, step_name, error)
        return
    with transaction.atomic(using=DB):
        saga, steps = store.lock_saga_with_steps(saga_id)
        if saga is None:
            logger.error("step %s failed for unknown saga %s; ignored", step_name, saga_id)
            return
        step = steps.get(step_name)
        if step is None:
            logger.error("saga %s has no step %s; failure report ignored", saga_id, step_name)
            return
        # What changed is written once, at the end, in one statement with the saga
        # (store.save): this runs for every failed saga, on its failure path's latency.
        changed, decide = _failure_recorded(
            saga, steps, step, failure, task_id=task_id, timeline=timeline, attempt=attempt
        )
        if not decide:
            if redelivered:
                _compensation_published_again(saga, steps, step, task_id=task_id)
            if changed:
                store.save(saga, changed, fields=["context"])
            return
        definition = get_definition(saga.definition, saga.definition_version)
        if step.phase == StepPhase.FORWARD and saga.status == SagaStatus.RUNNING:
            if not definition.is_after_pivot(step_name):
                saga_begin_compensation(
                    saga,
                    outcome=OUTCOME_FAILED,
                    failure_step=step_name,
                    failure_type=failure.error_type,
                    reason=failure.error,
                    steps=steps.values(),
                    also_save=changed,
                    failure_attested=failure.attested,
                )
                return
            saga.mark_needs_attention(failure_step=step_name, failure_type=failure.error_type, reason=failure.error)
            stop_running(steps.values(), changed)
        elif step.phase == StepPhase.COMPENSATION and saga.status == SagaStatus.COMPENSATING:
            saga.mark_needs_attention(failure_step=step_name, failure_type=failure.error_type, reason=failure.error)
            stop_running(steps.values(), changed)
        store.save(saga, changed)


def _failure_recorded(
    saga: SagaInstance,
    steps: dict[str, SagaStep],
    step: SagaStep,
    failure: StoredFailure,
    *,
    task_id: str,
    timeline: Any,
    attempt: Any,
) -> tuple[list[SagaStep], bool]:
    """Record, in memory, what a failure report says about `step` and the steps before it.
    Returns the rows changed (the caller writes them), and whether the saga must now
    decide what the failure means (compensate, or stop for an operator): not for a
    duplicate, a superseded or a late copy. Precondition: `saga`'s row lock is held,
    `steps` are all its steps."""
    error_type, error = failure.error_type, failure.error
    reported, current = _generation_of(task_id), _generation_of(step.celery_task_id)
    if step.status == StepStatus.RUNNING and reported is not None and current is not None and reported < current:
        # A copy that a re-publish superseded (e.g. the errback of the failure an operator
        # retried, repeated): the step's current copy reports for itself, and the sweeper
        # keeps watching its deadline.
        logger.warning("saga %s step %s: %s was superseded; its failure is ignored", saga.id, step.name, task_id)
        return [], False
    changed: list[SagaStep] = []
    if step.status != StepStatus.SUCCEEDED:
        # The steps before it in its chain committed (a chain runs a step only after the
        # previous one did); their records travelled with the failure report.
        changed = store.record_timeline(
            saga, steps, timeline if timeline is not None else failure.timeline, failed=step
        )
        # One without a record (a failure reported from a worker's main process, after
        # a hard time limit) is not shown succeeded with no attempt or time: unknown.
        changed += [
            s
            for s in steps.values()
            if s.phase == step.phase
            and s.position < step.position
            and s.status in (StepStatus.PENDING, StepStatus.RUNNING)
            and s not in changed
        ]
        for earlier in changed:
            if earlier.status != StepStatus.SUCCEEDED:
                earlier.mark_unknown()
    if step.status == StepStatus.SUCCEEDED:
        # A late duplicate failed after the original committed: nothing to undo here.
        logger.warning("saga %s step %s: duplicate failed after success: %s", saga.id, step.name, error)
        return changed, False
    if step.status in (StepStatus.FAILED, StepStatus.REFUSED) and step.celery_task_id == task_id:
        return changed, False
    compensating = step.phase == StepPhase.FORWARD and saga.status != SagaStatus.RUNNING
    if compensating and step.status not in UNSETTLED:
        # A late copy of a step whose outcome is already recorded (its failure started
        # the compensation; or it was refused before) refused again: keep what happened.
        logger.warning("saga %s step %s: a late copy failed while compensating: %s", saga.id, step.name, error)
        return changed, False
    definition = get_definition(saga.definition, saga.definition_version)
    if (
        step.phase == StepPhase.FORWARD
        and saga.pivot_committed_at is not None
        and not definition.is_after_pivot(step.name)
    ):
        # A late copy of an earlier step failed after the pivot committed: the
        # original succeeded (the pivot needed it). Nothing to undo, and the step is
        # not shown failed: the chain's record still shows it succeeded.
        logger.warning("saga %s: %s failed after the pivot committed: %s", saga.id, step.name, error)
        return changed, False
    # Refused because the saga was already compensating (a cancel, a failure elsewhere):
    # the step did nothing, by design; it did not fail.
    refused = compensating and error_type == "StepRefused"
    step.mark_failed(f"{error_type}: {error}", at=timezone.now(), refused=refused, task_id=task_id)
    step.take_attempt(attempt)
    if step.queued_at is None:
        # Mid-chain, nothing marked it queued: it was when the step before it finished,
        # as a succeeded step's row says (store.record_timeline).
        before = next((s for s in steps.values() if s.phase == step.phase and s.position == step.position - 1), None)
        if before is not None and before.status == StepStatus.SUCCEEDED:
            step.queued_at = before.finished_at
    changed.append(step)
    if compensating:
        # The chain stopped here: the steps after it that the cancel left unknown never ran.
        for s in steps.values():
            if s.phase == step.phase and s.position > step.position and s.status == StepStatus.UNKNOWN:
                s.mark_pending()
                changed.append(s)
    return changed, True


def _compensation_published_again(
    saga: SagaInstance, steps: dict[str, SagaStep], step: SagaStep, *, task_id: str
) -> None:
    """Publish again, once the transaction commits, the compensation chain that this
    failure's report started, if the saga is still waiting on it as published.

    The coordinator publishes a chain after its transaction commits (publish_on_commit):
    a worker killed between the two leaves the decision recorded and no message anywhere,
    and its report, delivered again, found nothing left to decide. The saga then waited
    for the chain's deadline (tens of seconds) and the sweeper spent a re-publish on it.
    Publishing again in the same generation is safe whether or not the first copy went
    out: the messages carry the same task ids, and each step is idempotent by its key.

    Precondition: `saga`'s row lock is held and `steps` are all its steps; the report is
    for `task_id`, a redelivery of one whose failure is already recorded.
    """
    if (
        saga.status != SagaStatus.COMPENSATING
        or saga.failure_step != step.name
        or step.phase != StepPhase.FORWARD
        or step.celery_task_id != task_id
    ):
        return
    first = min(
        (s for s in steps.values() if s.phase == StepPhase.COMPENSATION and s.status == StepStatus.RUNNING),
        key=lambda s: s.position,
        default=None,
    )
    # Not once the sweeper has re-published it: that copy went out after its own commit.
    if first is None or first.republished:
        return
    plan = get_definition(saga.definition, saga.definition_version).compensation_steps()
    publish_on_commit(plan[first.position :], saga)
    logger.warning(
        "saga %s: the failure report of %s came again after its worker died; its compensation chain "
        "(generation %d, from %s) is published again",
        saga.id,
        step.name,
        saga.generation,
        first.name,
    )


def stop_running(steps: Iterable[SagaStep], changed: list[SagaStep]) -> None:
    """A saga stopped for an operator: nothing of it runs on its own any more, so its
    running steps lose their deadline (the sweeper's scan keeps to sagas it can act on).
    Adds what it changes to `changed`, for the caller's one write (store.save)."""
    for s in steps:
        if s.status == StepStatus.RUNNING and s.deadline_at is not None:
            s.deadline_at = None
            if s not in changed:
                changed.append(s)


def _generation_of(task_id: str) -> int | None:
    """The generation a task id names (saga.engine.task_id_for), or None."""
    _, separator, generation = task_id.rpartition("-g")
    return int(generation) if separator and generation.isdigit() else None
