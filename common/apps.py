import logging
import sys

from django.apps import AppConfig
from django.conf import settings

from orders_project.security import local_mode_notice


class CommonConfig(AppConfig):
    name = "common"
    verbose_name = "Shared building blocks"

    def ready(self) -> None:
        from django.core.signals import request_started

        from orders_project.db_health import close_connections_closed_by_server

        # The web's check for connections a PostgreSQL restart closed: a poll() of each,
        # where CONN_HEALTH_CHECKS is a round trip per database per request.
        request_started.connect(close_connections_closed_by_server, dispatch_uid="close_connections_closed_by_server")
        # Local mode may be relaxed, and says so: once per server process (web, worker, beat,
        # Flower, runserver) at start-up; manage.py's one-off commands stay quiet.
        if sys.argv[0].endswith("manage.py") and sys.argv[1:2] != ["runserver"]:
            return
        if notice := local_mode_notice(
            debug=settings.DEBUG, secret_key=settings.SECRET_KEY, local_mode=settings.LOCAL_MODE
        ):
            logging.getLogger("orders_project.security").warning(notice)
