"""The coordinator learns a chain's end from the record its last step stored in the result
backend (saga.engine, saga.progress.saga_reports_drain): no workers, the orders and
default databases only."""

import json
import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from django_celery_results.models import TaskResult

from common.signing import Authority, context_digest, seal
from orders.saga import PLACE_ORDER
from saga.engine import task_id_for
from saga.models import SagaInstance, SagaStatus, StepStatus
from saga.progress import saga_reports_drain
from saga.publish import saga_start

pytestmark = pytest.mark.django_db(databases=["orders", "default"])


def start() -> SagaInstance:
    with transaction.atomic(using="orders"):
        return saga_start(definition=PLACE_ORDER, order_id=uuid.uuid4(), context={"items": []})


def chain_record(saga: SagaInstance, *, step: str = "notify_customer", ended: timedelta = timedelta(0)) -> dict:
    """What the forward chain's last step returns and stores: ids, its output, the timeline,
    sealed under the coordinator's authority for that step (common.steps)."""
    finished = timezone.now() - ended
    timeline = [
        {
            "task_id": task_id_for(saga.id, spec.name, saga.generation),
            "started_at": (finished - timedelta(milliseconds=50)).isoformat(),
            "finished_at": finished.isoformat(),
            "attempt": 1,
            "worker": f"{spec.task.split('.')[0]}@host",
            "output": {},
        }
        for spec in PLACE_ORDER.steps
    ]
    # The authority the step acted on, as common.steps seals its output with (this test
    # holds SECRET_KEY, as every process of the system does).
    authority = Authority(str(saga.id), step, "", "forward", saga.generation, context_digest(saga.context), "")
    body = {"saga_id": str(saga.id), "order_id": str(saga.order_id), "notified": "order_confirmed", "_steps": timeline}
    return seal(body, authority)


def store(saga: SagaInstance, record: dict, *, step: str = "notify_customer") -> str:
    task_id = task_id_for(saga.id, step, saga.generation)
    TaskResult.objects.create(
        task_id=task_id, status="SUCCESS", result=json.dumps(record), content_type="application/json"
    )
    return task_id


def test_a_stored_record_completes_its_saga_at_the_time_its_last_step_finished() -> None:
    saga = start()
    task_id = store(saga, chain_record(saga, ended=timedelta(seconds=5)))

    assert saga_reports_drain() == 1

    saga.refresh_from_db()
    assert saga.status == SagaStatus.COMPLETED
    # When it ended, not when the coordinator heard of it.
    assert timezone.now() - saga.finished_at >= timedelta(seconds=5)
    assert {s.name: s.status for s in saga.steps.all()} == {s.name: StepStatus.SUCCEEDED for s in PLACE_ORDER.steps}
    assert all(s.worker and s.started_at for s in saga.steps.all())
    # Drained: the record is gone, and draining again finds nothing.
    assert not TaskResult.objects.filter(task_id=task_id).exists()
    assert saga_reports_drain() == 0


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda saga, record: {**record, "notified": "order_failed"}, id="altered"),
        pytest.param(lambda saga, record: {k: v for k, v in record.items() if k != "_seal"}, id="unsealed"),
        pytest.param(lambda saga, record: chain_record(start()), id="another-sagas"),
        pytest.param(lambda saga, record: chain_record(saga, step="confirm_order"), id="another-steps"),
    ],
)
def test_a_forged_record_moves_nothing(forge, caplog: pytest.LogCaptureFixture) -> None:
    saga = start()
    store(saga, forge(saga, chain_record(saga)))

    assert saga_reports_drain() == 0

    saga.refresh_from_db()
    assert saga.status == SagaStatus.RUNNING
    assert "is not its step's" in caplog.text


def test_a_record_of_an_ended_saga_or_a_failure_is_not_drained() -> None:
    saga = start()
    failed = task_id_for(saga.id, "notify_customer", saga.generation)
    TaskResult.objects.create(task_id=failed, status="FAILURE", result=json.dumps({"exc_type": "X"}))
    assert saga_reports_drain() == 0
    assert TaskResult.objects.filter(task_id=failed).exists()  # the failure report's to read


def test_several_sagas_records_are_recorded_together() -> None:
    sagas = [start() for _ in range(3)]
    for saga in sagas:
        store(saga, chain_record(saga))

    assert saga_reports_drain() == 3

    for saga in sagas:
        saga.refresh_from_db()
        assert saga.status == SagaStatus.COMPLETED
    assert not TaskResult.objects.exists()
