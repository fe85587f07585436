"""Pure tests of devstack.services: no server is started or contacted.

Run with `.venv/bin/python -m pytest devstack/tests/test_services.py -p no:django -q`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import services
from devstack.__main__ import main
from devstack.services import (
    BROKER_KEY,
    DATABASE_KEYS,
    URL_KEYS,
    ConfigError,
    EmbeddedSettings,
    config_mode,
    embedded_urls,
    ensure_databases,
    ensure_services,
    load_config,
    parse_env_text,
    redact_url,
    stop_services,
)

EXTERNAL = {
    "DATABASE_URL": "postgres://app:s3cret@db.example:5432/app_default",
    "ORDERS_DATABASE_URL": "postgres://app:s3cret@db.example:5432/app_orders",
    "INVENTORY_DATABASE_URL": "postgres://app:s3cret@db.example:5432/app_inventory",
    "PAYMENTS_DATABASE_URL": "postgres://app:s3cret@db.example:5432/app_payments",
    "NOTIFICATIONS_DATABASE_URL": "postgres://app:s3cret@db.example:5432/app_notifications",
    "CELERY_BROKER_URL": "redis://cache.example:6379/0",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's shell must not leak into these tests."""
    for key in (*URL_KEYS, "EMBEDDED_PG_PORT", "EMBEDDED_REDIS_PORT", "EMBEDDED_PG_USER"):
        monkeypatch.delenv(key, raising=False)


def write_env(base: Path, text: str) -> Path:
    (base / ".env").write_text(text)
    return base


# --- .env parsing -----------------------------------------------------------------------------------


ENV_SAMPLE = (
    r"""# a comment

PLAIN=value
export EXPORTED=1
SINGLE='it \"s # literal'
DOUBLE="a \"q\" \\ \n # kept"
HASH=abc # part of the value, as in django-environ
EMPTY=
URL=postgres://u:p@h:5432/db?sslmode=require
"""
    # Trailing spaces written this way so that editors and formatters keep them.
    + "PADDED=  padded  \n"
)


def test_parse_env_text_reads_values_as_django_settings_do() -> None:
    assert parse_env_text(ENV_SAMPLE) == {
        "PLAIN": "value",
        "EXPORTED": "1",
        "PADDED": "  padded  ",
        "SINGLE": r"it \"s # literal",
        "DOUBLE": r'a "q" \ \n # kept',
        "HASH": "abc # part of the value, as in django-environ",
        "EMPTY": "",
        "URL": "postgres://u:p@h:5432/db?sslmode=require",
    }


def test_parse_env_text_leaves_the_process_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLAIN", raising=False)
    parse_env_text(ENV_SAMPLE)
    assert "PLAIN" not in os.environ


def test_parse_env_text_skips_malformed_lines_and_last_assignment_wins(caplog: pytest.LogCaptureFixture) -> None:
    assert parse_env_text("not a pair\nA=1\nB = spaced\n  # indented\nA=2\n") == {"A": "2"}
    assert "Invalid line: not a pair" in caplog.text
    assert "Invalid line: B = spaced" in caplog.text


def test_load_config_reads_env_file_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_env(tmp_path, "DATABASE_URL=postgres://file/db\nCELERY_BROKER_URL=redis://file/0\nOTHER=x\n")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://env/0")

    assert load_config(tmp_path) == {"DATABASE_URL": "postgres://file/db", "CELERY_BROKER_URL": "redis://env/0"}


def test_load_config_empty_environment_value_masks_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_env(tmp_path, "DATABASE_URL=postgres://file/db\nORDERS_DATABASE_URL=\n")
    monkeypatch.setenv("DATABASE_URL", "")

    assert load_config(tmp_path) == {}


def test_load_config_without_env_file(tmp_path: Path) -> None:
    assert load_config(tmp_path) == {}


# --- mode detection ---------------------------------------------------------------------------------


def test_config_mode() -> None:
    assert config_mode({}) == "embedded"
    assert config_mode(EXTERNAL) == "external"


def test_config_mode_partial_names_missing_keys() -> None:
    partial = {"DATABASE_URL": EXTERNAL["DATABASE_URL"], BROKER_KEY: EXTERNAL[BROKER_KEY]}

    with pytest.raises(ConfigError) as excinfo:
        config_mode(partial)

    message = str(excinfo.value)
    assert "DATABASE_URL, CELERY_BROKER_URL are set" in message
    assert (
        "ORDERS_DATABASE_URL, INVENTORY_DATABASE_URL, PAYMENTS_DATABASE_URL, NOTIFICATIONS_DATABASE_URL are missing"
        in message
    )


def test_ensure_services_external_returns_urls_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in EXTERNAL.items():
        monkeypatch.setenv(key, value)

    urls = ensure_services(tmp_path)

    assert dict(urls) == EXTERNAL
    assert urls.mode == "external"
    assert urls.started_by_us == frozenset()
    assert not (tmp_path / ".data").exists()


