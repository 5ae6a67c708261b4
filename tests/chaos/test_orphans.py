"""Orphaned steps come back within seconds, on the default settings, and a crash is not a failure.

A world of its own (a Redis server, two prefork workers) with the settings a
user gets: visibility timeout 3,600 s, lock liveness 15 s, max countdown
600 s, crash budget 3 (the suite-wide overrides of tests/conftest.py are
blanked out for these workers). Whole workers are SIGKILLed (main process and
pool) while they run a step; the other worker must re-run it by itself, with
no reaper, no beat and no manual resume. Each test prints its figures.
"""

from __future__ import annotations

import json
import os
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

from haulage.coordination import RedisCoordination
from haulage.devtools.redis_server import free_port, start_redis
from haulage.progress.models import RunRecord, RunStatus, StepStatus
from haulage.progress.redis_store import RedisStore
from tests.conftest import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

#: the default HAULAGE_LOCK_LIVENESS, which governs how soon an orphan is found
LIVENESS = 15.0
#: seconds past the liveness window we allow for a recovery: the sweep's interval, a lock wait, a worker's pick-up
SLACK = 8.0


class World:
    """Its own Redis and two workers on default durability settings."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {
            "HAULAGE_REDIS_URL": self.url,
            "HAULAGE_MODULES": "tests.chaos.orphan_flows",
            # Blank is the default: undo the suite's short visibility timeout, countdown and liveness.
            "HAULAGE_VISIBILITY_TIMEOUT": "",
            "HAULAGE_MAX_COUNTDOWN": "",
            "HAULAGE_LOCK_LIVENESS": "",
            "HAULAGE_STALE_AFTER": "",
            "HAULAGE_CRASH_RETRIES": "",
        }
        self.redis_proc = start_redis(tmp / "redis", self.port, appendonly=True, log_file=tmp / "redis.log")
        self.r = redis.Redis.from_url(self.url)
        self.store = RedisStore(self.r)
        self.workers = [WorkerProcess(tmp / f"worker{i}.log", queues="short,long,dispatch", concurrency=2,
                                      extra_env=self.env) for i in range(2)]  # fmt: skip
        for w in self.workers:
            w.start()

    def start(self, workflow: str, **params: Any) -> str:
        args = ["run", workflow, "--json"] + [a for k, v in params.items() for a in ("-p", f"{k}={json.dumps(v)}")]
        out = subprocess.run([sys.executable, "-m", "haulage.cli", *args], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **self.env}, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return str(json.loads(out.stdout)["run_id"])

    def bodies(self, run_id: str) -> int:
        return int(self.r.get(f"orphans:body:{run_id}") or 0)

    def kill_runner(self, run_id: str) -> WorkerProcess:
        """SIGKILL the whole worker (main process and pool) whose pool runs the run's step, and start it again."""
        pid = int(self.r.get(f"orphans:worker:{run_id}") or 0)
        [victim] = [w for w in self.workers if w.proc is not None and w.proc.pid == pid]
        victim.kill()
        victim.start()
        return victim

    def wait_end(self, run_id: str, timeout: float) -> RunRecord:
        record = wait_until(lambda: (r := self.store.get_run(run_id)) and r.terminal and r, timeout=timeout,
                            interval=0.2, what="the run to end")  # fmt: skip
        return record  # type: ignore[no-any-return]

    def logs(self) -> str:
        return "".join(w.log_path.read_text(errors="replace") for w in self.workers)

    def unacked(self) -> dict[bytes, bytes]:
        """kombu's hash of unacknowledged deliveries, whatever prefix the transport options give it."""
        [key] = [k for k in self.r.scan_iter("*unacked") if self.r.type(k) == b"hash"] or [b"unacked"]
        return {k: v for k, v in self.r.hgetall(key).items()}

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis_proc.terminate()
        self.redis_proc.wait(20)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def test_a_killed_workers_step_is_re_run_by_another_within_seconds(world: World) -> None:
    run_id = world.start("t_orphan", sleep=4.0)
    wait_until(lambda: world.bodies(run_id) == 1, timeout=60, what="the step's body to start")
    marks = RedisCoordination(world.r)

    def marked() -> bool:  # the worker has marked its delivery held, as it does mid-step
        tags = [t.decode() for t in world.unacked()]
        return bool(tags) and all(marks.held_deliveries(tags))

    wait_until(marked, timeout=10, what="the running delivery marked held")
    world.kill_runner(run_id)
    killed = time.monotonic()
    wait_until(lambda: world.bodies(run_id) == 2, timeout=LIVENESS + SLACK + 10, interval=0.1,
               what="the step re-run by the surviving worker")  # fmt: skip
    rerun_after = time.monotonic() - killed
    record = world.wait_end(run_id, timeout=30)
    ended_after = time.monotonic() - killed
    assert record.status is RunStatus.COMPLETE, record.error
    assert record.steps.failed == 0 and record.error is None
    step = world.store.get_step(run_id, "0:orphan_slow")
    assert step is not None and step.status is StepStatus.COMPLETE
    assert step.attempt == 1  # a crash used none of the step's retries (it has none: retries=0)
    assert world.bodies(run_id) == 2
    assert any(e.kind == "crash" and "died" in e.message for e in record.history), record.history
    assert rerun_after < LIVENESS + SLACK
    print(
        f"\norphan: whole worker SIGKILLed mid-step (retries=0); re-run by the other worker "
        f"{rerun_after:.1f}s after the kill, run COMPLETE {ended_after:.1f}s after it; 2 bodies, 0 failures"
    )


