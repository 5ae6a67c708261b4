"""Sentinel failover: Haulage's Redis fails over in the middle of a fan-out run, on the default settings.

The world: a Sentinel group (master, replica, three sentinels: haulage.devtools.sentinel),
two prefork workers started with only HAULAGE_REDIS_URL (the group's ``sentinel://`` URL)
and HAULAGE_MODULES set, and a plain redis-server standing for the external system the
guarded effects call. A run of ``t_failover`` (a fan-out whose items do CPU work and one
``ctx.once`` effect) is started with the CLI; once a third of its items are done the
master goes away, and the test waits for the run to end by itself: no resume, no restart.

- ``SENTINEL FAILOVER``: the replica is promoted while the master still runs (a planned
  switch, Memorystore's maintenance);
- SIGKILL of the master: the sentinels see it down after the group's ``down-after``
  (2 s here) and promote the replica; writes the master acknowledged but had not yet
  sent to the replica are lost (Redis replicates asynchronously).

Each asserts every item ok exactly once, every guarded effect performed exactly once, the
run COMPLETE within 30 s of the fault (tests/chaos/report.py's targets), and adds its row
to the chaos suite's results table.
"""

from __future__ import annotations

import json
import os
import re
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
from haulage.devtools.sentinel import SentinelGroup
from haulage.progress.models import RunRecord, RunStatus
from haulage.progress.redis_store import RedisStore
from haulage.redis_client import connect
from tests.chaos import report
from tests.chaos.failover_flows import tag
from tests.conftest import ROOT, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


class FailoverWorld:
    """A Sentinel group, an effects Redis and two workers on the default settings."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.group = SentinelGroup(tmp / "sentinel")
        self.group.start()
        self.effects_port = free_port()
        self.effects_proc = start_redis(tmp / "effects", self.effects_port, appendonly=False,
                                        log_file=tmp / "effects.log")  # fmt: skip
        self.effects = redis.Redis(host="127.0.0.1", port=self.effects_port)
        base = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_")}
        self.env = {**base, "PYTHONPATH": str(ROOT), "HAULAGE_REDIS_URL": self.group.url,
                    "HAULAGE_MODULES": "tests.chaos.failover_flows",
                    "FAILOVER_EFFECTS_URL": f"redis://127.0.0.1:{self.effects_port}/0"}  # fmt: skip
        self.client = connect(self.group.url, socket_timeout=5, socket_connect_timeout=2)
        self.store = RedisStore(self.client)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start_worker(self, concurrency: int = 2) -> None:
        n = len(self.workers)
        log = self.tmp / f"worker{n}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "haulage.cli", "worker", "--concurrency", str(concurrency),
                 "--hostname", f"failover{n}-{uuid.uuid4().hex[:6]}@127.0.0.1", "--loglevel", "INFO"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.workers.append(proc)
        self.logs.append(log)
        wait_until(lambda: " ready." in log.read_text(errors="replace"), timeout=60, what=f"worker {n} ready")

    def start(self, workflow: str, **params: Any) -> str:
        args = [a for k, v in params.items() for a in ("-p", f"{k}={json.dumps(v)}")]
        out = subprocess.run([sys.executable, "-m", "haulage.cli", "run", workflow, "--json", *args], cwd=ROOT,
                             env=self.env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return str(json.loads(out.stdout)["run_id"])

    def record(self, run_id: str) -> RunRecord | None:
        try:
            return self.store.get_run(run_id)
        except redis.RedisError:  # in the middle of the failover: look again
            return None

    def done(self, run_id: str) -> int:
        record = self.record(run_id)
        return record.steps.done if record else 0

    def counts(self, run_id: str, kind: str) -> dict[str, int]:
        """Per step key, counted in the effects Redis: ``calls`` (effects performed) or ``bodies`` (starts)."""
        prefix = f"{tag(run_id)}:{kind}:"
        return {k.decode()[len(prefix) :]: int(self.effects.get(k) or 0) for k in self.effects.scan_iter(prefix + "*")}

    def log_lines(self, pattern: str) -> list[str]:
        found = []
        for log in self.logs:
            found += [line for line in log.read_text(errors="replace").splitlines() if re.search(pattern, line)]
        return found

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.client.close()
        self.effects_proc.terminate()
        self.effects_proc.wait(10)
        self.group.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[FailoverWorld]:
    w = FailoverWorld(tmp_path)
    try:
        w.start_worker()
        w.start_worker()
        yield w
    finally:
        w.close()


def run_through(world: FailoverWorld, fault: str, n: int = 60) -> report.Row:
    """Start the run, take the master away a third of the way through, wait for the end; record the row."""
    run_id = world.start("t_failover", n=n, work=0.15)
    wait_until(lambda: world.done(run_id) >= n // 3, timeout=60, interval=0.05, what="a third of the items done")
    began = time.monotonic()
    if fault == "failover":
        old, new = world.group.failover()
    else:
        old = world.group.kill_master()
        new = world.group.wait_new_master(old)
        # Its supervisor starts the lost node again (from its append-only file); the sentinels make it
        # the new master's replica, and with min-replicas-to-write the new master takes writes again.
        world.group.restart_node(old)
    switched = time.monotonic() - began
    try:
        record = wait_until(lambda: (r := world.record(run_id)) and r.terminal and r, timeout=60, interval=0.1,
                            what="the run to end after the failover")  # fmt: skip
    except AssertionError:
        steps = world.store.list_steps(run_id)
        stuck = [(s.key, s.status.value, s.attempt) for s in steps if s.status.value != "COMPLETE"]
        raise AssertionError(f"run {run_id} did not end: {world.record(run_id)}; steps not complete: {stuck}") from None
    seconds = time.monotonic() - began
    assert new != old
    assert record.status is RunStatus.COMPLETE, record.error
    final = world.store.get_checkpoints(run_id, ["end"])["end"].value
    assert final == {"count": n, "sum": sum(range(n)), "failed": 0}
    calls, bodies = world.counts(run_id, "calls"), world.counts(run_id, "bodies")
    assert world.effects.scard(f"{tag(run_id)}:ids") == len(calls)  # one guard id per item that performed it
    retries = sum(1 for e in record.history if e.kind == "retry")
    put_back = len(world.log_lines(r"put back task"))
    noisy = world.log_lines(r" ERROR | CRITICAL |Connection to broker lost")
    print(f"\nworker log lines at ERROR, CRITICAL or broker loss: {len(noisy)}", *noisy[:8], sep="\n  ")
    row = report.Row(
        f"Sentinel failover ({'SENTINEL FAILOVER' if fault == 'failover' else 'master SIGKILLed'})",
        store="redis",
        items=n,
        kills=1 if fault == "kill" else 0,
        lost_items=n - int(final["count"]),
        duplicated_effects=sum(v - 1 for v in calls.values() if v > 1),
        lost_effects=n - len(calls),
        recoveries=record.recoveries + put_back,
        seconds_after_last_fault=seconds,
        notes=f"1 fault; new master named after {switched:.1f} s; step retries {retries}, "
        f"item bodies run twice {sum(1 for v in bodies.values() if v > 1)}",
    )
    report.record(row)  # asserts 0 lost, 0 duplicated, 0 lost effects, done within 30 s of the fault
    return row


def test_sentinel_failover_mid_fan_out(world: FailoverWorld) -> None:
    run_through(world, "failover")


def test_master_sigkilled_mid_fan_out(world: FailoverWorld) -> None:
    run_through(world, "kill")
