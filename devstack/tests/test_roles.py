"""Pure tests of devstack.roles (the per-service database roles): no server is contacted.

The roles themselves are exercised on a real server by tests/test_security.py, which runs
after `make test` set them up.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from devstack.roles import ensure_roles, login_var, process_role_for, role_for, role_password, url_with_role
from devstack.services import ConfigError
from orders_project.db_roles import POLICY, PROCESS_ROLES

URLS = {
    "DATABASE_URL": "postgres://postgres@db.example:5432/saga_default",
    "ORDERS_DATABASE_URL": "postgres://postgres@db.example:5432/saga_orders",
    "INVENTORY_DATABASE_URL": "postgres://postgres@db.example:5432/saga_inventory",
    "PAYMENTS_DATABASE_URL": "postgres://postgres@db.example:5432/saga_payments",
    "NOTIFICATIONS_DATABASE_URL": "postgres://postgres@db.example:5432/saga_notifications",
    "CELERY_BROKER_URL": "redis://cache.example:6379/0",
}


def test_each_database_is_owned_by_a_role_of_its_own_name() -> None:
    assert role_for("saga_inventory_test") == "saga_inventory_test"


def test_each_process_role_is_named_after_its_database_set() -> None:
    names = {"default": "saga_default_test", "orders": "saga_orders_test", "inventory": "saga_inventory_test"}
    assert process_role_for("web", names) == "saga_default_test_web"
    assert process_role_for("beat", names) == "saga_default_test_beat"
    assert process_role_for("orders_worker", names) == "saga_orders_test_worker"
    assert process_role_for("inventory_worker", names) == "saga_inventory_test_worker"


def test_the_procfile_hands_each_process_its_own_login() -> None:
    """Every Procfile process that uses a database reads its process role's login variable;
    Flower gets none."""
    from devstack.topology import read_procfile

    procfile = read_procfile()
    assert set(PROCESS_ROLES.values()) == set(POLICY)
    for process, command in procfile.items():
        if process == "flower":
            assert command.startswith("DATABASE_LOGIN=none "), command
        else:
            assert f'DATABASE_LOGIN="${{{login_var(PROCESS_ROLES[process])}:-}}"' in command, process


def test_url_with_role_changes_only_the_login() -> None:
    url = url_with_role("postgres://postgres:old@db.example:6543/saga_orders?sslmode=require", "saga_orders", "p@ss/:w")
    parts = urlsplit(url)
    assert (parts.hostname, parts.port, parts.path, parts.query) == (
        "db.example",
        6543,
        "/saga_orders",
        "sslmode=require",
    )
    assert (parts.username, parts.password) == ("saga_orders", "p%40ss%2F%3Aw")


def test_a_role_password_is_random_private_and_stable(tmp_path: Path) -> None:
    first = role_password(tmp_path / "roles", "saga_orders")
    assert len(first) >= 32
    assert role_password(tmp_path / "roles", "saga_orders") == first
    assert role_password(tmp_path / "roles", "saga_payments") != first
    assert stat.S_IMODE(os.stat(tmp_path / "roles" / "saga_orders").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "roles").st_mode) == 0o700
    assert sorted(p.name for p in (tmp_path / "roles").iterdir()) == ["saga_orders", "saga_payments"]


def test_urls_that_already_use_their_own_roles_are_left_alone(tmp_path: Path) -> None:
    own = {**URLS, "PAYMENTS_DATABASE_URL": "postgres://payments_svc:pw@db.example:5432/saga_payments"}
    assert ensure_roles(own, password_dir=tmp_path) == own
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["postgres", "template1"])
def test_a_system_database_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="cannot be named after it"):
        ensure_roles({**URLS, "DATABASE_URL": f"postgres://postgres@db.example:5432/{name}"}, password_dir=tmp_path)


def test_databases_on_several_servers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one PostgreSQL server"):
        ensure_roles(
            {**URLS, "DATABASE_URL": "postgres://postgres@other.example:5432/saga_default"}, password_dir=tmp_path
        )


def test_a_nested_run_does_not_inherit_the_outer_runs_database_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    """make chaos / make bench inside a test run make databases of their own, where the test
    run's process roles have no rights: their processes use their own URLs as given."""
    from devstack.stack import _base_env

    for name in ("WEB_DB_LOGIN", "DATABASE_LOGIN", "DATABASE_PROCESS_ROLES"):
        monkeypatch.setenv(name, "outer")
    env = _base_env(Path("."), {**URLS, "BEAT_DB_LOGIN": "saga_default_beat:pw"})
    assert "WEB_DB_LOGIN" not in env and "DATABASE_LOGIN" not in env and "DATABASE_PROCESS_ROLES" not in env
    assert env["BEAT_DB_LOGIN"] == "saga_default_beat:pw"
