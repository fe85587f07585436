"""The bare baseline runs under the product's worker-side Celery settings, and stays so.

No servers and no django.setup(): django.conf.settings only imports the settings module.
(Under pytest-django, which sets Django up for every test session, that changes nothing.)
"""

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_project.settings")

from django.conf import settings

from bench import bare

BASE_DIR = Path(__file__).resolve().parents[2]
# Each bare step and the product task whose database work it does.
PRODUCT_TASKS = {
    "reserve": "inventory.reserve",
    "release": "inventory.release",
    "charge": "payments.charge",
    "confirm": "orders.confirm",
    "fail": "orders.fail",
    "notify": "notifications.notify",
}


def test_mirrored_settings_equal_the_products():
    product = {key: getattr(settings, "CELERY_" + key.upper()) for key in bare.PRODUCT_SETTINGS}

    assert bare.PRODUCT_SETTINGS == product


def test_every_product_celery_setting_is_mirrored_or_left_out_on_purpose():
    product_keys = {name for name in dir(settings) if name.startswith("CELERY_")}

    mirrored = {"CELERY_" + key.upper() for key in bare.PRODUCT_SETTINGS}

    assert product_keys == mirrored | set(bare.NOT_MIRRORED)
    assert not mirrored & set(bare.NOT_MIRRORED)


def test_the_app_uses_them_with_no_result_backend_and_the_products_queues():
    conf = bare.app.conf

    for key, value in bare.PRODUCT_SETTINGS.items():
        assert conf[key] == value, key
    assert conf.result_backend is None
    assert conf.task_ignore_result is True
    assert set(bare.TASK_ROUTES) == {name for name in bare.app.tasks if name.startswith("bare.")}


def test_each_step_goes_to_the_queue_the_product_routes_its_step_to():
    def product_queue(task_name: str) -> str:
        return next(
            route["queue"]
            for pattern, route in settings.CELERY_TASK_ROUTES.items()
            if fnmatch.fnmatchcase(task_name, pattern)
        )

    assert {name: route["queue"] for name, route in bare.TASK_ROUTES.items()} == {
        f"bare.{step}": product_queue(product_task) for step, product_task in PRODUCT_TASKS.items()
    }


def test_the_bare_processes_never_load_django_even_when_its_settings_are_named():
    script = (
        "import sys; from bench import bare, bare_web, floor; "
        "bare.app.loader.init_worker(); bare.app.finalize(); "
        "print(sorted(m for m in sys.modules if m.startswith(('django.conf', 'django.db', 'django.apps', 'orders_'))))"
    )
    # (kombu.utils.json imports django.utils.functional when it can, for lazy strings: not Django's set-up.)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orders_project.settings"}

    done = subprocess.run([sys.executable, "-c", script], cwd=BASE_DIR, env=env, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_bare_app_carries_the_products_library_patches():
    # Library fixes, not the saga's: the ratio must not credit the saga with them. In a
    # process of its own: this one loaded the product, which applies them anyway.
    script = (
        "from bench import bare; from kombu.transport import redis as kombu_redis; "
        "from billiard import einfo; from common import billiard_fixes, kombu_fixes; "
        "print(kombu_redis.Channel._create_client is kombu_fixes._create_client_once_per_pool, "
        "kombu_redis.Channel._connparams is kombu_fixes._connparams_of_a_live_connection, "
        "einfo.Traceback.__init__ is billiard_fixes._traceback_keeping_one_position)"
    )

    done = subprocess.run([sys.executable, "-c", script], cwd=BASE_DIR, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True True True"
