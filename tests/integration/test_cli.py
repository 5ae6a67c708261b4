"""The `haulage` command against the session's Redis and worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import ROOT, WorkerProcess

pytestmark = pytest.mark.timeout(90)


def haulage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "haulage.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_workflows_lists_names_and_parameters(redis_server: str) -> None:
    out = haulage("workflows")
    assert out.returncode == 0, out.stderr
    assert "plan_review(project_id: string, document: string (optional))" in out.stdout
    listing = json.loads(haulage("workflows", "--json").stdout)
    chain = next(w for w in listing if w["name"] == "t_chain")
    assert chain["parameters"] == {"x": {"type": "integer", "required": True}}


def test_run_wait_json_status_results_list(worker: WorkerProcess) -> None:
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    out = haulage("run", "t_dynamic", "-p", "n=4", "-p", "fail_on=[3]", "--created-by", owner, "--tag", "cli",
                  "--wait", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    run_id = doc["run"]["id"]
    assert doc["run"]["status"] == "COMPLETE" and doc["run"]["tags"] == ["cli"]
    assert doc["results"] == {"sum": 0 + 1 + 4, "failed": [{"x": 3}]}

    status = haulage("status", run_id)
    assert status.returncode == 0 and "COMPLETE" in status.stdout and "fan-out over 4 item(s)" in status.stdout
    assert json.loads(haulage("status", run_id, "--json").stdout)["steps"] == {"total": 6, "done": 5, "failed": 1}
    assert json.loads(haulage("results", run_id).stdout) == {"sum": 5, "failed": [{"x": 3}]}
    listed = haulage("list", "--created-by", owner)
    assert run_id in listed.stdout and "t_dynamic" in listed.stdout
    assert [r["id"] for r in json.loads(haulage("list", "--created-by", owner, "--json").stdout)] == [run_id]


def test_run_without_wait_prints_the_id_then_watch(worker: WorkerProcess) -> None:
    out = haulage("run", "t_chain", "-p", "x=2")
    assert out.returncode == 0
    run_id = out.stdout.strip()
    assert len(run_id) == 32
    watched = haulage("watch", run_id, "--timeout", "30")
    assert watched.returncode == 0, watched.stderr
    assert "100.0% COMPLETE" in watched.stdout and "12" in watched.stdout  # (2+1)*2*2


def test_failed_run_exits_non_zero(worker: WorkerProcess) -> None:
    out = haulage("run", "t_dynamic_fail", "-p", "n=2", "-p", "fail_on=[0]", "--wait")
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "1 of 2 fan-out items failed" in out.stdout


def test_cancel_and_resume(worker: WorkerProcess, redis_client: Any) -> None:
    gate = uuid.uuid4().hex
    out = haulage("run", "t_gated", "-p", "x=1", "-p", f"gate={gate}", "--wait")
    assert out.returncode == 1
    run_id = out.stdout.split()[1]
    redis_client.set(f"test:gate:{gate}", 1)
    resumed = haulage("resume", run_id)
    assert resumed.returncode == 0 and f"run {run_id} resumed" in resumed.stdout
    assert haulage("watch", run_id, "--timeout", "30").returncode == 0
    assert haulage("cancel", run_id).stdout.strip().endswith("had already ended; nothing to cancel")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "t_chain", "-p", "x=abc"], "invalid parameters for workflow 't_chain': x: Input should be"),
        (["run", "nope"], "unknown workflow 'nope'; known workflows:"),
        (["run", "t_chain", "-p", "novalue"], "-p expects key=value, got 'novalue'"),
        (["status", "no-such-run"], "no run with id 'no-such-run'"),
        (["cancel", "no-such-run"], "no run with id 'no-such-run'"),
        (["resume", "no-such-run"], "no run with id 'no-such-run'"),
        (["results", "no-such-run"], "no run with id 'no-such-run'"),
    ],
)  # fmt: skip
def test_user_mistakes_print_one_line(redis_server: str, args: list[str], message: str) -> None:
    out = haulage(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("haulage: error: ") and message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_bad_setting_is_named(redis_server: str) -> None:
    out = haulage("list", env={"HAULAGE_MAX_COUNTDOWN": "5000", "HAULAGE_VISIBILITY_TIMEOUT": "100"})
    assert out.returncode == 2
    assert "HAULAGE_MAX_COUNTDOWN must be below HAULAGE_VISIBILITY_TIMEOUT (100), got 5000" in out.stderr
