"""`haulage`: the command's parser and dispatcher; each command group lives in its own module.

- :mod:`haulage.cli.dev`: ``dev`` and ``demo``, the development stack;
- :mod:`haulage.cli.services`: ``worker``, ``api``, ``beat``, ``flower``;
- :mod:`haulage.cli.runs`: ``run``, ``watch``, ``status``, ``results``, ``cancel``,
  ``resume``, ``list``, ``workflows``.

A thin front: it parses arguments and calls the public API of ``haulage``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import redis

from haulage.cli import dev, runs, services
from haulage.devtools.client_env import adopt_dev_env
from haulage.errors import HaulageError, InfrastructureError
from haulage.logs import configure
from haulage.settings import DEFAULT_REDIS_URL, env_str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haulage", description="Durable workflows on Celery.")
    sub = parser.add_subparsers(dest="command", required=True)
    dev.add_commands(sub)
    services.add_commands(sub)
    runs.add_commands(sub)
    return parser


def unreachable_hint(exc: BaseException) -> str:
    """For a shell that never learnt where `haulage dev`'s Redis is: the likely fix, else nothing."""
    unreachable = isinstance(exc, redis.ConnectionError) or (
        isinstance(exc, InfrastructureError) and "unreachable" in str(exc))
    if not unreachable or env_str("HAULAGE_REDIS_URL"):
        return ""
    return (f"; HAULAGE_REDIS_URL is not set in this shell, so Haulage tried {DEFAULT_REDIS_URL}: is `haulage dev` "
            "running? Start it, or `source .haulage/env` from its folder, or set HAULAGE_REDIS_URL")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # As with `python -m` and `celery -A`, the current folder is importable, so that
    # HAULAGE_MODULES=tasks finds the application's own tasks.py when run from its folder.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    configure(None if args.command in services.OWN_LOGGING else logging.WARNING)
    # A second shell beside `haulage dev` works without `source .haulage/env`.
    note = "" if args.command in dev.STARTS_A_STACK else adopt_dev_env()
    if note:
        print(note, file=sys.stderr)
    try:
        return int(args.func(args))
    except HaulageError as exc:
        print(f"haulage: error: {exc}{unreachable_hint(exc)}", file=sys.stderr)
        return 2
    except redis.ConnectionError as exc:  # a read of the store or a lock: the same answer as a start gets
        print(f"haulage: error: the store is unreachable ({exc}){unreachable_hint(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("haulage: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # one clear line, not a traceback; HAULAGE_DEBUG=1 shows it
        if os.environ.get("HAULAGE_DEBUG"):
            raise
        print(f"haulage: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
