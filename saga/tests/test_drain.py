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


def chain_record(
    saga: SagaInstance, *, step: str = "notify_customer", ended: timedelta = timedelta(0), output: dict | None = None
) -> dict:
    """What the forward chain's last step returns and stores: ids, its output (`output` in
    its timeline entry), the timeline, sealed under the coordinator's authority for that
    step (common.steps)."""
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
    if output is not None:
        timeline[-1]["output"] = output
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


def test_records_that_wait_do_not_hold_back_the_records_behind_them() -> None:
    """A full read of records the drain must leave (fresh copies it does not want, whose
    publisher may still read them) is read past: the record behind them is recorded in the
    same sweep, not once they are a minute old."""
    early = timezone.now() - timedelta(seconds=5)
    for n in range(2):  # a test's copy, say: not a chain's record of a saga we know
        TaskResult.objects.create(task_id=f"copy-{n}-{uuid.uuid4()}", status="SUCCESS", result="{}")
    TaskResult.objects.update(date_done=early)
    saga = start()
    task_id = store(saga, chain_record(saga))

    assert saga_reports_drain(batch=2) == 1

    saga.refresh_from_db()
    assert saga.status == SagaStatus.COMPLETED
    assert not TaskResult.objects.filter(task_id=task_id).exists()
    assert TaskResult.objects.filter(task_id__startswith="copy-").count() == 2  # fresh: kept


def test_a_drain_that_read_a_record_another_drain_recorded_meanwhile_changes_nothing(monkeypatch) -> None:
    """Two drains (two saga workers, or a sweep that overran the next) read the same record;
    one records it and deletes it between the other's read and its lock. The late one finds
    the saga completed: it writes nothing, and the timeline is the one recorded."""
    from saga import progress
    from saga import store as saga_store

    saga = start()
    store(saga, chain_record(saga, ended=timedelta(seconds=5)))
    real_lock = saga_store.lock_sagas_with_steps
    interleaved: list[int | None] = []

    def lock_after_the_other_drain(saga_ids, **options):
        if not interleaved:
            interleaved.append(None)
            interleaved[0] = progress.saga_reports_drain()  # the other drain, start to end
        return real_lock(saga_ids, **options)

    monkeypatch.setattr(saga_store, "lock_sagas_with_steps", lock_after_the_other_drain)
    saga_reports_drain()

    assert interleaved == [1]
    saga.refresh_from_db()
    assert saga.status == SagaStatus.COMPLETED
    steps = {s.name: s for s in saga.steps.all()}
    assert {s.status for s in steps.values()} == {StepStatus.SUCCEEDED}
    assert all(s.attempts == 1 for s in steps.values())
    assert not TaskResult.objects.exists()
    assert saga_reports_drain() == 0


def pivoted(saga: SagaInstance) -> SagaInstance:
    """`saga` as its pivot leaves it (saga.progress.saga_pivot_commit): the steps before the
    pivot recorded from the chain's timeline, the pivot committed, the next step running."""
    from saga.progress import saga_pivot_commit

    before = chain_record(saga)["_steps"][: PLACE_ORDER.pivot_index]
    with transaction.atomic(using="orders"):
        assert saga_pivot_commit(saga_id=saga.id, order_id=saga.order_id, timeline=before, output={"confirmed": True})
    saga.refresh_from_db()
    return saga


def recorded_rows(saga: SagaInstance) -> dict:
    """Every column the coordinator writes, of the saga and of each step, with the saga's
    and its order's ids taken out of the values (two sagas' rows compare equal)."""
    saga.refresh_from_db()
    own, order = str(saga.id), str(saga.order_id)

    def plain(value):
        return str(value).replace(own, "<saga>").replace(order, "<order>") if value is not None else None

    skip = {"id", "saga", "order_id", "created_at", "trace_id", "trace_context"}
    saga_row = {f.name: plain(getattr(saga, f.name)) for f in SagaInstance._meta.concrete_fields if f.name not in skip}
    steps = {
        step.name: {f.name: plain(getattr(step, f.name)) for f in step._meta.concrete_fields if f.name not in skip}
        for step in saga.steps.all()
    }
    return {"saga": saga_row, "steps": steps}


