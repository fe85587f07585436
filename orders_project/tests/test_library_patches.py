"""Each patch of a library's internals, against the library as installed.

For each patch: the version it was written for is the one requirements.txt pins and the
one installed (apply() refuses any other), and the upstream bug it works around is still
there. When an upgrade brings the upstream fix, the last test fails: remove the patch
(and this test) then.
"""

import inspect
import pickle
import re
import threading
import traceback
import uuid
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from billiard import einfo
from celery import Celery
from celery.app.trace import build_tracer
from celery.worker import request as worker_request
from celery.worker import state as worker_state
from django.conf import settings
from kombu.transport import redis as kombu_redis
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.exceptions import ConnectionError as RedisConnectionError

from common import billiard_fixes, celery_fixes, kombu_fixes
from orders_project import telemetry
from orders_project.celery import app

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"


def pinned(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}(\[[a-z,]+\])?==(\S+)$", REQUIREMENTS.read_text(), re.MULTILINE)
    assert match, f"{package} is not pinned in requirements.txt"
    return match[2]


@pytest.mark.parametrize(
    ("package", "patched"),
    [
        ("kombu", kombu_fixes.PATCHED_VERSION),
        ("billiard", billiard_fixes.PATCHED_VERSION),
        ("celery", celery_fixes.PATCHED_VERSION),
        ("opentelemetry-instrumentation-celery", telemetry.PATCHED_CELERY_INSTRUMENTATION),
    ],
)
def test_each_patch_is_for_the_pinned_and_installed_release(package: str, patched: str) -> None:
    assert pinned(package) == metadata.version(package) == patched


def test_the_kombu_patch_refuses_another_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kombu_fixes, "PATCHED_VERSION", "0.0.1")
    with pytest.raises(RuntimeError, match="celery/kombu#582"):
        kombu_fixes.apply()


def _torn_down_channel() -> kombu_redis.Channel:
    # A channel whose broker connection was torn down: kombu's Transport drops `client`.
    channel = object.__new__(kombu_redis.Channel)
    channel.connection = SimpleNamespace(client=None, default_port=6379)
    return channel


def test_the_kombu_patch_reports_a_torn_down_connection_as_a_connection_error() -> None:
    with pytest.raises(RedisConnectionError):
        kombu_fixes._connparams_of_a_live_connection(_torn_down_channel())


def test_upstream_kombu_still_raises_attribute_error_on_a_torn_down_connection() -> None:
    """celery/kombu#582. When this fails, kombu raises something it handles: remove
    common/kombu_fixes.py and this test."""
    with pytest.raises(AttributeError, match="hostname"):
        kombu_fixes.upstream_connparams(_torn_down_channel())


def _channel_on(pool: redis.ConnectionPool) -> kombu_redis.Channel:
    channel = object.__new__(kombu_redis.Channel)
    channel.Client = redis.Redis
    channel._pool = pool
    channel._async_pool = pool
    return channel


def test_the_kombu_patch_builds_one_client_per_pool_of_a_channel() -> None:
    pool = redis.ConnectionPool()  # connects on a command's first use: none is sent here
    channel = _channel_on(pool)
    first = kombu_fixes._create_client_once_per_pool(channel)
    assert kombu_fixes._create_client_once_per_pool(channel) is first
    assert first.connection_pool is pool
    # kombu drops its pools when the connection closes; the next command gets a new pool.
    channel._pool = redis.ConnectionPool()
    again = kombu_fixes._create_client_once_per_pool(channel)
    assert again is not first
    assert again.connection_pool is channel._pool
    # The event loop's asynchronous client is kombu's own, one per call as before.
    one, two = (kombu_fixes._create_client_once_per_pool(channel, asynchronous=True) for _ in range(2))
    assert one is not two


