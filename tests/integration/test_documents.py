"""Run and step documents as a frontend reads them: schema, counts, per-item rows, failures, terminal stays terminal.

The first half holds every store to the document rules (Redis, Firestore on the
emulator, the in-memory twin); the second runs real workflows through a real
worker and reads every version of the run document a subscriber saw.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from haulage.progress.memory_store import MemoryStore
from haulage.progress.models import (
    ACTIVE,
    FAILURES_LIMIT,
    SCHEMA_VERSION,
    FailureEntry,
    RunRecord,
    RunStatus,
    RunUpdate,
    StageCounts,
    StepRecord,
    StepStatus,
    cost_increments,
    now,
)
from haulage.progress.redis_store import RedisStore
from haulage.progress.store import Store
from haulage.redis_client import get_redis
from tests.conftest import WorkerProcess, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["redis", "firestore", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "redis":
        request.getfixturevalue("redis_server")
        yield RedisStore(get_redis())
    elif request.param == "memory":
        yield MemoryStore()
    else:
        from tests.firestore_support import firestore_store_for_tests

        yield from firestore_store_for_tests()


def landed(store: Store, run_id: str) -> RunRecord:
    """The run as another process reads it once this one's buffered writes have landed."""
    flush = getattr(store, "flush", None)
    if flush is not None:
        flush(run_id)
    record = store.get_run(run_id)
    assert record is not None
    return record


def new_run(**fields: Any) -> RunRecord:
    stages = [StageCounts("list_items"), StageCounts("work_item", "fan_out", None), StageCounts("reduce_items")]
    defaults: dict[str, Any] = {"id": uuid.uuid4().hex, "workflow": "wf", "created_by": "ana@example.com",
                                "stages": stages}  # fmt: skip
    defaults.update(fields)
    return RunRecord(**defaults)


# --- the stores ------------------------------------------------------------------------------------------


