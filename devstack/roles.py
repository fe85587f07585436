"""Least privilege for `make run` and `make test`: owners migrate, each process runs as its own role.

The same rules as docker/postgres/init.sh applies to the compose server, on whichever
server devstack uses (embedded or yours):

* each database is owned by a login role of the same name (`saga_inventory` owns
  `saga_inventory`), which `migrate` uses, so the role owns the tables it creates;
* CONNECT (and TEMPORARY) on every database is revoked from PUBLIC;
* each process role of orders_project.db_roles.POLICY gets a login role that owns nothing,
  named after the database set (`saga_default_web`, `saga_default_beat`,
  `saga_inventory_worker`, ...). `migrate`, as each owner, grants it CONNECT and exactly
  its table privileges (common's migrate command).

`ensure_roles` returns the owners' URLs, plus `<PROCESS ROLE>_DB_LOGIN` ("role:password")
for each process role, which the Procfile hands to its process as DATABASE_LOGIN, and
DATABASE_PROCESS_ROLES for `migrate`.

When the configured URLs already use several users, they are taken to be roles you manage
yourself (as in compose) and are used unchanged. Roles are left in place afterwards; their
passwords live in `<password_dir>/<role>` (mode 0600, random, created once), so a server
that asks for passwords works too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from devstack.services import (
    DATABASE_KEYS,
    ConfigError,
    ServiceError,
    _connect_maintenance,
    _pg_conninfo,
    _pg_error_text,
)
from orders_project.db_roles import POLICY

logger = logging.getLogger(__name__)

DEFAULT_KEY = "DATABASE_URL"
_PASSWORD_FILE_MODE = 0o600
_SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})


def role_for(database: str) -> str:
    """The login role that owns (and is named after) a service database."""
    return database


def process_role_for(process_role: str, databases: Mapping[str, str]) -> str:
    """The login role of a process role (POLICY) for one set of databases (alias -> name):
    a worker's is named after its service's database, web's and beat's after the default one."""
    if process_role.endswith("_worker"):
        return f"{databases[process_role.removesuffix('_worker')]}_worker"
    return f"{databases['default']}_{process_role}"


def login_var(process_role: str) -> str:
    """The variable holding a process role's "role:password" (the Procfile reads it)."""
    return f"{process_role.upper()}_DB_LOGIN"


