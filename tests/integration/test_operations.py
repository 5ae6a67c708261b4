"""Operations: Flower sees the steps, beat fires each tick once even when doubled."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from haulage.devtools.redis_server import free_port
from haulage.workflows import RunStatus, list_runs, registry
from tests.conftest import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def spawn(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "haulage.cli", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


#: Flower refuses to start without auth (haulage flower); its API wants these credentials
FLOWER_AUTH = "ops:flower-test-password"


def get(url: str) -> str:
    basic = base64.b64encode(FLOWER_AUTH.encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - loopback only
        return resp.read().decode()


def test_flower_lists_steps_with_run_ids(worker: WorkerProcess, tmp_path: Path) -> None:
    port = free_port()
    flower = spawn(["flower", "--port", str(port)], tmp_path / "flower.log", HAULAGE_FLOWER_BASIC_AUTH=FLOWER_AUTH)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ok(f"{base}/healthcheck"), timeout=30, what="flower to answer")
        # Flower keeps only the events it sees: wait until it has heard a worker's heartbeat.
        wait_until(lambda: "flower_worker_online" in _text(f"{base}/metrics") and
                   re.search(r"flower_worker_online\{[^}]*\} 1\.0", _text(f"{base}/metrics")),
                   timeout=30, what="flower to receive events")
        run = registry.get("t_chain").start(x=2)
        assert run.wait(timeout=30).status is RunStatus.COMPLETE

        def steps_seen() -> list[dict[str, Any]]:
            tasks = json.loads(get(f"{base}/api/tasks"))
            return [t for t in tasks.values() if run.id in str(t.get("kwargs"))]

        def finished_steps() -> list[dict[str, Any]]:
            found = [t for t in steps_seen() if not t["name"].startswith("haulage.") and t["state"] == "SUCCESS"]
            return found if len(found) >= 3 else []

        seen = wait_until(finished_steps, timeout=30, what="three finished steps in /api/tasks")
        names = sorted(t["name"] for t in seen if not t["name"].startswith("haulage."))  # engine tasks aside
        assert names == ["t_chain.add", "t_chain.double", "t_chain.double"]
        assert all(t["state"] == "SUCCESS" for t in seen)
        assert all("'key':" in str(t["kwargs"]) for t in seen)  # the step key is visible too
        metrics = get(f"{base}/metrics")
        succeeded = re.findall(
            r'flower_events_total\{[^}]*task="t_chain\.double"[^}]*type="task-succeeded"[^}]*\} (\S+)', metrics
        )
        assert succeeded and float(succeeded[0]) >= 2
    finally:
        stop(flower)


def _text(url: str) -> str:
    try:
        return get(url)
    except OSError:
        return ""


def _ok(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True


def test_two_beats_start_one_run_per_tick(worker: WorkerProcess, tmp_path: Path) -> None:
    before = {r.id for r in list_runs(workflow="t_tick", limit=1000)}
    # Two beats sharing the lock (one stands by) and one with a lock of its own: a doubled beat.
    beats = [
        spawn(["beat"], tmp_path / "beat1.log"),
        spawn(["beat"], tmp_path / "beat2.log"),
        spawn(["beat"], tmp_path / "beat3.log", HAULAGE_CELERY_REDBEAT_LOCK_KEY="haulage:redbeat:other-lock"),
    ]
    try:
        wait_until(lambda: len(_new_runs(before)) >= 4, timeout=60, interval=0.2, what="four scheduled ticks")
    finally:
        for b in beats:
            stop(b)
    runs = _new_runs(before)
    ticks = Counter(r.idempotency_key for r in runs)
    assert all(n == 1 for n in ticks.values())  # one run per tick
    numbers = sorted(int(k.rsplit(":", 1)[1]) for k in ticks)  # type: ignore[union-attr]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # consecutive: none doubled, none lost
    fired = len(
        re.findall(
            r"Scheduler: Sending due task workflow:t_tick", "".join(p.read_text() for p in tmp_path.glob("beat*.log"))
        )
    )
    assert fired >= len(runs)
    for run in runs:
        assert run.tags == ["scheduled", "workflow:t_tick"] and run.created_by == "haulage-beat"
    wait_until(lambda: all(r.terminal for r in _new_runs(before)), timeout=30, what="scheduled runs to finish")
    print(f"\nbeat: 3 beat processes, {fired} firings, {len(runs)} runs, ticks {numbers}")


def _new_runs(before: set[str]) -> list[Any]:
    return [r for r in list_runs(workflow="t_tick", limit=1000) if r.id not in before]


def test_step_logs_are_structured_json(worker: WorkerProcess, make_worker: Any) -> None:
    w = make_worker(queues="crash", concurrency=1, extra_env={"HAULAGE_LOG_FORMAT": "json"})
    w.start()
    run = registry.get("t_chatty").start(x=42)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE

    def lines() -> list[dict[str, Any]]:
        out = []
        for line in w.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return [e for e in out if e.get("message") in ("working on 42", "through the step's own logger: 42")]

    entries = wait_until(lambda: len(lines()) >= 2 and lines(), timeout=10, what="the step's log lines")
    for entry in entries:
        assert entry["run_id"] == run.id and entry["step_key"] == "0:chatty"
        assert entry["attempt"] == 1 and entry["backend"] == "local"
        assert entry["severity"] in ("INFO", "WARNING") and entry["logger"].startswith("haulage.")
        assert entry["logging.googleapis.com/labels"] == {"run_id": run.id}


def test_completion_events_and_follow_ups(worker: WorkerProcess, redis_client: Any) -> None:
    from haulage import keys

    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.completions_channel())
    try:
        run = registry.get("t_followed").start(x=4, created_by="ana@example.com", tags=["t1"])
        failing = registry.get("t_dynamic_fail").start(n=2, fail_on=[0])
        events: dict[str, dict[str, Any]] = {}

        def both_heard() -> bool:
            message = pubsub.get_message(timeout=0.2)
            if message:
                event = json.loads(message["data"])
                events[event["run_id"]] = event
            return run.id in events and failing.id in events

        wait_until(both_heard, timeout=30, interval=0.01, what="completion events of both runs")
    finally:
        pubsub.close()
    done = events[run.id]
    assert done["status"] == "COMPLETE" and done["workflow"] == "t_followed"
    assert done["tags"] == ["t1"] and done["created_by"] == "ana@example.com"
    assert done["steps"] == {"total": 1, "done": 1, "failed": 0} and done["finished_at"] >= done["created_at"]
    assert events[failing.id]["status"] == "FAILED" and "fan-out items failed" in events[failing.id]["error"]
    # The follow-up started once, with the finished run's result as its parameter.
    follow = wait_until(lambda: [r for r in list_runs(workflow="t_chain", limit=200) if f"after:{run.id}" in r.tags],
                        timeout=30, what="the follow-up run")  # fmt: skip
    assert len(follow) == 1 and follow[0].params == {"x": 4}
    from haulage.workflows import get_run

    assert get_run(follow[0].id).wait(timeout=30).status is RunStatus.COMPLETE
    assert get_run(follow[0].id).results() == (4 + 1) * 2 * 2
