"""The saga store: a saga and its steps, locked, read and written in as few statements as
the coordinator's every report allows (raw SQL where the ORM would take more).

Every write here needs the saga's row lock, which the reading functions take.
"""

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import connections
from django.utils.dateparse import parse_datetime

from common.db import from_row, update_together
from common.sql import prepared
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
    found = lock_sagas_with_steps([saga_id], phase=phase)
    return next(iter(found.values()), (None, {}))


def lock_sagas_with_steps(
    saga_ids: Sequence[uuid.UUID | str], *, phase: str | None = None, skip_locked: bool = False
) -> dict[uuid.UUID, tuple[SagaInstance, dict[str, SagaStep]]]:
    """Each of the sagas, locked, with its steps (of `phase`, or all) by name. Rows are
    locked in id order, so two callers never wait on each other in a cycle; with
    `skip_locked`, a saga another transaction holds is left out (its caller comes back for
    it). Precondition: inside `transaction.atomic(using="orders")`.

    Two statements, the steps read after the lock is held. One statement that joined the
    steps to the locked sagas (it used to) read them in the snapshot it began with: when it
    had to wait for a saga's lock, PostgreSQL gave it the saga row as the holder left it
    and the steps as they were before (READ COMMITTED re-reads only the locked rows). A
    late failure report then wrote an operator's retried step back to failed, or took a
    re-published step's failure for its current copy's."""
    connection = connections[DB]
    quote = connection.ops.quote_name
    saga_fields, step_fields = SagaInstance._meta.concrete_fields, SagaStep._meta.concrete_fields
    # Planned for its sagas at every execution: a plan kept from when the tables were
    # small scanned them whole (common.sql.prepared).
    with prepared(DB, plan_once=False) as cursor:
        cursor.execute(
            f"SELECT {', '.join(quote(str(f.column)) for f in saga_fields)} FROM {quote(SagaInstance._meta.db_table)} "
            "WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE" + (" SKIP LOCKED" if skip_locked else ""),
            [[str(i) for i in saga_ids]],
        )
        sagas = [from_row(SagaInstance, saga_fields, row, DB) for row in cursor.fetchall()]
        rows = []
        if sagas:
            cursor.execute(
                f"SELECT {', '.join(quote(str(f.column)) for f in step_fields)} FROM {quote(SagaStep._meta.db_table)} "
                "WHERE saga_id = ANY(%s::uuid[])"
                + (" AND phase = %s" if phase else "")
                + " ORDER BY saga_id, phase, position",
                [[str(s.id) for s in sagas], *([phase] if phase else [])],
            )
            rows = cursor.fetchall()
    found: dict[uuid.UUID, tuple[SagaInstance, dict[str, SagaStep]]] = {s.id: (s, {}) for s in sagas}
    for row in rows:
        step = from_row(SagaStep, step_fields, row, DB)
        saga, steps = found[step.saga_id]
        step._state.fields_cache["saga"] = saga
        steps[step.name] = step
    if phase is None:
        for saga, steps in found.values():
            # What prefetch_related("steps") would leave: saga.steps.all() reads no rows.
            saga._prefetched_objects_cache = {"steps": list(steps.values())}  # type: ignore[attr-defined]
    return found


def save_steps(rows: Iterable[SagaStep]) -> None:
    """Write the timeline fields of `rows` in one statement. Precondition: the saga's row
    lock is held."""
    save(None, rows)


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
    "last_error",
)


# The saga columns a save writes unless it names its fields: all but its pivot's time,
# which only the pivot writes (saga.progress.saga_pivot_commit, by name). A row written
# back whole must not depend on a time's round trip through JSON to keep the pivot:
# PostgreSQL refuses any other pivot time once one is set (saga migration 0013).
SAGA_WRITTEN = tuple(f.name for f in SagaInstance._meta.concrete_fields if f.name != "pivot_committed_at")


def save(saga: SagaInstance | None, rows: Iterable[SagaStep], fields: Iterable[str] | None = None) -> None:
    """Write the timeline of the steps `rows` and the saga's `fields` (SAGA_WRITTEN by
    default; `updated_at` always) in one statement (common.db.update_together).

    Django's bulk_update builds a CASE expression per field and row, and a save per model
    is a statement each: on the coordinator's every record that cost more CPU than the
    queries (BENCHMARKS.md). Precondition: the saga's row lock is held.
    """
    save_many([saga] if saga is not None else [], rows, fields)


def save_many(sagas: Sequence[SagaInstance], rows: Iterable[SagaStep], fields: Iterable[str] | None = None) -> None:
    """`save` for several sagas at once. Precondition: every saga's row lock is held."""
    update_together(DB, (list(rows), STEP_WRITTEN), (list(sagas), SAGA_WRITTEN if fields is None else fields))


def record_timeline(
    saga: SagaInstance, steps: Mapping[str, SagaStep], timeline: Any, *, failed: SagaStep | None = None
) -> list[SagaStep]:
    """Mark the steps named in a chain's `_steps` timeline succeeded, with their timing,
    and take their outputs into the saga's context (the caller saves the saga).

    Each entry is a step that committed (a participant appends it only on success): a
    step whose outcome the store did not know (pending, running, unknown, or cancelled
    while in flight) becomes succeeded with the participant's attempt and times. A step
    already succeeded gets only timing it lacks (the pivot records itself before its own
    entry exists); one that failed in another attempt keeps its status. Returns the rows
    changed. Precondition: the saga's row lock is held.

    `failed`: the timeline came with that step's failure, unsealed (the result backend's
    copy, which every worker's role may write, or the report's headers). Only the steps
    before it in its phase can be in it (the chain ran them and then it); an entry naming
    it or a later step is not taken, so no timeline can make a failure read as its own
    step's success. Its outputs add what the context lacks and change nothing it holds
    (the customer's address, the amount).
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
        if step is not None and failed is not None and (step.phase != failed.phase or step.position >= failed.position):
            continue
        finished = parse_datetime(meta["finished_at"]) if isinstance(meta.get("finished_at"), str) else None
        if step is not None and isinstance(meta.get("output"), dict):
            # Later steps need what this one produced (the amount, the outcome): a
            # re-publish (sweeper, operator retry) starts from the saga's context.
            output = {k: v for k, v in meta["output"].items() if not k.startswith("_")}
            saga.context = {**saga.context, **output} if failed is None else {**output, **saga.context}
        if step is not None:
            if step.status in UNSETTLED:
                step.mark_succeeded(meta, queued_at=previous_finished)
                changed[step.name] = step
            elif step.status == StepStatus.SUCCEEDED and (step.started_at is None or not step.worker):
                step.take_record(meta, queued_at=previous_finished)
                changed[step.name] = step
        previous_finished = finished
    return list(changed.values())
