"""Start the shipped topology (the Procfile's web, worker and beat processes) for tests and chaos.

The commands come from the Procfile itself, so the tests run exactly what `make run`
and a Procfile-based host run: one worker per queue, each registering only its own
service's tasks, and the web app under gunicorn.

With `replicas` above one, every worker and beat runs that many times, as on several
hosts (docs/CONTAINERS.md "Several hosts"): replica k of a worker is the process `<name>-<k>` with the
node name `<name>-<k>@<host>` (node names must differ: replies to the sweeper's broadcasts
are told apart by them), and every beat replica sends the whole schedule, as a beat
duplicated by mistake would.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from honcho.environ import parse_procfile

BASE_DIR = Path(__file__).resolve().parent.parent
WORKERS = ("orders", "saga", "inventory", "payments", "notifications")
# Programs that run once per replica (the web already runs several gunicorn processes).
REPLICATED = (*WORKERS, "beat")


def replica_name(program: str, index: int) -> str:
    """The process (and, for a worker, node) name of replica `index` (1-based) of `program`."""
    return program if index == 1 else f"{program}-{index}"


def program_of(process_name: str) -> str:
    """The Procfile program a process name runs: `inventory-2` -> `inventory`."""
    base, _, index = process_name.rpartition("-")
    return base if base in REPLICATED and index.isdigit() else process_name


def replica_command(command: str, process_name: str) -> str:
    """The Procfile command for `process_name`: a worker replica gets a node name of its own.

    Precondition: a worker's command names its node `-n <program>@%h`, as the Procfile does.
    """
    program = program_of(process_name)
    if program not in WORKERS or process_name == program:
        return command
    renamed, count = re.subn(rf"(-n\s+){re.escape(program)}@", rf"\g<1>{process_name}@", command)
    if count != 1:
        raise ValueError(f"the Procfile's {program} command does not name its node `-n {program}@%h`")
    return renamed


def read_procfile(path: Path = BASE_DIR / "Procfile") -> dict[str, str]:
    """Each Procfile process and its command, parsed by honcho (what `make run` starts)."""
    return dict(parse_procfile(path.read_text()).processes)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception as error:  # a condition may fail while the system settles
            last_error = error
        else:
            if value:
                return value
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
    )


@dataclass
class Process:
    name: str
    command: str
    log_path: Path
    popen: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # A session of its own, so a signal reaches the program's children (prefork pool) too.
        self.popen = subprocess.Popen(
            ["bash", "-c", self.command],
            cwd=BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self, timeout: float = 15) -> None:
        self.terminate()
        self.wait_stopped(timeout)

    def terminate(self) -> None:
        """Ask the whole process group to stop (SIGTERM: a worker's warm shutdown)."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float = 15) -> None:
        """Wait for the process to exit after `terminate`; SIGKILL it after `timeout` seconds."""
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def shutdown(self, timeout: float = 30) -> None:
        """Stop as a deploy does: SIGTERM to the program only (a Celery worker's warm
        shutdown finishes the tasks its pool holds; gunicorn finishes its requests), then
        the whole group if it has not exited by `timeout`."""
        if self.popen is None or self.popen.poll() is not None:
            return
        # `bash -c <one command>` execs it: the pid is the program's own.
        os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool children."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class Topology:
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, Process] = field(default_factory=dict)
    base_url: str = ""

    def start(self, names: Iterable[str] = ("web", *WORKERS, "beat"), *, replicas: int = 1) -> None:
        procfile = read_procfile()
        names = [
            replica_name(name, index)
            for name in names
            for index in range(1, (replicas if name in REPLICATED else 1) + 1)
        ]
        port = free_port()
        # The Procfile names programs (celery, gunicorn) as installed in this virtualenv.
        path = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env = {**self.env, "PORT": str(port), "PATH": path}
        self.base_url = f"http://127.0.0.1:{port}"
        for name in names:
            process = Process(name, replica_command(procfile[program_of(name)], name), self.log_dir / f"{name}.log")
            self.processes[name] = process
            process.start(self.env)
        self.wait_ready(names)

    def wait_ready(self, names: Iterable[str]) -> None:
        from orders_project.celery import app

        workers = [n for n in names if program_of(n) in WORKERS]
        for name in names:
            process = self.processes[name]
            if process.popen.poll() is not None:
                raise RuntimeError(f"{name} exited at start:\n{process.log_tail()}")
        if "web" in names:
            wait_for(
                lambda: requests.get(f"{self.base_url}/api/products/", timeout=2).status_code == 401,
                timeout=60,
                what="the web process to answer",
            )
        if workers:
            wanted = {f"{name}@{socket.gethostname()}" for name in workers}

            def all_answer() -> bool:
                replies = app.control.ping(destination=list(wanted), timeout=1.0)
                return wanted <= {host for reply in replies for host in reply}

            wait_for(all_answer, timeout=90, what=f"workers {sorted(wanted)} to answer a ping", interval=0.5)

    def restart(self, name: str) -> None:
        process = self.processes[name]
        process.stop()
        process.start(self.env)
        self.wait_ready([name])

    def stop(self) -> None:
        # All at once: each warm shutdown takes a second or two, and with replicas there are
        # a dozen processes to stop.
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait_stopped()

    def stop_processes(self, names: Iterable[str]) -> None:
        """Stop `names` at once, as a deploy does (Process.shutdown): each finishes what it
        holds, none takes a new message meanwhile."""
        with ThreadPoolExecutor() as pool:
            list(pool.map(lambda name: self.processes[name].shutdown(), names))

    def start_processes(self, names: Iterable[str], env: Mapping[str, str | None]) -> None:
        """Start `names` again with `env` changed (None unsets a variable): a deploy of new
        settings. Processes not named keep running on what they had."""
        names = list(names)
        self.env = {k: v for k, v in {**self.env, **env}.items() if v is not None}
        for name in names:
            self.processes[name].start(self.env)
        self.wait_ready(names)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.processes.values())
