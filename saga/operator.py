"""The operator's actions on a saga: the admin's retry and compensate (README "Operating it").

Each has a check that only reads (`saga_retry_check`, `saga_compensate_check`: what the
admin shows before the click) and an action that locks the saga, checks again what it may
do *now* (so a second click, or a second operator, finds the first one's result and is
refused), acts, and records a SagaAuditEntry in the same transaction; refusals are
recorded too.
"""

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import store
from .definition import get_definition
from .models import SagaAuditEntry, SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus
from .publish import OUTCOME_FAILED, saga_begin_compensation, saga_republish_from
from .selectors import sagas_with_fingerprints
from .store import DB

logger = logging.getLogger(__name__)

OPERATOR_COMPENSATED = "CompensatedByOperator"
# What the customer is told (the failure notification) when an operator stops an order.
OPERATOR_COMPENSATED_REASON = "it was stopped by our staff"


@dataclass(frozen=True)
class RetryPlan:
    """What retrying a saga does: re-publish from `step`, or `finish` it with that status
    (every step it still needed has succeeded since it was flagged), or, with neither,
    nothing (`detail` says why)."""

    detail: str
    step: SagaStep | None = None
    finish: str = ""

    @property
    def possible(self) -> bool:
        return self.step is not None or bool(self.finish)


def saga_retry_check(saga: SagaInstance, *, now: datetime | None = None) -> RetryPlan:
    """What retrying `saga` would do. Only reads; `saga_retry` checks again under the lock.

    Retryable:
    - `needs_attention`: the step that failed runs again, then the rest of its phase. In
      the forward phase that is the pivot or a step after it (a notification that ran out
      of retries during a mail outage, a confirm that never reported back); in the
      compensation phase, the compensation that ran out of retries. If a late copy of that
      step has succeeded since, the saga resumes after it (or finishes, if nothing is left).
    - `running` or `compensating` but stuck: its current step is past its deadline (a lost
      message while the sweeper is down or far from its next try): re-published now.

    Not retryable: a completed saga; a compensated one (its order failed or was cancelled,
    and the compensations' tombstones make every forward step refuse, so "retry" there is
    a new order); a running one whose current step is still within its deadline.
    """
    now = now or timezone.now()
    steps = {step.name: step for step in saga.steps.all()}
    if saga.status == SagaStatus.NEEDS_ATTENTION:
        failed = steps.get(saga.failure_step)
        if failed is None:
            return RetryPlan(f"it needs attention, but {saga.failure_step!r} is none of its steps: nothing to re-run")
        phase = "forward steps" if failed.phase == StepPhase.FORWARD else "compensations"
        todo = sorted(
            (
                step
                for step in steps.values()
                if step.phase == failed.phase
                and step.position >= failed.position
                and step.status != StepStatus.SUCCEEDED
            ),
            key=lambda step: step.position,
        )
        if todo and todo[0] is failed:
            return RetryPlan(
                f"resumed from {failed.name}, which failed ({saga.failure_type}): it and the {phase} after it "
                "run again",
                step=failed,
            )
        if todo:
            return RetryPlan(
                f"resumed from {todo[0].name}: {failed.name} failed ({saga.failure_type}) but has succeeded since",
                step=todo[0],
            )
        finish = SagaStatus.COMPLETED if failed.phase == StepPhase.FORWARD else SagaStatus.COMPENSATED
        return RetryPlan(
            f"{failed.name} failed ({saga.failure_type}), but it and the {phase} after it have all succeeded since: "
            f"marked {finish}",
            finish=finish,
        )
    if saga.status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
        step = steps.get(saga.current_step)
        if step is None or step.status != StepStatus.RUNNING:
            state = "missing" if step is None else step.status
            return RetryPlan(
                f"it is {saga.status}, but its current step {saga.current_step!r} is {state}: nothing to re-publish"
            )
        if step.deadline_at is not None and step.deadline_at > now:
            return RetryPlan(
                f"it is {saga.status} and not stuck: {step.name} has until {step.deadline_at:%Y-%m-%d %H:%M:%S} UTC "
                "to report back"
            )
        return RetryPlan(f"re-published {step.name}, which had not reported back by its deadline", step=step)
    if saga.status == SagaStatus.COMPLETED:
        return RetryPlan("it completed: nothing to retry")
    return RetryPlan(
        "it was compensated (its order failed or was cancelled): its forward steps cannot run again, the "
        "compensations' tombstones refuse them; the customer places a new order"
    )


def saga_compensate_check(saga: SagaInstance) -> str | None:
    """Why `saga` cannot be compensated by hand now, or None (the pivot guard has the last
    word, under the pivot's lock: `saga_compensate`). Only reads.

    Compensable: a running saga before its pivot, whatever step it is at (as a customer's
    cancel: the compensations undo what ran, their tombstones stop what is in flight), and
    a saga that needs attention at its pivot (a confirm that never reported back).
    """
    definition = get_definition(saga.definition, saga.definition_version)
    if not definition.pivot_guard:
        return f"saga {definition.name!r} names no pivot guard: compensating it by hand could race its pivot"
    if saga.status == SagaStatus.RUNNING:
        if saga.current_step in {s.name for s in definition.steps} and definition.is_after_pivot(saga.current_step):
            return f"it is past its pivot ({definition.pivot} committed): nothing before it can be undone"
        return None
    if saga.status == SagaStatus.NEEDS_ATTENTION:
        forward = {s.name for s in definition.steps}
        if saga.failure_step == definition.pivot:
            return None
        if saga.failure_step in forward:
            return f"it is past its pivot ({definition.pivot} committed): retry it instead"
        return f"it is already compensating ({saga.failure_step} failed): retry it to finish compensating"
    if saga.status == SagaStatus.COMPENSATING:
        return "it is already compensating"
    return f"it is already {saga.status}"


