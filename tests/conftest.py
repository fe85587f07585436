"""System tests: real workers (one per queue), real PostgreSQL databases, a real broker.

Run through `make test`, which provides the servers (embedded or yours), creates
fresh test databases and points the environment at them before pytest starts.
The processes started here come from the Procfile.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from devstack.topology import BASE_DIR, Topology
from saga.tests.fixtures import broker_latch  # noqa: F401  # autouse: each test's own latch

from .api import Api
from .otlp import OtlpReceiver

ALIASES = ("default", "orders", "inventory", "payments", "notifications")


def _require_test_databases() -> None:
    names = [settings.DATABASES[alias]["NAME"] for alias in ALIASES]
    if not all("test" in name for name in names):
        pytest.exit(
            f"refusing to run system tests against non-test databases {names}: run `make test`, "
            "which creates and points at fresh *_test_* databases",
            returncode=2,
        )


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker: pytest.FixtureRequest) -> None:
    """The databases exist already (make test made them); bring their schemas up to date."""
    _require_test_databases()
    with django_db_blocker.unblock():
        for alias in ALIASES:
            call_command("migrate", database=alias, verbosity=0)


@pytest.fixture(scope="session")
def db_access(django_db_setup: None, django_db_blocker) -> Iterator[None]:
    """Committed, shared access to the real databases for the whole session.

    The system under test runs in other processes, so tests cannot hide their writes in
    a rolled-back transaction. Each test makes its own users and products instead.
    """
    with django_db_blocker.unblock():
        yield


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """Where the session's processes send their spans (OTLP/gRPC, as compose's to Jaeger)."""
    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="session")
def topology(db_access: None, otlp: OtlpReceiver) -> Iterator[Topology]:
    log_dir = Path(os.environ.get("TEST_LOG_DIR", BASE_DIR / ".data" / "test-logs"))
    stack = Topology(env={**os.environ, **otlp.exporter_env()}, log_dir=log_dir)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def api(topology: Topology) -> Api:
    """A customer of their own, with a token."""
    return Api.for_new_user(topology.base_url)


@pytest.fixture
def staff_api(topology: Topology) -> Api:
    return Api.for_new_user(topology.base_url, is_staff=True)


@pytest.fixture
def sku() -> str:
    return f"T-{uuid.uuid4().hex[:10].upper()}"
