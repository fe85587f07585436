"""The web process as gunicorn loads it (orders_project.wsgi)."""

import json
import subprocess
import sys

import pytest

from devstack.topology import BASE_DIR, Topology

pytestmark = pytest.mark.integration

LOAD_AS_GUNICORN_DOES = """
import gc, json, sys
import orders_project.wsgi
gc.collect()
print(json.dumps({"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects()),
                  "views": "orders.api.views" in sys.modules}))
"""


def test_what_the_web_process_loads_is_kept_out_of_the_collector(topology: Topology) -> None:
    # A full collection walks every tracked object while holding the GIL: with what Django,
    # REST framework and the apps load (and the views, which the first request would
    # otherwise import) frozen, it walks only what requests left behind.
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AS_GUNICORN_DOES],
        cwd=BASE_DIR,
        env=topology.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["views"], "the URLconf's views are imported before the freeze"
    assert loaded["frozen"] > 50_000, loaded
    assert loaded["tracked"] < loaded["frozen"] / 10, loaded
