from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
    verbose_name = "Order service"
    # The place-order saga (orders.saga) is registered by the saga app, from SAGA_DEFINITIONS.