@pytest.mark.skipif(not settings.CELERY_BROKER_URL.startswith("redis"), reason="a patch of the Redis transport")
def test_messages_through_the_broker_build_one_redis_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing, reading and acknowledging 20 messages through the app's own broker
    connection: kombu alone builds a client for every one of those commands."""
    built = []
    upstream_init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(self)
        upstream_init(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    name = f"test-library-patches-{uuid.uuid4()}"
    with app.connection_for_write() as connection, connection.SimpleQueue(name) as queue:
        for number in range(20):
            queue.put({"n": number})
        received = []
        for _ in range(20):
            message = queue.get(timeout=5)
            received.append(message.payload["n"])
            message.ack()
        queue.queue.delete()
    assert received == list(range(20))
    assert len(built) <= 3, f"{len(built)} Redis clients for 20 messages"


def test_upstream_redis_still_builds_its_callback_table_in_every_client() -> None:
    """redis/redis-py#3624 (and its pull request #4124): every `Redis()` builds the
    response-callback table anew. When this fails, a client costs little to build: remove
    `_create_client_once_per_pool` from common/kombu_fixes.py and these tests."""
    source = inspect.getsource(redis.Redis.__init__)
    assert "CaseInsensitiveDict(" in source
    assert "get_response_callbacks(" in source


def test_upstream_celery_instrumentation_still_ends_an_unregistered_tasks_publish_span_before_the_publish() -> None:
    """open-telemetry/opentelemetry-python-contrib#609 and the anonymous-task support of
    #1407: the publish span of a task the publishing process does not register (how this
    system calls every other service) is kept by nothing, so it ends as the before-publish
    hook returns, before the message is sent. When this fails, upstream keeps it until
    after the publish: remove our publish hooks (orders_project.telemetry) and this test.

    Run in a thread of its own, so that whatever context the hooks leave stays there.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The instrumentor is a process-wide singleton: call its hooks on a stand-in instead.
    instrumentor = SimpleNamespace(_tracer=provider.get_tracer(__name__))
    name = "upstream_probe.not_registered_here"
    seen: dict[str, object] = {}

    def publish() -> None:
        headers = {"id": "probe-task-id", "task": name}
        CeleryInstrumentor._trace_before_publish(instrumentor, sender=name, headers=headers, body=None)
        # Here the message would be sent.
        seen["ended_before_the_publish"] = [span.name for span in exporter.get_finished_spans()]
        seen["traceparent"] = headers.get("traceparent")
        CeleryInstrumentor._trace_after_publish(sender=name, headers=headers, body=None)
        seen["current_after"] = trace.get_current_span()

    thread = threading.Thread(target=publish)
    thread.start()
    thread.join(timeout=10)

    assert not thread.is_alive()
    assert seen["traceparent"]  # the message still carries the context
    assert seen["ended_before_the_publish"] == [f"apply_async/{name}"]
    assert len(exporter.get_finished_spans()) == 1
    assert not seen["current_after"].get_span_context().is_valid  # type: ignore[attr-defined]


def test_the_billiard_patch_refuses_another_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(billiard_fixes, "PATCHED_VERSION", "0.0.1")
    with pytest.raises(RuntimeError, match="celery/celery#8882"):
        billiard_fixes.apply()


def _failure_as_a_pool_process_reports_it() -> einfo.ExceptionInfo:
    """The ExceptionInfo a prefork pool process sends its main process for a task that
    raised: through Celery's own tracer, as in a worker (no result backend)."""
    probe = Celery("billiard-patch-probe", set_as_current=False)

    @probe.task(name="probe.fails", ignore_result=True)
    def fails() -> None:
        raise ValueError("declined, say")

    tracer = build_tracer(fails.name, fails, app=probe, eager=False, propagate=False)
    report = tracer("probe-task-id", (), {}, request={"id": "probe-task-id", "delivery_info": {}})[0]
    assert isinstance(report, einfo.ExceptionInfo)
    return report


