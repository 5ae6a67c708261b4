"""Haulage's own fan-in on real workers: chunked publishing, one continuation, Results in item order.

The crash side (a worker killed mid fan-out, a redelivered item, a resume) is
covered by tests/chaos and test_durability, which run over the same fan-in.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from haulage import keys
from haulage.workflows import RunStatus, registry
from haulage.workflows.fanout import PUBLISH_CHUNK
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.timeout(240)


def test_a_fan_out_larger_than_a_chunk_fans_in_once_with_every_item(worker: WorkerProcess, redis_client: Any) -> None:
    n = 2 * PUBLISH_CHUNK + 3  # three publishing chunks, the last one short
    fail_on = [5, n - 1]
    run = registry.get("t_dynamic").start(n=n, fail_on=fail_on)
    record = run.wait(timeout=200)
    assert record.status is RunStatus.COMPLETE, record.error
    out = run.results()
    assert out["sum"] == sum(i * i for i in range(n) if i not in fail_on)
    assert [p["x"] for p in out["failed"]] == fail_on  # the failures in item order, with their parameters
    assert record.steps.done + record.steps.failed == record.steps.total
    # The rest of the chain was published by the fan-in (once marked, never again), not by a chord.
    assert redis_client.get(keys.fan_in(run.id, 1, "continued")) == b"1"
    assert redis_client.hlen(keys.fan_in(run.id, 1, "ok")) == n - len(fail_on)
    assert redis_client.hlen(keys.fan_in(run.id, 1, "failed")) == len(fail_on)


def test_start_returns_at_once_for_a_large_dynamic_fan_out(worker: WorkerProcess) -> None:
    started = time.monotonic()
    run = registry.get("t_dynamic").start(n=20_000)
    took = time.monotonic() - started
    try:
        # The items are made and published by workers; the caller only records the run and sends its first task.
        assert took < 2.0, f"start() took {took:.2f}s"
    finally:
        run.cancel()


def test_an_empty_fan_out_carries_on(worker: WorkerProcess) -> None:
    run = registry.get("t_dynamic").start(n=0)
    record = run.wait(timeout=60)
    assert record.status is RunStatus.COMPLETE, record.error
    assert run.results() == {"sum": 0, "failed": []}


def test_a_continuation_waits_for_items_a_resume_is_running_again(redis_server: str) -> None:
    """A stage published before a resume must not go on with the part of the fan-in that has landed."""
    import uuid

    from haulage.coordination import get_coordination
    from haulage.tasks.fan_in import FanInIncomplete, marker, resolve_input

    run_id, coordination = uuid.uuid4().hex, get_coordination()
    coordination.fan_in_open(run_id, 1, [], opener="first")
    ok = {"k": "1:s[0]", "ok": 1, "i": 0}
    coordination.fan_in_add(run_id, 1, {0: ok, 1: {"k": "1:s[1]", "ok": 0, "i": 1}}, 2, "t", 30)
    coordination.fan_in_open(run_id, 1, [], opener="resume")  # item 1 runs again; its failure is cleared
    with pytest.raises(FanInIncomplete, match="1 of 2 items have landed"):
        resolve_input(marker(run_id, 1, 2))
    coordination.fan_in_add(run_id, 1, {1: {"k": "1:s[1]", "ok": 1, "i": 1}}, 2, "t2", 30)
    assert sorted(r["i"] for r in resolve_input(marker(run_id, 1, 2))) == [0, 1]
