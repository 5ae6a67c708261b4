"""Workflows for the chaos suite's own world (its own Redis, workers and beat)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from haulage.tasks import Results, StepContext, step
from haulage.workflows import chain, fan_out, workflow


def _r() -> redis.Redis:
    return redis.Redis.from_url(os.environ["HAULAGE_REDIS_URL"])


@step(queue="chaos", retries=5, backoff=0.2)
def chaos_item(ctx: StepContext, x: int, sleep: float) -> int:
    r = _r()
    r.incr(f"chaos:body:{ctx.run_id}:{ctx.step_key}")
    time.sleep(sleep)
    with ctx.once("effect") as first:
        if first:  # the guarded side effect, counted outside the engine
            r.incr(f"chaos:effect:{ctx.run_id}:{ctx.step_key}")
    return x


@step(queue="chaos")
def chaos_total(ctx: StepContext, results: Results) -> dict[str, Any]:
    return {"count": len(results.successes), "sum": sum(results.successes), "failed": len(results.failures)}


@workflow("t_chaos")
def t_chaos(n: int, sleep: float = 0.1) -> Any:
    return chain(fan_out(chaos_item, [{"x": i} for i in range(n)], kwargs={"sleep": sleep}), chaos_total.s())
