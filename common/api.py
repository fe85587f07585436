"""Query-parameter handling shared by the per-order read endpoints of every service."""

import uuid

from django.http import Http404
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request

from orders.selectors import order_visible


def order_filter(request: Request) -> uuid.UUID | None:
    """The `?order=<id>` filter, checked against what the caller may see.

    Customers must name one of their own orders (another's is 404, like the order
    itself); staff may omit it to list everything.
    """
    raw = request.query_params.get("order")
    if raw is None:
        if request.user.is_staff:
            return None
        raise ValidationError({"order": ["This query parameter is required: ?order=<order id>."]})
    try:
        order_id = uuid.UUID(raw)
    except ValueError:
        raise ValidationError({"order": [f"{raw!r} is not a valid order id."]}) from None
    user_id = None if request.user.is_staff else request.user.id
    if not order_visible(order_id=order_id, user_id=user_id):
        raise Http404
    return order_id
