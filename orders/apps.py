from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
    verbose_name = "Order service"
    # The place-order saga (orders.saga) is registered from SAGA_DEFINITIONS on first use
    # (saga.definition.definitions_load).
