"""What every benchmark stands on: one Redis, one worker it can restart, and an RSS sampler.

The worker is a real ``haulage worker`` subprocess (prefork); the bare Celery
tasks and the Haulage steps run in the same worker, on the same Redis, so the
two sides differ only in what Haulage adds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOSTNAME = "bench@127.0.0.1"


class Worker:
    """One ``haulage worker`` with ``concurrency`` prefork processes, restartable between workloads."""

    def __init__(self, tmp: Path, concurrency: int) -> None:
        self.tmp = tmp
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def start(self) -> None:
        from haulage.tasks.app import app

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(self.tmp / f"worker-c{self.concurrency}.log", "ab")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "haulage.cli", "worker", "--queues", "short",
             "--concurrency", str(self.concurrency), "--hostname", HOSTNAME, "--loglevel", "WARNING"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[HOSTNAME], timeout=0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the benchmark worker did not start; see {self.log.name}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        if self.log:
            self.log.close()

    def kill(self) -> None:
        """Stop at once (after a timed-out workload whose tasks must not run on into the next one)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None
        if self.log:
            self.log.close()

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU the processes have used: what a workload cost, whatever else shares the machine."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


class RssSampler:
    """Samples the worker's total RSS (main process and its pool) and this caller's, every ``interval`` s."""

    def __init__(self, worker: Worker, interval: float = 0.25) -> None:
        self.worker = worker
        self.interval = interval
        self.me = psutil.Process()
        self.samples: list[tuple[float, float, float]] = []  #: (seconds since start, worker MB, caller MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.samples.append((time.monotonic() - self.t0, rss_mb(self.worker.processes()), rss_mb([self.me])))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak_worker(self) -> float:
        return max((s[1] for s in self.samples), default=0.0)

    @property
    def peak_caller(self) -> float:
        return max((s[2] for s in self.samples), default=0.0)

    def worker_drift(self) -> tuple[float, float]:
        """Worker RSS (MB) at 20% and at the end of the run: flat memory keeps these close."""
        if not self.samples:
            return 0.0, 0.0
        early = self.samples[len(self.samples) // 5][1]
        return early, self.samples[-1][1]
