"""Workflows and steps used by the test suite (loaded by test workers via HAULAGE_MODULES)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis

from haulage.tasks import Results, StepContext, step
from haulage.workflows import chain, fan_out, workflow


def _counter() -> redis.Redis:
    # Counts kept outside the engine: how many times a body really ran.
    return redis.Redis.from_url(os.environ["HAULAGE_REDIS_URL"])


def count(name: str) -> int:
    return int(_counter().incr(f"test:count:{name}"))


@step
def add(ctx: StepContext, x: int, y: int = 0) -> int:
    count(f"{ctx.run_id}:{ctx.step_key}")
    return x + y


@step
def double(ctx: StepContext, value: int) -> int:
    count(f"{ctx.run_id}:{ctx.step_key}")
    return value * 2


@step
def make_items(ctx: StepContext, n: int) -> list[dict[str, Any]]:
    return [{"x": i} for i in range(n)]


@step(retries=1, backoff=0.05)
def square(ctx: StepContext, x: int, fail_on: list[int] | None = None, sleep: float = 0.0) -> int:
    count(f"{ctx.run_id}:{ctx.step_key}")
    if sleep:
        time.sleep(sleep)
    if fail_on and x in fail_on:
        raise ValueError(f"bad item {x}")
    return x * x


@step
def total(ctx: StepContext, results: Results) -> dict[str, Any]:
    return {"sum": sum(results.successes), "failed": [f.params for f in results.failures]}


@workflow("t_chain")
def t_chain(x: int) -> Any:
    return chain(add.s(x=x, y=1), double.s(), double.s())


@workflow("t_static")
def t_static(n: int) -> Any:
    return chain(fan_out(square, [{"x": i} for i in range(n)]), total.s())


@workflow("t_dynamic")
def t_dynamic(n: int, fail_on: list[int] = []) -> Any:  # noqa: B006 - pydantic copies defaults
    return chain(make_items.s(n=n), fan_out(square, kwargs={"fail_on": fail_on}), total.s())


@workflow("t_dynamic_fail", on_failure="fail")
def t_dynamic_fail(n: int, fail_on: list[int] = []) -> Any:  # noqa: B006
    return chain(make_items.s(n=n), fan_out(square, kwargs={"fail_on": fail_on}), total.s())


@step
def inc(ctx: StepContext, value: int) -> int:
    count(f"{ctx.run_id}:{ctx.step_key}")
    return value + 1


@workflow("t_nested")
def t_nested(n: int) -> Any:
    # each item runs square then inc; chains inside chains flatten
    return chain(chain(make_items.s(n=n)), fan_out(chain(square, inc.s())), total.s())


@step(retries=2, backoff=0.05)
def flaky(ctx: StepContext, value: int, key: str, fail_times: int) -> str:
    """Fails its first ``fail_times`` attempts (counted outside the engine)."""
    if count(f"flaky:{key}") <= fail_times:
        raise ConnectionError(f"flaky failure {ctx.attempt}")
    return f"ok after {ctx.attempt}"


@workflow("t_flaky")
def t_flaky(key: str, fail_times: int) -> Any:
    return chain(add.s(x=1), flaky.s(key=key, fail_times=fail_times))


@step(retries=0)
def gated(ctx: StepContext, value: int, gate: str) -> int:
    """Fails until the gate key is set in Redis: a failure fixed by an operator, then resumed."""
    count(f"{ctx.run_id}:{ctx.step_key}")
    if not _counter().exists(f"test:gate:{gate}"):
        raise RuntimeError(f"gate {gate} closed")
    return value * 10


@workflow("t_gated")
def t_gated(x: int, gate: str) -> Any:
    return chain(add.s(x=x), gated.s(gate=gate), double.s())


@step
def not_json(ctx: StepContext) -> Any:
    count(f"{ctx.run_id}:{ctx.step_key}")
    return {1, 2, 3}


@workflow("t_not_json")
def t_not_json() -> Any:
    return chain(not_json.s())


@workflow("t_bad_plan")
def t_bad_plan(x: int) -> Any:
    return {"not": "a plan"}


@step(queue="crash", retries=3, backoff=0.1)
def slow_item(ctx: StepContext, x: int, sleep: float = 0.2) -> int:
    """Runs on the 'crash' queue, which only a test's own workers consume."""
    count(f"{ctx.run_id}:{ctx.step_key}")  # counted when the body starts: a killed body counts too
    time.sleep(sleep)
    with ctx.once("effect") as first:
        if first:
            _counter().incr(f"test:effect:{ctx.run_id}:{ctx.step_key}")
    return x


