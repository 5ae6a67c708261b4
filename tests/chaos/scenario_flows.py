"""The workflow every chaos scenario runs: a fan-out of CPU work, each item with one guarded effect.

What the scenarios count is written outside the engine, to a Redis of its own
(``CHAOS_SIDE_URL``, the test session's server, which no scenario kills):

- ``chaos:{run}:running``: pool process id -> the step key its body is running (for the killer);
- ``chaos:{run}:fx:{guard_id}``: one entry per performance of the item's guarded effect (an attempt id);
- ``chaos:{run}:marked``: the attempts whose guarded block ended, so the guard was marked done.

A second performance after an attempt in ``marked`` is a duplicate; one after
attempts that never reached ``marked`` is a redo of an effect whose outcome was
unknown (the claimant died inside the block), which ``on_unknown="redo"`` allows.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import redis

from haulage.tasks import Results, StepContext, step
from haulage.workflows import chain, fan_out, workflow

QUEUE = "chaos"


def side() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CHAOS_SIDE_URL"])


def ns(run_id: str) -> str:
    return f"chaos:{run_id}"


def spin(seconds: float) -> int:
    """Burn CPU for ``seconds`` (the item's real work; a kill lands in it most of the time)."""
    end, total = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        total += sum(i * i for i in range(500))
    return total


# Retries and on_unknown as a user gets them: the defaults.
@step(queue=QUEUE)
def chaos_work(ctx: StepContext, x: int, seconds: float, effect_seconds: float) -> int:
    r, pid, attempt = side(), str(os.getpid()), uuid.uuid4().hex
    r.hset(f"{ns(ctx.run_id)}:running", pid, ctx.step_key)
    spin(seconds)
    with ctx.once("effect") as first:
        if first:
            r.rpush(f"{ns(ctx.run_id)}:fx:{ctx.guard_id('effect')}", attempt)
            time.sleep(effect_seconds)  # the effect's own time (a call to another system): some kills land here
    r.sadd(f"{ns(ctx.run_id)}:marked", attempt)
    r.hdel(f"{ns(ctx.run_id)}:running", pid)
    return x


@step(queue=QUEUE)
def chaos_sum(ctx: StepContext, results: Results) -> dict[str, Any]:
    return {"count": len(results.successes), "sum": sum(results.successes), "failed": len(results.failures)}


@workflow("chaos_fan_out")
def chaos_fan_out(n: int, seconds: float = 0.05, effect_seconds: float = 0.02) -> Any:
    items = [{"x": i} for i in range(n)]
    return chain(fan_out(chaos_work, items, kwargs={"seconds": seconds, "effect_seconds": effect_seconds}),
                 chaos_sum.s())  # fmt: skip


# A long step pinned to Cloud Run (the local server in tests): its dispatch worker polls the execution.
@step(runtime="long", dispatch="cloudrun", queue=QUEUE)
def chaos_long(ctx: StepContext, x: int, seconds: float) -> int:
    r, attempt = side(), uuid.uuid4().hex
    time.sleep(seconds)  # the job's own time: the dispatch worker is killed while it polls
    with ctx.once("effect") as first:
        if first:
            r.rpush(f"{ns(ctx.run_id)}:fx:{ctx.guard_id('effect')}", attempt)
    r.sadd(f"{ns(ctx.run_id)}:marked", attempt)
    return x


@workflow("chaos_cloud_fan_out")
def chaos_cloud_fan_out(n: int, seconds: float = 4.0) -> Any:
    return chain(fan_out(chaos_long, [{"x": i} for i in range(n)], kwargs={"seconds": seconds}), chaos_sum.s())
