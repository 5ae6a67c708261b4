"""The Store contract: every backend must pass these, unchanged.

Parametrized over the backends: Redis, Firestore (against the emulator, see
tests/firestore_support.py) and the in-memory twin that unit tests use.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import haulage.progress
from haulage import settings
from haulage.progress.memory_store import MemoryStore
from haulage.progress.models import (
    ACTIVE,
    Checkpoint,
    Event,
    RunRecord,
    RunStatus,
    RunUpdate,
    StepCounts,
    StepRecord,
    StepStatus,
    cost_increments,
    now,
)
from haulage.progress.redis_store import RedisStore
from haulage.progress.store import Store
from haulage.redis_client import get_redis
from haulage.workflows.retention import purge_finished

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["redis", "firestore", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "redis":
        request.getfixturevalue("redis_server")
        yield RedisStore(get_redis())
    elif request.param == "memory":
        yield MemoryStore()
    else:
        # Imported here: google-cloud-firestore is an optional extra.
        from tests.firestore_support import firestore_store_for_tests

        yield from firestore_store_for_tests()


def new_run(**fields: Any) -> RunRecord:
    defaults: dict[str, Any] = {"id": uuid.uuid4().hex, "workflow": "wf", "created_by": "ana@example.com"}
    defaults.update(fields)
    return RunRecord(**defaults)


def test_create_is_create_if_absent(store: Store) -> None:
    run = new_run(tags=["a", "b"], params={"x": 1, "nested": {"y": [1, 2]}}, steps=StepCounts(total=3))
    assert store.create_run(run) is None
    again = store.create_run(new_run(id=run.id, workflow="other"))
    assert again is not None and again.workflow == "wf"
    got = store.get_run(run.id)
    assert got is not None
    assert got.status is RunStatus.PENDING
    assert got.tags == ["a", "b"]
    assert got.params == {"x": 1, "nested": {"y": [1, 2]}}
    assert got.steps.total == 3 and got.steps.done == 0
    assert got.created_by == "ana@example.com"
    assert store.get_run("no-such-run") is None


def test_update_counters_cost_percent_and_history(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    store.update_run(run.id, RunUpdate(set={"message": "half", "heartbeat": 123.5}, incr={"steps.done": 2},
                                       maximum={"percent": 50.0}))  # fmt: skip
    store.update_run(run.id, RunUpdate(incr={"steps.done": 1, "steps.failed": 1}, maximum={"percent": 40.0}))
    store.update_run(
        run.id, RunUpdate(incr=cost_increments("gpt-4.1", usd=0.5, input_tokens=10, output_tokens=3, calls=1))
    )
    store.update_run(
        run.id, RunUpdate(incr=cost_increments("gpt-4.1", usd=0.25, input_tokens=5, output_tokens=1, calls=1))
    )
    got = store.get_run(run.id)
    assert got is not None
    assert got.message == "half" and got.heartbeat == 123.5
    assert (got.steps.done, got.steps.failed) == (3, 1)
    assert got.percent == 50.0  # the maximum never moves backwards
    cost = got.cost["gpt-4.1"]
    assert cost.usd == pytest.approx(0.75)
    assert (cost.input_tokens, cost.output_tokens, cost.calls) == (15, 4, 2)


def test_history_is_bounded_to_newest(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAULAGE_HISTORY_LIMIT", "5")
    settings.reset_settings()
    try:
        run = new_run()
        store.create_run(run)
        for i in range(12):
            store.update_run(run.id, RunUpdate(events=[Event(now(), "e", f"event {i}")]))
        got = store.get_run(run.id)
        assert got is not None
        assert [e.message for e in got.history] == [f"event {i}" for i in range(7, 12)]
        assert all(isinstance(e.at, float) for e in got.history)
    finally:
        monkeypatch.delenv("HAULAGE_HISTORY_LIMIT")
        settings.reset_settings()


def test_transition_is_conditional(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    assert store.transition(run.id, RunStatus.PROCESSING, allowed_from={RunStatus.PENDING})
    assert not store.transition(run.id, RunStatus.PROCESSING, allowed_from={RunStatus.PENDING})
    stop = RunUpdate(set={"message": "stop"}, events=[Event(now(), "cancelled", "x")])
    assert store.transition(run.id, RunStatus.CANCELLED, allowed_from=ACTIVE, update=stop)
    # A terminal run stays as it ended.
    assert not store.transition(
        run.id, RunStatus.COMPLETE, allowed_from=ACTIVE, update=RunUpdate(set={"message": "no"})
    )
    got = store.get_run(run.id)
    assert got is not None
    assert got.status is RunStatus.CANCELLED and got.message == "stop"
    assert got.history[-1].kind == "cancelled"
    assert not store.transition("no-such-run", RunStatus.FAILED, allowed_from=ACTIVE)


def test_concurrent_transitions_have_one_winner(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    wins: list[RunStatus] = []
    barrier = threading.Barrier(4)

    def attempt(to: RunStatus) -> None:
        barrier.wait()
        if store.transition(run.id, to, allowed_from=ACTIVE):
            wins.append(to)

    threads = [threading.Thread(target=attempt, args=(s,)) for s in
               (RunStatus.COMPLETE, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.COMPLETE)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1
    got = store.get_run(run.id)
    assert got is not None and got.status is wins[0]


def test_checkpoints_first_writer_wins(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    assert store.put_checkpoint(run.id, Checkpoint("0:a", "a", {"v": 1}))
    assert not store.put_checkpoint(run.id, Checkpoint("0:a", "a", {"v": 2}))
    cps = store.get_checkpoints(run.id, ["0:a", "1:b"])
    assert set(cps) == {"0:a"} and cps["0:a"].value == {"v": 1} and cps["0:a"].name == "a"
    assert store.get_checkpoints(run.id, []) == {}


def test_complete_step_records_once(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    step = StepRecord("1:s[0]", "s", StepStatus.COMPLETE)
    first = Checkpoint("1:s[0]", "s", 10)
    got = store.complete_step(run.id, first, step, RunUpdate(incr={"steps.done": 1}))
    assert got is first
    second = store.complete_step(run.id, Checkpoint("1:s[0]", "s", 99), step, RunUpdate(incr={"steps.done": 1}))
    assert second.value == 10
    record = store.get_run(run.id)
    assert record is not None and record.steps.done == 1  # the losing write changed nothing


def test_start_step_and_load_state(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    running = StepRecord("0:a", "a", StepStatus.RUNNING, attempt=2, task_id="t1")
    assert store.start_step(run.id, running, RunUpdate(set={"heartbeat": 5.0})) is None
    step = store.get_step(run.id, "0:a")
    assert step is not None and step.status is StepStatus.RUNNING and step.attempt == 2 and step.task_id == "t1"
    store.put_checkpoint(run.id, Checkpoint("0:a", "a", "done"))
    assert store.start_step(run.id, running, RunUpdate()) is not None
    status, cps = store.load_step_state(run.id, ["0:a", "0:b"])
    assert status is RunStatus.PENDING and list(cps) == ["0:a"]
    assert store.load_step_state("no-such-run", ["0:a"]) == (None, {})
    store.put_step(run.id, StepRecord("1:b", "b", StepStatus.QUEUED, retry_at=9.0))
    assert [s.key for s in store.list_steps(run.id)] == ["0:a", "1:b"]


def test_guards_claim_finish_release(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    assert store.claim_guard(run.id, "meter", "t1") is None
    assert store.claim_guard(run.id, "meter", "t2") == "pending:t1"
    store.finish_guard(run.id, "meter", "t2", done=False)  # not the holder: no effect
    assert store.claim_guard(run.id, "meter", "t3") == "pending:t1"
    store.finish_guard(run.id, "meter", "t1", done=True)
    assert store.claim_guard(run.id, "meter", "t4") == "done"
    assert store.claim_guard(run.id, "email", "t5") is None
    store.finish_guard(run.id, "email", "t5", done=False)  # released: a retry may claim it
    assert store.claim_guard(run.id, "email", "t6") is None
    assert store.get_guards(run.id) == {"meter": "done", "email": "pending:t6"}


def test_replace_guard_is_compare_and_set(store: Store) -> None:
    """How a live attempt takes over a dead claimant's claim: only one of two contenders can."""
    run = new_run()
    store.create_run(run)
    assert store.claim_guard(run.id, "meter", "dead") is None
    assert not store.replace_guard(run.id, "meter", "pending:other", "pending:t2")  # not what it holds
    assert store.replace_guard(run.id, "meter", "pending:dead", "pending:t2")
    assert not store.replace_guard(run.id, "meter", "pending:dead", "pending:t3")  # the loser of the race
    assert store.claim_guard(run.id, "meter", "t4") == "pending:t2"
    store.finish_guard(run.id, "meter", "t2", done=True)  # the new claimant finishes as if it had claimed it
    assert store.get_guards(run.id) == {"meter": "done"}
    assert not store.replace_guard(run.id, "absent", "pending:dead", "unknown")  # nothing to replace
    store.claim_guard(run.id, "email", "dead")
    assert store.replace_guard(run.id, "email", "pending:dead", "unknown")
    assert store.claim_guard(run.id, "email", "t5") == "unknown"
    assert store.get_guards(run.id) == {"meter": "done", "email": "unknown"}


