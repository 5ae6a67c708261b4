"""Duplicates and crashes: the lock and the checkpoints keep every step's body to one run."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from haulage.coordination import RedisCoordination
from haulage.errors import LockUnavailable
from haulage.progress import get_store
from haulage.progress.models import RunRecord, RunStatus
from haulage.tasks.lock import StepLock
from haulage.workflows import registry
from tests.conftest import wait_until
from tests.integration.test_workflows import counts

pytestmark = pytest.mark.timeout(180)


@pytest.mark.chaos
def test_two_concurrent_deliveries_run_the_body_once(make_worker: Any, redis_client: Any) -> None:
    from tests.flows import slow_once

    w = make_worker(queues="crash", concurrency=2)
    w.start()
    run_id = uuid.uuid4().hex
    get_store().create_run(RunRecord(id=run_id, workflow="t_dup"))
    flow = {"workflow": "t_dup", "stage": 1, "stages": 2, "item": None, "units": 1, "input": "none",
            "on_failure": "collect", "attempt": 1}  # fmt: skip
    kwargs = {"run_id": run_id, "key": "1:slow_once", "params": {"value": 7, "sleep": 1.0}, "flow": flow}
    # The same message twice, at the same moment: a redelivery racing the original.
    task_id = uuid.uuid4().hex
    slow_once.task.apply_async(args=[], kwargs=kwargs, task_id=task_id, queue="crash")
    slow_once.task.apply_async(args=[], kwargs=kwargs, task_id=task_id, queue="crash")
    wait_until(lambda: get_store().get_checkpoints(run_id, ["1:slow_once"]), timeout=30, what="checkpoint")
    # Both deliveries finish (the second finds the lock, comes back, finds the checkpoint).
    wait_until(lambda: redis_client.llen("haulage:crash") == 0, timeout=30, what="queue drained")
    wait_until(lambda: not redis_client.exists(f"haulage:lock:{run_id}:1:slow_once"), timeout=30, what="lock released")
    assert counts(redis_client, run_id) == {"1:slow_once": 1}
    print(f"\nchaos d: same message delivered twice at once, body ran {counts(redis_client, run_id)['1:slow_once']} "
          "time(s)")  # fmt: skip


def test_lock_fails_closed_when_redis_errs() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    lock = StepLock(RedisCoordination(dead), "r", "0:s", ttl_seconds=10)
    with pytest.raises(LockUnavailable, match="cannot take step lock"):
        lock.acquire()


def test_lock_is_exclusive_and_released_only_by_its_holder(redis_client: Any) -> None:
    a = StepLock(RedisCoordination(redis_client), uuid.uuid4().hex, "0:s", ttl_seconds=10)
    b = StepLock(RedisCoordination(redis_client), a.run_id, "0:s", ttl_seconds=10)
    assert a.acquire() and not b.acquire()
    b.release()  # not the holder: the lock stays
    assert not b.acquire()
    a.release()
    assert b.acquire()
    assert 9000 < redis_client.pttl(b.key) <= 10000  # the TTL is what the step asked for
    b.release()


def test_crash_mid_fan_out_then_resume(worker: Any, make_worker: Any, redis_client: Any) -> None:
    """SIGKILL a worker mid fan-out, start another, resume: checkpointed steps never run again."""
    first = make_worker(queues="crash", concurrency=2)
    first.start()
    n = 30
    run = registry.get("t_slow_fan_out").start(n=n, sleep=0.15)

    def checkpointed() -> set[str]:
        return {s.key for s in run.steps() if s.status.value == "COMPLETE"}

    wait_until(lambda: len(checkpointed()) >= 6, timeout=60, what="six items checkpointed")
    first.kill()
    done_before = checkpointed()
    assert len(done_before) < n  # killed in the middle
    second = make_worker(queues="crash", concurrency=2)
    second.start()
    run.resume()
    record = run.wait(timeout=120)
    assert record.status is RunStatus.COMPLETE
    assert run.results() == {"sum": sum(range(n)), "failed": []}
    c = counts(redis_client, run.id)
    # Every step that had checkpointed before the crash ran its body exactly once.
    assert all(c[key] == 1 for key in done_before), {k: c[k] for k in done_before if c[k] != 1}
    assert len(c) == n and all(v >= 1 for v in c.values())
    # The guarded effect happened exactly once for every item, crash or not.
    effects = {k: int(redis_client.get(f"test:effect:{run.id}:{k}") or 0) for k in c}
    assert set(effects.values()) == {1}, effects
    repeated = sum(1 for v in c.values() if v > 1)
    print(f"\ncrash/replay: {n} items, {len(done_before)} checkpointed before SIGKILL, "
          f"{repeated} body re-run(s) (items in flight at the kill), 0 repeated effects")  # fmt: skip


def test_warm_shutdown_lets_running_steps_finish(worker: Any, make_worker: Any, redis_client: Any) -> None:
    import os
    import signal

    w = make_worker(queues="crash", concurrency=2)
    w.start()
    run = registry.get("t_slow_fan_out").start(n=2, sleep=1.5)
    wait_until(lambda: len([s for s in run.steps() if s.status.value == "RUNNING"]) == 2, timeout=30,
               what="both items running")  # fmt: skip
    os.kill(w.proc.pid, signal.SIGTERM)  # Celery's warm shutdown: finish what runs, take nothing new
    w.proc.wait(30)
    # The steps that were running finished and checkpointed before the worker left.
    assert {s.key: s.status.value for s in run.steps() if s.key.startswith("0:")} == {
        "0:slow_item[0]": "COMPLETE",
        "0:slow_item[1]": "COMPLETE",
    }
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    assert counts(redis_client, run.id) == {"0:slow_item[0]": 1, "0:slow_item[1]": 1}
