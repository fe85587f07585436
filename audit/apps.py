from django.apps import AppConfig


class AuditConfig(AppConfig):
    """The operator's cross-service checks (`manage.py saga_audit`). No models: it only reads
    the services' databases."""

    name = "audit"
    verbose_name = "Saga audit"
