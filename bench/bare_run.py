"""The bare chain's processes (bench.bare workers, bench.bare_web under gunicorn) and its phases."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from devstack.topology import WORKERS, Process, free_port, read_procfile, wait_for

from .load import Client, RetryableResponse, System, measure_phases, work_counters


def _concurrency(queue: str) -> str:
    # The Procfile's concurrency for that queue, so both systems have the same pool sizes.
    command = read_procfile()[queue]
    parts = command.split()
    return parts[parts.index("--concurrency") + 1]


def bare_post(base_url: str) -> Callable[[requests.Session, dict[str, Any]], str]:
    def post(session: requests.Session, order: dict[str, Any]) -> str:
        response = session.post(
            f"{base_url}/orders/",
            json={
                "id": order["order_id"],
                "email": order["email"],
                "sku": order["sku"],
                "quantity": order["quantity"],
                "payment_token": order["token"],
            },
            timeout=30,
        )
        if response.status_code >= 500:
            raise RetryableResponse(f"{response.status_code} {response.text[:200]}")
        if response.status_code != 202:
            raise RuntimeError(f"bare order refused: {response.status_code} {response.text[:300]}")
        return response.json()["id"]

    return post


def bare_start_direct() -> Callable[[Any, dict[str, Any]], str]:
    """Start a bare order as bench.bare_web does, in this process: insert it, publish its chain."""
    from . import bare, sql

    def start(_session: Any, order: dict[str, Any]) -> str:
        sql.insert_order(bare.db("orders"), order)
        bare.submit(order)
        return order["order_id"]

    return start


class BareSystem(System):
    name = "bare chain"

    def __init__(self, env: dict[str, str], log_dir: Path, broker: str, groups_for: Callable[..., Any]) -> None:
        self.env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}
        self.log_dir = log_dir
        self.broker = broker
        self.groups_for = groups_for
        self.processes: dict[str, Process] = {}

    def __enter__(self) -> BareSystem:
        import logging

        logging.getLogger("bench").info(
            "starting the bare chain (web, %s)", ", ".join(q for q in WORKERS if q != "saga")
        )
        port = free_port()
        web = read_procfile()["web"].replace("orders_project.wsgi", "bench.bare_web:app")
        self.processes["web"] = Process("web", web.replace("${PORT:-8000}", str(port)), self.log_dir / "web.log")
        for queue in WORKERS:
            if queue == "saga":
                continue  # no coordinator: that is the point
            command = (
                f"celery -A bench.bare worker -Q {queue} -n bare-{queue}@%h --concurrency {_concurrency(queue)} -l INFO"
            )
            self.processes[queue] = Process(queue, command, self.log_dir / f"{queue}.log")
        for process in self.processes.values():
            process.start(self.env)
        self.base_url = f"http://127.0.0.1:{port}"
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        self.groups = self.groups_for(self.processes, self.broker)
        self.work = work_counters(self.env, self.broker, poll_alias="notifications")
        self.client = Client(bare_post(self.base_url))
        self.direct_client = Client(bare_start_direct())
        return self

    def _wait_ready(self) -> None:
        from .bare import app

        wait_for(
            lambda: requests.post(f"{self.base_url}/orders/", json={}, timeout=2).status_code == 400,
            timeout=60,
            what="the bare web process to answer",
        )
        wanted = {f"bare-{q}@{socket.gethostname()}" for q in self.processes if q != "web"}

        def all_answer() -> bool:
            replies = app.control.ping(destination=list(wanted), timeout=1.0)
            return wanted <= {host for reply in replies for host in reply}

        wait_for(all_answer, timeout=90, what="the bare workers to answer a ping", interval=0.5)

    def __exit__(self, *exc: object) -> None:
        for process in self.processes.values():
            process.stop()

    def finished(self, keys: list[str]) -> dict[str, tuple[float, str]]:
        from . import sql

        if not hasattr(self, "_conn"):
            self._conn = sql.connect(self.env["NOTIFICATIONS_DATABASE_URL"])
        return sql.finished(self._conn, keys)


def measure_bare(
    args: argparse.Namespace,
    env: dict[str, str],
    log_dir: Path,
    orders: Callable[[int], list[dict[str, Any]]],
    *,
    half_rate: float | None,
    groups_for: Callable[..., Any],
    saturation_only: bool = False,
) -> dict[str, Any]:
    """Saturation, then the fixed rates the saga ran at (so both are compared at the same
    load); with `saturation_only`, saturation alone (a later round: bench.run)."""
    with BareSystem(env, log_dir, args.broker, groups_for) as system:
        out = measure_phases(system, "bare", orders, args, half_rate=half_rate, saturation_only=saturation_only)
    if not saturation_only:
        out["latency_ms"] = {key: out[key]["latency_ms"] for key in ("rate_20", "rate_half")}
    return out
