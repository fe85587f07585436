from django.apps import AppConfig
from django.conf import settings


class SagaConfig(AppConfig):
    name = "saga"
    verbose_name = "Saga coordinator"

    def ready(self) -> None:
        if settings.CELERY_SERVICE == "saga":
            from celery import signals

            from .tracing import adopt_saga_trace

            # Connected at start-up, so before the Celery instrumentation's own task_prerun
            # receiver (set up per pool process): it must see the adopted context.
            signals.task_prerun.connect(adopt_saga_trace, weak=False)
