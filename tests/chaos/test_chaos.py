"""The chaos suite: workers SIGKILLed, Redis restarted, steps hanging, duplicates, cancellation.

Real processes throughout: a Redis server with its append-only file, prefork
workers, a beat running the stale-run reaper. Each test prints one line of
figures. Run it alone with `bash scripts/test -m chaos -s`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from haulage.devtools.redis_server import free_port, start_redis
from haulage.progress.models import RunStatus, StepStatus
from haulage.progress.redis_store import RedisStore
from tests.conftest import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


class World:
    """Its own Redis, workers and beat, so that killing and restarting them touches no other test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {
            "HAULAGE_REDIS_URL": self.url,
            "HAULAGE_MODULES": "tests.flows,tests.chaos_flows",
            "HAULAGE_VISIBILITY_TIMEOUT": "20",
            "HAULAGE_MAX_COUNTDOWN": "4",
            "HAULAGE_LOCK_LIVENESS": "3",
            "HAULAGE_STALE_AFTER": "6",
            "HAULAGE_REAPER_INTERVAL": "2",
            "HAULAGE_CELERY_BROKER_CONNECTION_RETRY": "true",
            "HAULAGE_CELERY_BROKER_CONNECTION_MAX_RETRIES": "100",
        }
        self.redis_proc = start_redis(tmp / "redis", self.port, appendonly=True, log_file=tmp / "redis.log")
        self.r = redis.Redis.from_url(self.url)
        self.store = RedisStore(self.r)
        self.workers = [WorkerProcess(tmp / f"worker{i}.log", queues="short,long,dispatch,chaos", concurrency=2,
                                      extra_env=self.env) for i in range(2)]  # fmt: skip
        for w in self.workers:
            w.start()
        self.beat = self.cli_popen(["beat"], tmp / "beat.log")

    def cli_popen(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "haulage.cli", *args], cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "haulage.cli", *args], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **self.env}, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start(self, workflow: str, **params: Any) -> str:
        args = ["run", workflow, "--json"] + [a for k, v in params.items() for a in ("-p", f"{k}={json.dumps(v)}")]
        return str(json.loads(self.cli(*args))["run_id"])

    def done(self, run_id: str) -> int:
        try:
            record = self.store.get_run(run_id)
        except redis.RedisError:
            return 0
        return record.steps.done if record else 0

    def restart_redis(self) -> float:
        """Stop Redis (SIGTERM: it writes its append-only file) and start it again from that file."""
        began = time.monotonic()
        self.redis_proc.terminate()
        self.redis_proc.wait(20)
        self.redis_proc = start_redis(self.tmp / "redis", self.port, appendonly=True, log_file=self.tmp / "redis.log")
        return time.monotonic() - began

    def close(self) -> None:
        os.killpg(self.beat.pid, signal.SIGTERM)
        self.beat.wait(20)
        for w in self.workers:
            w.stop()
        self.redis_proc.terminate()
        self.redis_proc.wait(20)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def pool_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def effects(world: World, run_id: str, prefix: str) -> dict[str, int]:
    """Counts kept outside the engine, per step key: bodies started, or guarded effects performed."""
    return {
        k.decode().split(f"{run_id}:", 1)[1]: int(world.r.get(k))
        for k in world.r.scan_iter(f"chaos:{prefix}:{run_id}:*")
    }


def test_sigkill_workers_during_a_200_item_fan_out(world: World) -> None:
    n = 200
    run_id = world.start("t_chaos", n=n, sleep=0.1)
    began = time.monotonic()
    kills = 0
    rng = random.Random(7)
    while kills < 6:
        target = (kills + 1) * 20
        wait_until(lambda t=target: world.done(run_id) >= t, timeout=60, interval=0.1, what="progress between kills")
        victim = world.workers[kills % 2]
        children = pool_children(victim.proc.pid) if victim.proc else []
        if kills % 3 == 2 or not children:
            victim.kill()  # the whole worker, main process and pool: a lost machine
            victim.start()
        else:
            os.kill(rng.choice(children), signal.SIGKILL)  # one pool process: the worker requeues its message
        kills += 1
    record = wait_until(lambda: (r := world.store.get_run(run_id)) and r.terminal and r, timeout=180, interval=0.2,
                        what="the run to end")  # fmt: skip
    seconds = time.monotonic() - began
    assert record.status is RunStatus.COMPLETE, record.error
    final = world.store.get_checkpoints(run_id, ["end"])["end"].value
    assert final == {"count": n, "sum": sum(range(n)), "failed": 0}
    fx, bodies = effects(world, run_id, "effect"), effects(world, run_id, "body")
    assert len(fx) == n and set(fx.values()) == {1}, {k: v for k, v in fx.items() if v != 1}  # exactly once each
    stuck = [s.key for s in world.store.list_steps(run_id) if s.status in (StepStatus.RUNNING, StepStatus.QUEUED)]
    assert stuck == []
    duplicates = sum(v - 1 for v in bodies.values())
    print(f"\nchaos a: kills={kills} items={n} body_reruns={duplicates} duplicate_effects=0 lost=0 "
          f"recoveries={record.recoveries} seconds={seconds:.1f}")  # fmt: skip


