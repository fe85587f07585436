"""Check docker-compose.yml, the Dockerfile and docker/postgres/init.sh without Docker.

No Docker engine or `docker compose` is needed (none runs where these tests run):

* docker-compose.yml is loaded with PyYAML (anchors and `<<` merges resolved, duplicate
  keys rejected as Compose rejects them) and validated with `jsonschema` against our own
  JSON Schema, compose_schema.py: written by hand from the Compose file reference, it
  covers only the part of the Compose Specification the file uses, and strictly (unknown
  keys are errors at every level, `x-` keys allowed at the top). With no Docker engine
  or compose plugin here, `docker compose config` cannot validate the file, so this
  schema stands in for it; it is a subset of the Specification, not a copy of it.
* The topology is checked against the files it must agree with: the Procfile (same
  programs, queues, concurrency), orders_project/celery.py and settings.py (services,
  queues, database aliases and names, time limits), orders_project/db_routers.py (which
  database each service uses) and docker/postgres/init.sh (roles, owners, passwords).
* The Dockerfile, .dockerignore and .env.example are checked for what compose relies on.

test_postgres_init.py runs init.sh against a real PostgreSQL server.
Nothing here touches Django or a database.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import jsonschema
import pytest
import yaml

from compose_tests.compose_schema import COMPOSE_SCHEMA, property_names
from orders_project.db_roles import PROCESS_ROLES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
INIT_SCRIPT = ROOT / "docker" / "postgres" / "init.sh"
PROCFILE = ROOT / "Procfile"
SETTINGS = ROOT / "orders_project" / "settings.py"
CELERY_APP = ROOT / "orders_project" / "celery.py"
DB_ROUTERS = ROOT / "orders_project" / "db_routers.py"

APP_IMAGE = "saga-orders:local"
DATABASE_URL_VARS = {
    "default": "DATABASE_URL",
    "orders": "ORDERS_DATABASE_URL",
    "inventory": "INVENTORY_DATABASE_URL",
    "payments": "PAYMENTS_DATABASE_URL",
    "notifications": "NOTIFICATIONS_DATABASE_URL",
}
# The configuration the container setup is specified with; .env.example documents these,
# every variable settings.py reads and every ${VAR} of docker-compose.yml.
DOCUMENTED_VARS = {
    *DATABASE_URL_VARS.values(),
    "CELERY_BROKER_URL",
    "SECRET_KEY",
    "DEBUG",
    "ALLOWED_HOSTS",
    "PORT",
    "FLOWER_PORT",
    "FLOWER_BASIC_AUTH",
    "EMAIL_BACKEND",
    "EMAIL_HOST",
    "EMAIL_PORT",
    "DJANGO_SUPERUSER_USERNAME",
    "DJANGO_SUPERUSER_PASSWORD",
    "DJANGO_SUPERUSER_EMAIL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
}
# Names whose values are secrets: in compose they must come from ${VAR}, with a local
# default that says so ("local-only" / "insecure") and is documented in .env.example.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|BASIC_AUTH|TOKEN|_KEY$")
LOCAL_DEFAULT_MARKER = re.compile(r"local-only|insecure")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, ${VAR+alt}.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


# --- Loading --------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key repeated in one mapping is an error, as in Compose.

    (PyYAML silently keeps the last value.) Keys brought in by a `<<` merge may be
    overridden: that is what merges are for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # StrictLoader is a SafeLoader


@cache
def _compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE.read_text())


@pytest.fixture
def compose() -> dict[str, Any]:
    """docker-compose.yml as compose sees it before interpolation (a fresh copy per test)."""
    return copy.deepcopy(_compose())


def schema_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(COMPOSE_SCHEMA)
    errors = sorted(validator.iter_errors(document), key=lambda error: list(error.absolute_path))
    messages = []
    for error in errors:
        detail = jsonschema.exceptions.best_match(error.context) if error.context else error
        path = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        messages.append(f"{path}: {detail.message[:300]}")
    return messages


def services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def app_services() -> dict[str, dict[str, Any]]:
    """The services running the application image (web, workers, beat, flower, migrate)."""
    return {name: service for name, service in services().items() if service.get("image") == APP_IMAGE}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of `environment` (merges need it)"
    return {key: str(value) for key, value in env.items()}


def interpolate_defaults(value: str) -> str:
    """Replace each ${VAR:-default} with its default: what compose runs with no .env."""

    def replace(match: re.Match[str]) -> str:
        assert match["op"] in ("-", ":-"), f"{match[0]} has no default: compose would need .env"
        return match["arg"]

    return INTERPOLATION.sub(replace, value)


# --- Commands -------------------------------------------------------------------------

# Short options of celery and gunicorn used in the Procfile, by their long names.
SHORT_OPTIONS = {
    "-A": "--app",
    "-Q": "--queues",
    "-n": "--hostname",
    "-c": "--concurrency",
    "-l": "--loglevel",
    "-S": "--scheduler",
    "-b": "--bind",
    "-w": "--workers",
}
# Options that take no value; every other option takes one (`--opt value` or `--opt=value`).
FLAG_OPTIONS = {
    "-B",
    "--beat",
    "-E",
    "--events",
    "--without-gossip",
    "--without-mingle",
    "--without-heartbeat",
    "--purge",
    "--preload",
    "--reload",
}


@dataclass
class Command:
    env: dict[str, str]
    program: str
    positional: list[str]
    options: dict[str, str] = field(default_factory=dict)


def parse_command(command: str | list[str]) -> Command:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    env = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    program, *rest = argv
    positional: list[str] = []
    options: dict[str, str] = {}
    args = iter(rest)
    for arg in args:
        if arg.startswith("-") and arg != "-":
            name, has_value, value = arg.partition("=")
            name = SHORT_OPTIONS.get(name, name)
            if name in FLAG_OPTIONS:
                value = "true"
            elif not has_value:
                value = next(args)
            options[name] = value
        else:
            positional.append(arg)
    return Command(env=env, program=program, positional=positional, options=options)


def procfile() -> dict[str, str]:
    """Procfile processes, with ${VAR:-default} replaced by the default."""
    processes = {}
    for line in PROCFILE.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line.strip())
        if match:
            processes[match[1]] = interpolate_defaults(match[2])
    return processes


def compose_service_for(process: str) -> str:
    """The compose service that runs a Procfile process: web/beat/flower, worker-<queue>."""
    return process if process in services() else f"worker-{process}"


def compose_command(name: str) -> Command:
    return parse_command(services()[name]["command"])


def worker_services() -> dict[str, Command]:
    result = {}
    for name in app_services():
        command = services()[name].get("command")
        if isinstance(command, str) and command.startswith("celery ") and " worker " in command:
            result[name] = compose_command(name)
    return result


def seconds(duration: str) -> float:
    """A compose duration such as 1m30s, 60s or 500ms, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, f"bad duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --- The project's own files, read without importing Django --------------------------


