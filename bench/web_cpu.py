"""The web's CPU per order, in one process: `POST /api/orders/` the declared way (REST
framework's request handling) and the hot way (orders.api.views, `_post_plain`),
interleaved, so that a box whose speed drifts favours neither.

    python -m bench.web_cpu [--rounds 12] [--orders 120]

On fresh `*_bench` databases (as `make bench`), through Django's test client in this
process: the figures include the client's own work (the same in both) and no gunicorn, so
compare the two ways with each other, not with `make bench`'s web column. Every order is
placed for real and its chain published to the bench's Redis database; no worker runs, and
the next `make bench` empties both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from .run import SKUS, _api_token, _seed_catalogue, in_process_on_bench_databases


def measure(*, rounds: int, orders: int, token: str, warm_up: int = 50) -> dict[str, list[float]]:
    """ms of this process's CPU per POST, each round, for each way, after `warm_up` orders.
    The token's user must not be rate-limited (make bench's environment lifts the limit)."""
    from django.test import Client

    from orders.api.views import OrderListCreateApi

    client = Client(HTTP_AUTHORIZATION=f"Token {token}", HTTP_HOST="127.0.0.1")
    order = {"email": "bench@example.com", "items": [{"sku": SKUS[0], "quantity": 1}], "payment_token": "tok_visa"}
    body = json.dumps(order)

    def post() -> None:
        response = client.post("/api/orders/", body, content_type="application/json")
        if response.status_code != 202:
            raise RuntimeError(f"POST /api/orders/ answered {response.status_code}: {response.content[:300]!r}")

    ways = {"declared (REST framework)": False, "hot path": True}
    for _ in range(warm_up):
        post()  # connections, prepared statements, imports
    per_round: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for _ in range(rounds):
            for way, hot in ways.items():
                OrderListCreateApi.hot_path = hot
                started = time.process_time()
                for _ in range(orders):
                    post()
                per_round[way].append((time.process_time() - started) / orders * 1000)
    finally:
        OrderListCreateApi.hot_path = True
    return per_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="rounds of each way, alternated (default 12)")
    parser.add_argument("--orders", type=int, default=120, help="orders per round (default 120)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.orders < 1:
        parser.error("--rounds and --orders are at least 1")
    with in_process_on_bench_databases():
        _seed_catalogue()
        per_round = measure(rounds=args.rounds, orders=args.orders, token=_api_token())
    print(
        f"POST /api/orders/, ms of CPU per order in this process ({args.rounds} rounds of {args.orders}, alternated):"
    )
    medians: dict[str, Any] = {}
    for way, values in per_round.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        medians[way] = statistics.median(values)
        print(f"  {way:<28} median {medians[way]:.2f}  quartiles {quartiles[0]:.2f} to {quartiles[2]:.2f}")
    declared, hot = medians["declared (REST framework)"], medians["hot path"]
    print(f"  the hot path saves {declared - hot:.2f} ms ({(declared - hot) / declared:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
