"""The coordinator's writes. Every function changes one saga under a row lock on it.

Messages that reach these functions may be duplicated or late (see ARCHITECTURE.md);
each function is therefore a state transition that is a no-op when the saga or step is
already past it.
"""

import contextlib
import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from celery.result import AsyncResult
from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.module_loading import import_string

from common.db import from_row, insert_together, update_together
from common.exceptions import InvalidMessage
from common.signing import seal_verify
from common.steps import MAX_TIMELINE
from orders_project.celery import app

from .definition import SagaDefinition, Step, get_definition
from .engine import build_chain, step_name_of, task_id_for
from .models import SagaAuditEntry, SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus
from .selectors import sagas_with_fingerprints
from .tracing import saga_trace_context, trace_carrier, trace_id_of

logger = logging.getLogger(__name__)

DB = "orders"
RESULTS_DB = "default"  # the result backend (django-celery-results)
OUTCOME_FAILED = "failed"
OUTCOME_CANCELLED = "cancelled"


def _publish(signature: Any, saga_id: uuid.UUID, trace_context: Mapping[str, str] | None = None) -> None:
    # A failure to publish leaves the step running with a deadline: the recovery
    # sweeper re-publishes it. Not raising keeps the already-committed request intact.
    try:
        # In the order's own trace, whoever publishes (sweeper, operator, cancel): saga.tracing.
        with saga_trace_context(trace_context):
            signature.apply_async()
    except Exception:
        logger.exception("saga %s: publishing its next steps failed; the sweeper will retry", saga_id)


def _publish_on_commit(steps: tuple[Step, ...], saga: SagaInstance) -> None:
    # A chain is one phase: forward steps, or the compensation plan (common.signing binds it).
    forward = steps[0] in get_definition(saga.definition, saga.definition_version).steps
    phase = StepPhase.FORWARD if forward else StepPhase.COMPENSATION
    signature = build_chain(steps, saga_id=saga.id, generation=saga.generation, phase=phase, context=saga.context)
    transaction.on_commit(partial(_publish, signature, saga.id, saga.trace_context), using=DB)


def _segment_deadline(definition: SagaDefinition, plan: tuple[Step, ...], index: int) -> int:
    """Seconds a chain published from `plan[index]` may take to reach its next record.

    Nothing reports between records (saga.engine): the pivot records itself, and the
    chain's last step reports. The store therefore gives the whole segment the sum of
    its steps' deadlines, on the segment's first step.
    """
    stop = len(plan) - 1
    if plan is definition.steps and index <= definition.pivot_index:
        stop = definition.pivot_index
    return sum(step.deadline_seconds for step in plan[index : stop + 1])


def _mark_running(
    step: SagaStep,
    *,
    deadline_seconds: float,
    now: datetime,
    generation: int,
    saga_id: uuid.UUID,
    queued_at: datetime | None = None,
) -> None:
    step.status = StepStatus.RUNNING
    # The chain published this step when the previous one finished, which may be before
    # the coordinator heard of it: queue wait is measured from there.
    step.queued_at = queued_at or now
    step.deadline_at = now + timedelta(seconds=deadline_seconds)
    step.celery_task_id = task_id_for(saga_id, step.name, generation)


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
    deadline = _segment_deadline(definition, definition.steps, 0)
    _mark_running(steps[0], deadline_seconds=deadline, now=now, generation=saga.generation, saga_id=saga.id)
    saga._prefetched_objects_cache = {"steps": steps}  # type: ignore[attr-defined]  # Django's prefetch cache
    return saga


def saga_publish(saga: SagaInstance) -> None:
    """Publish a new saga's forward chain once the `orders` transaction that wrote it
    commits (at once, if none is open: the statement that wrote it has committed)."""
    _publish_on_commit(get_definition(saga.definition, saga.definition_version).steps, saga)


def _lock_saga(saga_id: uuid.UUID | str) -> SagaInstance | None:
    return SagaInstance.objects.using(DB).select_for_update().filter(id=saga_id).first()


def _apply_timing(step: SagaStep, meta: Mapping[str, Any], queued_at: datetime | None = None) -> None:
    started = parse_datetime(meta["started_at"]) if isinstance(meta.get("started_at"), str) else None
    finished = parse_datetime(meta["finished_at"]) if isinstance(meta.get("finished_at"), str) else None
    step.queued_at = step.queued_at or queued_at
    step.started_at = started or step.started_at
    step.finished_at = finished or step.finished_at or timezone.now()
    try:
        step.attempts = max(step.attempts, int(meta.get("attempt") or 1))
    except (TypeError, ValueError):
        step.attempts = max(step.attempts, 1)
    step.worker = str(meta.get("worker") or "")[:255]
    if isinstance(meta.get("task_id"), str):
        step.celery_task_id = meta["task_id"][:255]
    output = meta.get("output")
    step.result = output if isinstance(output, dict) else step.result


# A step whose outcome the store does not know yet: a record of it may still arrive.
UNSETTLED = (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.UNKNOWN, StepStatus.CANCELLED)


STEP_FIELDS = ["status", "queued_at", "started_at", "finished_at", "deadline_at", "attempts", "worker", "result"]


def _save_steps(rows: Iterable[SagaStep]) -> None:
    """Write the timeline fields of `rows` in one statement. Precondition: the saga's row
    lock is held."""
    _save(None, rows)


