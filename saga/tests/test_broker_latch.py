"""saga.broker_latch: down from a failed publish until its probe hears the broker, in
every process (a prefork pool's children are forked from a worker that may be down)."""

import json
import os
import select
import signal
import time
from collections.abc import Callable

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


def in_a_fork(look: Callable[[], object], *, timeout: float = 10.0) -> object:
    """What `look()` returns in a child forked with `os.fork`, as billiard forks a pool
    process; raises if the child does not answer within `timeout` (it hung).

    Not `multiprocessing`: its child runs the after-fork cleanups kombu registers for the
    Celery app's connection pool, which close a channel whose broadcast reply (an earlier
    test's `query_task`, from the admin) is still pending by reading the socket both
    processes share. The first such child takes the reply and the next one waits for it
    for good, whatever the latch does."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, and leave without running the parent's exit handlers
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(look()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the forked child did not answer within {timeout} s: it hung")
        return json.loads(os.read(read_end, 1024))
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_a_forked_child_of_a_down_process_probes_for_itself() -> None:
    """The thread does not survive the fork; the child's first look starts its own."""
    parent = os.getpid()

    def probe() -> None:
        if os.getpid() == parent:
            raise AWAY  # the parent never hears it; the child does

    latch = BrokerLatch(probe, lambda: 0.01)
    latch.failed(AWAY)
    assert in_a_fork(lambda: [latch.down(), until(lambda: not latch.down())]) == [True, True]
    assert latch.down()  # the parent's own view is its own


def test_a_child_forked_while_the_lock_was_held_can_still_look() -> None:
    """The probe thread holds the lock for an instant when it marks the latch up; a fork at
    that instant must not leave the child's copy held for good."""
    latch = BrokerLatch(Probe(answers_after=10**6), lambda: 60.0)
    latch.failed(AWAY)
    with latch._lock:  # as the probe thread holds it while it marks the latch up
        # The child looks at once; it hangs if its copy of the lock stayed held.
        looked = in_a_fork(latch.down)
    assert looked is True
