"""Load generation and measurement for `make bench`: submit orders over HTTP, wait for their
terminal states, and account CPU and memory per process group.

Latency is measured open-loop: each order has an intended send time (start + i / rate) and
its latency runs from that time to the terminal timestamp the system wrote in its own
database, so a client that falls behind cannot hide the system's queueing (no coordinated
omission). Both clocks are this machine's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil
import psycopg
import requests
from psycopg.conninfo import conninfo_to_dict

logger = logging.getLogger("bench")

DECLINE_TOKEN = "tok_chargeDeclined"
APPROVE_TOKEN = "tok_visa"


def make_orders(count: int, *, fail_rate: float, skus: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """`count` one-line orders; about `fail_rate` of them carry a card the provider declines."""
    return [
        {
            "order_id": str(uuid.uuid4()),
            "email": f"bench{i}@example.com",
            "sku": rng.choice(skus),
            "quantity": 1,
            "amount": "10.00",
            "token": DECLINE_TOKEN if rng.random() < fail_rate else APPROVE_TOKEN,
        }
        for i in range(count)
    ]


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """p50/p95/p99/max of `values` (seconds) in milliseconds, rounded to 0.1 ms."""
    data = sorted(values)
    if not data:
        return {"p50": None, "p95": None, "p99": None, "max": None}

    def at(q: float) -> float:
        # Nearest rank: the value below which q of the samples fall.
        return data[min(len(data) - 1, max(0, round(q * len(data) + 0.5) - 1))]

    return {
        k: round(v * 1000, 1) for k, v in (("p50", at(0.50)), ("p95", at(0.95)), ("p99", at(0.99)), ("max", data[-1]))
    }


class Client:
    """Posts orders with one keep-alive HTTP session per thread."""

    def __init__(self, post: Callable[[requests.Session, dict[str, Any]], str]) -> None:
        self._post = post
        self._local = threading.local()

    def submit(self, order: dict[str, Any]) -> str:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        for attempt in range(20):
            try:
                return self._post(session, order)
            except (requests.ConnectionError, requests.Timeout, RetryableResponse) as error:
                if attempt == 19:
                    raise
                logger.debug("retrying a submit: %s", error)
                time.sleep(0.2)
        raise AssertionError("unreachable")


class RetryableResponse(Exception):
    pass


@dataclass
class Run:
    """One phase: what was sent when, and when each order reached its end."""

    name: str
    rate: float | None
    intended: dict[str, float] = field(default_factory=dict)  # key -> intended send time (epoch s)
    sent: dict[str, float] = field(default_factory=dict)
    finished: dict[str, tuple[float, str]] = field(default_factory=dict)  # key -> (epoch s, outcome)
    cpu: dict[str, float] = field(default_factory=dict)
    # Of `cpu`, what each tree group's root used: a Celery worker's main process (the
    # consumer: broker I/O, acks, task events), the rest being its pool's tasks.
    cpu_main: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    work: dict[str, float] = field(default_factory=dict)  # WorkCounters.delta, when counted
    polls: int = 0  # finished() calls: the load generator's own reads

    def latencies(self) -> list[float]:
        return [self.finished[k][0] - t for k, t in self.intended.items() if k in self.finished]

    def latencies_by_outcome(self) -> dict[str, dict[str, Any]]:
        """Latency percentiles of each outcome's orders (confirmed, failed), with their count:
        what a mixed phase's tail is made of."""
        by_outcome: dict[str, list[float]] = {}
        for key, intended in self.intended.items():
            if key in self.finished:
                finished_at, outcome = self.finished[key]
                by_outcome.setdefault(outcome, []).append(finished_at - intended)
        return {
            outcome: {"orders": len(values), **percentiles(values)} for outcome, values in sorted(by_outcome.items())
        }

    def throughput(self) -> float:
        if not self.finished:
            return 0.0
        first = min(self.sent.values())
        last = max(t for t, _ in self.finished.values())
        return len(self.finished) / max(last - first, 1e-9)

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, outcome in self.finished.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        sagas = max(len(self.finished), 1)

        def ms_per_saga(cpu: dict[str, float]) -> dict[str, float]:
            return {k: round(v * 1000 / sagas, 2) for k, v in sorted(cpu.items())}

        return {
            "rate": self.rate,
            "orders": len(self.intended),
            "finished": len(self.finished),
            "outcomes": self.outcomes(),
            "sagas_per_s": round(self.throughput(), 1),
            "latency_ms": percentiles(self.latencies()),
            # A saturation phase's latencies say nothing (all queued at once).
            **({"latency_ms_by_outcome": self.latencies_by_outcome()} if self.rate else {}),
            "cpu_cores": {k: round(v / self.wall, 3) for k, v in sorted(self.cpu.items())} if self.wall else {},
            "cpu_ms_per_saga": round(sum(self.cpu.values()) * 1000 / sagas, 2),
            "cpu_ms_per_saga_by_group": ms_per_saga(self.cpu),
            "cpu_ms_per_saga_main_process": ms_per_saga(self.cpu_main),
            "wall_s": round(self.wall, 1),
            **({"work_per_saga": WorkCounters.per_saga(self.work, len(self.finished))} if self.work else {}),
            # For the figure's distributions; a saturation phase's latencies say nothing (all queued at once).
            **({"latency_samples_ms": sorted(round(v * 1000, 1) for v in self.latencies())} if self.rate else {}),
        }