# The step columns the coordinator writes: its timeline.
STEP_WRITTEN = (
    "status",
    "queued_at",
    "started_at",
    "finished_at",
    "deadline_at",
    "attempts",
    "worker",
    "result",
    "celery_task_id",
)


def _save(saga: SagaInstance | None, rows: Iterable[SagaStep], fields: Iterable[str] | None = None) -> None:
    """Write the timeline of the steps `rows` and the saga's `fields` (all of them by
    default; `updated_at` always) in one prepared statement (common.db.update_together).

    Django's bulk_update builds a CASE expression per field and row, and a save per model
    is a statement each: on the coordinator's every record that cost more CPU than the
    queries (BENCHMARKS.md). Precondition: the saga's row lock is held.
    """
    _save_many([saga] if saga is not None else [], rows, fields)


def _save_many(sagas: Sequence[SagaInstance], rows: Iterable[SagaStep], fields: Iterable[str] | None = None) -> None:
    """`_save` for several sagas at once. Precondition: every saga's row lock is held."""
    update_together(DB, (list(rows), STEP_WRITTEN), (list(sagas), fields))


def _lock_saga_with_steps(
    saga_id: uuid.UUID | str, *, phase: str | None = None
) -> tuple[SagaInstance | None, dict[str, SagaStep]]:
    """The saga, locked (FOR UPDATE), and its steps (of `phase`, or all) by name: one
    statement where the ORM takes two. Precondition: inside `transaction.atomic(using="orders")`."""
    found = _lock_sagas_with_steps([saga_id], phase=phase)
    return next(iter(found.values()), (None, {}))


def _lock_sagas_with_steps(
    saga_ids: Sequence[uuid.UUID | str], *, phase: str | None = None, skip_locked: bool = False
) -> dict[uuid.UUID, tuple[SagaInstance, dict[str, SagaStep]]]:
    """Each of the sagas, locked, with its steps (of `phase`, or all) by name, in one
    statement. Rows are locked in id order, so two callers never wait on each other in a
    cycle; with `skip_locked`, a saga another transaction holds is left out (its caller
    comes back for it). Precondition: inside `transaction.atomic(using="orders")`."""
    connection = connections[DB]
    quote = connection.ops.quote_name
    saga_fields, step_fields = SagaInstance._meta.concrete_fields, SagaStep._meta.concrete_fields
    columns = [f"s.{quote(str(f.column))}" for f in saga_fields] + [f"t.{quote(str(f.column))}" for f in step_fields]
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(columns)} FROM {quote(SagaInstance._meta.db_table)} AS s "
            f"LEFT JOIN {quote(SagaStep._meta.db_table)} AS t ON t.saga_id = s.id"
            + (" AND t.phase = %s" if phase else "")
            + " WHERE s.id = ANY(%s::uuid[]) ORDER BY s.id, t.phase, t.position FOR UPDATE OF s"
            + (" SKIP LOCKED" if skip_locked else ""),
            [*([phase] if phase else []), [str(i) for i in saga_ids]],
        )
        rows = cursor.fetchall()
    split = len(saga_fields)
    found: dict[uuid.UUID, tuple[SagaInstance, dict[str, SagaStep]]] = {}
    for row in rows:
        saga_id = row[0]
        if saga_id not in found:
            found[saga_id] = (from_row(SagaInstance, saga_fields, row[:split], DB), {})
        saga, steps = found[saga_id]
        if row[split] is not None:
            step = from_row(SagaStep, step_fields, row[split:], DB)
            step._state.fields_cache["saga"] = saga
            steps[step.name] = step
    if phase is None:
        for saga, steps in found.values():
            # What prefetch_related("steps") would leave: saga.steps.all() reads no rows.
            saga._prefetched_objects_cache = {"steps": list(steps.values())}  # type: ignore[attr-defined]
    return found


def _record_timeline(saga: SagaInstance, steps: Mapping[str, SagaStep], timeline: Any) -> list[SagaStep]:
    """Mark the steps named in a chain's `_steps` timeline succeeded, with their timing,
    and take their outputs into the saga's context (the caller saves the saga).

    Each entry is a step that committed (a participant appends it only on success): a
    step whose outcome the store did not know (pending, running, unknown, or cancelled
    while in flight) becomes succeeded with the participant's attempt and times. A step
    already succeeded gets only timing it lacks (the pivot records itself before its own
    entry exists); one that failed in another attempt keeps its status. Returns the rows
    changed. Precondition: the saga's row lock is held.
    """
    if not isinstance(timeline, list):
        return []
    changed: dict[str, SagaStep] = {}
    previous_finished: datetime | None = None
    for meta in timeline[-MAX_TIMELINE:]:
        if not isinstance(meta, dict):
            continue
        name = step_name_of(meta.get("task_id"), saga.id)
        step = steps.get(name) if name else None
        finished = parse_datetime(meta["finished_at"]) if isinstance(meta.get("finished_at"), str) else None
        if step is not None and isinstance(meta.get("output"), dict):
            # Later steps need what this one produced (the amount, the outcome): a
            # re-publish (sweeper, operator retry) starts from the saga's context.
            saga.context = {**saga.context, **{k: v for k, v in meta["output"].items() if not k.startswith("_")}}
        if step is not None:
            if step.status in UNSETTLED:
                step.status, step.deadline_at = StepStatus.SUCCEEDED, None
                step.finished_at = None  # a cancel's time is not the step's
                _apply_timing(step, meta, queued_at=previous_finished)
                changed[step.name] = step
            elif step.status == StepStatus.SUCCEEDED and (step.started_at is None or not step.worker):
                _apply_timing(step, meta, queued_at=previous_finished)
                changed[step.name] = step
        previous_finished = finished
    return list(changed.values())