def test_the_usual_record_in_one_statement_writes_what_the_general_way_writes(monkeypatch) -> None:
    """The drain records a confirmed order's chain end in one statement
    (saga.progress._record_completions): field for field what the general way
    (`_apply_success` over the locked models) writes for the same record."""
    from saga import progress

    at = timezone.now()
    monkeypatch.setattr(timezone, "now", lambda: at)  # both sagas' "now" the same instant
    fast, general = pivoted(start()), pivoted(start())
    for saga in (fast, general):
        output = {"notified": "order_confirmed", "channels": ["email"]}
        store(saga, chain_record(saga, ended=timedelta(seconds=3), output=output))
    real = progress._record_completions
    took: list[set] = []

    def one_statement(reports):
        took.append(recorded := real([r for r in reports if r[1].id == fast.id]))
        return recorded

    monkeypatch.setattr(progress, "_record_completions", one_statement)
    assert saga_reports_drain() == 2

    assert took == [{fast.id}]  # the general saga was left to the general way
    fast_rows, general_rows = recorded_rows(fast), recorded_rows(general)
    assert fast_rows == general_rows
    assert fast_rows["saga"]["status"] == SagaStatus.COMPLETED
    assert {name: step["status"] for name, step in fast_rows["steps"].items()} == {
        s.name: StepStatus.SUCCEEDED for s in PLACE_ORDER.steps
    }
    assert fast_rows["steps"]["confirm_order"]["worker"] == "orders@host"  # the pivot's record filled in
    fast.refresh_from_db()
    assert fast.context["notified"] == "order_confirmed" and fast.context["confirmed"] is True
    assert not TaskResult.objects.exists()


@pytest.mark.parametrize(
    "unusual",
    [
        pytest.param(lambda saga: saga, id="no pivot recorded"),
        pytest.param(
            lambda saga: pivoted(saga) and _set_step(saga, "confirm_order", worker="orders@earlier"),
            id="pivot's record taken",
        ),
        pytest.param(
            lambda saga: pivoted(saga) and _set_step(saga, "notify_customer", status=StepStatus.FAILED),
            id="last step failed",
        ),
    ],
)
def test_an_unusual_record_takes_the_general_way(unusual, monkeypatch) -> None:
    from saga import progress

    saga = unusual(start())
    store(saga, chain_record(saga))
    real = progress._record_completions
    took: list[set] = []
    monkeypatch.setattr(progress, "_record_completions", lambda reports: took.append(real(reports)) or took[-1])

    assert saga_reports_drain() == 1

    assert took == [set()]
    saga.refresh_from_db()
    assert saga.status == SagaStatus.COMPLETED


def _set_step(saga: SagaInstance, name: str, **fields) -> SagaInstance:
    saga.steps.filter(name=name).update(**fields)
    return saga


def test_a_drain_whose_saga_another_drain_recorded_meanwhile_changes_nothing(monkeypatch) -> None:
    """The one-statement way's race: another drain records the saga between this drain's
    read of the record and its statement. The statement finds the saga completed, records
    nothing, and the general way after it changes nothing either."""
    from saga import progress

    saga = pivoted(start())
    store(saga, chain_record(saga, ended=timedelta(seconds=5)))
    real = progress._record_completions
    interleaved: list[int] = []

    def after_the_other_drain(reports):
        if not interleaved:
            interleaved.append(0)
            interleaved[0] = progress.saga_reports_drain()  # the other drain, start to end
        return real(reports)

    monkeypatch.setattr(progress, "_record_completions", after_the_other_drain)
    saga_reports_drain()

    assert interleaved == [1]
    rows = recorded_rows(saga)
    assert rows["saga"]["status"] == SagaStatus.COMPLETED
    assert {step["attempts"] for step in rows["steps"].values()} == {"1"}
    assert saga_reports_drain() == 0
