"""Settings for every process (web, workers, beat, Flower), driven by the environment.

Every variable is documented in docs/CONFIGURATION.md and `.env.example`.
Local defaults point at the servers `make run` starts (or the ones you name);
nothing here exists only in production.
"""

import os
import sys
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from orders_project import security

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A developer's .env is read when present; real environment variables win. Then the URLs
# of the embedded servers `make run` started (devstack writes them), so that `manage.py`
# in this checkout reaches the servers `make run` uses; .env and the environment win.
for _env_file in (BASE_DIR / ".env", Path(os.environ.get("DEVSTACK_ENV_FILE", BASE_DIR / ".data" / "devstack.env"))):
    if _env_file.is_file():
        environ.Env.read_env(_env_file, overwrite=False)

# Safe by default: production settings unless configured otherwise. `make run` (devstack)
# sets DEBUG=True and LOCAL_MODE=True for its own processes; `make test` sets DEBUG=True.
DEBUG = env.bool("DEBUG", default=False)
# make run's local mode: Flower may run without a login, on a loopback address only.
LOCAL_MODE = env.bool("LOCAL_MODE", default=False)
# The local default is public. With DEBUG off, a public or weak key stops the process at
# start-up; a relaxed process says so (common.apps). docs/SECURITY.md.
SECRET_KEY = env.str("SECRET_KEY", default="insecure-local-only-key-change-me")
# Old keys still accepted for signatures while you rotate SECRET_KEY (comma-separated).
SECRET_KEY_FALLBACKS = env.list("SECRET_KEY_FALLBACKS", default=[])
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
if not DEBUG:
    security.require_production_secrets(secret_key=SECRET_KEY, fallbacks=SECRET_KEY_FALLBACKS)
# Flower needs a login everywhere but in make run's local mode on 127.0.0.1.
security.require_flower_auth(sys.argv, os.environ, local_mode=LOCAL_MODE)

# --- HTTPS (DEBUG off): behind a TLS-terminating proxy -------------------------------
# https://docs.djangoproject.com/en/5.2/howto/deployment/checklist/#https
# The proxy terminates TLS and must set X-Forwarded-Proto (and drop a client's own);
# Django then knows a request was HTTPS, redirects plain HTTP, and sends HSTS.
_PRODUCTION = not DEBUG
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("TRUST_X_FORWARDED_PROTO", default=_PRODUCTION) else None
)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=_PRODUCTION)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if _PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=_PRODUCTION)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=_PRODUCTION)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=_PRODUCTION)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=_PRODUCTION)
# Origins allowed to POST with a session (admin) when the proxy's host differs, e.g.
# https://shop.example.com (comma-separated, with scheme).
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    # First, so that its `createsuperuser` (Django's, plus password validation with
    # --noinput) replaces Django's own.
    "common",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_celery_results",
    "django_celery_beat",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "orders",
    "saga",
    "inventory",
    "payments",
    "notifications",
    # The operator's cross-service checks (`manage.py saga_audit`); no models.
    "audit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "orders_project.urls"
WSGI_APPLICATION = "orders_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Databases: one per service (ARCHITECTURE.md "Databases") -------------------------
_LOCAL_PG = "postgres://postgres@127.0.0.1:5432"
_DB_OPTIONS = {
    # Workers and web keep connections between tasks/requests. Before each task and each
    # request the connections the server has closed (a PostgreSQL restart) are dropped
    # (orders_project.db_health: a poll() each, no round trip), so they are replaced, not
    # failed on. Django's own health check (a `SELECT 1` per database per request) is
    # there for networks that cut connections silently: DB_CONN_HEALTH_CHECKS=True.
    "CONN_MAX_AGE": env.int("DB_CONN_MAX_AGE", default=60),
    "CONN_HEALTH_CHECKS": env.bool("DB_CONN_HEALTH_CHECKS", default=False),
}


# The hot path's few long statements (a step's key, checks and effect in one) run prepared
# (common.sql.prepared): PostgreSQL parses and plans each once per connection. Django leaves
# psycopg's prepare_threshold at None, which refuses even an explicit prepare; a threshold
# that is never reached lets the explicit ones through and prepares nothing else (Django's
# own cursors bind on the client and are never prepared). Behind a pooler in transaction
# mode without prepared-statement support (PgBouncer before 1.21), set
# DB_PREPARED_STATEMENTS=False.
_PREPARED_STATEMENTS = env.bool("DB_PREPARED_STATEMENTS", default=True)


