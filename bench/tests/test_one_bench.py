"""One bench at a time in a checkout: a second one stops before it drops the first one's
databases (it used to drop them, and the first run's web answered 500)."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import run as bench_run
from devstack.services import ServiceError


def test_a_second_bench_is_refused_while_one_holds_the_checkout(tmp_path: Path) -> None:
    with bench_run.one_bench_at_a_time(tmp_path):
        with pytest.raises(ServiceError, match=rf"another bench is running in this checkout \(pid {os.getpid()},"):
            with bench_run.one_bench_at_a_time(tmp_path):
                pytest.fail("two benches held the checkout at once")
    with bench_run.one_bench_at_a_time(tmp_path):
        pass  # released when the first one ended


def test_a_killed_bench_leaves_nothing_to_clean_up(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from bench.run import one_bench_at_a_time
                with one_bench_at_a_time(Path({str(tmp_path)!r})):
                    print("held", flush=True)
                    time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(bench_run.__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ServiceError, match=rf"pid {holder.pid},"):
            with bench_run.one_bench_at_a_time(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with bench_run.one_bench_at_a_time(tmp_path):
        pass


def test_make_bench_says_so_and_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def touched(*_: object, **__: object) -> None:
        pytest.fail("the refused bench started or reset a server")

    monkeypatch.setattr(bench_run, "BASE_DIR", tmp_path)
    monkeypatch.setattr(bench_run.signal, "signal", lambda *_: None)  # main's SIGTERM handler: not in pytest
    monkeypatch.setattr(bench_run.services, "ensure_services", touched)
    monkeypatch.setattr(bench_run.services, "ensure_databases", touched)
    caplog.set_level(logging.ERROR, logger="bench")
    (tmp_path / ".data" / "bench").mkdir(parents=True)
    with bench_run.one_bench_at_a_time(tmp_path):
        assert bench_run.main(["--only", "saga", "--orders", "10"]) == 1
    assert "another bench is running in this checkout" in caplog.text
    assert (tmp_path / ".data" / "bench").is_dir()  # the running bench's mail and logs stay
