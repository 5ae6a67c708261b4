"""The in-memory Store twin, beyond the contract it shares with Redis and Firestore (tests/contract).

What a unit test relying on it sees: change feeds that fire on writes,
records that are copies, counters that add up under threads, and the errors
RedisStore raises for values JSON cannot hold.
"""

from __future__ import annotations

import threading

import pytest

from haulage.progress.memory_store import MemoryStore
from haulage.progress.models import ACTIVE, Event, RunRecord, RunStatus, RunUpdate, StepCounts, now

pytestmark = pytest.mark.timeout(30)


def test_a_change_feed_fires_on_writes_and_times_out_without() -> None:
    store = MemoryStore()
    store.create_run(RunRecord(id="r1", workflow="wf"))
    feed = store.watch_changes("r1")
    try:
        assert not feed.wait(0.05)
        store.update_run("r1", RunUpdate(incr={"steps.done": 1}))
        store.update_run("r1", RunUpdate(incr={"steps.done": 1}))
        assert feed.wait(5)  # both writes are reported by one wait
        assert not feed.wait(0.05)
        waiter = threading.Thread(target=lambda: store.transition("r1", RunStatus.COMPLETE, allowed_from=ACTIVE))
        waiter.start()
        assert feed.wait(5)
        waiter.join(5)
    finally:
        feed.close()
    store.update_run("r1", RunUpdate(incr={"steps.done": 1}))
    assert not feed.wait(0.01)  # closed: it hears nothing more


def test_records_are_copies_of_what_is_stored() -> None:
    store = MemoryStore()
    run = RunRecord(id="r1", workflow="wf", tags=["a"], params={"pages": [1, 2]})
    store.create_run(run)
    run.tags.append("changed after create")
    got = store.get_run("r1")
    assert got is not None
    got.params["pages"].append(3)
    again = store.get_run("r1")
    assert again is not None and again.tags == ["a"] and again.params == {"pages": [1, 2]}


def test_counters_add_up_under_concurrent_writers() -> None:
    store = MemoryStore()
    store.create_run(RunRecord(id="r1", workflow="wf", steps=StepCounts(total=800)))

    def report() -> None:
        for _ in range(100):
            store.update_run("r1", RunUpdate(incr={"steps.done": 1}, events=[Event(now(), "step", "done")]))

    threads = [threading.Thread(target=report) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    got = store.get_run("r1")
    assert got is not None and got.steps.done == 800


def test_values_json_cannot_hold_fail_as_on_redis_and_write_nothing() -> None:
    store = MemoryStore()
    store.create_run(RunRecord(id="r1", workflow="wf"))
    with pytest.raises(TypeError):
        store.update_run("r1", RunUpdate(set={"result": {1, 2}}, incr={"steps.done": 1}))
    with pytest.raises(ValueError):
        store.update_run("r1", RunUpdate(incr={"steps.done": float("nan")}))
    got = store.get_run("r1")
    assert got is not None and got.result is None and got.steps.done == 0
