"""No silent stall: every way a run can stop moving ends in progress or a clear error on the run.

Each test is a world of real processes: a worker subprocess with its own settings,
and the process that starts the run (this one, or a subprocess with the
world's settings), on a real Redis and, where the case is about Firestore, the
Firestore emulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.stall_flows  # noqa: F401 - registers the t_stall_* workflows in this process
from haulage.coordination import get_coordination
from haulage.devtools.redis_server import free_port, start_redis
from haulage.errors import ConfigMismatch
from haulage.workflows import list_runs, registry
from tests.conftest import ROOT, WorkerProcess, wait_until

MODULES = "tests.flows,tests.stall_flows"

#: run in a subprocess with a world's settings: start a workflow, wait for it, print what a user sees
_START = """
import json, sys, time
from haulage.workflows import registry
registry.load_modules()
name, params, owner, timeout = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4])
began = time.monotonic()
try:
    run = registry.get(name).start(created_by=owner, **params)
except Exception as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - began}))
    raise SystemExit(0)
record = run.wait(timeout=timeout)
print(json.dumps({
    "id": run.id, "status": record.status.value, "error": record.error, "result": record.result,
    "seconds": time.monotonic() - began, "history": [e.message for e in record.history],
    "steps": [{"key": s.key, "status": s.status.value, "attempt": s.attempt, "error": s.error}
              for s in run.steps()],
}))
"""


def start_in(env: dict[str, str], name: str, params: dict[str, Any], *, owner: str = "", timeout: float = 60) -> Any:
    proc = subprocess.run(
        [sys.executable, "-c", _START, name, json.dumps(params), owner or f"stall-{uuid.uuid4().hex[:8]}",
         str(timeout)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
        timeout=timeout + 60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def announced(hostname_part: str) -> bool:
    return any(hostname_part in h for h in get_coordination().worker_announcements())


@pytest.fixture
def firestore_world(redis_server: str) -> dict[str, str]:
    """Settings of a world whose runs live in Firestore, on a broker database of its own."""
    from tests.firestore_support import TEST_PROJECT, session_emulator

    return {
        "HAULAGE_REDIS_URL": redis_server.rsplit("/", 1)[0] + "/4",
        "HAULAGE_STORE": "firestore",
        "FIRESTORE_EMULATOR_HOST": session_emulator(),
        "HAULAGE_FIRESTORE_PROJECT": TEST_PROJECT,
        "HAULAGE_FIRESTORE_COLLECTION": f"stall-{uuid.uuid4().hex[:8]}",
        "HAULAGE_MODULES": MODULES,
    }


def test_a_result_too_large_for_firestore_fails_the_step_naming_the_limit(firestore_world: dict[str, str],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    worker = WorkerProcess(tmp_path / "worker.log", queues="stall,short,long,dispatch", extra_env=firestore_world)
    worker.start()
    try:
        # In the main chain: the run ends FAILED at once (no retry can shrink it), naming the step and the limit.
        out = start_in(firestore_world, "t_stall_big", {"size": 3_000_000})
        assert out["status"] == "FAILED", out
        assert "big_value" in out["error"] and "3,000,000 bytes" in out["error"], out["error"]
        assert "1,000,000 bytes" in out["error"] and "Firestore's 1 MiB document limit" in out["error"]
        assert "StepResultTooLarge" in out["error"]
        assert [s["attempt"] for s in out["steps"]] == [1]
        # In a fan-out under on_failure="collect": that item fails, the others and the fan-in go on.
        out = start_in(firestore_world, "t_stall_big_items", {"n": 4})
        assert out["status"] == "COMPLETE", out
        failed = [s for s in out["steps"] if s["status"] == "FAILED"]
        assert len(failed) == 1 and "Firestore's 1 MiB document limit" in failed[0]["error"], out["steps"]
    finally:
        worker.stop()


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis that refuses writes once it holds 30 MB (maxmemory, noeviction): a store that says no."""
    port = free_port()
    proc = start_redis(tmp_path / "full-redis", port, appendonly=False)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    wait_until(lambda: _pings(client), timeout=10, what="the full redis")
    client.config_set("maxmemory", "30mb")
    client.config_set("maxmemory-policy", "noeviction")
    yield url
    proc.terminate()
    proc.wait(10)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_a_store_refusing_a_write_goes_through_the_retries(redis_server: str, full_redis: str,
                                                           tmp_path: Path) -> None:  # fmt: skip
    broker = redis_server.rsplit("/", 1)[0] + "/5"
    world = {"HAULAGE_REDIS_URL": full_redis, "HAULAGE_BROKER_URL": broker, "HAULAGE_RESULT_BACKEND": broker,
             "HAULAGE_MODULES": MODULES}  # fmt: skip
    worker = WorkerProcess(tmp_path / "worker.log", queues="stall,short,long,dispatch", extra_env=world)
    worker.start()
    try:
        # 40 MB is under Redis's value limit but over this Redis's memory: the store refuses the write
        # (OutOfMemoryError); the step retries like any failure and its second attempt's result fits.
        out = start_in(world, "t_stall_big", {"size": 40_000_000, "first_attempt_only": True})
        assert out["status"] == "COMPLETE", out
        assert [s["attempt"] for s in out["steps"]] == [2], out["steps"]
        log = worker.log_path.read_text(errors="replace")
        assert "'big_value' (0:big_value): the redis store refused its result checkpoint: OutOfMemoryError" in log
        # Refused every time: the retries run out and the run ends FAILED with the store's reason.
        out = start_in(world, "t_stall_big", {"size": 40_000_000})
        assert out["status"] == "FAILED", out
        assert "StoreUnavailable" in out["error"] and "OutOfMemoryError" in out["error"], out["error"]
        assert "big_value" in out["error"]
    finally:
        worker.stop()


