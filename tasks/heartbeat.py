"""A running step's heartbeat: keeps its lock's liveness key and its run's heartbeat fresh.

One daemon thread per running step, with no user code involved. If the
process dies, the beats stop: the lock can be taken over and the run looks
stale to the reaper.
"""

from __future__ import annotations

import logging
import threading

from progress.models import RunUpdate, now
from progress.store import Store
from tasks.lock import LIVENESS_MS, StepLock

log = logging.getLogger("haulage.heartbeat")

#: seconds between beats; well inside the liveness window
INTERVAL = LIVENESS_MS / 1000 / 3
#: beats between writes of the run document's heartbeat field
RUN_EVERY = 4


class Heartbeat:
    def __init__(self, lock: StepLock, store: Store, run_id: str) -> None:
        self.lock = lock
        self.store = store
        self.run_id = run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{lock.key}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _beat(self) -> None:
        beats = 0
        while not self._stop.wait(INTERVAL):
            beats += 1
            try:
                self.lock.keep_alive()
                if beats % RUN_EVERY == 0:
                    self.store.update_run(self.run_id, RunUpdate(set={"heartbeat": now()}))
            except Exception as exc:  # a missed beat must not kill the step; the next may succeed
                log.warning("heartbeat of %s failed: %s", self.lock.key, exc)
