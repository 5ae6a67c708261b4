"""Haulage against bare Celery: every workload, interleaved, one Redis, one worker, one table.

    .venv/bin/python -m bench [--repeat 3] [--only chain,fan-1k,...] [--bare-timeout 60]
                              [--skip-bare-10k] [--timeout 900]

Starts a redis-server (AOF, fsync every second) and one ``haulage worker``
(prefork, 2 processes unless said otherwise), then times each workload from
the call to the outcome being known to the caller: bare Celery waits with
``AsyncResult.get()``, Haulage with ``wf.start()`` then the default
``run.wait()``. Bare and Haulage alternate, so drift hits both alike.

Workloads (``--only`` picks some):
  chain       a 50-step chain of no-ops (bare ``celery.chain``)
  fan-1k      a fan-out of 1,000 no-ops and a reduce (bare ``chord``)
  fan-10k     the same with 10,000 (the bare chord took 376 s here: it is cut at
              ``--bare-timeout`` seconds and shown as "> N s"; ``--skip-bare-10k`` skips it)
  fan-100k    Haulage only, 100,000 items, RSS sampled through the run (flat memory)
  scale       2,000 no-ops as a bare group and as a Haulage fan-out, with 2, 4 and 8 worker processes

Prints: workload, bare, Haulage, ratio, items/s (Haulage), CPU milliseconds per item (worker tree,
Redis and this caller: robust to other load on the machine), peak RSS (worker tree; caller).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import RssSampler, Worker, cpu_seconds  # noqa: E402
from haulage.devtools.redis_server import free_port, start_redis  # noqa: E402

WORKLOADS = ("chain", "fan-1k", "fan-10k", "fan-100k", "scale")


class TimedOut(Exception):
    """Raised when a side did not finish within its budget; ``seconds`` is that budget."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"> {seconds:.0f} s")
        self.seconds = seconds


