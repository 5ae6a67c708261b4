"""Steps and workflows for tests/test_dispatch.py (workers load them via HAULAGE_MODULES).

Each probe step reports where it ran (pid, parent pid, backend) and the env
a Cloud Run execution gets. Probes differ only in their options: each owns a
queue (``queue=``) so that the workers of one test, with their own Cloud Run
settings, are the only ones that drive or run it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from haulage.tasks import Results, StepContext, step
from haulage.tasks.step import get_step
from haulage.workflows import chain, fan_out, workflow
from tests.flows import count

ENV_KEYS = ("JOB_NAME", "HAULAGE_RUN_ID", "HAULAGE_STEP_KEY", "HAULAGE_ATTEMPT", "CLOUD_RUN_TASK_INDEX",
            "CLOUD_RUN_TASK_COUNT", "CLOUD_RUN_EXECUTION")  # fmt: skip


def _probe(ctx: StepContext, prev: Any = None, value: int = 0, sleep: float = 0.0,
           fail_on: list[int] | None = None, fail_attempts: int = 0) -> dict[str, Any]:  # fmt: skip
    count(f"{ctx.run_id}:{ctx.step_key}")
    # Not ctx.cancelled: the tests check that cancelling the execution is what stops it.
    deadline = time.monotonic() + sleep
    while time.monotonic() < deadline:
        time.sleep(0.05)
    if fail_on and value in fail_on:
        raise ValueError(f"bad item {value}")
    if ctx.attempt <= fail_attempts:
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return {"value": value, "prev": prev, "pid": os.getpid(), "ppid": os.getppid(), "backend": ctx.backend,
            "attempt": ctx.attempt, "env": {k: os.environ.get(k) for k in ENV_KEYS}}  # fmt: skip


def _declare(name: str, **options: Any) -> Any:
    def probe(ctx: StepContext, prev: Any = None, value: int = 0, sleep: float = 0.0,
              fail_on: list[int] | None = None, fail_attempts: int = 0) -> dict[str, Any]:  # fmt: skip
        return _probe(ctx, prev, value, sleep, fail_on, fail_attempts)

    probe.__qualname__ = probe.__name__ = name
    return step(name=name, runtime="long", **options)(probe)


# Routed by HAULAGE_DISPATCH_MODE where the plan is built (no dispatch= option).
mode_probe = _declare("mode_probe", queue="dt_cloud", retries=0)
# Pinned to Cloud Run whatever the mode, so a fan-out expanded by any worker sends it there.
cr_probe = _declare("cr_probe", dispatch="cloudrun", queue="dt_cloud", retries=1, backoff=0.05)
local_probe = _declare("local_probe", dispatch="local", queue="dt_cloud", retries=1, backoff=0.05)
deadline_probe = _declare("deadline_probe", dispatch="cloudrun", queue="dt_cloud", retries=0, hard_timeout=1)
timeout_probe = _declare("timeout_probe", dispatch="cloudrun", queue="dt_cloud", retries=1, backoff=0.05,
                         hard_timeout=1)  # fmt: skip
down_probe = _declare("down_probe", dispatch="cloudrun", queue="dt_down", retries=0)
kill_probe = _declare("kill_probe", dispatch="cloudrun", queue="dt_kill", retries=0)


@step(queue="dt_cloud")
def seed(ctx: StepContext, value: int) -> dict[str, Any]:
    return {"seed": value}


@step(queue="dt_cloud")
def gather(ctx: StepContext, results: Results) -> dict[str, Any]:
    # Not the keys of Results.to_dict(), which run.results() would turn back into Results.
    return {
        "ok": results.successes,
        "failed": [{"params": f.params, "error_type": f.error_type, "message": f.message} for f in results.failures],
    }


@workflow("dt_one")
def dt_one(step: str, value: int = 0, sleep: float = 0.0, fail_attempts: int = 0) -> Any:
    return chain(get_step(step).s(value=value, sleep=sleep, fail_attempts=fail_attempts))


@workflow("dt_chain")
def dt_chain(step: str, value: int) -> Any:
    return chain(seed.s(value=value), get_step(step).s(value=value))


@workflow("dt_fan")
def dt_fan(step: str, n: int, fail_on: list[int] = []) -> Any:  # noqa: B006 - pydantic copies defaults
    return chain(fan_out(get_step(step), [{"value": i} for i in range(n)], kwargs={"fail_on": fail_on}), gather.s())
