"""A quiet system's log is quiet: beat and the saga worker run the sweeper every
SAGA_SWEEP_INTERVAL (1 s here) and, when it finds nothing, write nothing about it
(orders_project.log.QuietHousekeepingFilter; orders_project/tests/test_log_filters.py has
the record-level cases)."""

import re
import socket

from devstack.topology import Topology, wait_for
from orders_project.celery import app


def sweeps_done(node: str) -> int:
    stats = app.control.inspect(destination=[node], timeout=2.0).stats() or {}
    return int(stats.get(node, {}).get("total", {}).get("saga.sweep", 0))


def test_sweeps_that_find_nothing_write_no_line(topology: Topology) -> None:
    saga_log, beat_log = topology.processes["saga"].log_path, topology.processes["beat"].log_path
    saga_from, beat_from = saga_log.stat().st_size, beat_log.stat().st_size
    node = f"saga@{socket.gethostname()}"
    before = sweeps_done(node)

    # Three sweeps more, run by the saga worker while we watch its log and beat's.
    wait_for(lambda: sweeps_done(node) >= before + 3, timeout=30, what="three more sweeps")

    with saga_log.open("rb") as f:
        f.seek(saga_from)
        saga_lines = f.read().decode(errors="replace")
    with beat_log.open("rb") as f:
        f.seek(beat_from)
        beat_lines = f.read().decode(errors="replace")
    # A sweep that acted on another test's leftovers may log what it did; a routine one, nothing.
    assert re.findall(r".*saga\.sweep\[[^]]+\] (?:received|succeeded in \S+: \{\}).*", saga_lines) == []
    assert re.findall(r".*Sending due task saga-sweep.*", beat_lines) == []
