"""Local development stack: backing services for `make run` and `make test`.

See `devstack.services` for the API and `python -m devstack services --help` for the CLI.
"""

from devstack.services import (
    BROKER_KEY,
    DATABASE_KEYS,
    URL_KEYS,
    ConfigError,
    DevstackError,
    ServerStatus,
    ServiceError,
    ServiceURLs,
    ensure_databases,
    ensure_services,
    load_config,
    service_status,
    stop_services,
)

__all__ = [
    "BROKER_KEY",
    "DATABASE_KEYS",
    "URL_KEYS",
    "ConfigError",
    "DevstackError",
    "ServerStatus",
    "ServiceError",
    "ServiceURLs",
    "ensure_databases",
    "ensure_services",
    "load_config",
    "service_status",
    "stop_services",
]