def test_start_refuses_when_the_workers_use_another_store(firestore_world: dict[str, str], redis_server: str,
                                                          tmp_path: Path) -> None:  # fmt: skip
    # The case: the workers read Firestore, this shell (nothing sourced) writes to the Redis store.
    world = {**firestore_world, "HAULAGE_REDIS_URL": redis_server}
    worker = WorkerProcess(tmp_path / "worker.log", queues="stall", extra_env=world)
    worker.start()
    try:
        wait_until(lambda: announced(str(id(worker))), timeout=15, what="the worker's announcement")
        owner = f"mismatch-{uuid.uuid4().hex[:8]}"
        began = time.monotonic()
        with pytest.raises(ConfigMismatch) as caught:
            registry.get("t_stall_noop").start(x=1, created_by=owner)
        elapsed = time.monotonic() - began
        message = str(caught.value)
        assert "HAULAGE_STORE is 'redis' here but" in message and "'firestore'" in message, message
        assert "HAULAGE_STORE" in caught.value.settings
        assert list_runs(created_by=owner) == []  # nothing written
        assert elapsed < 1.0, elapsed
        print(f"ConfigMismatch raised in {elapsed * 1000:.1f} ms")
    finally:
        worker.stop()
    # A worker that shuts down withdraws its announcement: the next start is not refused for it.
    assert not announced(str(id(worker)))


def test_start_refuses_when_the_workers_use_another_key_prefix(redis_server: str, tmp_path: Path) -> None:
    # HAULAGE_REDIS_URL in extra_env: the worker's queues have another prefix, so it is awaited by its log.
    world = {"HAULAGE_REDIS_URL": redis_server, "HAULAGE_KEY_PREFIX": "elsewhere", "HAULAGE_MODULES": MODULES}
    # A worker of this prefix killed by an earlier test is still announced for a few seconds, and a
    # worker of one's own prefix is rightly preferred: wait until none serves these steps.
    def same_prefix_serves() -> bool:
        return any(a.get("HAULAGE_KEY_PREFIX") == "haulage" and any(n.endswith("stall_noop") for n in a["steps"])
                   for a in get_coordination().worker_announcements().values())  # fmt: skip

    wait_until(lambda: not same_prefix_serves(), timeout=30, what="earlier workers of this prefix to be gone")
    worker = WorkerProcess(tmp_path / "worker.log", queues="stall", extra_env=world)
    worker.start()
    try:
        wait_until(lambda: announced(str(id(worker))), timeout=15, what="the worker's announcement")
        with pytest.raises(ConfigMismatch) as caught:
            registry.get("t_stall_noop").start(x=1)
        assert "HAULAGE_KEY_PREFIX is 'haulage' here but" in str(caught.value) and "'elsewhere'" in str(caught.value)
    finally:
        worker.stop()
        # The other app's keys (its queue bindings) go with it: the suite checks the shared Redis for strays.
        import redis

        client = redis.Redis.from_url(redis_server)
        for key in list(client.scan_iter("elsewhere:*", count=1000)):
            client.delete(key)


def test_a_worker_that_cannot_find_the_run_says_so_and_the_run_fails(
    firestore_world: dict[str, str], redis_server: str, tmp_path: Path
) -> None:
    # The run is started while no worker is up (nothing to compare with), then a worker whose store
    # is another one takes its step: it cannot find the run, and the starter learns why.
    run = registry.get("t_stall_noop").start(x=1)
    world = {**firestore_world, "HAULAGE_REDIS_URL": redis_server}
    worker = WorkerProcess(tmp_path / "worker.log", queues="stall", extra_env=world)
    worker.start()
    try:
        began = time.monotonic()
        record = run.wait(timeout=60)
        print(f"lost run failed {time.monotonic() - began:.1f}s after the worker was ready")
        assert record.status.value == "FAILED", record
        error = record.error or ""
        assert "run never started" in error and "cannot find the run in its store" in error, error
        assert "HAULAGE_STORE is 'redis' here but" in error and "'firestore'" in error, error
        log = worker.log_path.read_text(errors="replace")
        line = next(x for x in log.splitlines() if f"run {run.id} is not in this worker's store" in x)
        assert "ERROR" in line and "HAULAGE_STORE='firestore'" in line, line
    finally:
        worker.stop()


def test_firestore_store_with_redis_down_fails_at_once_and_leaves_nothing(firestore_world: dict[str, str]) -> None:
    world = {**firestore_world, "HAULAGE_REDIS_URL": "redis://127.0.0.1:1/0"}
    owner = f"nobroker-{uuid.uuid4().hex[:8]}"
    out = start_in(world, "t_stall_noop", {"x": 1}, owner=owner)
    assert out.get("raised") == "BrokerUnavailable", out
    assert "broker is unreachable" in out["message"], out
    assert out["seconds"] < 1.0, out
    print(f"BrokerUnavailable on the Firestore store in {out['seconds'] * 1000:.1f} ms")
    # Nothing left behind in the store, as on the Redis store.
    from haulage.progress.firestore import FirestoreStore

    store = FirestoreStore(project=world["HAULAGE_FIRESTORE_PROJECT"], collection=world["HAULAGE_FIRESTORE_COLLECTION"])
    try:
        assert store.list_runs(created_by=owner) == []
    finally:
        store.close()
    # `haulage run` says the same, in one line.
    proc = subprocess.run(
        [sys.executable, "-m", "haulage.cli", "run", "t_stall_noop", "-p", "x=1", "--created-by", owner],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **world}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "broker is unreachable" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
