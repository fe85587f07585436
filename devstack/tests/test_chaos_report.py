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

    def __init__(self, drops: list[tuple[str, str | None, str | None] | None]) -> None:
        self.drops = drops

    def drop(self, rng: random.Random) -> tuple[str, str | None, str | None] | None:
        return self.drops.pop(0)


def a_chaos(broker: Any) -> chaos.Chaos:
    run = chaos.Chaos(chaos.parse_args(["--seed", "3"]), topology=None, broker=broker)  # type: ignore[arg-type]
    run._running_steps = lambda task_prefix=None: []  # type: ignore[method-assign]
    return run


def test_a_held_task_a_later_drop_took_is_the_drops_not_an_unrecovered_kill() -> None:
    run = a_chaos(FakeBroker([("payments", "saga-1-charge_payment-g0", "saga-1")]))
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
    run = a_chaos(FakeBroker([("payments", "saga-1-charge_payment-g0", "saga-1"), None]))
    run._record("kill", "payments", [], ["saga-1-charge_payment-g0"])
    kill = run.report.faults[0]
    kill.received_again["saga-1-charge_payment-g0"] = 3.0
    kill.recovered_after = 3.0

    run._inject_drop()
    run._inject_drop()  # every queue empty: nothing recorded

    assert kill.held == ["saga-1-charge_payment-g0"] and not kill.dropped_later
    assert [f.kind for f in run.report.faults] == ["kill", "drop"]


SAGA = "6f1c2d1e-0b7a-4c53-9a57-3b2f5d3f4a10"


def test_a_kill_whose_tasks_were_received_again_recovers_only_when_their_saga_moves_on() -> None:
    """A saga worker killed between its commit and its publish: its report is received again
    at once, and its saga still waits (docs/DECISIONS.md). The kill's recovery is the wait."""
    run = a_chaos(FakeBroker([]))
    run._running_steps = lambda task_prefix=None: [(SAGA, "release_inventory"), ("other", "charge_payment")]  # type: ignore[method-assign]
    report = "5b0e8c52-report"
    kill = run._record("kill", "saga", [], [report])
    run._catch_sagas_of_kill(kill, {report: SAGA})
    assert kill.caught == [(SAGA, "release_inventory")]

    run.on_task_event("task-received", report, kill.at + 7.3)
    assert kill.received_all_after() == pytest.approx(7.3)
    assert kill.recovered_after is None  # received again, the saga still waiting
    run.mark_recoveries({(SAGA, "release_inventory")}, kill.at + 20.0)
    assert kill.recovered_after is None
    assert run.report.summary()["unrecovered_faults"] == 1

    run.mark_recoveries({("other", "charge_payment")}, kill.at + 43.0)
    assert kill.moved_after == pytest.approx(43.0)
    assert kill.recovered_after == pytest.approx(43.0)
    assert run.report.summary()["recovery_by_kind"]["kill"]["worst_s"] == 43.0


def test_a_kill_whose_sagas_moved_on_first_recovers_when_its_last_task_is_received_again() -> None:
    run = a_chaos(FakeBroker([]))
    run._running_steps = lambda task_prefix=None: [(SAGA, "charge_payment")]  # type: ignore[method-assign]
    held = [f"{SAGA}-charge_payment-g0", "settlement-batch"]
    kill = run._record("kill", "payments", [], held)
    run._catch_sagas_of_kill(kill, {held[0]: SAGA})

    run.mark_recoveries(set(), kill.at + 2.0)  # the saga's chain went on (a copy ran)
    run.on_task_event("task-received", held[0], kill.at + 1.5)
    assert kill.recovered_after is None  # the batch is still held
    run.on_task_event("task-received", held[1], kill.at + 4.0)
    assert kill.recovered_after == pytest.approx(4.0)


