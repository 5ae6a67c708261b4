"""The `haulage` command against the session's Redis and worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from haulage.devtools.redis_server import free_port, start_redis
from tests.conftest import ROOT, WorkerProcess, wait_until

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
    assert 'plan_review(project_id: string, document: string = "sample")' in out.stdout  # defaults shown
    listing = json.loads(haulage("workflows", "--json").stdout)
    chain = next(w for w in listing if w["name"] == "t_chain")
    assert chain["parameters"] == {"x": {"type": "integer", "required": True}}
    review = next(w for w in listing if w["name"] == "plan_review")
    assert review["parameters"]["document"] == {"type": "string", "required": False, "default": "sample"}


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
    again = haulage("resume", run_id)  # COMPLETE now: nothing is re-run, and the command says so
    assert again.returncode == 0, again.stderr
    assert f"run {run_id} is already complete; nothing to resume" in again.stdout and "resumed" not in again.stdout


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
        (["list", "--status", "RUNNING"],
         "unknown run status 'RUNNING'; did you mean PROCESSING? statuses are PENDING, PROCESSING,"),
        (["list", "--status", "bogus"], "unknown run status 'bogus'; statuses are PENDING"),
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


def test_a_str_parameter_takes_digits_as_text(redis_server: str) -> None:
    """`-p project_id=12345` for a `str` parameter is the text "12345", not the number 12345 (refused before)."""
    out = haulage("run", "plan_review", "-p", "project_id=12345", "-p", "document=one page", "--json")
    assert out.returncode == 0, out.stderr
    run_id = json.loads(out.stdout)["run_id"]
    assert json.loads(haulage("status", run_id, "--json").stdout)["params"]["project_id"] == "12345"
    haulage("cancel", run_id)
    # Other types still parse as JSON, and a wrong one is still refused by name.
    refused = haulage("run", "t_chain", "-p", "x=[1]")
    assert refused.returncode == 2 and "x: Input should be a valid integer" in refused.stderr


def test_list_status_is_case_insensitive(redis_server: str) -> None:
    out = haulage("list", "--status", "processing", "--limit", "1")
    assert out.returncode == 0, out.stderr


def test_unsourced_shell_gets_a_hint(tmp_path: Path) -> None:
    """No HAULAGE_REDIS_URL and nothing on 127.0.0.1:6379: the error says what to do, in one line."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 6379)) == 0:
            message = "something listens on 127.0.0.1:6379 on this machine"
            if os.environ.get("CI") == "true":
                pytest.fail(message)  # CI's machine is ours: nothing should be there
            pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_")}
    env["HAULAGE_DEV_DIR"] = str(tmp_path / "no-dev")
    for args in (["list"], ["status", "abc"]):
        out = subprocess.run([sys.executable, "-m", "haulage.cli", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("haulage: error: the store is unreachable"), out.stderr
        assert "127.0.0.1:6379" in out.stderr and "is `haulage dev` running?" in out.stderr
        assert "source .haulage/env" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_syntax_error_in_a_user_module_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_flows.py").write_text("from haulage import step\n\ndef oops(:\n    pass\n")
    for command in (["workflows"], ["worker"]):
        out = subprocess.run([sys.executable, "-m", "haulage.cli", *command], cwd=tmp_path,
                             env={**os.environ, "HAULAGE_MODULES": "broken_flows"}, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("haulage: error: cannot import 'broken_flows' from HAULAGE_MODULES: ")
        assert "broken_flows.py, line 3" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_one_malformed_fan_out_item_is_that_items_failure(worker: WorkerProcess) -> None:
    """A step returns rows for a fan-out and one lacks a parameter: that row fails, the others run."""
    rows = json.dumps([{"x": 1}, {"sleep": 0}, {"x": 3}])
    out = haulage("run", "t_rows", "-p", f"rows={rows}", "--wait", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["run"]["status"] == "COMPLETE"
    assert doc["results"] == {"sum": 1 + 9, "failed": [{"sleep": 0}]}
    assert doc["run"]["steps"] == {"total": 5, "done": 4, "failed": 1}
    events = [e["message"] for e in doc["run"]["history"] if e["kind"] == "step-failed"]
    assert events == ["square refused: step 'square' (fan-out item 1): missing parameter(s) x"], events
    # The engine's own line about it names the run and the step that wrote it.
    run_id = doc["run"]["id"]
    wait_until(lambda: f"[run={run_id} step=1:fan_out attempt=1] step 1:square[1] of run {run_id} refused"
               in worker.log_path.read_text(errors="replace"), timeout=10, what="the fan-out's log line")  # fmt: skip


def test_two_apps_share_one_redis(redis_server: str, redis_client: Any, make_worker: Any) -> None:
    """Another app (HAULAGE_KEY_PREFIX=appb) on the same Redis database: its queues and kombu's keys are its own."""
    env = {"HAULAGE_KEY_PREFIX": "appb", "HAULAGE_REDIS_URL": redis_server}
    other = make_worker(extra_env=env)
    other.start()
    out = haulage("run", "t_chain", "-p", "x=2", env=env)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    # The app's queues are its own lists, where the suite's worker (prefix haulage) never looks.
    assert redis_client.exists("appb:_kombu.binding.short")
    watched = haulage("watch", run_id, "--timeout", "30", env=env)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert haulage("status", run_id, env={"HAULAGE_KEY_PREFIX": "haulage"}).returncode == 2  # not the other app's
    names = {k.decode() for k in redis_client.scan_iter(count=1000)}
    # Every key sits under some app's prefix ("<prefix>:..."; other tests use prefixes of their own):
    # none is kombu's or Celery's bare name (_kombu.binding.short, unacked, celery-task-meta-...).
    bare = sorted(n for n in names if not re.match(r"[\w-]+:", n))
    assert bare == [], f"keys outside every prefix: {bare[:10]}"
    assert any(n.startswith("appb:celery-task-meta-") for n in names)


def test_worker_refuses_an_evicting_redis(tmp_path: Path) -> None:
    """A Redis that may evict keys (allkeys-lru) would drop locks and checkpoints: the worker says so and stops."""
    port = free_port()
    proc = start_redis(tmp_path / "redis", port, appendonly=False)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        redis.Redis.from_url(url).config_set("maxmemory-policy", "allkeys-lru")
        refused = haulage("worker", "--concurrency", "1", env={"HAULAGE_REDIS_URL": url})
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "maxmemory-policy is allkeys-lru" in refused.stderr and "HAULAGE_REDIS_CHECK=warn" in refused.stderr
        assert "appendonly is off" in refused.stderr  # the weaker problem is a warning on the way
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            started = subprocess.Popen([sys.executable, "-m", "haulage.cli", "worker", "--concurrency", "1"], cwd=ROOT,
                                       env={**os.environ, "PYTHONPATH": str(ROOT), "HAULAGE_REDIS_URL": url,
                                            "HAULAGE_REDIS_CHECK": "warn"},
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            wait_until(lambda: " ready." in log.read_text(errors="replace") or started.poll() is not None,
                       timeout=30, what="the worker on HAULAGE_REDIS_CHECK=warn")  # fmt: skip
            assert started.poll() is None, log.read_text(errors="replace")[-2000:]
            assert "maxmemory-policy is allkeys-lru" in log.read_text(errors="replace")
        finally:
            os.killpg(started.pid, signal.SIGTERM)
            started.wait(30)
    finally:
        proc.terminate()
        proc.wait(10)
