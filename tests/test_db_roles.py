"""Least authority in the databases (docs/SECURITY.md): owners migrate, and each process runs
as a role that may do only its job. Every claim is checked by PostgreSQL itself, under the
settings each Procfile process really gets (its command's environment prefix), so what is
tested is what `make run` and the test topology run. That each process can still do its job
is what every system test (tests/test_order_saga.py, ...) shows, under these same roles.
"""

import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import uuid

import pytest
import requests
from django.conf import settings
from django.contrib.auth import get_user_model

from devstack.topology import BASE_DIR, Topology, read_procfile

from .api import make_product

pytestmark = pytest.mark.integration

ALIASES = ("default", "orders", "inventory", "payments", "notifications")
# The processes that use a database, and the service database each one's job is about.
PROCESSES = ("web", "beat", "orders", "saga", "inventory", "payments", "notifications")

# Runs each (alias, statement) in a transaction that is rolled back, under this process's
# settings, and reports "ok" or the error; and the role used for each alias.
PROBE = """
import json, sys
from django.db import connections, transaction
checks, seen = json.loads(sys.stdin.read()), {}
for alias, statement in checks:
    try:
        with transaction.atomic(using=alias):
            with connections[alias].cursor() as cursor:
                cursor.execute(statement)
            transaction.set_rollback(True, using=alias)
        seen[alias + " | " + statement] = "ok"
    except Exception as error:
        seen[alias + " | " + statement] = type(error).__name__ + ": " + " ".join(str(error).split())
print(json.dumps(seen))
"""


def process_env(process: str) -> dict[str, str]:
    """This test run's environment, with the variables the Procfile's command sets for `process`
    (e.g. CELERY_SERVICE=inventory DATABASE_LOGIN="${INVENTORY_WORKER_DB_LOGIN:-}")."""
    env = dict(os.environ)
    for word in shlex.split(read_procfile()[process]):
        assignment = re.fullmatch(r"([A-Z_]+)=(.*)", word)
        if not assignment:
            break
        env[assignment[1]] = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), assignment[2])
    return env


def probe(process: str, checks: list[tuple[str, str]]) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", PROBE],
        cwd=BASE_DIR,
        env=process_env(process),
        input=json.dumps(checks),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _reads(alias: str, table: str) -> tuple[str, str]:
    return alias, f"SELECT 1 FROM {table} LIMIT 1"


def _writes(alias: str, table: str) -> tuple[str, str]:
    return alias, f"DELETE FROM {table} WHERE false"


def _alters(alias: str, table: str) -> tuple[str, str]:
    return alias, f"ALTER TABLE {table} ADD COLUMN least_authority_probe integer"


WHO_AM_I = [(alias, "SELECT current_user") for alias in ALIASES]

# What no worker may touch in the default database: users, API tokens, sessions, the admin's
# log, the beat schedule. The token table's name is looked up: see `token_tables`.
PRIVATE_DEFAULT = ["auth_user", "auth_group", "django_session", "django_admin_log", "django_celery_beat_periodictask"]
RESULTS = "django_celery_results_taskresult"
SERVICE_TABLE = {
    "orders": "orders_order",
    "inventory": "inventory_reservation",
    "payments": "payments_payment",
    "notifications": "notifications_notification",
}


def token_tables() -> list[str]:
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_name IN ('authtoken_token', 'common_apitoken')"
        )
        return [row[0] for row in cursor.fetchall()]