def drive(
    run: Run,
    orders: list[dict[str, Any]],
    client: Client,
    *,
    finished: Callable[[list[str]], dict[str, tuple[float, str]]],
    cpu: ProcessGroups,
    timeout: float,
    threads: int = 8,
    work: WorkCounters | None = None,
) -> Run:
    """Submit `orders` (at `run.rate` per second, or as fast as `threads` clients can when
    None), then poll `finished(keys)` until every order has ended or `timeout` passes.
    With `work`, also count the transactions and broker commands the phase cost."""
    keys: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start_work = work.settled_sample() if work else None
    start_cpu = cpu.sample()
    start = time.time()

    def send(i: int, order: dict[str, Any]) -> None:
        intended = start + i / run.rate if run.rate else time.time()
        delay = intended - time.time()
        if delay > 0:
            time.sleep(delay)
        sent = time.time()
        try:
            key = client.submit(order)  # the order id the system answered with
        except BaseException as error:  # reported after the phase: one failed submit must not hang it
            errors.append(error)
            return
        with lock:
            run.intended[key] = intended if run.rate else sent
            run.sent[key] = sent
            keys.append(key)

    # Open loop: enough threads that a slow response never delays the next intended send.
    pool_size = threads if run.rate is None else max(threads, int(run.rate * 0.5) + 4)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=pool_size)
    try:
        futures = [pool.submit(send, i, order) for i, order in enumerate(orders)]
        progress = Progress(run.name, len(orders))
        while not all(f.done() for f in futures):
            progress.show(submitted=len(keys), finished=None)
            time.sleep(0.5)
    finally:
        # On Ctrl-C the sends not begun are dropped: the executor's own exit would wait for
        # every one, to the end of the phase, before the run could stop.
        pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise RuntimeError(f"{len(errors)} orders could not be submitted; first: {errors[0]!r}")
    deadline = time.monotonic() + timeout
    progress = Progress(run.name, len(keys))
    # Asks only about the orders not yet ended: an order's end does not change once
    # written, and a poll of every key read rows the load generator had already seen, a
    # cost (in the systems' databases) that grew with the phase's length and so fell
    # hardest on the slower system.
    run.finished, waiting = {}, list(keys)
    while True:
        run.finished.update(finished(waiting))
        waiting = [key for key in waiting if key not in run.finished]
        run.polls += 1
        progress.show(submitted=len(keys), finished=len(run.finished))
        if len(run.finished) >= len(keys):
            break
        if time.monotonic() > deadline:
            logger.warning(
                "%s: %d of %d orders had not ended after %.0fs",
                run.name,
                len(keys) - len(run.finished),
                len(keys),
                timeout,
            )
            break
        time.sleep(0.25)
    end = max([t for t, _ in run.finished.values()] or [time.time()])
    run.wall = max(end - start, 1e-9)
    end_cpu = cpu.sample()
    run.cpu, run.cpu_main = cpu.delta(start_cpu, end_cpu), cpu.main_delta(start_cpu, end_cpu)
    progress.done(len(run.finished), run.throughput())
    if work and start_work is not None:
        run.work = work.delta(start_work, work.settled_sample(), polls=run.polls)
    return run


def work_counters(env: dict[str, str], broker: str, *, poll_alias: str) -> WorkCounters:
    """Counters over every service database (the same five for both systems) and the broker."""
    from devstack.stack import ALIASES

    redis_url = env["CELERY_BROKER_URL"] if broker == "redis" else None
    return WorkCounters(env, aliases=ALIASES, poll_alias=poll_alias, redis_url=redis_url)


