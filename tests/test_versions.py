"""Deploy while sagas run (issue 14): every saga finishes on the definition version it
started with; new ones start on the newest; a deploy that drops a version in use is refused.

The deploy is the real one: the web process and the five workers stop (each finishing what
it holds) and start again with SAGA_DEFINITIONS naming version 2 of the place-order saga
(orders.saga.PLACE_ORDER_V2: a stock check added first, charge_payment renamed
capture_payment) beside version 1. Afterwards the session's topology is deployed back.
"""

import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest

from audit.invariants import audit
from devstack.topology import BASE_DIR, WORKERS, Topology, read_procfile, wait_for
from orders.saga import PLACE_ORDER, PLACE_ORDER_V2
from payments.models import Payment
from saga.models import SagaInstance

from .api import Api, make_product, stock, wait_settled

pytestmark = pytest.mark.integration

V1_AND_V2 = "orders.saga.PLACE_ORDER,orders.saga.PLACE_ORDER_V2"
ONLY_V2 = "orders.saga.PLACE_ORDER_V2"
DEPLOYED = ("web", *WORKERS)
V1_STEPS = [step.name for step in PLACE_ORDER.steps]
V2_STEPS = [step.name for step in PLACE_ORDER_V2.steps]


@pytest.fixture
def deploy(topology: Topology) -> Iterator[Topology]:
    """The session's topology. Afterwards its web process is deployed back to the session's
    SAGA_DEFINITIONS, so later tests start version 1 sagas again; the workers keep version
    2 registered beside version 1, which changes nothing for a version 1 saga (and every
    saga this test started has finished)."""
    before = topology.env.get("SAGA_DEFINITIONS")
    yield topology
    # And whatever a failure left stopped, so that the next tests find the system running.
    restart = ["web", *(name for name in WORKERS if topology.processes[name].popen.poll() is not None)]
    topology.stop_processes(restart)
    topology.start_processes(restart, {"SAGA_DEFINITIONS": before})


def forward_steps(saga: SagaInstance) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in saga.steps.filter(phase="forward").order_by("position")]


