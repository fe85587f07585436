"""Steps that committed: the chains' records and the pivot's own, which move a saga on.

No step reports its success with a message (saga.engine): the pivot records the steps
before it in its own transaction (`saga_pivot_commit`; in the usual case in the pivot's
own statement, `pivot_record_ctes`), and a chain's last step stores the chain's record in
the result backend, which each sweep drains (`saga_reports_drain`) into
`saga_step_succeeded`. Reports may be duplicated or late: each is a state transition that
changes nothing when the saga or step is already past it.
"""

import contextlib
import json
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.conf import settings
from django.db import DatabaseError, connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from common.exceptions import InvalidMessage
from common.signing import seal_verify
from common.sql import is_step_abort, prepared
from common.steps import MAX_TIMELINE

from . import store
from .definition import SagaDefinition, get_definition
from .engine import step_name_of, task_id_for
from .models import UNFINISHED_STATUSES, SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus
from .publish import phase_plan, segment_deadline, start_running
from .store import DB, UNSETTLED
from .tracing import saga_trace_context, tracing_enabled

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
        # The usual record (a forward chain's end after its pivot recorded the steps before
        # it) in one statement; what it leaves takes the general way below.
        completed = _record_completions(reports)
        done.extend(task_id for task_id, saga, _, _ in reports if saga.id in completed)
        recorded += len(completed)
        reports = [report for report in reports if report[1].id not in completed]
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


# What `_record_completions` expects of each forward step's row, by its place in the chain.
KEPT, TAKEN, SUCCEEDED = "kept", "taken", "succeeded"


