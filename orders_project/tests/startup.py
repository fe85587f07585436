"""Django started in a new interpreter with some settings changed: how a test checks that a
value the settings must refuse stops a process at start-up."""

import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[2]


def django_setup(**environ: str) -> subprocess.CompletedProcess[str]:
    """`django.setup()` in a new interpreter, with this process's environment and `environ`."""
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=BASE_DIR,
        env={**os.environ, **environ, "DJANGO_SETTINGS_MODULE": "orders_project.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
