"""What each process's database role may do (docs/SECURITY.md, docs/DECISIONS.md "Security").

Migrations run as each database's owner. Every process runs as a role of its own that owns
nothing: DML on the tables of the apps its job uses, SELECT where it only reads, and no
access at all to anything else (PostgreSQL refuses it). Flower has no database role.

`grant_process_roles` applies this to one database; `migrate` (common's) runs it as the
owner after every migration, so new tables are covered the moment they exist. The roles
themselves, and CONNECT on the databases, come from whoever creates roles (a superuser):
devstack.roles for `make run` and `make test`, docker/postgres/init.sh for compose.
"""

from __future__ import annotations

from typing import Any

READ = "SELECT"
WRITE = "SELECT, INSERT, UPDATE, DELETE"

# What the result backend needs: every worker stores failed tasks' results (and the saga
# worker reads them: saga.failure, saga.progress).
_RESULTS = {"django_celery_results": WRITE}

# process role -> database alias -> app label -> privileges. The orders and saga workers
# share one role: the saga store lives beside the orders (ARCHITECTURE.md "Databases").
POLICY: dict[str, dict[str, dict[str, str]]] = {
    "web": {
        "default": {
            "auth": WRITE,  # users, groups, permissions (the admin), last_login
            "sessions": WRITE,
            "admin": WRITE,  # the admin's change log
            "common": WRITE,  # API tokens (hashed)
            "contenttypes": READ,
            # The admin shows task results and the beat schedule; beat owns the schedule.
            "django_celery_results": READ,
            "django_celery_beat": READ,
        },
        "orders": {"orders": WRITE, "saga": WRITE},  # placing and cancelling orders, the admin's saga actions
        "inventory": {"inventory": READ},  # the catalogue
        "payments": {"payments": READ},
        "notifications": {"notifications": READ},
    },
    "beat": {"default": {"django_celery_beat": WRITE}},
    "orders_worker": {"default": _RESULTS, "orders": {"orders": WRITE, "saga": WRITE}},
    "inventory_worker": {"default": _RESULTS, "inventory": {"inventory": WRITE}},
    "payments_worker": {"default": _RESULTS, "payments": {"payments": WRITE}},
    "notifications_worker": {"default": _RESULTS, "notifications": {"notifications": WRITE}},
}

# Tables where a role gets less than its app's privileges: the columns its job writes, no
# more. The inventory worker moves stock (reserve, release, sell); a product's price and
# name are the catalogue's, which the web quotes orders from, so a worker that could set
# them could sell any product for a cent to whoever orders next.
#
# Orders and sagas are never deleted, and an operator's audit entry never changes once
# written: a role that places orders and runs sagas could otherwise erase a finished saga
# and write it again as one in flight (which the coordinator would compensate, refund
# included; the migrations' triggers refuse turning a finished one back), or rewrite who
# retried or compensated what.
_KEEP = "SELECT, INSERT, UPDATE"
_ORDER_STORE = {
    "orders_order": _KEEP,
    "orders_orderline": _KEEP,
    "saga_sagainstance": _KEEP,
    "saga_sagastep": _KEEP,
    "saga_sagaauditentry": "SELECT, INSERT",
}
TABLE_PRIVILEGES: dict[str, dict[str, str]] = {
    "web": _ORDER_STORE,
    "orders_worker": _ORDER_STORE,
    "inventory_worker": {"inventory_product": "SELECT, UPDATE (reserved, on_hand, updated_at)"},
}

# The Procfile process (or compose service) -> its role in POLICY. Flower reads the broker
# only, and gets no database credentials at all (DATABASE_LOGIN=none).
PROCESS_ROLES = {
    "web": "web",
    "beat": "beat",
    "orders": "orders_worker",
    "saga": "orders_worker",
    "inventory": "inventory_worker",
    "payments": "payments_worker",
    "notifications": "notifications_worker",
}


def grant_process_roles(alias: str, roles: dict[str, str]) -> list[str]:
    """Grant each process role (POLICY name -> PostgreSQL role) exactly its privileges on
    the tables of database `alias`, after revoking everything it had there; return the
    statements run.

    Preconditions: run as the database's owner (who may grant on its own tables), after
    `migrate` created them; the roles exist. Idempotent.
    """
    from django.apps import apps
    from django.db import connections
    from psycopg import sql

    connection = connections[alias]
    tables = set(connection.introspection.table_names())
    statements: list[Any] = []
    with connection.cursor() as cursor:
        for name, role in sorted(roles.items()):
            grantee = sql.Identifier(role)
            statements.append(
                sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(grantee),
            )
            statements.append(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {}").format(grantee))
            allowed = POLICY[name].get(alias, {})
            statements.append(
                sql.SQL(
                    ("GRANT CONNECT ON DATABASE {} TO {}") if allowed else "REVOKE CONNECT ON DATABASE {} FROM {}"
                ).format(sql.Identifier(connection.settings_dict["NAME"]), grantee)
            )
            for label, privileges in sorted(allowed.items()):
                try:
                    models = apps.get_app_config(label).get_models(include_auto_created=True)
                except LookupError:
                    continue
                for table in sorted({m._meta.db_table for m in models} & tables):
                    granted = TABLE_PRIVILEGES.get(name, {}).get(table, privileges)
                    statements.append(
                        sql.SQL("GRANT " + granted + " ON TABLE {} TO {}").format(sql.Identifier(table), grantee)
                    )
                    if "INSERT" in granted:
                        for sequence in _owned_sequences(cursor, table):
                            statements.append(
                                sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {} TO {}").format(
                                    sql.Identifier(sequence), grantee
                                )
                            )
        texts = [statement.as_string(connection.connection) for statement in statements]
        for text in texts:
            cursor.execute(text)
    return texts


def _owned_sequences(cursor: Any, table: str) -> list[str]:
    """The sequences behind a table's serial or identity columns."""
    cursor.execute(
        """
        SELECT s.relname FROM pg_class s
        JOIN pg_depend d ON d.objid = s.oid AND d.deptype IN ('a', 'i')
        JOIN pg_class t ON t.oid = d.refobjid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE s.relkind = 'S' AND t.relname = %s AND n.nspname = 'public'
        """,
        [table],
    )
    return [row[0] for row in cursor.fetchall()]