def url_with_role(url: str, role: str, password: str) -> str:
    """The same database URL, logging in as `role` with `password`."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"))


def role_password(password_dir: Path, role: str) -> str:
    """The role's password: read from `password_dir/<role>`, created once (random, 0600).

    Created with an atomic link, so two concurrent runs agree on one password.
    """
    path = password_dir / role
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    password_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(password_dir, 0o700)
    fd, tmp = tempfile.mkstemp(dir=password_dir, prefix=f".{role}.")
    try:
        os.fchmod(fd, _PASSWORD_FILE_MODE)
        os.write(fd, secrets.token_urlsafe(24).encode())
        os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


def ensure_roles(urls: Mapping[str, str], *, password_dir: Path, connect_timeout: int = 5) -> dict[str, str]:
    """Create or update one owner role per database and one role per process role, limit
    CONNECT; return the URLs (all of `urls`, the broker's unchanged) with each database's
    owner, plus each process role's login (`login_var`) and DATABASE_PROCESS_ROLES.

    The process roles get their privileges from `migrate` (run next, as the owners).

    Idempotent, and safe on existing data: tables created earlier by another user change
    owner. Preconditions: the databases exist (`services.ensure_databases`); the URLs'
    single user is a PostgreSQL superuser. With URLs that already use several users,
    nothing is changed and `urls` is returned as it is.
    """
    import psycopg
    from psycopg import sql

    params = {key: _pg_conninfo(urls[key], key) for key in DATABASE_KEYS}
    users = {p.get("user", "") for p in params.values()}
    if len(users) > 1:
        logger.info("the database URLs use their own roles (%s): using them as they are", ", ".join(sorted(users)))
        return dict(urls)
    servers = {(p.get("host"), p.get("port")) for p in params.values()}
    if len(servers) > 1:
        raise ConfigError("per-service roles need the five databases on one PostgreSQL server")

    databases = {key: p["dbname"] for key, p in params.items()}
    owners = {key: role_for(name) for key, name in databases.items()}
    admin = next(iter(users))
    for key, name in databases.items():
        if name in _SYSTEM_DATABASES or owners[key] == admin:
            raise ConfigError(f"{key} names the database {name!r}: a per-service role cannot be named after it")
    default_db, default_owner = databases[DEFAULT_KEY], owners[DEFAULT_KEY]
    service_roles = sorted({role for key, role in owners.items() if key != DEFAULT_KEY} - {default_owner})
    by_alias = {alias: databases[key] for key, alias in DATABASE_KEYS.items()}
    process_roles = {name: process_role_for(name, by_alias) for name in POLICY}
    passwords = {role: role_password(password_dir, role) for role in {*owners.values(), *process_roles.values()}}
    server = {k: v for k, v in params[DEFAULT_KEY].items() if k != "dbname"}
    ident, literal = sql.Identifier, sql.Literal

    try:
        with _connect_maintenance(server, connect_timeout) as conn:
            if not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
                raise ServiceError(
                    f"creating the per-service database roles needs a PostgreSQL superuser, and "
                    f"{server.get('user')!r} is not one. Use a superuser in the database URLs, or give each "
                    "URL its own role yourself (see docker/postgres/init.sh)."
                )
            for role, password in sorted(passwords.items()):
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(
                    sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                        ident(role), literal(password)
                    )
                )
            for key, database in databases.items():
                conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(database), ident(owners[key])))
                conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(ident(database)))
            if service_roles:
                # Earlier versions let the service databases' owners into the default one.
                conn.execute(
                    sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(
                        ident(default_db), sql.SQL(", ").join(map(ident, service_roles))
                    )
                )
        for key, database in databases.items():
            with psycopg.connect(
                **{**server, "dbname": database, "connect_timeout": str(connect_timeout)}, autocommit=True
            ) as conn:
                _own_everything(conn, owners[key])
                if database == default_db and service_roles:
                    _unshare_default(conn, default_owner, service_roles)
    except psycopg.Error as exc:
        raise ServiceError(f"setting up the per-service database roles failed: {_pg_error_text(exc)}") from exc

    logger.info("per-service database roles ready: %s", ", ".join(sorted(passwords)))
    role_urls = dict(urls)
    for key, url in urls.items():
        if key in databases:
            role_urls[key] = url_with_role(url, owners[key], passwords[owners[key]])
    for name, role in process_roles.items():
        role_urls[login_var(name)] = f"{role}:{passwords[role]}"
    role_urls["DATABASE_PROCESS_ROLES"] = ",".join(f"{name}={role}" for name, role in sorted(process_roles.items()))
    return role_urls


def _own_everything(conn: Any, owner: str) -> None:
    """Make `owner` own the public schema's tables, views and sequences (data created before
    roles existed, e.g. by an earlier `make run` as the superuser)."""
    from psycopg import sql

    rows = conn.execute(
        """
        SELECT c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = %s)
          -- a sequence that belongs to a column follows its table
          AND NOT (c.relkind = 'S' AND EXISTS (
              SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i')))
        ORDER BY c.relkind = 'S', c.relname
        """,
        (owner,),
    ).fetchall()
    kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE"}
    for name, kind in rows:
        conn.execute(
            sql.SQL("ALTER {} public.{} OWNER TO {}").format(
                sql.SQL(kinds[kind]), sql.Identifier(name), sql.Identifier(owner)
            )
        )
    # PostgreSQL before 15 lets everyone create tables in `public`.
    conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")


def _unshare_default(conn: Any, owner: str, roles: list[str]) -> None:
    """Take back what earlier versions gave the service databases' owners in the default
    database (every table, read-write): the process roles get their own, narrower grants."""
    from psycopg import sql

    grantees = sql.SQL(", ").join(map(sql.Identifier, roles))
    for statement in (
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {grantees}",
        "REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {grantees}",
        "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public REVOKE ALL ON TABLES FROM {grantees}",
        "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {grantees}",
    ):
        conn.execute(sql.SQL(statement).format(owner=sql.Identifier(owner), grantees=grantees))
