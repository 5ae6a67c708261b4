"""`haulage dev` and `haulage demo`: the development stack in the foreground, or around one example run."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import haulage
from haulage.cli.runs import follow, print_outcome
from haulage.devtools.stack import Parts, Stack
from haulage.settings import get_settings

#: The workflows `haulage dev` and `demo` load when HAULAGE_MODULES names none.
EXAMPLES = "haulage.examples"
#: commands that start their own stack (and so do not adopt a running one's `.haulage/env`)
STARTS_A_STACK = frozenset({"dev", "demo"})


def _say(line: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):  # stdout closed by the reader
        print(line, flush=True)


def _modules_for_dev() -> str:
    return os.environ.get("HAULAGE_MODULES", "").strip() or EXAMPLES


def _stack(args: argparse.Namespace) -> Stack:
    parts = Parts(beat=not getattr(args, "no_beat", False), flower=not getattr(args, "no_flower", False),
                  api=not getattr(args, "no_api", False), cloudrun=not getattr(args, "no_cloudrun", False))  # fmt: skip
    return Stack(Path(args.dev_dir) if args.dev_dir else get_settings().dev_dir, modules=_modules_for_dev(),
                 store=args.store, dispatch=args.dispatch, parts=parts, out=_say,
                 reload=getattr(args, "reload", False))  # fmt: skip


def cmd_dev(args: argparse.Namespace) -> int:
    stack = _stack(args)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _say("haulage dev: starting the stack")
    began = time.monotonic()
    try:
        stack.start()
        env_file = stack.write_client_env()
        _say(f"haulage dev: ready in {time.monotonic() - began:.1f}s. HAULAGE_REDIS_URL={stack.redis_url} "
              f"HAULAGE_MODULES={stack.modules}")  # fmt: skip
        _say(f"haulage dev: `haulage` commands run in this folder use this stack by themselves ({env_file}); "
              f"elsewhere: source {env_file.resolve()}")  # fmt: skip
        stack.start_services()
        if stack.flower_url:
            user, _, password = stack.flower_auth.partition(":")
            _say(f"haulage dev: Flower at {stack.flower_url} (user {user}, password {password})")
        if stack.page_url:
            until = time.strftime("%H:%M", time.localtime(stack.page_token_expires))
            _say(f"haulage dev: progress page at {stack.page_url} (token valid until {until})")
        _say(f"haulage dev: all up in {time.monotonic() - began:.1f}s")
        _say("haulage dev: Ctrl-C stops everything")
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
        stack.start_services()
        threading.Thread(target=stack.supervise, daemon=True).start()
        haulage.registry.load_modules()
        # The examples define steps on the Celery app, which must be built only
        # now that the stack has set the environment it reads (HAULAGE_REDIS_URL).
        from haulage.examples import SAMPLE_BATCH

        params: dict[str, Any] = (
            {"project_id": "riverside-library", "document": "sample"}
            if args.workflow == "plan_review"
            else {"invoices": SAMPLE_BATCH}
        )
        run = haulage.registry.get(args.workflow).start(created_by="demo@haulage.local", tags=["demo"], **params)
        print(f"haulage demo: started {args.workflow} run {run.id}")
        record = follow(run.id, args.timeout)
        return print_outcome(record, False)
    finally:
        stack.stop()  # first: a closed stdout must not leave processes behind
        _say("haulage demo: stack stopped")


STORES = ["redis", "firestore", "auto"]
STORE_HELP = ("where runs are stored: redis (default, or HAULAGE_STORE), firestore (the Firestore emulator), "
              "auto (the emulator when installed)")  # fmt: skip


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `dev` and `demo` on the ``haulage`` parser."""
    p = sub.add_parser("dev", help="run Redis and a worker per queue in the foreground")
    p.add_argument("--dev-dir", help="where Redis data and logs go (default HAULAGE_DEV_DIR or .haulage)")
    p.add_argument("--store", choices=STORES, help=STORE_HELP)
    p.add_argument("--dispatch", choices=["cloudrun", "local"], default="cloudrun",
                   help="cloudrun: long steps run on a local Cloud Run Jobs server (default)")  # fmt: skip
    p.add_argument("--reload", action="store_true",
                   help="restart the workers, beat and the API when a .py file of HAULAGE_MODULES or "
                        "of this folder changes")  # fmt: skip
    for part, what in (("flower", "Flower"), ("beat", "beat (schedules, the reaper, retention)"),
                       ("api", "the HTTP service and progress page"),
                       ("cloudrun", "the local Cloud Run server (same as --dispatch local)")):  # fmt: skip
        p.add_argument(f"--no-{part}", action="store_true", help=f"do not start {what}")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("demo", help="start the dev stack, run an example workflow with live progress, stop")
    p.add_argument("--workflow", choices=["plan_review", "bulk_invoices"], default="plan_review")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--dev-dir")
    p.add_argument("--store", choices=STORES, help=STORE_HELP)
    p.add_argument("--dispatch", choices=["cloudrun", "local"], default="cloudrun")
    p.set_defaults(func=cmd_demo)
