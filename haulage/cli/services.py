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
from haulage.errors import ConfigError

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


#: Flower reads its options from FLOWER_* variables; credentials go that way, never on the command
#: line, which any local user can read in /proc/PID/cmdline.
FLOWER_AUTH_VARS = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")


def flower_environment(environ: dict[str, str], *, insecure_no_auth: bool) -> dict[str, str]:
    """The environment Flower runs with; ConfigError when it would start open without being told to.

    Flower with neither basic auth nor OAuth answers any web page: with
    ``FLOWER_UNAUTHENTICATED_API`` its API sends ``Access-Control-Allow-Origin: *``
    and applies tasks from cross-origin POSTs (any step, any run id, any params).
    With basic auth it refuses cross-site requests (Sec-Fetch-Site, Origin) and
    sends no CORS headers.
    """
    env = dict(environ)
    basic = env.pop("HAULAGE_FLOWER_BASIC_AUTH", "").strip()
    if basic:
        if ":" not in basic or basic.startswith(":") or basic.endswith(":"):
            raise ConfigError("HAULAGE_FLOWER_BASIC_AUTH must be user:password, got a value without both parts")
        env["FLOWER_BASIC_AUTH"] = basic
    authenticated = any(env.get(name, "").strip() for name in FLOWER_AUTH_VARS)
    if not authenticated and not insecure_no_auth:
        raise ConfigError(
            "haulage flower: refusing to start Flower without authentication (any web page could read step "
            "parameters and apply tasks); set HAULAGE_FLOWER_BASIC_AUTH=user:password, or pass "
            "--insecure-no-auth on a machine where nothing else can reach the port"
        )
    if not insecure_no_auth:
        env.pop("FLOWER_UNAUTHENTICATED_API", None)  # ignored under auth; never left on by accident
    return env


def cmd_flower(args: argparse.Namespace) -> int:
    env = flower_environment(dict(os.environ), insecure_no_auth=args.insecure_no_auth)
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)
    from haulage.tasks.app import app  # built now: see the module docstring

    app.start(["flower", f"--address={args.address}", f"--port={args.port}"])
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
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="start without authentication: any web page in a browser on this machine can then "
                        "read Flower and, with FLOWER_UNAUTHENTICATED_API, apply tasks")  # fmt: skip
    p.set_defaults(func=cmd_flower)
