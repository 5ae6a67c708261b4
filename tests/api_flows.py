"""Workflows for the HTTP service's tests: slow enough to watch a progress bar move.

Their steps run on the ``api_slow`` queue, which only the API tests' own
worker consumes (the session worker never takes them). Loaded through
HAULAGE_MODULES="...,tests.api_flows" by that worker and the API server.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from haulage.tasks import StepContext, step
from haulage.workflows import chain, fan_out, workflow
from tests.flows import square

QUEUE = "api_slow"


@step(queue=QUEUE, retries=0)
def api_crawl(ctx: StepContext, ticks: int, sleep: float) -> int:
    """Report progress ``ticks`` times, ``sleep`` seconds apart; stop early when the run is cancelled."""
    for i in range(1, ticks + 1):
        if ctx.cancelled:
            return i - 1
        time.sleep(sleep)
        ctx.progress(100.0 * i / ticks, f"tick {i} of {ticks}")
        ctx.add_cost("tick-model", usd=0.001, input_tokens=100, output_tokens=10)
    return ticks


@step(queue=QUEUE)
def api_report(ctx: StepContext, done: int) -> dict[str, Any]:
    return {"ticks": done}


@workflow("t_api_slow")
def t_api_slow(ticks: int = 8, sleep: float = 0.5) -> Any:
    """A run whose bar moves for about ticks * sleep seconds."""
    return chain(api_crawl.s(ticks=ticks, sleep=sleep), api_report.s())


@workflow("t_api_fan")
def t_api_fan(n: int = Field(ge=0, le=50), fail_on: list[int] = []) -> Any:  # noqa: B006
    """Ends in a fan-out, so its results are successes and failures (each with its parameters).

    The plan is built where the run is started (the API process), one entry per item: ``n`` is bounded,
    or one request could make the service build a billion-item plan (the fuzzer found that). The bound is
    a ``Field`` default because the engine reads hints without ``Annotated`` metadata.
    """
    return chain(fan_out(square, [{"x": i} for i in range(n)], kwargs={"fail_on": fail_on}))