def expectations(process: str, tokens: list[str]) -> dict[tuple[str, str], bool]:
    """(alias, statement) -> allowed, for one Procfile process."""
    own = {"orders": "orders", "saga": "orders"}.get(process, process)
    expected: dict[tuple[str, str], bool] = {}
    for table in [*PRIVATE_DEFAULT, *tokens]:
        if table == "django_celery_beat_periodictask":
            expected[_reads("default", table)] = process in ("web", "beat")
            expected[_writes("default", table)] = process == "beat"
        else:
            expected[_reads("default", table)] = expected[_writes("default", table)] = process == "web"
    expected[_writes("default", RESULTS)] = process not in ("web", "beat")
    expected[_reads("default", RESULTS)] = process != "beat"
    for alias, table in SERVICE_TABLE.items():
        expected[_reads(alias, table)] = process == "web" or alias == own
        expected[_writes(alias, table)] = alias == own or (process == "web" and alias == "orders")
        expected[_alters(alias, table)] = False  # only `migrate`, as the owner, changes a schema
    # Issue 13's settlement: the saga worker stamps its sagas settled, the inventory worker
    # sells reservations; nobody else writes either (the web's orders role covers the saga store).
    settle = ("orders", "UPDATE saga_sagainstance SET settlement_sent_at = now(), settled_at = now() WHERE false")
    sell = ("inventory", "UPDATE inventory_reservation SET status = 'sold', sold_at = now() WHERE false")
    expected[settle] = process in ("web", "orders", "saga")
    expected[sell] = process == "inventory"
    # The catalogue: the inventory worker moves stock, and nobody but the owner sets what a
    # product costs (the web quotes orders from it), adds or removes one.
    expected[_reads("inventory", "inventory_product")] = process in ("web", "inventory")
    stock = (
        "inventory",
        "UPDATE inventory_product SET reserved = reserved, on_hand = on_hand, updated_at = now() WHERE false",
    )
    expected[stock] = process == "inventory"
    for catalogue in (
        "UPDATE inventory_product SET price = 0.01 WHERE false",
        "UPDATE inventory_product SET name = 'x' WHERE false",
        "DELETE FROM inventory_product WHERE false",
        "INSERT INTO inventory_product (sku, name, price, on_hand, reserved, created_at, updated_at) "
        "SELECT 'x', 'x', 0.01, 1, 0, now(), now() WHERE false",
    ):
        expected[("inventory", catalogue)] = False
    # The order store keeps what it wrote: orders and sagas are updated, never deleted (a
    # finished saga erased and written again in flight would be compensated, refund
    # included), and an operator's audit entry is only ever added.
    keeper = process in ("web", "orders", "saga")
    for table in ("orders_order", "orders_orderline", "saga_sagainstance", "saga_sagastep", "saga_sagaauditentry"):
        expected[("orders", f"DELETE FROM {table} WHERE false")] = False
        expected[("orders", f"UPDATE {table} SET id = id WHERE false")] = keeper and table != "saga_sagaauditentry"
    expected[
        (
            "orders",
            "INSERT INTO saga_sagaauditentry (saga_id, action, outcome, detail, username, status_before, "
            "status_after, failure_fingerprint, created_at) SELECT id, 'retry', 'done', '', '', status, status, '', "
            "now() FROM saga_sagainstance WHERE false",
        )
    ] = keeper
    expected[_alters("default", RESULTS)] = False
    expected[("default", "CREATE TABLE least_authority_probe (id integer)")] = False
    return expected


def test_each_process_may_do_its_job_and_postgresql_refuses_the_rest(db_access: None) -> None:
    tokens = token_tables()
    assert tokens, "no API token table in the default database"
    wanted = {process: expectations(process, tokens) for process in PROCESSES}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        seen = dict(zip(PROCESSES, pool.map(lambda p: probe(p, [*wanted[p], *WHO_AM_I]), PROCESSES), strict=True))

    wrong = {}
    for process, checks in wanted.items():
        for (alias, statement), allowed in checks.items():
            outcome = seen[process][f"{alias} | {statement}"]
            if allowed and outcome != "ok":
                wrong[f"{process} may: {alias} | {statement}"] = outcome
            elif not allowed and not re.search(r"permission denied|must be (the )?owner", outcome):
                wrong[f"{process} may not: {alias} | {statement}"] = outcome
    assert not wrong, json.dumps(wrong, indent=1)