def _database(var: str, default_name: str) -> dict:
    config = env.db_url(var, default=f"{_LOCAL_PG}/{default_name}")
    config.update(_DB_OPTIONS)
    if _PREPARED_STATEMENTS:
        config.setdefault("OPTIONS", {}).setdefault("prepare_threshold", 2**31 - 1)
    return config


DATABASES = {
    "default": _database("DATABASE_URL", "saga_default"),
    "orders": _database("ORDERS_DATABASE_URL", "saga_orders"),
    "inventory": _database("INVENTORY_DATABASE_URL", "saga_inventory"),
    "payments": _database("PAYMENTS_DATABASE_URL", "saga_payments"),
    "notifications": _database("NOTIFICATIONS_DATABASE_URL", "saga_notifications"),
}
DATABASE_ROUTERS = ["orders_project.db_routers.ServiceRouter"]
CELERY_SERVICE = env.str("CELERY_SERVICE", default="")
# Least privilege (orders_project.db_roles): a process logs in to every database as the role
# of its job, DATABASE_LOGIN ("role:password"), which the Procfile sets per process (compose
# writes the role into each URL instead). "none": no database credentials at all (Flower).
# Unset: each URL as given (manage.py and `migrate`: each database's owner). docs/SECURITY.md.
DATABASE_LOGIN = env.str("DATABASE_LOGIN", default="")
if DATABASE_LOGIN == "none":
    DATABASES = {}  # Django's dummy backend: any query fails
elif DATABASE_LOGIN:
    _user, _, _password = DATABASE_LOGIN.partition(":")
    for _config in DATABASES.values():
        _config.update(USER=_user, PASSWORD=_password)
# The PostgreSQL role of each process role (web=...,beat=...,orders_worker=...): `migrate`
# grants each what it needs on the tables of the database it migrates.
DATABASE_PROCESS_ROLES = env.dict("DATABASE_PROCESS_ROLES", default={})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
    # Not a check: a changed password revokes the user's API tokens.
    {"NAME": "common.tokens.RevokeTokensOnPasswordChange"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve admin assets straight from the apps, so `make run` needs no collectstatic.
WHITENOISE_USE_FINDERS = True

# --- REST framework -------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: DRF takes the WWW-Authenticate header from the first class, and
    # that is what turns an anonymous call into 401 rather than 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "common.tokens.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    # JSON only, at most DATA_UPLOAD_MAX_MEMORY_SIZE bytes (413 beyond).
    "DEFAULT_PARSER_CLASSES": ["common.drf.JSONParser"],
    "EXCEPTION_HANDLER": "common.drf.exception_handler",
    # limit/offset, strictly validated (400), limit at most API_MAX_PAGE_SIZE.
    "DEFAULT_PAGINATION_CLASS": "common.drf.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Per-user (or per-IP when anonymous) rates of the views that declare a throttle_scope,
    # counted in the shared cache so that every gunicorn worker sees the same counts.
    "DEFAULT_THROTTLE_RATES": {
        "order_create": security.rate_setting("ORDER_CREATE_RATE", env.str("ORDER_CREATE_RATE", default="30/minute")),
        "auth_token": security.rate_setting("AUTH_TOKEN_RATE", env.str("AUTH_TOKEN_RATE", default="10/minute")),
    },
    # Proxies in front that append to X-Forwarded-For: an anonymous client is then told
    # apart by the address the last of them saw. 0 (the default: trust no such header) uses
    # the connection's own address; anything more, with no proxy that overwrites the
    # header, lets a client pick its own address and dodge the per-client limits.
    "NUM_PROXIES": env.int("NUM_PROXIES", default=0),
}

# Who may see an order, asked by the payments' and notifications' `?order=` filter
# (common.api.order_filter). The orders service answers it; named here, where the project
# puts its services together, because `common` may not import a service (pyproject.toml,
# [tool.importlinter]).
ORDER_VISIBLE = "orders.selectors.order_visible"

# How long an API token works after it is issued (seconds; docs/SECURITY.md).
API_TOKEN_TTL = env.int("API_TOKEN_TTL", default=30 * 24 * 3600)

