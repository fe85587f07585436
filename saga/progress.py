"""Steps that committed: the chains' records and the pivot's own, which move a saga on.

No step reports its success with a message (saga.engine): the pivot records the steps
before it in its own transaction (`saga_pivot_commit`), and a chain's last step stores the
chain's record in the result backend, which each sweep drains (`saga_reports_drain`) into
`saga_step_succeeded`. Reports may be duplicated or late: each is a state transition that
changes nothing when the saga or step is already past it.
"""

import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from common.exceptions import InvalidMessage
from common.signing import seal_verify

from . import store
from .definition import get_definition
from .engine import step_name_of, task_id_for
from .models import UNFINISHED_STATUSES, SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus
from .publish import phase_plan, segment_deadline, start_running
from .store import DB, UNSETTLED
from .tracing import saga_trace_context

logger = logging.getLogger(__name__)

RESULTS_DB = "default"  # the result backend (django-celery-results)


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


def saga_reports_drain(*, batch: int | None = None) -> int:
    """Record every chain whose last step has committed; the number recorded.

    A chain's last step stores its result, the chain's sealed record, in the result
    backend (saga.engine); nothing else stores a success there. The records are read
    directly (up to `batch` per read, oldest first, each read after the last one's, read
    again while a read comes back full), so a sweep costs what there is to record, not
    what is in flight: listing every running saga's possible task ids made each sweep cost
    as much as the backlog (BENCHMARKS.md). All are recorded as success reports in one
    transaction (one locked read of their sagas, one write), and the drained rows are
    deleted after. A record of a saga that has ended, or that is not a chain's record of a
    saga we know, changes nothing and is deleted with them once
    UNWANTED_RECORD_GRACE_SECONDS old (its publisher may still be reading it). A record
    that waits (its saga held, a fresh duplicate) is read past, not read again in the same
    sweep: a batch of them never holds back the records behind them.

    Safe to run concurrently (a saga another transaction holds is left for the next
    sweep; tests/test_drain_races.py) and again after a crash between the two: recording
    a report twice changes nothing.
    """
    batch = batch or settings.SAGA_SWEEP_BATCH
    recorded, after = 0, None
    for _ in range(DRAIN_READS_PER_SWEEP):
        read, recorded_now, after = _drain_once(batch, after=after)
        recorded += recorded_now
        if read < batch:
            break  # all read
    return recorded


# A sweep reads at most this many batches of records: the rest wait for the next sweep.
DRAIN_READS_PER_SWEEP = 10
# A stored success that is not a record the store wants is deleted once this old.
UNWANTED_RECORD_GRACE_SECONDS = 60


def _saga_and_step_of(task_id: str) -> tuple[uuid.UUID, str] | None:
    """(saga id, step name) a chain step's task id names (engine.task_id_for); None if it is not one."""
    try:
        saga_id = uuid.UUID(task_id[:36])
    except ValueError:
        return None
    step = step_name_of(task_id, task_id[:36])
    return (saga_id, step) if step else None


def _drain_once(batch: int, *, after: tuple[Any, str] | None = None) -> tuple[int, int, tuple[Any, str] | None]:
    """One read of at most `batch` records, oldest first and after the record `after`
    (date done, task id) if given, recorded: (records read, recorded, the last one read)."""
    from django_celery_results.models import TaskResult

    with connections[RESULTS_DB].cursor() as cursor:
        cursor.execute(
            f"SELECT task_id, result, date_done < now() - make_interval(secs => %s), date_done "
            f"FROM {TaskResult._meta.db_table} WHERE status = 'SUCCESS' "
            "AND (date_done, task_id) > (%s::timestamptz, %s) ORDER BY date_done, task_id LIMIT %s",
            [UNWANTED_RECORD_GRACE_SECONDS, *(after or ("-infinity", "")), batch],
        )
        found_rows = cursor.fetchall()
    if not found_rows:
        return 0, 0, after
    read, last = len(found_rows), (found_rows[-1][3], found_rows[-1][0])
    stale = {task_id for task_id, _, old, _ in found_rows if old}
    rows = [(task_id, stored) for task_id, stored, _, _ in found_rows]
    named = {task_id: _saga_and_step_of(task_id) for task_id, _ in rows}
    # A saga that needs attention too: a re-published copy of the step that stopped it may
    # yet succeed, and its record resumes the saga (saga_step_succeeded).
    sagas = {
        saga.id: saga
        for saga in SagaInstance.objects.using(DB)
        .filter(id__in={found[0] for found in named.values() if found}, status__in=UNFINISHED_STATUSES)
        .only("id", "definition", "definition_version", "generation", "trace_context")
    }
    wanted: dict[str, tuple[SagaInstance, str]] = {}
    for task_id, found in named.items():
        if found is None or (saga := sagas.get(found[0])) is None:
            continue
        step_name = found[1]
        definition = get_definition(saga.definition, saga.definition_version)
        plans = (phase_plan(definition, phase) for phase in (StepPhase.FORWARD, StepPhase.COMPENSATION))
        last_steps = {plan[-1].name for plan in plans if plan}
        if step_name in last_steps and any(
            task_id == task_id_for(saga.id, step_name, generation) for generation in range(saga.generation + 1)
        ):
            wanted[task_id] = (saga, step_name)
    # An ended saga's record (a duplicate), or not a saga's record: whoever published it may
    # still read it (AsyncResult.get, as the tests' copies do), so it goes once it is stale.
    done = [task_id for task_id in named if task_id not in wanted and task_id in stale]
    rows = [(task_id, stored) for task_id, stored in rows if task_id in wanted]
    reports: list[tuple[str, SagaInstance, str, dict[str, Any]]] = []
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
            locked = store.lock_sagas_with_steps([saga.id for _, saga, _, _ in reports], skip_locked=True)
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
            store.save_many(
                [locked[saga_id][0] for saga_id in changed],
                [row for rows_of in changed.values() for row in rows_of.values()],
            )
    if done:
        with connections[RESULTS_DB].cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {TaskResult._meta.db_table} WHERE task_id = ANY(%s) AND status = 'SUCCESS'", [done]
            )
    return read, recorded, last