def test_a_kill_whose_tasks_were_received_again_before_its_sagas_were_caught_waits_for_them() -> None:
    """The log watcher may see the held task received again before the kill's sagas are
    looked up (CI, RabbitMQ, 12-06): with nothing caught yet that counted the kill
    recovered, its sagas were then caught and never watched, and the report failed on
    their missing time."""
    run = a_chaos(FakeBroker([]))
    run._running_steps = lambda task_prefix=None: [(SAGA, "charge_payment")]  # type: ignore[method-assign]
    held = [f"{SAGA}-charge_payment-g0"]
    kill = run._record("kill", "payments", [], held)
    run.on_task_event("task-received", held[0], kill.at + 0.4)
    assert kill.recovered_after == pytest.approx(0.4)  # nothing caught yet
    run._catch_sagas_of_kill(kill, {held[0]: SAGA})
    assert kill.recovered_after is None  # now its saga must move on first
    run.mark_recoveries(set(), kill.at + 3.0)
    assert (kill.moved_after, kill.recovered_after) == (pytest.approx(3.0), pytest.approx(3.0))
    chaos._print_report(run.report)  # the report names both times


def test_a_kill_of_tasks_that_name_no_saga_recovers_when_they_are_received_again() -> None:
    run = a_chaos(FakeBroker([]))
    kill = run._record("kill", "inventory", [], ["settlement-batch"])
    run._catch_sagas_of_kill(kill, {})
    assert kill.caught == []
    run.on_task_event("task-received", "settlement-batch", kill.at + 1.2)
    assert kill.recovered_after == pytest.approx(1.2)


def test_the_saga_of_a_failure_report_is_read_from_its_kwargs_as_a_look_shows_them() -> None:
    kwargs = {"saga_id": SAGA, "step": "charge_payment", "authority": "sealed"}
    assert chaos.saga_of_message({"id": "5b0e8c52-0000", "kwargsrepr": str(kwargs)}) == SAGA
    assert chaos.saga_of_message({"id": f"{SAGA}-charge_payment-g2", "kwargsrepr": "None"}) == SAGA
    assert chaos.saga_of_message({"id": "5b0e8c52-0000", "kwargsrepr": "{}"}) is None


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


# --- which worker a kill takes down -------------------------------------------------


def test_a_kill_takes_a_worker_running_a_task_over_one_only_holding_one() -> None:
    looks = {
        "orders": chaos.WorkerLook(waiting=("t-prefetched",)),
        "payments": chaos.WorkerLook(running=("t-charge",)),
        "inventory": chaos.WorkerLook(),
    }
    assert {chaos.kill_target(looks, random.Random(seed)) for seed in range(20)} == {"payments"}


def test_a_kill_takes_a_worker_holding_a_task_when_none_runs_one() -> None:
    looks = {"orders": chaos.WorkerLook(waiting=("t-countdown",)), "inventory": chaos.WorkerLook()}
    assert chaos.kill_target(looks, random.Random(1)) == "orders"


def test_a_kill_takes_the_drawn_worker_when_it_holds_a_task_even_if_another_runs_one() -> None:
    looks = {"orders": chaos.WorkerLook(waiting=("t-prefetched",)), "payments": chaos.WorkerLook(running=("t-charge",))}
    assert chaos.kill_target(looks, random.Random(1), wanted="orders") == "orders"
    # Drawn but idle, or not answering (still starting): a busy one instead.
    assert chaos.kill_target({**looks, "saga": chaos.WorkerLook()}, random.Random(1), wanted="saga") == "payments"
    assert chaos.kill_target(looks, random.Random(1), wanted="inventory") == "payments"


def test_no_kill_target_when_no_worker_that_answered_holds_anything() -> None:
    # A worker still starting (or not yet replaced) does not answer, so it is not in the look.
    assert chaos.kill_target({"orders": chaos.WorkerLook(), "saga": chaos.WorkerLook()}, random.Random(1)) is None
    assert chaos.kill_target({}, random.Random(1)) is None


def test_the_kill_target_is_the_seeds_choice_among_the_busy_workers() -> None:
    looks = {name: chaos.WorkerLook(running=(f"t-{name}",)) for name in ("saga", "orders", "payments")}
    picks = {chaos.kill_target(dict(reversed(looks.items())), random.Random(seed)) for seed in range(30)}
    assert picks == {"saga", "orders", "payments"}
    assert chaos.kill_target(looks, random.Random(5)) == chaos.kill_target(
        dict(reversed(looks.items())), random.Random(5)
    )


# --- a kill next to a broker restart ------------------------------------------------


def a_fault(kind: str, at: float, **fields: Any) -> chaos.Fault:
    return chaos.Fault(kind=kind, target="x", at=at, **fields)