class WorkCounters:
    """What a phase cost the servers: transactions and rows written per service database
    (PostgreSQL's pg_stat_database), the WAL PostgreSQL wrote (pg_stat_wal, server-wide:
    autovacuum's and the checkpointer's records count too) and, on Redis, broker commands
    by name (INFO commandstats).

    Server-wide counters: they count everything on those databases and that Redis server,
    which is why make bench runs on databases and a Redis database of its own and refuses
    to run beside other consumers. The load generator's own reads (one autocommit
    transaction per `finished()` poll, on `poll_alias`'s database) are taken out. A new
    session's start-up counts as a transaction: the systems' processes keep theirs open.
    """

    # PostgreSQL 15+ publishes a backend's counts when it has been idle for up to 10 s
    # (PGSTAT_IDLE_INTERVAL), so a reading right after the phase would miss the last ones.
    SETTLE_S = 11.0

    def __init__(self, env: dict[str, str], *, aliases: dict[str, str], poll_alias: str, redis_url: str | None) -> None:
        self.admin_url = env["DATABASE_URL"]
        self.databases = {alias: conninfo_to_dict(env[var])["dbname"] for alias, var in aliases.items()}
        self.poll_alias = poll_alias
        self.redis_url = redis_url

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        # Read from the maintenance database, so this reading adds nothing to those it counts.
        with psycopg.connect(self.admin_url, dbname="postgres", autocommit=True) as conn:
            rows = conn.execute(
                "SELECT datname, xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted "
                "FROM pg_stat_database WHERE datname = ANY(%s)",
                [list(self.databases.values())],
            ).fetchall()
            # pg_stat_wal is PostgreSQL 14's: an older external server reports no WAL.
            wal = (
                conn.execute("SELECT wal_bytes, wal_records FROM pg_stat_wal").fetchone()
                if conn.info.server_version >= 140000
                else None
            )
        by_name = {name: (transactions, written) for name, transactions, written in rows}
        for alias, name in self.databases.items():
            transactions, written = by_name.get(name, (0, 0))
            out[f"transactions.{alias}"] = float(transactions)
            out[f"rows.{alias}"] = float(written)
        if wal is not None:
            out["wal.bytes"], out["wal.records"] = float(wal[0]), float(wal[1])
        if self.redis_url:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            try:
                for command, stats in client.info("commandstats").items():
                    out[f"redis.{command.removeprefix('cmdstat_')}"] = float(stats["calls"])
            finally:
                client.close()
        return out

    def settled_sample(self) -> dict[str, float]:
        time.sleep(self.SETTLE_S)
        return self.sample()

    def delta(self, before: dict[str, float], after: dict[str, float], *, polls: int) -> dict[str, float]:
        out = {key: after[key] - before.get(key, 0.0) for key in after}
        out[f"transactions.{self.poll_alias}"] -= polls
        # The readings' own INFO calls.
        if "redis.info" in out:
            out["redis.info"] -= 1
        return out

    @staticmethod
    def per_saga(work: dict[str, float], sagas: int) -> dict[str, Any]:
        """Transactions and rows written per database and in all; the WAL written (kB and
        records); broker commands in all and the busiest ones."""
        n = max(sagas, 1)

        def by_database(counter: str, digits: int) -> dict[str, float]:
            prefix = f"{counter}."
            counted = sorted((k, v) for k, v in work.items() if k.startswith(prefix))
            return {k.removeprefix(prefix): round(v / n, digits) for k, v in counted}

        transactions, rows = by_database("transactions", 2), by_database("rows", 1)
        commands = {k.split(".", 1)[1]: v / n for k, v in work.items() if k.startswith("redis.") and v > 0}
        out: dict[str, Any] = {"transactions": {**transactions, "total": round(sum(transactions.values()), 2)}}
        if rows:
            out["rows_written"] = {**rows, "total": round(sum(rows.values()), 1)}
        if "wal.bytes" in work:
            out["wal"] = {"kb": round(work["wal.bytes"] / n / 1024, 1), "records": round(work["wal.records"] / n, 1)}
        if commands:
            busiest = dict(sorted(commands.items(), key=lambda kv: -kv[1])[:8])
            out["redis_commands"] = {
                "total": round(sum(commands.values()), 1),
                **{k: round(v, 2) for k, v in busiest.items()},
            }
        return out


class Progress:
    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.last = name, total, 0.0

    def show(self, *, submitted: int, finished: int | None) -> None:
        if time.monotonic() - self.last < 2:
            return
        self.last = time.monotonic()
        tail = "" if finished is None else f", {finished} ended"
        logger.info("  %s: %d/%d submitted%s", self.name, submitted, self.total, tail)

    def done(self, finished: int, per_s: float) -> None:
        logger.info("  %s: %d ended, %.1f sagas/s", self.name, finished, per_s)


