"""The sweeper's verdict on a stalled chain, from what the broker and the workers said
(saga.recovery.chain_whereabouts), without a broker: the system tests cover it end to end
(tests/test_faults.py)."""

import logging
import threading
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from orders_project.tests.startup import django_setup
from saga import recovery
from saga.recovery import EMPTY, UNKNOWN, BrokerView, chain_whereabouts, stamp_sent_at

T = 1_000_000.0  # when the segment's first step was queued
CHAIN = [("s-reserve-g0", "inventory", 10.0), ("s-charge-g0", "payments", 12.0), ("s-confirm-g0", "orders", 10.0)]


@pytest.fixture(autouse=True)
def _slack(settings) -> None:
    settings.SAGA_CLOCK_SLACK = 3.0


def verdict(heads: dict[str, float], *, held: frozenset[str] = frozenset(), now: float = T + 40) -> str:
    return chain_whereabouts(queued_at=T, chain=CHAIN, view=BrokerView(held=held, heads=heads), now=now).verdict


def test_a_chain_a_live_worker_holds_is_being_worked_on() -> None:
    assert verdict({"inventory": UNKNOWN}, held=frozenset({"s-charge-g0"})) == "held"


def test_with_every_queue_empty_the_message_is_lost() -> None:
    assert verdict({}) == "lost"
    assert verdict(dict.fromkeys(["inventory", "payments", "orders", "saga"], EMPTY)) == "lost"


def test_steady_traffic_whose_oldest_message_is_younger_than_the_chain_does_not_hide_a_lost_message() -> None:
    # Every queue busy, but each one's oldest waiting message was sent a second ago:
    # FIFO, so whatever this chain sent before has been taken, and no worker holds it.
    now = T + 45
    assert verdict(dict.fromkeys(["inventory", "payments", "orders", "saga"], now - 1), now=now) == "lost"


def test_a_backlog_older_than_the_chain_may_still_hold_its_message() -> None:
    assert verdict({"inventory": T - 5}) == "waiting"  # the first step may be queued behind it
    # The report may be behind a saga queue that has waited since before the chain could end.
    assert verdict({"saga": T + 20}) == "waiting"


def test_a_busy_coordinator_queue_hides_a_report_only_if_one_was_sent_early_enough() -> None:
    """The sweeper's quiet look says what it knows of the chain's failure report: none can
    exist (no step's failure stored), or none was sent after its failure was stored."""
    heads = {"saga": T + 20}  # a busy coordinator queue, behind since before the chain could end

    def with_report(sent_by: float | None) -> str:
        view = BrokerView(heads=heads)
        return chain_whereabouts(queued_at=T, chain=CHAIN, view=view, now=T + 40, report_sent_by=sent_by).verdict

    assert with_report(None) == "lost"
    assert with_report(T + 25) == "waiting"  # a step failed at T + 22: its report may be behind
    assert with_report(T + 15) == "lost"  # its report was sent before everything waiting there
    # A step that failed after a healthy chain would have ended (a slow one, given time):
    # its report may still wait behind a head the healthy chain's bound is past.
    heads["saga"] = T + 38
    assert with_report(None) == "lost"
    assert with_report(T + 39) == "waiting"


def test_a_later_step_may_wait_as_long_as_the_queues_before_it_made_it_late() -> None:
    now = T + 60
    # The inventory queue waits 25 s now: a healthy chain may have sent its charge as late as
    # T + 3 + 10 + 25, so a payments head sent at T + 30 may still have it behind.
    heads = {"inventory": now - 25, "payments": T + 30}
    assert chain_whereabouts(queued_at=T, chain=CHAIN, view=BrokerView(heads=heads), now=now).verdict == "waiting"
    heads = {"inventory": now - 1, "payments": T + 30}
    assert chain_whereabouts(queued_at=T, chain=CHAIN, view=BrokerView(heads=heads), now=now).verdict == "lost"


def test_a_queue_that_cannot_be_read_counts_as_possibly_holding_it() -> None:
    where = chain_whereabouts(queued_at=T, chain=CHAIN, view=BrokerView(heads={"payments": UNKNOWN}), now=T + 40)
    assert where.verdict == "waiting"
    assert where.wait == float("inf")  # the sweeper bounds this by SAGA_BACKLOG_PATIENCE


def test_every_published_message_says_when_it_was_sent() -> None:
    headers: dict = {"id": "x"}
    stamp_sent_at(headers=headers, body=())
    assert isinstance(headers["saga_sent_at"], float)


