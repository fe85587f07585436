"""`make run` and `make test`: the whole system on one machine, set up from nothing.

Both start from `services.ensure_services` (your servers when configured, embedded ones
otherwise), create and migrate every service database, and then either run the
Procfile under honcho or run pytest against fresh test databases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from devstack import roles, services

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


TEST_TIMINGS = {
    "FAKE_PROVIDER_SLOW_SECONDS": "2",
    "FAKE_PROVIDER_HANG_SECONDS": "12",
    "CELERY_TASK_SOFT_TIME_LIMIT": "8",
    "CELERY_TASK_TIME_LIMIT": "10",
    "TASK_RETRY_BACKOFF_MAX": "4",
    "CELERY_VISIBILITY_TIMEOUT": "20",
    "SAGA_STEP_TIMEOUT": "10",
    "SAGA_SWEEP_INTERVAL": "1",
    # About 40 s of retries at the 4 s backoff cap: long enough to outlast the circuit
    # breaker reopening while other failing orders still probe it (tests/test_faults.py),
    # as production's 12 retries at 15 s outlast its 30 s reset.
    "SAGA_COMPENSATION_MAX_RETRIES": "12",
    "PAYMENT_BREAKER_RESET_SECONDS": "3",
}


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
    # Database logins come with `urls` (roles.ensure_roles) or not at all: a make chaos or
    # make bench started from within a test run must not inherit the run's roles.
    env = {key: value for key, value in os.environ.items() if not _is_database_login(key)}
    env.update(urls)
    env.setdefault("PORT", "8000")
    env.setdefault("FLOWER_PORT", "5555")
    # The Procfile names programs installed in this virtualenv.
    env["PATH"] = f"{Path(_python()).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _is_database_login(name: str) -> bool:
    return name in ("DATABASE_LOGIN", "DATABASE_PROCESS_ROLES") or name.endswith("_DB_LOGIN")


def _ensure_admin(base_dir: Path, env: dict[str, str]) -> tuple[str, str, str]:
    """Create the admin user once (Django's DJANGO_SUPERUSER_* convention) and issue it an API token.

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
    # A new token each run (the database keeps only its digest), replacing the last run's.
    token = _manage(base_dir, admin_env, "api_token_create", "--replace", username, capture=True).strip()
    return username, shown, token


def local_mode_env(config: Mapping[str, str]) -> dict[str, str]:
    """What relaxes make run's processes, and only theirs (settings default to production):
    DEBUG on unless you set it (environment or .env), and LOCAL_MODE, which lets Flower run
    without a login on the Procfile's 127.0.0.1. Each process says so at start-up."""
    return {"LOCAL_MODE": "True", **({} if "DEBUG" in config else {"DEBUG": "True"})}


def run(base_dir: Path) -> int:
    """Everything `make run` does after the virtualenv exists."""
    urls = services.ensure_services(base_dir)
    try:
        return _run_system(base_dir, urls)
    finally:
        if services.release(base_dir, urls):
            logger.info("stopped the embedded servers (data kept in .data/)")


def _run_system(base_dir: Path, urls: services.ServiceURLs) -> int:
    services.ensure_databases(urls)
    # Least privilege (issue 12): owners migrate; each process runs as its own role (Procfile).
    env = _base_env(base_dir, roles.ensure_roles(urls, password_dir=base_dir / ".data" / "db-roles"))
    env.update(local_mode_env(services._read_settings(base_dir)))  # environment, then .env
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

  Local mode (this machine only): DEBUG on unless you set it, Flower without a login on 127.0.0.1.

  Try:  curl -s -X POST http://127.0.0.1:{port}/api/orders/ -H "Authorization: Token {token}" \\
          -H "Content-Type: application/json" \\
          -d '{EXAMPLE_ORDER}'

  Ctrl-C stops everything.
""",
        flush=True,
    )
    honcho = [str(Path(_python()).parent / "honcho"), "start", "-f", str(base_dir / "Procfile"), "-p", port]
    return supervise(subprocess.Popen(honcho, cwd=base_dir, env=env, start_new_session=True))


# How long the processes get to stop after Ctrl-C (workers finish their current task)
# before whatever is left is killed. Then, and only then, the servers stop.
STOP_GRACE_SECONDS = 20.0


def supervise(process: subprocess.Popen, *, grace: float = STOP_GRACE_SECONDS) -> int:
    """Wait for honcho; on Ctrl-C or SIGTERM stop it and everything it started.

    honcho runs in a session of its own, so the terminal's Ctrl-C reaches only us and we
    decide the order: SIGINT to honcho (it asks every process to stop), a grace period,
    then SIGKILL for any process of the tree still alive. Flower in particular outlived
    honcho (its thread pool kept retrying the broker) and kept its port, so the next
    `make run` could not start it.
    """
    import psutil

    root = psutil.Process(process.pid)
    tree: dict[int, psutil.Process] = {}

    def remember() -> None:
        # Children are recorded while honcho lives: once it exits they are re-parented and
        # no longer found under it.
        with contextlib.suppress(psutil.Error):
            tree.update({child.pid: child for child in root.children(recursive=True)})

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too, explicitly: a shell starting `make run` in the background hands it SIGINT
    # ignored, and Python then never raises KeyboardInterrupt for it.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            remember()
            try:
                return process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        logger.info("stopping every process (up to %.0fs), then the servers", grace)
        remember()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in [root, *tree.values()]):
            remember()
            time.sleep(0.2)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Whatever outlived honcho (or the grace period) goes now, before the servers do.
        left = [p for p in [*tree.values(), root] if _alive(p)]
        for leftover in left:
            with contextlib.suppress(psutil.Error):
                logger.warning("killing %s (pid %d): still running after honcho stopped", leftover.name(), leftover.pid)
                leftover.kill()
        psutil.wait_procs(left, timeout=10)


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test(base_dir: Path, pytest_args: Sequence[str]) -> int:
    """Everything `make test` does after the virtualenv exists: fresh test databases, then pytest."""
    urls = services.ensure_services(base_dir)
    try:
        test_urls = {key: with_database_suffix(urls[key], TEST_DB_SUFFIX) for key in ALIASES.values()}
        test_urls["CELERY_BROKER_URL"] = with_redis_db(urls["CELERY_BROKER_URL"], TEST_REDIS_DB)
        services.ensure_databases(test_urls, recreate=True)
        # Least privilege (issue 12): owners migrate; each process runs as its own role (Procfile).
        test_urls = roles.ensure_roles(test_urls, password_dir=base_dir / ".data" / "db-roles")
        if test_urls["CELERY_BROKER_URL"].startswith("redis"):
            _flush_redis(test_urls["CELERY_BROKER_URL"])
        env = _base_env(base_dir, test_urls)
        # The tests' processes run with DEBUG on, as before settings defaulted to off, but
        # not in make run's LOCAL_MODE: Flower needs its login here (tests/test_logins.py).
        env["DEBUG"] = "True"
        env.pop("LOCAL_MODE", None)
        env.setdefault("SECRET_KEY", secrets.token_urlsafe(40))
        env.setdefault("TEST_LOG_DIR", str(base_dir / ".data" / "test-logs"))
        # Fault tests restart servers only when they are the embedded ones, ours to restart;
        # the chaos test needs the servers' own URLs to make databases of its own.
        env["DEVSTACK_MODE"] = urls.mode
        env["DEVSTACK_SERVER_URLS"] = json.dumps(dict(urls))
        env["DEVSTACK_BASE_DIR"] = str(base_dir)
        # Faults surface in seconds rather than minutes: short time limits, deadlines and
        # backoff, a quick sweeper. Every process of the run reads the same values.
        for key, value in TEST_TIMINGS.items():
            env.setdefault(key, value)
        env["EMAIL_FILE_PATH"] = str(base_dir / ".data" / "test-mail")
        env["SMS_FILE_PATH"] = str(base_dir / ".data" / "test-sms")
        migrate_all(base_dir, env)
        if pytest_args and os.environ.get("TEST_BROKER") == "amqp":
            # A targeted run on RabbitMQ only: make test ARGS="tests/x.py" TEST_BROKER=amqp
            return _test_on_rabbitmq(base_dir, env, pytest_args)
        code = subprocess.run([_python(), "-m", "pytest", *pytest_args], cwd=base_dir, env=env).returncode
        if code != 0 or pytest_args:
            # A failure stands on its own; a targeted run (ARGS=...) runs only what it names.
            return code
        return _test_on_rabbitmq(base_dir, env)
    finally:
        services.release(base_dir, urls)


def _test_on_rabbitmq(base_dir: Path, env: dict[str, str], pytest_args: Sequence[str] = ()) -> int:
    """Run the system tests whose outcome depends on the broker again, with RabbitMQ as the
    broker, when one is reachable.

    `make test`'s second pass runs the tests marked `broker` (messages, faults, duplicates,
    racing copies, the saga's flow, recovery, tracing across messages, the chaos run and
    RabbitMQ's own queue declarations), except those that need Redis itself (dropping a
    message from a Redis list, restarting the Redis server). The rest (the HTTP API, the
    admin, security, database roles, logins) does not change with the broker and ran in the
    first pass: running it twice bought no coverage and cost minutes of CI's 20.
    A targeted run (`TEST_BROKER=amqp ... ARGS=tests/x.py`) runs what it names, Redis-only
    tests aside. Against the same databases, in a vhost of its own that is created afresh.
    A machine without RabbitMQ skips this and says so.
    """
    # The environment first, then .env (the same file the service URLs come from), so each
    # checkout's test run keeps to its own vhost.
    url = services._read_settings(base_dir).get("TEST_AMQP_URL") or DEFAULT_TEST_AMQP_URL
    if not _fresh_amqp_vhost(url):
        print(f"\nRabbitMQ run skipped: no broker we can use at {services.redact_url(url)} (set TEST_AMQP_URL)\n")
        return 0
    print(f"\nThe same system tests with RabbitMQ as the broker ({services.redact_url(url)}):\n", flush=True)
    amqp_env = {
        **env,
        "CELERY_BROKER_URL": url,
        # The circuit breaker still shares its state through Redis.
        "PAYMENT_BREAKER_REDIS_URL": env["CELERY_BROKER_URL"],
        # So do the API rate limits (issue 6: without a Redis CACHE_URL, counts are per process).
        **({"CACHE_URL": env["CELERY_BROKER_URL"]} if env["CELERY_BROKER_URL"].startswith("redis") else {}),
        "TEST_LOG_DIR": str(Path(env["TEST_LOG_DIR"]).with_name("test-logs-amqp")),
    }
    if pytest_args:
        selection = [*pytest_args, "-m", "not redis_only"]
    else:
        selection = ["tests", "-m", "broker and not redis_only"]
    command = [_python(), "-m", "pytest", *selection, "-p", "no:cacheprovider"]
    return subprocess.run(command, cwd=base_dir, env=amqp_env).returncode


DEFAULT_TEST_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/saga_test"


def _fresh_amqp_vhost(url: str) -> bool:
    """A reachable, empty vhost for the run: recreated with rabbitmqctl when it is on this
    machine (root, as in CI), else used as it is if the broker accepts us."""
    from kombu import Connection

    vhost = urlsplit(url).path.lstrip("/") or "/"
    ctl = shutil.which("rabbitmqctl")
    if ctl and vhost != "/" and os.geteuid() == 0:
        user = urlsplit(url).username or "guest"
        for args in (
            ["delete_vhost", vhost],
            ["add_vhost", vhost],
            ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
        ):
            subprocess.run([ctl, "-q", *args], capture_output=True, timeout=60)
    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False
