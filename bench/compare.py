"""Haulage against bare Celery, same work, same Redis, same worker, one run.

    python -m bench.compare [--repeat 3]

Starts a redis-server and one prefork worker (2 processes), then times, from
the call to the outcome being known to the caller:
  - a 50-step chain of no-op tasks (bare `celery.chain`) vs a 50-step Haulage chain;
  - a chord of 1,000 no-op tasks (bare) vs a 1,000-item Haulage fan-out.
Prints the median wall times and the ratio Haulage / bare.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haulage.devtools.redis_server import free_port, start_redis  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="haulage-bench-"))
    port = free_port()
    os.environ["HAULAGE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    os.environ["HAULAGE_MODULES"] = "bench.flows"
    redis_proc = start_redis(tmp / "redis", port, appendonly=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker_log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - handed to the child, closed at exit
    worker = subprocess.Popen(
        [sys.executable, "-m", "haulage.cli", "worker", "--queues", "short", "--concurrency", "2",
         "--hostname", "bench@127.0.0.1", "--loglevel", "WARNING"],
        cwd=ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        from celery import chain, chord, group

        from bench.flows import CHAIN_LENGTH, FAN_OUT, noop
        from haulage.tasks.app import app
        from haulage.workflows import RunStatus, registry

        registry.load_modules()
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=["bench@127.0.0.1"], timeout=0.5):
            if time.monotonic() > deadline:
                raise SystemExit("the benchmark worker did not start; see " + str(tmp / "worker.log"))

        def bare_chain() -> None:
            chain(*[noop.s(i) for i in range(CHAIN_LENGTH)]).apply_async(queue="short").get(timeout=120)

        def bare_chord() -> None:
            chord(group(noop.s(i) for i in range(FAN_OUT)), noop.s()).apply_async(queue="short").get(timeout=300)

        def haulage(name: str) -> Callable[[], None]:
            def go() -> None:
                record = registry.get(name).start().wait(timeout=300, poll=0.005)
                assert record.status is RunStatus.COMPLETE, record.error

            return go

        cases = [
            (f"{CHAIN_LENGTH}-step chain", bare_chain, haulage("bench_chain")),
            (f"{FAN_OUT}-item fan-out", bare_chord, haulage("bench_fan_out")),
        ]
        # Warm both paths once (imports, connections, script loading).
        for _name, bare, ours in cases:
            bare()
            ours()
        print(f"median of {args.repeat} runs, 1 worker x 2 processes, redis on 127.0.0.1 (AOF everysec)")
        for name, bare, ours in cases:
            bare_times, our_times = [], []
            for _ in range(args.repeat):  # interleaved, so drift hits both sides alike
                bare_times.append(timed(bare))
                our_times.append(timed(ours))
            b, h = statistics.median(bare_times), statistics.median(our_times)
            print(f"{name:<22} bare celery {b:7.3f}s   haulage {h:7.3f}s   ratio {h / b:5.2f}x")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
        worker_log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
