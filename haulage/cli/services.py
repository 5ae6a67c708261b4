"""`haulage worker`, `beat`, `flower` and `api`: the long-running processes a deployment runs.

Each imports what it serves when it starts rather than with the CLI, for a
reason named at the import: the Celery app (``haulage.tasks.app``) reads and
checks its settings from the environment when it is built, and ``haulage dev``
and ``demo`` set that environment in this same process before they need the
app; the API server is the optional extra ``haulage[api]``.
"""

from __future__ import annotations

import argparse
import os

import haulage

#: Commands whose process configures logging itself (Celery's worker, beat and Flower).
OWN_LOGGING = frozenset({"worker", "beat", "flower"})


def cmd_worker(args: argparse.Namespace) -> int:
    haulage.registry.load_modules()
    from haulage.tasks.app import app  # built now: see the module docstring
    from haulage.tasks.redis_policy import check_redis  # in haulage.tasks, which builds the app

    check_redis()  # an evicting Redis breaks the guarantees: refuse before taking work
    argv = ["worker", f"--queues={args.queues}", f"--loglevel={args.loglevel}", "--events"]
    if args.concurrency:
        argv.append(f"--concurrency={args.concurrency}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.pool:
        argv.append(f"--pool={args.pool}")
    if args.without_mingle:
        argv.append("--without-mingle")
    app.worker_main(argv)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    haulage.registry.load_modules()
    from haulage.api.server import main as api_main  # haulage[api]: fastapi and uvicorn are optional

    return api_main(["--host", args.host, "--port", str(args.port), "--log-level", args.log_level])


def cmd_beat(args: argparse.Namespace) -> int:
    haulage.registry.load_modules()
    # Built now (see the module docstring); the schedules module imports the app too.
    from haulage.tasks.app import app
    from haulage.workflows.schedules import beat_schedule

    app.conf.beat_schedule = beat_schedule()
    app.start(["beat", f"--loglevel={args.loglevel}"])
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from haulage.tasks.app import app  # built now: see the module docstring

    argv = ["flower", f"--address={args.address}", f"--port={args.port}"]
    auth = os.environ.get("HAULAGE_FLOWER_BASIC_AUTH", "")
    if auth:
        argv.append(f"--basic-auth={auth}")
    app.start(argv)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the service commands on the ``haulage`` parser."""
    p = sub.add_parser("worker", help="run a Celery worker for the configured modules")
    p.add_argument("--queues", default="short,long,dispatch")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--hostname")
    p.add_argument("--pool", choices=["prefork", "threads", "solo"])
    # Mingle waits about 1 s at start for neighbours' revoked ids and clocks; `haulage dev` skips it
    # (steps check their run's status before running, so a missed revoke costs nothing).
    p.add_argument("--without-mingle", action="store_true", help="start without Celery's mingle (about 1 s faster)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("api", help="serve the HTTP API and the live progress page (auth: HAULAGE_API_AUTH)")
    p.add_argument("--host", default=os.environ.get("HAULAGE_API_HOST") or "127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("HAULAGE_API_PORT") or 8000))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("beat", help="run Celery beat (Redis-locked) for scheduled workflows and maintenance jobs")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("flower", help="run Flower, the Celery monitor (basic auth from HAULAGE_FLOWER_BASIC_AUTH)")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)
    p.set_defaults(func=cmd_flower)
