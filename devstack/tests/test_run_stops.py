"""`make run`, interrupted as a terminal's Ctrl-C interrupts it, leaves no process behind.

Runs the real `python -m devstack run` (migrations, demo data, honcho with the Procfile's
web, five workers, beat and Flower) on databases and a Redis database of its own, on the
servers `make test` provides, then sends SIGINT to its process group.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import redis
import requests

from devstack.stack import ALIASES, with_database_suffix, with_redis_db
from devstack.topology import BASE_DIR, free_port, wait_for

pytestmark = pytest.mark.integration


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_stops_every_process_make_run_started_and_frees_its_ports(tmp_path: Path) -> None:
    servers = json.loads(os.environ["DEVSTACK_SERVER_URLS"])
    if not servers["CELERY_BROKER_URL"].startswith("redis"):
        pytest.skip("make run's own broker here is a Redis database")
    broker = with_redis_db(servers["CELERY_BROKER_URL"], "13")
    redis.Redis.from_url(broker).flushdb()
    port, flower_port = free_port(), free_port()
    env = {
        **os.environ,
        **{key: with_database_suffix(servers[key], "_runstop") for key in ALIASES.values()},
        "CELERY_BROKER_URL": broker,
        "PAYMENT_BREAKER_REDIS_URL": broker,
        "PORT": str(port),
        "FLOWER_PORT": str(flower_port),
    }
    log = (tmp_path / "make-run.log").open("w")
    run = subprocess.Popen(
        [sys.executable, "-m", "devstack", "run"],
        cwd=BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        wait_for(
            lambda: (
                requests.get(f"http://127.0.0.1:{port}/api/", timeout=2).status_code < 500 and _listening(flower_port)
            ),
            timeout=240,
            what="make run's web and Flower to answer",
            interval=1,
        )
        started = psutil.Process(run.pid).children(recursive=True)
        assert len(started) >= 8, [p.name() for p in started]

        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert run.wait(timeout=120) in (0, 130)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        log.close()

    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [(p.pid, p.cmdline()) for p in left]
    assert not _listening(port) and not _listening(flower_port)