@workflow("t_slow_fan_out")
def t_slow_fan_out(n: int, sleep: float = 0.2) -> Any:
    return chain(fan_out(slow_item, [{"x": i} for i in range(n)], kwargs={"sleep": sleep}), total.s())


@step(queue="crash", retries=0)
def slow_once(ctx: StepContext, value: int, sleep: float = 1.0) -> int:
    count(f"{ctx.run_id}:{ctx.step_key}")
    time.sleep(sleep)
    return value


@workflow("t_tick", schedule=2.0, schedule_params={"x": 1})
def t_tick(x: int) -> Any:
    """Scheduled every 2 s; only a running beat starts it."""
    return chain(add.s(x=x))


@step
def crawl(ctx: StepContext, stages: int, pause: float = 0.15) -> int:
    """Reports progress a few times, so that watchers see the bar move."""
    for i in range(1, stages + 1):
        time.sleep(pause)
        ctx.progress(100 * i / stages, f"stage {i} of {stages}")
    ctx.add_cost("test-model", usd=0.01, input_tokens=10, output_tokens=5)
    return stages


@workflow("t_progress")
def t_progress(stages: int = 5, pause: float = 0.15) -> Any:
    return chain(crawl.s(stages=stages, pause=pause), double.s())


@step(retries=2, backoff=0.05)
def ledgered(ctx: StepContext, n: int, fail_at: int) -> int:
    """Processes n items; the first attempt fails at item ``fail_at``; retries skip what landed."""
    processed = 0
    for item in ctx.ledger("items").pending(range(n)):
        count(f"{ctx.run_id}:item:{item}")
        if item == fail_at and ctx.attempt == 1:
            raise ConnectionError(f"lost the connection at item {item}")
        processed += 1
    return processed


@workflow("t_ledger")
def t_ledger(n: int, fail_at: int) -> Any:
    return chain(ledgered.s(n=n, fail_at=fail_at))


@step(queue="crash")
def chatty(ctx: StepContext, x: int) -> int:
    logging.getLogger("haulage.app.chatty").info("working on %s", x)
    ctx.log.warning("through the step's own logger: %s", x)
    return x


@workflow("t_chatty")
def t_chatty(x: int) -> Any:
    return chain(chatty.s(x=x))


@step(queue="crash", retries=2, hard_timeout=2)
def hang_once(ctx: StepContext, x: int) -> int:
    """The first attempt hangs past its hard timeout; later ones return."""
    if count(f"hang:{ctx.run_id}") == 1:
        time.sleep(60)
    return x


@workflow("t_hang")
def t_hang(x: int) -> Any:
    return chain(hang_once.s(x=x))


@step(retries=1, backoff=30)
def backoff_once(ctx: StepContext, key: str) -> str:
    """Fails once, then waits out a long backoff (capped by HAULAGE_MAX_COUNTDOWN)."""
    if count(f"backoff:{key}") == 1:
        raise ConnectionError("first attempt fails")
    return "ok"


@workflow("t_backoff")
def t_backoff(key: str) -> Any:
    return chain(backoff_once.s(key=key))


@step(queue="inproc")
def where_am_i(ctx: StepContext, x: int) -> dict[str, int]:
    """Runs on the 'inproc' queue, which only the in-process test worker consumes."""
    return {"x": x, "pid": os.getpid()}


@workflow("t_inproc")
def t_inproc(x: int) -> Any:
    return chain(where_am_i.s(x=x))


@workflow("t_followed", on_complete="t_chain", on_complete_params=lambda event, results: {"x": results})
def t_followed(x: int) -> Any:
    """When a run ends COMPLETE, t_chain starts with its result as x."""
    return chain(add.s(x=x))


@step
def pass_rows(ctx: StepContext, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Returns the rows as given: a fan-out's items exactly as a user's step produced them."""
    return rows


@workflow("t_rows")
def t_rows(rows: list[dict[str, Any]]) -> Any:
    return chain(pass_rows.s(rows=rows), fan_out(square), total.s())
