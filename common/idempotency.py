"""Idempotency by business key, recorded in the same transaction as the effect.

Every saga message may arrive twice (acks_late redelivery, a re-published chain step,
an errback fired twice). A participant therefore:

1. takes a per-saga advisory lock inside its transaction (`saga_lock`), which
   serialises the forward step and its compensation for one saga, so the
   "has the undo already run?" check cannot race with the undo itself;
2. returns the stored result when the key was already processed;
3. writes its effect and the key (`ProcessedKey`, unique) in the same transaction.

Keys read `<saga_id>:<step>:<do|undo>`.
"""

import hashlib
import json
import uuid
from typing import Any

from django.db import connections, models, router


def step_key(saga_id: str | uuid.UUID, step: str, direction: str) -> str:
    if direction not in ("do", "undo"):
        raise ValueError(f"direction must be 'do' or 'undo', not {direction!r}")
    return f"{saga_id}:{step}:{direction}"


def saga_lock(*, using: str, saga_id: str | uuid.UUID) -> None:
    """Serialise every transaction of this participant that touches `saga_id`.

    Precondition: inside `transaction.atomic(using=using)`; the lock is released at
    commit or rollback (pg_advisory_xact_lock).
    """
    digest = hashlib.blake2b(str(saga_id).encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])


class ProcessedKeyBase(models.Model):
    """One row per processed step message; the unique key is the idempotency guard."""

    key = models.CharField(max_length=200, unique=True)
    result = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return self.key


def processed_result(model: type[ProcessedKeyBase], key: str) -> dict[str, Any] | None:
    """The stored result for `key`, or None. Precondition: `saga_lock` held."""
    return processed_results(model, key).get(key)


def processed_results(model: type[ProcessedKeyBase], *keys: str) -> dict[str, dict[str, Any]]:
    """The stored results of those of `keys` already processed, in one query (a step checks
    its own key and its undo's tombstone together). Precondition: `saga_lock` held.

    Plain SQL, like `processed_record`: both run on every step, where the ORM's query
    building cost more CPU than the query (BENCHMARKS.md).
    """
    using = router.db_for_read(model)
    table = connections[using].ops.quote_name(model._meta.db_table)
    with connections[using].cursor() as cursor:
        cursor.execute(f'SELECT "key", "result" FROM {table} WHERE "key" = ANY(%s)', [list(keys)])
        return {key: result if isinstance(result, dict) else json.loads(result) for key, result in cursor.fetchall()}


def processed_record(model: type[ProcessedKeyBase], key: str, result: dict[str, Any], *, if_new: bool = False) -> None:
    """Record `key` as processed. Precondition: same transaction as the effect, and either
    `saga_lock` held or `if_new` (a concurrent copy that recorded it first wins, and this
    record is dropped: for an effect that is the same whichever copy made it)."""
    using = router.db_for_write(model)
    table = connections[using].ops.quote_name(model._meta.db_table)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f'INSERT INTO {table} ("key", "result", "created_at") VALUES (%s, %s::jsonb, now())'
            + (' ON CONFLICT ("key") DO NOTHING' if if_new else ""),
            [key, json.dumps(result)],
        )