def _record_completions(reports: list[tuple[str, SagaInstance, str, dict[str, Any]]]) -> set[uuid.UUID]:
    """Record the usual chain records among `reports` in one statement: the sagas
    recorded. The others are left for the general way (`_apply_success`), which
    `test_drain.py` holds this to: the same rows, field by field.

    The usual record: the forward chain's end (its last step's, one per saga in the batch),
    whose timeline holds one record of each forward step and nothing else, of a saga still
    running whose pivot recorded itself and the steps before it (`saga_pivot_commit`):
    those steps succeeded with their records (nothing to write), the pivot succeeded
    without its worker (its record fills it in), the steps after it unsettled (each
    succeeds with its record), and the saga completes when its last step finished. The
    statement checks all of it on the rows it locks and skips the sagas another
    transaction holds (as the general way does); each write checks its step again on the
    row version it writes, and if one does not hold the statement undoes itself
    (`saga_step_abort`) and every saga takes the general way.

    Where the general way reads each saga and its steps into models and writes them back
    (a locked read, then a write of every changed row), this is one round trip whatever
    the batch, and no model is built: the coordinator's part of a confirmed order.
    Commits on its own (in a savepoint inside a caller's transaction).
    """
    per_saga: dict[uuid.UUID, int] = {}
    for _, saga, _, _ in reports:
        per_saga[saga.id] = per_saga.get(saga.id, 0) + 1
    now = timezone.now()
    sagas: list[tuple[SagaInstance, int, datetime | None, str]] = []
    steps: list[tuple[Any, ...]] = []
    for _, saga, step_name, report in reports:
        if per_saga[saga.id] != 1:
            continue
        try:
            definition = get_definition(saga.definition, saga.definition_version)
        except LookupError:
            continue
        plan = [step.name for step in definition.steps]
        pivot = definition.pivot_index
        if step_name != plan[-1] or pivot >= len(plan) - 1:
            continue
        try:
            records = _timeline_records(plan, saga.id, report.get("_steps"))
        except (ValueError, TypeError, OverflowError):
            continue  # the general way reads it, and says what is wrong with it
        if records is None or [record["name"] for record in records] != plan:
            continue
        patch: dict[str, Any] = {}
        for record in records:
            if isinstance(record.get("output"), dict):
                patch.update({k: v for k, v in record["output"].items() if not k.startswith("_")})
        patch.update({k: v for k, v in report.items() if not k.startswith("_")})
        sagas.append((saga, len(records), records[-1]["finished"], json.dumps(patch)))
        for index, record in enumerate(records):
            expect = KEPT if index < pivot else TAKEN if index == pivot else SUCCEEDED
            steps.append((saga.id, record, expect))
    if not sagas:
        return set()
    saga_table, step_table = f'"{SagaInstance._meta.db_table}"', f'"{SagaStep._meta.db_table}"'
    unsettled = [str(status) for status in UNSETTLED]
    # Inside a caller's transaction (a test's), a savepoint keeps the statement's undoing
    # from aborting the caller's; on its own it needs none.
    nested = transaction.atomic(using=DB) if connections[DB].in_atomic_block else contextlib.nullcontext()
    try:
        with nested, prepared(DB, plan_once=False) as cursor:
            cursor.execute(
                "WITH r AS (SELECT * FROM unnest(%s::uuid[], %s::int[], %s::timestamptz[], %s::text[]) "
                "AS r(id, steps, finished, patch)), "
                "e AS (SELECT * FROM unnest(%s::uuid[], %s::varchar[], %s::varchar[], %s::timestamptz[], "
                "%s::timestamptz[], %s::timestamptz[], %s::int[], %s::varchar[], %s::varchar[], %s::text[]) "
                "AS e(saga_id, name, expect, queued, started, finished, attempt, worker, task_id, result)), "
                # The ids again as an array, not `IN (SELECT id FROM r)`: by the array the
                # planner finds the sagas by their key; through `r` it scanned every running saga.
                f"s AS MATERIALIZED (SELECT x.id FROM {saga_table} AS x WHERE x.id = ANY(%s::uuid[]) "
                "AND x.status = %s ORDER BY x.id FOR UPDATE SKIP LOCKED), "
                # Joined and grouped, not a subquery per saga: that scanned the whole batch's
                # entries once per saga.
                "ok AS MATERIALIZED (SELECT e.saga_id AS id FROM e JOIN r ON r.id = e.saga_id "
                f"JOIN {step_table} AS t ON t.saga_id = e.saga_id AND t.name = e.name "
                "WHERE e.saga_id IN (SELECT id FROM s) AND t.phase = %s AND ("
                "(e.expect = %s AND t.status = %s AND t.started_at IS NOT NULL AND t.worker <> '') "
                "OR (e.expect = %s AND t.status = %s AND t.worker = '') "
                "OR (e.expect = %s AND t.status = ANY(%s::varchar[]))) "
                "GROUP BY e.saga_id, r.steps HAVING count(*) = r.steps), "
                # SagaStep.take_record, after mark_succeeded for the steps after the pivot.
                f"up AS (UPDATE {step_table} AS t SET "
                "status = CASE WHEN e.expect = %s THEN %s ELSE t.status END, "
                "deadline_at = CASE WHEN e.expect = %s THEN NULL ELSE t.deadline_at END, "
                "finished_at = CASE WHEN e.expect = %s THEN COALESCE(e.finished, %s) "
                "ELSE COALESCE(e.finished, t.finished_at, %s) END, "
                "queued_at = COALESCE(t.queued_at, e.queued), started_at = COALESCE(e.started, t.started_at), "
                "attempts = GREATEST(t.attempts, e.attempt), worker = e.worker, celery_task_id = e.task_id, "
                "result = COALESCE(e.result::jsonb, t.result) "
                "FROM e WHERE e.saga_id = ANY(ARRAY(SELECT id FROM ok)) AND t.saga_id = e.saga_id AND t.phase = %s "
                "AND t.name = e.name "
                "AND ((e.expect = %s AND t.status = %s AND t.worker = '') "
                "OR (e.expect = %s AND t.status = ANY(%s::varchar[]))) RETURNING t.id), "
                # SagaInstance.mark_finished, when its last step finished; its outputs in its context.
                f"done AS (UPDATE {saga_table} AS x SET status = %s, current_step = '', "
                "finished_at = COALESCE(r.finished, %s), context = x.context || r.patch::jsonb, updated_at = %s "
                "FROM ok JOIN r ON r.id = ok.id WHERE x.id = ok.id RETURNING x.id) "
                "SELECT (SELECT array_agg(id::text) FROM done), CASE WHEN (SELECT count(*) FROM up) = "
                "(SELECT count(*) FROM e JOIN ok ON ok.id = e.saga_id WHERE e.expect <> %s) THEN true "
                "ELSE saga_step_abort('a step changed while its saga was being recorded') END",
                [
                    # r
                    [saga.id for saga, _, _, _ in sagas],
                    [count for _, count, _, _ in sagas],
                    [finished for _, _, finished, _ in sagas],
                    [patch for _, _, _, patch in sagas],
                    # e
                    [saga_id for saga_id, _, _ in steps],
                    [record["name"] for _, record, _ in steps],
                    [expect for _, _, expect in steps],
                    [record["queued"] for _, record, _ in steps],
                    [record["started"] for _, record, _ in steps],
                    [record["finished"] for _, record, _ in steps],
                    [record["attempt"] for _, record, _ in steps],
                    [record["worker"] for _, record, _ in steps],
                    [record["task_id"] for _, record, _ in steps],
                    [record["result"] for _, record, _ in steps],
                    # s
                    [saga.id for saga, _, _, _ in sagas],
                    SagaStatus.RUNNING,
                    # ok
                    StepPhase.FORWARD,
                    *(KEPT, StepStatus.SUCCEEDED),
                    *(TAKEN, StepStatus.SUCCEEDED),
                    *(SUCCEEDED, unsettled),
                    # up
                    *(SUCCEEDED, StepStatus.SUCCEEDED),
                    SUCCEEDED,
                    *(SUCCEEDED, now, now),
                    StepPhase.FORWARD,
                    *(TAKEN, StepStatus.SUCCEEDED),
                    *(SUCCEEDED, unsettled),
                    # done
                    *(SagaStatus.COMPLETED, now, now),
                    KEPT,
                ],
            )
            completed = cursor.fetchone()[0] or []
    except DatabaseError as error:
        if is_step_abort(error):
            return set()  # nothing written: the general way finds out why, under the locks
        raise
    recorded = {uuid.UUID(saga_id) for saga_id in completed}
    if recorded and tracing_enabled():
        # The general way records each saga under a span in its trace: so does this one.
        for saga, _, _, _ in sagas:
            if saga.id in recorded:
                with saga_trace_context(saga.trace_context, why="saga.record"):
                    pass
    return recorded


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
    phase_now = _phase_now(saga, steps)
    for index, meta in enumerate(entries):
        failed = steps.get(step_name_of(meta.get("task_id"), saga.id) or "")
        if failed is None or failed.status != StepStatus.FAILED:
            continue
        if failed is not step and failed.phase != phase_now:
            # A forward step whose failure turned the saga to compensating: that stays
            # its outcome on the timeline (the reporting step's own entry aside, below).
            continue
        # A copy of a step that failed for good succeeded after all (a duplicate that
        # outlived the breaker; a copy still queued when the sweeper gave up on the step):
        # a chain's record names only steps that committed, so the store says so, with
        # that copy's attempt and times. If it was a forward step of a saga that is
        # compensating, its compensation undoes it.
        logger.warning("saga %s: %s succeeded after it had failed for good", saga.id, failed.name)
        queued = entries[index - 1].get("finished_at") if index else None
        failed.mark_succeeded(meta, queued_at=parse_datetime(queued) if isinstance(queued, str) else None)
        changed[failed.name] = failed
    if step.status in UNSETTLED:
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
    stopped_at = steps.get(saga.failure_step)
    if (
        saga.status == SagaStatus.NEEDS_ATTENTION
        and stopped_at is not None
        and stopped_at.phase == step.phase
        and stopped_at.name in changed
        and stopped_at.status == StepStatus.SUCCEEDED
    ):
        # A re-published copy of the step that failed for good has now succeeded (this
        # report's step, or one its chain ran before it): the reason for stopping is gone,
        # so the saga carries on where it was.
        logger.warning("saga %s: %s succeeded after all; resuming", saga.id, stopped_at.name)
        saga.mark_resumed(step.phase)
    last = step.position + 1 == len(plan)
    # A duplicate report moves nothing, except that the last step's ends an active saga:
    # one an operator resumed after that step had succeeded (while it needed attention).
    if saga.status == active and (not already or last):
        if last:
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