def test_a_kill_whose_recovery_spans_a_broker_restart_is_reported_apart_with_both_figures() -> None:
    report = chaos.Report(seed=1, broker="redis", orders=1)
    overlapped = a_fault("kill", 100.0, held=["a"], recovered_after=20.0)
    clean = a_fault("kill", 200.0, held=["b"], recovered_after=6.0)
    idle = a_fault("kill", 300.0)
    restart = a_fault("broker_restart", 105.0, caught=[("s", "step")], back_after=9.0, recovered_after=30.0)
    report.faults = [overlapped, restart, clean, idle]

    assert chaos.overlapping_restart(overlapped, [restart]) is restart
    assert chaos.overlapping_restart(clean, [restart]) is None
    by_kind = report.recovery_by_kind()
    assert by_kind["kill"] == {"caught": 1, "unrecovered": 0, "median_s": 6.0, "worst_s": 6.0}
    # From the kill, 20 s; from the broker answering again (105 + 9 = 114), 6 s.
    assert by_kind[chaos.KILL_DURING_RESTART]["worst_s"] == 20.0
    assert by_kind[chaos.KILL_DURING_RESTART]["after_broker_back_worst_s"] == 6.0
    assert report.summary()["faults"] == {"kill": 3, "broker_restart": 1}


def test_a_kill_that_recovered_before_the_broker_stopped_is_an_ordinary_kill() -> None:
    kill = a_fault("kill", 100.0, held=["a"], recovered_after=4.0)
    assert chaos.overlapping_restart(kill, [a_fault("broker_restart", 104.5, back_after=3.0)]) is None
    assert chaos.overlapping_restart(kill, [a_fault("broker_restart", 90.0, back_after=9.9)]) is None


def test_an_unrecovered_kill_overlaps_any_later_restart_and_one_still_down() -> None:
    kill = a_fault("kill", 100.0, held=["a"])
    assert chaos.overlapping_restart(kill, [a_fault("broker_restart", 500.0, back_after=3.0)]) is not None
    assert chaos.overlapping_restart(
        a_fault("kill", 100.0, held=["a"], recovered_after=5.0), [a_fault("broker_restart", 50.0)]
    )


def test_a_kill_holds_only_what_had_not_finished_when_it_died() -> None:
    run = a_chaos(FakeBroker([]))
    run.finished["t-done"] = 1.0
    run._record("kill", "orders", [], ["t-done", "t-running", "t-running"])
    run._record("kill", "saga", [], ["t-done"])
    held, nothing = run.report.faults
    assert held.held == ["t-running"] and held.finished_before == ["t-done"]
    assert nothing.held == [] and nothing.recovered_after is None
    assert run.report.recovery_by_kind()["kill"]["caught"] == 1


def test_a_task_that_ended_in_a_retry_is_not_held_until_its_retry_is_received() -> None:
    run = a_chaos(FakeBroker([]))
    run.on_task_event("task-received", "t-refund", 1.0)
    run.on_task_event("task-retried", "t-refund", 2.0)  # its retry: a new message in the queue
    run._record("kill", "payments", [], ["t-refund"])
    assert run.report.faults[0].held == []
    run.on_task_event("task-received", "t-refund", 3.0)  # the retry's message, by a worker
    run._record("kill", "payments", [], ["t-refund"])
    kill = run.report.faults[1]
    assert kill.held == ["t-refund"]
    run.on_task_event("task-received", "t-refund", kill.at + 4.0)
    assert kill.recovered_after == 4.0


LOG = """\
2026-12-03 14:28:22,000 INFO celery.worker.strategy Task notifications.notify[s-notify_failure-g1] received
2026-12-03 14:28:22,053 INFO celery.app.trace [saga=s order=o] Task notifications.notify[s-notify_failure-g1] \
succeeded in 0.034s: None
2026-12-03 14:28:23,000 INFO celery.app.trace [saga=t order=o] Task payments.refund[t-refund_payment-g1] retry: \
Retry in 1s: TransientError('a charge is in flight')
"""


def test_a_tasks_logged_ends_are_read_from_the_workers_log() -> None:
    import time

    assert chaos.logged_ends(LOG, "s-notify_failure-g1") == [time.mktime((2026, 12, 3, 14, 28, 22, 0, 0, -1)) + 0.053]
    assert len(chaos.logged_ends(LOG, "t-refund_payment-g1")) == 1
    assert chaos.logged_ends(LOG, "s-notify") == []  # an id is matched whole


