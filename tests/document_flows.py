"""Workflows for the run-document tests (tests/integration/test_documents.py and tests/frontend/)."""

from __future__ import annotations

import time
from typing import Any

from haulage import Results, StepContext, chain, fan_out, step, workflow


@step
def list_items(ctx: StepContext, n: int, fail_on: list[int]) -> list[dict[str, Any]]:
    ctx.progress(50, f"listing {n} items")
    return [{"x": i, "fail": i in fail_on} for i in range(n)]


@step(retries=0)
def work_item(ctx: StepContext, x: int, fail: bool, pause: float = 0.0) -> int:
    ctx.progress(30, f"item {x}: started")
    ctx.add_cost("model-d", usd=0.000546, input_tokens=10, output_tokens=2)
    if pause:
        time.sleep(pause)
    ctx.progress(80, f"item {x}: almost")
    if fail:
        raise ValueError(f"item {x} cannot be worked")
    return x * 10


@step
def reduce_items(ctx: StepContext, results: Results) -> dict[str, Any]:
    return {"sum": sum(results.successes), "failed": len(results.failures)}


@workflow("t_docs")
def t_docs(n: int = 6, fail_on: list[int] = [], pause: float = 0.0) -> Any:  # noqa: B006 - pydantic copies defaults
    """A fan-out with failures followed by a reduce stage: what a frontend's run page shows."""
    return chain(list_items.s(n=n, fail_on=fail_on), fan_out(work_item, kwargs={"pause": pause}, label="item {x}"),
                 reduce_items.s())  # fmt: skip
