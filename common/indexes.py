"""A migration operation that drops indexes no query needs, found in PostgreSQL's catalogue.

Every index is written on every insert, and on every update that is not heap-only: the
saga's step rows are written about ten times a saga, none of them heap-only. Two kinds of
index Django makes cost that and serve no query here (docs/DECISIONS.md, "No index without
a query"):

- `LIKE`: the `varchar_pattern_ops` twin PostgreSQL's schema editor adds beside a unique or
  indexed `CharField`, for `LIKE 'prefix%'`. Every lookup of these keys is by equality; an
  admin search (`icontains`) starts with a wildcard, which this index cannot serve.
- `PLAIN`: a one-column index on a column another index starts with (a foreign key's index
  beside a unique `(saga_id, name)`), which serves the same lookups.

The indexes are found by what they are (table, column, kind), not by name: Django's names
end in a hash of the table and column, and an index built by hand with the same shape goes
too. `DROP INDEX` holds the table's exclusive lock only to drop the catalogue entry and the
file, but waits behind a transaction already writing the table.

A later `AlterField` of a `unique=True` `CharField` may build its `LIKE` twin again (the
schema editor does); the migration that changes such a field drops it again with this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from django.db import migrations

Kind = Literal["like", "plain"]
LIKE: Kind = "like"
PLAIN: Kind = "plain"

# One-column, non-unique, non-partial btree indexes on a column, with their definitions.
_FIND = """
SELECT i.relname, pg_get_indexdef(i.oid)
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_am am ON am.oid = i.relam
JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = x.indkey[0]
WHERE t.oid = to_regclass(%s) AND x.indnatts = 1 AND a.attname = %s
  AND NOT x.indisunique AND NOT x.indisprimary AND x.indpred IS NULL AND x.indexprs IS NULL
  AND am.amname = 'btree'
ORDER BY i.relname
"""


def _is_pattern_ops(definition: str) -> bool:
    return "varchar_pattern_ops" in definition or "text_pattern_ops" in definition


def _found(cursor: Any, table: str, column: str, kind: Kind) -> list[str]:
    cursor.execute(_FIND, [table, column])
    return [name for name, definition in cursor.fetchall() if _is_pattern_ops(definition) == (kind == LIKE)]


class DropRedundantIndexes(migrations.RunPython):
    """Drop, for each `(model name, column, kind)` of `app_label`, the index of that kind.

    `rename` keeps a `PLAIN` index under a name the model's `Meta.indexes` gives it (one
    whose `db_index=True` became a named index): `{(model name, column): new name}`.
    Reversed, it builds the dropped indexes again under Django's names (and renames back).
    Does nothing on a database other than PostgreSQL, or one that has none of them.
    """

    def __init__(
        self,
        app_label: str,
        indexes: Sequence[tuple[str, str, Kind]],
        *,
        rename: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.app_label, self.indexes, self.rename = app_label, list(indexes), dict(rename or {})
        super().__init__(self._forward, self._backward)

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (
            f"{__name__}.{type(self).__name__}",
            [self.app_label, self.indexes],
            {"rename": self.rename} if self.rename else {},
        )

    def describe(self) -> str:
        return f"Drop {len(self.indexes)} redundant indexes of {self.app_label}"

    def _table(self, apps: Any, model_name: str) -> str:
        return str(apps.get_model(self.app_label, model_name)._meta.db_table)

    def _forward(self, apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        with schema_editor.connection.cursor() as cursor:
            for model_name, column, kind in self.indexes:
                table = self._table(apps, model_name)
                for name in _found(cursor, table, column, kind):
                    if (model_name, column) in self.rename and kind == PLAIN:
                        continue
                    schema_editor.execute(f"DROP INDEX IF EXISTS {quote(name)}")
            for (model_name, column), new_name in self.rename.items():
                plain = _found(cursor, self._table(apps, model_name), column, PLAIN)
                if plain and new_name not in plain:
                    schema_editor.execute(f"ALTER INDEX {quote(plain[0])} RENAME TO {quote(new_name)}")

    def _backward(self, apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        for (model_name, column), new_name in self.rename.items():
            table = self._table(apps, model_name)
            old_name = schema_editor._create_index_name(table, [column])
            schema_editor.execute(f"ALTER INDEX IF EXISTS {quote(new_name)} RENAME TO {quote(old_name)}")
        for model_name, column, kind in self.indexes:
            table = self._table(apps, model_name)
            if (model_name, column) in self.rename and kind == PLAIN:
                continue
            suffix, ops = ("_like", " varchar_pattern_ops") if kind == LIKE else ("", "")
            name = schema_editor._create_index_name(table, [column], suffix=suffix)
            schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {quote(name)} ON {quote(table)} ({quote(column)}{ops})")