def report_verified(result: Any, saga_id: uuid.UUID | str, step: str) -> dict[str, Any]:
    """A chain's record as the step that produced it sealed it; InvalidMessage otherwise.

    A report carries the step's output, sealed by that step (common.signing). A forged one
    (unsealed, altered, another saga's or another step's) would move a saga past a step
    that never ran: whoever can write the broker or the result backend must not do that.
    """
    if not isinstance(result, dict):
        raise InvalidMessage(f"step {step} of saga {saga_id}: the success report carries no step output")
    sealed_by = seal_verify(result)
    if result.get("saga_id") != str(saga_id) or sealed_by.saga_id != str(saga_id):
        raise InvalidMessage(f"step {step} of saga {saga_id}: the success report is for another saga")
    if sealed_by.step != step:
        raise InvalidMessage(f"step {step} of saga {saga_id}: the success report is the output of {sealed_by.step}")
    return result


def saga_reports_drain() -> int:
    """Record every chain whose last step has committed; the number recorded.

    A chain's last step stores its result, the chain's sealed record, in the result
    backend (saga.engine); nothing else stores a success there. One read finds the
    records of every active saga's chains (any generation: a superseded chain's record is
    a duplicate the store ignores); all are recorded as success reports in one transaction
    (one locked read of their sagas, one write), and the drained rows are deleted after.
    Safe to run concurrently (a saga another transaction holds is left for the next sweep)
    and again after a crash between the two: recording a report twice changes nothing.
    """
    from django_celery_results.models import TaskResult

    wanted: dict[str, tuple[SagaInstance, str]] = {}
    # A saga that needs attention too: a re-published copy of the step that stopped it may
    # yet succeed, and its record resumes the saga (saga_step_succeeded).
    active = [SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.NEEDS_ATTENTION]
    for saga in (
        SagaInstance.objects.using(DB)
        .filter(status__in=active)
        .only("id", "definition", "definition_version", "generation", "trace_context")
    ):
        definition = get_definition(saga.definition, saga.definition_version)
        for phase in (StepPhase.FORWARD, StepPhase.COMPENSATION):
            plan = _phase_plan(definition, phase)
            if plan:
                for generation in range(saga.generation + 1):
                    wanted[task_id_for(saga.id, plan[-1].name, generation)] = (saga, plan[-1].name)
    if not wanted:
        return 0
    rows = list(
        TaskResult.objects.using(RESULTS_DB)
        .filter(task_id__in=list(wanted), status="SUCCESS")
        .values_list("task_id", "result")
    )
    reports: list[tuple[str, SagaInstance, str, dict[str, Any]]] = []
    done: list[str] = []  # drained rows: recorded, or not what their step sealed
    for task_id, stored in rows:
        saga, step_name = wanted[task_id]
        try:
            reports.append((task_id, saga, step_name, report_verified(json.loads(stored), saga.id, step_name)))
        except (InvalidMessage, ValueError, TypeError) as error:
            # Not what the step sealed: someone wrote the result backend. Dropped with the rest.
            logger.error("saga %s: the stored record of %s is not its step's: %s; dropped", saga.id, task_id, error)
            done.append(task_id)
    recorded = 0
    if reports:
        # Every saga with a record, in one transaction: one read of them (locked) and one
        # write, instead of a lock, a read and a write per saga. A saga another transaction
        # holds (an operator, a failure report) is skipped; its record waits for the next sweep.
        with transaction.atomic(using=DB):
            locked = _lock_sagas_with_steps([saga.id for _, saga, _, _ in reports], skip_locked=True)
            changed: dict[uuid.UUID, dict[str, SagaStep]] = {}
            for task_id, saga, step_name, report in reports:
                if saga.id not in locked:
                    continue
                current, steps = locked[saga.id]
                try:
                    with saga_trace_context(saga.trace_context, why="saga.record"):
                        rows_changed = _apply_success(current, steps, step_name, report)
                except Exception:
                    # One saga's bug must not hold back every other saga's record: this one
                    # is left out of the write, and its record stays for the next sweep.
                    logger.exception("saga %s: recording %s failed; left for the next sweep", saga.id, task_id)
                    changed.pop(saga.id, None)
                    locked.pop(saga.id)
                    continue
                if rows_changed is not None:
                    changed.setdefault(saga.id, {}).update(rows_changed)
                done.append(task_id)
                recorded += 1
            _save_many(
                [locked[saga_id][0] for saga_id in changed],
                [row for rows_of in changed.values() for row in rows_of.values()],
            )
    if done:
        with connections[RESULTS_DB].cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {TaskResult._meta.db_table} WHERE task_id = ANY(%s) AND status = 'SUCCESS'", [done]
            )
    return recorded