def _audit(
    saga: SagaInstance,
    *,
    action: str,
    user: Any,
    done: bool,
    detail: str,
    status_before: str,
    fingerprint: str,
) -> SagaAuditEntry:
    entry = SagaAuditEntry.objects.using(DB).create(
        saga=saga,
        action=action,
        outcome=SagaAuditEntry.Outcome.DONE if done else SagaAuditEntry.Outcome.REFUSED,
        detail=detail[:2000],
        user_id=getattr(user, "pk", None),
        username=(user.get_username() if user is not None else "") or "system",
        status_before=status_before,
        status_after=saga.status,
        failure_fingerprint=fingerprint[:200],
    )
    log = logger.warning if done else logger.info
    log("saga %s: %s by %s %s: %s", saga.id, action, entry.username, entry.outcome, detail)
    return entry


def saga_retry(*, saga_id: uuid.UUID | str, user: Any) -> SagaAuditEntry:
    """Retry a saga from the step that failed or stalled (`saga_retry_check`); audited.

    The saga becomes running (forward) or compensating again and the rest of the step's
    phase is re-published as a new generation; steps are idempotent, so whatever already
    happened is not done twice. A step that needed attention starts a fresh budget of
    sweeper re-publishes. Raises `SagaInstance.DoesNotExist` for an unknown saga.
    """
    now = timezone.now()
    with transaction.atomic(using=DB):
        saga = store.lock_saga(saga_id)
        if saga is None:
            raise SagaInstance.DoesNotExist(f"no saga {saga_id}")
        status_before, fingerprint = saga.status, saga.failure_fingerprint
        plan = saga_retry_check(saga, now=now)
        detail, step = plan.detail, plan.step
        if step is not None:
            if saga.status == SagaStatus.NEEDS_ATTENTION:
                saga.mark_resumed(step.phase)
                step.republished = 0
            saga_republish_from(saga, step, now=now)
            detail = f"{detail} (generation {saga.generation})"
        elif plan.finish:
            saga.mark_finished(plan.finish, at=now)
            saga.save(using=DB)
        return _audit(
            saga,
            action=SagaAuditEntry.Action.RETRY,
            user=user,
            done=plan.possible,
            detail=detail,
            status_before=status_before,
            fingerprint=fingerprint,
        )


def saga_compensate(*, saga_id: uuid.UUID | str, user: Any) -> SagaAuditEntry:
    """Compensate a saga now, before its pivot (`saga_compensate_check`); audited.

    Takes the pivot's lock first (the definition's `pivot_guard`: for an order, its row,
    as `orders.confirm` does), then the saga's, so a pivot in flight either committed
    (refused here) or will find the saga compensating and refuse. The order then fails
    and the customer is told, as for any failure. Raises `SagaInstance.DoesNotExist`.
    """
    fields = ("id", "definition", "definition_version", "order_id")
    found = SagaInstance.objects.using(DB).filter(id=saga_id).only(*fields).first()
    if found is None:
        raise SagaInstance.DoesNotExist(f"no saga {saga_id}")
    definition = get_definition(found.definition, found.definition_version)
    with transaction.atomic(using=DB):
        guard_refusal = definition.pivot_guard(saga=found) if definition.pivot_guard else None
        saga, steps = store.lock_saga_with_steps(saga_id)
        if saga is None:
            raise SagaInstance.DoesNotExist(f"no saga {saga_id}")
        status_before, fingerprint = saga.status, saga.failure_fingerprint
        refusal = saga_compensate_check(saga) or guard_refusal
        if refusal is None:
            failure_step = saga.current_step or saga.failure_step
            # A saga that needed attention at its pivot compensates like a running one.
            saga.mark_resumed(StepPhase.FORWARD)
            saga_begin_compensation(
                saga,
                outcome=OUTCOME_FAILED,
                failure_step=failure_step,
                failure_type=OPERATOR_COMPENSATED,
                reason=OPERATOR_COMPENSATED_REASON,
                steps=steps.values(),
            )
        detail = (
            f"compensating from {saga.failure_step} (generation {saga.generation}): every step up to the pivot is "
            "undone, the order fails and the customer is told"
            if refusal is None
            else refusal
        )
        return _audit(
            saga,
            action=SagaAuditEntry.Action.COMPENSATE,
            user=user,
            done=refusal is None,
            detail=detail,
            status_before=status_before,
            fingerprint=fingerprint,
        )


def saga_retry_by_fingerprint(
    *, fingerprints: Iterable[str], user: Any, limit: int | None = None
) -> tuple[list[SagaAuditEntry], int]:
    """Retry every saga that needs attention for one of these failures (exception type and
    step), oldest first, at most `limit` (SAGA_BULK_RETRY_LIMIT) in one call, each in its
    own short transaction. Returns the audit entries and how many such sagas remain."""
    limit = limit or settings.SAGA_BULK_RETRY_LIMIT
    candidates = list(
        sagas_with_fingerprints(fingerprints)
        .filter(status=SagaStatus.NEEDS_ATTENTION)
        .order_by("created_at")
        .values_list("id", flat=True)[: limit + 1]
    )
    entries = [saga_retry(saga_id=saga_id, user=user) for saga_id in candidates[:limit]]
    remaining = 0
    if len(candidates) > limit:
        remaining = sagas_with_fingerprints(fingerprints).filter(status=SagaStatus.NEEDS_ATTENTION).count()
    return entries, remaining
