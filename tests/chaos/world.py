"""A stack of its own on the settings a user gets, for the chaos scenarios (tests/chaos/test_scenarios.py).

Its own redis-server (append-only file, as ``haulage dev`` runs it), prefork
workers and, when asked, beat and the HTTP service, each a ``haulage``
subprocess started in its own process group with every ``HAULAGE_*`` variable
of the test session removed: only where things are (Redis, the modules, the
store) is set, so visibility timeout, lock liveness, stale-after, crash budget
and retries are the defaults. What the scenarios count lives in the session's
own Redis (``CHAOS_SIDE_URL``), which no scenario kills.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from haulage.devtools.redis_server import free_port, start_redis
from haulage.progress.models import RunRecord, StepStatus
from haulage.progress.redis_store import RedisStore
from haulage.progress.store import Store
from tests.chaos.report import Row
from tests.chaos.scenario_flows import ns
from tests.conftest import ROOT, wait_until

MODULES = "tests.chaos.scenario_flows"
QUEUES = "short,long,dispatch,chaos"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def user_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any HAULAGE_* variable, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_")}
    return {**base, "PYTHONPATH": str(ROOT), **extra}


class Proc:
    """One ``haulage`` subprocess (worker, beat, api) in its own process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.args, self.log, self.env = args, log, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.starts = 0

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "haulage.cli", *self.args], cwd=ROOT, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.started_at = time.monotonic()
        self.starts += 1
        return self

    def ready(self) -> bool:
        """A worker's latest start said it is ready (its log keeps every start's lines)."""
        return self.log.exists() and self.log.read_text(errors="replace").count(" ready.") >= self.starts

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def kill(self) -> None:
        """SIGKILL the whole process group: main process and pool, a lost machine."""
        os.killpg(self.pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self) -> None:
        if not self.alive():
            return
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)  # type: ignore[union-attr]


