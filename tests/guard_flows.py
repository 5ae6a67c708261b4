"""A guarded effect that a test can kill a worker inside (tests/chaos/test_guards_under_kills.py).

The counts live in Redis, outside the engine: ``calls`` is every time the
effect ran, ``ids`` the distinct ``guard_id`` values it was called with (what a
system that deduplicates on the guard id keeps), ``claims`` the attempts that
were told to perform it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from haulage.tasks import StepContext, step
from haulage.tasks.guards import OnUnknown
from haulage.workflows import chain, workflow

#: seconds a held block waits for the test before giving up (the test kills it long before)
HOLD_LIMIT = 120.0


def _r() -> redis.Redis:
    return redis.Redis.from_url(os.environ["HAULAGE_REDIS_URL"])


def tag(run_id: str) -> str:
    return f"test:guards:{run_id}"


def _effect(r: redis.Redis, ctx: StepContext) -> None:
    r.incr(f"{tag(ctx.run_id)}:calls")
    r.sadd(f"{tag(ctx.run_id)}:ids", ctx.guard_id("effect"))


def hold_key(hold: str) -> str:
    return f"test:guards:hold:{hold}"


def _hold(r: redis.Redis, hold: str) -> None:
    """Wait while the test's hold flag is up: the test kills the worker during this wait."""
    deadline = time.monotonic() + HOLD_LIMIT
    while hold and r.exists(hold_key(hold)) and time.monotonic() < deadline:
        time.sleep(0.05)


@step(queue="guards", retries=2, backoff=0.2)
def guarded_effect(ctx: StepContext, on_unknown: OnUnknown, kill_at: str = "before", hold: str = "") -> dict[str, Any]:
    """``kill_at`` "before": the claim returned, the effect not yet done; "after": done, not yet marked.

    ``hold`` names a flag the test raises before the run starts, so the first
    attempt cannot pass its block before the test kills it.
    """
    r = _r()
    with ctx.once("effect", on_unknown=on_unknown) as first:
        if first:
            r.rpush(f"{tag(ctx.run_id)}:claims", ctx.attempt)
            if kill_at == "after":
                _effect(r, ctx)
            _hold(r, hold)
            if kill_at == "before":
                _effect(r, ctx)
    return {"performed": first, "attempt": ctx.attempt}


@workflow("t_guard_kill")
def t_guard_kill(on_unknown: str, kill_at: str = "before", hold: str = "") -> Any:
    return chain(guarded_effect.s(on_unknown=on_unknown, kill_at=kill_at, hold=hold))
