"""Pure tests of the delivery channels' message names (no database, no mail server)."""

import pytest

from notifications.channels import message_id


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("orders@shop.example", "<saga-1.order_confirmed@shop.example>"),
        ("Shop <orders@shop.example>", "<saga-1.order_confirmed@shop.example>"),
        ("orders", "<saga-1.order_confirmed@localhost>"),
        ("orders@bücher.example", "<saga-1.order_confirmed@xn--bcher-kva.example>"),
    ],
)
def test_an_emails_message_id_is_its_reference_in_the_senders_domain(settings, sender: str, expected: str) -> None:
    settings.DEFAULT_FROM_EMAIL = sender
    assert message_id("saga-1.order_confirmed") == expected
