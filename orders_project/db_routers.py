"""Route each service's models to its own database (ARCHITECTURE.md "Databases")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # settings load this module before the apps: no model import at run time
    from django.db.models import Model

# The saga store lives beside the orders so that "create order + create saga" is one
# local transaction.
APP_DATABASES = {
    "orders": "orders",
    "saga": "orders",
    "inventory": "inventory",
    "payments": "payments",
    "notifications": "notifications",
}


def database_for(app_label: str) -> str:
    return APP_DATABASES.get(app_label, "default")


class ServiceRouter:
    def db_for_read(self, model: type[Model], **hints: Any) -> str:
        return database_for(model._meta.app_label)

    def db_for_write(self, model: type[Model], **hints: Any) -> str:
        return database_for(model._meta.app_label)

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        # No foreign key crosses databases: services refer to each other by id.
        return database_for(obj1._meta.app_label) == database_for(obj2._meta.app_label)

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any) -> bool:
        return database_for(app_label) == db
