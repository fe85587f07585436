"""Unit tests of the saga definition and the chains the engine builds (no broker, no DB)."""

import uuid
from decimal import Decimal

import pytest
from django.core import signing
from kombu.utils import json as kombu_json

from common.exceptions import InvalidMessage
from common.signing import (
    AUTHORITY_KWARG,
    SEAL_FIELD,
    authority_mint,
    authority_verify,
    context_digest,
    failure_report_verify,
    seal,
    seal_verify,
)
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


def test_after_a_final_failure_the_compensations_of_that_step_and_later_ones_are_not_needed() -> None:
    assert PLACE_ORDER.compensations_not_needed("charge_payment", "PaymentDeclined") == 1
    for step, failure in [
        ("charge_payment", "GatewayUnavailable"),  # the provider may still charge: refund
        ("charge_payment", "StepTimedOut"),
        ("charge_payment", "Cancelled"),
        ("reserve_inventory", "PaymentDeclined"),  # not a failure the reservation records as final
        ("no_such_step", "PaymentDeclined"),
    ]:
        assert PLACE_ORDER.compensations_not_needed(step, failure) == 0, (step, failure)
    # Steps after the one that failed for good never ran: theirs are not needed either.
    saga = SagaDefinition(
        name="three",
        steps=(
            Step("a", "s.a", compensation=Step("undo_a", "s.undo_a")),
            Step("b", "s.b", compensation=Step("undo_b", "s.undo_b"), final_failures=("Final",)),
            Step("c", "s.c", compensation=Step("undo_c", "s.undo_c")),
            Step("d", "s.d"),
        ),
        pivot="d",
        after_compensation=(Step("tell", "s.tell"),),
    )
    assert [s.name for s in saga.compensation_steps()] == ["undo_c", "undo_b", "undo_a", "tell"]
    assert saga.compensations_not_needed("b", "Final") == 2
    assert saga.compensations_not_needed("b", "Other") == 0
    assert saga.compensations_not_needed("c", "Final") == 0


def test_only_steps_after_the_pivot_are_past_it() -> None:
    assert [PLACE_ORDER.is_after_pivot(s.name) for s in PLACE_ORDER.steps] == [False, False, False, True]


def test_forward_chain_calls_each_service_by_name_and_only_its_last_step_stores_its_record() -> None:
    context = {"saga_id": str(SAGA_ID), "order_id": "o"}
    canvas = build_chain(PLACE_ORDER.steps, saga_id=SAGA_ID, generation=3, phase="forward", context=context)

    tasks = canvas.tasks
    assert [t.task for t in tasks] == ["inventory.reserve", "payments.charge", "orders.confirm", "notifications.notify"]
    assert tasks[0].args == (context,)
    # Participants check the coordinator's authority for their own task.
    authority_verify(tasks[0].kwargs[AUTHORITY_KWARG], task="inventory.reserve", ctx=context)
    assert [t.args for t in tasks[1:]] == [(), (), ()]  # each receives the previous step's result
    for sig in tasks:
        # Flower and the logs see neither the context nor the authority.
        assert "o" not in sig.options["argsrepr"].replace(str(SAGA_ID), "").replace("context", "")
        assert AUTHORITY_KWARG in sig.options["kwargsrepr"] and sig.kwargs[AUTHORITY_KWARG] not in str(sig.options)
    for spec, sig in zip(PLACE_ORDER.steps, tasks, strict=True):
        assert sig.options["task_id"] == f"{SAGA_ID}-{spec.name}-g3"
        # No success report messages: the steps before the last carry their timing in the
        # context (common.steps), and the last stores the chain's record in the result
        # backend, which the coordinator drains (saga.progress.saga_reports_drain).
        assert "link" not in sig.options
        assert sig.options.get("ignore_result") is (False if spec is PLACE_ORDER.steps[-1] else None)
        [errback] = sig.options["link_error"]
        report = {k: v for k, v in errback["kwargs"].items() if k != AUTHORITY_KWARG}
        assert (errback["task"], report) == ("saga.step_failed", {"saga_id": str(SAGA_ID), "step": spec.name})
        # The coordinator's authority to report this task's failure, and no other's; shown
        # to Flower and the logs as a placeholder.
        token = errback["kwargs"][AUTHORITY_KWARG]
        failure_report_verify(token, saga_id=SAGA_ID, step=spec.name, task_id=sig.options["task_id"])
        with pytest.raises(InvalidMessage, match="not"):
            failure_report_verify(token, saga_id=SAGA_ID, step=spec.name, task_id=f"{SAGA_ID}-{spec.name}-g2")
        assert token not in str(errback["options"]) and "<failure report>" in errback["options"]["kwargsrepr"]


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
    sig = build_chain(PLACE_ORDER.steps[:1], saga_id=SAGA_ID, generation=0, phase="forward", context={})
    assert sig.task == "inventory.reserve"
    assert sig.options["task_id"] == task_id_for(SAGA_ID, "reserve_inventory", 0)


