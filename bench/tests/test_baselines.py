"""The two baselines of `make bench` against real servers: the floor (bench.floor) and the
bare chain (bench.bare workers and bench.bare_web under gunicorn) each take the same mix of
orders to the same end states, with stock conserved.

Needs this machine's PostgreSQL at 127.0.0.1:5432 (user postgres, trust authentication) and
Redis at 127.0.0.1:6379, whose database 9 it flushes; skipped when either is unreachable.
It drops and recreates the databases saga_<alias>_bench_helper and migrates them.

    .venv/bin/python -m pytest bench/tests -q
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench import sql
from devstack.stack import ALIASES

pytestmark = pytest.mark.integration

BASE_DIR = Path(__file__).resolve().parents[2]


def _servers() -> tuple[str, str]:
    """The servers `make test` runs on (devstack passes their URLs), else this machine's."""
    from urllib.parse import urlsplit, urlunsplit

    urls = json.loads(os.environ.get("DEVSTACK_SERVER_URLS") or "{}")
    if "DATABASE_URL" not in urls or not urls.get("CELERY_BROKER_URL", "").startswith("redis"):
        return "postgres://postgres@127.0.0.1:5432", "redis://127.0.0.1:6379/9"
    database = urlsplit(urls["DATABASE_URL"])
    broker = urlsplit(urls["CELERY_BROKER_URL"])
    return urlunsplit(database._replace(path="")), urlunsplit(broker._replace(path="/9"))


SERVER, BROKER_URL = _servers()
QUEUES = ("inventory", "payments", "orders", "notifications")
ORDERS = 50
SCARCE_UNITS = 3
DEADLINE = 90.0
# As the Procfile runs the product's workers and web (the brief's two processes per queue).
WORKER = "celery -A bench.bare worker -Q {queue} -n bare-{queue}@%h --concurrency 2 -l INFO"
WEB = (
    "gunicorn bench.bare_web:app --bind 127.0.0.1:{port} "
    "--workers 2 --threads 4 --access-logfile - --graceful-timeout 5"
)