def _phase_now(saga: SagaInstance, steps: Mapping[str, SagaStep]) -> str:
    """The phase the saga is in: the one it runs, ended in, or stopped in (needs attention)."""
    if saga.status == SagaStatus.NEEDS_ATTENTION and (stopped_at := steps.get(saga.failure_step)) is not None:
        return stopped_at.phase
    if saga.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED):
        return StepPhase.COMPENSATION
    return StepPhase.FORWARD


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


def pivot_record_ctes(
    *,
    definition: SagaDefinition,
    saga_id: uuid.UUID,
    order_id: uuid.UUID,
    timeline: Any,
    output: Mapping[str, Any],
    now: datetime,
    guard: str,
) -> "PivotRecord | None":
    """What `saga_pivot_commit` writes in the usual case, as common table expressions for
    the pivot step's own statement: one round trip for the pivot and its record (the
    caller's statement and its commit), where the general way takes six. None when the
    case is not the usual one; the caller then takes the general way.

    The usual case: the chain's `timeline` holds one record of each step before the pivot
    and nothing else, the saga (of `definition`, the version this deployment starts) is
    running and short of its pivot, those steps are unsettled, the pivot pending or running
    and the step after it pending. The statement checks all of it on the rows it locks and
    writes nothing unless all of it holds, so the general way then starts from the rows as
    they were. Its CTE `pivoted` returns the saga's id if it recorded the pivot, and the
    record's `written` (a boolean SQL expression) says whether every one of its writes
    happened: each write checks its step's state again on the row version it writes (a
    step changed by a transaction that committed while this statement waited for the
    saga's lock), so the caller aborts the statement (`saga_step_abort`) where `pivoted`
    returned a row and `written` is false, and takes the general way.

    `guard` names the caller's CTE that yields a row when the caller's own checks hold
    (the order's): the saga's row is locked only after it, as the general way locks the
    order before the saga (a compensation's pivot guard takes them in that order too).
    Precondition: the statement runs on its own (autocommit): it commits on success.
    """
    try:
        records = _pivot_timeline(definition, saga_id, timeline)
    except (ValueError, TypeError, OverflowError):
        return None  # the general way reads it, and says what is wrong with it
    if records is None:
        return None
    pivot = definition.steps[definition.pivot_index]
    index = definition.pivot_index + 1
    after = definition.steps[index] if index < len(definition.steps) else None
    context: dict[str, Any] = {}
    for record in records:
        if isinstance(record.get("output"), dict):
            context.update({k: v for k, v in record["output"].items() if not k.startswith("_")})
    context.update(output)
    last_finished = records[-1]["finished"] if records else None
    names = [record["name"] for record in records]
    saga_table, step_table = f'"{SagaInstance._meta.db_table}"', f'"{SagaStep._meta.db_table}"'
    deadline = now + timedelta(seconds=segment_deadline(definition, definition.steps, index)) if after else None
    sql = (
        f"s AS MATERIALIZED (SELECT id, generation FROM {saga_table} WHERE id = %s AND (SELECT true FROM {guard}) "
        "AND order_id = %s AND status = %s AND pivot_committed_at IS NULL "
        "AND definition = %s AND definition_version = %s FOR UPDATE), "
        f"ok AS MATERIALIZED (SELECT s.id, s.generation FROM s WHERE (SELECT count(*) FROM {step_table} AS t "
        "WHERE t.saga_id = s.id AND t.phase = %s AND ((t.name = ANY(%s::varchar[]) AND t.status = ANY(%s::varchar[])) "
        "OR (t.name = %s AND t.status = ANY(%s::varchar[])) OR (t.name = %s AND t.status = %s))) = %s), "
        # The steps before the pivot, each with its record (SagaStep.mark_succeeded).
        f"ran AS (UPDATE {step_table} AS t SET status = %s, deadline_at = NULL, "
        "finished_at = COALESCE(r.finished_at, %s), queued_at = COALESCE(t.queued_at, r.queued_at), "
        "started_at = COALESCE(r.started_at, t.started_at), attempts = GREATEST(t.attempts, r.attempt), "
        "worker = r.worker, celery_task_id = COALESCE(r.task_id, t.celery_task_id), "
        "result = COALESCE(r.result::jsonb, t.result) "
        "FROM ok, unnest(%s::varchar[], %s::timestamptz[], %s::timestamptz[], %s::timestamptz[], %s::int[], "
        "%s::varchar[], %s::varchar[], %s::text[]) "
        "AS r(name, finished_at, queued_at, started_at, attempt, worker, task_id, result) "
        "WHERE t.saga_id = ok.id AND t.phase = %s AND t.name = r.name AND t.status = ANY(%s::varchar[]) "
        "RETURNING t.id), "
        # The pivot, committing in this statement (SagaStep.mark_committed).
        f"pv AS (UPDATE {step_table} AS t SET status = %s, deadline_at = NULL, finished_at = %s, "
        "queued_at = COALESCE(t.queued_at, %s), started_at = COALESCE(t.started_at, %s), "
        "attempts = GREATEST(t.attempts, 1), result = %s::jsonb FROM ok WHERE t.saga_id = ok.id AND t.phase = %s "
        "AND t.name = %s AND t.status = ANY(%s::varchar[]) RETURNING t.id), "
        # The step after it, published when the pivot's task returns (saga.publish.start_running).
        f"nx AS (UPDATE {step_table} AS t SET status = %s, celery_task_id = ok.id::text || '-' || t.name || '-g' "
        "|| ok.generation, queued_at = %s, deadline_at = %s, finished_at = NULL FROM ok "
        "WHERE t.saga_id = ok.id AND t.phase = %s AND t.name = %s AND t.status = %s RETURNING t.id), "
        f"pivoted AS (UPDATE {saga_table} AS x SET pivot_committed_at = %s, "
        "current_step = COALESCE(%s, x.current_step), context = x.context || %s::jsonb, updated_at = %s "
        "FROM ok WHERE x.id = ok.id RETURNING x.id)"
    )
    unsettled = [str(status) for status in UNSETTLED]
    pending_or_running = [str(StepStatus.PENDING), str(StepStatus.RUNNING)]
    params: list[Any] = [
        saga_id,
        order_id,
        SagaStatus.RUNNING,
        definition.name,
        definition.version,
        # ok
        StepPhase.FORWARD,
        names,
        unsettled,
        pivot.name,
        pending_or_running,
        after.name if after else "",
        StepStatus.PENDING,
        len(names) + 1 + (1 if after else 0),
        # ran
        StepStatus.SUCCEEDED,
        now,
        names,
        [record["finished"] for record in records],
        [record["queued"] for record in records],
        [record["started"] for record in records],
        [record["attempt"] for record in records],
        [record["worker"] for record in records],
        [record["task_id"] for record in records],
        [record["result"] for record in records],
        StepPhase.FORWARD,
        unsettled,
        # pv
        StepStatus.SUCCEEDED,
        now,
        last_finished,
        now,
        json.dumps(dict(output)),
        StepPhase.FORWARD,
        pivot.name,
        pending_or_running,
        # nx
        StepStatus.RUNNING,
        now,
        deadline,
        StepPhase.FORWARD,
        after.name if after else "",
        StepStatus.PENDING,
        # pivoted
        now,
        after.name if after else None,
        json.dumps(context),
        now,
    ]
    written = "(SELECT count(*) FROM ran) = %s AND (SELECT count(*) FROM pv) = 1 AND (SELECT count(*) FROM nx) = %s"
    return PivotRecord(sql, params, written, [len(names), 1 if after else 0])


