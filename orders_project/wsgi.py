import gc
import os

import django
from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

from orders_project import telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_project.settings")

# Settings first (they read .env, where OTEL_* may be), then tracing, which must be set
# up before Django builds its middleware chain: the Django instrumentation adds its own.
# Off unless an OTEL_* variable says where spans go (orders_project.telemetry).
django.setup(set_prefix=False)
telemetry.setup(django=True, celery=True)

application = get_wsgi_application()

# The web process starts sagas and cancels them: it refuses to start without a saga
# definition version that an unfinished saga runs on (saga.checks, issue 14).
from saga.checks import refuse_start_without_versions_in_use  # noqa: E402

refuse_start_without_versions_in_use()

# What the process loads once and keeps for its life (Django, REST framework, the apps and,
# imported here rather than by the first request, every view the URLconf names: about
# 125,000 objects) is moved out of the garbage collector's reach. Each full collection
# otherwise walks all of it, holding the GIL, so every request in flight in the worker
# stalls: 73 ms of CPU per collection in a bench run (BENCHMARKS.md).
get_resolver().url_patterns  # noqa: B018 (loads them)
gc.freeze()