# --- AMQP: how far the workers have got stands in for the head no one can peek ----------


class _Request:
    def __init__(self, queue: str, headers: dict) -> None:
        self.delivery_info = {"routing_key": queue, "redelivered": False}
        self.request_dict = headers


def test_a_worker_notes_the_newest_message_it_took_from_each_queue(monkeypatch) -> None:
    from saga import recovery

    monkeypatch.setattr(recovery, "_taken", {})
    for queue, sent in [("payments", T + 2), ("payments", T + 5), ("payments", T + 3), ("orders", T + 1)]:
        recovery.taken_note(request=_Request(queue, {recovery.SENT_AT: sent}))
    recovery.taken_note(request=_Request("orders", {}))  # a message from before SENT_AT: nothing learned
    recovery.taken_note(request=_Request("orders", {recovery.SENT_AT: time.time() + 3600}))  # forged: ignored
    recovery.taken_note(request=None)

    # A message restored after its taker died arrives with its old time: the note keeps the newest.
    assert recovery.saga_taken(state=None) == {"payments": T + 5, "orders": T + 1}


def test_a_queue_a_worker_has_taken_past_the_chain_from_hides_no_lost_message() -> None:
    # AMQP: payments still holds messages, but its worker has taken one sent 30 s after this
    # chain's charge could have been: FIFO, so the charge is no longer waiting there.
    now = T + 45
    heads = {"inventory": EMPTY, "payments": T + 40, "orders": EMPTY, "saga": EMPTY}
    assert verdict(heads, now=now) == "lost"
    # Without that (no live worker has taken from it yet), it may still be waiting.
    assert verdict({**heads, "payments": UNKNOWN}, now=now) == "waiting"


def test_a_head_in_the_future_is_unknown_not_a_reason_to_call_chains_lost() -> None:
    # A forged header or remote-control reply must not make every stalled chain look lost.
    from saga.recovery import plausible_sent_at

    now = T + 45
    assert plausible_sent_at(T + 40, now=now) == T + 40
    assert plausible_sent_at(now + 2, now=now) == now + 2  # a publisher's clock a little ahead
    assert plausible_sent_at(now + 3600, now=now) == UNKNOWN
    assert plausible_sent_at(float("inf"), now=now) == UNKNOWN
    assert plausible_sent_at(float("nan"), now=now) == UNKNOWN


def test_the_watchdog_says_once_that_the_broker_is_away_and_once_that_it_is_back(
    settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker restart fails every look (one a second in each worker) until it is back:
    one line when it starts, one when it ends; another failure keeps its traceback."""
    settings.SAGA_ORPHAN_INTERVAL = 0.01
    outcomes = [RedisConnectionError("refused")] * 3 + [None, ValueError("a bug"), None]
    looked = threading.Event()

    def look(**_: object) -> None:
        outcome = outcomes.pop(0) if outcomes else None
        if not outcomes:
            looked.set()
        if outcome is not None:
            raise outcome

    class Connection:
        def release(self) -> None: ...

    monkeypatch.setattr(recovery, "orphans_restore", look)
    monkeypatch.setattr(recovery.app, "connection_for_write", Connection)
    recovery._watchdog_stop.clear()
    watchdog = threading.Thread(target=recovery._watchdog_loop, daemon=True)
    with caplog.at_level(logging.INFO, logger="saga.recovery"):
        watchdog.start()
        assert looked.wait(5)
        recovery._watchdog_stop.set()
        watchdog.join(5)

    said = [(r.levelname, r.getMessage().split(" (")[0].split(":")[0], r.exc_info is not None) for r in caplog.records]
    assert said == [
        ("WARNING", "the unacknowledged-message watchdog cannot reach the broker", False),
        ("INFO", "the unacknowledged-message watchdog reaches the broker again", False),
        ("WARNING", "the unacknowledged-message watchdog failed", True),
    ]


@pytest.mark.parametrize("quiet", ["5", "-1"])
def test_a_quiet_time_shorter_than_the_watchdogs_return_is_refused_at_start_up(quiet: str) -> None:
    """A killed worker's message waits in Redis's unacknowledged hash until the watchdog
    returns it (3 + 2 * 2 + 1 s by default): a quiet look before that would call it lost."""
    started = django_setup(SAGA_QUIET_SECONDS=quiet)
    assert started.returncode != 0
    assert "SAGA_QUIET_SECONDS must be 0 (off) or at least 8 s" in started.stderr
    assert f"not {float(quiet):g}" in started.stderr
