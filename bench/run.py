"""`make bench`: the saga system's throughput and latency, beside its baselines, in one run.

    python -m bench [--orders 2000] [--rate 20] [--fail-rate 0.1] [--broker redis|amqp]
                    [--latency-seconds 20] [--history 0] [--only saga|bare|floor ...] [--rounds 1]

On fresh `*_bench` databases on the configured (or embedded) PostgreSQL and the configured
broker (a Redis database of its own, or the RabbitMQ vhost `saga_bench`), it measures:

1. the floor: the same database work in one process, no broker (bench.floor);
2. the saga system, the Procfile's web, five workers and beat, driven over its HTTP API:
   saturation (N orders as fast as 8 clients can post them), N orders started without
   HTTP (`order_place` called in this process, as a script or another service would), then
   latency at a fixed rate (`--rate`, and half of the measured saturation);
3. a bare Celery chain of the same steps (bench.bare, bench.bare_web) under the same load,
   started the same two ways;
4. with `--rounds N` (N > 1): the two systems' saturation phases again, N - 1 more times,
   the bare chain first in even rounds (saga, bare | bare, saga | saga, bare ...); the
   throughput ratios are then the median of each round's (saga / bare chain in the same
   round), so a box whose speed drifts during the run (this project's box: the one-process
   floor measured 388 to 523 sagas/s within an hour; a freshly booted one sped up by 60 %
   over eight minutes) does not favour whichever system ran while it was fast, nor the one
   that always runs second in a round;
5. with `--history N`: N finished sagas seeded in bulk, then the saga phases again.

It prints a table, writes bench/results/latest.json and bench/results/latest.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from devstack import services, stack
from devstack.topology import WORKERS, Process, Topology, free_port, wait_for

from .load import Client, ProcessGroups, RetryableResponse, Run, System, make_orders, measure_phases, work_counters

logger = logging.getLogger("bench")

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS = BASE_DIR / "bench" / "results"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/saga_bench"
BENCH_REDIS_DB = "12"
SKUS = [f"BENCH-{i:03d}" for i in range(50)]
RSS_SAMPLE_SECONDS = 15.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench ARGS=...", description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000, help="orders in the saturation phase (default 2000)")
    parser.add_argument("--rate", type=float, default=20.0, help="fixed rate of the first latency phase (default 20/s)")
    parser.add_argument("--fail-rate", type=float, default=0.1, help="share of declined cards (default 0.1)")
    parser.add_argument("--broker", choices=("redis", "amqp"), default="redis", help="broker (default redis)")
    parser.add_argument(
        "--latency-seconds", type=float, default=20.0, help="how long each fixed-rate phase submits (default 20)"
    )
    parser.add_argument("--history", type=int, default=0, help="then seed N finished sagas and measure again")
    parser.add_argument(
        "--only", nargs="+", choices=("floor", "saga", "bare"), default=["floor", "saga", "bare"], help="systems to run"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="saturation rounds of each system; the bare chain runs first in even rounds (default 1)",
    )
    parser.add_argument("--seed", type=int, default=5, help="random seed of the order mix (default 5)")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json", help="JSON results file")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.rate <= 0 or args.latency_seconds <= 0 or args.history < 0 or args.rounds < 1:
        parser.error("--orders, --rate, --latency-seconds and --rounds must be positive, --history not negative")
    if not 0 <= args.fail_rate <= 1:
        parser.error("--fail-rate is a share between 0 and 1")
    return args


# --- setup -----------------------------------------------------------------------------------


def _broker_url(args: argparse.Namespace, urls: services.ServiceURLs) -> str:
    if args.broker == "redis":
        return stack.with_redis_db(urls["CELERY_BROKER_URL"], BENCH_REDIS_DB)
    return os.environ.get("BENCH_AMQP_URL", DEFAULT_AMQP_URL)


def _environment(args: argparse.Namespace, urls: services.ServiceURLs, data_dir: Path) -> dict[str, str]:
    db_urls = {key: stack.with_database_suffix(urls[key], "_bench") for key in stack.ALIASES.values()}
    broker_url = _broker_url(args, urls)
    # A killed run's workers would take this run's messages: refused before anything is reset.
    _no_other_consumers(broker_url)
    services.ensure_databases(db_urls, recreate=True)
    if args.broker == "redis":
        stack._flush_redis(broker_url)
    else:
        if not stack._fresh_amqp_vhost(broker_url):
            raise services.ServiceError(
                f"no AMQP broker answers at {services.redact_url(broker_url)} (set BENCH_AMQP_URL)"
            )
    env = stack._base_env(BASE_DIR, {**db_urls, "CELERY_BROKER_URL": broker_url})
    redis_url = stack.with_redis_db(urls["CELERY_BROKER_URL"], BENCH_REDIS_DB)
    if args.broker == "amqp" and redis_url.startswith("redis"):
        # As in production with RabbitMQ: the breaker and rate limits still share Redis.
        env.update(PAYMENT_BREAKER_REDIS_URL=redis_url, CACHE_URL=redis_url)
    env.update(
        EMAIL_FILE_PATH=str(data_dir / "mail"),
        SMS_FILE_PATH=str(data_dir / "sms"),
        # A load generator, not an abusive customer: the per-user rate limit stays out of the way.
        ORDER_CREATE_RATE="100000000/minute",
        # Production settings: no per-query bookkeeping (DEBUG), no redirect to HTTPS (no
        # proxy in front), a strong key.
        DEBUG="false",
        SECURE_SSL_REDIRECT="false",
        SECRET_KEY=os.urandom(32).hex(),
    )
    return env


@contextlib.contextmanager
def one_bench_at_a_time(base_dir: Path | None = None) -> Iterator[None]:
    """Hold `<base_dir>/.data/bench.lock` for a whole bench, or raise ServiceError at once.

    Every bench drops and re-creates the same `*_bench` databases, empties the same broker
    database and `.data/bench`: a second one started beside a running one wrecked it (its
    web answered 500 once its databases were dropped). Checked before anything is touched.
    The lock is the kernel's (flock): a killed bench leaves nothing to clean up.
    """
    with services.exclusive_lock(
        (base_dir or BASE_DIR) / ".data" / "bench.lock",
        deadline=time.monotonic(),
        busy="another bench is running in this checkout (pid {pid}, holding {lock}): "
        "wait for it to end, or stop it; two would drop each other's databases",
    ):
        yield


@contextlib.contextmanager
def in_process_on_bench_databases() -> Iterator[None]:
    """Django set up in this process on fresh, migrated `*_bench` databases (Redis as the
    broker), for the in-process measurements (bench.web_cpu, bench.pivot_cpu); the
    embedded servers are stopped afterwards if this started them."""
    with one_bench_at_a_time(), _on_bench_databases():
        yield


@contextlib.contextmanager
def _on_bench_databases() -> Iterator[None]:
    urls = services.ensure_services(BASE_DIR)
    data_dir = BASE_DIR / ".data" / "bench"
    shutil.rmtree(data_dir, ignore_errors=True)
    try:
        env = _environment(argparse.Namespace(broker="redis"), urls, data_dir)
        stack.migrate_all(BASE_DIR, env)
        _setup_django(env)
        yield
    finally:
        _stop_cache_listeners()
        services.release(BASE_DIR, urls)


def _stop_cache_listeners() -> None:
    """The web's caches' listeners that placing orders in this process started (the
    no-HTTP phase), before the servers they listen to stop."""
    if "common.notified_cache" in sys.modules:
        sys.modules["common.notified_cache"].stop_listeners()


def _setup_django(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_project.settings")
    import django

    django.setup()


def _seed_catalogue() -> None:
    from decimal import Decimal

    from inventory.services import product_upsert

    for sku in SKUS:
        product_upsert(sku=sku, name=f"Bench product {sku}", price=Decimal("10.00"), on_hand=1_000_000_000)


def _api_token() -> str:
    from django.contrib.auth import get_user_model

    from common.tokens import api_token_create

    user = get_user_model().objects.create_user(username="bench", password=os.urandom(16).hex())
    return api_token_create(user=user)[1]


def machine(broker_url: str) -> dict[str, Any]:
    from django.db import connections

    with connections["orders"].cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg_version = cursor.fetchone()[0]
    if broker_url.startswith("redis"):
        import redis

        info = redis.Redis.from_url(broker_url).info("server")
        broker = (
            f"{'valkey' if 'valkey_version' in info else 'redis'} {info.get('valkey_version') or info['redis_version']}"
        )
    else:
        from kombu import Connection

        with Connection(broker_url) as connection:
            props = connection.connection.server_properties if connection.connect() else {}
            broker = f"{props.get('product', 'amqp')} {props.get('version', '?')}"
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "broker": broker,
        "platform": platform.platform(),
    }


def process_groups(processes: dict[str, Process], broker: str) -> ProcessGroups:
    groups = ProcessGroups()
    for name, process in processes.items():
        if process.popen is not None:
            groups.add_tree(name, process.popen.pid)
    groups.add_process("bench client", os.getpid())
    groups.add_named("postgresql", "postgres")
    groups.add_named("broker", *(("redis-server", "valkey-server") if broker == "redis" else ("beam.smp",)))
    return groups


# --- the saga system ----------------------------------------------------------------------------


def saga_post(base_url: str, token: str) -> Callable[[Any, dict[str, Any]], str]:
    def post(session: Any, order: dict[str, Any]) -> str:
        response = session.post(
            f"{base_url}/api/orders/",
            json={
                "email": order["email"],
                "items": [{"sku": order["sku"], "quantity": order["quantity"]}],
                "payment_token": order["token"],
            },
            headers={"Authorization": f"Token {token}", "Idempotency-Key": order["order_id"]},
            timeout=30,
        )
        if response.status_code >= 500 or response.status_code == 429:
            raise RetryableResponse(f"{response.status_code} {response.text[:200]}")
        if response.status_code != 202:
            raise RuntimeError(f"order refused: {response.status_code} {response.text[:300]}")
        return response.json()["id"]

    return post


def saga_start_direct(user_id: int) -> Callable[[Any, dict[str, Any]], str]:
    """Start an order as a script or another service would: `orders.services.order_place`,
    in this process (its own database connection per thread), no HTTP, no DRF."""
    from orders.services import OrderItem, order_place, request_fingerprint

    def start(_session: Any, order: dict[str, Any]) -> str:
        payload = {
            "email": order["email"],
            "items": [{"sku": order["sku"], "quantity": order["quantity"]}],
            "payment_token": order["token"],
        }
        placed, _ = order_place(
            user_id=user_id,
            email=order["email"],
            phone="",
            items=[OrderItem(sku=order["sku"], quantity=order["quantity"])],
            payment_token=order["token"],
            idempotency_key=order["order_id"],
            fingerprint=request_fingerprint(payload),
        )
        return str(placed.id)

    return start


def saga_finished(keys: list[str]) -> dict[str, tuple[float, str]]:
    from django.db import connections

    with connections["orders"].cursor() as cursor:
        cursor.execute(
            "SELECT order_id::text, extract(epoch FROM finished_at)::float8, status FROM saga_sagainstance "
            "WHERE order_id = ANY(%s::uuid[]) AND finished_at IS NOT NULL",
            [keys],
        )
        outcome = {"completed": "confirmed", "compensated": "failed"}
        return {row[0]: (row[1], outcome.get(row[2], row[2])) for row in cursor.fetchall()}


# The saga steps table's row for a failure's way through the coordinator (saga_step_times).
COORDINATOR_HOP = "failure -> compensation"


def saga_step_times(keys: list[str]) -> dict[str, dict[str, Any]]:
    """Per step: queue wait (published -> started) and work (started -> finished), p50/p95 in ms."""
    from django.db import connections

    from .load import percentiles

    with connections["orders"].cursor() as cursor:
        cursor.execute(
            "SELECT s.name, extract(epoch FROM s.started_at - s.queued_at)::float8, "
            "extract(epoch FROM s.finished_at - s.started_at)::float8 "
            "FROM saga_sagastep s JOIN saga_sagainstance i ON i.id = s.saga_id "
            "WHERE i.order_id = ANY(%s::uuid[]) AND s.status = 'succeeded' "
            "AND s.queued_at IS NOT NULL AND s.started_at IS NOT NULL ORDER BY s.position",
            [keys],
        )
        rows = cursor.fetchall()
        # A failed saga's hop through the coordinator: from the failed step's end (its
        # attempt's own time, carried on its failure report) to its compensation chain's
        # publication (the first compensation's queued_at): the errback's queue wait and
        # the coordinator's work. Steps marked not_needed are never published.
        cursor.execute(
            "SELECT extract(epoch FROM c.published - f.finished_at)::float8 "
            "FROM saga_sagainstance i JOIN saga_sagastep f ON f.saga_id = i.id AND f.phase = 'forward' "
            "AND f.status = 'failed' AND f.finished_at IS NOT NULL "
            "JOIN (SELECT saga_id, min(queued_at) AS published FROM saga_sagastep "
            "WHERE phase = 'compensation' AND queued_at IS NOT NULL GROUP BY saga_id) c ON c.saga_id = i.id "
            "WHERE i.order_id = ANY(%s::uuid[])",
            [keys],
        )
        hops = [max(row[0], 0.0) for row in cursor.fetchall()]
    by_step: dict[str, tuple[list[float], list[float]]] = {}
    for name, wait, work in rows:
        waits, works = by_step.setdefault(name, ([], []))
        waits.append(max(wait, 0.0))
        works.append(max(work, 0.0))
    times: dict[str, dict[str, Any]] = {
        name: {"samples": len(waits), "queue_wait_ms": _p(percentiles(waits)), "work_ms": _p(percentiles(works))}
        for name, (waits, works) in by_step.items()
    }
    if hops:
        times[COORDINATOR_HOP] = {"samples": len(hops), "queue_wait_ms": _p(percentiles(hops)), "work_ms": None}
    return times


# How many of a fixed-rate phase's slowest orders the results keep with their steps' times.
SLOWEST = 5


def saga_slowest(run: Run, count: int = SLOWEST) -> list[dict[str, Any]]:
    """A fixed-rate phase's `count` slowest orders, slowest first, each with its steps in the
    order they started: when each was queued, started and finished, in ms from the order's
    intended send time. Where a tail order's time went (a queue, a step's work, the
    coordinator's hop), which its phase's percentiles cannot say."""
    from django.db import connections

    slow = sorted(
        ((done[0] - run.intended[key], key, done[1]) for key, done in run.finished.items() if key in run.intended),
        reverse=True,
    )[:count]
    if not slow:
        return []
    with connections["orders"].cursor() as cursor:
        cursor.execute(
            "SELECT i.order_id::text, s.name, extract(epoch FROM s.queued_at)::float8, "
            "extract(epoch FROM s.started_at)::float8, extract(epoch FROM s.finished_at)::float8 "
            "FROM saga_sagastep s JOIN saga_sagainstance i ON i.id = s.saga_id "
            "WHERE i.order_id = ANY(%s::uuid[]) AND s.started_at IS NOT NULL ORDER BY s.started_at",
            [[key for _, key, _ in slow]],
        )
        rows = cursor.fetchall()

    def ms(at: float | None, key: str) -> float | None:
        return None if at is None else round((at - run.intended[key]) * 1000, 1)

    steps: dict[str, list[dict[str, Any]]] = {}
    for key, name, queued, started, finished in rows:
        times = {"queued_ms": ms(queued, key), "started_ms": ms(started, key), "finished_ms": ms(finished, key)}
        steps.setdefault(key, []).append({"step": name, **times})
    return [
        {"order": key, "outcome": outcome, "latency_ms": round(latency * 1000, 1), "steps": steps.get(key, [])}
        for latency, key, outcome in slow
    ]


def _p(values: dict[str, float]) -> dict[str, float]:
    return {k: values[k] for k in ("p50", "p95")}


class SagaSystem(System):
    name = "saga"

    def __init__(self, env: dict[str, str], log_dir: Path, broker: str, token: str) -> None:
        self.topology = Topology(env=env, log_dir=log_dir)
        self.broker = broker
        self.token = token
        self.rss: dict[str, Any] = {}
        self.completed = self._completed_before = 0  # orders ended so far, for the RSS samples
        self._stop_sampling = threading.Event()

    def __enter__(self) -> SagaSystem:
        logger.info("starting the saga system (web, %s, beat)", ", ".join(WORKERS))
        self.topology.start()
        self.groups = process_groups(self.topology.processes, self.broker)
        self.work = work_counters(self.topology.env, self.broker, poll_alias="orders")
        self.rss = {name: {"start_mb": self.groups.rss_mb(name)} for name in WORKERS}
        self.rss["samples"] = []
        threading.Thread(target=self._sample_rss, daemon=True).start()
        self.client = Client(saga_post(self.topology.base_url, self.token))
        from django.contrib.auth import get_user_model

        self.direct_client = Client(saga_start_direct(get_user_model().objects.get(username="bench").id))
        return self

    def _sample_rss(self) -> None:
        # The curve, not just the ends: growth that levels off is warm-up, growth that
        # keeps its slope is a leak.
        started = time.monotonic()
        while not self._stop_sampling.wait(RSS_SAMPLE_SECONDS):
            sample = {name: self.groups.rss_mb(name) for name in WORKERS}
            self.rss["samples"].append({"s": round(time.monotonic() - started), "ended": self.completed, **sample})

    def __exit__(self, *exc: object) -> None:
        self._stop_sampling.set()
        for name in WORKERS:
            self.rss[name]["end_mb"] = self.groups.rss_mb(name)
        self.topology.stop()

    def finished(self, keys: list[str]) -> dict[str, tuple[float, str]]:
        done = saga_finished(keys)
        self.completed = self._completed_before + len(done)
        return done

    def run(self, name: str, orders: list[dict[str, Any]], rate: float | None, **options: Any) -> Run:
        self._completed_before = self.completed
        return super().run(name, orders, rate, **options)


# --- the run ----------------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    with one_bench_at_a_time():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    urls = services.ensure_services(BASE_DIR)
    data_dir = BASE_DIR / ".data" / "bench"
    shutil.rmtree(data_dir, ignore_errors=True)
    try:
        env = _environment(args, urls, data_dir)
        logger.info("migrating the bench databases")
        stack.migrate_all(BASE_DIR, env)
        _setup_django(env)
        _seed_catalogue()
        token = _api_token()
        results = measure(args, env, token, data_dir)
        results["wall_s"] = round(time.monotonic() - started, 1)
    finally:
        _stop_cache_listeners()
        services.release(BASE_DIR, urls)
    args.output = args.output.resolve()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    from .report import draw, table

    print(table(results))
    png = args.output.with_suffix(".png")
    draw(results, png)
    # An --output outside the checkout (/tmp/run.json) is named as given.
    shown = [p.relative_to(BASE_DIR) if p.is_relative_to(BASE_DIR) else p for p in (args.output, png)]
    logger.info("wrote %s and %s", *shown)
    return 0


def measure(args: argparse.Namespace, env: dict[str, str], token: str, data_dir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    results: dict[str, Any] = {
        "command": "make bench ARGS=" + json.dumps(" ".join(sys.argv[1:])) if sys.argv[1:] else "make bench",
        "machine": machine(env["CELERY_BROKER_URL"]),
        "broker": args.broker,
        "orders": args.orders,
        "fail_rate": args.fail_rate,
    }

    def orders(count: int) -> list[dict[str, Any]]:
        return make_orders(count, fail_rate=args.fail_rate, skus=SKUS, rng=rng)

    if "floor" in args.only:
        from .floor import run_floor

        logger.info("floor: %d orders in one process, no broker", args.orders)
        floor = run_floor(orders(args.orders), {k: env[k] for k in stack.ALIASES.values()})
        results["floor_sagas_per_s"] = round(floor["sagas_per_s"], 1)
        logger.info("  floor: %.1f sagas/s", floor["sagas_per_s"])

    half: float | None = None
    if "saga" in args.only:
        saga = measure_saga(args, env, token, data_dir / "saga", orders)
        results["saga"] = saga
        results["sagas_per_s"] = saga["saturation"]["sagas_per_s"]
        half = round(results["sagas_per_s"] / 2, 1)
        results["latency_ms"] = {
            "rate_20": saga["rate_20"]["latency_ms"],
            "rate_half": saga["rate_half"]["latency_ms"],
        }
    if "bare" in args.only:
        from .bare_run import measure_bare

        bare = measure_bare(args, env, data_dir / "bare", orders, half_rate=half, groups_for=process_groups)
        results["bare_chain"] = bare
        results["bare_chain_sagas_per_s"] = bare["saturation"]["sagas_per_s"]
    if args.rounds > 1 and {"saga", "bare"} <= set(args.only):
        # measure_bare: imported above, where the first round's bare chain ran.
        rounds = [{**round_figures(results["saga"], results["bare_chain"]), "first": round_order(1)[0]}]
        for number in range(2, args.rounds + 1):
            order = round_order(number)
            logger.info("round %d of %d: both systems' saturation phases, %s first", number, args.rounds, order[0])
            again: dict[str, dict[str, Any]] = {}
            for system in order:
                if system == "saga":
                    again[system] = measure_saga(
                        args, env, token, data_dir / f"saga-{number}", orders, saturation_only=True
                    )
                else:
                    again[system] = measure_bare(
                        args,
                        env,
                        data_dir / f"bare-{number}",
                        orders,
                        half_rate=half,
                        groups_for=process_groups,
                        saturation_only=True,
                    )
            rounds.append({**round_figures(again["saga"], again["bare"]), "first": order[0]})
        results["rounds"] = rounds
    if args.history and "saga" in args.only:
        from .history import seed_history

        logger.info("seeding %d finished sagas of history", args.history)
        from django.conf import settings
        from django.contrib.auth import get_user_model

        user_id = get_user_model().objects.get(username="bench").id
        seconds = seed_history(args.history, env, user_id=user_id, currency=settings.CURRENCY)
        results["history"] = {"sagas": args.history, "seed_s": seconds}
        results["history"]["saga"] = measure_saga(args, env, token, data_dir / "saga-history", orders, half=half)
    results["ratios"] = ratios(results)
    return results


def measure_saga(
    args: argparse.Namespace,
    env: dict[str, str],
    token: str,
    log_dir: Path,
    orders: Callable[[int], list[dict[str, Any]]],
    half: float | None = None,
    saturation_only: bool = False,
) -> dict[str, Any]:
    def describe(run: Run) -> dict[str, Any]:
        slowest = {"slowest": saga_slowest(run)} if run.rate else {}
        return {**run.summary(), "steps": saga_step_times(list(run.finished)), **slowest}

    with SagaSystem(env, log_dir, args.broker, token) as system:
        out = measure_phases(
            system, "saga", orders, args, half_rate=half, describe=describe, saturation_only=saturation_only
        )
    out["worker_rss_mb"] = system.rss
    return out


def round_order(number: int) -> tuple[str, str]:
    """The systems in the order round `number` (from 1) runs them: the saga first in odd
    rounds (the first round's saga phases set the bare chain's latency rate), the bare chain
    first in even ones. A box whose speed drifts during the run then favours each system in
    as many rounds as the other, not always the one that runs second."""
    return ("bare", "saga") if number % 2 == 0 else ("saga", "bare")


def round_figures(saga: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """One round's saturation figures of both systems, and their ratios in that round."""
    out: dict[str, Any] = {}
    for phase, suffix in (("saturation", ""), ("direct", "_without_http")):
        ours, theirs = (saga.get(phase) or {}), (bare.get(phase) or {})
        if ours.get("sagas_per_s") and theirs.get("sagas_per_s"):
            out[f"saga{suffix}_sagas_per_s"] = ours["sagas_per_s"]
            out[f"bare{suffix}_sagas_per_s"] = theirs["sagas_per_s"]
            out[f"saga_vs_bare{suffix}_throughput"] = round(ours["sagas_per_s"] / theirs["sagas_per_s"], 3)
            if ours.get("cpu_ms_per_saga") and theirs.get("cpu_ms_per_saga"):
                out[f"cpu_per_saga{suffix}_vs_bare"] = round(ours["cpu_ms_per_saga"] / theirs["cpu_ms_per_saga"], 2)
    return out


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    saga, bare, floor = (
        results.get("sagas_per_s"),
        results.get("bare_chain_sagas_per_s"),
        results.get("floor_sagas_per_s"),
    )
    if saga and bare:
        out["saga_vs_bare_throughput"] = round(saga / bare, 3)
    saga_direct = (results.get("saga") or {}).get("direct", {}).get("sagas_per_s")
    bare_direct = (results.get("bare_chain") or {}).get("direct", {}).get("sagas_per_s")
    if saga_direct and bare_direct:
        out["saga_vs_bare_without_http_throughput"] = round(saga_direct / bare_direct, 3)
    rounds = results.get("rounds") or []
    for key in ("saga_vs_bare_throughput", "saga_vs_bare_without_http_throughput"):
        each = [r[key] for r in rounds if key in r]
        if len(each) > 1:
            # Each round's systems ran minutes apart, not the whole run apart: the median of
            # the rounds' ratios is the run's figure, and the rounds show the spread.
            out[key] = round(statistics.median(each), 3)
            out[f"{key}_rounds"] = each
    if saga and floor:
        out["saga_vs_floor_throughput"] = round(saga / floor, 3)
    if bare and floor:
        out["bare_vs_floor_throughput"] = round(bare / floor, 3)
    bare_lat = results.get("bare_chain", {}).get("latency_ms", {})
    for key in ("rate_20", "rate_half"):
        ours = results.get("latency_ms", {}).get(key, {}).get("p99")
        theirs = bare_lat.get(key, {}).get("p99")
        if ours and theirs:
            out[f"p99_{key}_vs_bare"] = round(ours / theirs, 2)
    for key in ("rate_20", "rate_half"):
        # At one rate for both systems: each saga's own work, without the cheaper messages
        # that a system running at twice the rate gets at its saturation (report.same_rate_cpu).
        ours = (results.get("saga") or {}).get(key, {}).get("cpu_ms_per_saga")
        theirs = (results.get("bare_chain") or {}).get(key, {}).get("cpu_ms_per_saga")
        if ours and theirs:
            out[f"cpu_per_saga_{key}_vs_bare"] = round(ours / theirs, 2)
    history = results.get("history", {}).get("saga")
    if history and saga:
        out["history_vs_empty_throughput"] = round(history["saturation"]["sagas_per_s"] / saga, 3)
        ours = results["latency_ms"]["rate_20"]["p99"]
        if ours:
            out["history_vs_empty_p99_rate_20"] = round(history["rate_20"]["latency_ms"]["p99"] / ours, 2)
    return out