class PivotRecord(NamedTuple):
    """`pivot_record_ctes`'s part of the pivot step's statement."""

    ctes: str
    params: list[Any]
    written: str
    written_params: list[Any]


def _pivot_timeline(definition: SagaDefinition, saga_id: uuid.UUID, timeline: Any) -> list[dict[str, Any]] | None:
    """The records of the steps before the pivot, in the chain's order, as
    `store.record_timeline` would take them (SagaStep.take_record); None unless the
    timeline holds exactly one record of each of those steps and nothing else."""
    return _timeline_records([step.name for step in definition.steps[: definition.pivot_index]], saga_id, timeline)


def _timeline_records(names: list[str], saga_id: uuid.UUID, timeline: Any) -> list[dict[str, Any]] | None:
    """The records of the steps `names`, in the chain's order, as
    `store.record_timeline` would take them (SagaStep.take_record); None unless the
    timeline holds exactly one record of each of those steps and nothing else."""
    if not isinstance(timeline, list) or len(timeline) > MAX_TIMELINE:
        return None
    records: list[dict[str, Any]] = []
    previous_finished = None
    for meta in timeline:
        if not isinstance(meta, dict) or not isinstance(meta.get("finished_at"), str):
            return None
        name = step_name_of(meta.get("task_id"), saga_id)
        if name not in names or any(record["name"] == name for record in records):
            return None
        finished = parse_datetime(meta["finished_at"])
        try:
            attempt = int(meta.get("attempt") or 1)
        except (TypeError, ValueError):
            attempt = 1
        if not 0 <= attempt < 2**31:
            return None  # not an integer column's: the general way fails on it as it should
        output = meta.get("output")
        records.append(
            {
                "name": name,
                "finished": finished,
                "queued": previous_finished,
                "started": parse_datetime(meta["started_at"]) if isinstance(meta.get("started_at"), str) else None,
                "attempt": attempt,
                "worker": str(meta.get("worker") or "")[:255],
                "task_id": meta["task_id"][:255],
                "result": json.dumps(output) if isinstance(output, dict) else None,
                "output": output,
            }
        )
        previous_finished = finished
    if sorted(record["name"] for record in records) != sorted(names):
        return None
    return records
