"""Workflows for tests/integration/test_no_silent_stall.py (their steps run on the ``stall`` queue only).

A queue of their own, so that the suite's shared worker never takes these
steps, and a worker started with other settings gets them (and only them).
"""

from __future__ import annotations

from typing import Any

from haulage.tasks import Results, StepContext, step
from haulage.workflows import chain, fan_out, workflow


@step(queue="stall", retries=1, backoff=0.05)
def big_value(ctx: StepContext, size: int, first_attempt_only: bool = False) -> str:
    """A result of ``size`` bytes of JSON (a string of size - 2 characters and its quotes)."""
    if first_attempt_only and ctx.attempt > 1:
        return "small"
    return "x" * (size - 2)


@step(queue="stall")
def stall_items(ctx: StepContext, n: int) -> list[dict[str, Any]]:
    return [{"size": 100} for _ in range(n - 1)] + [{"size": 3_000_000}]


@step(queue="stall")
def stall_total(ctx: StepContext, results: Results) -> dict[str, Any]:
    return {"ok": len(results.successes), "failed": len(results.failures)}


@step(queue="stall")
def stall_noop(ctx: StepContext, x: int) -> int:
    return x


@workflow("t_stall_big")
def t_stall_big(size: int, first_attempt_only: bool = False) -> Any:
    return chain(big_value.s(size=size, first_attempt_only=first_attempt_only))


@workflow("t_stall_big_items")
def t_stall_big_items(n: int) -> Any:
    return chain(stall_items.s(n=n), fan_out(big_value), stall_total.s())


@workflow("t_stall_noop")
def t_stall_noop(x: int) -> Any:
    return chain(stall_noop.s(x=x))
