import uuid

from django.db.models import QuerySet

from .models import Payment


def payment_list(*, order_id: uuid.UUID | None) -> QuerySet[Payment]:
    payments = Payment.objects.select_related("refund").order_by("created_at")
    return payments if order_id is None else payments.filter(order_id=order_id)
