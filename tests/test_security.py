"""Hardening (docs/SECURITY.md): least privilege between services, hostile input, and
production settings. Each claim is checked against real processes: the test topology,
extra web processes with other settings, and `manage.py` / `celery` run as subprocesses
with a worker's or compose's environment.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from django.conf import settings
from django.contrib.auth import get_user_model
from django.urls import get_resolver

from devstack.topology import BASE_DIR, Topology, free_port, wait_for
from orders.models import Order
from orders_project import security

from .api import Api, make_product

pytestmark = pytest.mark.integration

ALIASES = ("default", "orders", "inventory", "payments", "notifications")
LOG_DIR = Path(os.environ.get("TEST_LOG_DIR", BASE_DIR / ".data" / "test-logs"))
GOOD_ORDER = {"email": "a@example.com", "items": [{"sku": "X", "quantity": 1}], "payment_token": "tok_visa"}


def _environment(**changes: str | None) -> dict[str, str]:
    """This test run's environment (its databases and broker) with some variables changed
    (None removes one)."""
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _manage(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=timeout
    )


def _start_web(topology: Topology, name: str, **overrides: str) -> Topology:
    """Another web process from the Procfile, with some settings changed, on its own port."""
    web = Topology(env={**topology.env, **overrides}, log_dir=LOG_DIR / name)
    web.start(["web"])
    return web


# Least privilege between processes: tests/test_db_roles.py.


# === The OpenAPI schema and Swagger UI ================================================


def test_the_schema_describes_every_api_endpoint(topology: Topology) -> None:
    response = requests.get(f"{topology.base_url}/api/schema/", headers={"Accept": "application/json"}, timeout=30)
    assert response.status_code == 200
    schema = response.json()
    documented = set(schema["paths"])

    routes = {
        "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(pattern.pattern))
        for pattern in get_resolver().url_patterns
        if str(pattern.pattern).startswith("api/") and pattern.name not in ("api-schema", "api-docs")
    }
    assert documented == routes
    create = schema["paths"]["/api/orders/"]["post"]
    assert set(create["responses"]) == {"202", "400", "401", "413", "415", "422", "429"}
    assert "Retry-After" in create["responses"]["429"]["headers"]
    assert [p["name"] for p in create["parameters"]] == ["Idempotency-Key"]
    assert [p["name"] for p in schema["paths"]["/api/payments/"]["get"]["parameters"]] == ["limit", "offset", "order"]


def test_swagger_ui_is_served_with_its_assets_from_this_server(topology: Topology) -> None:
    page = requests.get(f"{topology.base_url}/api/docs/", timeout=30)
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css|png))["']""", page.text)
    assert any("swagger-ui-bundle" in asset for asset in assets), page.text
    assert not [asset for asset in assets if "://" in asset], "no CDN: nothing is loaded from another host"
    for asset in assets:
        assert requests.get(f"{topology.base_url}{asset}", timeout=30).status_code == 200, asset


# === Hostile input ====================================================================


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**GOOD_ORDER, "email": f"{'a' * 245}@example.com"}, "email"),
        ({**GOOD_ORDER, "payment_token": "tok_" + "a" * 61}, "payment_token"),
        ({**GOOD_ORDER, "phone": "+1" + "2" * 15}, "phone"),
        ({**GOOD_ORDER, "items": [{"sku": "X", "quantity": 1001}]}, "items"),
        ({**GOOD_ORDER, "items": [{"sku": "X\x00", "quantity": 1}]}, "items"),
        ({**GOOD_ORDER, "items": [["X", 1]]}, "items"),
    ],
)
def test_overlong_or_malformed_fields_get_a_400(api: Api, body: dict, field: str) -> None:
    response = api.post("/api/orders/", json=body)
    assert response.status_code == 400, response.text
    assert list(response.json()) == [field]
    assert not Order.objects.filter(user_id=api.user_id).exists()


