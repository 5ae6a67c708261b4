"""Workflows of tests/chaos/test_orphans.py: steps that say which worker runs them, so a test can kill it."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from haulage.tasks import StepContext, step
from haulage.workflows import chain, workflow


def _r() -> redis.Redis:
    return redis.Redis.from_url(os.environ["HAULAGE_REDIS_URL"])


def _started(ctx: StepContext) -> None:
    """Count the body's start and name the worker's main process (the pool child's parent) running it."""
    r = _r()
    r.set(f"orphans:worker:{ctx.run_id}", os.getppid())
    r.incr(f"orphans:body:{ctx.run_id}")


@step(retries=0)
def orphan_slow(ctx: StepContext, sleep: float) -> int:
    _started(ctx)
    time.sleep(sleep)
    return int(_r().get(f"orphans:body:{ctx.run_id}") or 0)


@workflow("t_orphan")
def t_orphan(sleep: float = 4.0) -> Any:
    return chain(orphan_slow.s(sleep=sleep))


@step(retries=1, backoff=25, jitter=False)
def orphan_flaky(ctx: StepContext) -> int:
    """Fails its first attempt: its retry waits 25 s, unacknowledged, in the worker that holds it."""
    _started(ctx)
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return ctx.attempt


@workflow("t_orphan_countdown")
def t_orphan_countdown() -> Any:
    return chain(orphan_flaky.s())
