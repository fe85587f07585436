"""The hot path's check of an order body (orders.api.serializers.order_input_as_given)
against the declared serializer: it may pass a body on to the serializer, never differ."""

from typing import Any

from django.conf import settings
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders.api.serializers import OrderCreateInput, order_input_as_given

VALID = {"email": "you@example.com", "items": [{"sku": "MUG-LOGO", "quantity": 2}], "payment_token": "tok_visa"}

# Values near every edge the serializer draws: whitespace to trim, types it converts,
# characters it refuses, lengths and bounds, and plainly valid ones.
_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "MUG",
            " MUG",
            "MUG\n",
            "M\x00G",
            "\ud800",
            "tok_visa",
            "tok_visa\n",
            " tok_visa",
            "tok_",
            "tok_" + "a" * 60,
            "tok_" + "a" * 61,
            "you@example.com",
            "you@example.com ",
            "you@@example.com",
            "you@localhost",
            "a" * 64 + "@" + "b" * 185 + ".com",
            "+14155550123",
            "+1415555",
            "+0123456789",
            "+14155550123\n",
            "X" * 64,
            "X" * 65,
            "\u00e9t\u00e9",
        ]
    ),
    st.text(max_size=20),
)
_QUANTITY = st.one_of(
    st.integers(min_value=-2, max_value=settings.ORDER_MAX_QUANTITY + 2),
    st.sampled_from([True, False, 2.0, 2.5, "2", " 2", None, [], {}]),
)
_ANY = st.one_of(_TEXT, _QUANTITY)
_ITEM = st.one_of(
    st.fixed_dictionaries({"sku": _TEXT, "quantity": _QUANTITY}),
    st.fixed_dictionaries({"sku": _TEXT}, optional={"quantity": _QUANTITY, "price": _ANY}),
    _ANY,
)
_ITEMS = st.one_of(
    st.lists(_ITEM, max_size=4),
    st.lists(st.fixed_dictionaries({"sku": st.sampled_from(["A", "B"]), "quantity": st.just(1)}), max_size=3),
    _ANY,
)
# A valid body with one field, or one line, replaced: where a difference would hide.
_NEAR_VALID = st.one_of(
    st.builds(lambda field, value: {**VALID, field: value}, st.sampled_from([*sorted(VALID), "phone"]), _ANY),
    st.builds(
        lambda item, at_end: {**VALID, "items": [*VALID["items"], item] if at_end else [item, *VALID["items"]]},
        _ITEM,
        st.booleans(),
    ),
)
_BODY = st.one_of(
    _NEAR_VALID,
    st.fixed_dictionaries(
        {"email": _TEXT, "items": _ITEMS, "payment_token": _TEXT},
        optional={"phone": st.one_of(_TEXT, st.none()), "note": _ANY},
    ),
    st.dictionaries(st.sampled_from(["email", "phone", "items", "payment_token"]), _ANY),
    _ANY,
)


def _serializer_result(body: Any) -> dict[str, Any] | None:
    serializer = OrderCreateInput(data=body)
    if not serializer.is_valid():
        return None
    return {**serializer.validated_data, "items": [dict(item) for item in serializer.validated_data["items"]]}


@hypothesis_settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_BODY)
@example({**VALID, "items": [{"sku": "M\x00G", "quantity": 1}]})
@example({**VALID, "email": "you\ud800@example.com"})
@example({**VALID, "payment_token": "tok_visa\n"})
@example({**VALID, "phone": "+14155550123\n"})
def test_the_hot_path_passes_on_or_agrees_with_the_serializer(body: Any) -> None:
    ours = order_input_as_given(body)
    if ours is not None:
        assert ours == _serializer_result(body)


def test_the_hot_path_takes_orders_as_clients_write_them() -> None:
    assert order_input_as_given(VALID) == {**VALID, "phone": ""} == _serializer_result(VALID)
    with_phone = {**VALID, "phone": "+14155550123", "items": [*VALID["items"], {"sku": "TEE", "quantity": 1}]}
    assert order_input_as_given(with_phone) == with_phone == _serializer_result(with_phone)


def test_the_hot_path_leaves_what_the_serializer_changes_or_words_to_it() -> None:
    for body in (
        {**VALID, "email": " you@example.com"},  # trimmed by the serializer
        {**VALID, "items": [{"sku": "MUG", "quantity": "2"}]},  # converted by the serializer
        {**VALID, "note": "leave it at the door"},  # ignored by the serializer
        {**VALID, "items": [{"sku": "MUG", "quantity": 1}, {"sku": "MUG", "quantity": 2}]},  # refused
        {**VALID, "phone": None},  # refused
    ):
        assert order_input_as_given(body) is None


def test_more_lines_than_an_order_may_have_are_refused_before_any_line_is_read() -> None:
    """REST framework checks a list's length after validating every line: 30,000 bad lines
    in a 64 KiB body took a second of CPU and answered megabytes of per-line errors."""
    for lines in ([0] * 30_000, [{}] * 30_000, [{"sku": "MUG-LOGO", "quantity": 1}] * (settings.ORDER_MAX_LINES + 1)):
        given = OrderCreateInput(data={**VALID, "items": lines})
        assert not given.is_valid()
        assert given.errors["items"] == [f"Ensure this field has no more than {settings.ORDER_MAX_LINES} elements."]
    at_most = OrderCreateInput(
        data={**VALID, "items": [{"sku": f"SKU-{i}", "quantity": 1} for i in range(settings.ORDER_MAX_LINES)]}
    )
    assert at_most.is_valid(), at_most.errors
