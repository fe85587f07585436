"""Writing several rows of several models in one statement."""

import datetime
import decimal
import functools
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connections, models

from .sql import prepared


def insert_together(using: str, *groups: Sequence[models.Model]) -> None:
    """Insert every instance of `groups` (each a list of one model's new instances, parents
    before children) in one statement: one round trip and, with no transaction open, one
    commit of its own.

    What `Model.objects.create` / `bulk_create` would write: each field's `pre_save` value
    (auto_now and the like are set on the instance), converted by PostgreSQL from JSON to
    the column's type, auto primary keys read back into the
    instances in order (Django's bulk_create relies on PostgreSQL returning them in the
    order of VALUES too), and the instances marked saved. Foreign keys between the groups
    hold: PostgreSQL checks them at the end of the statement. Raises IntegrityError as
    `create` would (nothing is written then).
    """
    groups = tuple(g for g in groups if g)
    if not groups:
        return
    statement, plans = _insert_plan(using, tuple(type(group[0]) for group in groups))
    params = [
        # The rows as one JSON array, typed by the table's own row type: one parameter per
        # table, so the statement's text and plan are the same whatever the number of rows.
        json.dumps(
            [{column: f.pre_save(instance, add=True) for column, f in fields} for instance in group],
            default=_json_value,
        )
        for group, (fields, _) in zip(groups, plans, strict=True)
    ]
    with prepared(using) as cursor:
        cursor.execute(statement, params)
        ids = iter(cursor.fetchone())
    for group, (_, auto) in zip(groups, plans, strict=True):
        if auto is not None:
            for instance, value in zip(group, next(ids), strict=True):
                setattr(instance, auto.attname, value)
        for instance in group:
            instance._state.adding, instance._state.db = False, using


@functools.cache
def _insert_plan(
    using: str, model_types: tuple[type[models.Model], ...]
) -> tuple[str, list[tuple[list[tuple[str, models.Field]], models.Field | None]]]:
    """`insert_together`'s statement for groups of these models on `using`, and for each
    group the (column, field) pairs it writes and its auto primary key (None if it has
    none): built once per process, not on every call."""
    quote = connections[using].ops.quote_name
    ctes, returning, plans = [], [], []
    for index, model in enumerate(model_types):
        meta = model._meta
        auto: models.Field | None = meta.pk if isinstance(meta.pk, models.AutoField) else None
        fields = [f for f in meta.concrete_fields if f is not auto]
        columns = ", ".join(quote(str(f.column)) for f in fields)
        table = quote(meta.db_table)
        name = f"i{index}"
        ctes.append(
            f"{name} AS (INSERT INTO {table} ({columns}) SELECT {columns} "
            f"FROM jsonb_populate_recordset(NULL::{table}, %s::jsonb) "
            f"RETURNING {quote(str(auto.column)) if auto else '1'})"
        )
        if auto:
            returning.append(f"(SELECT array_agg({quote(str(auto.column))}) FROM {name})")
        plans.append(([(str(f.column), f) for f in fields], auto))
    return f"WITH {', '.join(ctes)} SELECT {', '.join(returning) or '1'}", plans


def update_together(using: str, *groups: tuple[Sequence[models.Model], Iterable[str] | None]) -> None:
    """Write the named fields (None: every field) of each group's saved instances, each
    group one model's, in one statement: one round trip, and the statement's text the same
    whatever the number of rows (each table's rows go as one JSON parameter, typed by the
    table's row type). It is planned for its rows at every execution (common.sql.prepared,
    `plan_once=False`): it joins tables that grow by a key array.

    What `save(update_fields=...)` would write, auto_now fields included (set on the
    instances). Precondition: the caller holds the rows' locks, or may overwrite them.
    """
    sql, params = update_statement(using, *groups)
    if sql:
        with prepared(using, plan_once=False) as cursor:
            cursor.execute(sql, params)


def update_statement(using: str, *groups: tuple[Sequence[models.Model], Iterable[str] | None]) -> tuple[str, list[Any]]:
    """`update_together`'s statement and parameters ("" when there is nothing to write)."""
    groups = tuple((g, n) for g, n in groups if g)
    if not groups:
        return "", []
    statement, plans = _update_plan(
        using, tuple((type(group[0]), None if names is None else frozenset(names)) for group, names in groups)
    )
    params: list[Any] = []
    for (group, _), (pk_column, fields) in zip(groups, plans, strict=True):
        params.append(
            json.dumps(
                [
                    {pk_column: instance.pk} | {column: f.pre_save(instance, add=False) for column, f in fields}
                    for instance in group
                ],
                default=_json_value,
            )
        )
        params.append([instance.pk for instance in group])
    return statement, params


@functools.cache
def _update_plan(
    using: str, shapes: tuple[tuple[type[models.Model], frozenset[str] | None], ...]
) -> tuple[str, list[tuple[str, list[tuple[str, models.Field]]]]]:
    """`update_statement`'s text for groups of these (model, field names) shapes on `using`,
    and for each group its primary key column and the (column, field) pairs it writes:
    built once per process, not on every write (the coordinator writes on every report)."""
    connection = connections[using]
    quote = connection.ops.quote_name
    ctes: list[str] = []
    plans = []
    for index, (model, wanted) in enumerate(shapes):
        meta = model._meta
        fields = [
            f
            for f in meta.concrete_fields
            if not f.primary_key and (wanted is None or f.name in wanted or getattr(f, "auto_now", False))
        ]
        pk, table = quote(str(meta.pk.column)), quote(meta.db_table)
        assignments = ", ".join(f"{quote(str(f.column))} = v.{quote(str(f.column))}" for f in fields)
        # The keys again, as an array: PostgreSQL guesses 100 rows for the JSON of rows
        # (a function's result), which on a table of some thousand rows made a hash join
        # over a sequential scan of the whole table, for every write (BENCHMARKS.md); an
        # array's rows it counts, and finds them by the primary key index.
        ctes.append(
            f"u{index} AS (UPDATE {table} AS t SET {assignments} "
            f"FROM jsonb_populate_recordset(NULL::{table}, %s::jsonb) AS v "
            f"WHERE t.{pk} = v.{pk} AND t.{pk} = ANY(%s::{meta.pk.db_type(connection)}[]))"
        )
        plans.append((str(meta.pk.column), [(str(f.column), f) for f in fields]))
    return f"WITH {', '.join(ctes)} SELECT 1", plans


def _json_value(value: Any) -> Any:
    """A field value JSON has no type for, as text PostgreSQL reads back exactly (unlike
    DjangoJSONEncoder, which cuts datetimes to milliseconds)."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value insert_together can write")


def from_row(model: type[models.Model], fields: Sequence[Any], values: Sequence[Any], using: str) -> Any:
    """An instance of `model` from the raw values of its `fields`, as the ORM would read it
    (each field's `from_db_value` applied, e.g. JSON decoded)."""
    connection = connections[using]
    converted = [
        f.from_db_value(v, None, connection) if hasattr(f, "from_db_value") else v
        for f, v in zip(fields, values, strict=True)
    ]
    return model.from_db(using, [f.attname for f in fields], converted)
