from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
    verbose_name = "Order service"

    def ready(self) -> None:
        # Registers the place-order saga definition with the coordinator.
        from . import saga  # noqa: F401
