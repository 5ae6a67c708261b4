"""The public API end to end: real Redis, real worker processes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from haulage.workflows import (
    IdempotencyConflict,
    Results,
    RunCancelled,
    RunFailed,
    RunNotFinished,
    RunNotFound,
    RunStatus,
    get_run,
    list_runs,
    registry,
)
from tests.conftest import WorkerProcess, wait_until
from tests.flows import count

pytestmark = pytest.mark.timeout(120)


def counts(redis_client: Any, run_id: str) -> dict[str, int]:
    """How many times each step body of a run really executed (counted outside the engine)."""
    out = {}
    for key in redis_client.scan_iter(f"test:count:{run_id}:*"):
        out[key.decode().split(f"{run_id}:", 1)[1]] = int(redis_client.get(key))
    return out


def test_chain_passes_values_and_records_progress(worker: WorkerProcess, redis_client: Any) -> None:
    run = registry.get("t_chain").start(x=3, created_by="ana@example.com", tags=["t"])
    record = run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETE
    assert run.results() == 16  # (3 + 1) * 2 * 2
    assert record.percent == 100.0
    assert (record.steps.total, record.steps.done, record.steps.failed) == (3, 3, 0)
    assert record.created_by == "ana@example.com" and record.tags == ["t"]
    kinds = [e.kind for e in record.history]
    assert kinds[0] == "created" and "started" in kinds and kinds[-1] == "complete"
    assert record.finished_at is not None and record.started_at is not None
    assert counts(redis_client, run.id) == {"0:add": 1, "1:double": 1, "2:double": 1}
    steps = {s.key: s for s in run.steps()}
    assert set(steps) == {"0:add", "1:double", "2:double"}
    assert all(s.status.value == "COMPLETE" for s in steps.values())


def test_static_fan_out(worker: WorkerProcess) -> None:
    run = registry.get("t_static").start(n=5)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    assert run.results() == {"sum": 0 + 1 + 4 + 9 + 16, "failed": []}


def test_dynamic_fan_out_collects_failures(worker: WorkerProcess, redis_client: Any) -> None:
    run = registry.get("t_dynamic").start(n=6, fail_on=[2, 4])
    record = run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETE
    assert run.results() == {"sum": 0 + 1 + 9 + 25, "failed": [{"x": 2}, {"x": 4}]}
    assert (record.steps.total, record.steps.done, record.steps.failed) == (8, 6, 2)
    c = counts(redis_client, run.id)
    assert c["1:square[2]"] == 2 and c["1:square[4]"] == 2  # first attempt + 1 retry each
    assert c["1:square[0]"] == 1 and c["1:square[5]"] == 1
    failed_steps = [s for s in run.steps() if s.status.value == "FAILED"]
    assert sorted(s.key for s in failed_steps) == ["1:square[2]", "1:square[4]"]
    assert failed_steps[0].error_type == "ValueError"


def test_plan_ending_in_fan_out_returns_results(worker: WorkerProcess) -> None:
    run = registry.get("bulk_invoices").start(invoices=[
        {"invoice_id": "A", "amount": "100.00", "currency": "EUR", "country": "DE"},
        {"invoice_id": "B", "amount": "10.00", "currency": "XYZ", "country": "DE"},
    ])  # fmt: skip
    record = run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETE
    out = run.results()
    assert out["priced"] == 1 and out["failed"] == 1 and out["gross_eur"] == "119.00"
    assert "unknown currency 'XYZ'" in out["failures"][0]["error"]
    assert record.message == "complete, 1 of 2 items failed"  # a failed item is said, whatever came after


def test_on_failure_fail_ends_failed_with_failures(worker: WorkerProcess, redis_client: Any) -> None:
    run = registry.get("t_dynamic_fail").start(n=4, fail_on=[1])
    record = run.wait(timeout=30)
    assert record.status is RunStatus.FAILED
    assert "1 of 4 fan-out items failed" in (record.error or "")
    with pytest.raises(RunFailed) as info:
        run.results()
    assert [(f.params, f.error_type, f.message) for f in info.value.failures] == [
        ({"x": 1}, "ValueError", "bad item 1")
    ]
    # The other items all ran; the stage after the fan-out did not.
    c = counts(redis_client, run.id)
    assert {k for k in c if k.startswith("1:square")} == {f"1:square[{i}]" for i in range(4)}
    assert "2:total" not in [s.key for s in run.steps()]


def test_nested_chain_inside_fan_out(worker: WorkerProcess) -> None:
    run = registry.get("t_nested").start(n=4)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    assert run.results() == {"sum": sum(i * i + 1 for i in range(4)), "failed": []}
    keys = {s.key for s in run.steps()}
    assert {"1.0:square[3]", "1.1:inc[3]"} <= keys


def test_empty_fan_out(worker: WorkerProcess) -> None:
    run = registry.get("t_dynamic").start(n=0)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    assert run.results() == {"sum": 0, "failed": []}


def test_retry_then_success(worker: WorkerProcess) -> None:
    key = uuid.uuid4().hex
    run = registry.get("t_flaky").start(key=key, fail_times=2)
    record = run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETE
    assert run.results() == "ok after 3"
    retries = [e for e in record.history if e.kind == "retry"]
    assert len(retries) == 2 and "ConnectionError" in retries[0].message
    assert {s.key: s.attempt for s in run.steps()}["1:flaky"] == 3


def test_chain_step_failure_fails_run(worker: WorkerProcess) -> None:
    run = registry.get("t_flaky").start(key=uuid.uuid4().hex, fail_times=10)
    record = run.wait(timeout=30)
    assert record.status is RunStatus.FAILED
    assert record.error == "step 1:flaky failed: ConnectionError: flaky failure 3"
    assert record.steps.failed == 1
    with pytest.raises(RunFailed, match="flaky failure 3"):
        run.results()


def test_idempotency_key_returns_same_run(worker: WorkerProcess, redis_client: Any) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    first = registry.get("t_chain").start(x=5, idempotency_key=key)
    second = registry.get("t_chain").start(x=5, idempotency_key=key)
    assert first.id == second.id
    first.wait(timeout=30)
    third = registry.get("t_chain").start(x=5, idempotency_key=key)
    assert third.id == first.id
    assert counts(redis_client, first.id) == {"0:add": 1, "1:double": 1, "2:double": 1}
    with pytest.raises(IdempotencyConflict, match="different parameters"):
        registry.get("t_chain").start(x=6, idempotency_key=key)
    # The same key on another workflow is another run.
    other = registry.get("t_static").start(n=1, idempotency_key=key)
    assert other.id != first.id


def test_get_run_and_list_runs(worker: WorkerProcess) -> None:
    owner = f"lister-{uuid.uuid4().hex[:8]}"
    a = registry.get("t_chain").start(x=1, created_by=owner)
    b = registry.get("t_dynamic_fail").start(n=2, fail_on=[0], created_by=owner)
    a.wait(timeout=30)
    b.wait(timeout=30)
    assert get_run(a.id) == a
    with pytest.raises(RunNotFound):
        get_run("no-such-run")
    assert [r.id for r in list_runs(created_by=owner)] == [b.id, a.id]
    assert [r.id for r in list_runs(created_by=owner, status="FAILED")] == [b.id]
    assert [r.id for r in list_runs(created_by=owner, workflow="t_chain")] == [a.id]


def test_results_before_the_end(redis_server: str) -> None:
    from haulage.progress import get_store
    from haulage.progress.models import RunRecord

    record = RunRecord(id=uuid.uuid4().hex, workflow="t_chain")
    get_store().create_run(record)
    with pytest.raises(RunNotFinished, match="PENDING"):
        get_run(record.id).results()


def test_resume_after_failure_reuses_checkpoints(worker: WorkerProcess, redis_client: Any) -> None:
    gate = uuid.uuid4().hex
    run = registry.get("t_gated").start(x=4, gate=gate)
    record = run.wait(timeout=30)
    assert record.status is RunStatus.FAILED and "gate" in (record.error or "")
    redis_client.set(f"test:gate:{gate}", 1)  # the operator fixes the cause
    run.resume()
    record = run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETE
    assert run.results() == (4 + 0) * 10 * 2
    assert record.recoveries == 1 and record.error is None
    c = counts(redis_client, run.id)
    assert c["0:add"] == 1  # checkpointed before the failure: not run again
    assert c["1:gated"] == 2
    assert any(e.kind == "resumed" for e in record.history)
    assert run.resume() == run  # resuming a finished run is a no-op


def test_cancel_mid_fan_out(worker: WorkerProcess, make_worker: Any, redis_client: Any) -> None:
    w = make_worker(queues="crash", concurrency=2)
    w.start()
    run = registry.get("t_slow_fan_out").start(n=30, sleep=0.2)
    wait_until(lambda: run.status().steps.done >= 4, timeout=30, what="some items done")
    assert run.cancel() is True
    record = run.status()
    assert record.status is RunStatus.CANCELLED and record.history[-1].kind == "cancelled"
    # Items that were running finish; no new item starts after that.
    ran_at_cancel = len(counts(redis_client, run.id))
    assert ran_at_cancel < 30

    def settled() -> bool:
        before = len(counts(redis_client, run.id))
        return before == len(counts(redis_client, run.id)) and all(s.status.value != "RUNNING" for s in run.steps())

    wait_until(settled, timeout=30, what="running items to finish")
    assert len(counts(redis_client, run.id)) <= ran_at_cancel + 2  # at most the two in flight
    assert run.cancel() is False  # twice is harmless
    with pytest.raises(RunCancelled):
        run.resume()
    with pytest.raises(RunCancelled):
        run.results()
    assert run.status().status is RunStatus.CANCELLED


def test_example_plan_review(worker: WorkerProcess) -> None:
    run = registry.get("plan_review").start(project_id="p1")
    record = run.wait(timeout=60)
    assert record.status is RunStatus.COMPLETE
    report = run.results()
    assert report["pages_reviewed"] == 6 and report["pages_failed"] == []
    assert report["by_severity"] == {"critical": 3, "major": 4, "minor": 3}
    assert {f["rule"] for f in report["findings"] if f["page"] == 3} == {"B-1.1", "B-1.2", "B-1.3", "B-2.1", "B-3.1"}
    assert report["verdict"] == "revise and resubmit"
    cost = record.cost["rulebook-v1"]
    assert cost.calls == 6 and cost.usd > 0 and cost.input_tokens > 0
    assert len([e for e in record.history if e.kind == "usage"]) == 6  # metered once per page
    assert (record.steps.total, record.steps.done) == (8, 8)


def test_results_type_round_trip() -> None:
    r = Results.from_dict({"successes": [1], "failures": [{"params": {"x": 1}, "error_type": "E", "message": "m"}]})
    assert not r.ok and len(r) == 2 and r.failures[0].params == {"x": 1}
    assert Results.from_dict(r.to_dict()) == r
    assert count  # the helper module loads


def test_ledger_skips_items_that_landed(worker: WorkerProcess, redis_client: Any) -> None:
    run = registry.get("t_ledger").start(n=10, fail_at=6)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    assert run.results() == 4  # the retry processed only items 6..9
    per_item = {i: int(redis_client.get(f"test:count:{run.id}:item:{i}")) for i in range(10)}
    assert per_item == {**{i: 1 for i in range(10)}, 6: 2}  # item 6 was being processed when it failed
