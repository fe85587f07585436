"""`make run` and `make test`: the whole system on one machine, set up from nothing.

Both start from `services.ensure_services` (your servers when configured, embedded ones
otherwise), create and migrate every service database, and then either run the
Procfile under honcho or run pytest against fresh test databases.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from devstack import services

logger = logging.getLogger("devstack")

ALIASES = {
    "default": "DATABASE_URL",
    "orders": "ORDERS_DATABASE_URL",
    "inventory": "INVENTORY_DATABASE_URL",
    "payments": "PAYMENTS_DATABASE_URL",
    "notifications": "NOTIFICATIONS_DATABASE_URL",
}
LOCAL_ADMIN = ("admin", "admin-local-only")
EXAMPLE_ORDER = json.dumps(
    {"email": "you@example.com", "items": [{"sku": "MUG-LOGO", "quantity": 2}], "payment_token": "tok_visa"}
)
# What a test run owns, apart from make run's: databases named <name><suffix> on the same
# server, and a Redis database (flushed at its start). Overridable so that two test runs
# (e.g. two checkouts sharing one server) do not trample each other.
TEST_DB_SUFFIX = os.environ.get("TEST_DB_SUFFIX", "_test")
TEST_REDIS_DB = os.environ.get("TEST_REDIS_DB", "15")


def _python() -> str:
    return sys.executable


def _manage(base_dir: Path, env: Mapping[str, str], *args: str, capture: bool = False) -> str:
    result = subprocess.run(
        [_python(), str(base_dir / "manage.py"), *args],
        cwd=base_dir,
        env=dict(env),
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout or ""


def migrate_all(base_dir: Path, env: Mapping[str, str]) -> None:
    """Bring every service database's schema up to date (each holds only its own apps)."""
    for alias in ALIASES:
        _manage(base_dir, env, "migrate", f"--database={alias}", "--verbosity=0")


def with_database_suffix(url: str, suffix: str) -> str:
    """The same server, another database: postgres://h/orders -> postgres://h/orders_test."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "postgres"
    return urlunsplit(parts._replace(path=f"/{name}{suffix}"))


def with_redis_db(url: str, db: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    return urlunsplit(parts._replace(path=f"/{db}"))


def _flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url, socket_connect_timeout=5).flushdb()


def _base_env(base_dir: Path, urls: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(urls)
    env.setdefault("PORT", "8000")
    env.setdefault("FLOWER_PORT", "5555")
    # The Procfile names programs installed in this virtualenv.
    env["PATH"] = f"{Path(_python()).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _ensure_admin(base_dir: Path, env: dict[str, str]) -> tuple[str, str, str]:
    """Create the admin user once (Django's DJANGO_SUPERUSER_* convention) and its API token.

    Returns (username, password to show, token); the password shown is the local default,
    or a note that it came from the environment.
    """
    username = env.get("DJANGO_SUPERUSER_USERNAME") or LOCAL_ADMIN[0]
    password = env.get("DJANGO_SUPERUSER_PASSWORD") or LOCAL_ADMIN[1]
    shown = "from DJANGO_SUPERUSER_PASSWORD" if env.get("DJANGO_SUPERUSER_PASSWORD") else password
    admin_env = {
        **env,
        "DJANGO_SUPERUSER_USERNAME": username,
        "DJANGO_SUPERUSER_PASSWORD": password,
        "DJANGO_SUPERUSER_EMAIL": env.get("DJANGO_SUPERUSER_EMAIL") or f"{username}@example.com",
    }
    exists = _manage(
        base_dir,
        admin_env,
        "shell",
        "--no-imports",
        "-c",
        "import os; from django.contrib.auth import get_user_model; "
        "print(get_user_model().objects.filter(username=os.environ['DJANGO_SUPERUSER_USERNAME']).exists())",
        capture=True,
    ).strip()
    if exists != "True":
        _manage(base_dir, admin_env, "createsuperuser", "--noinput", "--verbosity=0")
    token = _manage(base_dir, admin_env, "drf_create_token", username, capture=True).split()[2]
    return username, shown, token


def run(base_dir: Path) -> int:
    """Everything `make run` does after the virtualenv exists."""
    urls = services.ensure_services(base_dir)
    try:
        return _run_system(base_dir, urls)
    finally:
        if urls.started_by_us:
            services.stop_services(base_dir, only=urls.started_by_us)
            logger.info("stopped the embedded servers (data kept in .data/)")


def _run_system(base_dir: Path, urls: services.ServiceURLs) -> int:
    services.ensure_databases(urls)
    env = _base_env(base_dir, urls)
    logger.info("migrating the five service databases")
    migrate_all(base_dir, env)
    _manage(base_dir, env, "seed_demo", "--verbosity=0")
    username, password, token = _ensure_admin(base_dir, env)
    port, flower_port = env["PORT"], env["FLOWER_PORT"]
    mode = "embedded PostgreSQL and Redis (data in .data/)" if urls.mode == "embedded" else "your servers"
    print(
        f"""
  Order saga system, running on {mode}

  API        http://127.0.0.1:{port}/api/          (token: {token})
  Admin      http://127.0.0.1:{port}/admin/        (user: {username}, password: {password})
  Flower     http://127.0.0.1:{flower_port}/
  Emails     {base_dir / ".data" / "mail"}     SMS: {base_dir / ".data" / "sms" / "sms.log"}

  Try:  curl -s -X POST http://127.0.0.1:{port}/api/orders/ -H "Authorization: Token {token}" \\
          -H "Content-Type: application/json" \\
          -d '{EXAMPLE_ORDER}'

  Ctrl-C stops everything.
""",
        flush=True,
    )
    honcho = [str(Path(_python()).parent / "honcho"), "start", "-f", str(base_dir / "Procfile"), "-p", port]
    process = subprocess.Popen(honcho, cwd=base_dir, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # honcho got the same Ctrl-C from the terminal and is stopping its processes (workers
        # finish their current task); a second signal would make it kill them instead.
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            return process.wait()


def test(base_dir: Path, pytest_args: Sequence[str]) -> int:
    """Everything `make test` does after the virtualenv exists: fresh test databases, then pytest."""
    urls = services.ensure_services(base_dir)
    try:
        test_urls = {key: with_database_suffix(urls[key], TEST_DB_SUFFIX) for key in ALIASES.values()}
        test_urls["CELERY_BROKER_URL"] = with_redis_db(urls["CELERY_BROKER_URL"], TEST_REDIS_DB)
        services.ensure_databases(test_urls, recreate=True)
        if test_urls["CELERY_BROKER_URL"].startswith("redis"):
            _flush_redis(test_urls["CELERY_BROKER_URL"])
        env = _base_env(base_dir, test_urls)
        env.setdefault("SECRET_KEY", secrets.token_urlsafe(40))
        # The slow provider token only needs to be slow enough for a cancel to land.
        env.setdefault("FAKE_PROVIDER_SLOW_SECONDS", "2")
        env.setdefault("TEST_LOG_DIR", str(base_dir / ".data" / "test-logs"))
        env["EMAIL_FILE_PATH"] = str(base_dir / ".data" / "test-mail")
        env["SMS_FILE_PATH"] = str(base_dir / ".data" / "test-sms")
        migrate_all(base_dir, env)
        return subprocess.run([_python(), "-m", "pytest", *pytest_args], cwd=base_dir, env=env).returncode
    finally:
        if urls.started_by_us:
            services.stop_services(base_dir, only=urls.started_by_us)
