"""Pure tests of devstack.chaos's bookkeeping and refusals: no server is started or contacted.

Run with `.venv/bin/python -m pytest devstack/tests/test_chaos_report.py -p no:django -q`.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from devstack import chaos


class FakeBroker:
    """Drops the messages it is told to, in order."""

    def __init__(self, drops: list[tuple[str, str | None] | None]) -> None:
        self.drops = drops

    def drop(self, rng: random.Random) -> tuple[str, str | None] | None:
        return self.drops.pop(0)


def a_chaos(broker: Any) -> chaos.Chaos:
    run = chaos.Chaos(chaos.parse_args(["--seed", "3"]), topology=None, broker=broker)  # type: ignore[arg-type]
    run._running_steps = lambda task_prefix=None: []  # type: ignore[method-assign]
    return run


def test_a_held_task_a_later_drop_took_is_the_drops_not_an_unrecovered_kill() -> None:
    run = a_chaos(FakeBroker([("payments", "saga-1-charge_payment-g0")]))
    run._record("kill", "payments", [], ["saga-1-charge_payment-g0", "saga-2-charge_payment-g0"])
    kill = run.report.faults[0]
    kill.received_again["saga-2-charge_payment-g0"] = 6.4

    run._inject_drop()

    assert kill.held == ["saga-2-charge_payment-g0"]
    assert kill.dropped_later == ["saga-1-charge_payment-g0"]
    assert kill.recovered_after == 6.4
    summary = run.report.summary()
    assert summary["held_then_dropped"] == 1
    assert summary["unrecovered_faults"] == 0
    assert summary["recovery_by_kind"]["kill"]["worst_s"] == 6.4


def test_a_drop_of_a_task_received_again_changes_nothing() -> None:
    run = a_chaos(FakeBroker([("payments", "saga-1-charge_payment-g0"), None]))
    run._record("kill", "payments", [], ["saga-1-charge_payment-g0"])
    kill = run.report.faults[0]
    kill.received_again["saga-1-charge_payment-g0"] = 3.0
    kill.recovered_after = 3.0

    run._inject_drop()
    run._inject_drop()  # every queue empty: nothing recorded

    assert kill.held == ["saga-1-charge_payment-g0"] and not kill.dropped_later
    assert [f.kind for f in run.report.faults] == ["kill", "drop"]


@pytest.mark.parametrize("host", ["rabbit.example.com", "10.1.2.3"])
def test_a_rabbitmq_restart_is_refused_for_a_broker_on_another_machine(host: str) -> None:
    refusal = chaos.RabbitBroker(f"amqp://guest:guest@{host}:5672/x").restart_refusal()
    assert refusal is not None and host in refusal


def test_the_run_refuses_a_remote_rabbitmq_restart_before_starting_anything(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("CHAOS_AMQP_URL", "amqp://guest:guest@rabbit.example.com:5672/x")
    started = []
    monkeypatch.setattr(chaos.services, "ensure_services", lambda *a, **k: started.append(a))
    with pytest.raises(chaos.services.ConfigError, match="--broker-restarts 1 on RabbitMQ refused"):
        chaos.run(tmp_path, ["--broker", "amqp", "--broker-restarts", "1"])
    assert not started
