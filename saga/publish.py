"""Publishing a saga's chains: a new saga's forward chain, its compensation chain when it
fails or is cancelled before its pivot, and the rest of a phase again (the sweeper, an
operator's retry). Each publishes only once the `orders` transaction that wrote the steps
commits, so a chain never runs for a saga that rolled back.
"""

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerUnavailable

from common.db import insert_together

from . import broker_latch
from .definition import SagaDefinition, Step, get_definition
from .engine import build_chain, task_id_for
from .models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus
from .store import DB
from .store import save as store_save
from .tracing import saga_trace_context, trace_carrier, trace_id_of

logger = logging.getLogger(__name__)

# What a compensation phase is for (the saga's `outcome`, and its context's).
OUTCOME_FAILED = "failed"
OUTCOME_CANCELLED = "cancelled"


class _RideOut:
    """Celery's publish retries for one publish, bounded (kombu calls it before each retry).

    A publish rides out a broker restart of a few seconds, in the web's request too:
    failing at once there sent every order of a short restart to the sweeper
    (docs/DECISIONS.md). But Celery's own policy retries for 36 s after a connection broke,
    and every thread publishing meanwhile waits as long. So once this publish has failed
    for SAGA_BROKER_PROBE_SECONDS, the process's latch goes down (the publishes after it
    are skipped, saga.broker_latch), and past SAGA_PUBLISH_RIDE_OUT_SECONDS this one gives
    up too.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.suspected = False

    def __call__(self, error: BaseException, interval: float) -> None:
        failing = time.monotonic() - self.started
        if not self.suspected and failing >= settings.SAGA_BROKER_PROBE_SECONDS:
            self.suspected = True
            broker_latch.LATCH.failed(error)
        if failing + interval > settings.SAGA_PUBLISH_RIDE_OUT_SECONDS:
            raise BrokerUnavailable(f"no broker for {failing:.1f} s ({type(error).__name__}: {error})") from error


def _publish(
    signature: Any, saga_id: uuid.UUID, first_task_id: str, trace_context: Mapping[str, str] | None = None
) -> None:
    # Not raising keeps the already-committed request intact: the step stays running and
    # the recovery sweeper publishes it again.
    if broker_latch.LATCH.down():
        # A publish found the broker away and it has not answered since: trying would hold
        # this thread for the retries (the web's request) only to fail, most likely.
        logger.info("saga %s: the broker is away; the sweeper publishes its next steps", saga_id)
        _due_now(saga_id, first_task_id, never_sent=True)
        return
    ride_out = _RideOut()
    try:
        # In the order's own trace, whoever publishes (sweeper, operator, cancel): saga.tracing.
        with saga_trace_context(trace_context):
            signature.apply_async(retry_policy={**settings.CELERY_TASK_PUBLISH_RETRY_POLICY, "errback": ride_out})
    except BrokerUnavailable as error:
        # A broker outage fails every publish for its duration: one line each, not a
        # traceback, and none after this one until the broker answers (saga.broker_latch).
        logger.warning(
            "saga %s: publishing its next steps failed (%s: %s); the sweeper publishes them again",
            saga_id,
            type(error).__name__,
            error,
        )
        broker_latch.LATCH.failed(error)
        _due_now(saga_id, first_task_id)
    except Exception:
        logger.exception("saga %s: publishing its next steps failed; the sweeper publishes them again", saga_id)
        _due_now(saga_id, first_task_id)
    else:
        if ride_out.suspected:
            broker_latch.LATCH.heard()  # it rode the outage out: the broker is back


def _due_now(saga_id: uuid.UUID, task_id: str, *, never_sent: bool = False) -> None:
    """Bring the deadline of the step `task_id` (running, as its chain was published) to
    now, so that the next sweep looks for its message instead of waiting out the whole
    segment's deadline (a minute and a half for a new order's first segment). The sweep
    asks the broker and the workers where the chain is before it publishes again (a publish
    that raised may still have reached the broker), exactly as for any stalled step; only
    its timing changes. One statement, only when a publish has failed: nothing on the hot
    path. The publish has already failed after its ride-out (_RideOut), or was skipped, so a
    database that fails too is only logged; the old deadline then stands.

    `never_sent`: the publish was not even tried (saga.broker_latch), so no message of it
    can be anywhere: its step is also marked unqueued (`queued_at` empty), and the sweep
    publishes it again without asking the broker and the workers first
    (`SagaStep.never_sent`). Right after a broker restart that look can give a step
    seconds more for nothing.

    Not for a chain that was itself a re-publish (the sweeper's, an operator's retry): its
    deadline doubles with each one and its budget is SAGA_REPUBLISH_BUDGET, so a broker
    that keeps failing publishes would otherwise spend the whole budget in as many sweeps,
    and fail an order that never started. Those keep their paced deadline.
    """
    try:
        SagaStep.objects.using(DB).filter(
            saga_id=saga_id,
            celery_task_id=task_id,
            status=StepStatus.RUNNING,
            republished=0,
            deadline_at__gt=timezone.now(),
        ).update(deadline_at=timezone.now(), **({"queued_at": None} if never_sent else {}))
    except Exception:
        logger.exception("saga %s: its step %s keeps its deadline", saga_id, task_id)


def publish_on_commit(steps: tuple[Step, ...], saga: SagaInstance) -> None:
    """Publish `steps` as one chain of `saga`'s current generation, from its context, once
    the `orders` transaction commits (at once, if none is open)."""
    # A chain is one phase: forward steps, or the compensation plan (common.signing binds it).
    forward = steps[0] in get_definition(saga.definition, saga.definition_version).steps
    phase = StepPhase.FORWARD if forward else StepPhase.COMPENSATION
    signature = build_chain(steps, saga_id=saga.id, generation=saga.generation, phase=phase, context=saga.context)
    first_task_id = task_id_for(saga.id, steps[0].name, saga.generation)
    transaction.on_commit(partial(_publish, signature, saga.id, first_task_id, saga.trace_context), using=DB)


def segment_deadline(definition: SagaDefinition, plan: tuple[Step, ...], index: int) -> int:
    """Seconds a chain published from `plan[index]` may take to reach its next record.

    Nothing reports between records (saga.engine): the pivot records itself, and the
    chain's last step reports. The store therefore gives the whole segment the sum of
    its steps' deadlines, on the segment's first step.
    """
    stop = len(plan) - 1
    if plan is definition.steps and index <= definition.pivot_index:
        stop = definition.pivot_index
    return sum(step.deadline_seconds for step in plan[index : stop + 1])


def phase_plan(definition: SagaDefinition, phase: str) -> tuple[Step, ...]:
    """The steps of `phase` (forward, or compensation) in `definition`, in order."""
    return definition.steps if phase == StepPhase.FORWARD else definition.compensation_steps()


def start_running(
    step: SagaStep, *, saga: SagaInstance, deadline_seconds: float, now: datetime, queued_at: datetime | None = None
) -> None:
    """Mark `step` running in `saga`'s current generation: published now, or when the
    previous step finished (`queued_at`, which may be before the coordinator heard of it:
    queue wait is measured from there)."""
    step.mark_running(
        task_id=task_id_for(saga.id, step.name, saga.generation),
        queued_at=queued_at or now,
        deadline_at=now + timedelta(seconds=deadline_seconds),
    )


def saga_start(*, definition: SagaDefinition, order_id: uuid.UUID, context: Mapping[str, Any]) -> SagaInstance:
    """Create the saga and its forward steps, and publish its chain when the transaction commits.
    Returns the saga with its steps (as written) in its `steps` prefetch cache.

    Precondition: inside `transaction.atomic(using="orders")`, in the same transaction that
    created the order, so an order never exists without its saga (and the chain is never
    published for an order that rolled back).
    """
    saga = saga_new(definition=definition, order_id=order_id, context=context)
    insert_together(DB, [saga], saga._prefetched_objects_cache["steps"])  # type: ignore[attr-defined]  # Django's prefetch cache
    saga_publish(saga)
    return saga


def saga_new(*, definition: SagaDefinition, order_id: uuid.UUID, context: Mapping[str, Any]) -> SagaInstance:
    """A new saga of `definition` for `order_id` and its forward steps, not yet written: the
    caller writes them (with its order, in one statement: common.db.insert_together), then
    calls `saga_publish`. The steps are in the saga's `steps` prefetch cache."""
    saga_id = uuid.uuid4()
    now = timezone.now()
    saga = SagaInstance(
        id=saga_id,
        definition=definition.name,
        # Pinned: every later step, compensation and retry of this saga uses this version.
        definition_version=definition.version,
        order_id=order_id,
        status=SagaStatus.RUNNING,
        current_step=definition.steps[0].name,
        context={**context, "saga_id": str(saga_id), "order_id": str(order_id)},
        # The placing request's trace: every chain of this saga is published in it.
        trace_context=(carrier := trace_carrier()),
        trace_id=trace_id_of(carrier),
    )
    steps = [
        SagaStep(saga=saga, phase=StepPhase.FORWARD, position=i, name=spec.name, task_name=spec.task)
        for i, spec in enumerate(definition.steps)
    ]
    start_running(steps[0], saga=saga, deadline_seconds=segment_deadline(definition, definition.steps, 0), now=now)
    saga._prefetched_objects_cache = {"steps": steps}  # type: ignore[attr-defined]  # Django's prefetch cache
    return saga


