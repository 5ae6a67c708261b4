"""`haulage dev` and `haulage demo`: the development stack in the foreground, or around one example run."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import haulage
from haulage.cli.runs import follow, print_outcome
from haulage.devtools.stack import Stack
from haulage.settings import get_settings

#: The workflows `haulage dev` and `demo` load when HAULAGE_MODULES names none.
EXAMPLES = "haulage.examples"


def _say(line: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):  # stdout closed by the reader
        print(line, flush=True)


def _modules_for_dev() -> str:
    return os.environ.get("HAULAGE_MODULES", "").strip() or EXAMPLES


def _stack(args: argparse.Namespace) -> Stack:
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


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `dev` and `demo` on the ``haulage`` parser."""
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
