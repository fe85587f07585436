"""A short, seeded `make chaos` run: faults while orders flow, then the audit must be clean."""

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

from devstack.topology import BASE_DIR

pytestmark = pytest.mark.integration


def test_a_short_chaos_run_finishes_every_saga_with_a_clean_audit() -> None:
    env = {**os.environ, **json.loads(os.environ["DEVSTACK_SERVER_URLS"])}
    args = ["--orders", "40", "--rate", "10", "--seed", "11", "--budget", "300"]
    args += ["--kills", "2", "--duplicates", "6", "--races", "6"]
    if settings.CELERY_BROKER_URL.startswith("amqp"):
        # A vhost of its own, next to the one this test session's workers consume.
        env["CHAOS_AMQP_URL"] = settings.CELERY_BROKER_URL.rsplit("/", 1)[0] + "/saga_chaos"
        args += ["--broker", "amqp", "--broker-restarts", "0", "--drops", "0"]
    else:
        args += ["--broker-restarts", "1", "--drops", "3"]

    run = subprocess.run(
        [sys.executable, "-m", "devstack", "chaos", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True
    )

    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    summary = json.loads((BASE_DIR / ".data" / "chaos" / "report.json").read_text())["summary"]
    assert summary["submitted"] == 40
    assert summary["violations"] == 0
    assert summary["unrecovered_faults"] == 0, output[-4000:]
    assert sum(summary["outcomes"].values()) == 40
    assert set(summary["sagas"]) <= {"completed", "compensated"}
    assert summary["faults"]["kill"] == 2
    assert summary["faults"]["race"] == 6
    print(output[output.find("chaos report") :])