def test_a_step_that_kills_its_worker_every_time_fails_after_the_crash_budget(world: World) -> None:
    run_id = world.start("t_orphan", sleep=60.0)
    recoveries = []
    killed = time.monotonic()
    for kill in range(1, 5):
        wait_until(lambda k=kill: world.bodies(run_id) == k, timeout=LIVENESS + SLACK + 15, interval=0.1,
                   what=f"body start {kill}")  # fmt: skip
        if kill > 1:
            recoveries.append(time.monotonic() - killed)
        time.sleep(0.5)
        world.kill_runner(run_id)
        killed = time.monotonic()
    record = world.wait_end(run_id, timeout=LIVENESS + SLACK + 15)
    failed_after = time.monotonic() - killed
    assert record.status is RunStatus.FAILED
    assert record.error is not None and "worker running the step died 4 times" in record.error, record.error
    assert "HAULAGE_CRASH_RETRIES=3" in record.error
    step = world.store.get_step(run_id, "0:orphan_slow")
    assert step is not None and step.status is StepStatus.FAILED and step.error_type == "WorkerLost"
    assert world.bodies(run_id) == 4  # the fifth delivery found the budget spent and did not run the body
    print(
        f"\npoison step: 4 whole-worker SIGKILLs; re-runs after {', '.join(f'{s:.1f}' for s in recoveries)}s; "
        f"FAILED {failed_after:.1f}s after the 4th kill: {record.error}"
    )


def test_a_countdown_retry_held_by_a_live_worker_is_not_put_back(world: World) -> None:
    run_id = world.start("t_orphan_countdown")
    wait_until(lambda: (s := world.store.get_step(run_id, "0:orphan_flaky")) and s.status is StepStatus.QUEUED,
               timeout=60, what="the first attempt failed and its retry waiting")  # fmt: skip
    waiting = wait_until(lambda: world.unacked(), timeout=10, what="the retry held unacknowledged")
    began = time.monotonic()
    # Past the liveness window and several sweeps, the same delivery is still the one held.
    wait_until(lambda: time.monotonic() - began > LIVENESS + 3 * 2.0 or world.bodies(run_id) > 1, timeout=60,
               interval=0.5, what="the liveness window to pass")  # fmt: skip
    assert world.bodies(run_id) == 1, "the retry ran before its countdown"
    assert set(world.unacked()) == set(waiting), "the held countdown message was put back"
    record = world.wait_end(run_id, timeout=40)
    assert record.status is RunStatus.COMPLETE, record.error
    assert world.bodies(run_id) == 2
    assert "put back task" not in world.logs()
    held = time.monotonic() - began
    print(
        f"\ncountdown retry: held unacked {held:.1f}s by a live worker across the 15 s liveness window; "
        "not put back, ran once at its time"
    )


def test_a_worker_in_warm_shutdown_keeps_its_running_step(world: World) -> None:
    """SIGTERM (a deploy) lets the running step finish; its message must not be swept to another worker meanwhile."""
    run_id = world.start("t_orphan", sleep=LIVENESS + 9)
    wait_until(lambda: world.bodies(run_id) == 1, timeout=60, what="the step's body to start")
    pid = int(world.r.get(f"orphans:worker:{run_id}") or 0)
    [stopping] = [w for w in world.workers if w.proc is not None and w.proc.pid == pid]
    assert stopping.proc is not None
    os.kill(pid, signal.SIGTERM)  # the main process only: Celery's warm shutdown, as a platform sends it
    record = world.wait_end(run_id, timeout=LIVENESS + 40)
    assert record.status is RunStatus.COMPLETE, record.error
    assert world.bodies(run_id) == 1
    stopping.proc.wait(30)
    assert "put back task" not in world.logs(), "a message still running in a stopping worker was swept"
    stopping.start()  # the fixture stops both workers
    print(f"\nwarm shutdown: a {LIVENESS + 9:.0f}s step finished in the stopping worker; nothing put back")


def test_the_sweep_reaches_an_orphan_behind_more_held_deliveries_than_one_sweep_reads(redis_server: str) -> None:
    """A backlog of held deliveries older than an orphan must not hide it: the sweep's cursor moves past them."""
    from kombu import Connection

    from haulage.tasks.app import app
    from haulage.tasks.orphans import Cursor, sweep

    r = redis.Redis.from_url(redis_server)
    marks = RedisCoordination(r)
    prefix = f"cursor-{uuid.uuid4().hex[:8]}:"  # a broker namespace of its own: no session worker sweeps it
    name = next(n for n in app.tasks if not n.startswith("celery."))
    queue = "cursor-test"
    with Connection(redis_server, transport_options={"global_keyprefix": prefix}) as conn:
        channel = conn.default_channel
        old = time.time() - 3600
        held = [f"held-{i}" for i in range(7)]
        for i, tag in enumerate([*held, "orphan"]):
            message = {"headers": {"task": name, "id": f"id-{tag}"}, "properties": {"delivery_info": {}}, "body": ""}
            r.hset(prefix + channel.unacked_key, tag, json.dumps([message, "", queue]))
            r.zadd(prefix + channel.unacked_index_key, {tag: old + i})  # the orphan is the newest
        marks.hold_deliveries(held, 600)
        # Without a cursor, a sweep of 3 reads the same three held deliveries every time.
        assert all(sweep(app, channel, marks, liveness=15, limit=3) == [] for _ in range(4))
        cursor = Cursor()
        found = [sweep(app, channel, marks, liveness=15, cursor=cursor, limit=3) for _ in range(4)]
        assert ["id-orphan"] in found, found
        assert r.llen(prefix + queue) == 1 and r.zcard(prefix + channel.unacked_index_key) == 7
    for key in r.scan_iter(f"{prefix}*"):
        r.delete(key)