def test_a_held_task_whose_end_the_killed_worker_logged_before_the_kill_is_not_unrecovered(tmp_path: Any) -> None:
    import time
    from types import SimpleNamespace

    run = a_chaos(FakeBroker([]))
    log = tmp_path / "notifications.log"
    log.write_text(LOG)
    run.topology = SimpleNamespace(processes={"notifications": SimpleNamespace(log_path=log)})  # type: ignore[assignment]
    run._record("kill", "notifications", [], ["s-notify_failure-g1", "u-notify_customer-g0"])
    kill = run.report.faults[0]
    kill.at_wall = time.mktime((2026, 12, 3, 14, 28, 22, 0, 0, -1)) + 0.15
    kill.received_again["u-notify_customer-g0"] = 2.5

    run.settle_from_logs()

    assert kill.ended_per_log == ["s-notify_failure-g1"] and kill.held == ["u-notify_customer-g0"]
    assert kill.recovered_after == 2.5
    # Had its end been logged after the kill (and no receipt of it: a receipt after the kill
    # is a live worker's, test_a_held_task_a_live_worker_logged...), it would stay unrecovered.
    log.write_text("".join(LOG.splitlines(keepends=True)[1:]))
    kill.at_wall -= 1.0
    kill.held, kill.ended_per_log, kill.recovered_after = ["s-notify_failure-g1", "u-notify_customer-g0"], [], None
    run.settle_from_logs()
    assert kill.recovered_after is None and not kill.ended_per_log


RECEIVED_AGAIN_LOG = """\
2026-12-06 07:16:09,133 INFO celery.worker.strategy Task payments.charge[s-charge_payment-g0] received
2026-12-06 07:16:13,877 INFO celery.worker.strategy Task payments.charge[s-charge_payment-g0] received
2026-12-06 07:16:16,122 INFO celery.app.trace [saga=s order=o] Task payments.charge[s-charge_payment-g0] \
succeeded in 2.1s: <saga context>
"""


def test_a_held_task_a_live_worker_logged_as_received_again_is_recovered(tmp_path: Any) -> None:
    # On RabbitMQ a broker restart 1.3 s after a kill dropped the task-received event of the
    # returned message (the watcher was reconnecting): the kill was reported "not recovered"
    # although the restarted worker ran the task 4.4 s after it.
    import time
    from types import SimpleNamespace

    run = a_chaos(FakeBroker([]))
    killed, other = tmp_path / "payments.log", tmp_path / "orders.log"
    killed.write_text(RECEIVED_AGAIN_LOG)
    other.write_text("")
    run.topology = SimpleNamespace(  # type: ignore[assignment]
        processes={"payments": SimpleNamespace(log_path=killed), "orders": SimpleNamespace(log_path=other)}
    )
    run._record("kill", "payments", [], ["s-charge_payment-g0"])
    kill = run.report.faults[0]
    kill.at_wall = time.mktime((2026, 12, 6, 7, 16, 9, 0, 0, -1)) + 0.5  # after the first receipt

    run.settle_from_logs()

    assert kill.received_per_log == ["s-charge_payment-g0"] and not kill.ended_per_log
    assert kill.recovered_after == pytest.approx(4.377)
    assert run.report.recovery_by_kind()["kill"]["unrecovered"] == 0


def test_a_held_task_only_received_before_the_kill_stays_unrecovered(tmp_path: Any) -> None:
    import time
    from types import SimpleNamespace

    run = a_chaos(FakeBroker([]))
    log = tmp_path / "payments.log"
    log.write_text(RECEIVED_AGAIN_LOG.splitlines()[0] + "\n")  # only the receipt the kill interrupted
    run.topology = SimpleNamespace(processes={"payments": SimpleNamespace(log_path=log)})  # type: ignore[assignment]
    run._record("kill", "payments", [], ["s-charge_payment-g0"])
    kill = run.report.faults[0]
    kill.at_wall = time.mktime((2026, 12, 6, 7, 16, 9, 0, 0, -1)) + 0.5

    run.settle_from_logs()

    assert kill.recovered_after is None and not kill.received_per_log
    assert run.report.recovery_by_kind()["kill"] == {"caught": 1, "unrecovered": 1, "median_s": None, "worst_s": None}