# --- Input limits (a clear 400 or 413, never a 500) -----------------------------------
ORDER_MAX_LINES = env.int("ORDER_MAX_LINES", default=50)
ORDER_MAX_QUANTITY = env.int("ORDER_MAX_QUANTITY", default=1000)
# Largest request body, in bytes: Django's own setting, also enforced on API bodies
# (a 413: common.drf.exception_handler). An order of ORDER_MAX_LINES lines is a few KB.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=64 * 1024)
API_MAX_PAGE_SIZE = env.int("API_MAX_PAGE_SIZE", default=200)

# --- OpenAPI schema (/api/schema/) and Swagger UI (/api/docs/), served locally ------
SPECTACULAR_SETTINGS = {
    "TITLE": "Order saga API",
    "DESCRIPTION": "Place orders that run as sagas across the inventory, payments, orders and "
    "notifications services. Authenticate with `Authorization: Token <key>` (POST /api/auth/token/).",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI's JavaScript and CSS come from the drf-spectacular-sidecar package, served
    # by this app (WhiteNoise): no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # `check --deploy` also generates the schema and fails on its warnings.
    "ENABLE_DJANGO_DEPLOY_CHECK": True,
}

# --- Celery (ARCHITECTURE.md "Celery facts that shape the design") --------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
# django-celery-results' backend ("django-db"), retrying a write or read whose connection
# PostgreSQL closed (orders_project.result_backend, issue 15). The coordinator reads each
# failed step's exception from here: a lost write is a failure only the sweeper finds.
# A dead connection is replaced at once; a server still down is waited for about 3 s on
# average (at most ~6.5 s, below the soft time limit), then the write fails as before.
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#result-backend-always-retry
CELERY_RESULT_BACKEND = "orders_project.result_backend:DatabaseBackend"
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True
CELERY_RESULT_BACKEND_MAX_RETRIES = env.int("CELERY_RESULT_BACKEND_MAX_RETRIES", default=8)
CELERY_RESULT_BACKEND_BASE_SLEEP_BETWEEN_RETRIES_MS = 20
CELERY_RESULT_BACKEND_MAX_SLEEP_BETWEEN_RETRIES_MS = 2000
CELERY_RESULT_EXTENDED = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
# At-least-once: a message is acknowledged after its task ran, and comes back when
# the worker process running it dies. Every task is idempotent, so that is safe.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A pool process is replaced, between tasks, once its resident memory passes this many KiB.
# Payments' processes grow with every failed task (a decline: Celery formats and stores its
# traceback) and the memory is not handed back (BENCHMARKS.md, "Memory"); this bounds them.
# A fresh process starts at about 100 MiB.
CELERY_WORKER_MAX_MEMORY_PER_CHILD = env.int("CELERY_WORKER_MAX_MEMORY_PER_CHILD", default=200_000)
# Steps report progress to the saga by message; only failures need the result backend
# (the saga's errback reads the exception from it).
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_STORE_ERRORS_EVEN_IF_IGNORED = True
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=20)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=25)
# Longest countdown between two retries of a step (exponential backoff with jitter).
TASK_RETRY_BACKOFF_MAX = env.int("TASK_RETRY_BACKOFF_MAX", default=15)
# Redis: a message whose worker vanished is redelivered after the visibility timeout, so it
# bounds how long a SIGKILLed worker's task stays away. It must exceed the longest time a
# worker holds a message unacknowledged (hard time limit + a retry's countdown, which the
# worker holds as an ETA message), or a slow task is delivered twice; and it must be the
# same in every process (all read this setting).
# https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout
CELERY_VISIBILITY_TIMEOUT = env.int("CELERY_VISIBILITY_TIMEOUT", default=60)
if CELERY_VISIBILITY_TIMEOUT <= CELERY_TASK_TIME_LIMIT + TASK_RETRY_BACKOFF_MAX:
    raise ImproperlyConfigured(
        f"CELERY_VISIBILITY_TIMEOUT ({CELERY_VISIBILITY_TIMEOUT}s) must exceed CELERY_TASK_TIME_LIMIT "
        f"+ TASK_RETRY_BACKOFF_MAX ({CELERY_TASK_TIME_LIMIT + TASK_RETRY_BACKOFF_MAX}s)"
    )
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_VISIBILITY_TIMEOUT,
    # Look for abandoned messages every 2 s (kombu's default sweep is every 100 s).
    "unacked_restore_interval": 2,
    "unacked_restore_throttle": 1,
    # One list per queue (no priority sub-lists: nothing here sets a priority), so a worker
    # takes its message with BLMOVE into a list the watchdog can return it from, never
    # holding it only in its own memory (common.kombu_fixes, "A message a worker takes").
    "priority_steps": [0],
}
# RabbitMQ (README "Several hosts"): the queues survive a broker restart and a node's loss,
# and a publish returns only once the broker has the message.
# - CELERY_QUEUE_TYPE: `quorum` (the default on amqp; RabbitMQ 3.8 or newer) replicates each
#   queue over the cluster's nodes; `classic` keeps plain durable queues, for an older server
#   or a vhost whose classic queues are still in use (a queue's type cannot change in place:
#   drain and delete the five queues, or use a new vhost, before switching). Celery then
#   uses per-consumer QoS (quorum queues have no global QoS; worker_detect_quorum_queues).
#   The queues keep their direct exchanges, so a retry's countdown is held by the worker
#   that will run it, where the sweeper's broadcast sees it (saga.recovery), not parked in
#   native delayed delivery's broker queues, where no worker holds it and the sweeper would
#   take a retry waiting out its countdown for a lost message. kombu notes that choice at
#   each worker's start; Celery's same warning at each countdown is filtered (LOGGING).
#   The cost: per-consumer QoS cannot grow while a worker holds retries, so a worker whose
#   every slot holds one waits out their countdowns (TASK_RETRY_BACKOFF_MAX at most) before
#   it takes another message; the queue's other replicas take it meanwhile.
# - confirm_publish: py-amqp waits for the broker's ack of every publish (a refused or
#   unroutable publish raises instead of vanishing), at a round trip per message.
# Ignored on Redis, whose queues are lists of the one server.
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-default-queue-type
# https://www.rabbitmq.com/docs/quorum-queues
_AMQP = CELERY_BROKER_URL.startswith(("amqp://", "amqps://", "pyamqp://"))
CELERY_QUEUE_TYPE = env.str("CELERY_QUEUE_TYPE", default="quorum" if _AMQP else "classic")
if CELERY_QUEUE_TYPE not in ("classic", "quorum"):
    raise ImproperlyConfigured(f"CELERY_QUEUE_TYPE must be classic or quorum, not {CELERY_QUEUE_TYPE!r}")
