"""Guarded effects under kills: a worker SIGKILLed right after ``ctx.once`` claimed, on each store.

One world per store: its own Redis, and workers on the default settings (no
test overrides of the liveness, visibility timeout or stale-after; the
session's overrides are dropped). Four runs of ``t_guard_kill`` hold inside
their guarded block at once; the test SIGKILLs the worker's whole process
group, starts a second worker and resumes the runs. The next attempt of each
step takes the lock over once the dead holder's liveness lapses
(HAULAGE_LOCK_LIVENESS, 15 s by default), finds the dead attempt's claim, and:

- ``on_unknown="redo"`` (default), killed before the effect: performs it (once in all);
- ``"redo"``, killed after the effect but before the guard was marked: performs it
  again, and the guard id lets the external system drop the repeat (2 calls, 1 id);
- ``"skip"``: does not perform it; the guard says "unknown";
- ``"fail"``: the step fails with EffectOutcomeUnknown, without a retry.

Each records a ``guard-unknown`` event naming the step in the run's history.
"""

from __future__ import annotations

import functools
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

from haulage.devtools.redis_server import free_port, start_redis
from haulage.progress.models import RunRecord, RunStatus, StepStatus
from haulage.progress.redis_store import RedisStore
from haulage.progress.store import Store
from tests.conftest import ROOT, wait_until
from tests.guard_flows import hold_key, tag

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

STEP = "0:guarded_effect"
#: (on_unknown, kill_at) of the four runs each world holds at the kill
CASES = [("redo", "before"), ("redo", "after"), ("skip", "before"), ("fail", "before")]


class GuardWorld:
    """Its own Redis and workers, started with the environment a user gets: only where things are is set."""

    def __init__(self, tmp: Path, store_env: dict[str, str]) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        base = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_")}
        self.env = {**base, "PYTHONPATH": str(ROOT), "HAULAGE_REDIS_URL": self.url,
                    "HAULAGE_MODULES": "tests.guard_flows", **store_env}  # fmt: skip
        self.redis_proc = start_redis(tmp / "redis", self.port, appendonly=True, log_file=tmp / "redis.log")
        self.r = redis.Redis.from_url(self.url)
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self, concurrency: int) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        log = self.tmp / f"worker{n}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "haulage.cli", "worker", "--queues", "short,long,dispatch,guards",
                 "--concurrency", str(concurrency), "--hostname", f"guards{n}-{uuid.uuid4().hex[:6]}@127.0.0.1",
                 "--loglevel", "INFO"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.workers.append(proc)
        wait_until(lambda: " ready." in log.read_text(errors="replace"), timeout=60, what=f"worker {n} ready")
        return proc

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "haulage.cli", *args], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self.redis_proc.terminate()
        self.redis_proc.wait(20)


@pytest.fixture
def redis_world(tmp_path: Path) -> Iterator[tuple[GuardWorld, Store]]:
    world = GuardWorld(tmp_path, {})
    yield world, RedisStore(world.r)
    world.close()


@pytest.fixture
def firestore_world(tmp_path: Path) -> Iterator[tuple[GuardWorld, Store]]:
    from tests.firestore_support import TEST_PROJECT, session_emulator

    host = session_emulator()
    collection = f"guards-{uuid.uuid4().hex[:8]}"
    world = GuardWorld(tmp_path, {"HAULAGE_STORE": "firestore", "FIRESTORE_EMULATOR_HOST": host,
                                  "HAULAGE_FIRESTORE_PROJECT": TEST_PROJECT,
                                  "HAULAGE_FIRESTORE_COLLECTION": collection})  # fmt: skip
    # Imported here: google-cloud-firestore is an optional extra.
    from haulage.progress.firestore import FirestoreStore

    store = FirestoreStore(project=TEST_PROJECT, collection=collection)
    yield world, store
    store.close()
    world.close()