def _module_assignments(path: Path) -> dict[str, ast.expr]:
    return {
        target.id: node.value
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


@cache
def celery_services() -> tuple[str, ...]:
    return tuple(ast.literal_eval(_module_assignments(CELERY_APP)["SERVICES"]))


@cache
def app_databases() -> dict[str, str]:
    """Celery service (app label) -> database alias, from db_routers.APP_DATABASES."""
    return ast.literal_eval(_module_assignments(DB_ROUTERS)["APP_DATABASES"])


@cache
def settings_database_names() -> dict[str, str]:
    """Database alias -> default database name, from the `"alias": _database("VAR", "name")` lines."""
    pairs = re.findall(r'"(\w+)":\s*_database\("(\w+)",\s*"(\w+)"\)', SETTINGS.read_text())
    assert pairs, "settings.py no longer builds DATABASES with _database(...): update this test"
    assert {alias: var for alias, var, _ in pairs} == DATABASE_URL_VARS
    return {alias: name for alias, _, name in pairs}


@cache
def settings_env_vars() -> set[str]:
    return set(re.findall(r'env(?:\.\w+)?\(\s*"([A-Z][A-Z0-9_]*)"', SETTINGS.read_text())) | set(
        re.findall(r'_database\("([A-Z][A-Z0-9_]*)"', SETTINGS.read_text())
    )


def settings_int_default(name: str) -> int:
    match = re.search(rf'env\.int\("{name}",\s*default=(\d+)\)', SETTINGS.read_text())
    assert match, f"settings.py no longer reads {name} with env.int(..., default=N)"
    return int(match[1])


@cache
def settings_celery_queues() -> set[str]:
    assignments = _module_assignments(SETTINGS)
    routes = ast.literal_eval(assignments["CELERY_TASK_ROUTES"])
    return {route["queue"] for route in routes.values()} | {ast.literal_eval(assignments["CELERY_TASK_DEFAULT_QUEUE"])}


@cache
def init_sql() -> str:
    return INIT_SCRIPT.read_text()


@cache
def database_owners() -> dict[str, str]:
    """Database -> owning role, from init.sh's CREATE DATABASE statements."""
    return dict(re.findall(r"^CREATE DATABASE (\w+)\s+OWNER (\w+);", init_sql(), re.MULTILINE))


@cache
def role_password_vars() -> dict[str, str]:
    """Role -> the environment variable holding its password, following init.sh:

    CREATE ROLE <role> LOGIN PASSWORD :'<psql var>'  and  --set <psql var>="$<ENV VAR>".
    """
    psql_vars = dict(re.findall(r'--set (\w+)="\$(\w+)"', init_sql()))
    roles = dict(re.findall(r"^CREATE ROLE (\w+)\s+LOGIN PASSWORD :'(\w+)';", init_sql(), re.MULTILINE))
    assert roles, "init.sh creates no LOGIN role with a password from a psql variable"
    return {role: psql_vars[psql_var] for role, psql_var in roles.items()}


def database_url(service: str, alias: str) -> SplitResult:
    return urlsplit(environment(services()[service])[DATABASE_URL_VARS[alias]])


# === The Compose Specification ========================================================


def test_schema_is_a_valid_draft7_schema() -> None:
    jsonschema.Draft7Validator.check_schema(COMPOSE_SCHEMA)


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = schema_errors(compose)
    assert not errors, "docker-compose.yml does not match compose_schema.py:\n" + "\n".join(errors)


def _rename_key(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    "mistake",
    [
        pytest.param(lambda c: _rename_key(c["services"]["web"], "restart", "restrat"), id="typo-in-service-key"),
        pytest.param(lambda c: _rename_key(c, "services", "service"), id="typo-in-top-level-key"),
        pytest.param(lambda c: _rename_key(c["services"]["postgres"], "healthcheck", "health_check"), id="typo-nested"),
        pytest.param(
            lambda c: c["services"]["web"]["depends_on"]["migrate"].update(condition="service_completed"),
            id="unknown-depends-on-condition",
        ),
        pytest.param(lambda c: c["services"]["web"].update(ports="8000:8000"), id="ports-not-a-list"),
        pytest.param(lambda c: c["services"]["web"]["environment"].update(DEBUG=["False"]), id="env-value-a-list"),
        pytest.param(lambda c: c["services"]["postgres"]["healthcheck"].update(interval=5), id="duration-not-string"),
        # Strict at every level, not only the three above.
        pytest.param(
            lambda c: _rename_key(c["services"]["postgres"]["healthcheck"], "start_period", "start_periode"),
            id="typo-in-healthcheck",
        ),
        pytest.param(
            lambda c: _rename_key(c["services"]["web"]["depends_on"]["migrate"], "condition", "conditon"),
            id="typo-in-depends-on-entry",
        ),
        pytest.param(
            lambda c: _rename_key(c["services"]["web"]["build"], "dockerfile", "docker_file"), id="typo-in-build"
        ),
        pytest.param(lambda c: c["services"]["web"].update({"x-note": "hi"}), id="x-key-in-a-service"),
        pytest.param(lambda c: c["volumes"].update({"redis-data": {"drvier": "local"}}), id="typo-in-volume"),
        pytest.param(lambda c: c["services"]["migrate"].update(restart=False), id="restart-unquoted-no"),
        pytest.param(lambda c: c["services"]["web"].update(restart="on_failure"), id="unknown-restart-policy"),
        pytest.param(lambda c: c["services"]["web"].update(stop_grace_period="60"), id="duration-without-unit"),
        pytest.param(lambda c: c["services"]["web"]["ports"].append("127.0.0.1:80"), id="bad-port"),
        pytest.param(lambda c: c["services"]["web"]["environment"].update(DEBUG=False), id="env-value-a-boolean"),
        pytest.param(
            lambda c: c["services"]["web"]["healthcheck"].update(test="curl localhost"), id="healthcheck-test-a-string"
        ),
    ],
)
def test_schema_validation_catches_mistakes(compose: dict[str, Any], mistake: Any) -> None:
    """The schema check is live: each of these edits makes the file invalid."""
    mistake(compose)
    assert schema_errors(compose)


def test_schema_allows_extension_keys_at_the_top_level(compose: dict[str, Any]) -> None:
    compose["x-anything"] = {"any": ["thing"]}
    assert not schema_errors(compose)


def mapping_keys(node: Any) -> set[str]:
    """Every key of every mapping in a loaded YAML document."""
    if isinstance(node, dict):
        return {str(key) for key in node} | {key for value in node.values() for key in mapping_keys(value)}
    if isinstance(node, list):
        return {key for item in node for key in mapping_keys(item)}
    return set()


def test_schema_describes_only_keys_the_compose_file_uses() -> None:
    """compose_schema.py is the subset of the Specification docker-compose.yml needs, no more."""
    unused = property_names() - mapping_keys(_compose())
    assert not unused, f"compose_schema.py names keys docker-compose.yml no longer uses: {sorted(unused)}"


def test_duplicate_keys_are_rejected() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'image'"):
        load_yaml("services:\n  web:\n    image: a\n    image: b\n")
    # ...but a key may override one brought in by a merge.
    assert load_yaml("x: &x {a: 1}\ny:\n  <<: *x\n  a: 2\n")["y"] == {"a": 2}


def strings_in(node: Any) -> list[str]:
    """Every string (key or value) in a loaded YAML document."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*strings_in(key), *strings_in(value))]
    if isinstance(node, list):
        return [text for item in node for text in strings_in(item)]
    return [node] if isinstance(node, str) else []


def compose_strings() -> list[str]:
    """What compose interpolates: the strings of docker-compose.yml, not its comments."""
    return strings_in(_compose())


def interpolations() -> list[re.Match[str]]:
    return [match for text in compose_strings() for match in INTERPOLATION.finditer(text)]


def test_interpolations_are_well_formed() -> None:
    """Every `$` is `$$` (a literal $) or a ${VAR...} compose understands."""
    for text in compose_strings():
        position = 0
        while (start := text.find("$", position)) != -1:
            if text.startswith("$$", start):
                position = start + 2
                continue
            match = INTERPOLATION.match(text, start)
            assert match, f"bad interpolation at {text[start : start + 40]!r} in {text!r}"
            position = match.end()


# === Topology ==========================================================================


def test_app_services_share_one_image_built_from_the_dockerfile() -> None:
    expected = {
        "migrate",
        "web",
        "beat",
        "flower",
        *(f"worker-{service}" for service in celery_services()),
    }
    assert set(app_services()) == expected
    for name, service in app_services().items():
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name


@pytest.mark.parametrize("process", list(procfile()))
def test_every_procfile_process_runs_in_compose(process: str) -> None:
    """Same program, subcommand, queue, node name, concurrency and log level as the Procfile."""
    name = compose_service_for(process)
    assert name in services(), f"Procfile process {process!r} has no compose service {name!r}"
    expected = parse_command(procfile()[process])
    actual = compose_command(name)

    assert actual.program == expected.program
    assert actual.positional == expected.positional
    for var, value in expected.env.items():
        # The Procfile's login comes from devstack (empty by default); compose writes each
        # process's role into its URLs instead.
        if var == "DATABASE_LOGIN" and value == "":
            continue
        assert environment(services()[name]).get(var) == value, f"{name}: {var}"

    assert set(actual.options) == set(expected.options), name
    for option, want in expected.options.items():
        got = actual.options[option]
        if option == "--bind":  # Procfile: 127.0.0.1:PORT; in a container: every interface
            assert got == f"0.0.0.0:{want.rpartition(':')[2]}", name
        elif option == "--address":
            assert got == "0.0.0.0", name
        elif option == "--loglevel":
            assert got.upper() == want.upper(), name
        else:
            assert got == want, f"{name}: {option}"


def test_every_compose_process_is_in_the_procfile() -> None:
    running = {compose_service_for(process) for process in procfile()}
    assert set(app_services()) - running == {"migrate"}


def test_one_worker_per_celery_service_consuming_its_own_queue() -> None:
    workers = worker_services()
    assert set(workers) == {f"worker-{service}" for service in celery_services()}
    for name, command in workers.items():
        queue = command.options["--queues"]
        assert name == f"worker-{queue}"
        assert environment(services()[name])["CELERY_SERVICE"] == queue, name
        assert command.options["--hostname"] == f"{queue}@%h", name
        assert command.options["--app"] == "orders_project"
    assert settings_celery_queues() <= {command.options["--queues"] for command in workers.values()}


def test_workers_scale_without_editing_the_file() -> None:
    """`docker compose up --scale worker-inventory=3` (docs/CONTAINERS.md "Several hosts"): every replica
    runs the same definition, so none may hold what is one per system (a published port, a
    volume of its own), and each is its own Celery node: `%h` is its container's hostname,
    which differs per replica (the sweeper tells workers apart by node name)."""
    for name, command in worker_services().items():
        service = services()[name]
        assert "ports" not in service, name
        assert command.options["--hostname"].endswith("@%h"), name
        # A named volume is shared by the replicas; only notifications' (the dev SMS file
        # backend's output directory) exists, and sharing it is what it is for.
        volumes = [str(volume).split(":")[0] for volume in service.get("volumes", [])]
        assert volumes == (["notifications-data"] if name == "worker-notifications" else []), name


def test_only_workers_set_celery_service() -> None:
    for name, service in app_services().items():
        if name not in worker_services():
            assert "CELERY_SERVICE" not in environment(service), name


def test_every_app_service_gets_the_common_environment() -> None:
    for name, service in app_services().items():
        env = environment(service)
        for var in DATABASE_URL_VARS.values():
            assert env.get(var) or name == "flower", f"{name}: {var} missing"
        assert env["CELERY_BROKER_URL"] == "${COMPOSE_CELERY_BROKER_URL:-redis://redis:6379/0}", name
        assert env["DEBUG"] == "False", name
        assert env["SECRET_KEY"].startswith("${SECRET_KEY"), name
        assert env["ALLOWED_HOSTS"], name
        assert env["EMAIL_BACKEND"] == "django.core.mail.backends.smtp.EmailBackend", name
        assert (env["EMAIL_HOST"], env["EMAIL_PORT"]) == ("mailpit", "1025"), name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name
    names = [environment(service)["OTEL_SERVICE_NAME"] for service in app_services().values()]
    assert len(set(names)) == len(names), "OTEL_SERVICE_NAME must name each service once"


def test_database_urls_point_at_the_right_databases() -> None:
    for name in set(app_services()) - {"flower"}:
        for alias, database in settings_database_names().items():
            url = urlsplit(interpolate_defaults(environment(services()[name])[DATABASE_URL_VARS[alias]]))
            assert (url.scheme, url.hostname, url.port) == ("postgres", "postgres", 5432), f"{name}: {alias}"
            assert url.path == f"/{database}", f"{name}: {alias}"
            assert url.username and url.password, f"{name}: {alias}"


def _role_for(name: str, alias: str) -> str:
    return database_url(name, alias).username or ""


def test_only_migrate_uses_the_owner_of_each_database() -> None:
    for alias, database in settings_database_names().items():
        assert _role_for("migrate", alias) == database_owners()[database], alias
    migrate_roles = environment(services()["migrate"])["DATABASE_PROCESS_ROLES"]
    assert dict(pair.split("=") for pair in migrate_roles.split(",")) == {
        role: role for role in set(PROCESS_ROLES.values())
    }


def test_each_process_uses_its_own_role_for_every_database() -> None:
    """One role per process role (orders_project/db_roles.py) for all five URLs: a database
    outside its job refuses the connection (CONNECT is granted by `migrate` per POLICY)."""
    for process, role in PROCESS_ROLES.items():
        name = compose_service_for(process)
        roles = {_role_for(name, alias) for alias in DATABASE_URL_VARS}
        assert roles == {role}, f"{name} should connect as {role} only, not {roles}"
        assert role not in database_owners().values()


def test_flower_has_no_database_credentials() -> None:
    env = environment(services()["flower"])
    assert env["DATABASE_LOGIN"] == "none"
    assert not [var for var in DATABASE_URL_VARS.values() if var in env]


def test_database_passwords_are_the_ones_postgres_was_given() -> None:
    """Each URL's password is ${<ROLE>_DB_PASSWORD:-default} for the URL's role, with the
    default the postgres service passes to init.sh for that role."""
    postgres_env = environment(services()["postgres"])
    for name in set(app_services()) - {"flower"}:
        for alias in DATABASE_URL_VARS:
            url = database_url(name, alias)
            var = role_password_vars()[url.username or ""]
            assert url.password == postgres_env[var], f"{name}: {alias}"


def test_depends_on_uses_conditions_and_healthchecks() -> None:
    for name, service in services().items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use the long form of depends_on, with conditions"
        for dependency, spec in depends_on.items():
            target = services()[dependency]
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dependency}, which has no healthcheck"
                assert not target["healthcheck"].get("disable"), dependency
            elif condition == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} must be a one-shot job"
            else:
                pytest.fail(f"{name}: depends on {dependency} with {condition}; wait for health or completion")
            if target.get("profiles") and not set(target["profiles"]) & set(service.get("profiles", [])):
                assert spec.get("required") is False, f"{name}: {dependency} is optional (profile)"


def _dependencies(name: str) -> dict[str, str]:
    return {dep: spec["condition"] for dep, spec in services()[name].get("depends_on", {}).items()}


def test_start_order() -> None:
    assert _dependencies("migrate") == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "rabbitmq": "service_healthy",
    }
    for name in app_services():
        deps = _dependencies(name)
        assert deps["redis"] == deps["rabbitmq"] == "service_healthy", name  # the broker
        if name not in ("migrate", "flower"):  # Flower uses no database
            assert deps["postgres"] == "service_healthy", name
            assert deps["migrate"] == "service_completed_successfully", name


def test_healthchecks_of_the_infrastructure() -> None:
    postgres = services()["postgres"]["healthcheck"]["test"]
    # TCP, not the socket: the image's init-time server listens on the socket only.
    assert postgres[:2] == ["CMD", "pg_isready"] and "--host=127.0.0.1" in postgres
    assert services()["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "rabbitmq-diagnostics" in services()["rabbitmq"]["healthcheck"]["test"]
    assert "healthcheck" in services()["web"]


def test_postgres_analyzes_growing_tables_as_the_embedded_server_does() -> None:
    """The workers' prepared statements keep plans made on empty tables until autovacuum
    analyzes them (devstack.services.PG_SETTINGS)."""
    from devstack.services import PG_SETTINGS

    command = services()["postgres"]["command"]
    assert command[0] == "postgres"
    options = dict(
        value.split("=", 1) for flag, value in zip(command[1::2], command[2::2], strict=True) if flag == "-c"
    )
    assert options == {"autovacuum_naptime": PG_SETTINGS["autovacuum_naptime"]}


def test_restart_policies() -> None:
    for name, service in services().items():
        expected = "no" if name == "migrate" else "unless-stopped"
        assert service.get("restart") == expected, name


def test_workers_have_time_for_a_warm_shutdown() -> None:
    hard_limit = settings_int_default("CELERY_TASK_TIME_LIMIT")
    for name in worker_services():
        grace = seconds(services()[name]["stop_grace_period"])
        assert grace >= 60 and grace > hard_limit, name


def test_migrate_job() -> None:
    migrate = services()["migrate"]
    assert migrate["command"][:2] == ["sh", "-c"]
    script = [line.strip() for line in migrate["command"][2].splitlines() if line.strip()]
    assert script[0] == "set -e"
    aliases = list(settings_database_names())
    assert aliases[0] == "default"
    assert script[1:] == [
        *(f"python manage.py migrate --noinput --database={alias}" for alias in aliases),
        "python manage.py seed_demo",
        "python manage.py createsuperuser --noinput || true",
    ]
    env = environment(migrate)
    for var in ("DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD", "DJANGO_SUPERUSER_EMAIL"):
        assert env[var].startswith(f"${{{var}:-"), var


def test_published_ports() -> None:
    published = {}
    for name, service in services().items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: publish on 127.0.0.1 only (the defaults are public)"
            published[name, int(container_port)] = int(host_port)
    assert published == {
        ("web", 8000): 8000,
        ("flower", 5555): 5555,
        ("jaeger", 16686): 16686,
        ("jaeger", 4317): 4317,
        ("mailpit", 8025): 8025,
        ("mailpit", 1025): 1025,
        ("rabbitmq", 15672): 15672,
    }
    assert environment(services()["web"])["PORT"] == "8000"
    assert environment(services()["flower"])["FLOWER_PORT"] == compose_command("flower").options["--port"]


def test_flower_requires_basic_auth() -> None:
    value = interpolate_defaults(environment(services()["flower"])["FLOWER_BASIC_AUTH"])
    user, _, password = value.partition(":")
    assert user and password
    assert "basic" not in services()["flower"]["command"], "keep the password out of the command line"


def test_rabbitmq_is_an_optional_profile() -> None:
    profiled = {name: service["profiles"] for name, service in services().items() if "profiles" in service}
    assert profiled == {"rabbitmq": ["rabbitmq"]}
    assert "COMPOSE_CELERY_BROKER_URL=amqp://guest:guest@rabbitmq:5672//" in ENV_EXAMPLE.read_text()


def test_init_script_is_mounted_into_the_entrypoint_directory() -> None:
    postgres = services()["postgres"]
    assert postgres["image"] == "postgres:17"
    assert "./docker/postgres/init.sh:/docker-entrypoint-initdb.d/10-init.sh:ro" in postgres["volumes"]
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    env = environment(postgres)
    for var in role_password_vars().values():
        assert env[var] == f"${{{var}:-{interpolate_defaults(env[var])}}}" and interpolate_defaults(env[var])
    referenced = set(re.findall(r'"\$\{?(\w+)', init_sql())) - {"POSTGRES_USER", "POSTGRES_DB"}
    assert referenced <= set(env), f"init.sh reads {referenced - set(env)}, which compose does not pass"


def test_named_volumes_are_declared() -> None:
    used = {
        str(volume).split(":")[0]
        for service in services().values()
        for volume in service.get("volumes", [])
        if not str(volume).startswith(("./", "/"))
    }
    assert used == set(_compose()["volumes"])


# === docker/postgres/init.sh ===========================================================


def test_init_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(INIT_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_init_script_stops_on_the_first_error() -> None:
    assert "set -euo pipefail" in init_sql()
    assert "ON_ERROR_STOP=1" in init_sql()


def test_init_script_creates_every_database_with_its_own_role() -> None:
    databases = set(settings_database_names().values())
    assert set(database_owners()) == databases
    owners = database_owners()
    assert owners[settings_database_names()["default"]] == "app"
    for database, owner in owners.items():
        if database != settings_database_names()["default"]:
            assert owner == f"{database.removeprefix('saga_')}_svc"
    assert len(set(owners.values())) == len(owners), "one role per database"
    assert set(role_password_vars()) == set(owners.values()) | set(PROCESS_ROLES.values())


def test_init_script_limits_connections() -> None:
    sql = init_sql()
    for database in database_owners():
        assert re.search(rf"^REVOKE CONNECT\b.* ON DATABASE {database}\s+FROM PUBLIC;", sql, re.MULTILINE), database
    # CONNECT for the process roles is granted by `migrate`, as each database's owner.
    assert not re.search(r"^GRANT\b", sql, re.MULTILINE), "init.sh grants nothing"


def test_init_script_has_no_password_literals() -> None:
    assert not re.search(r"PASSWORD\s+'", init_sql()), "passwords come from psql variables (:'var')"


# === Secrets ===========================================================================


def test_secrets_come_from_variables_with_documented_local_defaults() -> None:
    env_example = ENV_EXAMPLE.read_text()
    defaults: dict[str, set[str]] = {}
    for match in interpolations():
        defaults.setdefault(match["name"], set()).add(match["arg"] or "")
    for name, values in defaults.items():
        assert len(values) == 1, f"${{{name}}} has different defaults: {sorted(values)}"
        (default,) = values
        if SECRET_NAME.search(name):
            assert LOCAL_DEFAULT_MARKER.search(default), f"{name}: default {default!r} must say local-only"
            assert default in env_example, f"{name}: default {default!r} is not documented in .env.example"


def test_no_secret_literals_in_compose() -> None:
    for name, service in services().items():
        for var, value in environment(service).items():
            if SECRET_NAME.search(var):
                assert INTERPOLATION.fullmatch(value), f"{name}: {var} must come from ${{{var}:-...}}"
            if "://" in value:
                password = urlsplit(value).password
                if password is not None:
                    assert INTERPOLATION.fullmatch(password), f"{name}: {var} has a literal password"
    # RabbitMQ's well-known guest/guest appears in comments and .env.example only.
    assert not [text for text in compose_strings() if "guest:guest" in text]


# === Dockerfile ========================================================================


@cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def test_dockerfile_base_image_is_python_311_slim() -> None:
    bases = _instructions("FROM")
    assert bases, "no FROM"
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", bases[-1].split()[0])


def test_dockerfile_runs_as_an_unprivileged_user() -> None:
    users = _instructions("USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    keywords = [kw for kw, _ in dockerfile_instructions()]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:], "nothing may run as root after USER"


def test_dockerfile_installs_requirements_and_collects_static_files() -> None:
    runs = _instructions("RUN")
    assert any("pip install -r requirements.txt" in run for run in runs)
    collect = [run for run in runs if "collectstatic" in run]
    assert len(collect) == 1 and "--noinput" in collect[0]
    assert re.search(r"\bSECRET_KEY=\S+ .*manage\.py collectstatic", collect[0]), "a build-only SECRET_KEY"
    assert not any(re.search(r"SECRET_KEY|PASSWORD", env) for env in _instructions("ENV") + _instructions("ARG"))
    assert "8000" in _instructions("EXPOSE")


def test_dockerfile_default_command_is_the_procfile_web_process() -> None:
    (cmd,) = _instructions("CMD")
    argv = json.loads(cmd)
    if argv[:2] == ["sh", "-c"]:
        argv = shlex.split(argv[2].removeprefix("exec "))
    command = parse_command(interpolate_defaults(" ".join(argv)))
    expected = parse_command(procfile()["web"])
    assert (command.program, command.positional) == (expected.program, expected.positional)
    assert command.options == {
        **expected.options,
        "--bind": f"0.0.0.0:{expected.options['--bind'].split(':')[1]}",
    }


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if not line.startswith("#")}
    assert {".env", ".venv", ".git", ".data", "staticfiles"} <= ignored


# === .env.example ======================================================================


def test_env_example_documents_every_variable() -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    compose_vars = {match["name"] for match in interpolations()}
    wanted = DOCUMENTED_VARS | settings_env_vars() | compose_vars
    assert not wanted - documented, f".env.example does not document {sorted(wanted - documented)}"


def test_env_example_sets_nothing() -> None:
    """Copying .env.example to .env must change nothing: every assignment is commented out."""
    for line in ENV_EXAMPLE.read_text().splitlines():
        assert not line.strip() or line.lstrip().startswith("#"), line
