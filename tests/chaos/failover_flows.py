"""Workflows of tests/chaos/test_failover.py: a fan-out whose items do CPU work and one guarded effect.

The effects land in a Redis of their own (FAILOVER_EFFECTS_URL, a plain
redis-server that never fails over), standing for the external system a
guarded block calls: a failover of Haulage's Redis cannot lose or invent what
is counted there. ``calls:<step>`` counts every time an item's effect ran,
``ids`` keeps the guard ids it was called with, ``bodies:<step>`` every start of
an item's body.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import redis

from haulage.tasks import Results, StepContext, step
from haulage.workflows import chain, fan_out, workflow


def effects() -> redis.Redis:
    return redis.Redis.from_url(os.environ["FAILOVER_EFFECTS_URL"])


def tag(run_id: str) -> str:
    return f"failover:{run_id}"


def _work(seconds: float) -> str:
    """CPU work for about ``seconds``: the item's real job."""
    digest, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:8]


@step()
def failover_item(ctx: StepContext, x: int, work: float) -> int:
    r = effects()
    r.incr(f"{tag(ctx.run_id)}:bodies:{ctx.step_key}")
    _work(work)
    with ctx.once("effect") as first:
        if first:
            r.incr(f"{tag(ctx.run_id)}:calls:{ctx.step_key}")
            r.sadd(f"{tag(ctx.run_id)}:ids", ctx.guard_id("effect"))
    return x


@step()
def failover_total(ctx: StepContext, results: Results) -> dict[str, Any]:
    return {"count": len(results.successes), "sum": sum(results.successes), "failed": len(results.failures)}


@workflow("t_failover")
def t_failover(n: int, work: float = 0.2) -> Any:
    return chain(fan_out(failover_item, [{"x": i} for i in range(n)], kwargs={"work": work}), failover_total.s())