def test_redis_restarted_from_its_append_only_file_mid_run(world: World) -> None:
    n = 60
    run_id = world.start("t_chaos", n=n, sleep=0.1)
    began = time.monotonic()
    wait_until(lambda: world.done(run_id) >= 15, timeout=60, what="a quarter done")
    done_before = world.done(run_id)
    outage = world.restart_redis()
    record = wait_until(lambda: (r := _safe_get(world, run_id)) and r.terminal and r, timeout=180, interval=0.3,
                        what="the run to end after the restart")  # fmt: skip
    assert record.status is RunStatus.COMPLETE, record.error
    final = world.store.get_checkpoints(run_id, ["end"])["end"].value
    assert final == {"count": n, "sum": sum(range(n)), "failed": 0}
    fx = effects(world, run_id, "effect")
    assert len(fx) == n and set(fx.values()) == {1}
    print(f"\nchaos b: redis restarts=1 outage={outage:.1f}s items={n} done_before={done_before} lost=0 "
          f"duplicate_effects=0 recoveries={record.recoveries} seconds={time.monotonic() - began:.1f}")  # fmt: skip


def _safe_get(world: World, run_id: str) -> Any:
    try:
        return world.store.get_run(run_id)
    except redis.RedisError:
        return None


def test_hard_timeout_kills_and_retries(worker: WorkerProcess, make_worker: Any, redis_client: Any) -> None:
    from haulage.workflows import registry

    w = make_worker(queues="crash", concurrency=1)
    w.start()
    began = time.monotonic()
    run = registry.get("t_hang").start(x=5)
    record = run.wait(timeout=90)
    assert record.status is RunStatus.COMPLETE and run.results() == 5
    step = {s.key: s for s in run.steps()}["0:hang_once"]
    assert step.attempt == 2
    assert any("TimeLimitExceeded" in e.message for e in record.history if e.kind == "retry")
    print(f"\nchaos c1: hard timeout 2s, attempts={step.attempt}, seconds={time.monotonic() - began:.1f}")


def test_always_failing_step_ends_failed_after_its_attempts(worker: WorkerProcess) -> None:
    from haulage.workflows import registry

    began = time.monotonic()
    run = registry.get("t_flaky").start(key=uuid.uuid4().hex, fail_times=100)
    record = run.wait(timeout=60)
    assert record.status is RunStatus.FAILED
    assert record.error == "step 1:flaky failed: ConnectionError: flaky failure 3"
    assert len([e for e in record.history if e.kind == "retry"]) == 2
    print(f"\nchaos c2: always failing, attempts=3, status=FAILED, seconds={time.monotonic() - began:.1f}")


def test_step_in_backoff_is_not_reaped(worker: WorkerProcess) -> None:
    from haulage.workflows import registry
    from haulage.workflows.reaper import reap

    run = registry.get("t_backoff").start(key=uuid.uuid4().hex)
    wait_until(lambda: any(s.status is StepStatus.QUEUED and s.retry_at for s in run.steps()), timeout=30,
               what="the step to wait out its backoff")  # fmt: skip
    report = reap(stale_seconds=0.01)  # everything looks stale at this threshold
    assert run.id in report.waiting and run.id not in report.resumed
    record = run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETE and record.recoveries == 0
    print(f"\nchaos c3: step in backoff seen by the reaper: waiting, not resumed (recoveries={record.recoveries})")


def test_reaper_resumes_a_stale_run_then_gives_up(worker: WorkerProcess) -> None:
    from haulage.progress import get_store
    from haulage.progress.models import RunUpdate
    from haulage.workflows import registry
    from haulage.workflows.reaper import reap

    run = registry.get("t_chain").start(x=1)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    store = get_store()
    # A run whose worker vanished: back to PROCESSING, heartbeat long ago, its last checkpoints gone.
    store.transition(run.id, RunStatus.PROCESSING, allowed_from={RunStatus.COMPLETE},
                     update=RunUpdate(set={"heartbeat": 1.0, "finished_at": None}))  # fmt: skip
    report = reap(stale_seconds=60, limit_recoveries=1)
    assert run.id in report.resumed
    assert run.wait(timeout=30).status is RunStatus.COMPLETE and run.status().recoveries == 1
    store.transition(run.id, RunStatus.PROCESSING, allowed_from={RunStatus.COMPLETE},
                     update=RunUpdate(set={"heartbeat": 1.0}))  # fmt: skip
    report = reap(stale_seconds=60, limit_recoveries=1)
    assert run.id in report.failed
    record = run.status()
    assert record.status is RunStatus.FAILED and "giving up" in (record.error or "")
    assert record.history[-1].kind == "reaped"


def test_cancel_mid_fan_out_starts_no_new_item(worker: WorkerProcess, make_worker: Any, redis_client: Any) -> None:
    from haulage.workflows import registry
    from tests.integration.test_workflows import counts

    w = make_worker(queues="crash", concurrency=2)
    w.start()
    began = time.monotonic()
    run = registry.get("t_slow_fan_out").start(n=40, sleep=0.2)
    wait_until(lambda: run.status().steps.done >= 5, timeout=30, what="some items done")
    run.cancel()
    at_cancel = len(counts(redis_client, run.id))
    wait_until(lambda: all(s.status is not StepStatus.RUNNING for s in run.steps()), timeout=30,
               what="items in flight to finish")  # fmt: skip
    after = len(counts(redis_client, run.id))
    assert after <= at_cancel + 2 and run.status().status is RunStatus.CANCELLED
    print(f"\nchaos e: cancelled at {at_cancel} of 40 items started, {after} started in all, "
          f"seconds={time.monotonic() - began:.1f}")  # fmt: skip
