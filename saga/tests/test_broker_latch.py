"""saga.broker_latch: down from a failed publish until its probe hears the broker, in
every process (a prefork pool's children are forked from a worker that may be down)."""

import multiprocessing
import os
import time

import pytest
from kombu.exceptions import OperationalError as BrokerUnavailable

from saga.broker_latch import BrokerLatch

AWAY = BrokerUnavailable("connection refused")


def until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Probe:
    def __init__(self, answers_after: int) -> None:
        self.calls, self.answers_after = 0, answers_after

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.answers_after:
            raise AWAY


def test_down_from_a_failure_until_a_probe_answers(caplog: pytest.LogCaptureFixture) -> None:
    probe = Probe(answers_after=3)
    latch = BrokerLatch(probe, lambda: 0.01)
    assert not latch.down()
    latch.failed(AWAY)
    latch.failed(AWAY)  # another thread's publish, failing at the same time
    assert latch.down()
    assert until(lambda: not latch.down())
    assert probe.calls == 4  # three unanswered probes, then the one heard
    lines = [r.getMessage() for r in caplog.records if r.name == "saga.broker_latch"]
    assert len(lines) == 2 and "the broker is away" in lines[0] and "answers again" in lines[1]


def test_down_again_after_it_answered() -> None:
    latch = BrokerLatch(Probe(answers_after=0), lambda: 0.01)
    latch.failed(AWAY)
    assert until(lambda: not latch.down())
    latch.failed(AWAY)
    assert latch.down()
    assert until(lambda: not latch.down())


def _in_child(latch: BrokerLatch, result: "multiprocessing.Queue[tuple[bool, bool]]") -> None:
    result.put((latch.down(), until(lambda: not latch.down())))


def test_a_forked_child_of_a_down_process_probes_for_itself() -> None:
    """The thread does not survive the fork; the child's first look starts its own."""
    parent = os.getpid()

    def probe() -> None:
        if os.getpid() == parent:
            raise AWAY  # the parent never hears it; the child does

    latch = BrokerLatch(probe, lambda: 0.01)
    latch.failed(AWAY)
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_in_child, args=(latch, result))
    child.start()
    child.join(timeout=10)
    assert result.get(timeout=1) == (True, True)
    assert latch.down()  # the parent's own view is its own


def _look_in_child(latch: BrokerLatch, result: "multiprocessing.Queue[bool]") -> None:
    result.put(latch.down())


def test_a_child_forked_while_the_lock_was_held_can_still_look() -> None:
    """The probe thread holds the lock for an instant when it marks the latch up; a fork at
    that instant must not leave the child's copy held for good."""
    latch = BrokerLatch(Probe(answers_after=10**6), lambda: 60.0)
    latch.failed(AWAY)
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    with latch._lock:  # as the probe thread holds it while it marks the latch up
        child = context.Process(target=_look_in_child, args=(latch, result))
        child.start()
    child.join(timeout=10)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the child hung on the lock it inherited held"
    assert result.get(timeout=1) is True
