"""Redis commands per step: what one Haulage step costs in Redis, next to a bare Celery task.

    .venv/bin/python -m bench.roundtrips [--steps 50]

Runs a bare 50-task chain and a 50-step Haulage chain in one worker on a fresh
Redis, and prints each side's Redis commands per step from ``INFO
commandstats`` (a Lua script counts as one command: one round trip). Pipelined
reads count each command they hold.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Worker  # noqa: E402
from haulage.devtools.redis_server import free_port, start_redis  # noqa: E402


def commandstats() -> Counter[str]:
    from haulage.redis_client import get_redis

    stats = get_redis().info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="haulage-bench-rt-"))
    port = free_port()
    os.environ["HAULAGE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    os.environ["HAULAGE_MODULES"] = "bench.flows"
    redis_proc = start_redis(tmp / "redis", port, appendonly=True)
    worker = Worker(tmp, 2)
    try:
        from celery import chain

        from bench.flows import noop
        from haulage.workflows import registry

        registry.load_modules()
        worker.start()
        # Warm up (script loading, connections), then measure each side alone.
        chain(*[noop.s(i) for i in range(3)]).apply_async(queue="short").get(timeout=60)
        registry.get("bench_chain").start(length=3).wait(timeout=60)
        sides = {}
        for side in ("bare", "haulage"):
            before = commandstats()
            if side == "bare":
                chain(*[noop.s(i) for i in range(args.steps)]).apply_async(queue="short").get(timeout=120)
            else:
                registry.get("bench_chain").start(length=args.steps).wait(timeout=120)
            after = commandstats()
            # Idle workers poll the broker; the side's own count is what remains after the info calls.
            diff = after - before
            diff["info"] = 0
            sides[side] = +diff
        names = sorted(set(sides["bare"]) | set(sides["haulage"]), key=lambda n: -sides["haulage"][n])
        print(f"Redis commands per step ({args.steps}-step chain; a script is one command)")
        print(f"{'command':<14}{'bare':>8}{'haulage':>9}")
        for name in names:
            print(f"{name:<14}{sides['bare'][name] / args.steps:>8.2f}{sides['haulage'][name] / args.steps:>9.2f}")
        total_b, total_h = sum(sides["bare"].values()), sum(sides["haulage"].values())
        print(f"{'total':<14}{total_b / args.steps:>8.2f}{total_h / args.steps:>9.2f}")
    finally:
        worker.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
