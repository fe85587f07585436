"""Settling sagas past their pivot: their provisional effects become final, in batches.

A confirmed order's stock is held by a reservation until the coordinator tells inventory
the order was confirmed; then the reservation becomes a sale (on hand falls, and
`reserved` counts only orders in flight). What settles which saga is its definition's
`settlement` step (saga.definition): this module knows no participant.

Not a step of each saga's chain: that would add a fifth task, its message and its events
to every order (issue 11 measures the saga against a bare four-task chain). Instead the
coordinator's sweep (saga.sweeper.saga_sweep, every SAGA_SWEEP_INTERVAL) claims the sagas
whose pivot committed and that are not settled, and sends ONE message per batch: the chain
`<settlement task>(saga_ids) | saga.settled` (saga.engine.settlement_chain). The
participant settles the whole batch in one statement, idempotent by its own rows' status,
and returns the batch sealed; `saga.settled` stamps `settled_at` on those sagas.

At least once, end to end: a claim stamps `settlement_sent_at`, and a saga still unsettled
once the settlement's deadline has passed since then is sent again (a lost message, a
worker that died, an expired authority); a send that fails gives its claim back at once.
A duplicate, or a racing copy, settles nothing twice. Concurrent sweepers claim disjoint
sagas (`FOR UPDATE SKIP LOCKED`).
"""

import logging
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from common.exceptions import InvalidMessage
from common.signing import batch_seal_verify

from .definition import Step, registered_definitions
from .engine import settlement_chain
from .models import SagaInstance

logger = logging.getLogger(__name__)

DB = "orders"
SAGA = f'"{SagaInstance._meta.db_table}"'


def _settled_by() -> dict[tuple[str, str], tuple[Step, list[tuple[str, int]]]]:
    """Each registered settlement, by (step name, task), with the (name, version) of the
    definitions it settles (version 2 of a saga usually keeps version 1's)."""
    groups: dict[tuple[str, str], tuple[Step, list[tuple[str, int]]]] = {}
    for definition in registered_definitions():
        if (step := definition.settlement) is not None:
            groups.setdefault((step.name, step.task), (step, []))[1].append((definition.name, definition.version))
    return groups


def saga_settlements_send(*, now: datetime | None = None, batch: int | None = None) -> dict[str, int]:
    """Claim up to `batch` unsettled sagas past their pivot, per settlement step, and send
    each group its one settlement message; return how many sagas were sent.

    A saga is claimed when it was never sent, or was sent longer ago than its settlement's
    deadline (`Step.deadline_seconds`) and is still not settled. The claim is one
    statement (autocommitted, or with the caller's transaction), and the message goes out
    after it commits: a crash in between only delays the saga to its next deadline.
    """
    now = now or timezone.now()
    batch = batch or settings.SAGA_SWEEP_BATCH
    sent: Counter[str] = Counter()
    for step, definitions in _settled_by().values():
        with connections[DB].cursor() as cursor:
            cursor.execute(
                f"UPDATE {SAGA} SET settlement_sent_at = %s WHERE id IN ("
                f"SELECT id FROM {SAGA} WHERE pivot_committed_at IS NOT NULL AND settled_at IS NULL "
                "AND (settlement_sent_at IS NULL OR settlement_sent_at < %s) "
                "AND (definition, definition_version) IN "
                "(SELECT * FROM unnest(%s::varchar[], %s::integer[])) "
                "ORDER BY pivot_committed_at LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id",
                [
                    now,
                    now - timedelta(seconds=step.deadline_seconds),
                    [name for name, _ in definitions],
                    [version for _, version in definitions],
                    batch,
                ],
            )
            saga_ids = [saga_id for (saga_id,) in cursor.fetchall()]
        if saga_ids:
            transaction.on_commit(lambda s=step, ids=saga_ids: _send(s, ids), using=DB)  # type: ignore[misc]
            sent[f"settlement_sent:{step.name}"] += len(saga_ids)
    return dict(sent)


def _send(step: Step, saga_ids: list[Any]) -> None:
    try:
        settlement_chain(step, saga_ids=saga_ids).apply_async()
    except Exception:
        logger.exception(
            "sending the settlement %s of %d sagas failed; the next sweep sends it again", step.name, len(saga_ids)
        )
        _unclaim(saga_ids)


def _unclaim(saga_ids: list[Any]) -> None:
    """Give back the claim of a batch whose message did not go out, so the next sweep
    claims and sends it again rather than after the settlement's deadline. A send that
    raised after the broker took the message then settles twice, which changes nothing
    (the participant settles by its rows' status). If this fails too, the claim stands
    and the deadline sends the batch again."""
    try:
        with connections[DB].cursor() as cursor:
            cursor.execute(
                f"UPDATE {SAGA} SET settlement_sent_at = NULL WHERE id = ANY(%s::uuid[]) AND settled_at IS NULL",
                [saga_ids],
            )
    except Exception:
        logger.exception("the settlement's claim of %d sagas stands until its deadline", len(saga_ids))


def saga_settled(*, step: str, output: Any) -> int:
    """Record that the settlement `step` settled the sagas its sealed `output` names
    (the settlement task's return value); the number newly settled.

    Idempotent: a saga already settled is left as it is. Only sagas past their pivot whose
    definition names that settlement are stamped. InvalidMessage if `output` is not what
    the settlement task sealed, or names a task no registered definition settles with.
    """
    task, saga_ids = batch_seal_verify(output)
    if (settles := _settled_by().get((step, task))) is None:
        raise InvalidMessage(f"no registered saga definition settles {step!r} with {task}")
    definitions = settles[1]
    with connections[DB].cursor() as cursor:
        cursor.execute(
            f"UPDATE {SAGA} SET settled_at = now() WHERE id = ANY(%s::uuid[]) AND settled_at IS NULL "
            "AND pivot_committed_at IS NOT NULL AND (definition, definition_version) IN "
            "(SELECT * FROM unnest(%s::varchar[], %s::integer[]))",
            [saga_ids, [name for name, _ in definitions], [version for _, version in definitions]],
        )
        return cursor.rowcount