class ProcessGroups:
    """CPU seconds and RSS per named group of processes (a group: some root processes and
    all their descendants, or every process whose name matches)."""

    def __init__(self) -> None:
        self.roots: dict[str, list[int]] = {}
        self.singles: dict[str, list[int]] = {}
        self.names: dict[str, tuple[str, ...]] = {}

    def add_tree(self, group: str, pid: int) -> None:
        self.roots.setdefault(group, []).append(pid)

    def add_process(self, group: str, pid: int) -> None:
        """Only this process, not its children (the bench itself, whose children are the system)."""
        self.singles.setdefault(group, []).append(pid)

    def add_named(self, group: str, *names: str) -> None:
        self.names[group] = names

    def members(self) -> dict[str, list[psutil.Process]]:
        groups: dict[str, list[psutil.Process]] = {}
        for group, pids in self.roots.items():
            for pid in pids:
                try:
                    root = psutil.Process(pid)
                    groups.setdefault(group, []).extend([root, *root.children(recursive=True)])
                except psutil.NoSuchProcess:
                    continue
        for group, pids in self.singles.items():
            for pid in pids:
                try:
                    groups.setdefault(group, []).append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    continue
        if self.names:
            for proc in psutil.process_iter(["name"]):
                for group, names in self.names.items():
                    if proc.info["name"] in names:
                        groups.setdefault(group, []).append(proc)
        return groups

    def sample(self) -> dict[str, dict[int, float]]:
        """group -> {pid: cpu seconds so far}."""
        result: dict[str, dict[int, float]] = {}
        for group, procs in self.members().items():
            for proc in procs:
                try:
                    times = proc.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                result.setdefault(group, {})[proc.pid] = times.user + times.system
        return result

    @staticmethod
    def delta(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
        """CPU seconds each group used in between; a process born in between counts whole."""
        return {
            group: sum(max(0.0, t - before.get(group, {}).get(pid, 0.0)) for pid, t in pids.items())
            for group, pids in after.items()
        }

    def main_delta(self, before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
        """Of `delta`, what each tree group's root processes used (not their children)."""
        return {
            group: sum(
                max(0.0, after.get(group, {}).get(pid, 0.0) - before.get(group, {}).get(pid, 0.0)) for pid in pids
            )
            for group, pids in self.roots.items()
        }

    def rss_mb(self, group: str) -> float:
        total = 0
        for proc in self.members().get(group, []):
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return round(total / 2**20, 1)


class System:
    """A running system under load: `client` posts orders, `finished(keys)` reads which
    have ended (order id -> (epoch s, outcome)), `groups` accounts its CPU."""

    client: Client
    # Starts an order without HTTP, in this process: the call a script or another service
    # would make (None: the system has no such phase).
    direct_client: Client | None = None
    groups: ProcessGroups
    work: WorkCounters | None = None
    timeout = 300.0

    def finished(self, keys: list[str]) -> dict[str, tuple[float, str]]:
        raise NotImplementedError

    def run(
        self,
        name: str,
        orders: list[dict[str, Any]],
        rate: float | None,
        *,
        count_work: bool = False,
        client: Client | None = None,
    ) -> Run:
        return drive(
            Run(name=name, rate=rate),
            orders,
            client or self.client,
            finished=self.finished,
            cpu=self.groups,
            timeout=self.timeout,
            work=self.work if count_work else None,
        )


def measure_phases(
    system: Any,
    label: str,
    orders: Callable[[int], list[dict[str, Any]]],
    args: Any,
    *,
    half_rate: float | None,
    describe: Callable[[Run], dict[str, Any]] = Run.summary,
    saturation_only: bool = False,
) -> dict[str, Any]:
    """A warm-up, saturation (`args.orders`), then `args.rate` and half of saturation (or
    `half_rate`, so that two systems are compared at the same load) for
    `args.latency_seconds` each, each summarised by `describe`; with `saturation_only`, not
    the fixed rates (a later round: bench.run). `system.run(name, orders, rate)` drives one
    phase."""
    # A few orders first, so that connections, imports and caches are warm in every process.
    system.run(f"{label} warm-up", orders(40), rate=None)
    sat = system.run(f"{label} saturation", orders(args.orders), rate=None, count_work=True)
    out = {"saturation": describe(sat)}
    if system.direct_client is not None:
        # The engine's own cost, without the HTTP front (what workflow engines with no web
        # layer are measured on): orders started by a function call in this process.
        direct = system.run(
            f"{label} without HTTP", orders(args.orders), rate=None, count_work=True, client=system.direct_client
        )
        out["direct"] = describe(direct)
    if saturation_only:
        return out
    half = half_rate or max(1.0, round(sat.throughput() / 2, 1))
    for key, phase_rate in (("rate_20", args.rate), ("rate_half", half)):
        count = max(20, int(phase_rate * args.latency_seconds))
        out[key] = describe(system.run(f"{label} at {phase_rate:g}/s", orders(count), rate=phase_rate))
    return out


def median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None
