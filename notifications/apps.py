from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notification service"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the deploy check)
