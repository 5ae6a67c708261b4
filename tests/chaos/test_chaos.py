"""Chaos beside the SIGKILL scenarios: steps hanging past their hard timeout, failing, in backoff, cancelled.

These run on the session's worker with the suite's short settings (they test
the retry policy and the reaper, not recovery times). The SIGKILL and Redis
restart scenarios on the settings a user gets are tests/chaos/test_scenarios.py.
Run the tier alone with `bash scripts/test -m chaos -s`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from haulage.progress.models import RunStatus, StepStatus
from tests.conftest import WorkerProcess, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def test_hard_timeout_kills_and_retries(worker: WorkerProcess, make_worker: Any, redis_client: Any) -> None:
    from haulage.workflows import registry

    w = make_worker(queues="crash", concurrency=1)
    w.start()
    began = time.monotonic()
    run = registry.get("t_hang").start(x=5)
    record = run.wait(timeout=90)
    assert record.status is RunStatus.COMPLETE and run.results() == 5
    step = {s.key: s for s in run.steps()}["0:hang_once"]
    assert step.attempt == 2
    assert any("TimeLimitExceeded" in e.message for e in record.history if e.kind == "retry")
    print(f"\nchaos c1: hard timeout 2s, attempts={step.attempt}, seconds={time.monotonic() - began:.1f}")


def test_always_failing_step_ends_failed_after_its_attempts(worker: WorkerProcess) -> None:
    from haulage.workflows import registry

    began = time.monotonic()
    run = registry.get("t_flaky").start(key=uuid.uuid4().hex, fail_times=100)
    record = run.wait(timeout=60)
    assert record.status is RunStatus.FAILED
    assert record.error == "step 1:flaky failed: ConnectionError: flaky failure 3"
    assert len([e for e in record.history if e.kind == "retry"]) == 2
    print(f"\nchaos c2: always failing, attempts=3, status=FAILED, seconds={time.monotonic() - began:.1f}")


def test_step_in_backoff_is_not_reaped(worker: WorkerProcess) -> None:
    from haulage.workflows import registry
    from haulage.workflows.reaper import reap

    run = registry.get("t_backoff").start(key=uuid.uuid4().hex)
    wait_until(lambda: any(s.status is StepStatus.QUEUED and s.retry_at for s in run.steps()), timeout=30,
               what="the step to wait out its backoff")  # fmt: skip
    report = reap(stale_seconds=0.01)  # everything looks stale at this threshold
    assert run.id in report.waiting and run.id not in report.resumed
    record = run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETE and record.recoveries == 0
    print(f"\nchaos c3: step in backoff seen by the reaper: waiting, not resumed (recoveries={record.recoveries})")


def test_reaper_resumes_a_stale_run_then_gives_up(worker: WorkerProcess) -> None:
    from haulage.progress import get_store
    from haulage.progress.models import RunUpdate
    from haulage.workflows import registry
    from haulage.workflows.reaper import reap

    run = registry.get("t_chain").start(x=1)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    store = get_store()
    # A run whose worker vanished: back to PROCESSING, heartbeat long ago, its last checkpoints gone.
    store.transition(run.id, RunStatus.PROCESSING, allowed_from={RunStatus.COMPLETE},
                     update=RunUpdate(set={"heartbeat": 1.0, "finished_at": None}))  # fmt: skip
    report = reap(stale_seconds=60, limit_recoveries=1)
    assert run.id in report.resumed
    assert run.wait(timeout=30).status is RunStatus.COMPLETE and run.status().recoveries == 1
    store.transition(run.id, RunStatus.PROCESSING, allowed_from={RunStatus.COMPLETE},
                     update=RunUpdate(set={"heartbeat": 1.0}))  # fmt: skip
    report = reap(stale_seconds=60, limit_recoveries=1)
    assert run.id in report.failed
    record = run.status()
    assert record.status is RunStatus.FAILED and "giving up" in (record.error or "")
    assert record.history[-1].kind == "reaped"


def test_cancel_mid_fan_out_starts_no_new_item(worker: WorkerProcess, make_worker: Any, redis_client: Any) -> None:
    from haulage.workflows import registry
    from tests.integration.test_workflows import counts

    w = make_worker(queues="crash", concurrency=2)
    w.start()
    began = time.monotonic()
    run = registry.get("t_slow_fan_out").start(n=40, sleep=0.2)
    wait_until(lambda: run.status().steps.done >= 5, timeout=30, what="some items done")
    run.cancel()
    at_cancel = len(counts(redis_client, run.id))
    wait_until(lambda: all(s.status is not StepStatus.RUNNING for s in run.steps()), timeout=30,
               what="items in flight to finish")  # fmt: skip
    after = len(counts(redis_client, run.id))
    assert after <= at_cancel + 2 and run.status().status is RunStatus.CANCELLED
    print(f"\nchaos e: cancelled at {at_cancel} of 40 items started, {after} started in all, "
          f"seconds={time.monotonic() - began:.1f}")  # fmt: skip