def saga_publish(saga: SagaInstance) -> None:
    """Publish a new saga's forward chain once the `orders` transaction that wrote it
    commits (at once, if none is open: the statement that wrote it has committed)."""
    publish_on_commit(get_definition(saga.definition, saga.definition_version).steps, saga)


def saga_begin_compensation(
    saga: SagaInstance,
    *,
    outcome: str,
    failure_step: str,
    failure_type: str,
    reason: str,
    steps: Iterable[SagaStep] | None = None,
    also_save: Sequence[SagaStep] = (),
    failure_attested: bool = False,
) -> None:
    """Switch a running saga to compensating and publish its compensations on commit.

    `failure_attested`: whether `failure_type` is what the failing step itself sealed
    (saga.failure). Only then may a final failure (a declined card) skip compensations.

    `reason` is the raw error, kept on the saga for operators; the compensation's context
    carries instead the customer's fixed sentence for `failure_type` (the definition's
    `customer_reason`), which is all the order and the email ever show.

    `steps`, if the caller holds them, are all the saga's steps as read under its lock
    (store.lock_saga_with_steps); otherwise they are read here. The forward steps whose
    outcome is now unknown are marked among them, and written with the saga and the
    caller's changed rows (`also_save`) in one statement.

    Precondition: inside `transaction.atomic(using="orders")` holding `select_for_update`
    on `saga`, whose status is running.
    """
    if saga.status != SagaStatus.RUNNING:
        raise ValueError(f"saga {saga.id} is {saga.status}, not running")
    if saga.pivot_committed_at is not None:
        raise ValueError(f"saga {saga.id} is past its pivot: it cannot compensate")
    definition = get_definition(saga.definition, saga.definition_version)
    plan = definition.compensation_steps()
    # After a failure its step records as final (a declined card), the compensations of
    # that step and the ones after it have nothing to do: the chain starts after them.
    first = definition.compensations_not_needed(failure_step, failure_type) if failure_attested else 0
    now = timezone.now()
    saga.mark_compensating(outcome=outcome, failure_step=failure_step, failure_type=failure_type, reason=reason)
    saga.generation += 1
    customer = definition.customer_reason(failure_type) if definition.customer_reason else ""
    saga.context = {**saga.context, "outcome": outcome, "failure_reason": customer}

    # The chain may be at any step of its segment (the store hears of it at the pivot and
    # at the end): from the running step to the pivot, what happened is unknown until a
    # report says (a record in the timeline, a refusal). The compensations cover them all.
    if steps is None:
        steps = SagaStep.objects.using(DB).filter(saga_id=saga.id, phase=StepPhase.FORWARD)
    forward = sorted((s for s in steps if s.phase == StepPhase.FORWARD), key=lambda s: s.position)
    running_at = next((s.position for s in forward if s.status == StepStatus.RUNNING), None)
    changed = list(also_save)
    for s in forward:
        if (
            running_at is not None
            and running_at <= s.position <= definition.pivot_index
            and s.status in (StepStatus.RUNNING, StepStatus.PENDING)
        ):
            s.mark_unknown()
            if s not in changed:
                changed.append(s)
    rows = [
        SagaStep(saga=saga, phase=StepPhase.COMPENSATION, position=i, name=spec.name, task_name=spec.task)
        for i, spec in enumerate(plan)
    ]
    for row in rows[:first]:
        row.mark_not_needed(at=now)
    if first < len(plan):
        saga.current_step = plan[first].name
        start_running(rows[first], saga=saga, deadline_seconds=segment_deadline(definition, plan, first), now=now)
    else:
        # Nothing to undo and nothing to run after it (a definition without after-steps).
        saga.mark_finished(SagaStatus.COMPENSATED, at=now)
    store_save(saga, changed)
    insert_together(DB, rows)  # one statement; Django's bulk_create cost more CPU than the insert
    if first < len(plan):
        publish_on_commit(plan[first:], saga)


def saga_republish_from(saga: SagaInstance, step: SagaStep, *, now: datetime | None = None) -> None:
    """Publish the rest of the step's phase again, from this step, as a new generation.

    Safe whether or not the earlier messages are still somewhere: every step is
    idempotent, so a duplicate returns its recorded result. The new deadline doubles
    with each re-publish, so a slow participant is not flooded.

    Precondition: inside `transaction.atomic(using="orders")` holding `select_for_update`
    on `saga`.
    """
    now = now or timezone.now()
    definition = get_definition(saga.definition, saga.definition_version)
    plan = phase_plan(definition, step.phase)
    saga.generation += 1
    saga.current_step = step.name
    saga.save(using=DB)
    step.mark_republished(
        task_id=task_id_for(saga.id, step.name, saga.generation),
        at=now,
        segment_seconds=segment_deadline(definition, plan, step.position),
    )
    step.save(using=DB)
    publish_on_commit(plan[step.position :], saga)