CELERY_TASK_DEFAULT_QUEUE_TYPE = CELERY_QUEUE_TYPE
CELERY_TASK_CREATE_MISSING_QUEUE_TYPE = CELERY_QUEUE_TYPE
if _AMQP:
    CELERY_BROKER_TRANSPORT_OPTIONS["confirm_publish"] = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker whose broker went away tries again every BROKER_RECONNECT_SECONDS, where Celery's
# consumer waits 2, 4, 6, ... up to 30 s between attempts (common.worker_consumer).
CELERY_WORKER_CONSUMER = "common.worker_consumer:Consumer"
BROKER_RECONNECT_SECONDS = env.float("BROKER_RECONNECT_SECONDS", default=1.0)
if BROKER_RECONNECT_SECONDS <= 0:
    raise ImproperlyConfigured(f"BROKER_RECONNECT_SECONDS must be positive, not {BROKER_RECONNECT_SECONDS}")
# Publishing (the next chain step, a progress report, a retry) rides through a broker
# restart of a few seconds instead of failing the task that publishes.
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-publish-retry-policy
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup closes every database connection before and after every task
# unless this is set, so each task paid a new PostgreSQL connection per database it used
# (a backend fork and authentication: the largest single cost in BENCHMARKS.md). With it,
# connections live by CONN_MAX_AGE and CONN_HEALTH_CHECKS, checked around every task by
# Django's own close_old_connections (orders_project.celery), as a web request is.
CELERY_DB_REUSE_MAX = 1_000_000_000
CELERY_TASK_ROUTES = {
    "orders.*": {"queue": "orders"},
    "saga.*": {"queue": "saga"},
    "inventory.*": {"queue": "inventory"},
    "payments.*": {"queue": "payments"},
    "notifications.*": {"queue": "notifications"},
    "celery.*": {"queue": "saga"},
}
CELERY_TASK_DEFAULT_QUEUE = "saga"
CELERY_BEAT_SCHEDULER = "orders_project.beat:ThrottledDatabaseScheduler"