def test_a_failed_tasks_report_is_small_and_reads_the_same() -> None:
    """What a failure costs to send to the worker's main process (pickled through the pool's
    pipe), and the traceback it shows there: the same text, carets included."""
    report = _failure_as_a_pool_process_reports_it()
    sent = pickle.dumps(report)
    received = pickle.loads(sent)
    # 2.5 KB here (32 KB unpatched; a saga step's decline, a few frames deeper: 4.9 against 57).
    assert len(sent) < 8_000, f"{len(sent)} bytes for one failure"
    shown = "".join(traceback.format_exception(received.type, received.exception, received.tb))
    assert shown == report.traceback
    assert "^^^" in shown  # the column of the failing call: one position kept per frame
    # A copy of the copy (billiard copies a received traceback again) shows the same frames.
    again = einfo.ExceptionInfo((received.type, received.exception, received.tb))
    assert traceback.format_tb(again.tb) == traceback.format_tb(received.tb)


def test_without_the_billiard_patch_a_failed_tasks_report_is_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement the bound above guards (checks that it can fail)."""
    monkeypatch.setattr(einfo._Code, "__init__", billiard_fixes.upstream_code_init)
    monkeypatch.setattr(einfo.Traceback, "__init__", billiard_fixes.upstream_traceback_init)
    assert len(pickle.dumps(_failure_as_a_pool_process_reports_it())) > 24_000


def test_upstream_billiard_still_copies_every_position_of_a_failed_frames_code() -> None:
    """celery/celery#8882. When this fails, billiard keeps less than every position: remove
    common/billiard_fixes.py and the tests of it."""
    code = build_tracer.__code__
    copy = object.__new__(einfo._Code)
    billiard_fixes.upstream_code_init(copy, code)
    assert len(copy._co_positions) == len(list(code.co_positions())) > 100


class HeldRequest:
    """What `celery.worker.state` keeps of a request: its id (weak references to it too)."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id


def _a_retry_scheduled_before_its_first_attempt_ends(task_ready: Any) -> tuple[HeldRequest, HeldRequest]:
    """The order a worker sees them in: the attempt is taken, the retry it published arrives
    (countdown: scheduled), then the attempt ends (`task_ready`)."""
    task_id = f"retry-probe-{uuid.uuid4()}"
    attempt, retry = HeldRequest(task_id), HeldRequest(task_id)
    worker_state.task_reserved(attempt)
    worker_state.task_scheduled(retry)
    task_ready(attempt)
    return attempt, retry


def test_a_retry_waiting_out_its_countdown_stays_registered() -> None:
    """What `query_task` answers from: the retry, scheduled, under its task id."""
    attempt, retry = _a_retry_scheduled_before_its_first_attempt_ends(worker_request.task_ready)
    try:
        assert worker_state.requests.get(retry.id) is retry
        assert retry in worker_state.scheduled_requests and attempt not in worker_state.reserved_requests
        # When the retry ends in turn, its id is unregistered as before.
        worker_state.task_ready(retry, successful=True)
        assert retry.id not in worker_state.requests and retry.id in worker_state.successful_requests
    finally:
        worker_state.requests.pop(retry.id, None)


def test_the_celery_patch_is_where_a_worker_calls_task_ready() -> None:
    assert worker_state.task_ready is worker_request.task_ready is celery_fixes.task_ready_own_request
    assert celery_fixes.task_ready_own_request in (worker_request.create_request_cls.__defaults__ or ())
    assert celery_fixes.upstream_task_ready not in (worker_request.create_request_cls.__defaults__ or ())


def test_the_celery_patch_refuses_another_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(celery_fixes, "PATCHED_VERSION", "0.0.1")
    with pytest.raises(RuntimeError, match=r"patches celery 0\.0\.1, not 5\.7\.0"):
        celery_fixes.apply()


def test_upstream_task_ready_still_unregisters_the_retry_its_attempt_published() -> None:
    """When this fails, Celery keeps a retry registered: remove common/celery_fixes.py and
    the tests of it."""
    _, retry = _a_retry_scheduled_before_its_first_attempt_ends(celery_fixes.upstream_task_ready)
    try:
        assert retry.id not in worker_state.requests
    finally:
        worker_state.scheduled_requests.discard(retry)