class World:
    """Redis, workers (and optionally beat or the API) on default settings, and the figures of its runs."""

    def __init__(self, tmp: Path, side_url: str, store_env: dict[str, str] | None = None,
                 store: Store | None = None, modules: str = MODULES) -> None:  # fmt: skip
        self.tmp = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.env = user_env(HAULAGE_REDIS_URL=self.url, HAULAGE_MODULES=modules, CHAOS_SIDE_URL=side_url,
                            **(store_env or {}))  # fmt: skip
        self.redis_proc = start_redis(tmp / "redis", self.port, appendonly=True, log_file=tmp / "redis.log")
        self.r = redis.Redis.from_url(self.url)
        self.side = redis.Redis.from_url(side_url)
        self.store: Store = store or RedisStore(self.r)
        self.procs: list[Proc] = []
        self.workers: list[Proc] = []
        self.crashes: list[str] = []  #: processes that died by themselves and were started again (a supervisor's job)

    # --- processes ------------------------------------------------------
    def spawn(self, args: list[str], name: str) -> Proc:
        proc = Proc(args, self.tmp / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc.start()

    def add_worker(self, concurrency: int = 2, queues: str = QUEUES, wait: bool = True) -> Proc:
        n = len(self.workers)
        w = self.spawn(["worker", "--queues", queues, "--concurrency", str(concurrency), "--hostname",
                        f"chaos{n}-{uuid.uuid4().hex[:6]}@127.0.0.1", "--loglevel", "INFO"], f"worker{n}")  # fmt: skip
        self.workers.append(w)
        if wait:
            self.wait_ready(w)
        return w

    def wait_ready(self, w: Proc, timeout: float = 60) -> None:
        wait_until(w.ready, timeout=timeout, interval=0.1, what=f"worker {w.log.name} ready")

    def restart(self, w: Proc) -> Proc:
        """Start a killed process again, under a fresh name for a worker (a new machine)."""
        if w in self.workers:
            hostname = w.args.index("--hostname") + 1
            w.args[hostname] = f"chaos-{uuid.uuid4().hex[:8]}@127.0.0.1"
        return w.start()

    def cli(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run([sys.executable, "-m", "haulage.cli", *args], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start_run(self, workflow: str, **params: Any) -> str:
        args = ["run", workflow, "--json"] + [a for k, v in params.items() for a in ("-p", f"{k}={json.dumps(v)}")]
        return str(json.loads(self.cli(*args))["run_id"])

    def kill_redis(self) -> None:
        """SIGKILL redis-server (no chance to write anything more) and start it again from its append-only file."""
        os.killpg(self.redis_proc.pid, signal.SIGKILL)
        self.redis_proc.wait(10)
        self.redis_proc = start_redis(self.tmp / "redis", self.port, appendonly=True, log_file=self.tmp / "redis.log")

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.redis_proc.terminate()
        self.redis_proc.wait(20)

    # --- what happened ----------------------------------------------------
    def get_run(self, run_id: str) -> RunRecord | None:
        try:
            return self.store.get_run(run_id)
        except Exception:  # the store away (Redis restarting): not yet
            return None

    def supervise(self) -> None:
        """Start again a worker that exited by itself, as ``haulage dev``'s supervisor, Cloud Run or systemd would."""
        for w in self.workers:
            if not w.alive():
                self.crashes.append(f"{w.log.name} exited {w.proc.returncode if w.proc else '?'}")
                self.restart(w)

    def done(self, run_id: str) -> int:
        """Steps done so far (0 while the store is away), restarting workers that exited meanwhile."""
        self.supervise()
        record = self.get_run(run_id)
        return record.steps.done if record is not None else 0

    def wait_end(self, run_id: str, timeout: float) -> RunRecord:
        def ended() -> RunRecord | None:
            self.supervise()
            record = self.get_run(run_id)
            return record if record is not None and record.terminal else None

        record: RunRecord = wait_until(ended, timeout=timeout, interval=0.2, what=f"run {run_id} to end")
        return record

    def running(self, run_id: str) -> dict[int, str]:
        """Pool process id -> the step key whose body it runs now."""
        found: dict[bytes, bytes] = self.side.hgetall(f"{ns(run_id)}:running")  # type: ignore[assignment]
        return {int(k): v.decode() for k, v in found.items()}

    def logs(self) -> str:
        return "".join(p.log.read_text(errors="replace") for p in self.procs if p.log.exists())

    def recoveries(self, run_ids: list[str]) -> int:
        """Deliveries put back by the orphan sweep, plus dead lock holders taken over, plus reaper resumes."""
        from haulage import keys

        put_back = self.logs().count("put back task")
        takeovers = 0
        for run_id in run_ids:
            takeovers += sum(int(v) for v in self.r.hvals(keys.crashes(run_id)))
        resumed = sum((r.recoveries if (r := self.get_run(i)) else 0) for i in run_ids)
        return put_back + takeovers + resumed

    def figures(self, run_id: str, n: int) -> dict[str, int]:
        """Lost items, duplicated, lost and redone effects of one ``chaos_fan_out`` run of ``n`` items."""
        record = self.get_run(run_id)
        assert record is not None
        final = self.store.get_checkpoints(run_id, ["1:chaos_sum"]).get("1:chaos_sum")
        value = final.value if final is not None else {"count": 0, "sum": 0, "failed": n}
        assert value["count"] + value["failed"] == n, value
        if value["failed"] == 0:
            assert value["sum"] == sum(range(n)), value  # each item's own value, once
        marked = {_text(m) for m in self.side.smembers(f"{ns(run_id)}:marked")}
        performances = {_text(k): [_text(a) for a in self.side.lrange(k, 0, -1)]
                        for k in self.side.scan_iter(f"{ns(run_id)}:fx:*")}  # fmt: skip
        duplicated = unknown = 0
        for attempts in performances.values():
            for i in range(1, len(attempts)):
                if any(a in marked for a in attempts[:i]):
                    duplicated += 1  # an earlier performance was recorded done: the guard should have held
                else:
                    unknown += 1  # every earlier claimant died inside the block: redo, as on_unknown="redo" says
        completed = record.steps.done if record else 0
        stuck = [s.key for s in self.store.list_steps(run_id) if s.status in (StepStatus.RUNNING, StepStatus.QUEUED)]
        assert not stuck, stuck
        return {
            "lost_items": n - value["count"],
            "duplicated_effects": duplicated,
            "lost_effects": max(0, n - value["failed"] - len(performances)),
            "unknown_redos": unknown,
            "completed_steps": completed,
        }

    def row(self, scenario: str, store: str, run_ids: list[str], n: int, kills: int, last_fault: float,
            ended: float, notes: str = "") -> Row:  # fmt: skip
        totals: dict[str, int] = {"lost_items": 0, "duplicated_effects": 0, "lost_effects": 0, "unknown_redos": 0}
        for run_id in run_ids:
            for k, v in self.figures(run_id, n).items():
                if k in totals:
                    totals[k] += v
        # A resume by hand (run.resume(), `haulage resume`) says "resumed on request"; Haulage's own say why.
        resumes = sum(1 for i in run_ids if (r := self.get_run(i)) for e in r.history
                      if e.kind == "resumed" and e.message == "resumed on request")  # fmt: skip
        if self.crashes:
            notes = "; ".join(filter(None, [notes, f"{len(self.crashes)} worker exit(s) restarted by the supervisor"]))
        return Row(scenario, store, items=n * len(run_ids), kills=kills, recoveries=self.recoveries(run_ids),
                   seconds_after_last_fault=round(ended - last_fault, 1), manual_resumes=resumes, notes=notes,
                   lost_items=totals["lost_items"], duplicated_effects=totals["duplicated_effects"],
                   lost_effects=totals["lost_effects"], unknown_redos=totals["unknown_redos"])  # fmt: skip