def kill_inside_the_guard_then_recover(world: GuardWorld, store: Store) -> tuple[dict[tuple[str, str], str], float]:
    """Start the four runs, SIGKILL their worker while each holds its claim, recover; return run ids and seconds."""
    first = world.start_worker(concurrency=len(CASES))
    hold = uuid.uuid4().hex
    world.r.set(hold_key(hold), "1")  # up before the runs start: no first attempt passes its block
    runs: dict[tuple[str, str], str] = {}
    for on_unknown, kill_at in CASES:
        params = {"on_unknown": on_unknown, "kill_at": kill_at, "hold": hold}
        args = [a for k, v in params.items() for a in ("-p", f"{k}={v}")]  # strings go as they are
        runs[(on_unknown, kill_at)] = json.loads(world.cli("run", "t_guard_kill", "--json", *args))["run_id"]
    wait_until(lambda: all(world.r.llen(f"{tag(r)}:claims") == 1 for r in runs.values()), timeout=60,
               what="every run's first attempt inside its guarded block")  # fmt: skip
    os.killpg(first.pid, signal.SIGKILL)  # main process and pool children: a lost machine
    first.wait(10)
    killed = time.monotonic()
    world.r.delete(hold_key(hold))
    world.start_worker(concurrency=2)
    # The killed worker's messages are not coming back before the visibility timeout:
    # resume the runs (re-applying their plans), as the reaper would.
    for run_id in runs.values():
        world.cli("resume", run_id)

    def ended() -> bool:
        return all((rec := store.get_run(r)) is not None and rec.terminal for r in runs.values())

    wait_until(ended, timeout=150, interval=0.3, what="every run to end after the kill")
    return runs, time.monotonic() - killed


def unknown_events(record: RunRecord) -> list[str]:
    return [e.message for e in record.history if e.kind == "guard-unknown" and e.step == STEP]


def with_unknown_event(store: Store, run_id: str) -> RunRecord | None:
    record = store.get_run(run_id)
    return record if record is not None and unknown_events(record) else None


def check_outcomes(world: GuardWorld, store: Store, runs: dict[tuple[str, str], str]) -> dict[str, Any]:
    """Assert what each run shows; return the figures per case."""
    figures: dict[str, Any] = {}
    for (on_unknown, kill_at), run_id in runs.items():
        # The event may still sit in the writing worker's coalescing buffer (Firestore) for a second.
        record = wait_until(functools.partial(with_unknown_event, store, run_id), timeout=15,
                            what=f"the guard-unknown event of run {run_id}")  # fmt: skip
        calls = int(world.r.get(f"{tag(run_id)}:calls") or 0)
        ids = world.r.scard(f"{tag(run_id)}:ids")
        claims = [int(a) for a in world.r.lrange(f"{tag(run_id)}:claims", 0, -1)]
        step = store.get_step(run_id, STEP)
        guards = store.get_guards(run_id)
        events = unknown_events(record)
        assert len(events) == 1 and f"on_unknown='{on_unknown}'" in events[0], record.history
        case = f"{on_unknown}/{kill_at}"
        figures[case] = {"calls": calls, "ids": ids, "claims": claims, "status": record.status.value}
        if on_unknown == "redo":
            assert record.status is RunStatus.COMPLETE, record.error
            value = store.get_checkpoints(run_id, [STEP])[STEP].value
            assert value["performed"] is True
            assert len(claims) == 2  # the killed attempt, and the one that redid it
            assert guards == {f"{STEP}:effect": "done"}
            # Killed before the effect: performed once in all. Killed after it: performed
            # twice, and a system deduplicating on guard_id keeps one.
            assert (calls, ids) == ((1, 1) if kill_at == "before" else (2, 1))
        elif on_unknown == "skip":
            assert record.status is RunStatus.COMPLETE, record.error
            assert store.get_checkpoints(run_id, [STEP])[STEP].value["performed"] is False
            assert (calls, claims) == (0, [1])  # lost, as asked, and said so
            assert guards == {f"{STEP}:effect": "unknown"}
        else:
            assert record.status is RunStatus.FAILED
            assert step is not None and step.status is StepStatus.FAILED
            assert step.error_type == "EffectOutcomeUnknown", step
            assert "on_unknown='fail'" in (step.error or "") and "EffectOutcomeUnknown" in (record.error or "")
            assert (calls, claims) == (0, [1])
            assert guards == {f"{STEP}:effect": "unknown"}
            assert not [e for e in record.history if e.kind == "retry" and "EffectOutcomeUnknown" in e.message]
    return figures


def test_guarded_effects_under_a_kill_on_the_redis_store(redis_world: tuple[GuardWorld, Store]) -> None:
    world, store = redis_world
    runs, seconds = kill_inside_the_guard_then_recover(world, store)
    figures = check_outcomes(world, store, runs)
    print(f"\nguards/redis: 1 SIGKILL inside {len(runs)} guarded blocks; {figures}; lost effects=0 "
          f"(redo), seconds from kill to end={seconds:.1f}")  # fmt: skip


def test_guarded_effects_under_a_kill_on_the_firestore_store(firestore_world: tuple[GuardWorld, Store]) -> None:
    world, store = firestore_world
    runs, seconds = kill_inside_the_guard_then_recover(world, store)
    figures = check_outcomes(world, store, runs)
    print(f"\nguards/firestore: 1 SIGKILL inside {len(runs)} guarded blocks; {figures}; lost effects=0 "
          f"(redo), seconds from kill to end={seconds:.1f}")  # fmt: skip
