"""Least authority for logins (issue 12, docs/SECURITY.md): what a customer is told of a
failure, and settings and Flower that are safe unless make run's local mode relaxes them.

(Which records a staff login may read or stop through the API: tests/test_api.py.)
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db.utils import OperationalError
from django.test import Client

from devstack import stack
from devstack.topology import BASE_DIR, Process, Topology, free_port, read_procfile, wait_for
from orders.failure_text import GENERIC_REASON, customer_reason, error_kind
from orders_project import security
from orders_project.celery import app
from payments.models import Payment
from saga.failure import saga_step_failed

from .api import Api, make_product

pytestmark = [
    pytest.mark.integration,
    # WhiteNoise, in this process's admin client: static files are served from the apps.
    pytest.mark.filterwarnings("ignore:No directory at:UserWarning"),
]

LOG_DIR = Path(os.environ.get("TEST_LOG_DIR", BASE_DIR / ".data" / "test-logs"))
# What a database error says: a host, a port, a role. Never for a customer's eyes.
INTERNAL_ERROR = (
    "connection to server at 10.20.30.40, port 5432 failed: FATAL: password authentication failed for user payments_svc"
)


# === Customer-facing text =============================================================


def _emails_about(order_id: str) -> list[str]:
    mail_dir = Path(settings.EMAIL_FILE_PATH)
    files = sorted(mail_dir.glob("*")) if mail_dir.is_dir() else []
    return [text for path in files if order_id in (text := path.read_text(errors="replace"))]


def test_a_customer_sees_a_fixed_reason_and_the_admin_the_raw_error(api: Api, sku: str) -> None:
    """A step fails with an exception whose text is internal (a database error): the API
    and the email give the fixed sentence for an unknown kind of failure, the admin's saga
    page the error itself."""
    make_product(sku, on_hand=5)
    placed = api.place_order([(sku, 1)], token="tok_slow")
    wait_for(
        lambda: Payment.objects.filter(order_id=placed["id"], status="pending").exists(),
        timeout=30,
        what="the charge to be in flight",
    )
    # The charge step fails for good with that error, as its worker would store it, and
    # the coordinator hears of it (saga.step_failed's service, in this process).
    task_id = str(uuid.uuid4())
    app.backend.mark_as_failure(task_id, OperationalError(INTERNAL_ERROR))
    saga_step_failed(saga_id=placed["saga"]["id"], step_name="charge_payment", task_id=task_id)

    order = api.wait_until_final(placed["id"])
    assert (order["status"], order["saga"]["status"]) == ("failed", "compensated")
    assert order["failure_reason"] == order["saga"]["failure_reason"] == GENERIC_REASON
    assert {s["name"]: s["last_error"] for s in order["saga"]["steps"]}["charge_payment"] == "InternalError"
    body = api.get(f"/api/orders/{placed['id']}/").text
    assert "10.20.30.40" not in body and "payments_svc" not in body and "OperationalError" not in body

    [email] = wait_for(lambda: _emails_about(placed["id"]), timeout=30, what="the failure email")
    assert f"We could not complete your order {placed['id']}: {GENERIC_REASON}." in email
    assert "10.20.30.40" not in email and "OperationalError" not in email

    # The operator's view keeps the error itself.
    operator = get_user_model().objects.create_user(
        username=f"operator-{uuid.uuid4().hex[:8]}", password=uuid.uuid4().hex, is_staff=True
    )
    operator.user_permissions.add(Permission.objects.get(content_type__app_label="saga", codename="view_sagainstance"))
    client = Client()
    client.force_login(operator)
    page = client.get(f"/admin/saga/sagainstance/{placed['saga']['id']}/change/")
    assert page.status_code == 200
    assert INTERNAL_ERROR in page.content.decode()
    assert "OperationalError" in page.content.decode()


def test_a_decline_is_told_in_its_own_words(api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)
    order = api.wait_until_final(api.place_order([(sku, 1)], token="tok_chargeDeclined")["id"])

    assert order["failure_reason"] == "your payment was declined"
    [email] = wait_for(lambda: _emails_about(order["id"]), timeout=30, what="the failure email")
    assert f"We could not complete your order {order['id']}: your payment was declined." in email
    assert "card_declined" not in email  # the raw error ("payment declined: card_declined") is the admin's


@pytest.mark.parametrize(
    ("failure_type", "reason"),
    [
        ("PaymentDeclined", "your payment was declined"),
        ("InsufficientStock", "there was not enough stock for an item you ordered"),
        ("PriceChanged", "a price changed since you ordered; nothing was charged"),
        ("CompensatedByOperator", "it was stopped by our staff"),
        # However the provider was unavailable, the customer is told the same.
        ("ProviderError", "our payment provider could not be reached"),
        ("CircuitOpen", "our payment provider could not be reached"),
        ("OperationalError", GENERIC_REASON),
        ("", GENERIC_REASON),
    ],
)
def test_one_fixed_sentence_per_kind_of_failure(failure_type: str, reason: str) -> None:
    assert customer_reason(failure_type) == reason


def test_a_steps_error_shows_its_kind_only() -> None:
    assert error_kind("PaymentDeclined: payment declined: card_declined") == "PaymentDeclined"
    assert error_kind(f"OperationalError: {INTERNAL_ERROR}") == "InternalError"
    assert error_kind("ProviderTimedOut: payment provider did not answer in time") == "GatewayUnavailable"
    assert error_kind("") == ""


# === Safe by default ==================================================================

# Settings as a fresh checkout has them: this package copied out, so that no .env of this
# working tree is read; the rest of the project is imported from where it is.
DEFAULTS_PROBE = """
import json, os
os.environ["DJANGO_SETTINGS_MODULE"] = "orders_project.settings"
import django
django.setup()
from django.conf import settings
from django.core.management import call_command
import orders_project
print(json.dumps({
    "package": orders_project.__file__,
    "DEBUG": settings.DEBUG,
    "NUM_PROXIES": settings.REST_FRAMEWORK["NUM_PROXIES"],
    "LOCAL_MODE": getattr(settings, "LOCAL_MODE", None),
    "SECURE_SSL_REDIRECT": settings.SECURE_SSL_REDIRECT,
}))
call_command("check", deploy=True, fail_level="WARNING")
"""


def _settings_in_a_clean_environment(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    shutil.copytree(
        BASE_DIR / "orders_project", tmp_path / "orders_project", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(BASE_DIR)]),
        **variables,
    }
    return subprocess.run(
        [sys.executable, "-c", DEFAULTS_PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_settings_default_to_production_and_pass_the_deploy_check_once_email_is_sent(tmp_path: Path) -> None:
    result = _settings_in_a_clean_environment(
        tmp_path, SECRET_KEY=secrets.token_urlsafe(50), EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout.splitlines()[0])
    assert seen.pop("package").startswith(str(tmp_path))
    assert seen == {"DEBUG": False, "NUM_PROXIES": 0, "LOCAL_MODE": False, "SECURE_SSL_REDIRECT": True}
    assert "System check identified no issues" in result.stdout + result.stderr
    assert "LOCAL MODE" not in result.stderr


def test_the_deploy_check_refuses_email_that_is_never_sent(tmp_path: Path) -> None:
    # The default file backend, which `make run` and the bench use, keeps every customer's
    # email on disk: fine on a laptop, a silent outage in production.
    result = _settings_in_a_clean_environment(tmp_path, SECRET_KEY=secrets.token_urlsafe(50))

    assert result.returncode != 0
    assert "notifications.W001" in result.stderr
    assert "writes each email to a file under EMAIL_FILE_PATH" in result.stderr
    assert "set EMAIL_BACKEND=django.core.mail.backends.smtp.EmailBackend" in result.stderr


def test_settings_refuse_the_public_secret_key_by_default(tmp_path: Path) -> None:
    result = _settings_in_a_clean_environment(tmp_path)

    assert result.returncode != 0
    assert "DEBUG is off but SECRET_KEY is unsafe: it is a public default from this repository" in result.stderr


def test_make_run_relaxes_debug_and_flower_for_its_own_processes_only() -> None:
    assert stack.local_mode_env({}) == {"LOCAL_MODE": "True", "DEBUG": "True"}
    assert stack.local_mode_env({"DEBUG": "False"}) == {"LOCAL_MODE": "True"}  # yours wins
    assert os.environ["DEBUG"] == "True" and "LOCAL_MODE" not in os.environ  # make test: DEBUG only


# --- Flower --------------------------------------------------------------------------


def _procfile_flower(env: dict[str, str], name: str) -> tuple[Process, str]:
    """Flower as the Procfile starts it (on 127.0.0.1), on a port of its own."""
    port = free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = Process(name, read_procfile()["flower"], LOG_DIR / f"{name}.log")
    process.log_path.unlink(missing_ok=True)
    process.start({**env, "FLOWER_PORT": str(port), "PATH": path})
    return process, f"http://127.0.0.1:{port}/"


def _answer(url: str) -> int | None:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.ConnectionError:
        return None


def test_flower_in_the_test_topology_refuses_to_run_without_a_login(topology: Topology) -> None:
    """The test topology is not make run: DEBUG on is no reason to open Flower (today it did)."""
    env = {k: v for k, v in topology.env.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "LOCAL_MODE")}
    flower, url = _procfile_flower(env, "flower-no-login")
    try:
        wait_for(
            lambda: flower.popen.poll() is not None or _answer(url) is not None,
            timeout=60,
            what="Flower to exit or answer",
        )
        assert _answer(url) is None, "Flower answered without a login"
        assert flower.popen.wait(30) != 0
        log = flower.log_path.read_text()
        assert "Flower refuses to start: Flower has no authentication: set FLOWER_BASIC_AUTH" in log, log
    finally:
        flower.stop()


def test_flower_in_make_runs_local_mode_needs_no_login_on_loopback(topology: Topology) -> None:
    env = {k: v for k, v in topology.env.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")}
    flower, url = _procfile_flower({**env, **stack.local_mode_env({})}, "flower-local-mode")
    try:
        wait_for(lambda: _answer(url) == 200, timeout=60, what="Flower to answer")
        # Flower's own API (which sends tasks) stays closed without a login: Flower's default.
        assert _answer(f"{url}api/workers") == 401
        assert "LOCAL MODE: " in flower.log_path.read_text()
    finally:
        flower.stop()


@pytest.mark.parametrize("read_only", ["", "false"])
def test_a_flower_login_monitors_and_controls_nothing_unless_told(topology: Topology, read_only: str) -> None:
    """Flower's API revokes any task id, even one not sent yet (a saga's refund of the next
    generation: `<saga>-refund_payment-g1`), terminates tasks, sends tasks and shuts
    workers down: a Flower login could hold back a chosen customer's refund. It runs read
    only unless FLOWER_READ_ONLY=false."""
    login = ("ops", secrets.token_urlsafe(16))
    env = {**topology.env, "FLOWER_BASIC_AUTH": ":".join(login)}
    if read_only:
        env["FLOWER_READ_ONLY"] = read_only
    flower, url = _procfile_flower(env, f"flower-read-only-{read_only or 'default'}")
    future = f"{uuid.uuid4()}-refund_payment-g1"
    try:
        wait_for(lambda: _answer(url) is not None, timeout=60, what="Flower to answer")
        assert requests.get(f"{url}api/workers", auth=login, timeout=10).status_code == 200
        revoke = requests.post(f"{url}api/task/revoke/{future}", auth=login, timeout=10)
        send = requests.post(f"{url}api/task/send-task/saga.sweep", json={}, auth=login, timeout=10)
        shutdown = requests.post(f"{url}api/worker/shutdown/nobody@nowhere", auth=login, timeout=10)
        if read_only:  # the controls on: the revoke goes out (sending a task answers 500: no result backend)
            assert revoke.status_code == 200, revoke.text
        else:
            assert [revoke.status_code, send.status_code, shutdown.status_code] == [403] * 3, (revoke.text, send.text)
    finally:
        flower.stop()
        # The allowed revoke is in every worker's memory until it restarts: a task id no
        # saga has, so nothing waits on it.


def test_a_flower_login_reads_no_password_from_a_workers_configuration(topology: Topology) -> None:
    """Flower's `/api/workers` (and its worker page's Config tab) shows each worker's `inspect
    conf`. Celery masks the broker's URL by the name `broker_url` only: our CELERY_BROKER_URL,
    the cache's and the breaker's Redis URLs were shown with their passwords
    (common.worker_control). A probe worker as the Procfile's run it, on a queue of its own,
    with passwords in those URLs (it connects to neither before a task needs it)."""
    import socket

    host = socket.gethostname()
    path = f"{Path(sys.executable).parent}{os.pathsep}{topology.env.get('PATH', '')}"
    probe = Process(
        "conf-probe",
        "celery -A orders_project worker -Q conf-probe -n conf-probe@%h --pool solo -l INFO --without-mingle",
        LOG_DIR / "conf-probe.log",
    )
    probe.log_path.unlink(missing_ok=True)
    unreachable = free_port()
    probe.start(
        {
            **topology.env,
            "PATH": path,
            "CACHE_URL": f"redis://:cachepw@127.0.0.1:{unreachable}/1",
            "PAYMENT_BREAKER_REDIS_URL": f"redis://breaker:breakerpw@127.0.0.1:{unreachable}/0",
        }
    )
    login = ("ops", secrets.token_urlsafe(16))
    flower, url = _procfile_flower({**topology.env, "FLOWER_BASIC_AUTH": ":".join(login)}, "flower-conf")
    try:
        wait_for(
            lambda: app.control.inspect(destination=[f"conf-probe@{host}"], timeout=1.0).ping(),
            timeout=60,
            what="the probe worker to answer",
        )
        wait_for(lambda: _answer(url) is not None, timeout=60, what="Flower to answer")

        def workers() -> str | None:
            response = requests.get(
                f"{url}api/workers", params={"refresh": "1", "workername": f"conf-probe@{host}"}, auth=login, timeout=10
            )
            return response.text if response.status_code == 200 and "CACHE_URL" in response.text else None

        shown = wait_for(workers, timeout=30, what="Flower to show the probe worker's configuration")
        assert "cachepw" not in shown and "breakerpw" not in shown
        assert f"redis://breaker:********@127.0.0.1:{unreachable}/0" in shown  # where it is, still
    finally:
        flower.stop()
        probe.stop()


def test_a_flower_login_cannot_move_a_worker_onto_another_services_queue(topology: Topology) -> None:
    """Flower's "add consumer" (the control command it sends): the notifications worker on
    the payments queue discarded every charge as a task it does not register, and each such
    saga waited for its step's deadline (common.worker_control)."""
    import socket

    node = f"notifications@{socket.gethostname()}"
    [reply] = app.control.add_consumer("payments", destination=[node], reply=True, timeout=5)
    assert "refused" in reply[node]["error"], reply
    [queues] = (app.control.inspect(destination=[node], timeout=5).active_queues() or {}).values()
    assert [q["name"] for q in queues] == ["notifications"]
    # Its own queue again is still allowed (a no-op while it consumes it).
    [reply] = app.control.add_consumer("notifications", destination=[node], reply=True, timeout=5)
    assert "ok" in reply[node], reply


@pytest.mark.parametrize(
    ("argv", "environ", "refused"),
    [
        (["celery", "-A", "orders_project", "flower", "--address=127.0.0.1"], {}, False),
        (["celery", "-A", "orders_project", "flower", "--address", "::1"], {}, False),
        (["celery", "-A", "orders_project", "flower"], {"FLOWER_ADDRESS": "localhost"}, False),
        (["celery", "-A", "orders_project", "flower", "--address=0.0.0.0"], {}, True),
        (["celery", "-A", "orders_project", "flower", "--address=127.0.0.1"], {"FLOWER_ADDRESS": "0.0.0.0"}, False),
        (["celery", "-A", "orders_project", "flower"], {"FLOWER_ADDRESS": "0.0.0.0"}, True),
        (["celery", "-A", "orders_project", "flower"], {}, True),  # Flower's default: every interface
        (["celery", "-A", "orders_project", "flower", "--unix-socket=/tmp/f.sock"], {}, True),
    ],
)
def test_local_mode_opens_flower_on_loopback_only(argv: list[str], environ: dict[str, str], refused: bool) -> None:
    assert (security.flower_auth_problem(argv, environ, local_mode=True) is not None) == refused
    # Outside local mode, none of these runs without a login.
    assert security.flower_auth_problem(argv, environ, local_mode=False) is not None


def test_settings_refuse_a_bulk_limit_the_admins_confirmation_cannot_post(tmp_path: Path) -> None:
    result = _settings_in_a_clean_environment(
        tmp_path, SECRET_KEY=secrets.token_urlsafe(50), SAGA_BULK_RETRY_LIMIT="1000"
    )

    assert result.returncode != 0
    assert "SAGA_BULK_RETRY_LIMIT=1000 must be 1 to 900" in result.stderr
