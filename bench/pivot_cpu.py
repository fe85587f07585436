"""The pivot's CPU per confirmed order, in one process: `orders.confirm` the usual way (one
statement, orders.services._confirm_at_once) and the general way (a transaction that
reads the order, the saga and its steps into models and writes them back), interleaved,
so that a box whose speed drifts favours neither.

    python -m bench.pivot_cpu [--rounds 6] [--orders 200]

On fresh `*_bench` databases (as `make bench`): each round writes its orders and sagas as
`POST /api/orders/` writes them (nothing is published; no worker runs), then confirms
each with the chain's record of the two steps before the pivot. Counted per confirm:
this process's CPU (Python, Django, psycopg) and the CPU of the PostgreSQL backend that
serves its connection, read from /proc (Linux). The next `make bench` empties the
databases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Any
from unittest import mock

from .run import in_process_on_bench_databases

WAYS = ("one statement", "general way")


def backend_cpu_seconds(alias: str = "orders") -> float:
    """CPU seconds so far of the PostgreSQL backend serving this process's `alias`
    connection (the database runs on this machine)."""
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _at_the_pivot(count: int) -> list[tuple[Any, Any, list[dict[str, Any]]]]:
    """`count` pending orders whose sagas reached the confirm, with the confirm's record."""
    from decimal import Decimal

    from django.utils import timezone

    from common.db import insert_together
    from orders.models import Order
    from orders.saga import PLACE_ORDER
    from saga.engine import task_id_for
    from saga.publish import saga_new

    made = []
    for _ in range(count):
        order = Order(
            user_id=0, email="bench@example.com", payment_token="tok_visa", total=Decimal("10.00"), currency="EUR"
        )
        saga = saga_new(definition=PLACE_ORDER, order_id=order.id, context={"total": "10.00", "items": []})
        insert_together("orders", [order], [saga], saga._prefetched_objects_cache["steps"])  # type: ignore[attr-defined]
        now = timezone.now().isoformat()
        timeline = [
            {
                "task_id": task_id_for(saga.id, name, saga.generation),
                "started_at": now,
                "finished_at": now,
                "attempt": 1,
                "worker": "bench@host",
                "output": output,
            }
            for name, output in (("reserve_inventory", {"amount": "10.00"}), ("charge_payment", {"status": "captured"}))
        ]
        made.append((order, saga, timeline))
    return made


def measure(*, rounds: int, orders: int) -> dict[str, dict[str, list[float]]]:
    """ms of CPU per confirm, each round, for each way: {way: {"python": [...], "postgresql": [...]}}."""
    from orders import services as orders_services

    per_round: dict[str, dict[str, list[float]]] = {way: {"python": [], "postgresql": []} for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            made = _at_the_pivot(orders)
            general = mock.patch.object(orders_services, "_confirm_at_once", return_value=False)
            with general if way == "general way" else contextlib.nullcontext():
                python, backend = time.process_time(), backend_cpu_seconds()
                for order, saga, timeline in made:
                    result = orders_services.order_confirm(
                        order_id=order.id, saga_id=saga.id, total=order.total, timeline=timeline
                    )
                    if result != {"outcome": "confirmed"}:
                        raise RuntimeError(f"the confirm answered {result!r}")
                per_round[way]["python"].append((time.process_time() - python) / orders * 1000)
                per_round[way]["postgresql"].append((backend_cpu_seconds() - backend) / orders * 1000)
    return per_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pivot_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each way, alternated (default 6)")
    parser.add_argument("--orders", type=int, default=200, help="confirms per round (default 200)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.orders < 1:
        parser.error("--rounds and --orders are at least 1")
    with in_process_on_bench_databases():
        per_round = measure(rounds=args.rounds, orders=args.orders)
    print(f"orders.confirm, ms of CPU per confirm ({args.rounds} rounds of {args.orders}, alternated):")
    totals: dict[str, float] = {}
    for way, parts in per_round.items():
        python, backend = statistics.median(parts["python"]), statistics.median(parts["postgresql"])
        totals[way] = python + backend
        print(
            f"  {way:<14} this process {python:.2f}, its PostgreSQL backend {backend:.2f}, both {python + backend:.2f}"
        )
    saved = totals["general way"] - totals["one statement"]
    print(f"  one statement saves {saved:.2f} ms ({saved / totals['general way']:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