def test_ensure_services_partial_configuration_touches_nothing(tmp_path: Path) -> None:
    write_env(tmp_path, f"ORDERS_DATABASE_URL={EXTERNAL['ORDERS_DATABASE_URL']}\n")

    with pytest.raises(ConfigError, match="ORDERS_DATABASE_URL is set but"):
        ensure_services(tmp_path)

    assert not (tmp_path / ".data").exists()


# --- embedded settings and URLs ---------------------------------------------------------------------


def test_embedded_urls() -> None:
    urls = embedded_urls(pg_port=5555, redis_port=6666, db_prefix="saga_test")

    assert urls == {
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5555/saga_test_default",
        "ORDERS_DATABASE_URL": "postgres://postgres@127.0.0.1:5555/saga_test_orders",
        "INVENTORY_DATABASE_URL": "postgres://postgres@127.0.0.1:5555/saga_test_inventory",
        "PAYMENTS_DATABASE_URL": "postgres://postgres@127.0.0.1:5555/saga_test_payments",
        "NOTIFICATIONS_DATABASE_URL": "postgres://postgres@127.0.0.1:5555/saga_test_notifications",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6666/0",
    }
    assert list(urls) == list(URL_KEYS)


@pytest.mark.parametrize("prefix", ["Saga", "saga-x", "1saga", "", "x" * 50])
def test_embedded_urls_rejects_bad_prefix(prefix: str) -> None:
    with pytest.raises(ConfigError, match="invalid database prefix"):
        embedded_urls(pg_port=1, redis_port=2, db_prefix=prefix)


def test_embedded_settings_defaults_env_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert EmbeddedSettings.load(tmp_path) == EmbeddedSettings(54329, 63799, "saga_pg")

    write_env(tmp_path, "EMBEDDED_PG_PORT=6000\nEMBEDDED_REDIS_PORT='6001'\n")
    monkeypatch.setenv("EMBEDDED_REDIS_PORT", "6002")
    assert EmbeddedSettings.load(tmp_path) == EmbeddedSettings(6000, 6002, "saga_pg")


@pytest.mark.parametrize(
    ("pg_port", "message"),
    [("abc", "EMBEDDED_PG_PORT='abc' is not a valid TCP port"), ("70000", "not a valid"), ("63799", "both 63799")],
)
def test_embedded_settings_rejects_bad_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_port: str, message: str
) -> None:
    monkeypatch.setenv("EMBEDDED_PG_PORT", pg_port)

    with pytest.raises(ConfigError, match=message):
        EmbeddedSettings.load(tmp_path)


def test_redact_url() -> None:
    assert redact_url("postgres://app:s3cret@h:5432/db") == "postgres://app:***@h:5432/db"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("postgres://app@h/db") == "postgres://app@h/db"


# --- database plan (no connection) ------------------------------------------------------------------


def test_database_plan_groups_by_server_and_keeps_only_libpq_options() -> None:
    urls = {
        **embedded_urls(pg_port=5432, redis_port=6379),
        "PAYMENTS_DATABASE_URL": "psql://pay:pw@other:6543/payments?sslmode=require&conn_max_age=60",
    }

    plan = services._database_plan(urls)

    assert plan == [
        (
            {"user": "postgres", "host": "127.0.0.1", "port": "5432"},
            ["saga_default", "saga_orders", "saga_inventory", "saga_notifications"],
        ),
        ({"user": "pay", "password": "pw", "host": "other", "port": "6543", "sslmode": "require"}, ["payments"]),
    ]


def test_database_plan_deduplicates_a_shared_database() -> None:
    urls = {key: "postgres://u@h/shared" for key in DATABASE_KEYS}

    assert services._database_plan(urls) == [({"user": "u", "host": "h"}, ["shared"])]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u@h/db", "DATABASE_URL is not a PostgreSQL URL"),
        ("postgres://u@h", "DATABASE_URL names no database"),
        ("postgres://u:pw@h/d%zz", "DATABASE_URL is not a valid database URL"),
        ("postgres://u:pw@[::1/db", "DATABASE_URL is not a valid database URL"),
    ],
)
def test_database_plan_rejects_unusable_urls(url: str, message: str) -> None:
    urls = {**embedded_urls(pg_port=5432, redis_port=6379), "DATABASE_URL": url}

    with pytest.raises(ConfigError, match=message) as excinfo:
        services._database_plan(urls)

    assert "pw@" not in str(excinfo.value)


def test_ensure_databases_refuses_to_drop_system_database_before_connecting() -> None:
    # Port 9 (discard) is never a PostgreSQL server: reaching a connection attempt would fail differently.
    urls = {key: f"postgres://u@127.0.0.1:9/{key.lower()}" for key in DATABASE_KEYS}
    urls["NOTIFICATIONS_DATABASE_URL"] = "postgres://u@127.0.0.1:9/postgres"

    with pytest.raises(ConfigError, match="refusing to drop the system database 'postgres'"):
        ensure_databases(urls, recreate=True)


def test_ensure_databases_requires_all_five_urls() -> None:
    with pytest.raises(ConfigError, match="ORDERS_DATABASE_URL is not set"):
        ensure_databases({"DATABASE_URL": "postgres://u@h/db"})