def test_list_runs_filters_and_pages(store: Store) -> None:
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    ids = []
    for i in range(5):
        run = new_run(workflow="wf-a" if i % 2 == 0 else "wf-b", created_by=owner, created_at=now() + i)
        store.create_run(run)
        ids.append(run.id)
    store.transition(ids[4], RunStatus.COMPLETE, allowed_from=ACTIVE)
    mine = store.list_runs(created_by=owner)
    assert [r.id for r in mine] == list(reversed(ids))  # newest first
    assert [r.id for r in store.list_runs(created_by=owner, workflow="wf-a")] == [ids[4], ids[2], ids[0]]
    assert [r.id for r in store.list_runs(created_by=owner, status=RunStatus.COMPLETE)] == [ids[4]]
    page = store.list_runs(created_by=owner, limit=2, offset=2)
    assert [r.id for r in page] == [ids[2], ids[1]]


def test_list_runs_continues_after_a_cursor(store: Store) -> None:
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    at = now()
    runs = [new_run(workflow="wf-a" if i % 2 == 0 else "wf-b", created_by=owner, created_at=at + i // 2)
            for i in range(6)]  # fmt: skip - pairs share a creation time: ties must neither repeat nor vanish
    for run in runs:
        store.create_run(run)
    seen: list[str] = []
    after = None
    while page := store.list_runs(created_by=owner, limit=2, after=after):
        seen += [r.id for r in page]
        after = (page[-1].created_at, page[-1].id)
    assert sorted(seen) == sorted(r.id for r in runs) and len(seen) == 6
    assert seen == [r.id for r in store.list_runs(created_by=owner, limit=10)]
    first = store.list_runs(created_by=owner, workflow="wf-a", limit=1)
    rest = store.list_runs(created_by=owner, workflow="wf-a", after=(first[0].created_at, first[0].id))
    assert [r.id for r in first + rest] == [r.id for r in store.list_runs(created_by=owner, workflow="wf-a")]
    assert len(first + rest) == 3
    store.delete_run(runs[0].id)  # deletion leaves every index it was in
    assert runs[0].id not in [r.id for r in store.list_runs(created_by=owner, workflow="wf-a")]


def test_delete_run_removes_everything(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    store.put_checkpoint(run.id, Checkpoint("0:a", "a", 1))
    store.put_step(run.id, StepRecord("0:a", "a", StepStatus.COMPLETE))
    store.claim_guard(run.id, "g", "t")
    store.delete_run(run.id)
    assert store.get_run(run.id) is None
    assert store.get_checkpoints(run.id, ["0:a"]) == {}
    assert store.list_steps(run.id) == []
    assert store.get_guards(run.id) == {}
    assert run.id not in [r.id for r in store.list_runs(created_by="ana@example.com", limit=1000)]


def test_retention_removes_only_old_finished_runs(
    store: Store, monkeypatch: pytest.MonkeyPatch, redis_server: str
) -> None:
    # redis_server: retention also deletes the engine's Redis keys beside the store, whichever the backend.
    monkeypatch.setattr(haulage.progress, "get_store", lambda: store)
    monkeypatch.setattr("haulage.workflows.retention.get_store", lambda: store)
    owner = f"ret-{uuid.uuid4().hex[:8]}"
    old, recent, active = new_run(created_by=owner), new_run(created_by=owner), new_run(created_by=owner)
    for run in (old, recent, active):
        store.create_run(run)
    store.put_checkpoint(old.id, Checkpoint("0:a", "a", 1))
    store.transition(
        old.id, RunStatus.COMPLETE, allowed_from=ACTIVE, update=RunUpdate(set={"finished_at": now() - 7200})
    )
    store.transition(recent.id, RunStatus.FAILED, allowed_from=ACTIVE, update=RunUpdate(set={"finished_at": now()}))
    removed = purge_finished(older_than_seconds=3600)
    assert old.id in removed and recent.id not in removed and active.id not in removed
    assert store.get_run(old.id) is None and store.get_checkpoints(old.id, ["0:a"]) == {}
    assert store.get_run(recent.id) is not None and store.get_run(active.id) is not None
