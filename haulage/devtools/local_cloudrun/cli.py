"""``python -m haulage.devtools.local_cloudrun``: serve in the foreground until SIGINT or SIGTERM.

The bearer token comes from HAULAGE_CLOUDRUN_TOKEN (``haulage dev`` makes a new
one per start and gives the workers the same).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import threading
from collections.abc import Sequence

from haulage.devtools.local_cloudrun.options import (
    DEFAULT_CANCEL_GRACE,
    DEFAULT_COMMAND,
    DEFAULT_HOST,
    DOCUMENTED_OVERRIDES,
)
from haulage.devtools.local_cloudrun.protocol import LOGGER
from haulage.devtools.local_cloudrun.server import LocalCloudRun

#: the bearer token the server wants on every call; the dispatcher sends the same variable's value
TOKEN_ENV = "HAULAGE_CLOUDRUN_TOKEN"


def _job_option(value: str) -> tuple[str, tuple[str, ...] | None]:
    name, sep, command = value.partition("=")
    if sep and not shlex.split(command):
        raise argparse.ArgumentTypeError(f"--job {value!r}: the command after '=' is empty")
    return name, tuple(shlex.split(command)) if sep else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m haulage.devtools.local_cloudrun",
        description="Serve the Cloud Run v2 Jobs API locally; tasks run as subprocesses.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--command", type=shlex.split, default=None,
                        help=f"task command, shell-quoted (default: {shlex.join(DEFAULT_COMMAND)})")  # fmt: skip
    parser.add_argument("--job", dest="jobs", action="append", type=_job_option, default=None,
                        metavar="NAME[=COMMAND]",
                        help="a job id to serve, optionally with its own command; repeatable "
                             "(default: any job id)")  # fmt: skip
    parser.add_argument("--parallelism", type=int, default=None, help="tasks at once per execution (default: all)")
    parser.add_argument("--max-retries", type=int, default=0, help="retries per failed task (default 0)")
    parser.add_argument("--task-timeout", type=float, default=None, help="seconds, when a request sets none")
    parser.add_argument("--cancel-grace", type=float, default=DEFAULT_CANCEL_GRACE,
                        help=f"seconds between SIGTERM and SIGKILL (default {DEFAULT_CANCEL_GRACE:g})")  # fmt: skip
    parser.add_argument("--log-dir", default=None, help="folder for task logs (default: a new temporary folder)")
    parser.add_argument("--faults-file", default=None, help="JSON faults, re-read on every call")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--any-env", action="store_true",
                        help="accept any env override and args (a generic Cloud Run fake); by default only the "
                             "overrides Haulage's dispatcher sends")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve in the foreground until SIGINT or SIGTERM; return the exit status."""
    parser = build_parser()
    options = parser.parse_args(argv)
    # From the environment, not a flag: any local user can read a process's command line.
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        parser.error(f"{TOKEN_ENV} must hold the bearer token clients will send (e.g. "
                     "python -c 'import secrets; print(secrets.token_urlsafe(24))')")  # fmt: skip
    logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = LocalCloudRun(
            options.command or None,
            jobs=dict(options.jobs) if options.jobs else None,
            parallelism=options.parallelism,
            max_retries=options.max_retries,
            task_timeout=options.task_timeout,
            cancel_grace=options.cancel_grace,
            log_dir=options.log_dir,
            faults_file=options.faults_file,
            token=token,
            allowed_env=None if options.any_env else DOCUMENTED_OVERRIDES,
        )
    except ValueError as exc:
        parser.error(str(exc))
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        LOGGER.info("received %s; stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server.start(port=options.port, host=options.host)
    # The one line a supervisor or a test reads to learn the address.
    print(f"local Cloud Run Jobs server listening on {server.address} (task logs in {server.log_dir})", flush=True)
    try:
        stop_requested.wait()
    finally:
        server.stop()
    return 0