def test_a_body_over_the_limit_gets_a_413_in_json(api: Api) -> None:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    body = json.dumps({**GOOD_ORDER, "email": "a" * limit}).encode()
    response = api.post("/api/orders/", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": f"The request body is larger than {limit} bytes."}
    assert not Order.objects.filter(user_id=api.user_id).exists()


def test_json_nested_too_deeply_gets_a_400_not_a_500(api: Api) -> None:
    response = api.post("/api/orders/", data="[" * 20_000, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "nested too deeply" in response.json()["detail"]


@pytest.mark.parametrize("query", ["limit=abc", "limit=0", "limit=-1", "limit=1.5", "limit=%205", "offset=-1"])
def test_bad_pagination_parameters_get_a_400(api: Api, query: str) -> None:
    response = api.get(f"/api/products/?{query}")
    assert response.status_code == 400, response.text
    assert list(response.json()) == [query.split("=")[0]]


def test_pages_are_capped_and_a_huge_offset_is_an_empty_page(api: Api) -> None:
    capped = api.get("/api/products/", params={"limit": 10**9}).json()
    assert len(capped["results"]) <= settings.API_MAX_PAGE_SIZE
    far = api.get("/api/products/", params={"offset": 10**17})
    assert far.status_code == 200 and far.json()["results"] == []


# --- Rate limits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def throttled_web(topology: Topology) -> Iterator[Topology]:
    """A web process (two gunicorn workers, as in production) allowing 3 orders a minute,
    behind one (pretend) proxy that tells anonymous clients apart by X-Forwarded-For."""
    web = _start_web(
        topology, "web-throttled", ORDER_CREATE_RATE="3/minute", AUTH_TOKEN_RATE="3/minute", NUM_PROXIES="1"
    )
    try:
        yield web
    finally:
        web.stop()


def test_order_creation_is_rate_limited_per_user_across_gunicorn_workers(throttled_web: Topology, sku: str) -> None:
    make_product(sku, on_hand=100)
    alice, bob = Api.for_new_user(throttled_web.base_url), Api.for_new_user(throttled_web.base_url)
    order = {**GOOD_ORDER, "items": [{"sku": sku, "quantity": 1}]}

    answers = [alice.post("/api/orders/", json=order) for _ in range(6)]

    assert [a.status_code for a in answers] == [202, 202, 202, 429, 429, 429]
    assert 0 < int(answers[3].headers["Retry-After"]) <= 60
    assert answers[3].json()["detail"].startswith("Request was throttled.")
    assert Order.objects.filter(user_id=alice.user_id).count() == 3
    # Per user, and only creation: reading goes on, and another customer is not affected.
    assert alice.get("/api/orders/").status_code == 200
    assert bob.post("/api/orders/", json=order).status_code == 202
    for placed in answers[:3]:
        alice.wait_until_final(placed.json()["id"])


def test_token_requests_are_rate_limited_per_client(throttled_web: Topology) -> None:
    url = f"{throttled_web.base_url}/api/auth/token/"
    guesser, other = (f"192.0.2.{n}" for n in secrets.SystemRandom().sample(range(1, 255), 2))  # TEST-NET-1

    def attempt(client: str) -> requests.Response:
        body = {"username": "nobody", "password": "wrong"}
        return requests.post(url, json=body, headers={"X-Forwarded-For": client}, timeout=30)

    answers = [attempt(guesser) for _ in range(4)]
    assert [a.status_code for a in answers] == [400, 400, 400, 429]
    assert "Retry-After" in answers[3].headers
    assert attempt(other).status_code == 400


def test_orders_are_taken_when_the_rate_limit_cache_is_down(topology: Topology, sku: str) -> None:
    """The limit is a guard, not a dependency: with its Redis unreachable, orders go through."""
    web = _start_web(topology, "web-no-cache", CACHE_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        make_product(sku, on_hand=5)
        customer = Api.for_new_user(web.base_url)
        response = customer.post("/api/orders/", json={**GOOD_ORDER, "items": [{"sku": sku, "quantity": 1}]})
        assert response.status_code == 202, response.text
        customer.wait_until_final(response.json()["id"])
    finally:
        web.stop()
    assert "rate limit not applied: the cache is unavailable" in web.processes["web"].log_path.read_text()


# --- Schema-based fuzzing against production settings ------------------------------------


@pytest.fixture(scope="module")
def production_web(topology: Topology) -> Iterator[Topology]:
    """The web process with DEBUG off, as compose runs it without a TLS proxy in front.

    Generous rate limits, so that the fuzzer reaches the validation behind them. The counts
    live in the cache every web shares, by client address for the token endpoint: behind a
    proxy (NUM_PROXIES=1) the fuzzer says it comes from an address of its own
    (`FUZZER_ADDRESS`), so its hundreds of token requests count against no other test's.
    """
    web = _start_web(
        topology,
        "web-production",
        DEBUG="False",
        SECURE_SSL_REDIRECT="False",
        ORDER_CREATE_RATE="100000/minute",
        AUTH_TOKEN_RATE="100000/minute",
        NUM_PROXIES="1",
    )
    try:
        yield web
    finally:
        web.stop()


def test_errors_under_api_are_json_without_internals(production_web: Topology) -> None:
    for path in ["/api/nope/", "/api/orders/NOT-A-UUID/", "/api/orders/%00/cancel/"]:
        response = requests.get(f"{production_web.base_url}{path}", timeout=30)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "Not found."}, path


def test_hsts_is_sent_on_https_requests_from_the_proxy(production_web: Topology) -> None:
    response = requests.get(
        f"{production_web.base_url}/api/products/", headers={"X-Forwarded-Proto": "https"}, timeout=30
    )
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"


FUZZER_ADDRESS = "192.0.2.250"  # TEST-NET-1


def schemathesis_command(base_url: str, token: str, *extra: str) -> list[str]:
    """The fuzzing run; docs/SECURITY.md has the long one, with the same options."""
    return [
        str(Path(sys.executable).parent / "st"),
        "run",
        f"{base_url}/api/schema/",
        "--header",
        f"Authorization: Token {token}",
        "--header",
        f"X-Forwarded-For: {FUZZER_ADDRESS}",
        # Revoking the fuzzer's own token would turn the rest of the run into 401s.
        "--exclude-operation-id",
        "auth_token_revoke",
        # Every check, ours included (tests/fuzz_checks.py), but "schema-valid data must be
        # accepted": a well-formed order for an unknown SKU is rightly a 400.
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--generation-deterministic",  # the same cases every run (and no example database)
        "--no-color",
        *extra,
    ]


def test_schemathesis_finds_no_server_error_schema_violation_or_leak(production_web: Topology, tmp_path: Path) -> None:
    make_product("MUG-LOGO", on_hand=1_000_000)  # the SKU of the schema's example order
    fuzzer = Api.for_new_user(production_web.base_url)
    command = schemathesis_command(
        production_web.base_url, fuzzer.token, "--max-examples", "15", "--report-dir", str(tmp_path)
    )
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env=_environment(SCHEMATHESIS_HOOKS=str(BASE_DIR / "tests" / "fuzz_checks.py")),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert re.search(r"Test cases:\s+\d+ generated, \d+ passed", result.stdout), result.stdout[-3000:]


# === Production settings ==============================================================

COMPOSE_FILE = BASE_DIR / "docker-compose.yml"
INTERPOLATION = re.compile(r"\$\{(\w+):?-([^}]*)\}")


def compose_environment(service: str) -> dict[str, str]:
    """A compose service's environment as compose runs it with no .env (defaults filled in)."""
    environment = yaml.safe_load(COMPOSE_FILE.read_text())["services"][service]["environment"]
    return {name: INTERPOLATION.sub(lambda m: m[2], str(value)) for name, value in environment.items()}


def _production_env(**changes: str) -> dict[str, str]:
    """compose's web environment, with the secrets a deployment sets in .env, and nothing
    from this test run (so no database or broker is reachable: none is needed)."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        **compose_environment("web"),
        "SECRET_KEY": secrets.token_urlsafe(50),
        **changes,
    }


def test_check_deploy_passes_with_composes_production_settings() -> None:
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=_production_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(
    ("secret_key", "problem"),
    [
        (None, "it is a public default from this repository"),  # compose's default
        ("insecure-local-only-key-change-me", "it is a public default from this repository"),  # settings' default
        ("short-but-random-1f9a2b", "shorter than 50 characters"),
        ("a" * 60, "fewer than 5 distinct"),
    ],
)
def test_debug_off_refuses_to_start_with_a_public_or_weak_secret_key(secret_key: str | None, problem: str) -> None:
    env = _production_env()
    env["SECRET_KEY"] = compose_environment("web")["SECRET_KEY"] if secret_key is None else secret_key
    result = _manage("check", env=env)
    assert result.returncode != 0
    assert "DEBUG is off but SECRET_KEY is unsafe" in result.stderr and problem in result.stderr


def test_local_mode_says_so_at_start_up() -> None:
    start = "import django; django.setup()"
    local = subprocess.run(
        [sys.executable, "-c", start],
        cwd=BASE_DIR,
        env=_environment(DEBUG="True", DJANGO_SETTINGS_MODULE="orders_project.settings"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    production = subprocess.run(
        [sys.executable, "-c", start],
        cwd=BASE_DIR,
        env={**_production_env(), "DJANGO_SETTINGS_MODULE": "orders_project.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert local.returncode == production.returncode == 0, local.stderr + production.stderr
    [notice] = [line for line in local.stderr.splitlines() if "LOCAL MODE" in line]
    assert "LOCAL MODE: DEBUG is on." in notice
    assert "LOCAL MODE" not in production.stderr


# --- Authentication everywhere ----------------------------------------------------------


def test_the_admin_asks_for_a_login(topology: Topology) -> None:
    for path in ["/admin/", "/admin/saga/sagainstance/", "/admin/common/apitoken/"]:
        response = requests.get(f"{topology.base_url}{path}", allow_redirects=False, timeout=30)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/admin/login/"), path


def _celery_flower(env: dict[str, str], port: int) -> subprocess.Popen:
    celery = str(Path(sys.executable).parent / "celery")
    return subprocess.Popen(
        [celery, "-A", "orders_project", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_flower_refuses_to_start_without_authentication_when_debug_is_off() -> None:
    for auth in [None, "admin:flower-local-only"]:  # none at all, or compose's public default
        env = _environment(DEBUG="False", SECRET_KEY=secrets.token_urlsafe(50), FLOWER_BASIC_AUTH=auth)
        flower = _celery_flower(env, free_port())
        output, _ = flower.communicate(timeout=60)
        assert flower.returncode != 0, output
        assert "Flower refuses to start: " in output and "FLOWER_BASIC_AUTH" in output, output


@pytest.mark.parametrize(
    ("argv", "environ", "refused"),
    [
        (["celery", "-A", "orders_project", "flower"], {}, True),
        (["celery", "-A", "orders_project", "flower"], {"FLOWER_BASIC_AUTH": "ops:flower-local-only"}, True),
        (["celery", "-A", "orders_project", "flower"], {"FLOWER_BASIC_AUTH": "ops:Kq3v9-long-random"}, False),
        (["celery", "-A", "orders_project", "flower", "--basic-auth=ops:Kq3v9"], {}, False),
        (["celery", "-A", "orders_project", "flower"], {"FLOWER_AUTH": ".*@example\\.com"}, False),
        (["celery", "-A", "orders_project", "worker"], {}, False),
    ],
)
def test_which_flower_processes_count_as_open(argv: list[str], environ: dict[str, str], refused: bool) -> None:
    assert (security.flower_auth_problem(argv, environ) is not None) == refused


def test_flower_with_basic_auth_refuses_anonymous_visitors(topology: Topology) -> None:
    port = free_port()
    flower = _celery_flower(_environment(FLOWER_BASIC_AUTH="ops:s3cret-flower-pass"), port)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: requests.get(url, timeout=2).status_code == 401, timeout=60, what="Flower to answer")
        assert requests.get(f"{url}api/workers", timeout=10).status_code == 401
        assert requests.get(url, auth=("ops", "wrong"), timeout=10).status_code == 401
        assert requests.get(url, auth=("ops", "s3cret-flower-pass"), timeout=10).status_code == 200
    finally:
        flower.terminate()
        flower.communicate(timeout=30)


def test_a_token_can_be_revoked_by_its_owner(api: Api) -> None:
    assert api.get("/api/orders/").status_code == 200
    assert api.anonymous().post("/api/auth/token/revoke/").status_code == 401

    assert api.post("/api/auth/token/revoke/").status_code == 204

    # Every web process hears of it when it commits (common.notified_cache): within milliseconds.
    # (A Response of a 401 is falsy: wait_for is given it in a tuple.)
    (refused,) = wait_for(lambda: (r := api.get("/api/orders/")).status_code == 401 and (r,), timeout=5, what="refused")
    assert refused.status_code == 401
    assert refused.json() == {"detail": "Invalid token."}


@pytest.mark.parametrize(
    ("password", "debug", "message"),
    [
        ("password", "True", "This password is too common."),
        ("12345678901", "True", "This password is entirely numeric."),
        ("Zq7!", "True", "This password is too short."),
        ("admin-local-only", "False", "public default"),
        ("", "True", "This password is too short."),  # Django stored a working hash of ""
    ],
)
def test_createsuperuser_refuses_a_weak_password_even_without_a_prompt(
    db_access: None, password: str, debug: str, message: str
) -> None:
    username = f"admin-{uuid.uuid4().hex[:8]}"
    env = _environment(DJANGO_SUPERUSER_PASSWORD=password, DEBUG=debug)
    if debug == "False":
        env["SECRET_KEY"] = secrets.token_urlsafe(50)
    result = _manage("createsuperuser", "--noinput", "--username", username, "--email", "a@example.com", env=env)
    assert result.returncode != 0
    assert message in result.stderr
    assert not get_user_model().objects.filter(username=username).exists()


def test_createsuperuser_accepts_a_strong_password(db_access: None) -> None:
    username = f"admin-{uuid.uuid4().hex[:8]}"
    env = _environment(DJANGO_SUPERUSER_PASSWORD=secrets.token_urlsafe(16))
    result = _manage("createsuperuser", "--noinput", "--username", username, "--email", "a@example.com", env=env)
    assert result.returncode == 0, result.stderr
    assert get_user_model().objects.get(username=username).is_superuser


def test_api_token_create_refuses_before_it_changes_anything(db_access: None) -> None:
    """A TTL out of range printed a traceback, after --replace had revoked the user's
    tokens: they were left with none. An inactive user's key would be refused by every
    request."""
    from common.models import ApiToken
    from common.tokens import api_token_create

    user = get_user_model().objects.create_user(username=f"cli-{uuid.uuid4().hex[:8]}", password=uuid.uuid4().hex)
    api_token_create(user=user)
    env = _environment()
    for ttl, message in (("1000000000000000000", "is not a number of seconds"), ("0", "is not"), ("-5", "is not")):
        result = _manage("api_token_create", user.username, "--ttl", ttl, "--replace", env=env)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert ApiToken.objects.filter(user=user).count() == 1
    result = _manage("api_token_create", user.username, "--ttl", "3600", env=env)
    assert result.returncode == 0 and len(result.stdout.strip()) > 20, result.stderr

    user.is_active = False
    user.save(update_fields=["is_active"])
    result = _manage("api_token_create", user.username, env=env)
    assert result.returncode != 0 and "is inactive" in result.stderr


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ("webb=saga_default_web", "DATABASE_PROCESS_ROLES names no process webb: the processes are"),
        ("web=no_such_role_here", "names role(s) no_such_role_here, which PostgreSQL does not have"),
    ],
)
def test_migrate_refuses_process_roles_it_cannot_grant_before_it_migrates(
    db_access: None, roles: str, message: str
) -> None:
    """A misspelt process or a missing role stopped the grants halfway, with a traceback,
    after the migrations had run."""
    result = _manage("migrate", "--database", "orders", env=_environment(DATABASE_PROCESS_ROLES=roles))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