# --- server bookkeeping that needs no server --------------------------------------------------------


def test_read_postmaster_pid(tmp_path: Path) -> None:
    (tmp_path / "postmaster.pid").write_text(
        "4242\n/srv/pgdata\n1700000000\n54329\n/srv/sock\n127.0.0.1\n  1234  5678\nready   \n"
    )

    assert services._read_postmaster(tmp_path) == services._Postmaster(pid=4242, port=54329, status="ready")
    assert services._read_postmaster(tmp_path / "missing") is None


def test_stop_services_without_data_dir_is_a_no_op(tmp_path: Path) -> None:
    stop_services(tmp_path)

    assert not (tmp_path / ".data").exists()


# Another devstack command in a process of its own (a `make run` beside a `make bench`): it
# claims the embedded servers as ensure_services does, says so, and ends when its stdin closes.
OTHER_COMMAND = (
    "import sys; from pathlib import Path; from devstack.services import _Paths, _use; "
    "_use(_Paths(Path(sys.argv[1]))); print('claimed', flush=True); sys.stdin.read()"
)


def test_the_embedded_servers_stop_when_the_last_command_using_them_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base = tmp_path.resolve()
    (base / ".data").mkdir()
    stopped: list[list[str]] = []
    monkeypatch.setattr(services, "_stop", lambda paths, names, timeout: stopped.append(list(names)))

    def another_command() -> subprocess.Popen[str]:
        other = subprocess.Popen(
            [sys.executable, "-c", OTHER_COMMAND, str(base)],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert other.stdout is not None and other.stdout.readline().strip() == "claimed"
        return other

    def end(other: subprocess.Popen[str]) -> None:
        assert other.stdin is not None
        other.stdin.close()
        assert other.wait(timeout=30) == 0

    # A bench started the servers; a `make run` began meanwhile and still uses them.
    run = another_command()
    try:
        services._use(services._Paths(base))  # the bench's own claim, as ensure_services takes it
        with caplog.at_level("WARNING", logger="devstack.services"):
            services.release(base, services.ServiceURLs({}, mode="embedded", started_by_us=("postgres", "redis")))
        assert stopped == []
        assert "left the embedded PostgreSQL and valkey running" in caplog.text
    finally:
        end(run)
    # The last command out (here one that found them running and started nothing) stops them.
    services._use(services._Paths(base))
    services.release(base, services.ServiceURLs({}, mode="embedded"))
    assert stopped == [["postgres", "redis"]]
    # Nothing left over for the next one.
    services.release(base, services.ServiceURLs({}, mode="embedded"))
    assert stopped == [["postgres", "redis"]]

    # `make services-down` stops them whoever uses them.
    run = another_command()
    try:
        stop_services(base)
        assert stopped[-1] == ["postgres", "redis"]
    finally:
        end(run)


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_env_prints_shell_exports_in_external_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in EXTERNAL.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATABASE_URL", "postgres://app:s3cret@db.example:5432/app_default?sslmode=require&x=1")

    assert main(["services", "env", "--base-dir", str(tmp_path)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "export DATABASE_URL='postgres://app:s3cret@db.example:5432/app_default?sslmode=require&x=1'"
    assert lines[-1] == "export CELERY_BROKER_URL=redis://cache.example:6379/0"
    assert len(lines) == len(URL_KEYS)


def test_cli_reports_configuration_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_env(tmp_path, "CELERY_BROKER_URL=redis://h/0\n")

    assert main(["services", "up", "--base-dir", str(tmp_path)]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("devstack: error: incomplete service configuration: CELERY_BROKER_URL is set")
    assert "Traceback" not in captured.err


def test_manage_py_reaches_the_servers_make_run_wrote_down(tmp_path: Path) -> None:
    """make run writes the embedded servers' URLs to .data/devstack.env; settings read it
    after .env, so `python manage.py ...` in the checkout uses the same servers."""
    import subprocess
    import sys

    from devstack.services import URL_KEYS, embedded_urls, write_env_file

    urls = embedded_urls(pg_port=54999, redis_port=63999, db_prefix="wrote")
    path = write_env_file(tmp_path, urls)
    env = {key: value for key, value in os.environ.items() if key not in URL_KEYS and not key.endswith("DATABASE_URL")}
    show = (
        "from django.conf import settings as s; "
        "d = s.DATABASES['orders']; print(d['NAME'], d['PORT'], s.CELERY_BROKER_URL)"
    )
    base = Path(__file__).resolve().parents[2]

    def shown(**extra: str) -> str:
        run = subprocess.run(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", show],
            cwd=base,
            # A developer's settings, whatever the shell running pytest has set.
            env={**env, "DEBUG": "True", "DEVSTACK_ENV_FILE": str(path), **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.split()

    assert shown() == ["wrote_orders", "54999", "redis://127.0.0.1:63999/0"]
    # The environment (and .env) still win.
    assert shown(ORDERS_DATABASE_URL="postgres://u@127.0.0.1:5433/mine")[:2] == ["mine", "5433"]
