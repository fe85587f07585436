"""The saga store: a saga and its steps, locked, read and written in as few statements as
the coordinator's every report allows (raw SQL where the ORM would take more).

Every write here needs the saga's row lock, which the reading functions take.
"""

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from django.db import connections
from django.utils.dateparse import parse_datetime

from common.db import from_row
from common.steps import MAX_TIMELINE

from .engine import step_name_of
from .models import SagaInstance, SagaStep, StepStatus

DB = "orders"

# A step whose outcome the store does not know yet: a record of it may still arrive.
UNSETTLED = (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.UNKNOWN, StepStatus.CANCELLED)


def lock_saga(saga_id: uuid.UUID | str) -> SagaInstance | None:
    """The saga, locked (FOR UPDATE). Precondition: inside `transaction.atomic(using="orders")`."""
    return SagaInstance.objects.using(DB).select_for_update().filter(id=saga_id).first()


def lock_saga_with_steps(
    saga_id: uuid.UUID | str, *, phase: str | None = None
) -> tuple[SagaInstance | None, dict[str, SagaStep]]:
    """The saga, locked (FOR UPDATE), and its steps (of `phase`, or all) by name: one
    statement where the ORM takes two. Precondition: inside `transaction.atomic(using="orders")`."""
    connection = connections[DB]
    quote = connection.ops.quote_name
    saga_fields, step_fields = SagaInstance._meta.concrete_fields, SagaStep._meta.concrete_fields
    columns = [f"s.{quote(str(f.column))}" for f in saga_fields] + [f"t.{quote(str(f.column))}" for f in step_fields]
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(columns)} FROM {quote(SagaInstance._meta.db_table)} AS s "
            f"LEFT JOIN {quote(SagaStep._meta.db_table)} AS t ON t.saga_id = s.id"
            + (" AND t.phase = %s" if phase else "")
            + " WHERE s.id = %s ORDER BY t.phase, t.position FOR UPDATE OF s",
            [*([phase] if phase else []), saga_id],
        )
        rows = cursor.fetchall()
    if not rows:
        return None, {}
    split = len(saga_fields)
    saga = from_row(SagaInstance, saga_fields, rows[0][:split], DB)
    steps = {}
    for row in rows:
        if row[split] is not None:
            step = from_row(SagaStep, step_fields, row[split:], DB)
            step._state.fields_cache["saga"] = saga
            steps[step.name] = step
    if phase is None:
        saga._prefetched_objects_cache = {"steps": list(steps.values())}
    return saga, steps


def save_steps(rows: Iterable[SagaStep]) -> None:
    """Write the timeline fields of `rows` in one statement. Precondition: the saga's row
    lock is held."""
    save(None, rows)


def save(saga: SagaInstance | None, rows: Iterable[SagaStep], fields: Iterable[str] | None = None) -> None:
    """Write the timeline fields of the steps `rows` (UPDATE ... FROM VALUES) and the
    saga's `fields` (all of them by default; `updated_at` always), in one statement.

    Django's bulk_update builds a CASE expression per field and row, and a save per model
    is a statement each: on the coordinator's every record that cost more CPU than the
    queries (BENCHMARKS.md). Precondition: the saga's row lock is held.
    """
    rows = list(rows)
    connection = connections[DB]
    sql: list[str] = []
    params: list[Any] = []
    if rows:
        table = connection.ops.quote_name(SagaStep._meta.db_table)
        row_sql = "(%s::bigint, %s, " + "%s::timestamptz, " * 4 + "%s::integer, %s, %s::jsonb, %s)"
        for row in rows:
            params += [row.pk, row.status, row.queued_at, row.started_at, row.finished_at, row.deadline_at]
            params += [row.attempts, row.worker, json.dumps(row.result or {}), row.celery_task_id]
        sql.append(
            f"UPDATE {table} AS s SET status = v.status, queued_at = v.queued_at, started_at = v.started_at, "
            "finished_at = v.finished_at, deadline_at = v.deadline_at, attempts = v.attempts, worker = v.worker, "
            "result = v.result, celery_task_id = v.celery_task_id "
            f"FROM (VALUES {', '.join([row_sql] * len(rows))}) "
            "AS v(id, status, queued_at, started_at, finished_at, deadline_at, attempts, worker, result, "
            "celery_task_id) WHERE s.id = v.id"
        )
    if saga is not None:
        wanted = None if fields is None else {*fields, "updated_at"}
        columns = [
            f for f in SagaInstance._meta.concrete_fields if not f.primary_key and (wanted is None or f.name in wanted)
        ]
        values = [f.get_db_prep_save(f.pre_save(saga, add=False), connection) for f in columns]
        table = connection.ops.quote_name(SagaInstance._meta.db_table)
        assignments = ", ".join(f"{connection.ops.quote_name(str(f.column))} = %s" for f in columns)
        sql.append(f"UPDATE {table} SET {assignments} WHERE id = %s")
        params += [*values, saga.pk]
    if not sql:
        return
    statement = sql[0] if len(sql) == 1 else f"WITH steps AS ({sql[0]}) {sql[1]}"
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def record_timeline(saga: SagaInstance, steps: Mapping[str, SagaStep], timeline: Any) -> list[SagaStep]:
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
                step.mark_succeeded(meta, queued_at=previous_finished)
                changed[step.name] = step
            elif step.status == StepStatus.SUCCEEDED and (step.started_at is None or not step.worker):
                step.take_record(meta, queued_at=previous_finished)
                changed[step.name] = step
        previous_finished = finished
    return list(changed.values())
