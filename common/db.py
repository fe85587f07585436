"""Writing several new rows of several models in one statement."""

from collections.abc import Sequence

from django.db import connections, models


def insert_together(using: str, *groups: Sequence[models.Model]) -> None:
    """Insert every instance of `groups` (each a list of one model's new instances, parents
    before children) in one statement: one round trip and, with no transaction open, one
    commit of its own.

    What `Model.objects.create` / `bulk_create` would write: each field's `pre_save` value
    (auto_now and the like are set on the instance), auto primary keys read back into the
    instances in order (Django's bulk_create relies on PostgreSQL returning them in the
    order of VALUES too), and the instances marked saved. Foreign keys between the groups
    hold: PostgreSQL checks them at the end of the statement. Raises IntegrityError as
    `create` would (nothing is written then).
    """
    connection = connections[using]
    quote = connection.ops.quote_name
    ctes, params, returning = [], [], []
    for index, group in enumerate(g for g in groups if g):
        model = type(group[0])
        meta = model._meta
        auto = meta.pk if isinstance(meta.pk, models.AutoField) else None
        fields = [f for f in meta.concrete_fields if f is not auto]
        rows = []
        for instance in group:
            values = [f.get_db_prep_save(f.pre_save(instance, add=True), connection) for f in fields]
            rows.append("(" + ", ".join(["%s"] * len(values)) + ")")
            params.extend(values)
        name = f"i{index}"
        ctes.append(
            f"{name} AS (INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
            f"VALUES {', '.join(rows)} RETURNING {quote(auto.column) if auto else '1'})"
        )
        if auto:
            returning.append((group, auto, f"(SELECT array_agg({quote(auto.column)}) FROM {name})"))
    if not ctes:
        return
    final = ", ".join(sql for _, _, sql in returning) or "1"
    with connection.cursor() as cursor:
        cursor.execute(f"WITH {', '.join(ctes)} SELECT {final}", params)
        ids = cursor.fetchone()
    for (group, auto, _), values in zip(returning, ids, strict=False):
        for instance, value in zip(group, values, strict=True):
            setattr(instance, auto.attname, value)
    for group in groups:
        for instance in group:
            instance._state.adding, instance._state.db = False, using