def saga_step_succeeded(*, saga_id: uuid.UUID | str, step_name: str, result: Mapping[str, Any]) -> None:
    """Record that a chain's reporting step committed, with the timeline of the steps
    before it, and move the saga to its next step or its end.

    The chain itself has already published any next step; this only keeps the store in
    step with it. Idempotent: a duplicate report of a succeeded step changes nothing.
    """
    with transaction.atomic(using=DB):
        saga, steps = store.lock_saga_with_steps(saga_id)
        if saga is None:
            logger.error("step %s succeeded for unknown saga %s; ignored", step_name, saga_id)
            return
        changed = _apply_success(saga, steps, step_name, result)
        if changed is not None:
            store.save(saga, changed.values())


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
    changed = {s.name: s for s in store.record_timeline(saga, steps, timeline)}
    entries = [m for m in timeline if isinstance(m, dict)] if isinstance(timeline, list) else []
    own = next((m for m in reversed(entries) if step_name_of(m.get("task_id"), saga.id) == step.name), None)
    if step.status == StepStatus.FAILED and own is not None:
        # A copy of a step that failed for good succeeded after all (a duplicate that
        # outlived the breaker): it did commit, so the store says so, with that copy's
        # attempt and times. Its compensation, already under way, undoes it.
        logger.warning("saga %s: %s succeeded after it had failed for good", saga.id, step.name)
        before = entries[: entries.index(own)]
        queued = before[-1].get("finished_at") if before else None
        step.mark_succeeded(own, queued_at=parse_datetime(queued) if isinstance(queued, str) else None)
        changed[step.name] = step
    elif step.status in UNSETTLED:
        # A report without its own timeline entry (a foreign or old-format message).
        step.mark_succeeded()
        changed[step.name] = step
    if already and not changed:
        return None  # a duplicate report
    now = timezone.now()
    # Later steps need what this one produced (e.g. the amount); a re-publish (sweeper,
    # operator retry) starts from this context.
    saga.context = {**saga.context, **{k: v for k, v in result.items() if not k.startswith("_")}}

    definition = get_definition(saga.definition, saga.definition_version)
    plan = phase_plan(definition, step.phase)
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
        saga.mark_resumed(step.phase)
    if saga.status == active and not already:
        if step.position + 1 == len(plan):
            # When it ended, not when the store heard of it (reports are drained).
            saga.mark_finished(finished, at=step.finished_at or now)
            # The last step of a chain runs only after every earlier one committed, but
            # one whose record is missing (a chain re-published midway) is not shown
            # succeeded without its attempt and times: its outcome was not recorded.
            for earlier in steps.values():
                if earlier.phase == step.phase and earlier.status in (StepStatus.PENDING, StepStatus.RUNNING):
                    earlier.mark_unknown()
                    changed[earlier.name] = earlier
        else:
            nxt = plan[step.position + 1]
            nxt_row = steps[nxt.name]
            # Reports may arrive out of order: a late one never rewinds a step that
            # already started or finished.
            if nxt_row.status == StepStatus.PENDING:
                start_running(
                    nxt_row,
                    saga=saga,
                    deadline_seconds=segment_deadline(definition, plan, step.position + 1),
                    now=now,
                    queued_at=step.finished_at,
                )
                saga.current_step = nxt.name
                changed[nxt_row.name] = nxt_row
    return changed


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
    saga, steps = store.lock_saga_with_steps(saga_id, phase=StepPhase.FORWARD)
    if saga is None or str(saga.order_id) != str(order_id) or saga.status != SagaStatus.RUNNING:
        return False
    if saga.pivot_committed_at is not None:
        return True
    now = timezone.now()
    saga.pivot_committed_at = now
    definition = get_definition(saga.definition, saga.definition_version)
    changed = {s.name: s for s in store.record_timeline(saga, steps, timeline)}
    saga.context = {**saga.context, **dict(output or {})}
    pivot = steps.get(definition.pivot)
    if pivot is not None and pivot.status in (StepStatus.PENDING, StepStatus.RUNNING):
        last = [m for m in timeline or [] if isinstance(m, dict) and isinstance(m.get("finished_at"), str)]
        # The pivot commits now, in this transaction: its own record (worker, start) comes
        # with the chain's next report, which fills in what is left blank here.
        pivot.mark_committed(
            at=now,
            output=output or {},
            queued_at=parse_datetime(last[-1]["finished_at"]) if last else None,
        )
        changed[pivot.name] = pivot
        for earlier in steps.values():
            if earlier.position < pivot.position and earlier.status in (StepStatus.PENDING, StepStatus.RUNNING):
                # Committed (the pivot needed it), but its record is missing: not shown
                # succeeded without its attempt and times.
                earlier.mark_unknown()
                changed[earlier.name] = earlier
        index = definition.pivot_index + 1
        if index < len(definition.steps):
            nxt = steps[definition.steps[index].name]
            if nxt.status == StepStatus.PENDING:
                deadline = segment_deadline(definition, definition.steps, index)
                # Its queue wait starts when the pivot's task returns, just after this commit.
                start_running(nxt, saga=saga, deadline_seconds=deadline, now=now)
                saga.current_step = nxt.name
                changed[nxt.name] = nxt
    store.save(saga, changed.values(), fields=["pivot_committed_at", "current_step", "context"])
    return True