@dataclass
class Row:
    workload: str
    items: int
    bare: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    bare_cut: float | None = None  #: the bare side was cut at this many seconds
    ours_cut: float | None = None
    bare_rss: float = 0.0
    bare_cpu: list[float] = field(default_factory=list)  #: CPU seconds (worker, Redis, caller) per run
    ours_cpu: list[float] = field(default_factory=list)
    ours_rss: float = 0.0
    caller_rss: float = 0.0
    note: str = ""

    def cells(self) -> list[str]:
        def fmt(times: list[float], cut: float | None) -> str:
            if cut is not None:
                return f"> {cut:.0f} s"
            return f"{statistics.median(times):.3f} s" if times else "-"

        b, h = fmt(self.bare, self.bare_cut), fmt(self.ours, self.ours_cut)
        ratio = "-"
        if self.bare and self.ours and self.bare_cut is None and self.ours_cut is None:
            ratio = f"{statistics.median(self.ours) / statistics.median(self.bare):.2f}x"
        elif self.bare_cut is not None and self.ours and self.ours_cut is None:
            ratio = f"< {statistics.median(self.ours) / self.bare_cut:.2f}x"
        rate = f"{self.items / statistics.median(self.ours):,.0f}" if self.ours and self.ours_cut is None else "-"
        rss = f"bare {self.bare_rss:.0f} / ours {self.ours_rss:.0f} MB; caller {self.caller_rss:.0f} MB"

        def per_item(cpu: list[float]) -> str:
            return f"{1000 * statistics.median(cpu) / self.items:.2f}" if cpu else "-"

        cpu = f"{per_item(self.bare_cpu)} / {per_item(self.ours_cpu)}"
        return [self.workload, b, h, ratio, rate, cpu, rss + (f"; {self.note}" if self.note else "")]


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, redis_url: str, redis_pid: int) -> None:
        self.args = args
        self.redis = psutil.Process(redis_pid)
        self.last_cpu = 0.0
        self.tmp = tmp
        self.redis_url = redis_url
        self.worker = Worker(tmp, args.concurrency)

    # --- the two sides ---------------------------------------------------
    def bare_chain(self, n: int, timeout: float) -> None:
        from celery import chain

        from bench.flows import noop

        chain(*[noop.s(i) for i in range(n)]).apply_async(queue="short").get(timeout=timeout)

    def bare_chord(self, n: int, timeout: float) -> None:
        from celery import chord, group

        from bench.flows import count, noop

        result = chord(group(noop.s(i) for i in range(n)), count.s()).apply_async(queue="short")
        assert result.get(timeout=timeout) == n

    def bare_group(self, n: int, timeout: float) -> None:
        from celery import group

        from bench.flows import noop

        group(noop.s(i) for i in range(n)).apply_async(queue="short").get(timeout=timeout)

    def haulage(self, name: str, timeout: float, **params: int) -> None:
        from haulage.workflows import RunStatus, registry

        run = registry.get(name).start(**params)
        record = run.wait(timeout=timeout)  # the default wait, as a caller sees it
        assert record.status is RunStatus.COMPLETE, record.error

    # --- measuring -------------------------------------------------------
    def cpu(self) -> float:
        return sum(self.cpu_parts())

    def cpu_parts(self) -> tuple[float, float, float]:
        """CPU seconds so far of the worker tree, Redis, and this caller."""
        return cpu_seconds(self.worker.processes()), cpu_seconds([self.redis]), cpu_seconds([psutil.Process()])

    def measure(self, fn: Callable[[float], None], timeout: float) -> tuple[float | None, float, float]:
        """Seconds (None when cut at ``timeout``), peak worker RSS, peak caller RSS; CPU in ``self.last_cpu``."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        from haulage.errors import WaitTimeout

        cpu0, parts0 = self.cpu(), self.cpu_parts()
        with RssSampler(self.worker) as rss:
            start = time.perf_counter()
            try:
                fn(timeout)
                took: float | None = time.perf_counter() - start
            except (CeleryTimeout, WaitTimeout):
                took = None
        self.last_cpu = self.cpu() - cpu0
        if self.args.verbose:
            parts = [b - a for a, b in zip(parts0, self.cpu_parts(), strict=True)]
            print(f"     CPU s: worker {parts[0]:.2f}, redis {parts[1]:.2f}, caller {parts[2]:.2f}", flush=True)
        if took is None:
            self.reset()  # what was left queued must not run on into the next measurement
        return took, rss.peak_worker, rss.peak_caller

    def reset(self) -> None:
        """Kill the worker, empty Redis, start a fresh worker."""
        from haulage.redis_client import get_redis

        self.worker.kill()
        get_redis().flushall()
        self.worker = Worker(self.tmp, self.worker.concurrency)
        self.worker.start()

    def pair(self, row: Row, bare: Callable[[float], None] | None, ours: Callable[[float], None],
             *, repeat: int, bare_timeout: float, timeout: float) -> None:  # fmt: skip
        for _ in range(repeat):  # interleaved, so drift hits both sides alike
            if bare is not None and row.bare_cut is None and not self.args.no_bare:
                took, w, c = self.measure(bare, bare_timeout)
                row.bare_rss = max(row.bare_rss, w)
                if took is None:
                    row.bare_cut = bare_timeout
                else:
                    row.bare.append(took)
                    row.bare_cpu.append(self.last_cpu)
            if row.ours_cut is None:
                took, w, c = self.measure(ours, timeout)
                row.ours_rss, row.caller_rss = max(row.ours_rss, w), max(row.caller_rss, c)
                if took is None:
                    row.ours_cut = timeout
                else:
                    row.ours.append(took)
                    row.ours_cpu.append(self.last_cpu)
            print("  ", row.workload, [f"{t:.3f}" for t in row.bare], [f"{t:.3f}" for t in row.ours], flush=True)

    def run(self) -> list[Row]:
        from bench.flows import CHAIN_LENGTH

        a = self.args
        only = set(a.only.split(",")) if a.only else set(WORKLOADS)
        rows: list[Row] = []
        self.worker.start()
        try:
            # Warm both paths once (imports, connections, script loading).
            self.bare_chord(50, 60)
            self.haulage("bench_fan_out", 60, items=50)
            self.bare_chain(5, 60)
            self.haulage("bench_chain", 60, length=5)
            if "chain" in only:
                row = Row(f"{CHAIN_LENGTH}-step chain", CHAIN_LENGTH)
                self.pair(row, lambda t: self.bare_chain(CHAIN_LENGTH, t),
                          lambda t: self.haulage("bench_chain", t, length=CHAIN_LENGTH),
                          repeat=a.repeat, bare_timeout=a.timeout, timeout=a.timeout)  # fmt: skip
                rows.append(row)
            for name, n, reps in (("fan-1k", 1000, a.repeat), ("fan-10k", 10_000, 1)):
                if name not in only:
                    continue
                row = Row(f"fan-out {n:,} + reduce", n)
                bare = None if (n == 10_000 and a.skip_bare_10k) else (lambda t, n=n: self.bare_chord(n, t))
                if bare is None:
                    row.note = "bare skipped (--skip-bare-10k)"
                self.pair(row, bare, lambda t, n=n: self.haulage("bench_fan_out", t, items=n), repeat=reps,
                          bare_timeout=a.bare_timeout if n == 10_000 else a.timeout, timeout=a.timeout)  # fmt: skip
                rows.append(row)
            if "fan-100k" in only:
                rows.append(self.hundred_k())
            if "scale" in only:
                rows.extend(self.scale())
        finally:
            self.worker.stop()
        return rows

    def hundred_k(self) -> Row:
        n = 100_000
        row = Row(f"fan-out {n:,} (ours only)", n)
        with RssSampler(self.worker, interval=1.0) as rss:
            took, _, _ = self.measure(lambda t: self.haulage("bench_fan_out", t, items=n), self.args.timeout)
        if took is None:
            row.ours_cut = self.args.timeout
        else:
            row.ours.append(took)
            row.ours_cpu.append(self.last_cpu)
        early, end = rss.worker_drift()
        row.ours_rss, row.caller_rss = rss.peak_worker, rss.peak_caller
        row.note = f"worker RSS {early:.0f} MB at 20% -> {end:.0f} MB at end, {len(rss.samples)} samples"
        return row

    def scale(self) -> list[Row]:
        n = 2000
        rows = []
        for c in (2, 4, 8):
            self.worker.stop()
            self.worker = Worker(self.tmp, c)
            self.worker.start()
            self.bare_group(50, 60)
            self.haulage("bench_fan_out", 60, items=50)
            row = Row(f"{n:,} no-ops, {c} processes", n)
            self.pair(row, lambda t: self.bare_group(n, t), lambda t: self.haulage("bench_fan_out", t, items=n),
                      repeat=1, bare_timeout=self.args.timeout, timeout=self.args.timeout)  # fmt: skip
            rows.append(row)
        return rows


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\n{when}; {machine}; 1 worker x {args.concurrency} prefork processes; median of {args.repeat}\n")
    header = ["workload", "bare Celery", "Haulage", "ratio", "items/s", "CPU ms/item bare / ours", "peak RSS"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each small workload (median shown)")
    parser.add_argument("--only", help=f"comma-separated workloads among {', '.join(WORKLOADS)}")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes (scale uses 2, 4, 8)")
    parser.add_argument("--bare-timeout", type=float, default=60.0, help="seconds before the bare 10,000 chord is cut")
    parser.add_argument("--skip-bare-10k", action="store_true", help="do not run the bare 10,000 chord at all")
    parser.add_argument("--no-bare", action="store_true", help="Haulage's side only (profiling, quick checks)")
    parser.add_argument("--verbose", action="store_true", help="print each run's CPU by process")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any other run may take")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="haulage-bench-"))
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    os.environ["HAULAGE_REDIS_URL"] = redis_url
    os.environ["HAULAGE_MODULES"] = "bench.flows"
    redis_proc = start_redis(tmp / "redis", port, appendonly=True)
    try:
        from haulage.workflows import registry

        registry.load_modules()
        rows = Bench(args, tmp, redis_url, redis_proc.pid).run()
        print_table(rows, args)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
