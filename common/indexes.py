"""A migration operation that drops the LIKE twins no query needs, found in PostgreSQL's catalogue.

Every index is written on every insert, and on every update that is not heap-only: the
saga's step rows are written about ten times a saga, none of them heap-only. Two kinds of
index Django makes cost that and serve no query here (docs/DECISIONS.md, "No index without
a query"):

- the `varchar_pattern_ops` ("LIKE") twin PostgreSQL's schema editor adds beside a unique
  or indexed `CharField`, for `LIKE 'prefix%'`. Every lookup of these keys is by equality;
  an admin search (`icontains`) starts with a wildcard, which this index cannot serve.
  Django has no field option for it: this operation drops it.
- a one-column index on a column another index starts with (a foreign key's index beside a
  unique `(saga_id, name)`): the field's `db_index=False`, and Django's own `AlterField`
  drops it.

The twins are found by what they are (table, column, operator class), not by name:
Django's names end in a hash of the table and column, and one built by hand goes too.
`DROP INDEX` holds the table's exclusive lock only to drop the catalogue entry and the
file, but waits behind a transaction already writing the table.

A later `AlterField` of a `unique=True` `CharField` may build its `LIKE` twin again (the
schema editor does); the migration that changes such a field drops it again with this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import migrations

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


def _indexes(cursor: Any, table: str, column: str, *, like: bool) -> list[str]:
    """The one-column indexes on `column`: the LIKE twins, or (`like=False`) the plain ones."""
    cursor.execute(_FIND, [table, column])
    return [name for name, definition in cursor.fetchall() if ("_pattern_ops" in definition) == like]


class DropLikeIndexes(migrations.RunPython):
    """Drop the LIKE twin of each `(model name, column)` of `app_label`.

    `keep_plain_as` renames a column's plain index to the name the model's `Meta.indexes`
    now gives it (a `db_index=True` that became a named index), so it is kept rather than
    built again: `{(model name, column): new name}`. Reversed, it builds the twins again
    under Django's names and renames the plain indexes back. Does nothing on a database
    other than PostgreSQL, or on one without them.
    """

    def __init__(
        self,
        app_label: str,
        columns: Sequence[tuple[str, str]],
        *,
        keep_plain_as: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.app_label, self.columns, self.keep_plain_as = app_label, list(columns), dict(keep_plain_as or {})
        super().__init__(self._forward, self._backward)

    def describe(self) -> str:
        return f"Drop {len(self.columns)} LIKE indexes of {self.app_label}"

    def _table(self, apps: Any, model_name: str) -> str:
        return str(apps.get_model(self.app_label, model_name)._meta.db_table)

    def _forward(self, apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        with schema_editor.connection.cursor() as cursor:
            for model_name, column in self.columns:
                for name in _indexes(cursor, self._table(apps, model_name), column, like=True):
                    schema_editor.execute(f"DROP INDEX IF EXISTS {quote(name)}")
            for (model_name, column), new_name in self.keep_plain_as.items():
                plain = _indexes(cursor, self._table(apps, model_name), column, like=False)
                if plain and new_name not in plain:
                    schema_editor.execute(f"ALTER INDEX {quote(plain[0])} RENAME TO {quote(new_name)}")

    def _backward(self, apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        for (model_name, column), new_name in self.keep_plain_as.items():
            old_name = schema_editor._create_index_name(self._table(apps, model_name), [column])
            schema_editor.execute(f"ALTER INDEX IF EXISTS {quote(new_name)} RENAME TO {quote(old_name)}")
        for model_name, column in self.columns:
            table = self._table(apps, model_name)
            name = schema_editor._create_index_name(table, [column], suffix="_like")
            schema_editor.execute(
                f"CREATE INDEX IF NOT EXISTS {quote(name)} ON {quote(table)} ({quote(column)} varchar_pattern_ops)"
            )
