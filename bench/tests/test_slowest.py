"""A fixed-rate phase's slowest orders, shown step by step: where a tail order's time went."""

from bench.report import slow_order, table

DECLINED = {
    "order": "0b9c",
    "outcome": "failed",
    "latency_ms": 133.5,
    "steps": [
        {"step": "reserve_inventory", "queued_ms": 2.0, "started_ms": 9.0, "finished_ms": 10.5},
        {"step": "charge_payment", "queued_ms": 10.5, "started_ms": 14.5, "finished_ms": 17.5},
        # The coordinator's hop, then a compensation that waited behind a sweep.
        {"step": "release_inventory", "queued_ms": 24.0, "started_ms": 95.0, "finished_ms": 97.5},
        {"step": "fail_order", "queued_ms": 97.5, "started_ms": 101.0, "finished_ms": 102.0},
        {"step": "notify_failure", "queued_ms": 102.0, "started_ms": 106.0, "finished_ms": None},
    ],
}


def test_a_slow_order_shows_each_steps_wait_from_the_step_before_and_its_work() -> None:
    assert slow_order(DECLINED) == (
        "133.5 failed: reserve_inventory 9.0/1.5, charge_payment 4.0/3.0, release_inventory 77.5/2.5, "
        "fail_order 3.5/1.0, notify_failure 4.0/-"
    )


def test_the_table_lists_the_slowest_orders_of_each_fixed_rate_phase() -> None:
    latency = {"p50": 30.0, "p95": 60.0, "p99": 130.0, "max": 133.5}
    results = {
        "saga": {
            "rate_half": {"rate": 21.9, "sagas_per_s": 21.9, "latency_ms": latency, "slowest": [DECLINED]},
        }
    }

    shown = table(results)

    assert "saga at 21.9/s, slowest orders: ms from the intended send, each step's wait/work" in shown
    assert "  133.5 failed: reserve_inventory 9.0/1.5, charge_payment 4.0/3.0" in shown