def _interrupt(signum: int, _frame: object) -> None:
    # A SIGTERM stops the run like Ctrl-C does: the systems' processes are stopped on the
    # way out, never left consuming the bench broker (where a later run's messages, signed
    # with its own key, would be refused by them).
    raise KeyboardInterrupt


def _no_other_consumers(broker_url: str) -> None:
    """Raise ServiceError if workers consume the bench broker. A broker that does not answer,
    or a RabbitMQ vhost not created yet, has none: the run's own setup reports the broker."""
    from amqp.exceptions import NotAllowed
    from celery import Celery
    from kombu.exceptions import OperationalError

    saved = os.environ.get("CELERY_BROKER_URL")
    os.environ["CELERY_BROKER_URL"] = broker_url  # Celery prefers it to the app's argument
    try:
        replies = Celery("bench-check", broker=broker_url, fixups=[]).control.ping(timeout=1.0)
    except (NotAllowed, OperationalError, OSError):
        replies = []
    finally:
        if saved is not None:
            os.environ["CELERY_BROKER_URL"] = saved
    if replies:
        names = sorted(name for reply in replies for name in reply)
        raise services.ServiceError(
            f"workers are already consuming the bench broker ({', '.join(names)}): another `make bench` is "
            "running, or one was killed and left them behind; stop them first"
        )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except services.DevstackError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


__all__ = ["free_port", "main", "wait_for"]
