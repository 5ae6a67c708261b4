"""`haulage`: run the dev stack, workers, and start/follow/cancel/resume runs.

A thin front: it parses arguments and calls workflows/. Project modules are
imported inside the commands, because `haulage dev` must choose the Redis URL
before the Celery app reads its configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from haulage.errors import HaulageError, UsageError

EXAMPLES = "haulage.examples"


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``-p key=value``: the value is JSON when it parses as JSON, else a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-p expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def _load() -> None:
    from haulage.workflows import registry

    registry.load_modules()


def _follow(run_id: str, timeout: float | None, *, quiet: bool = False) -> Any:
    """Show a live progress line until the run ends (driven by the store's change feed); return its final record."""
    from haulage.cli.display import ProgressPrinter
    from haulage.workflows import get_run

    printer = None if quiet else ProgressPrinter()
    record = None
    try:
        for record in get_run(run_id).watch(timeout=timeout):
            if printer:
                printer.show(record)
    finally:
        if printer:
            printer.done()
    return record


def _print_outcome(record: Any, as_json: bool) -> int:
    from haulage.cli.display import record_summary, to_json
    from haulage.workflows import get_run
    from haulage.workflows.run import RunStatus

    results: Any = None
    if record.status is RunStatus.COMPLETE:
        results = get_run(record.id).results()
    if as_json:
        print(to_json({"run": record.to_dict(), "results": results}))
    else:
        print(record_summary(record, get_run(record.id).steps()))
        if results is not None:
            print("results")
            print(to_json(results))
    return 0 if record.status is RunStatus.COMPLETE else 1


# --- commands ---------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    _load()
    from haulage.workflows import registry

    run = registry.get(args.name).start(
        created_by=args.created_by,
        idempotency_key=args.idempotency_key,
        tags=args.tag or None,
        **parse_params(args.param or []),
    )
    if not (args.wait or args.watch):
        print(json.dumps({"run_id": run.id}) if args.json else run.id)
        return 0
    if not args.json:
        print(f"run {run.id}")
    record = _follow(run.id, args.timeout, quiet=args.json or not args.watch)
    return _print_outcome(record, args.json)


def cmd_watch(args: argparse.Namespace) -> int:
    record = _follow(args.run_id, args.timeout)
    return _print_outcome(record, False)


def cmd_status(args: argparse.Namespace) -> int:
    from haulage.cli.display import record_summary, to_json
    from haulage.workflows import get_run

    record = get_run(args.run_id).status()
    print(to_json(record.to_dict()) if args.json else record_summary(record))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from haulage.cli.display import to_json
    from haulage.workflows import get_run

    print(to_json(get_run(args.run_id).results()))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from haulage.cli.display import to_json
    from haulage.workflows import list_runs

    runs = list_runs(workflow=args.workflow, status=args.status, created_by=args.created_by,
                     limit=args.limit, offset=args.offset)  # fmt: skip
    if args.json:
        print(to_json([r.to_dict() for r in runs]))
        return 0
    for r in runs:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        print(f"{r.id}  {stamp}  {r.workflow:<18} {r.status.value:<10} {r.percent:5.1f}%  {r.message[:50]}")
    if not runs:
        print("no runs")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from haulage.workflows import cancel_run

    cancelled = cancel_run(args.run_id)
    print(f"run {args.run_id} cancelled" if cancelled else f"run {args.run_id} had already ended; nothing to cancel")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _load()
    from haulage.workflows import get_run

    run = get_run(args.run_id).resume()
    print(f"run {run.id} resumed ({run.status().status.value})")
    return 0


def cmd_workflows(args: argparse.Namespace) -> int:
    _load()
    from haulage.cli.display import to_json
    from haulage.workflows import registry

    listing: list[dict[str, Any]] = []
    for wf in registry.all_workflows():
        schema = wf.parameters_schema()
        required = set(schema.get("required", []))
        params = {name: {"type": _type_of(spec), "required": name in required}
                  for name, spec in schema.get("properties", {}).items()}  # fmt: skip
        listing.append({"name": wf.name, "on_failure": wf.on_failure, "parameters": params,
                        "description": (wf.__doc__ or "").strip().splitlines()[0] if wf.__doc__ else ""})  # fmt: skip
    if args.json:
        print(to_json(listing))
        return 0
    if not listing:
        print("no workflows registered; set HAULAGE_MODULES to your modules")
    for item in listing:
        shown = ", ".join(f"{n}: {p['type']}{'' if p['required'] else ' (optional)'}"
                          for n, p in item["parameters"].items())  # fmt: skip
        print(f"{item['name']}({shown})  {item['description']}")
    return 0


def _type_of(spec: dict[str, Any]) -> str:
    if "type" in spec:
        if spec["type"] == "array" and isinstance(spec.get("items"), dict):
            return f"list[{_type_of(spec['items'])}]"
        return str(spec["type"])
    if "$ref" in spec:
        return str(spec["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in spec:
        return " | ".join(_type_of(s) for s in spec["anyOf"])
    return "any"


def cmd_worker(args: argparse.Namespace) -> int:
    _load()
    from haulage.tasks.app import app

    argv = ["worker", f"--queues={args.queues}", f"--loglevel={args.loglevel}", "--events"]
    if args.concurrency:
        argv.append(f"--concurrency={args.concurrency}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.pool:
        argv.append(f"--pool={args.pool}")
    app.worker_main(argv)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    _load()
    from haulage.api.server import main as api_main

    return api_main(["--host", args.host, "--port", str(args.port), "--log-level", args.log_level])


def cmd_beat(args: argparse.Namespace) -> int:
    _load()
    from haulage.tasks.app import app
    from haulage.workflows.schedules import beat_schedule

    app.conf.beat_schedule = beat_schedule()
    app.start(["beat", f"--loglevel={args.loglevel}"])
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from haulage.tasks.app import app

    argv = ["flower", f"--address={args.address}", f"--port={args.port}"]
    auth = os.environ.get("HAULAGE_FLOWER_BASIC_AUTH", "")
    if auth:
        argv.append(f"--basic-auth={auth}")
    app.start(argv)
    return 0


def _say(line: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):  # stdout closed by the reader
        print(line, flush=True)


def _modules_for_dev() -> str:
    return os.environ.get("HAULAGE_MODULES", "").strip() or EXAMPLES


def _stack(args: argparse.Namespace) -> Any:
    from haulage.devtools.stack import Stack
    from haulage.settings import get_settings

    return Stack(Path(args.dev_dir) if args.dev_dir else get_settings().dev_dir, modules=_modules_for_dev(),
                 store=args.store, dispatch=args.dispatch)  # fmt: skip


def cmd_dev(args: argparse.Namespace) -> int:
    stack = _stack(args)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("haulage dev: starting the stack")
    try:
        stack.start()
        env_file = stack.write_client_env()
        print(f"haulage dev: ready. HAULAGE_REDIS_URL={stack.redis_url} HAULAGE_MODULES={stack.modules}")
        print(f"haulage dev: Flower at {stack.flower_url}")
        print(f"haulage dev: progress page at {stack.page_url}")
        print(f"haulage dev: to use this stack from another shell: source {env_file}")
        print("haulage dev: Ctrl-C stops everything")
        watcher = threading.Thread(target=stack.supervise, daemon=True)
        watcher.start()
        stop.wait()
    finally:
        _say("haulage dev: stopping")
        stack.stop()
    _say("haulage dev: stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    stack = _stack(args)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print("haulage demo: starting the stack")
    try:
        stack.start()
        threading.Thread(target=stack.supervise, daemon=True).start()
        _load()
        from haulage.examples import SAMPLE_BATCH
        from haulage.workflows import registry

        params: dict[str, Any] = (
            {"project_id": "riverside-library", "document": "sample"}
            if args.workflow == "plan_review"
            else {"invoices": SAMPLE_BATCH}
        )
        run = registry.get(args.workflow).start(created_by="demo@haulage.local", tags=["demo"], **params)
        print(f"haulage demo: started {args.workflow} run {run.id}")
        record = _follow(run.id, args.timeout)
        return _print_outcome(record, False)
    finally:
        stack.stop()  # first: a closed stdout must not leave processes behind
        _say("haulage demo: stack stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haulage", description="Durable workflows on Celery.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dev", help="run Redis and a worker per queue in the foreground")
    p.add_argument("--dev-dir", help="where Redis data and logs go (default HAULAGE_DEV_DIR or .haulage)")
    p.add_argument("--store", choices=["auto", "redis", "firestore"], default="auto",
                   help="auto: the Firestore emulator when installed, else Redis")  # fmt: skip
    p.add_argument("--dispatch", choices=["cloudrun", "local"], default="cloudrun",
                   help="cloudrun: long steps run on a local Cloud Run Jobs server (default)")  # fmt: skip
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("demo", help="start the dev stack, run an example workflow with live progress, stop")
    p.add_argument("--workflow", choices=["plan_review", "bulk_invoices"], default="plan_review")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--dev-dir")
    p.add_argument("--store", choices=["auto", "redis", "firestore"], default="auto")
    p.add_argument("--dispatch", choices=["cloudrun", "local"], default="cloudrun")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("worker", help="run a Celery worker for the configured modules")
    p.add_argument("--queues", default="short,long,dispatch")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--hostname")
    p.add_argument("--pool", choices=["prefork", "threads", "solo"])
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

    p = sub.add_parser("run", help="start a workflow by name")
    p.add_argument("name")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="a parameter (JSON values parse)")
    p.add_argument("--created-by")
    p.add_argument("--idempotency-key")
    p.add_argument("--tag", action="append")
    p.add_argument("--wait", action="store_true", help="wait for the run to end and print the outcome")
    p.add_argument("--watch", action="store_true", help="like --wait, with a live progress bar")
    p.add_argument("--timeout", type=float)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("watch", help="follow a run with a live progress bar until it ends")
    p.add_argument("run_id")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_watch)

    for name, func, help_text in (
        ("status", cmd_status, "show a run's document"),
        ("results", cmd_results, "print a finished run's results as JSON"),
        ("cancel", cmd_cancel, "cancel a run"),
        ("resume", cmd_resume, "resume a run from its checkpoints"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run_id")
        if name == "status":
            p.add_argument("--json", action="store_true")
        if name == "results":
            p.add_argument("--json", action="store_true", help="(results are always JSON)")
        p.set_defaults(func=func)

    p = sub.add_parser("list", help="list runs, newest first")
    p.add_argument("--workflow")
    p.add_argument("--status", choices=["PENDING", "PROCESSING", "COMPLETE", "FAILED", "CANCELLED"])
    p.add_argument("--created-by")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("workflows", help="list registered workflows and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflows)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from haulage.logs import configure

    configure(logging.WARNING if args.command not in ("worker", "beat", "flower") else None)
    try:
        return int(args.func(args))
    except HaulageError as exc:
        print(f"haulage: error: {exc}", file=sys.stderr)
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