def test_a_kind_with_nothing_recovered_prints_none_not_a_number(capsys: Any) -> None:
    run = a_chaos(FakeBroker([]))
    run._record("kill", "payments", [], ["s-charge_payment-g0"])

    chaos._print_report(run.report)

    out = capsys.readouterr().out
    assert "median none, worst none, not recovered 1" in out
    assert "Nones" not in out


def test_a_saga_a_drop_stalled_counts_for_the_drop_not_for_a_broker_restart_after_it() -> None:
    # RabbitMQ, 12-06: two drops took two sagas' charges 15 s before a broker restart; the
    # restart, finding them still running, reported their 97 s wait (a lost message waits
    # for its step's deadline) as its own 84.4 s recovery. Its other 15 sagas took 26 s.
    run = a_chaos(FakeBroker([]))
    first = run._record("drop", "payments", [("s1", "reserve_inventory")])
    second = run._record("drop", "payments", [("s2", "reserve_inventory")])
    restart = run._record("broker_restart", "broker", [("s1", "reserve_inventory"), ("s3", "reserve_inventory")])

    assert restart.caught == [("s3", "reserve_inventory")]
    assert restart.stalled_before == [("s1", "reserve_inventory")]
    assert first.caught == [("s1", "reserve_inventory")] and second.caught == [("s2", "reserve_inventory")]


def test_a_saga_an_earlier_fault_has_recovered_is_caught_again() -> None:
    run = a_chaos(FakeBroker([]))
    race = run._record("race", "charge_payment x2", [("s1", "charge_payment")])
    race.recovered_after = 0.4
    restart = run._record("broker_restart", "broker", [("s1", "charge_payment")])

    assert restart.caught == [("s1", "charge_payment")] and not restart.stalled_before


def test_a_drop_takes_over_a_saga_an_earlier_fault_caught_and_has_not_recovered_from() -> None:
    # The drop certainly lost that saga's message: the restart's recovery is not its wait.
    run = a_chaos(FakeBroker([]))
    restart = run._record("broker_restart", "broker", [("s1", "notify_customer"), ("s2", "reserve_inventory")])
    drop = run._record("drop", "payments", [("s2", "reserve_inventory")])

    assert drop.caught == [("s2", "reserve_inventory")]
    assert restart.caught == [("s1", "notify_customer")] and restart.taken_by_drop == [("s2", "reserve_inventory")]


def test_the_report_says_which_sagas_a_fault_left_to_another(capsys: Any) -> None:
    run = a_chaos(FakeBroker([]))
    run._record("drop", "payments", [("s1", "reserve_inventory")])
    run._record("broker_restart", "broker", [("s1", "reserve_inventory"), ("s3", "reserve_inventory")])

    chaos._print_report(run.report)

    assert "caught   1 running steps (+1 stalled by an earlier fault)" in capsys.readouterr().out


def test_duplicates_and_races_are_aimed_at_steps_no_earlier_fault_stalled() -> None:
    run = a_chaos(FakeBroker([]))
    run._running_steps = lambda task_prefix=None: [("s1", "charge_payment"), ("s2", "reserve_inventory")]  # type: ignore[method-assign]
    run._steps_that_ran_lately = lambda: [("s9", "notify_customer")]  # type: ignore[method-assign]
    drop = run._record("drop", "payments", [("s1", "charge_payment")])

    assert run._running_steps_soon(within=0) == [("s2", "reserve_inventory")]
    run._record("drop", "inventory", [("s2", "reserve_inventory")])
    assert run._running_steps_soon(within=0) == [("s9", "notify_customer")]  # every running one is stalled
    drop.recovered_after = 61.0
    assert run._running_steps_soon(within=0) == [("s1", "charge_payment")]


SAGA = "51bfb0fd-18fd-4561-ba83-f2ffa1bd2643"


def test_the_saga_of_a_dropped_message_is_read_from_its_task_id_or_its_failure_report() -> None:
    assert chaos.saga_of_message({"id": f"{SAGA}-charge_payment-g0"}) == SAGA
    report = {
        "id": "0a236709-a221-44ad-9dba-a13e91d3c311",
        "task": "saga.step_failed",
        "kwargsrepr": f"{{'saga_id': '{SAGA}', 'step': 'charge_payment', 'authority': <failure report>}}",
    }
    assert chaos.saga_of_message(report) == SAGA
    assert chaos.saga_of_message({"id": "0a236709-a221-44ad-9dba-a13e91d3c311", "task": "saga.sweep"}) is None
    assert chaos.saga_of_message({}) is None


