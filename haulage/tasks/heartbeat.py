"""Heartbeats of running steps: keep their locks' liveness keys and their runs' heartbeats fresh.

One daemon thread per worker process beats for every step running in it (a
thread per step would cost more than a short step itself), with no user code
involved. If the process dies, the beats stop: the lock can be taken over and
the run looks stale to the reaper.
"""

from __future__ import annotations

import logging
import os
import threading

from haulage.progress.models import RunUpdate, now
from haulage.progress.store import Store
from haulage.settings import get_settings
from haulage.tasks.lock import StepLock

log = logging.getLogger("haulage.heartbeat")


def intervals() -> tuple[float, int]:
    """Seconds between beats (a third of the lock liveness), and beats between run-heartbeat writes.

    The run's heartbeat is written at least three times per HAULAGE_STALE_AFTER,
    and at most every 20 s, so the reaper never mistakes a long step for a dead one.
    """
    s = get_settings()
    beat = s.lock_liveness / 3
    run_every = max(1, int(min(20.0, s.stale_after / 3) // beat))
    return beat, run_every


class _Beater:
    def __init__(self) -> None:
        self.active: dict[str, tuple[StepLock, Store, str]] = {}
        self.mutex = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = 0

    def add(self, lock: StepLock, store: Store, run_id: str) -> None:
        with self.mutex:
            self.active[lock.token] = (lock, store, run_id)
            # Started lazily, and again in a forked child (threads do not survive fork).
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._run, name="haulage-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, lock: StepLock) -> None:
        with self.mutex:
            self.active.pop(lock.token, None)

    def _run(self) -> None:
        beats = 0
        stop = threading.Event()
        interval, run_every = intervals()
        while not stop.wait(interval):
            beats += 1
            with self.mutex:
                entries = list(self.active.values())
            runs: dict[str, Store] = {}
            for lock, store, run_id in entries:
                try:
                    lock.keep_alive()
                except Exception as exc:  # a missed beat must not kill the step; the next may succeed
                    log.warning("heartbeat of %s failed: %s", lock.key, exc)
                runs[run_id] = store
            if beats % run_every:
                continue
            for run_id, store in runs.items():
                try:
                    store.update_run(run_id, RunUpdate(set={"heartbeat": now()}))
                except Exception as exc:
                    log.warning("run heartbeat of %s failed: %s", run_id, exc)


_beater = _Beater()


class Heartbeat:
    """``with Heartbeat(lock, store, run_id):`` beats while the block runs."""

    def __init__(self, lock: StepLock, store: Store, run_id: str) -> None:
        self.lock, self.store, self.run_id = lock, store, run_id

    def __enter__(self) -> Heartbeat:
        _beater.add(self.lock, self.store, self.run_id)
        return self

    def __exit__(self, *exc: object) -> None:
        _beater.remove(self.lock)
