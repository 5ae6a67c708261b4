"""The work both sides of the benchmark do: no-op tasks, bare and as Haulage steps."""

from __future__ import annotations

from typing import Any

from tasks import StepContext, app, step
from workflows import chain, fan_out, workflow

CHAIN_LENGTH = 50
FAN_OUT = 1000


@app.task(name="bench.noop")
def noop(*args: Any, **kwargs: Any) -> None:
    return None


@step(name="bench_noop")
def noop_step(ctx: StepContext, *args: Any, **kwargs: Any) -> None:
    return None


@workflow("bench_chain")
def bench_chain(length: int = CHAIN_LENGTH) -> Any:
    return chain(*[noop_step.s(i=i) for i in range(length)])


@workflow("bench_fan_out")
def bench_fan_out(items: int = FAN_OUT) -> Any:
    return chain(fan_out(noop_step, [{"i": i} for i in range(items)]))