# --- Saga definitions (issue 14: deploy while sagas run) -----------------------------
# The saga definitions this deployment can run, as dotted paths of SagaDefinition objects,
# the same in every process. New sagas start on the newest version of each name; a saga
# runs to its end on the version it started with, so a version stays here until
# `manage.py saga_versions` shows no unfinished saga on it (docs/OPERATIONS.md, "Changing a saga").
# The coordinator's processes refuse to start, and `migrate` refuses to run, without it.
SAGA_DEFINITIONS = env.list("SAGA_DEFINITIONS", default=["orders.saga.PLACE_ORDER"])

# --- Saga recovery (the coordinator's own watchdog) ----------------------------------
# A running step that has not reported back by its deadline is re-published (safe: steps
# are idempotent) up to SAGA_REPUBLISH_BUDGET times, each time with a doubled deadline;
# then the saga compensates (before the pivot) or needs an operator (after it).
SAGA_STEP_TIMEOUT = env.int("SAGA_STEP_TIMEOUT", default=30)
SAGA_REPUBLISH_BUDGET = env.int("SAGA_REPUBLISH_BUDGET", default=3)
# Every 2 s; when nothing is stalled it is one index scan. (A SIGKILLed worker's messages
# are returned by every worker's watchdog, SAGA_ORPHAN_INTERVAL below, not by the sweep.)
SAGA_SWEEP_INTERVAL = env.float("SAGA_SWEEP_INTERVAL", default=2.0)
if SAGA_SWEEP_INTERVAL < 1 or not SAGA_SWEEP_INTERVAL.is_integer():
    # Beat keeps its schedule in django-celery-beat's IntervalSchedule, whose `every` is an
    # integer: 0.5 was stored as 0, and beat sent a sweep on every tick, flooding the saga
    # queue (2.5 would silently have been 2).
    raise ImproperlyConfigured(
        f"SAGA_SWEEP_INTERVAL must be a whole number of seconds, at least 1, not {SAGA_SWEEP_INTERVAL:g}: "
        "celery beat's database schedule counts whole seconds"
    )
SAGA_SWEEP_BATCH = env.int("SAGA_SWEEP_BATCH", default=200)
# A running step no progress was recorded for in this long is looked for before its
# deadline (saga.sweeper._quiet_steps_look): if its chain's message is nowhere (no queue
# on its way holds it, no live worker has it), the deadline is brought to now and the
# next sweep judges it as any stalled step. A lost message then costs seconds, not its
# segment's deadline. Longer than a Redis watchdog's return of a killed worker's
# messages (SAGA_ORPHAN_GRACE + 2 * SAGA_ORPHAN_CONFIRM + SAGA_ORPHAN_INTERVAL): those are
# not lost. 0 turns the early look off.
SAGA_QUIET_SECONDS = env.float("SAGA_QUIET_SECONDS", default=10.0)
# Once a publish has failed this long, the process publishes nothing else (the sweeper
# takes over those chains) and asks the broker this often whether it is back (saga.broker_latch).
SAGA_BROKER_PROBE_SECONDS = env.float("SAGA_BROKER_PROBE_SECONDS", default=1.0)
# How long one publish of a saga's chain retries a broker that is away before the sweeper
# takes it over (saga.publish._RideOut): longer than a broker restart (RabbitMQ's queues
# answered 7.5 s after its stop in `make chaos`), far shorter than Celery's own policy
# (36 s after a connection broke), which held a web thread as long.
SAGA_PUBLISH_RIDE_OUT_SECONDS = env.float("SAGA_PUBLISH_RIDE_OUT_SECONDS", default=10.0)
# How the sweeper tells a stalled step's lost message from a slow one (saga.recovery):
# how long it waits for the workers to say which tasks they hold; how far apart two
# clocks (the coordinator's and a publisher's) may be; how many segment deadlines a step
# may wait behind a queue whose oldest message is unknown (AMQP, when no live worker has
# taken from it yet) or never moves (its worker gone) before it is re-published anyway.
SAGA_INSPECT_TIMEOUT = env.float("SAGA_INSPECT_TIMEOUT", default=1.0)
SAGA_CLOCK_SLACK = env.float("SAGA_CLOCK_SLACK", default=3.0)
SAGA_BACKLOG_PATIENCE = env.float("SAGA_BACKLOG_PATIENCE", default=3.0)
# Redis: a message taken by a worker and not acknowledged for SAGA_ORPHAN_GRACE seconds,
# which no live worker claims in two looks SAGA_ORPHAN_CONFIRM seconds apart, is returned
# to its queue (its worker died), long before the visibility timeout would return it. Every
# worker's watchdog thread looks (one look per SAGA_ORPHAN_INTERVAL for the whole fleet;
# 0 turns the watchdog off): a kill is undone about GRACE + CONFIRM + INTERVAL after it.
SAGA_ORPHAN_GRACE = env.float("SAGA_ORPHAN_GRACE", default=3.0)
SAGA_ORPHAN_CONFIRM = env.float("SAGA_ORPHAN_CONFIRM", default=2.0)
SAGA_ORPHAN_INTERVAL = env.float("SAGA_ORPHAN_INTERVAL", default=1.0)
_ORPHAN_RETURN_SECONDS = SAGA_ORPHAN_GRACE + 2 * SAGA_ORPHAN_CONFIRM + SAGA_ORPHAN_INTERVAL
if SAGA_QUIET_SECONDS < 0 or (SAGA_ORPHAN_INTERVAL > 0 and 0 < SAGA_QUIET_SECONDS < _ORPHAN_RETURN_SECONDS):
    # Quieter than that, a killed worker's message (which its watchdog returns) would read
    # as lost and be copied, spending a unit of its step's re-publish budget.
    raise ImproperlyConfigured(
        f"SAGA_QUIET_SECONDS must be 0 (off) or at least {_ORPHAN_RETURN_SECONDS:g} s, the Redis watchdog's "
        "return of a killed worker's messages (SAGA_ORPHAN_GRACE + 2 * SAGA_ORPHAN_CONFIRM + SAGA_ORPHAN_INTERVAL), "
        f"not {SAGA_QUIET_SECONDS:g}"
    )
