"""Bad input gets a clear error naming what is wrong, and nothing is half-created."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from haulage.errors import ConfigError, InvalidParams, PlanError, UnknownWorkflow
from haulage.progress import get_store
from haulage.tasks import step
from haulage.workflows import RunStatus, list_runs, registry, workflow
from tests.conftest import ROOT, WorkerProcess

pytestmark = pytest.mark.timeout(60)


def runs_by(owner: str) -> list[Any]:
    return list_runs(created_by=owner, limit=100)


@pytest.mark.parametrize(
    ("name", "params", "field", "message"),
    [
        ("t_chain", {"x": "abc"}, "x", "valid integer"),
        ("t_chain", {}, "x", "Field required"),
        ("t_chain", {"x": 1, "y": 2}, "y", "Extra inputs are not permitted"),
        ("t_dynamic", {"n": 3, "fail_on": [1, "two"]}, "fail_on.1", "valid integer"),
        ("bulk_invoices", {"invoices": [{"invoice_id": "A", "amount": "1", "currency": "EUR"}]},
         "invoices.0.country", "Field required"),
    ],
)  # fmt: skip
def test_invalid_params_name_the_field(redis_server: str, name: str, params: dict[str, Any], field: str,
                                       message: str) -> None:  # fmt: skip
    owner = f"bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidParams) as info:
        registry.get(name).start(created_by=owner, **params)
    assert any(e["field"] == field and message in e["message"] for e in info.value.errors), info.value.errors
    assert field in str(info.value) and name in str(info.value)
    assert runs_by(owner) == []  # nothing written


@pytest.mark.parametrize(
    ("meta", "field"),
    [({"tags": "x"}, "tags"), ({"tags": [1]}, "tags"), ({"idempotency_key": ""}, "idempotency_key"),
     ({"created_by": 5}, "created_by")],
)  # fmt: skip
def test_invalid_run_options(redis_server: str, meta: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParams, match=field):
        registry.get("t_chain").start(x=1, **meta)


def test_unknown_workflow_lists_known(redis_server: str) -> None:
    with pytest.raises(UnknownWorkflow) as info:
        registry.get("no_such_flow")
    assert "t_chain" in info.value.known and "plan_review" in info.value.known
    assert "'no_such_flow'" in str(info.value) and "t_chain" in str(info.value)


def test_bad_plan_is_rejected_before_anything_is_written(redis_server: str) -> None:
    owner = f"plan-{uuid.uuid4().hex[:8]}"
    with pytest.raises(PlanError, match="must return chain"):
        registry.get("t_bad_plan").start(x=1, created_by=owner)
    assert runs_by(owner) == []


def test_plan_errors_name_the_step() -> None:
    from haulage.workflows import chain, fan_out
    from tests.flows import add, double, square

    with pytest.raises(PlanError, match=r"step 'add'.*unknown parameter\(s\) z; it takes x, y"):
        add.s(z=1)
    with pytest.raises(PlanError, match="'x' is not JSON-serialisable"):
        add.s(x=object())
    with pytest.raises(PlanError, match="item 1 must be a dict"):
        fan_out(square, [{"x": 1}, 2])  # type: ignore[list-item]
    with pytest.raises(PlanError, match="chain\\(\\) needs at least one stage"):
        chain()

    @workflow("t_missing_param")
    def missing() -> Any:
        return chain(add.s(y=1))

    with pytest.raises(PlanError, match=r"step 'add' \(stage 0\): missing parameter\(s\) x"):
        missing.start()

    @workflow("t_first_dynamic")
    def first_dynamic() -> Any:
        return chain(fan_out(square), double.s())

    with pytest.raises(PlanError, match="first stage cannot fan out"):
        first_dynamic.start()


def test_step_and_workflow_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="runtime must be one of short, long, got 'medium'"):
        step(runtime="medium")(lambda ctx: None)
    with pytest.raises(ConfigError, match="soft_timeout .* must be below hard_timeout"):
        step(soft_timeout=10, hard_timeout=5)(lambda ctx: None)
    with pytest.raises(ConfigError, match="retries must be 0 or more"):
        step(retries=-1)(lambda ctx: None)
    with pytest.raises(ConfigError, match="first parameter must be the StepContext"):
        step(name="noargs")(lambda: None)
    with pytest.raises(ConfigError, match="on_failure must be one of collect, fail"):
        workflow("x", on_failure="ignore")


def test_non_json_result_fails_naming_the_step(worker: WorkerProcess, redis_client: Any) -> None:
    run = registry.get("t_not_json").start()
    record = run.wait(timeout=30)
    assert record.status is RunStatus.FAILED
    assert "StepResultNotSerializable" in (record.error or "")
    assert "step 'not_json' (0:not_json) returned a value that is not JSON" in (record.error or "")
    assert int(redis_client.get(f"test:count:{run.id}:0:not_json")) == 1  # not retried: it cannot help


def test_changed_plan_is_a_nondeterminism_error(worker: WorkerProcess) -> None:
    from haulage.progress.models import Checkpoint

    key = f"nd-{uuid.uuid4().hex}"
    wf = registry.get("t_chain")
    # A checkpoint left by a different step at the same position, as if the plan had changed.
    run_id = uuid.uuid5(uuid.UUID("6f1f3c0e-54b7-4d8e-9a43-1f0d3c2b9a10"), f"t_chain\x00{key}").hex
    get_store().put_checkpoint(run_id, Checkpoint("0:add", "some_other_step", 1))
    run = wf.start(x=1, idempotency_key=key)
    assert run.id == run_id
    record = run.wait(timeout=30)
    assert record.status is RunStatus.FAILED
    assert "checkpointed by 'some_other_step' but is now 'add'" in (record.error or "")
    assert "deterministic" in (record.error or "")


def test_unreachable_broker_leaves_no_run(redis_server: str) -> None:
    owner = f"nobroker-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HAULAGE_BROKER_URL": "redis://127.0.0.1:1/0", "PYTHONPATH": str(ROOT),
           "HAULAGE_CELERY_BROKER_CONNECTION_MAX_RETRIES": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "haulage.cli", "run", "t_chain", "-p", "x=1", "--created-by", owner],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "broker is unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert runs_by(owner) == []
