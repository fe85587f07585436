import uuid

from django.db.models import Prefetch, QuerySet

from .models import Order, OrderLine


def order_list(*, user_id: int | None) -> QuerySet[Order]:
    """Orders visible to a user (all of them when `user_id` is None: staff)."""
    orders = Order.objects.all()
    return orders if user_id is None else orders.filter(user_id=user_id)


def order_get(*, order_id: uuid.UUID, user_id: int | None) -> Order | None:
    return (
        order_list(user_id=user_id)
        .prefetch_related(Prefetch("lines", queryset=OrderLine.objects.order_by("id")))
        .filter(id=order_id)
        .first()
    )


def order_visible(*, order_id: uuid.UUID, user_id: int | None) -> bool:
    return order_list(user_id=user_id).filter(id=order_id).exists()
