"""Versioned saga definitions (issue 14), in the coordinator alone: a saga is pinned to the
version it started on; the version check names what a deployment lacks. The end-to-end
deploy, with real workers restarted on version 2, is tests/test_versions.py."""

import uuid

import pytest
from django.db import transaction

from saga.checks import check_saga_versions
from saga.definition import SagaDefinition, Step, get_definition, register, registered_versions
from saga.models import SagaInstance, SagaStatus, SagaStep
from saga.operator import saga_retry
from saga.progress import saga_step_succeeded
from saga.publish import saga_begin_compensation, saga_start

pytestmark = pytest.mark.django_db(databases=["orders"])

# A saga of its own, so the place-order saga this process runs is left as it is.
NAME = "versions_unit_test"
V1 = register(
    SagaDefinition(
        name=NAME,
        version=1,
        steps=(
            Step("reserve", "inventory.reserve", compensation=Step("release", "inventory.release")),
            Step("confirm", "orders.confirm"),
        ),
        pivot="confirm",
    )
)
V2 = register(
    SagaDefinition(
        name=NAME,
        version=2,
        steps=(
            Step("check", "inventory.check_stock"),
            Step("hold", "inventory.reserve", compensation=Step("unhold", "inventory.release")),
            Step("confirm", "orders.confirm"),
            Step("notify", "notifications.notify"),
        ),
        pivot="confirm",
    )
)


def start(version: int | None) -> SagaInstance:
    with transaction.atomic(using="orders"):
        return saga_start(definition=get_definition(NAME, version), order_id=uuid.uuid4(), context={})


def test_a_new_saga_starts_on_the_newest_version_and_an_old_one_is_found_by_its_own() -> None:
    assert registered_versions()[NAME] == [1, 2]
    assert get_definition(NAME) is V2
    assert get_definition(NAME, 1) is V1
    with pytest.raises(LookupError, match="version 3 is not registered"):
        get_definition(NAME, 3)
    # One version, one shape: a second, different definition under it is refused.
    with pytest.raises(ValueError, match="already registered, differently"):
        register(SagaDefinition(name=NAME, version=1, steps=(Step("confirm", "orders.confirm"),), pivot="confirm"))

    saga = start(None)
    assert (saga.definition, saga.definition_version) == (NAME, 2)
    steps = SagaStep.objects.filter(saga=saga).order_by("position")
    assert [s.name for s in steps] == ["check", "hold", "confirm", "notify"]


def test_a_saga_runs_to_its_end_on_the_version_it_started_with() -> None:
    old = start(1)
    # Its last step reports: by version 1 that is the end (version 2 has a step after it).
    saga_step_succeeded(saga_id=old.id, step_name="confirm", result={})
    old.refresh_from_db()
    assert (old.status, old.definition_version) == (SagaStatus.COMPLETED, 1)

    # A failure before the pivot compensates with version 1's plan.
    failing = start(1)
    with transaction.atomic(using="orders"):
        locked = SagaInstance.objects.select_for_update().get(id=failing.id)
        saga_begin_compensation(
            locked, outcome="failed", failure_step="reserve", failure_type="InsufficientStock", reason="x"
        )
    compensation = SagaStep.objects.filter(saga=failing, phase="compensation").order_by("position")
    assert [s.name for s in compensation] == ["release"]


def test_the_version_check_names_a_version_in_use_that_is_not_registered() -> None:
    stranded = SagaInstance.objects.create(definition=NAME, definition_version=7, order_id=uuid.uuid4())
    assert check_saga_versions(databases=None) == []  # it reads the store only when asked to
    [error] = check_saga_versions(databases=["orders"])
    assert error.id == "saga.E001"
    assert f"{NAME!r} version 7 is not registered (SAGA_DEFINITIONS), but 1 unfinished saga(s)" in error.msg

    stranded.status = SagaStatus.COMPENSATED  # finished: nothing needs version 7 any more
    stranded.save()
    assert check_saga_versions(databases=["orders"]) == []


def test_an_operator_retry_re_publishes_the_steps_of_the_saga_own_version(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start(1)
    SagaStep.objects.filter(saga=saga, name="reserve").update(status="succeeded")
    SagaStep.objects.filter(saga=saga, name="confirm").update(status="failed")
    SagaInstance.objects.filter(id=saga.id).update(
        status=SagaStatus.NEEDS_ATTENTION, failure_step="confirm", failure_type="StepTimedOut"
    )

    with django_capture_on_commit_callbacks(using="orders") as published:
        entry = saga_retry(saga_id=saga.id, user=None)

    assert entry.outcome == "done", entry.detail
    # Version 1 has nothing after confirm; version 2's plan would have sent confirm and notify.
    [publish] = published
    signature = publish.args[0]
    assert [signature.task] == ["orders.confirm"]
    assert signature.options["task_id"] == f"{saga.id}-confirm-g1"


def test_every_lookup_loads_the_deployments_definitions_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # A process whose first use of the registry lists it (the sweep's settlements, a
    # `saga.settled` report) must see SAGA_DEFINITIONS, not an empty registry.
    from saga import definition

    monkeypatch.setattr(definition, "_REGISTRY", {})
    monkeypatch.setattr(definition, "_LOADED", definition.threading.Event())

    listed = definition.registered_definitions()

    assert ("place_order", get_definition("place_order").version) in {(d.name, d.version) for d in listed}


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("orders.saga.PLACE_ORDER_V9", "SAGA_DEFINITIONS: cannot import 'orders.saga.PLACE_ORDER_V9'"),
        ("orders.sagas.PLACE_ORDER", "SAGA_DEFINITIONS: cannot import 'orders.sagas.PLACE_ORDER'"),
        ("orders.saga.settings", "SAGA_DEFINITIONS: orders.saga.settings is a LazySettings, not a SagaDefinition"),
    ],
)
def test_a_definition_path_that_does_not_import_is_named_by_the_check_the_command_and_the_start(
    monkeypatch: pytest.MonkeyPatch, settings, path: str, named: str
) -> None:
    from django.core.management import CommandError, call_command

    from saga import checks, definition

    monkeypatch.setattr(definition, "_REGISTRY", {})
    monkeypatch.setattr(definition, "_LOADED", definition.threading.Event())
    settings.SAGA_DEFINITIONS = [path]

    for databases in (None, ["orders"]):  # `check`, and `check --database orders`
        [error] = check_saga_versions(databases=databases)
        assert (error.id, error.msg.split(":")[0]) == ("saga.E003", "SAGA_DEFINITIONS")
        assert named in error.msg
    with pytest.raises(CommandError, match="SAGA_DEFINITIONS") as refused:
        call_command("saga_versions")
    assert named in str(refused.value)
    with pytest.raises(SystemExit) as stopped:
        checks.refuse_start_without_versions_in_use()
    assert named in str(stopped.value) and str(stopped.value).startswith("refusing to start: ")
