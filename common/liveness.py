"""Whether the process that wrote a claim is still alive, where that can be known for sure.

A claim made before an external call (an email, an SMS) keeps every other copy of the step
off until its lease ends, because its owner may still be in the call. The lease must
outlast the owner's hard time limit, so a worker SIGKILLed mid-call held its claim that
long (15 s with the test timings, 30 s in production) after the broker had already handed
its message to a live worker: `make chaos` on 12-06 measured a notification's kill
recovering in 20.9 s, against issue 11's 15 s.

So a claim also names its owner process (`process_identity`), and a copy that finds it
asks `process_gone`, which is True only when the owner provably no longer exists: same
host, same boot, same PID namespace, and its PID is gone, a zombie, or a newer process
(another start time). Anything it cannot see (another host or container, another OS, an
unreadable /proc) counts as alive, and the lease decides as before. Taking over a dead
owner's claim early adds no new duplicate: what that owner may have delivered before dying
is the at-least-once window the lease's expiry already accepts.
"""

import os
import socket
from pathlib import Path

_PROC = Path("/proc")
_cached: tuple[int, str] | None = None


def _start_time(pid: int | str) -> str | None:
    """The process's start time in clock ticks since boot, None if it is gone or a zombie."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow
    # its last ")". There, field 3 (the state) comes first and field 22 (the start) 20th.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _host() -> str | None:
    """This machine and PID namespace: hostname, boot id, namespace (None off Linux)."""
    try:
        boot = (_PROC / "sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink(_PROC / "self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_identity() -> str:
    """This process, as a claim names its owner: host, boot, PID namespace, PID and start
    time; empty where they cannot be read (a claim then waits out its lease, as before).
    Computed once per process (a forked pool process computes its own)."""
    global _cached
    pid = os.getpid()
    if _cached is None or _cached[0] != pid:
        host, start = _host(), _start_time(pid)
        _cached = (pid, f"{host}|{pid}|{start}" if host and start else "")
    return _cached[1]


def process_gone(identity: str) -> bool:
    """True only if the process `identity` names is provably not running: on this host,
    boot and PID namespace, with no process of that PID and start time."""
    try:
        host, pid, start = identity.rsplit("|", 2)
    except ValueError:
        return False
    if not host or not pid.isdigit() or host != _host():
        return False
    return _start_time(pid) != start
