"""CLI: `python -m devstack run | test [PYTEST ARGS] | services up|down|env|status|run`.

`run` and `test` are `make run` / `make test` (devstack.stack); `services` manages only the servers.

URLs and `export` lines go to stdout; progress and errors go to stderr, so `eval "$(... env)"` is safe.
Expected problems (configuration, ports, servers) print one clear message and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from devstack import services
from devstack.services import (
    DATABASE_KEYS,
    URL_KEYS,
    ConfigError,
    DevstackError,
    ServiceError,
    ServiceURLs,
)

# The project root: the folder that contains this package (and .env, .data/).
DEFAULT_BASE_DIR = Path(__file__).resolve().parent.parent
EXIT_NOT_RUNNING = 3  # LSB "program is not running", for `status`

logger = logging.getLogger("devstack")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"devstack: {level}{record.getMessage()}"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True)
    groups.add_parser("run", help="make run: servers, databases, migrations, demo data, then all processes")
    # Only listed here for --help: main() hands everything after `test` to pytest unparsed.
    groups.add_parser("test", help="make test: servers, fresh test databases, migrations, then pytest [ARGS]")
    services_parser = groups.add_parser(
        "services",
        help="PostgreSQL and Redis for make run / make test",
        description="With none of the service URLs configured (environment or .env) devstack runs an "
        "embedded PostgreSQL and valkey with data in <base-dir>/.data; with all of them configured it uses "
        "those servers.",
    )
    actions = services_parser.add_subparsers(dest="action", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-dir",
        type=Path,
        default=DEFAULT_BASE_DIR,
        help="project root holding .env and .data/ (default: %(default)s)",
    )
    common.add_argument(
        "--db-prefix", default="saga", help="embedded database names are <prefix>_default, ... (default: saga)"
    )
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument(
        "--timeout",
        type=float,
        default=services.DEFAULT_TIMEOUT,
        help="seconds to wait for servers (default: %(default)s)",
    )
    recreate = argparse.ArgumentParser(add_help=False)
    recreate.add_argument("--recreate", action="store_true", help="drop and recreate the five databases (DATA LOSS)")

    actions.add_parser(
        "up",
        parents=[common, timeout, recreate],
        help="start or reuse servers, create databases, print URLs",
    )
    actions.add_parser("down", parents=[common, timeout], help="stop the embedded servers")
    actions.add_parser(
        "env", parents=[common], help='print `export KEY=value` lines (for eval "$(...)"); starts nothing'
    )
    actions.add_parser("status", parents=[common], help="show what is running (exit 3 if something is not)")
    run = actions.add_parser(
        "run",
        parents=[common, timeout, recreate],
        help="up, run a command with the URLs in its environment, then stop what up started",
        description="Example: python -m devstack services run --db-prefix saga_test -- pytest -q",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="command to run, after --")
    return parser


def _configured_urls(base_dir: Path, db_prefix: str) -> tuple[str, dict[str, str]]:
    """The URLs `up` would return, without starting anything."""
    config = services.load_config(base_dir)
    if services.config_mode(config) == "external":
        return "external", config
    settings = services.EmbeddedSettings.load(base_dir)
    urls = services.embedded_urls(pg_port=settings.pg_port, redis_port=settings.redis_port, db_prefix=db_prefix)
    return "embedded", urls


def _up(args: argparse.Namespace) -> ServiceURLs:
    urls = services.ensure_services(args.base_dir, db_prefix=args.db_prefix, timeout=args.timeout)
    if urls.mode == "external":
        logger.info("external mode: using the configured servers")
        if not services.check_broker(urls[services.BROKER_KEY]):
            logger.info("broker is not redis://, not checked")
    services.ensure_databases(urls, recreate=args.recreate)
    return urls


def cmd_up(args: argparse.Namespace) -> int:
    urls = _up(args)
    for key in URL_KEYS:
        print(f"{key}={services.redact_url(urls[key])}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    running = [s.name for s in services.service_status(args.base_dir) if s.running]
    services.stop_services(args.base_dir, timeout=args.timeout)
    if not running:
        logger.info("no embedded server was running")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    mode, urls = _configured_urls(args.base_dir, args.db_prefix)
    if mode == "embedded" and not all(s.ready for s in services.service_status(args.base_dir)):
        logger.warning("the embedded servers are not (all) running: run `python -m devstack services up`")
    for key in URL_KEYS:
        print(f"export {key}={shlex.quote(urls[key])}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        mode, urls = _configured_urls(args.base_dir, args.db_prefix)
    except ConfigError as exc:
        mode, urls = "invalid", {}
        print(f"configuration: INVALID: {exc}")
    ok = mode != "invalid"
    if mode == "external":
        print("mode: external (all service URLs are configured)")
        for key in URL_KEYS:
            try:
                if key in DATABASE_KEYS:
                    services.check_database(urls[key])
                    state = "ok"
                else:
                    state = "ok" if services.check_broker(urls[key]) else "not checked"
            except DevstackError as exc:
                state, ok = f"UNREACHABLE: {exc}", False
            print(f"  {key}={services.redact_url(urls[key])}  {state}")
    elif mode == "embedded":
        print("mode: embedded (no service URL configured)")
    print(f"embedded servers ({args.base_dir.resolve() / '.data'}):")
    for status in services.service_status(args.base_dir):
        pid = f" (pid {status.pid})" if status.pid else ""
        print(f"  {status.name:<8} {status.detail}{pid}")
        if mode == "embedded" and not status.ready:
            ok = False
    return 0 if ok else EXIT_NOT_RUNNING


def cmd_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("nothing to run: give a command after --")
    urls = _up(args)
    try:
        try:
            child = subprocess.Popen(command, env={**os.environ, **urls})
        except OSError as exc:
            raise ServiceError(f"cannot run {command[0]!r}: {exc.strerror}") from exc

        # Pass termination on to the command and keep waiting, so the servers still get stopped after it.
        def forward(signum: int, _frame: object) -> None:
            child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                try:
                    code = child.wait()
                    break
                except KeyboardInterrupt:
                    continue  # the terminal sent SIGINT to the command too; let it finish
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 128 - code if code < 0 else code
    finally:
        services.release(args.base_dir, urls, timeout=args.timeout)


COMMANDS = {"up": cmd_up, "down": cmd_down, "env": cmd_env, "status": cmd_status, "run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["test"]:
            # Everything after `test` belongs to pytest (`make test ARGS="-k saga -x"`), options included,
            # which argparse cannot pass through.
            from devstack import stack

            return stack.test(DEFAULT_BASE_DIR, argv[1:])
        if argv[:1] == ["chaos"]:
            from devstack import chaos

            return chaos.run(DEFAULT_BASE_DIR, argv[1:])
        args = _build_parser().parse_args(argv)
        if args.group == "run":
            from devstack import stack

            return stack.run(DEFAULT_BASE_DIR)
        return COMMANDS[args.action](args)
    except DevstackError as exc:
        logger.error("%s", exc)
        return 1
    except subprocess.CalledProcessError as exc:
        # The command has already printed its own error (e.g. a failing migration).
        logger.error("`%s` failed (exit %s)", shlex.join(map(str, exc.cmd)), exc.returncode)
        return exc.returncode if exc.returncode > 0 else 1
    except ImportError as exc:
        logger.error("a required Python package is missing (%s): run `pip install -r requirements-dev.txt`", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
