"""The floor: every order's database work (bench.sql) in one process, one order after the
other, with no broker, no HTTP and no saga. What the other systems' throughput is held against.
"""

from __future__ import annotations

import time
from typing import Any

from . import sql


def process_order(conns: dict[str, Any], order: dict[str, Any]) -> str:
    """One order end to end, step by step as the bare chain runs them; returns its outcome.

    Precondition: `conns` maps each service to an autocommit connection (sql.connect), so
    every step commits on its own, as in the distributed systems.
    """
    sql.insert_order(conns["orders"], order)
    if not sql.reserve(conns["inventory"], order):
        outcome, reason = "failed", sql.OUT_OF_STOCK
    elif not sql.charge(conns["payments"], order):
        sql.release(conns["inventory"], order)
        outcome, reason = "failed", sql.DECLINED
    else:
        sql.confirm(conns["orders"], order)
        outcome, reason = "confirmed", ""
    if outcome == "failed":
        sql.fail(conns["orders"], order, reason)
    sql.notify(conns["notifications"], order, outcome, reason)
    return outcome


def run_floor(orders: list[dict[str, Any]], urls: dict[str, str]) -> dict[str, Any]:
    """Process `orders` sequentially on four long-lived connections and time it.

    `urls`: the database URLs by environment variable (ORDERS_DATABASE_URL, ...; others are
    ignored). Precondition: the databases are migrated and hold a product for every SKU the
    orders name (see bench.sql). Returns {"orders", "seconds", "sagas_per_s", "outcomes"}.
    """
    conns = {service: sql.connect(urls[var]) for service, var in sql.DATABASE_URL_VARS.items()}
    outcomes: dict[str, int] = {}
    try:
        started = time.perf_counter()
        for order in orders:
            outcome = process_order(conns, order)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        seconds = time.perf_counter() - started
    finally:
        for conn in conns.values():
            conn.close()
    return {
        "orders": len(orders),
        "seconds": seconds,
        "sagas_per_s": len(orders) / seconds if seconds > 0 else 0.0,
        "outcomes": dict(sorted(outcomes.items())),
    }
