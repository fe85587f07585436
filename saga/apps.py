from django.apps import AppConfig
from django.conf import settings


class SagaConfig(AppConfig):
    name = "saga"
    verbose_name = "Saga coordinator"

    def ready(self) -> None:
        from celery import signals

        from . import checks
        from .recovery import is_redis, stamp_sent_at, taken_note, watchdog_start, watchdog_stop
        from .timeline import attach_failure_timeline

        # Signals and checks only: the saga definitions (SAGA_DEFINITIONS) are registered on
        # first use, by saga.definition.definitions_load.

        # The version check (saga.checks): `migrate` and `check --database orders` run it.
        checks.register()
        # The coordinator's workers refuse to start when a running saga's version is missing.
        signals.worker_init.connect(checks.on_worker_init, weak=False)

        # Every worker returns the messages of a worker that died holding them (Redis only).
        signals.worker_ready.connect(watchdog_start, weak=False, dispatch_uid="saga.recovery.watchdog")
        signals.worker_shutdown.connect(watchdog_stop, weak=False, dispatch_uid="saga.recovery.watchdog")

        # On AMQP, whose queues cannot be peeked, every worker notes how far it has got in its
        # queue, which the sweeper asks for instead (saga.recovery.taken_heads).
        if not is_redis():
            signals.task_received.connect(taken_note, weak=False, dispatch_uid="saga.recovery.taken")
        # Every process publishes (a chain's next step, a retry): each message says when it
        # was sent, which tells the sweeper whether a stalled step can still be queued.
        signals.before_task_publish.connect(stamp_sent_at, weak=False, dispatch_uid="saga.recovery.sent_at")
        # A failing step's worker publishes its failure report: it carries the chain's records.
        signals.before_task_publish.connect(
            attach_failure_timeline, weak=False, dispatch_uid="saga.timeline.failure_timeline"
        )
        if settings.CELERY_SERVICE == "saga":
            from .tracing import adopt_saga_trace

            # Connected at start-up, so before the Celery instrumentation's own task_prerun
            # receiver (set up per pool process): it must see the adopted context.
            signals.task_prerun.connect(adopt_saga_trace, weak=False)