def deploy_checks(env: dict[str, str], *, only_v2: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """What a deploy runs before it starts anything, all at once: with `only_v2` (version 1
    dropped) `manage.py saga_versions`, `manage.py check --database orders`, and the start
    of a saga worker (on a queue of its own: were it to start, it would take no saga's
    message); with `env`, `manage.py saga_versions`."""
    worker = read_procfile()["saga"].replace("-Q saga -n saga@%h", "-Q version_probe -n version_probe@%h")
    runs = [
        ([sys.executable, "manage.py", "saga_versions"], only_v2),
        ([sys.executable, "manage.py", "check", "--database", "orders"], only_v2),
        (["bash", "-c", worker], only_v2),
        ([sys.executable, "manage.py", "saga_versions"], env),
    ]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    probes = [subprocess.Popen(command, cwd=BASE_DIR, env=run_env, **output) for command, run_env in runs]
    results = []
    for (command, _), probe in zip(runs, probes, strict=True):
        try:
            output, _ = probe.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            probe.kill()
            output, _ = probe.communicate()
        results.append(subprocess.CompletedProcess(command, probe.returncode, output))
    return results


def test_sagas_finish_on_the_version_they_started_with(api: Api, deploy: Topology, sku: str) -> None:
    make_product(sku, on_hand=10)
    # Version 1 sagas, mid-way: two charges at the slow provider, and a third cancelled
    # while its charge is there (compensating: the refund waits for the charge to settle).
    v1 = [api.place_order([(sku, 1)], token="tok_slow") for _ in range(3)]
    wait_for(
        lambda: Payment.objects.filter(order_id__in=[o["id"] for o in v1], status="pending").count() == 3,
        timeout=30,
        what="the three charges to be at the provider",
    )
    cancel = api.post(f"/api/orders/{v1[2]['id']}/cancel/")
    assert cancel.status_code == 202, cancel.text
    assert cancel.json()["saga"]["status"] == "compensating"

    deploy.stop_processes(DEPLOYED)
    # Nothing runs now: the version 1 sagas are unfinished. A deploy that drops version 1
    # is refused by each of its checks, naming the version and its sagas.
    unfinished = SagaInstance.objects.filter(
        definition="place_order", definition_version=1, status__in=["running", "compensating", "needs_attention"]
    ).count()
    assert unfinished >= 3
    *refused, listed = deploy_checks(
        {**deploy.env, "SAGA_DEFINITIONS": V1_AND_V2}, only_v2={**deploy.env, "SAGA_DEFINITIONS": ONLY_V2}
    )
    for result in refused:
        assert result.returncode not in (0, None), result
        assert re.search(
            rf"'place_order' version 1 is not registered \(SAGA_DEFINITIONS\), but {unfinished} unfinished",
            result.stdout,
        ), result.stdout
    # A deploy that keeps version 1 beside version 2 passes the same check.
    assert listed.returncode == 0, listed.stdout
    assert re.search(rf"place_order\s+1\s+yes\s+{unfinished}\n", listed.stdout), listed.stdout
    assert re.search(r"place_order\s+2\s+yes, new sagas\s+0\n", listed.stdout), listed.stdout

    deploy.start_processes(DEPLOYED, {"SAGA_DEFINITIONS": V1_AND_V2})
    # New orders start on version 2: one confirmed, one declined at the renamed step, one
    # stopped by the added step before anything was reserved.
    confirmed = api.place_order([(sku, 1)], token="tok_visa")
    declined = api.place_order([(sku, 1)], token="tok_chargeDeclined")
    too_many = api.place_order([(sku, 9)], token="tok_visa")

    old = [api.wait_until_final(o["id"], timeout=60) for o in v1]
    assert [o["status"] for o in old] == ["confirmed", "confirmed", "cancelled"]
    for order in old:
        saga = SagaInstance.objects.get(id=order["saga"]["id"])
        assert saga.definition_version == 1
        assert [name for name, _ in forward_steps(saga)] == V1_STEPS
    for order in old[:2]:
        saga = SagaInstance.objects.get(id=order["saga"]["id"])
        assert (saga.status, forward_steps(saga)) == ("completed", [(name, "succeeded") for name in V1_STEPS])
    cancelled = SagaInstance.objects.get(id=old[2]["saga"]["id"])
    assert cancelled.status == "compensated"
    assert [(s.name, s.status) for s in cancelled.steps.filter(phase="compensation").order_by("position")] == [
        (step.name, "succeeded") for step in PLACE_ORDER.compensation_steps()
    ]
    # The deploy let the charge finish (warm shutdown): the cancel refunded it.
    assert [p["status"] for p in api.payments(old[2]["id"])] == ["refunded"]

    new = [api.wait_until_final(o["id"], timeout=60) for o in (confirmed, declined, too_many)]
    assert [o["status"] for o in new] == ["confirmed", "failed", "failed"]
    sagas = [SagaInstance.objects.get(id=o["saga"]["id"]) for o in new]
    assert [s.definition_version for s in sagas] == [2, 2, 2]
    assert forward_steps(sagas[0]) == [(name, "succeeded") for name in V2_STEPS]
    assert (sagas[1].status, sagas[1].failure_step, sagas[1].failure_type) == (
        "compensated",
        "capture_payment",
        "PaymentDeclined",
    )
    # The added step refused the order that asked for more than is available: nothing was
    # reserved and nothing charged.
    assert (sagas[2].status, sagas[2].failure_step, sagas[2].failure_type) == (
        "compensated",
        "check_stock",
        "InsufficientStock",
    )
    assert dict(forward_steps(sagas[2]))["reserve_inventory"] != "succeeded"
    assert api.payments(new[2]["id"]) == []
    # Stock: two version 1 orders and one version 2 order hold a unit each; the rest went back.
    assert stock(sku) == (10, 3)

    # The audit's verdict on everything this test made (other tests' leftovers aside).
    ours = [sku, *(o["id"] for o in old + new), *(o["saga"]["id"] for o in old + new)]
    wait_settled(o["saga"]["id"] for o in old + new)  # both versions settle their sales
    assert [v for v in audit(grace=timedelta(0)) if any(str(x) in v for x in ours)] == []