def test_new_run_has_schema_and_stages(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    got = landed(store, run.id)
    assert got.schema == SCHEMA_VERSION and got.settled is False and got.failures == []
    assert [(s.name, s.kind, s.total) for s in got.stages] == [
        ("list_items", "step", 1), ("work_item", "fan_out", None), ("reduce_items", "step", 1)]  # fmt: skip


def test_percent_is_weighted_by_work_and_100_only_at_complete(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    store.update_run(run.id, RunUpdate(maximum={"stages.0.progress": 50.0}))
    assert landed(store, run.id).percent == pytest.approx(16.6)  # half of one unit of three known
    store.update_run(run.id, RunUpdate(incr={"stages.0.done": 1, "steps.done": 1}))
    assert landed(store, run.id).percent == pytest.approx(33.3)
    store.update_run(run.id, RunUpdate(set={"stages.1.total": 8}, incr={"steps.total": 8}))
    got = landed(store, run.id)
    assert got.stages[1].total == 8 and got.message == "work_item 0/8"
    assert got.percent == pytest.approx(33.3)  # never backwards, though the work known grew to 10 units
    for i in range(8):
        field = "failed" if i in (2, 5) else "done"
        store.update_run(run.id, RunUpdate(incr={f"stages.1.{field}": 1, f"steps.{field}": 1}))
    got = landed(store, run.id)
    assert (got.stages[1].done, got.stages[1].failed) == (6, 2) and got.message == "work_item 8/8"
    assert got.percent == pytest.approx(90.0)
    store.update_run(run.id, RunUpdate(incr={"stages.2.done": 1, "steps.done": 1}))
    got = landed(store, run.id)
    assert got.percent == 99.0 and got.status is RunStatus.PENDING  # all work done, not yet COMPLETE
    assert store.transition(run.id, RunStatus.COMPLETE, allowed_from=ACTIVE,
                            update=RunUpdate(set={"percent": 100.0, "message": "complete"}))  # fmt: skip
    assert landed(store, run.id).percent == 100.0


def test_a_terminal_document_takes_nothing_but_settled(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    store.update_run(run.id, RunUpdate(incr={"steps.done": 1, "stages.0.done": 1}))
    assert store.transition(run.id, RunStatus.CANCELLED, allowed_from=ACTIVE,
                            update=RunUpdate(set={"message": "cancelled", "finished_at": now()}))  # fmt: skip
    before = landed(store, run.id)
    late = FailureEntry(step="1:work_item[3]", name="work_item", error_type="ValueError", message="late", index=3)
    store.update_run(run.id, RunUpdate(set={"message": "item 4: almost", "heartbeat": now()},
                                       incr={"steps.done": 1, "stages.1.done": 1, **cost_increments(
                                           "m", usd=0.5, input_tokens=1, output_tokens=1, calls=1)},
                                       maximum={"stages.0.progress": 100.0}, failures=[late]))  # fmt: skip
    after = landed(store, run.id)
    # Not a field moved, updated_at included. (The heartbeat is liveness, not progress: on Firestore it
    # lives in the private subdocument, which no client reads.)
    assert {**after.to_dict(), "heartbeat": None} == {**before.to_dict(), "heartbeat": None}
    store.update_run(run.id, RunUpdate(set={"settled": True}))
    settled = landed(store, run.id)
    assert settled.settled is True
    assert ({**settled.to_dict(), "settled": False, "updated_at": None, "heartbeat": None}
            == {**before.to_dict(), "updated_at": None, "heartbeat": None})  # fmt: skip


def test_failures_are_listed_with_their_parameters_and_bounded(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    for i in range(FAILURES_LIMIT + 5):
        entry = FailureEntry(step=f"1:work_item[{i}]", name="work_item", error_type="ValueError",
                             message=f"bad {i}", index=i, label=f"item {i}", params={"x": i, "tags": ["a"]},
                             stage=1)  # fmt: skip
        store.update_run(run.id, RunUpdate(incr={"steps.failed": 1}, failures=[entry]))
    got = landed(store, run.id)
    assert got.steps.failed == FAILURES_LIMIT + 5  # the count is whole; the list keeps the first ones
    assert len(got.failures) == FAILURES_LIMIT
    first = got.failures[0]
    assert (first.step, first.label, first.params, first.error_type, first.message) == (
        "1:work_item[0]", "item 0", {"x": 0, "tags": ["a"]}, "ValueError", "bad 0")  # fmt: skip


def test_money_has_no_float_noise(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    for _ in range(3):
        store.update_run(run.id, RunUpdate(incr=cost_increments("m", usd=0.000546, input_tokens=1, output_tokens=0,
                                                                calls=1)))  # fmt: skip
        landed(store, run.id)  # three separate writes, as three workers would make
    assert 0.000546 * 3 != 0.001638  # what a float sum shows
    assert landed(store, run.id).cost["m"].usd == 0.001638


def test_a_completed_step_stays_complete(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    store.put_step(run.id, StepRecord("0:a", "a", StepStatus.COMPLETE, percent=100.0, finished_at=now()))
    store.put_step(run.id, StepRecord("0:a", "a", StepStatus.CANCELLED))
    step = store.get_step(run.id, "0:a")
    assert step is not None and step.status is StepStatus.COMPLETE and step.percent == 100.0
    store.put_step(run.id, StepRecord("0:b", "b", StepStatus.RUNNING))
    store.put_step(run.id, StepRecord("0:b", "b", StepStatus.CANCELLED))
    other = store.get_step(run.id, "0:b")
    assert other is not None and other.status is StepStatus.CANCELLED


def test_item_rows_are_created_queued_and_report_their_own_progress(store: Store) -> None:
    run = new_run()
    store.create_run(run)
    store.put_step(run.id, StepRecord("1:work_item[0]", "work_item", StepStatus.RUNNING, stage=1, index=0,
                                      label="item 0", started_at=now()))  # fmt: skip
    rows = [StepRecord(f"1:work_item[{i}]", "work_item", StepStatus.QUEUED, stage=1, index=i, label=f"item {i}")
            for i in range(3)]  # fmt: skip
    store.create_item_rows(run.id, rows)
    steps = {s.key: s for s in store.list_steps(run.id)}
    assert steps["1:work_item[0]"].status is StepStatus.RUNNING  # an existing row is left as it is
    assert [(steps[f"1:work_item[{i}]"].status, steps[f"1:work_item[{i}]"].label) for i in (1, 2)] == [
        (StepStatus.QUEUED, "item 1"), (StepStatus.QUEUED, "item 2")]  # fmt: skip
    store.step_progress(run.id, "1:work_item[0]", 40.0, "page 2 of 5")
    store.step_progress(run.id, "1:work_item[1]", 40.0, "not running")  # QUEUED: nothing to report on
    steps = {s.key: s for s in store.list_steps(run.id)}
    assert (steps["1:work_item[0]"].percent, steps["1:work_item[0]"].message) == (40.0, "page 2 of 5")
    assert steps["1:work_item[0]"].started_at is not None
    assert (steps["1:work_item[1]"].percent, steps["1:work_item[1]"].message) == (0.0, "")


# --- real runs -------------------------------------------------------------------------------------------


class Recorder:
    """Every version of a run document a subscriber sees (the store's change feed), until the run settles."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.seen: list[RunRecord] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        feed = self.store.watch_changes(self.run_id)
        try:
            while not self.stop.is_set():
                record = self.store.get_run(self.run_id)
                if record is not None and (not self.seen or record.to_dict() != self.seen[-1].to_dict()):
                    self.seen.append(record)
                if record is not None and record.settled:
                    return
                feed.wait(0.2)
        finally:
            feed.close()

    def join(self, timeout: float) -> list[RunRecord]:
        self.thread.join(timeout)
        self.stop.set()
        assert not self.thread.is_alive(), "the run never settled"
        return self.seen


def check_snapshots(seen: list[RunRecord]) -> None:
    """The guarantees a progress bar relies on, in every snapshot."""
    ended_at = next(i for i, r in enumerate(seen) if r.terminal)
    for before, after in zip(seen, seen[1:], strict=False):
        assert after.percent >= before.percent, (before.percent, after.percent)
        assert after.steps.done >= before.steps.done and after.steps.failed >= before.steps.failed
        for b, a in zip(before.stages, after.stages, strict=True):
            assert a.done >= b.done and a.failed >= b.failed
    for record in seen:
        assert record.schema == SCHEMA_VERSION
        for stage in record.stages:
            assert stage.total is None or stage.done + stage.failed <= stage.total, stage
        if record.status is not RunStatus.COMPLETE:
            assert record.percent < 100.0, (record.status, record.percent)
    terminal = seen[ended_at].to_dict()
    for later in seen[ended_at + 1:]:
        assert {**later.to_dict(), "settled": False} == {**terminal, "settled": False}  # only settled moves


def test_fan_out_then_reduce_on_redis(worker: WorkerProcess) -> None:
    from haulage.progress import get_store
    from haulage.workflows import registry

    store = get_store()
    run = registry.get("t_docs").start(n=6, fail_on=[1, 4], pause=0.05, created_by="ana@example.com")
    recorder = Recorder(store, run.id)
    record = run.wait(timeout=60)
    seen = recorder.join(60)
    check_snapshots(seen)
    assert record.status is RunStatus.COMPLETE and record.percent == 100.0
    assert record.message == "complete, 2 of 6 items failed"
    assert [(s.total, s.done, s.failed) for s in record.stages] == [(1, 1, 0), (6, 4, 2), (1, 1, 0)]
    assert sorted((f.index, f.label, f.params["x"], f.error_type) for f in record.failures) == [
        (1, "item 1", 1, "ValueError"), (4, "item 4", 4, "ValueError")]  # fmt: skip
    assert [f.index for f in run.failures()] == [1, 4]
    assert record.cost["model-d"].usd == 0.003276  # 6 x 0.000546, no float noise
    assert any(r.message == "work_item 3/6" or r.message.startswith("work_item ") for r in seen)
    rows = {s.key: s for s in store.list_steps(run.id)}
    items = [rows[f"1:work_item[{i}]"] for i in range(6)]
    assert [(s.index, s.label, s.stage) for s in items] == [(i, f"item {i}", 1) for i in range(6)]
    for s in items:
        assert s.started_at is not None and s.finished_at is not None and s.started_at <= s.finished_at
        assert s.attempt == 1 and s.backend == "local"
    assert [s.status for s in items].count(StepStatus.FAILED) == 2
    assert seen[-1].settled is True


def test_cancelled_run_stays_as_it_was_cancelled(make_worker: Any) -> None:
    from haulage.progress import get_store
    from haulage.workflows import registry

    make_worker(concurrency=2).start()
    store = get_store()
    run = registry.get("t_docs").start(n=12, pause=0.6, created_by="ana@example.com")
    recorder = Recorder(store, run.id)
    wait_until(lambda: (store.get_run(run.id) or new_run()).steps.done >= 3, timeout=60, what="three steps done")
    assert run.cancel()
    seen = recorder.join(90)
    check_snapshots(seen)
    final = seen[-1]
    assert final.status is RunStatus.CANCELLED and final.settled and final.percent < 100.0
    done_steps = {s.key for s in store.list_steps(run.id) if s.status is StepStatus.COMPLETE}
    # The document counts what finished before the cancel; steps that finished after it still say COMPLETE.
    assert final.steps.done <= len(done_steps)
    for key in done_steps:
        step = store.get_step(run.id, key)
        assert step is not None and step.status is StepStatus.COMPLETE


def test_results_endpoint_and_cli_give_the_failures_after_a_reduce(worker: WorkerProcess) -> None:
    import json
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from haulage.api import ApiSettings, create_app
    from tests.conftest import ROOT

    client = TestClient(create_app(ApiSettings(auth="dev", dev_token="docs-token-0123456789abcdef", dev_admin=False)))
    auth = {"Authorization": "Bearer docs-token-0123456789abcdef"}
    started = client.post("/v1/workflows/t_docs/runs", json={"params": {"n": 5, "fail_on": [2]}}, headers=auth)
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    from haulage.workflows import get_run

    get_run(run_id).wait(timeout=60)
    results = client.get(f"/v1/runs/{run_id}/results", headers=auth).json()
    assert results["value"] == {"sum": 0 + 10 + 30 + 40, "failed": 1}
    assert [(f["step"], f["label"], f["params"], f["error_type"]) for f in results["failures"]] == [
        ("1:work_item[2]", "item 2", {"x": 2, "fail": True}, "ValueError")]  # fmt: skip
    doc = client.get(f"/v1/runs/{run_id}", headers=auth).json()
    assert doc["schema"] == 1 and doc["message"] == "complete, 1 of 5 items failed"
    assert [s["name"] for s in doc["stages"]] == ["list_items", "work_item", "reduce_items"]
    assert doc["failures"][0]["label"] == "item 2"
    rows = client.get(f"/v1/runs/{run_id}/steps", headers=auth).json()["steps"]
    items = [r for r in rows if r["index"] is not None]
    assert [(r["index"], r["label"], r["status"]) for r in items] == [
        (i, f"item {i}", "FAILED" if i == 2 else "COMPLETE") for i in range(5)]  # fmt: skip

    def haulage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "haulage.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=60)  # fmt: skip

    out = haulage("results", run_id)
    assert json.loads(out.stdout) == {"sum": 80, "failed": 1}
    assert "1 item(s) failed" in out.stderr
    assert "1:work_item[2]  item 2: ValueError: item 2 cannot be worked" in out.stderr
    listed = json.loads(haulage("results", run_id, "--failures").stdout)
    assert [(f["step"], f["params"]) for f in listed] == [("1:work_item[2]", {"x": 2, "fail": True})]


# --- the same on Firestore, read as raw documents (what a web client's listener receives) -----------------


@pytest.fixture
def firestore_world(redis_server: str, tmp_path: Any) -> Iterator[dict[str, str]]:
    """Runs stored in Firestore (the emulator): their own broker database and a worker."""
    from tests.firestore_support import TEST_PROJECT, session_emulator

    host = session_emulator()
    env = {"HAULAGE_REDIS_URL": redis_server.rsplit("/", 1)[0] + "/2", "HAULAGE_STORE": "firestore",
           "FIRESTORE_EMULATOR_HOST": host, "HAULAGE_FIRESTORE_PROJECT": TEST_PROJECT,
           "HAULAGE_FIRESTORE_COLLECTION": f"docs-{uuid.uuid4().hex[:8]}",
           "HAULAGE_MODULES": "tests.flows,haulage.examples,tests.document_flows"}  # fmt: skip
    worker = WorkerProcess(tmp_path / "fs-worker.log", extra_env=env)
    worker.start()
    yield env
    worker.stop()


def start_by_cli(env: dict[str, str], *args: str) -> str:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "haulage.cli", "run", *args, "--created-by", "ana@example.com"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[-1]


def test_fan_out_then_reduce_on_firestore_as_a_listener_sees_it(firestore_world: dict[str, str]) -> None:
    from datetime import datetime

    from google.cloud import firestore

    client = firestore.Client(project=firestore_world["HAULAGE_FIRESTORE_PROJECT"])
    coll = client.collection(firestore_world["HAULAGE_FIRESTORE_COLLECTION"])
    run_id = start_by_cli(firestore_world, "t_docs", "-p", "n=8", "-p", "fail_on=[2,5]", "-p", "pause=0.3")
    seen: list[dict[str, Any]] = []
    statuses: set[str] = set()
    lock = threading.Lock()

    def on_run(snaps: Any, *_: Any) -> None:
        with lock:
            seen.extend(s.to_dict() for s in snaps if s.exists)

    def on_steps(snaps: Any, *_: Any) -> None:
        with lock:
            statuses.update(s.to_dict().get("status") for s in snaps)

    ref = coll.document(run_id)
    watches = [ref.on_snapshot(on_run), ref.collection("steps").on_snapshot(on_steps)]
    try:
        wait_until(lambda: seen and seen[-1].get("settled"), timeout=120, what="the run to settle")
    finally:
        for w in watches:
            w.unsubscribe()
    final = seen[-1]
    assert final["status"] == "COMPLETE" and final["percent"] == 100.0 and final["schema"] == 1
    assert final["message"] == "complete, 2 of 8 items failed"
    assert "QUEUED" in statuses  # the items' rows were there before they ran
    for name in ("created_at", "updated_at", "started_at", "finished_at"):
        assert isinstance(final[name], datetime), name  # Timestamps, one representation of time
    assert all(isinstance(e["at"], datetime) for e in final["history"])
    for key in ("params", "params_hash", "heartbeat"):
        assert key not in final, key  # internal fields are in the private subdocument
    assert sorted((f["index"], f["label"], f["params"]["x"]) for f in final["failures"]) == [(2, "item 2", 2),
                                                                                          (5, "item 5", 5)]
    assert final["cost"]["model-d"]["usd"] == 0.004368  # 8 x 0.000546
    ended = next(i for i, d in enumerate(seen) if d["status"] == "COMPLETE")
    for before, after in zip(seen, seen[1:], strict=False):
        assert after["percent"] >= before["percent"]
        assert after["steps"]["done"] >= before["steps"]["done"]
    for doc in seen:
        if doc["status"] != "COMPLETE":
            assert doc["percent"] < 100.0
        for stage in doc["stages"]:
            assert stage["total"] is None or stage["done"] + stage["failed"] <= stage["total"], stage
    for later in seen[ended + 1:]:
        assert {**later, "settled": None} == {**seen[ended], "settled": None}