# How many times a compensation retries a transient error before the saga needs an operator.
SAGA_COMPENSATION_MAX_RETRIES = env.int("SAGA_COMPENSATION_MAX_RETRIES", default=12)
# How long a step's authority (common.signing) stays valid. A message older than this is
# refused; the sweeper re-publishes a step still due with a fresh one.
SAGA_MESSAGE_MAX_AGE = env.int("SAGA_MESSAGE_MAX_AGE", default=24 * 3600)
CELERY_BEAT_SCHEDULE = {
    "saga-sweep": {
        "task": "saga.sweep",
        "schedule": SAGA_SWEEP_INTERVAL,
        # A sweep that waited longer than the interval is superseded by the next one.
        "options": {"expires": SAGA_SWEEP_INTERVAL},
    },
}

# --- Payments: the fake provider ------------------------------------------------------
PAYMENT_GATEWAY = env.str("PAYMENT_GATEWAY", default="payments.gateways.fake.FakeGateway")
FAKE_PROVIDER_SLOW_SECONDS = env.float("FAKE_PROVIDER_SLOW_SECONDS", default=5.0)
FAKE_PROVIDER_HANG_SECONDS = env.float("FAKE_PROVIDER_HANG_SECONDS", default=CELERY_TASK_TIME_LIMIT + 10)
# The circuit breaker's state is shared by every worker process through Redis: by default
# the broker when it is Redis; with RabbitMQ name a Redis here (empty: per-process state).
PAYMENT_BREAKER_REDIS_URL = env.str(
    "PAYMENT_BREAKER_REDIS_URL", default=CELERY_BROKER_URL if CELERY_BROKER_URL.startswith("redis") else ""
)
PAYMENT_BREAKER_FAIL_MAX = env.int("PAYMENT_BREAKER_FAIL_MAX", default=5)
PAYMENT_BREAKER_RESET_SECONDS = env.float("PAYMENT_BREAKER_RESET_SECONDS", default=30)
CURRENCY = env.str("CURRENCY", default="USD")

# --- Notifications --------------------------------------------------------------------
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.filebased.EmailBackend")
EMAIL_FILE_PATH = env.str("EMAIL_FILE_PATH", default=str(BASE_DIR / ".data" / "mail"))
EMAIL_HOST = env.str("EMAIL_HOST", default="127.0.0.1")
EMAIL_PORT = env.int("EMAIL_PORT", default=1025)
# A mail server that stalls (on the reply to DATA, or on QUIT once it has the message) must
# not hold a send until the task's soft time limit, which reads as a failed send and sends
# again: past EMAIL_TIMEOUT a stalled QUIT ends the send as delivered (Django closes the
# connection), a stalled DATA as a failure to retry.
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=max(1, CELERY_TASK_SOFT_TIME_LIMIT // 2))
if not 0 < EMAIL_TIMEOUT < CELERY_TASK_SOFT_TIME_LIMIT:
    raise ImproperlyConfigured(
        f"EMAIL_TIMEOUT={EMAIL_TIMEOUT} must be above 0 and below CELERY_TASK_SOFT_TIME_LIMIT="
        f"{CELERY_TASK_SOFT_TIME_LIMIT}: a send the time limit cuts short is sent again"
    )
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="orders@example.com")
SMS_BACKEND = env.str("SMS_BACKEND", default="notifications.channels.FileSmsBackend")
SMS_FILE_PATH = env.str("SMS_FILE_PATH", default=str(BASE_DIR / ".data" / "sms"))

