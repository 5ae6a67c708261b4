"""Waiting for a run: ``Run.wait`` learns of the end by subscription, with a slow safety net.

Each test passes a safety-net interval far above what the test allows, so a
wait that polled instead of listening could only answer after it: these fail
on a polling ``wait``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from haulage import keys
from haulage.workflows import RunStatus, registry
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.timeout(120)

#: far above any bound asserted below: an answer within the bound came from the subscription
SLOW_POLL = 60.0


def test_wait_returns_when_the_run_ends_not_at_the_next_poll(worker: WorkerProcess) -> None:
    run = registry.get("t_chain").start(x=3)
    started = time.monotonic()
    record = run.wait(timeout=45, poll=SLOW_POLL)
    assert record.status is RunStatus.COMPLETE
    assert time.monotonic() - started < 20  # a poll-driven wait would sleep to its 45 s timeout
    assert run.results() == 16


def test_wait_ends_when_another_process_cancels(worker: WorkerProcess) -> None:
    # Its steps go to the "crash" queue, which the shared worker does not serve: the run stays queued.
    run = registry.get("t_slow_fan_out").start(n=2)
    threading.Timer(0.5, run.cancel).start()
    started = time.monotonic()
    record = run.wait(timeout=45, poll=SLOW_POLL)
    assert record.status is RunStatus.CANCELLED
    assert time.monotonic() - started < 20


def test_a_missed_notice_only_delays_the_answer(worker: WorkerProcess, redis_client: Any) -> None:
    run = registry.get("t_slow_fan_out").start(n=2)

    def end_silently() -> None:
        # Written behind the store's back: no change notice is published for it.
        redis_client.hset(keys.run(run.id), "status", '"CANCELLED"')

    threading.Timer(0.3, end_silently).start()
    record = run.wait(timeout=30, poll=0.5)  # the safety net re-reads the document every 0.5 s
    assert record.status is RunStatus.CANCELLED
