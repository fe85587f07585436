"""Unit tests of the saga definition and the chains the engine builds (no broker, no DB)."""

import uuid

import pytest

from common.exceptions import InvalidMessage
from common.signing import SIGNATURE_FIELD, context_sign, context_verify
from orders.saga import PLACE_ORDER
from saga.definition import SagaDefinition, Step
from saga.engine import build_chain, step_name_of, task_id_for

SAGA_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")


def test_compensations_run_newest_first_then_fail_and_notify() -> None:
    assert [s.name for s in PLACE_ORDER.compensation_steps()] == [
        "refund_payment",
        "release_inventory",
        "fail_order",
        "notify_failure",
    ]
    assert [s.task for s in PLACE_ORDER.compensation_steps()] == [
        "payments.refund",
        "inventory.release",
        "orders.fail",
        "notifications.notify",
    ]


def test_only_steps_after_the_pivot_are_past_it() -> None:
    assert [PLACE_ORDER.is_after_pivot(s.name) for s in PLACE_ORDER.steps] == [False, False, False, True]


def test_forward_chain_calls_each_service_by_name_and_only_its_last_step_reports() -> None:
    canvas = build_chain(PLACE_ORDER.steps, saga_id=SAGA_ID, generation=3, context={"order_id": "o"})

    tasks = canvas.tasks
    assert [t.task for t in tasks] == ["inventory.reserve", "payments.charge", "orders.confirm", "notifications.notify"]
    assert tasks[0].args == (context_sign({"order_id": "o"}),)
    context_verify(tasks[0].args[0])  # participants check the coordinator's signature
    assert [t.args for t in tasks[1:]] == [(), (), ()]  # each receives the previous step's result
    for spec, sig in zip(PLACE_ORDER.steps, tasks, strict=True):
        assert sig.options["task_id"] == f"{SAGA_ID}-{spec.name}-g3"
        # One success report per chain: the steps before the last carry their timing in
        # the context instead (common.steps), so a saga costs one extra message, not four.
        if spec is PLACE_ORDER.steps[-1]:
            [link] = sig.options["link"]
            assert (link["task"], link["kwargs"]) == (
                "saga.step_succeeded",
                {"saga_id": str(SAGA_ID), "step": spec.name},
            )
        else:
            assert "link" not in sig.options
        [errback] = sig.options["link_error"]
        assert (errback["task"], errback["kwargs"]) == (
            "saga.step_failed",
            {"saga_id": str(SAGA_ID), "step": spec.name},
        )


def test_steps_are_routed_to_their_service_queue() -> None:
    from orders_project.celery import app

    router = app.amqp.router
    for name, queue in [
        ("inventory.reserve", "inventory"),
        ("payments.refund", "payments"),
        ("orders.confirm", "orders"),
        ("notifications.notify", "notifications"),
        ("saga.step_failed", "saga"),
        ("celery.chord_unlock", "saga"),
    ]:
        assert router.route({}, name)["queue"].name == queue


def test_a_task_id_names_its_step() -> None:
    task_id = task_id_for(SAGA_ID, "charge_payment", 12)
    assert step_name_of(task_id, SAGA_ID) == "charge_payment"
    assert step_name_of(task_id, uuid.uuid4()) is None
    assert step_name_of("nonsense", SAGA_ID) is None
    assert step_name_of(None, SAGA_ID) is None


def test_a_single_step_plan_is_a_plain_signature() -> None:
    sig = build_chain(PLACE_ORDER.steps[:1], saga_id=SAGA_ID, generation=0, context={})
    assert sig.task == "inventory.reserve"
    assert sig.options["task_id"] == task_id_for(SAGA_ID, "reserve_inventory", 0)


def test_definitions_reject_duplicate_names_and_unknown_pivots() -> None:
    with pytest.raises(ValueError, match="unique"):
        SagaDefinition("d", steps=(Step("a", "x.a"), Step("a", "x.b")), pivot="a")
    with pytest.raises(ValueError, match="pivot"):
        SagaDefinition("d", steps=(Step("a", "x.a"),), pivot="zzz")
    with pytest.raises(ValueError):
        build_chain((), saga_id=SAGA_ID, generation=0, context={})


CONTEXT = {
    "saga_id": str(SAGA_ID),
    "order_id": "00000000-0000-0000-0000-000000000002",
    "email": "a@example.com",
    "phone": "",
    "items": [{"sku": "MUG", "quantity": 2}],
    "payment_token": "tok_visa",
    "currency": "USD",
}


def test_a_signed_context_verifies_and_steps_may_add_fields() -> None:
    context_verify({**context_sign(CONTEXT), "amount": "20.00", "outcome": "confirmed"})


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda ctx: {k: v for k, v in ctx.items() if k != SIGNATURE_FIELD}, id="unsigned"),
        pytest.param(lambda ctx: {**ctx, SIGNATURE_FIELD: "x" * 43}, id="made-up-signature"),
        pytest.param(lambda ctx: {**ctx, SIGNATURE_FIELD: 42}, id="signature-not-a-string"),
        pytest.param(lambda ctx: {**ctx, "saga_id": str(uuid.uuid4())}, id="other-saga"),
        pytest.param(lambda ctx: {**ctx, "items": [{"sku": "MUG", "quantity": 200}]}, id="other-items"),
        pytest.param(lambda ctx: {**ctx, "payment_token": "tok_amex"}, id="other-card"),
        pytest.param(lambda ctx: {**ctx, "email": "victim@example.com"}, id="other-customer"),
        pytest.param(lambda ctx: {**ctx, "items": {1, 2}}, id="not-json"),
    ],
)
def test_a_forged_or_altered_context_is_invalid(forge) -> None:
    with pytest.raises(InvalidMessage):
        context_verify(forge(context_sign(CONTEXT)))