# --- Cache: shared by every process (API rate limits) --------------------------------
# Redis; by default the broker's server when the broker is Redis. With RabbitMQ name a
# Redis here (compose runs one). "locmemcache://" gives each process its own counts.
CACHE_URL = env.str(
    "CACHE_URL", default=CELERY_BROKER_URL if CELERY_BROKER_URL.startswith("redis") else "locmemcache://"
)
CACHES = {"default": environ.Env.cache_url_config(CACHE_URL)}
CACHES["default"].setdefault("KEY_PREFIX", "saga-cache")
if CACHES["default"]["BACKEND"].endswith("RedisCache"):
    # A Redis outage must not hang requests: the throttle then lets them through.
    CACHES["default"].setdefault("OPTIONS", {}).update(socket_connect_timeout=1, socket_timeout=1)

# --- Process-local caches emptied by NOTIFY (common.notified_cache) -----------------------
# The web keeps API tokens (with their users) and catalogue prices it has read, until a
# trigger on their tables says a row changed: two of each order's transactions fewer
# (BENCHMARKS.md). Off: every request reads them from the database.
NOTIFIED_CACHES = env.bool("NOTIFIED_CACHES", default=True)

# --- Operator's console (docs/OPERATIONS.md) ----------------------------------------
# Links from the admin's saga page: a step's Celery task in Flower (<FLOWER_URL>/task/<id>;
# empty: no links) and the saga's trace ({trace_id} is replaced; empty: no link).
FLOWER_URL = env.str("FLOWER_URL", default=f"http://127.0.0.1:{env.str('FLOWER_PORT', default='5555')}").rstrip("/")
TRACE_URL_TEMPLATE = env.str("TRACE_URL_TEMPLATE", default="http://127.0.0.1:16686/trace/{trace_id}")
# How many sagas one "retry every saga with this failure" click re-publishes at most.
SAGA_BULK_RETRY_LIMIT = env.int("SAGA_BULK_RETRY_LIMIT", default=500)
# The action's confirmation posts the ids it will act on, one form field each (saga.admin).
if not 0 < SAGA_BULK_RETRY_LIMIT <= 900:
    raise ImproperlyConfigured(
        f"SAGA_BULK_RETRY_LIMIT={SAGA_BULK_RETRY_LIMIT} must be 1 to 900: the admin's confirmation posts each "
        "saga's id, and Django takes at most 1000 fields a request (DATA_UPLOAD_MAX_NUMBER_FIELDS)"
    )

# --- Logging: every line a task writes names its saga, order and trace (orders_project.log)
# LOG_FORMAT=text (readable, the default) or json (one object per line: compose).
# Tracing itself is configured by the standard OTEL_* variables (orders_project.telemetry).
LOG_FORMAT = env.str("LOG_FORMAT", default="text")
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "task_context": {"()": "orders_project.log.TaskContextFilter"},
        # A sweep that found nothing logs nothing (orders_project.log.QuietHousekeepingFilter).
        "quiet_housekeeping": {"()": "orders_project.log.QuietHousekeepingFilter"},
        "delayed_delivery_notice": {"()": "orders_project.log.DelayedDeliveryNoticeFilter"},
    },
    "formatters": {
        "text": {"()": "orders_project.log.TextFormatter"},
        "json": {"()": "orders_project.log.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["quiet_housekeeping", "task_context"],
        },
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "celery.app.base": {"filters": ["delayed_delivery_notice"]},
        # At DEBUG the pool logs each task's raw arguments (celery.concurrency.base): the
        # saga's context (email, phone, card token) and the step's authority, which every
        # other line leaves out (saga.engine's reprs). Not even LOG_LEVEL=DEBUG turns it on.
        "celery.pool": {"level": "INFO"},
    },
}