def saga_step_succeeded(*, saga_id: uuid.UUID | str, step_name: str, result: Mapping[str, Any]) -> None:
    """Record that a chain's reporting step committed, with the timeline of the steps
    before it, and move the saga to its next step or its end.

    The chain itself has already published any next step; this only keeps the store in
    step with it. Idempotent: a duplicate report of a succeeded step changes nothing.
    """
    with transaction.atomic(using=DB):
        saga, steps = _lock_saga_with_steps(saga_id)
        if saga is None:
            logger.error("step %s succeeded for unknown saga %s; ignored", step_name, saga_id)
            return
        changed = _apply_success(saga, steps, step_name, result)
        if changed is not None:
            _save(saga, changed.values())


def _apply_success(
    saga: SagaInstance, steps: Mapping[str, SagaStep], step_name: str, result: Mapping[str, Any]
) -> dict[str, SagaStep] | None:
    """Apply a success report to `saga` and its `steps` in memory; the rows to write (the
    saga always), or None when it changes nothing (a duplicate). Precondition: the saga's
    row lock is held, and the caller writes the saga and the rows returned."""
    step = steps.get(step_name)
    if step is None:
        logger.error("saga %s has no step %s; success report ignored", saga.id, step_name)
        return None
    result = dict(result or {})
    timeline = result.pop("_steps", None)
    already = step.status == StepStatus.SUCCEEDED and step.started_at is not None
    changed = {s.name: s for s in _record_timeline(saga, steps, timeline)}
    entries = [m for m in timeline if isinstance(m, dict)] if isinstance(timeline, list) else []
    own = next((m for m in reversed(entries) if step_name_of(m.get("task_id"), saga.id) == step.name), None)
    if step.status == StepStatus.FAILED and own is not None:
        # A copy of a step that failed for good succeeded after all (a duplicate that
        # outlived the breaker): it did commit, so the store says so, with that copy's
        # attempt and times. Its compensation, already under way, undoes it.
        logger.warning("saga %s: %s succeeded after it had failed for good", saga.id, step.name)
        step.status, step.deadline_at, step.finished_at = StepStatus.SUCCEEDED, None, None
        before = entries[: entries.index(own)]
        queued = before[-1].get("finished_at") if before else None
        _apply_timing(step, own, queued_at=parse_datetime(queued) if isinstance(queued, str) else None)
        changed[step.name] = step
    elif step.status in UNSETTLED:
        # A report without its own timeline entry (a foreign or old-format message).
        step.status, step.deadline_at = StepStatus.SUCCEEDED, None
        step.finished_at = step.finished_at or timezone.now()
        changed[step.name] = step
    if already and not changed:
        return None  # a duplicate report
    now = timezone.now()
    # Later steps need what this one produced (e.g. the amount); a re-publish (sweeper,
    # operator retry) starts from this context.
    saga.context = {**saga.context, **{k: v for k, v in result.items() if not k.startswith("_")}}

    definition = get_definition(saga.definition, saga.definition_version)
    plan = _phase_plan(definition, step.phase)
    active, finished = (
        (SagaStatus.RUNNING, SagaStatus.COMPLETED)
        if step.phase == StepPhase.FORWARD
        else (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
    )
    if (
        saga.status == SagaStatus.NEEDS_ATTENTION
        and saga.failure_step == step.name
        and step.status == StepStatus.SUCCEEDED
    ):
        # A re-published copy of the step that failed for good has now succeeded: the
        # reason for stopping is gone, so the saga carries on where it was.
        logger.warning("saga %s: %s succeeded after all; resuming", saga.id, step.name)
        saga.status = active
    if saga.status == active and not already:
        if step.position + 1 == len(plan):
            # The last step of a chain runs only after every earlier one committed, but
            # one whose record is missing (a chain re-published midway) is not shown
            # succeeded without its attempt and times: its outcome was not recorded.
            saga.status = finished
            saga.current_step = ""
            # When it ended, not when the store heard of it (reports are drained).
            saga.finished_at = step.finished_at or now
            for earlier in steps.values():
                if earlier.phase == step.phase and earlier.status in (StepStatus.PENDING, StepStatus.RUNNING):
                    earlier.status, earlier.deadline_at = StepStatus.UNKNOWN, None
                    changed[earlier.name] = earlier
        else:
            nxt = plan[step.position + 1]
            nxt_row = steps[nxt.name]
            # Reports may arrive out of order: a late one never rewinds a step that
            # already started or finished.
            if nxt_row.status == StepStatus.PENDING:
                _mark_running(
                    nxt_row,
                    deadline_seconds=_segment_deadline(definition, plan, step.position + 1),
                    now=now,
                    generation=saga.generation,
                    saga_id=saga.id,
                    queued_at=step.finished_at,
                )
                saga.current_step = nxt.name
                changed[nxt_row.name] = nxt_row
    return changed


@dataclass(frozen=True)
class StoredFailure:
    error_type: str
    error: str
    timeline: Any = None  # the `_steps` the failed task received: the steps before it


def _failure_from_backend(task_id: str) -> StoredFailure | None:
    """The failure of a task as its worker stored it (with its arguments: the result
    backend is extended); None when the result backend has no failure for that task id."""
    try:
        result: AsyncResult = AsyncResult(task_id, app=app)
        exc = result.result if result.state == "FAILURE" else None
    except Exception as error:  # a corrupt or foreign record must not stop compensation
        return StoredFailure(type(error).__name__, f"could not read the failure of task {task_id}: {error}")
    if not isinstance(exc, BaseException):
        return None
    timeline = None
    with contextlib.suppress(Exception):  # the timing is nice to have, never a reason to stop
        args = result.args or ()
        if isinstance(args, str):
            # A step stores its ids and timing as its argsrepr, not its context (common.steps).
            args = json.loads(args)
        if args and isinstance(args[0], dict):
            timeline = args[0].get("_steps")
    return StoredFailure(type(exc).__name__, str(exc), timeline)


def saga_step_failed(
    *,
    saga_id: uuid.UUID | str,
    step_name: str,
    task_id: str,
    timeline: Any = None,
    attempt: Any = None,
) -> None:
    """Handle a step that failed for good (its own retries exhausted or a business failure).

    Before the pivot: compensate. After the pivot, or in the compensation phase: the saga
    needs an operator. A forward step refused because the saga was already compensating
    is recorded `refused`, not failed. `timeline` is the failed task's `_steps` (the
    records of the steps before it) and `attempt` its attempt number and worker, as the
    failure report carries them (saga.timeline). Idempotent: a second errback for the same
    failure changes nothing.
    """
    failure = _failure_from_backend(task_id)
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
        saga = _lock_saga(saga_id)
        if saga is None:
            logger.error("step %s failed for unknown saga %s; ignored", step_name, saga_id)
            return
        steps = {s.name: s for s in saga.steps.all()}
        step = steps.get(step_name)
        if step is None:
            logger.error("saga %s has no step %s; failure report ignored", saga_id, step_name)
            return
        reported, current = _generation_of(task_id), _generation_of(step.celery_task_id)
        if step.status == StepStatus.RUNNING and reported is not None and current is not None and reported < current:
            # A copy that a re-publish superseded (e.g. the errback of the failure an operator
            # retried, repeated): the step's current copy reports for itself, and the sweeper
            # keeps watching its deadline.
            logger.warning("saga %s step %s: %s was superseded; its failure is ignored", saga_id, step_name, task_id)
            return
        if step.status != StepStatus.SUCCEEDED:
            # The steps before it in its chain committed (a chain runs a step only after the
            # previous one did); their records travelled with the failure report.
            recorded = _record_timeline(saga, steps, timeline if timeline is not None else failure.timeline)
            # One without a record (a failure reported from a worker's main process, after
            # a hard time limit) is not shown succeeded with no attempt or time: unknown.
            recorded += [
                s
                for s in steps.values()
                if s.phase == step.phase
                and s.position < step.position
                and s.status in (StepStatus.PENDING, StepStatus.RUNNING)
                and s not in recorded
            ]
            for earlier in recorded:
                if earlier.status != StepStatus.SUCCEEDED:
                    earlier.status, earlier.deadline_at = StepStatus.UNKNOWN, None
            if recorded:
                _save_steps(recorded)
                saga.save(using=DB, update_fields=["context", "updated_at"])
        if step.status == StepStatus.SUCCEEDED:
            # A late duplicate failed after the original committed: nothing to undo here.
            logger.warning("saga %s step %s: duplicate failed after success: %s", saga_id, step_name, error)
            return
        if step.status in (StepStatus.FAILED, StepStatus.REFUSED) and step.celery_task_id == task_id:
            return
        compensating = step.phase == StepPhase.FORWARD and saga.status != SagaStatus.RUNNING
        if compensating and step.status not in UNSETTLED:
            # A late copy of a step whose outcome is already recorded (its failure started
            # the compensation; or it was refused before) refused again: keep what happened.
            logger.warning("saga %s step %s: a late copy failed while compensating: %s", saga_id, step_name, error)
            return
        definition = get_definition(saga.definition, saga.definition_version)
        if (
            step.phase == StepPhase.FORWARD
            and saga.pivot_committed_at is not None
            and not definition.is_after_pivot(step_name)
        ):
            # A late copy of an earlier step failed after the pivot committed: the
            # original succeeded (the pivot needed it). Nothing to undo, and the step is
            # not shown failed: the chain's record still shows it succeeded.
            logger.warning("saga %s: %s failed after the pivot committed: %s", saga.id, step_name, error)
            return
        # Refused because the saga was already compensating (a cancel, a failure elsewhere):
        # the step did nothing, by design; it did not fail.
        step.status = StepStatus.REFUSED if compensating and error_type == "StepRefused" else StepStatus.FAILED
        # The step may never have been marked running (nothing reports mid-chain): the
        # failed task is the one this report names.
        step.celery_task_id = task_id
        step.finished_at = timezone.now()
        step.deadline_at = None
        step.last_error = f"{error_type}: {error}"
        try:
            step.attempts = max(step.attempts, int(attempt["attempt"]), 1)
        except (TypeError, KeyError, ValueError):
            step.attempts = max(step.attempts, 1)
        if isinstance(attempt, dict) and isinstance(attempt.get("worker"), str):
            step.worker = attempt["worker"][:255]
        step.save(using=DB)
        if compensating:
            # The chain stopped here: the steps after it that the cancel left unknown never ran.
            later = [
                s
                for s in steps.values()
                if s.phase == step.phase and s.position > step.position and s.status == StepStatus.UNKNOWN
            ]
            for s in later:
                s.status, s.finished_at = StepStatus.PENDING, None
            _save_steps(later)

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


def _generation_of(task_id: str) -> int | None:
    """The generation a task id names (saga.engine.task_id_for), or None."""
    _, separator, generation = task_id.rpartition("-g")
    return int(generation) if separator and generation.isdigit() else None


def _needs_attention(saga: SagaInstance, step_name: str, error_type: str, error: str) -> None:
    saga.status = SagaStatus.NEEDS_ATTENTION
    saga.failure_step = step_name
    saga.failure_type = error_type
    saga.failure_reason = error
    saga.save(using=DB)
    # Nothing runs on its own any more: keep the sweeper's scan to sagas it can act on.
    saga.steps.filter(status=StepStatus.RUNNING).update(deadline_at=None)


def saga_pivot_commit(
    *,
    saga_id: uuid.UUID | str,
    order_id: uuid.UUID | str,
    timeline: Any = None,
    output: Mapping[str, Any] | None = None,
) -> bool:
    """Record that the saga's pivot committed; False if the saga may no longer pass it (or
    is not the saga of `order_id`).

    Also records the steps before it from the chain's `timeline` (common.steps), marks
    the pivot succeeded (with its `output`, which the steps after it need) and the step
    after it running: the store learns the forward chain's progress here, in the pivot's
    transaction, with no message of its own.

    Precondition: inside the pivot step's own `transaction.atomic(using="orders")`, so the
    pivot and this record commit together. Takes the saga's row lock: the coordinator's
    decision to compensate takes it too, so exactly one of the two wins.
    """
    saga, steps = _lock_saga_with_steps(saga_id, phase=StepPhase.FORWARD)
    if saga is None or str(saga.order_id) != str(order_id) or saga.status != SagaStatus.RUNNING:
        return False
    if saga.pivot_committed_at is not None:
        return True
    now = timezone.now()
    saga.pivot_committed_at = now
    definition = get_definition(saga.definition, saga.definition_version)
    changed = {s.name: s for s in _record_timeline(saga, steps, timeline)}
    saga.context = {**saga.context, **dict(output or {})}
    pivot = steps.get(definition.pivot)
    if pivot is not None and pivot.status in (StepStatus.PENDING, StepStatus.RUNNING):
        last = [m for m in timeline or [] if isinstance(m, dict) and isinstance(m.get("finished_at"), str)]
        pivot.queued_at = pivot.queued_at or (parse_datetime(last[-1]["finished_at"]) if last else None)
        # The pivot commits now, in this transaction: its own record (worker, start) comes
        # with the chain's next report, which fills in what is left blank here.
        pivot.status, pivot.deadline_at, pivot.finished_at = StepStatus.SUCCEEDED, None, now
        pivot.started_at = pivot.started_at or now
        pivot.attempts = max(pivot.attempts, 1)
        pivot.result = dict(output or {})
        changed[pivot.name] = pivot
        for earlier in steps.values():
            if earlier.position < pivot.position and earlier.status in (StepStatus.PENDING, StepStatus.RUNNING):
                # Committed (the pivot needed it), but its record is missing: not shown
                # succeeded without its attempt and times.
                earlier.status, earlier.deadline_at = StepStatus.UNKNOWN, None
                changed[earlier.name] = earlier
        index = definition.pivot_index + 1
        if index < len(definition.steps):
            nxt = steps[definition.steps[index].name]
            if nxt.status == StepStatus.PENDING:
                deadline = _segment_deadline(definition, definition.steps, index)
                _mark_running(nxt, deadline_seconds=deadline, now=now, generation=saga.generation, saga_id=saga.id)
                # Its queue wait starts when the pivot's task returns, just after this commit.
                nxt.queued_at = now
                saga.current_step = nxt.name
                changed[nxt.name] = nxt
    _save(saga, changed.values(), fields=["pivot_committed_at", "current_step", "context"])
    return True


def saga_begin_compensation(
    saga: SagaInstance, *, outcome: str, failure_step: str, failure_type: str, reason: str
) -> None:
    """Switch a running saga to compensating and publish its compensations on commit.

    `reason` is the raw error, kept on the saga for operators; the compensation's context
    carries instead the customer's fixed sentence for `failure_type` (the definition's
    `customer_reason`), which is all the order and the email ever show.

    Precondition: inside `transaction.atomic(using="orders")` holding `select_for_update`
    on `saga`, whose status is running.
    """
    if saga.status != SagaStatus.RUNNING:
        raise ValueError(f"saga {saga.id} is {saga.status}, not running")
    if saga.pivot_committed_at is not None:
        raise ValueError(f"saga {saga.id} is past its pivot: it cannot compensate")
    definition = get_definition(saga.definition, saga.definition_version)
    plan = definition.compensation_steps()
    now = timezone.now()
    saga.status = SagaStatus.COMPENSATING
    saga.outcome = outcome
    saga.failure_step = failure_step
    saga.failure_type = failure_type
    saga.failure_reason = reason
    saga.generation += 1
    saga.current_step = plan[0].name
    customer = import_string(definition.customer_reason)(failure_type) if definition.customer_reason else ""
    saga.context = {**saga.context, "outcome": outcome, "failure_reason": customer}
    saga.save(using=DB)

    # The chain may be at any step of its segment (the store hears of it at the pivot and
    # at the end): from the running step to the pivot, what happened is unknown until a
    # report says (a record in the timeline, a refusal). The compensations cover them all.
    running = saga.steps.filter(phase=StepPhase.FORWARD, status=StepStatus.RUNNING).order_by("position").first()
    if running is not None:
        saga.steps.filter(
            phase=StepPhase.FORWARD,
            status__in=[StepStatus.RUNNING, StepStatus.PENDING],
            position__gte=running.position,
            position__lte=definition.pivot_index,
        ).update(status=StepStatus.UNKNOWN, deadline_at=None)
    rows = [
        SagaStep(saga=saga, phase=StepPhase.COMPENSATION, position=i, name=spec.name, task_name=spec.task)
        for i, spec in enumerate(plan)
    ]
    deadline = _segment_deadline(definition, plan, 0)
    _mark_running(rows[0], deadline_seconds=deadline, now=now, generation=saga.generation, saga_id=saga.id)
    SagaStep.objects.using(DB).bulk_create(rows)
    _publish_on_commit(plan, saga)


def _phase_plan(definition: SagaDefinition, phase: str) -> tuple[Step, ...]:
    return definition.steps if phase == StepPhase.FORWARD else definition.compensation_steps()


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
    plan = _phase_plan(definition, step.phase)
    saga.generation += 1
    saga.current_step = step.name
    saga.save(using=DB)
    step.republished += 1
    step.attempts += 1
    step.status = StepStatus.RUNNING
    step.queued_at = now
    step.finished_at = None
    step.celery_task_id = task_id_for(saga.id, step.name, saga.generation)
    segment = _segment_deadline(definition, plan, step.position)
    step.deadline_at = now + timedelta(seconds=segment * 2**step.republished)
    step.save(using=DB)
    _publish_on_commit(plan[step.position :], saga)


def _recover_stalled(saga: SagaInstance, step: SagaStep, now: datetime) -> str:
    definition = get_definition(saga.definition, saga.definition_version)
    if (
        saga.pivot_committed_at is not None
        and step.phase == StepPhase.FORWARD
        and definition.forward_index(step.name) <= definition.pivot_index
    ):
        # The pivot committed, so this step did too; only its report is late or lost, and
        # without it there is no attempt or time to show.
        step.status, step.deadline_at = StepStatus.UNKNOWN, None
        step.save(using=DB)
        return "succeeded"
    if step.republished < settings.SAGA_REPUBLISH_BUDGET:
        saga_republish_from(saga, step, now=now)
        return "republished"
    reason = f"{step.name} did not report back after {step.republished} re-publishes"
    step.status = StepStatus.FAILED
    step.last_error = f"StepTimedOut: {reason}"
    step.finished_at = now
    step.deadline_at = None
    step.save(using=DB)
    pivot_or_later = step.phase == StepPhase.FORWARD and definition.forward_index(step.name) >= definition.pivot_index
    if step.phase == StepPhase.FORWARD and saga.status == SagaStatus.RUNNING and not pivot_or_later:
        saga_begin_compensation(
            saga, outcome=OUTCOME_FAILED, failure_step=step.name, failure_type="StepTimedOut", reason=reason
        )
        return "compensating"
    # A pivot that never reported may have committed: an operator decides, not the sweeper.
    _needs_attention(saga, step.name, "StepTimedOut", reason)
    return "needs_attention"


def _segment_chain(saga: SagaInstance, step: SagaStep) -> list[tuple[str, str, float]]:
    """(task id, queue, deadline) of each step of the segment the store waits on, from `step`."""
    definition = get_definition(saga.definition, saga.definition_version)
    plan = _phase_plan(definition, step.phase)
    stop = len(plan) - 1
    if step.phase == StepPhase.FORWARD and step.position <= definition.pivot_index:
        stop = definition.pivot_index
    return [
        (task_id_for(saga.id, spec.name, saga.generation), _queue_of(spec.task), float(spec.deadline_seconds))
        for spec in plan[step.position : stop + 1]
    ]


def _queue_of(task_name: str) -> str:
    return task_name.split(".")[0]


def saga_sweep(*, now: datetime | None = None, batch: int | None = None) -> dict[str, int]:
    """Find running steps past their deadline and recover them; return what was done.

    Covers a lost or dropped message, a worker that died with its message, a chain whose
    publish failed after the order committed (its first step never started), and a
    stalled compensation. The scan reads only running steps past their deadline (a
    partial index), oldest first, in bounded batches; each saga is handled in its own
    short transaction and skipped if another sweeper holds it (SKIP LOCKED).

    First the watchdog returns the messages of workers that died holding them (Redis:
    saga.recovery.orphans_restore). Then, per stalled step, the broker and the workers are
    asked where its chain is (saga.recovery.chain_whereabouts: one broadcast and one look
    at each queue's oldest message for the whole batch): held by a live worker, or possibly
    still waiting behind older messages, it gets a new deadline without spending its
    budget (slow is not broken); otherwise its message is lost and it is recovered.
    """
    from . import recovery

    now = now or timezone.now()
    batch = batch or settings.SAGA_SWEEP_BATCH
    done: Counter[str] = Counter()
    try:
        done.update(recovery.orphans_restore())
    except Exception:  # the watchdog must never stop the sweep
        logger.warning("the unacknowledged-message watchdog failed", exc_info=True)
    # Before looking for stalled steps: a chain whose record waits here is not stalled.
    if recorded := saga_reports_drain():
        done["recorded"] += recorded
    done.update(_settlements_send(now))
    stalled = list(
        SagaStep.objects.using(DB)
        .filter(status=StepStatus.RUNNING, deadline_at__lt=now)
        .order_by("deadline_at")
        .values_list("saga_id", "name")[:batch]
    )
    if not stalled:
        return dict(done)
    wanted = set(stalled)
    chains = [
        _segment_chain(saga, step)
        for saga in SagaInstance.objects.using(DB).filter(id__in={s for s, _ in stalled}).prefetch_related("steps")
        for step in saga.steps.all()
        if (saga.id, step.name) in wanted
    ]
    view = recovery.broker_view(
        queues={queue for chain in chains for _, queue, _ in chain} | {"saga"},
        task_ids=sorted({task_id for chain in chains for task_id, _, _ in chain}),
    )
    for saga_id, step_name in stalled:
        with transaction.atomic(using=DB):
            saga = (
                SagaInstance.objects.using(DB)
                .select_for_update(skip_locked=True)
                .filter(id=saga_id, status__in=[SagaStatus.RUNNING, SagaStatus.COMPENSATING])
                .first()
            )
            step = None if saga is None else saga.steps.filter(name=step_name, status=StepStatus.RUNNING).first()
            if saga is None or step is None or step.deadline_at is None or step.deadline_at >= now:
                done["skipped"] += 1
                continue
            chain = _segment_chain(saga, step)
            queued_at = step.queued_at or (step.deadline_at - timedelta(seconds=sum(d for _, _, d in chain)))
            where = recovery.chain_whereabouts(
                queued_at=queued_at.timestamp(), chain=chain, view=view, now=now.timestamp()
            )
            patience = sum(d for _, _, d in chain) * settings.SAGA_BACKLOG_PATIENCE
            if where.verdict == "held" or (where.verdict == "waiting" and (now - queued_at).total_seconds() < patience):
                # Being worked on, or possibly queued behind older messages: the system is
                # slow, not broken. Re-publishing would only add to the pile, so look again
                # later without spending the step's budget. (Waiting is bounded: in a FIFO
                # queue the head moves past our message, or, where the head cannot be read
                # (AMQP), SAGA_BACKLOG_PATIENCE segments after it was queued.)
                again = chain[0][2] if where.verdict == "held" else where.wait
                again = min(max(again, settings.SAGA_SWEEP_INTERVAL), sum(d for _, _, d in chain))
                step.deadline_at = now + timedelta(seconds=again)
                step.save(using=DB, update_fields=["deadline_at"])
                done[where.verdict] += 1
                continue
            outcome = _recover_stalled(saga, step, now)
            logger.warning("saga %s: step %s stalled past its deadline: %s", saga.id, step.name, outcome)
            done[outcome] += 1
    return dict(done)


def _settlements_send(now: datetime) -> dict[str, int]:
    """Sagas past their pivot get their settlement (a confirmed order's stock becomes a
    sale): saga.settlement. It must never stop the sweep."""
    from .settlement import saga_settlements_send

    try:
        return saga_settlements_send(now=now)
    except Exception:
        logger.warning("sending settlements failed; the next sweep tries again", exc_info=True)
        return {}


# --- Operator actions: the admin's retry and compensate (README "Operating it") ---------
#
# Each locks the saga, checks what it may do *now* (so a second click, or a second
# operator, finds the first one's result and is refused), acts, and records a
# SagaAuditEntry in the same transaction; refusals are recorded too.

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
        saga = _lock_saga(saga_id)
        if saga is None:
            raise SagaInstance.DoesNotExist(f"no saga {saga_id}")
        status_before, fingerprint = saga.status, saga.failure_fingerprint
        plan = saga_retry_check(saga, now=now)
        detail, step = plan.detail, plan.step
        if step is not None:
            if saga.status == SagaStatus.NEEDS_ATTENTION:
                saga.status = SagaStatus.RUNNING if step.phase == StepPhase.FORWARD else SagaStatus.COMPENSATING
                step.republished = 0
            saga_republish_from(saga, step, now=now)
            detail = f"{detail} (generation {saga.generation})"
        elif plan.finish:
            saga.status, saga.current_step, saga.finished_at = plan.finish, "", now
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
        guard_refusal = import_string(definition.pivot_guard)(saga=found) if definition.pivot_guard else None
        saga = _lock_saga(saga_id)
        if saga is None:
            raise SagaInstance.DoesNotExist(f"no saga {saga_id}")
        status_before, fingerprint = saga.status, saga.failure_fingerprint
        refusal = saga_compensate_check(saga) or guard_refusal
        if refusal is None:
            failure_step = saga.current_step or saga.failure_step
            # A saga that needed attention at its pivot compensates like a running one.
            saga.status = SagaStatus.RUNNING
            saga_begin_compensation(
                saga,
                outcome=OUTCOME_FAILED,
                failure_step=failure_step,
                failure_type=OPERATOR_COMPENSATED,
                reason=OPERATOR_COMPENSATED_REASON,
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