def test_a_dropped_failure_report_catches_its_saga() -> None:
    # RabbitMQ, 12-06: a drop took a declined charge's failure report off the saga queue
    # while the saga worker restarted. The drop caught nothing (the report's task id names
    # no saga), so a race aimed at the stalled saga 20 s later reported its 79 s as its own.
    run = a_chaos(FakeBroker([("saga", "0a236709-a221-44ad-9dba-a13e91d3c311", SAGA)]))
    run._running_steps = lambda task_prefix=None: [(SAGA, "reserve_inventory"), ("other", "charge_payment")]  # type: ignore[method-assign]

    run._inject_drop()

    assert run.report.faults[0].caught == [(SAGA, "reserve_inventory")]
    assert run._running_steps_soon(within=0) == [("other", "charge_payment")]


def test_a_saga_a_later_kill_holds_again_after_its_receipt_is_the_later_kills() -> None:
    """Redis, 12-07: the payments worker killed twice 8.9 s apart, holding the same charge
    both times; received again 7.2 s after the first kill. The first kill recovered at
    that receipt; the wait for the second is the second's, not a 16.4 s first recovery."""
    run = a_chaos(FakeBroker([]))
    run._running_steps = lambda task_prefix=None: [(SAGA, "reserve_inventory")]  # type: ignore[method-assign]
    charge = f"{SAGA}-charge_payment-g0"
    first = run._record("kill", "payments", [], [charge])
    run._catch_sagas_of_kill(first, {charge: SAGA})
    run.on_task_event("task-received", charge, first.at + 7.2)
    assert first.recovered_after is None  # received again, the saga not yet moved on

    second = run._record("kill", "payments", [], [charge])
    second.at = first.at + 8.9
    run._catch_sagas_of_kill(second, {charge: SAGA})

    assert second.caught == [(SAGA, "reserve_inventory")] and not second.stalled_before
    assert first.caught == [] and first.caught_again_by_kill == [(SAGA, "reserve_inventory")]
    assert first.recovered_after == pytest.approx(7.2)
    run.on_task_event("task-received", charge, first.at + 14.0)
    run.mark_recoveries(set(), first.at + 16.4)
    assert second.recovered_after == pytest.approx(7.5)


def test_a_saga_a_later_kill_holds_before_its_first_receipt_stays_the_first_kills() -> None:
    run = a_chaos(FakeBroker([]))
    run._running_steps = lambda task_prefix=None: [(SAGA, "reserve_inventory")]  # type: ignore[method-assign]
    charge = f"{SAGA}-charge_payment-g0"
    first = run._record("kill", "payments", [], [charge])
    run._catch_sagas_of_kill(first, {charge: SAGA})
    second = run._record("kill", "payments", [], [charge])
    second.at = first.at + 3.0
    run._catch_sagas_of_kill(second, {charge: SAGA})

    assert first.caught == [(SAGA, "reserve_inventory")] and not first.caught_again_by_kill
    assert second.stalled_before == [(SAGA, "reserve_inventory")] and second.caught == []


def test_the_report_says_which_sagas_a_later_kill_took_over(capsys: Any) -> None:
    run = a_chaos(FakeBroker([]))
    first = run._record("kill", "payments", [], [f"{SAGA}-charge_payment-g0"])
    first.caught_again_by_kill = [(SAGA, "reserve_inventory")]

    chaos._print_report(run.report)

    assert "(+1 received again, then caught by a later kill)" in capsys.readouterr().out


def test_a_message_delivered_again_is_excused_only_by_a_kill_of_its_sender_in_between() -> None:
    def fault(kind: str, target: str, at: float) -> chaos.Fault:
        return chaos.Fault(kind=kind, target=target, at=at, at_wall=at)

    excused = chaos.killed_between(
        [
            fault("kill", "notifications", 100.0),
            fault("kill", "payments-2", 200.0),
            fault("drop", "notifications", 300.0),
        ],
        "notifications",
    )

    assert excused(99.9, 101.5)  # delivered, its sender killed before the record, delivered again
    assert not excused(101.0, 101.0)  # two copies at once, no kill: the race the audit is for
    assert not excused(199.0, 201.0)  # another worker's kill explains nothing
    assert not excused(299.0, 301.0)  # nor does a drop