def test_definitions_reject_duplicate_names_and_unknown_pivots() -> None:
    with pytest.raises(ValueError, match="unique"):
        SagaDefinition("d", steps=(Step("a", "x.a"), Step("a", "x.b")), pivot="a")
    with pytest.raises(ValueError, match="pivot"):
        SagaDefinition("d", steps=(Step("a", "x.a"),), pivot="zzz")
    with pytest.raises(ValueError):
        build_chain((), saga_id=SAGA_ID, generation=0, phase="forward", context={})


CONTEXT = {
    "saga_id": str(SAGA_ID),
    "order_id": "00000000-0000-0000-0000-000000000002",
    "email": "a@example.com",
    "phone": "",
    "items": [{"sku": "MUG", "quantity": 2}],
    "payment_token": "tok_visa",
    "currency": "USD",
}


def chain_messages(plan, *, phase: str = "forward", generation: int = 1, context=CONTEXT) -> dict:
    """{task name: (context, kwargs)} of each step of a chain, as a participant receives
    it: the first gets the coordinator's context, each next one the previous step's sealed
    output (the output itself is made up: only the seal matters here)."""
    canvas = build_chain(plan, saga_id=SAGA_ID, generation=generation, phase=phase, context=context)
    sigs = canvas.tasks if hasattr(canvas, "tasks") else [canvas]
    messages, ctx = {}, dict(sigs[0].args[0])
    for i, sig in enumerate(sigs):
        messages[sig.task] = (ctx, dict(sig.kwargs))
        authority = authority_verify(sig.kwargs[AUTHORITY_KWARG], task=sig.task, ctx=ctx)
        ctx = seal({**{k: v for k, v in ctx.items() if k != SEAL_FIELD}, f"out{i}": i, "amount": "20.00"}, authority)
    return messages


def test_each_step_of_a_chain_verifies_with_its_own_authority() -> None:
    forward = chain_messages(PLACE_ORDER.steps)
    assert list(forward) == ["inventory.reserve", "payments.charge", "orders.confirm", "notifications.notify"]
    compensation = chain_messages(PLACE_ORDER.compensation_steps(), phase="compensation", generation=2)
    assert list(compensation) == ["payments.refund", "inventory.release", "orders.fail", "notifications.notify"]


def test_a_step_output_is_sealed_for_the_coordinator() -> None:
    ctx, kwargs = chain_messages(PLACE_ORDER.steps)["payments.charge"]
    authority = authority_verify(kwargs[AUTHORITY_KWARG], task="payments.charge", ctx=ctx)
    sealed = seal({**ctx, "payment_id": "p"}, authority)
    by = seal_verify(sealed)
    assert (by.saga_id, by.step, by.phase, by.generation) == (str(SAGA_ID), "charge_payment", "forward", 1)
    with pytest.raises(InvalidMessage, match="altered"):
        seal_verify({**sealed, "payment_id": "q"})