def _servers_missing() -> str | None:
    """Why the servers cannot be used, or None."""
    try:
        psycopg.connect(f"{SERVER}/postgres", connect_timeout=3).close()
    except psycopg.Error as error:
        return f"no PostgreSQL at {SERVER.rpartition('@')[2]} we can use ({error})".strip()
    import redis

    try:
        redis.Redis.from_url(BROKER_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        return f"no Redis at {BROKER_URL.rpartition('@')[2]} ({error})"
    return None


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, logs: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}\n{logs()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """Fresh, migrated helper databases and an empty broker database; the environment naming them."""
    if reason := _servers_missing():
        pytest.skip(reason)
    urls = {var: f"{SERVER}/saga_{alias}_bench_helper" for alias, var in ALIASES.items()}
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        for alias in ALIASES:
            admin.execute(f"DROP DATABASE IF EXISTS saga_{alias}_bench_helper WITH (FORCE)")
            admin.execute(f"CREATE DATABASE saga_{alias}_bench_helper")
    import redis

    redis.Redis.from_url(BROKER_URL).flushdb()
    environment = {**os.environ, **urls, "CELERY_BROKER_URL": BROKER_URL, "PYTHONUNBUFFERED": "1"}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    for alias in ALIASES:  # as devstack.stack.migrate_all does
        subprocess.run(
            [sys.executable, "manage.py", "migrate", f"--database={alias}", "--verbosity=0"],
            cwd=BASE_DIR,
            env=environment,
            check=True,
        )
    return environment


def make_orders(prefix: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """ORDERS one-unit orders: every tenth declined (from the 4th), every tenth (from the 6th)
    for a SKU with SCARCE_UNITS units, the rest spread over four plentiful SKUs.
    Returns the orders and the catalogue (SKU -> units on hand)."""
    catalogue = {f"{prefix}-{i}": 1_000 for i in range(4)} | {f"{prefix}-SCARCE": SCARCE_UNITS}
    orders = [
        {
            "order_id": str(uuid.uuid4()),
            "email": f"{prefix.lower()}{i}@example.com",
            "sku": f"{prefix}-SCARCE" if i % 10 == 5 else f"{prefix}-{i % 4}",
            "quantity": 1,
            "amount": "10.00",
            "token": "tok_chargeDeclined" if i % 10 == 3 else "tok_visa",
        }
        for i in range(ORDERS)
    ]
    return orders, catalogue


def seed(env: dict[str, str], catalogue: dict[str, int]) -> None:
    with sql.connect(env["INVENTORY_DATABASE_URL"]) as conn:
        for sku, units in catalogue.items():
            sql.setup_catalogue(conn, [sku], on_hand=units)


def rows(env: dict[str, str], var: str, query: str, ids: list[str]) -> list[tuple[Any, ...]]:
    with psycopg.connect(env[var]) as conn:
        return conn.execute(query, [ids]).fetchall()


def assert_every_order_ended_consistently(env: dict[str, str], orders: list[dict[str, Any]], catalogue) -> None:
    ids = [order["order_id"] for order in orders]
    declined = {o["order_id"] for o in orders if o["token"] == "tok_chargeDeclined"}
    scarce = {o["order_id"] for o in orders if o["sku"].endswith("-SCARCE")}
    plentiful_confirmed = set(ids) - declined - scarce

    status = {
        order_id: (state, reason, str(total))
        for order_id, state, reason, total in rows(
            env,
            "ORDERS_DATABASE_URL",
            "SELECT id::text, status, failure_reason, total FROM orders_order WHERE id = ANY(%s::uuid[])",
            ids,
        )
    }
    assert set(status) == set(ids)
    assert {status[i] for i in declined} == {("failed", sql.DECLINED, "10.00")}
    assert {status[i] for i in plentiful_confirmed} == {("confirmed", "", "10.00")}
    scarce_outcomes = sorted(status[i] for i in scarce)
    out_of_stock = len(scarce) - SCARCE_UNITS
    assert scarce_outcomes == [("confirmed", "", "10.00")] * SCARCE_UNITS + [("failed", sql.OUT_OF_STOCK, "10.00")] * (
        out_of_stock
    )
    confirmed = {i for i, (state, _, _) in status.items() if state == "confirmed"}
    stock_failed = {i for i, (_, reason, _) in status.items() if reason == sql.OUT_OF_STOCK}
    assert len(confirmed) == ORDERS - len(declined) - out_of_stock
    line_count = rows(
        env, "ORDERS_DATABASE_URL", "SELECT count(*) FROM orders_orderline WHERE order_id = ANY(%s::uuid[])", ids
    )
    assert line_count == [(ORDERS,)]

    # One notification per order, of its outcome; TERMINAL_SQL reads them as the harness will.
    notes = rows(
        env,
        "NOTIFICATIONS_DATABASE_URL",
        "SELECT order_id::text, kind, channel, status FROM notifications_notification WHERE order_id = ANY(%s::uuid[])",
        ids,
    )
    assert sorted(notes) == sorted((i, f"order_{status[i][0]}", "email", "sent") for i in ids), (
        "one sent email notification per order, nothing else"
    )
    with psycopg.connect(env["NOTIFICATIONS_DATABASE_URL"]) as conn:
        finished = sql.finished(conn, ids)
    assert {i: outcome for i, (_, outcome) in finished.items()} == {i: status[i][0] for i in ids}

    # A payment for each order that got its stock: captured when confirmed, else declined.
    payments = rows(
        env,
        "PAYMENTS_DATABASE_URL",
        "SELECT order_id::text, status, decline_code, amount::text FROM payments_payment "
        "WHERE order_id = ANY(%s::uuid[])",
        ids,
    )
    assert sorted(payments) == sorted(
        [(i, "captured", "", "10.00") for i in confirmed]
        + [(i, "declined", "card_declined", "10.00") for i in declined]
    ), "no payment for an order without stock"

    # Stock: held for confirmed orders, given back for declined ones, never taken for the rest.
    reservations = rows(
        env,
        "INVENTORY_DATABASE_URL",
        "SELECT order_id::text, status, quantity, released_at IS NOT NULL FROM inventory_reservation "
        "WHERE order_id = ANY(%s::uuid[])",
        ids,
    )
    assert sorted(reservations) == sorted(
        [(i, "held", 1, False) for i in confirmed] + [(i, "released", 1, True) for i in declined]
    )
    assert not stock_failed & {r[0] for r in reservations}
    products = rows(
        env,
        "INVENTORY_DATABASE_URL",
        "SELECT sku, on_hand, reserved FROM inventory_product WHERE sku = ANY(%s)",
        list(catalogue),
    )
    held_by_sku = {sku: 0 for sku in catalogue}
    sku_of = {o["order_id"]: o["sku"] for o in orders}
    for order_id in confirmed:
        held_by_sku[sku_of[order_id]] += 1
    assert sorted(products) == sorted((sku, units, held_by_sku[sku]) for sku, units in catalogue.items())


def test_the_floor_takes_every_order_to_its_end_with_stock_conserved(env):
    from bench.floor import run_floor

    orders, catalogue = make_orders("FLOOR")
    seed(env, catalogue)

    result = run_floor(orders, env)

    assert result["orders"] == ORDERS
    assert result["outcomes"] == {"confirmed": 43, "failed": 7}
    assert result["sagas_per_s"] == pytest.approx(ORDERS / result["seconds"])
    assert_every_order_ended_consistently(env, orders, catalogue)


# --- the bare chain -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Subprocesses in sessions of their own, so that stopping one stops its children."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> None:
        # The child keeps its own copy of the descriptor; ours is closed at once.
        log = open(self.log_dir / f"{name}.log", "wb")
        self.running[name] = subprocess.Popen(
            argv, cwd=BASE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (last lines)\n" + "\n".join((self.log_dir / f"{name}.log").read_text().splitlines()[-15:])
            for name in self.running
        )

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def bare_system(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Processes]]:
    """The bare chain's four workers (one per queue) and its web app; its base URL."""
    for program in ("celery", "gunicorn"):
        if not shutil.which(program, path=env["PATH"]):
            pytest.skip(f"{program} is not installed next to {sys.executable}")
    processes = Processes(env, tmp_path_factory.mktemp("bare-logs"))
    port = _free_port()
    try:
        for queue in QUEUES:
            processes.start(f"bare-{queue}", shlex.split(WORKER.format(queue=queue)))
        processes.start("bare-web", shlex.split(WEB.format(port=port)))
        base_url = f"http://127.0.0.1:{port}"
        _wait_until_up(base_url, processes)
        yield base_url, processes
    finally:
        processes.stop()


def _wait_until_up(base_url: str, processes: Processes) -> None:
    import requests
    from celery import Celery

    def web_answers() -> bool:
        try:
            return requests.get(f"{base_url}/orders/", timeout=2).status_code == 405
        except (requests.ConnectionError, requests.Timeout):
            return False

    wanted = {f"bare-{queue}@{socket.gethostname()}" for queue in QUEUES}

    # Not bench.bare's app. Celery prefers the environment's CELERY_BROKER_URL (under make
    # test: the test run's own broker database) to an app's `broker` argument, so the
    # variable names this test's broker while the app pings.
    saved = os.environ.get("CELERY_BROKER_URL")
    os.environ["CELERY_BROKER_URL"] = BROKER_URL
    app = Celery("bare-test", broker=BROKER_URL, fixups=[])

    def workers_answer() -> bool:
        replies = app.control.ping(destination=sorted(wanted), timeout=1.0)
        return wanted <= {name for reply in replies for name in reply}

    for name, process in processes.running.items():
        assert process.poll() is None, f"{name} exited at start\n{processes.logs()}"
    wait_for(web_answers, timeout=60, what="the bare web app", logs=processes.logs)
    try:
        wait_for(workers_answer, timeout=60, what=f"workers {sorted(wanted)} to answer a ping", logs=processes.logs)
    finally:
        if saved is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = saved


def test_the_bare_chain_takes_every_order_posted_to_its_end_with_stock_conserved(env, bare_system):
    import requests

    base_url, processes = bare_system
    orders, catalogue = make_orders("BARE")
    seed(env, catalogue)

    def post(order: dict[str, Any]) -> str:
        body = {k: order[k] for k in ("email", "sku", "quantity", "amount")}
        response = requests.post(
            f"{base_url}/orders/", json={**body, "payment_token": order["token"], "id": order["order_id"]}, timeout=10
        )
        assert response.status_code == 202, response.text
        return response.json()["id"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        returned = list(pool.map(post, orders))
    assert returned == [order["order_id"] for order in orders]

    ids = returned

    def all_notified() -> bool:
        with psycopg.connect(env["NOTIFICATIONS_DATABASE_URL"]) as conn:
            return len(sql.finished(conn, ids)) == ORDERS

    wait_for(all_notified, timeout=DEADLINE, what=f"{ORDERS} terminal notifications", logs=processes.logs)
    assert_every_order_ended_consistently(env, orders, catalogue)


def test_the_bare_web_app_refuses_what_it_cannot_use(bare_system):
    import requests

    base_url, _ = bare_system
    # An unknown SKU: the accepted orders below fail at reserve and touch no stock.
    good = {"email": "a@example.com", "sku": "BARE-UNKNOWN", "quantity": 1, "payment_token": "tok_visa"}

    assert requests.get(f"{base_url}/orders/", timeout=5).status_code == 405
    assert requests.post(f"{base_url}/nowhere/", json=good, timeout=5).status_code == 404
    assert requests.post(f"{base_url}/orders/", data=b"{not json", timeout=5).status_code == 400
    for field, value in (("email", "nope"), ("quantity", 0), ("quantity", "1"), ("payment_token", "visa")):
        response = requests.post(f"{base_url}/orders/", json={**good, field: value}, timeout=5)
        assert response.status_code == 400, (field, value, response.text)
    taken = str(uuid.uuid4())
    assert requests.post(f"{base_url}/orders/", json={**good, "id": taken}, timeout=5).status_code == 202
    assert requests.post(f"{base_url}/orders/", json={**good, "id": taken}, timeout=5).status_code == 409


def test_work_counters_count_a_phases_transactions_rows_wal_and_broker_commands():
    """What make bench reports as transactions, rows written, WAL and Redis commands per saga
    (bench.load.WorkCounters)."""
    import redis

    from bench.load import WorkCounters

    if reason := _servers_missing():
        pytest.skip(reason)
    # Databases of this test's own: pg_stat_database counts every session's transactions,
    # and other tests' workers publish theirs up to 10 s late.
    names = {alias: f"saga_counters_{alias}_test" for alias in ("inventory", "payments", "orders")}
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        for name in names.values():
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {name}")
    env = {"DATABASE_URL": f"{SERVER}/postgres", **{f"{a.upper()}_URL": f"{SERVER}/{n}" for a, n in names.items()}}
    aliases = {alias: f"{alias.upper()}_URL" for alias in names}
    counters = WorkCounters(env, aliases=aliases, poll_alias="payments", redis_url=BROKER_URL)
    with psycopg.connect(env["ORDERS_URL"], autocommit=True) as conn:
        conn.execute("CREATE TABLE counted (id int PRIMARY KEY, note text)")
    # Its catalog rows are published when its session ends: before the first reading.
    wait_for(lambda: counters.sample()["rows.orders"] > 0, timeout=30, what="the table's creation to be counted")
    started = time.monotonic()
    before = counters.sample()
    # Five transactions on inventory, seven on payments of which two are the load
    # generator's own polls, none on orders; three PFADDs (a command no worker or beat sends).
    # A new session's start-up counts as one transaction too (workers keep theirs).
    for alias, count in (("inventory", 5), ("payments", 7)):
        # No prepared statements: psycopg prepares a query run five times, one more transaction.
        with psycopg.connect(env[aliases[alias]], autocommit=True, prepare_threshold=None) as conn:
            for _ in range(count):
                conn.execute("SELECT 1")
    # Rows written on orders: four inserts, two updates and a delete, in one transaction of a
    # session of its own (two transactions with its start-up). Each writes WAL.
    with psycopg.connect(env["ORDERS_URL"], prepare_threshold=None) as conn:
        conn.execute("INSERT INTO counted SELECT i, repeat('x', 1000) FROM generate_series(1, 4) AS i")
        conn.execute("UPDATE counted SET note = 'y' WHERE id <= 2")
        conn.execute("DELETE FROM counted WHERE id = 4")
    client = redis.Redis.from_url(BROKER_URL)
    for i in range(3):
        client.pfadd("bench-counters-test", i)
    client.delete("bench-counters-test")

    # A backend publishes its counts when it exits (or has been idle a while): wait for them.
    after: dict[str, float] = {}

    def counted() -> dict[str, float] | None:
        after.update(counters.sample())
        delta = counters.delta(before, after, polls=2)
        published = delta["transactions.inventory"] >= 6 and delta["transactions.payments"] >= 6
        return delta if published and delta["rows.orders"] >= 7 else None

    delta = wait_for(counted, timeout=30, what="the transactions to reach pg_stat_database")
    # Autovacuum visits each database that has seen activity once a naptime (5 s on the
    # embedded server), and its visit's transactions count as ours do: ours are all there,
    # plus at most a couple a visit. (orders saw no activity: autovacuum leaves it alone.)
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        naptime = admin.execute("SELECT setting FROM pg_settings WHERE name = 'autovacuum_naptime'").fetchone()
    visits = 2 * (math.ceil((time.monotonic() - started) / float(naptime[0])) + 1)
    assert 5 + 1 <= delta["transactions.inventory"] <= 5 + 1 + visits
    assert 7 - 2 + 1 <= delta["transactions.payments"] <= 7 - 2 + 1 + visits
    # orders: the writing session's start-up and its transaction, and autovacuum's visits
    # now that it saw activity. Its seven rows (and, for autovacuum's ANALYZE, a few of
    # pg_statistic's); no rows written where only SELECTs ran.
    assert 2 <= delta["transactions.orders"] <= 2 + visits
    assert 7 <= delta["rows.orders"] <= 7 + 10 * visits
    assert delta["rows.inventory"] <= 10 * visits and delta["rows.payments"] <= 10 * visits
    # Server-wide: other tests' databases write WAL too. Ours alone is four rows of 1 kB.
    assert delta["wal.bytes"] >= 4 * 1000 and delta["wal.records"] >= 7
    # The load generator's polls come off its database's count, and only off that one.
    unpolled = counters.delta(before, after, polls=0)
    assert unpolled["transactions.payments"] - delta["transactions.payments"] == 2
    assert unpolled["transactions.inventory"] == delta["transactions.inventory"]
    assert delta["redis.pfadd"] == 3
    per_saga = WorkCounters.per_saga(delta, 3)
    transactions = {
        alias: round(delta[f"transactions.{alias}"] / 3, 2) for alias in ("inventory", "orders", "payments")
    }
    assert per_saga["transactions"] == {**transactions, "total": round(sum(transactions.values()), 2)}
    assert per_saga["rows_written"]["orders"] == round(delta["rows.orders"] / 3, 1)
    assert per_saga["wal"] == {
        "kb": round(delta["wal.bytes"] / 3 / 1024, 1),
        "records": round(delta["wal.records"] / 3, 1),
    }
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        for name in names.values():
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
