"""Refuse a deployment that dropped a saga definition version still in use (issue 14).

A saga runs to its end on the version it started with (saga.definition), so every
process that acts on sagas needs each version an unfinished saga (running, compensating,
or needing attention: an operator may still retry it) is on. The same test runs

- as a Django system check on the `orders` database: `manage.py check --database orders`
  (with `--deploy` too), and `migrate --database=orders`, which a deploy runs first;
- at the start of the coordinator's processes: the saga and orders workers (worker_init)
  and the web process (orders_project.wsgi), which refuse to start;
- as `manage.py saga_versions`, which also shows how many sagas each version still has.
"""

import logging
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections
from django.db.models import Count

from .definition import registered_versions
from .models import UNFINISHED_STATUSES, SagaInstance
from .selectors import saga_version_counts

logger = logging.getLogger(__name__)

DB = "orders"
# The processes that read or write the saga store (the participants' roles cannot).
COORDINATOR_SERVICES = ("saga", "orders")


def stored_version_counts() -> dict[tuple[str, int], int]:
    """saga_version_counts, also on a saga store that `migrate` has not brought up to date
    (a deploy's `migrate` runs this check first): no table yet means no saga, and a table
    from before versions means every saga is on version 1."""
    connection = connections[DB]
    table = SagaInstance._meta.db_table
    with connection.cursor() as cursor:
        if table not in connection.introspection.table_names(cursor):
            return {}
        columns = {column.name for column in connection.introspection.get_table_description(cursor, table)}
    if "definition_version" in columns:
        return saga_version_counts()
    rows = SagaInstance.objects.using(DB).filter(status__in=UNFINISHED_STATUSES).values("definition")
    return {(name, 1): n for name, n in rows.annotate(n=Count("id")).values_list("definition", "n")}


def versions_in_use_unregistered() -> list[tuple[str, int, int]]:
    """(name, version, unfinished sagas) of each version in use that this process lacks.
    Raises DatabaseError when the saga store cannot be read."""
    registered = registered_versions()
    return [
        (name, version, count)
        for (name, version), count in sorted(stored_version_counts().items())
        if version not in registered.get(name, [])
    ]


def refusal(missing: list[tuple[str, int, int]]) -> str:
    """What a refused deployment is told: which versions, how many sagas, what to do."""
    lines = [
        f"saga definition {name!r} version {version} is not registered (SAGA_DEFINITIONS), but {count} unfinished "
        f"saga(s) still run on it"
        for name, version, count in missing
    ]
    return (
        "; ".join(lines)
        + ". Keep that version in SAGA_DEFINITIONS until `manage.py saga_versions` shows no saga on it "
        "(docs/OPERATIONS.md, 'Changing a saga')."
    )


def check_saga_versions(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """System checks `saga.E003` (a SAGA_DEFINITIONS path that does not load), on every
    `check`, and `saga.E001`, which reads the saga store and so runs only when the command
    names the orders database (`check --database orders`, `migrate --database=orders`)."""
    try:
        registered_versions()
    except ImproperlyConfigured as error:
        return [checks.Error(str(error), id="saga.E003")]
    if not databases or DB not in databases:
        return []
    try:
        missing = versions_in_use_unregistered()
    except DatabaseError as error:
        return [checks.Error(f"cannot read the saga store to check saga versions: {error}", id="saga.E002")]
    if not missing:
        return []
    return [checks.Error(refusal(missing), id="saga.E001")]


def register() -> None:
    checks.register(check_saga_versions, "saga")


def refuse_start_without_versions_in_use() -> None:
    """Exit, naming what is missing, if a saga in use runs on a version this deployment
    does not register. Called at the start of a process that uses the saga store.

    If the store cannot be read now the process starts anyway (a database that is down is
    not a bad deployment): `migrate` and `manage.py saga_versions` have checked.
    """
    try:
        missing = versions_in_use_unregistered()
    except DatabaseError:
        logger.warning("could not read the saga store to check saga versions at start-up", exc_info=True)
        return
    except ImproperlyConfigured as error:
        logger.critical("refusing to start: %s", error)
        raise SystemExit(f"refusing to start: {error}") from None
    finally:
        # Not carried into forked pool processes or request threads.
        connections[DB].close()
    if missing:
        message = f"refusing to start: {refusal(missing)}"
        logger.critical(message)
        # SystemExit, not an exception: Celery's signal dispatch logs exceptions and goes on.
        raise SystemExit(message)


def on_worker_init(**_: Any) -> None:
    """Celery's worker_init: the saga and orders workers check before they take a message.
    The participants' workers do not: their database roles cannot read the saga store."""
    if settings.CELERY_SERVICE in COORDINATOR_SERVICES:
        refuse_start_without_versions_in_use()