def test_each_process_connects_as_its_own_role_which_owns_nothing(db_access: None) -> None:
    """A database a process has no business in refuses the connection itself, and no process
    role owns a database or a table (schema changes are `migrate`'s, as the owner)."""
    from django.db import connections

    for process in PROCESSES:
        seen = probe(process, WHO_AM_I)
        for alias in ALIASES:
            outcome = seen[f"{alias} | SELECT current_user"]
            reachable = process == "web" or alias == "default" or alias == {"saga": "orders"}.get(process, process)
            if reachable:
                assert outcome == "ok", (process, alias, outcome)
            else:
                assert f'permission denied for database "{settings.DATABASES[alias]["NAME"]}"' in outcome, (
                    process,
                    alias,
                    outcome,
                )

    logins = {process: process_env(process).get("DATABASE_LOGIN", "").partition(":")[0] for process in PROCESSES}
    assert all(logins.values()), f"a Procfile process without a database role of its own: {logins}"
    assert logins["orders"] == logins["saga"]  # the saga store lives beside the orders
    assert len(set(logins.values())) == 6
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT r.rolname, r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolbypassrls, "
            "EXISTS (SELECT 1 FROM pg_database d WHERE d.datdba = r.oid), "
            "EXISTS (SELECT 1 FROM pg_class c WHERE c.relowner = r.oid) "
            "FROM pg_roles r WHERE r.rolname = ANY(%s)",
            [list(set(logins.values()))],
        )
        rows = cursor.fetchall()
    assert sorted(rows) == sorted((role, False, False, False) for role in set(logins.values()))


def test_the_web_and_migrate_use_the_owners_only_to_migrate(db_access: None) -> None:
    """manage.py (this process too) uses each URL as given: the database's owner, never a superuser."""
    from django.db import connections

    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "SELECT r.rolsuper, d.datdba = r.oid FROM pg_roles r, pg_database d "
                "WHERE r.rolname = current_user AND d.datname = current_database()"
            )
            assert cursor.fetchone() == (False, True), alias


def test_flower_gets_no_database_credentials() -> None:
    """Flower reads the broker (events, inspect), never a database: it has no login to one."""
    env = process_env("flower")
    assert env.get("DATABASE_LOGIN") == "none"
    script = (
        "import django, json; django.setup(); from django.conf import settings; from django.db import connections\n"
        "print(json.dumps({a: connections[a].settings_dict['ENGINE'] for a in connections}))\n"
        "print(json.dumps(sorted({k for c in settings.DATABASES.values() for k in ('USER', 'PASSWORD') if c.get(k)})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env={**env, "DJANGO_SETTINGS_MODULE": "orders_project.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    engines, credentials = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert engines == {"default": "django.db.backends.dummy"}
    assert credentials == []


def test_the_running_webs_admin_shows_the_catalogue_read_only(topology: Topology, sku: str) -> None:
    """The web's role may only read inventory: its admin offers no product form to save,
    rather than failing on one (manage.py, as the owner, still may: tests/test_admin.py)."""
    product = make_product(sku, on_hand=3)
    password = uuid.uuid4().hex
    user = get_user_model().objects.create_superuser(username=f"admin-{uuid.uuid4().hex[:8]}", password=password)
    session = requests.Session()
    login = f"{topology.base_url}/admin/login/"
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', session.get(login, timeout=30).text)[1]
    session.post(
        login,
        data={"csrfmiddlewaretoken": csrf, "username": user.username, "password": password, "next": "/admin/"},
        headers={"Referer": login},
        timeout=30,
    )

    page = session.get(f"{topology.base_url}/admin/inventory/product/{product.pk}/change/", timeout=30)
    assert page.status_code == 200
    assert sku in page.text
    assert 'name="on_hand_delta"' not in page.text  # no form to adjust stock
    assert session.get(f"{topology.base_url}/admin/inventory/product/add/", timeout=30).status_code == 403
