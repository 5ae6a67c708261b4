"""A scheduled workflow for the beat scenario (tests/chaos/test_scenarios.py): only the beat world loads it."""

from __future__ import annotations

from typing import Any

from haulage.workflows import chain, fan_out, workflow
from tests.chaos.scenario_flows import chaos_sum, chaos_work

#: seconds between ticks
EVERY = 2.0


@workflow("chaos_tick", schedule=EVERY, schedule_params={"n": 2})
def chaos_tick(n: int = 2) -> Any:
    items = [{"x": i} for i in range(n)]
    return chain(fan_out(chaos_work, items, kwargs={"seconds": 0.01, "effect_seconds": 0.0}), chaos_sum.s())