def _refused(task: str, ctx: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        authority_verify(kwargs.get(AUTHORITY_KWARG), task=task, ctx=ctx)


def test_a_step_authority_authorises_no_other_task() -> None:
    forward = chain_messages(PLACE_ORDER.steps)
    compensation = chain_messages(PLACE_ORDER.compensation_steps(), phase="compensation", generation=2)
    everything = {
        **{("forward", t): m for t, m in forward.items()},
        **{("comp", t): m for t, m in compensation.items()},
    }
    for (_, task), (ctx, kwargs) in everything.items():
        for other in {t for _, t in everything} - {task}:
            _refused(other, ctx, kwargs, "not " + other.replace(".", r"\."))
    # A logged forward message replayed as a compensation: never a refund or a release.
    for ctx, kwargs in forward.values():
        _refused("payments.refund", ctx, kwargs, "not payments")
        _refused("inventory.release", ctx, kwargs, "not inventory")


def test_a_step_takes_only_the_output_of_the_step_before_it_in_the_same_chain() -> None:
    forward = chain_messages(PLACE_ORDER.steps)
    other_generation = chain_messages(PLACE_ORDER.steps, generation=2)
    # confirm's authority with charge's input (reserve's output), and vice versa.
    _refused("orders.confirm", forward["payments.charge"][0], forward["orders.confirm"][1], "output of")
    _refused("payments.charge", forward["orders.confirm"][0], forward["payments.charge"][1], "output of")
    # The same step, its input from another generation's chain.
    _refused("payments.charge", other_generation["payments.charge"][0], forward["payments.charge"][1], "output of")
    # The first step of a chain given a sealed output instead of the coordinator's context.
    _refused("inventory.reserve", forward["payments.charge"][0], forward["inventory.reserve"][1], "not the one")
    # A later step given the coordinator's raw context (the first message carries it, and
    # the authorities of every later step): its authority is bound to a step's output.
    for task in ("payments.charge", "orders.confirm", "notifications.notify"):
        _refused(task, forward["inventory.reserve"][0], forward[task][1], "bad step authority")


def test_a_step_output_keeps_its_saga_id() -> None:
    ctx, kwargs = chain_messages(PLACE_ORDER.steps)["payments.charge"]
    authority = authority_verify(kwargs[AUTHORITY_KWARG], task="payments.charge", ctx=ctx)
    with pytest.raises(InvalidMessage, match="saga id"):
        seal({**ctx, "saga_id": str(uuid.uuid4())}, authority)


@pytest.mark.parametrize(
    ("task", "alter", "match"),
    [
        ("inventory.reserve", lambda ctx: {**ctx, "items": [{"sku": "MUG", "quantity": 200}]}, "not the one"),
        ("inventory.reserve", lambda ctx: {**ctx, "payment_token": "tok_amex"}, "not the one"),
        ("inventory.reserve", lambda ctx: {**ctx, "email": "victim@example.com"}, "not the one"),
        ("inventory.reserve", lambda ctx: {**ctx, "saga_id": str(uuid.uuid4())}, "not"),
        ("inventory.reserve", lambda ctx: {**ctx, "items": {1, 2}}, "not the one"),
        ("inventory.reserve", lambda ctx: {**ctx, "amount": float("nan")}, "plain JSON"),
        ("payments.charge", lambda ctx: {**ctx, "amount": "0.01"}, "altered"),
        # Without its seal, the output names no coordinator context the authority is bound to.
        ("payments.charge", lambda ctx: {k: v for k, v in ctx.items() if k != SEAL_FIELD}, "bad step authority"),
        ("payments.charge", lambda ctx: {**ctx, SEAL_FIELD: "x" * 60}, "bad step output seal"),
        ("notifications.notify", lambda ctx: {**ctx, "outcome": "cancelled"}, "altered"),
    ],
)
def test_an_altered_message_is_invalid(task, alter, match) -> None:
    ctx, kwargs = chain_messages(PLACE_ORDER.steps)[task]
    authority_verify(kwargs[AUTHORITY_KWARG], task=task, ctx=ctx)  # as sent, it verifies
    _refused(task, alter(ctx), kwargs, match)


def test_a_compensation_outcome_is_signed_by_the_coordinator() -> None:
    context = {**CONTEXT, "outcome": "failed", "failure_reason": "declined"}
    ctx, kwargs = chain_messages(PLACE_ORDER.compensation_steps(), phase="compensation", context=context)[
        "payments.refund"
    ]
    _refused("payments.refund", {**ctx, "outcome": "cancelled"}, kwargs, "not the one")


@pytest.mark.parametrize(
    "authority",
    [
        pytest.param(None, id="missing"),
        pytest.param(42, id="not-a-string"),
        pytest.param("x" * 43, id="made-up"),
        pytest.param("y" * 5000, id="oversized"),
    ],
)
def test_a_forged_authority_is_invalid(authority) -> None:
    _refused("inventory.reserve", CONTEXT, {AUTHORITY_KWARG: authority}, "authority")


def test_an_authority_signed_with_another_key_or_salt_is_invalid(settings) -> None:
    token = authority_mint(
        saga_id=SAGA_ID,
        step="refund_payment",
        task="payments.refund",
        phase="compensation",
        generation=1,
        context=CONTEXT,
    )
    authority_verify(token, task="payments.refund", ctx=CONTEXT)
    settings.SECRET_KEY = "another-key-" * 5
    _refused("payments.refund", CONTEXT, {AUTHORITY_KWARG: token}, "bad step authority")


def test_an_authority_expires(settings) -> None:
    token = authority_mint(
        saga_id=SAGA_ID,
        step="reserve_inventory",
        task="inventory.reserve",
        phase="forward",
        generation=1,
        context=CONTEXT,
    )
    settings.SAGA_MESSAGE_MAX_AGE = -1
    _refused("inventory.reserve", CONTEXT, {AUTHORITY_KWARG: token}, "expired")


def test_every_field_the_coordinator_writes_is_covered() -> None:
    # A field added to the context by a later change (the quoted total) needs no change here.
    assert context_digest({**CONTEXT, "total": "20.00"}) != context_digest({**CONTEXT, "total": "0.01"})


def test_the_context_is_signed_as_participants_receive_it() -> None:
    # kombu's JSON carries a UUID or a Decimal as such: the authority covers what arrives.
    context = {"saga_id": str(SAGA_ID), "order_id": uuid.UUID(int=2), "total": Decimal("20.00")}
    sig = build_chain(PLACE_ORDER.steps[:1], saga_id=SAGA_ID, generation=0, phase="forward", context=context)
    received = kombu_json.loads(kombu_json.dumps(sig.args[0]))
    assert received == context
    authority_verify(sig.kwargs[AUTHORITY_KWARG], task="inventory.reserve", ctx=received)
    with pytest.raises(InvalidMessage, match="not the one"):
        authority_verify(sig.kwargs[AUTHORITY_KWARG], task="inventory.reserve", ctx={**received, "total": "0.01"})


def test_tokens_carry_only_what_the_verifier_cannot_work_out() -> None:
    # The saga id and the context's digest are bound into the signature, not written into
    # the token: each hop carries the authorities ahead and a seal (docs/DECISIONS.md).
    ctx, kwargs = chain_messages(PLACE_ORDER.steps)["orders.confirm"]
    digest = context_digest(CONTEXT)
    tokens = [kwargs[AUTHORITY_KWARG], ctx[SEAL_FIELD]]
    canvas = build_chain(PLACE_ORDER.steps, saga_id=SAGA_ID, generation=1, phase="forward", context=CONTEXT)
    tokens += [sig.options["link_error"][0]["kwargs"][AUTHORITY_KWARG] for sig in canvas.tasks]
    for token in tokens:
        value = signing.b64_decode(token.split(":")[0].encode()).decode()
        assert str(SAGA_ID) not in value
        assert len(token) < 170, token
    assert digest not in signing.b64_decode(kwargs[AUTHORITY_KWARG].split(":")[0].encode()).decode()
