"""The paced writer: sends each run's coalesced buffer to its document, at most once per interval.

A background thread writes each run's buffer no more than once per
``interval`` seconds. The pace is kept across processes too: a paced write
reads the document's ``update_time`` and writes with it as a precondition no
sooner than one interval after it, so all workers together stay near one
coalesced write per interval. Unpaced writes (a status change, ``flush()``,
``close()``) go at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from haulage.errors import StoreConflict
from haulage.progress.firestore.buffer import Incompatible, Pending, append
from haulage.progress.models import RunUpdate, now
from haulage.settings import get_settings

log = logging.getLogger("haulage.progress.firestore")

#: attempts of a conditional write (transition, guard release) before giving up
MAX_ATTEMPTS = 25
#: seconds an idle per-run buffer is kept before it is forgotten
IDLE_SECONDS = 60.0
#: a precondition on update_time did not hold
CONFLICTS = (gexc.FailedPrecondition, gexc.Aborted)
# Fields every write reads (and then writes under a precondition on the document's update time):
# the status (transitions, the barrier for stale sets, and the end after which nothing but `settled`
# is written), the lists it appends to or rewrites, the percent it derives, and money it sums exactly.
READ_FOR_WRITE = ["status", "status_at", "history", "stages", "percent", "failures", "cost", "settled"]
#: counters written at once, not buffered: finishing and recovery read them, and a process killed
#: with a buffer loses it (a fan-out's total, once per fan-out; measured lost as "total 1 of 81")
WRITTEN_AT_ONCE = frozenset({"steps.total"})


@dataclass
class RunState:
    """This process's bookkeeping for one run document."""

    io: threading.Lock = field(default_factory=threading.Lock)  #: held across a read-and-write of the document
    queue: list[Pending] = field(default_factory=list)  #: buffered changes, one write per segment (usually one)
    due: float = 0.0  #: monotonic time before which no coalesced write is sent
    failures: int = 0
    used: float = field(default_factory=time.monotonic)


class PacedWriter:
    """One process's buffers of run documents in ``collection``, and the thread that writes them.

    ``writes`` and ``conflicts`` are the store's counters (passed in, so they
    outlive a writer rebuilt after a fork); both are guarded by ``lock``.
    """

    def __init__(
        self,
        *,
        interval: float,
        db: Callable[[], firestore.Client],
        collection: str,
        writes: Counter[str],
        conflicts: Counter[str],
        closed: bool = False,
    ) -> None:
        self.interval = interval  #: seconds
        self.closed = closed  #: once True, every change is written at once
        self.writes = writes
        self.conflicts = conflicts
        self.lock = threading.Lock()
        self._db = db
        self._collection = collection
        self._wake = threading.Condition(self.lock)
        self._runs: dict[str, RunState] = {}
        self._thread: threading.Thread | None = None

    @property
    def _limit(self) -> int:
        return get_settings().history_limit

    def _run_ref(self, run_id: str) -> Any:
        return self._db().collection(self._collection).document(run_id)

    # --- bookkeeping ----------------------------------------------------------------------------
    def state(self, run_id: str) -> RunState:
        with self.lock:
            st = self._runs.get(run_id)
            if st is None:
                st = self._runs[run_id] = RunState()
            st.used = time.monotonic()
            return st

    def existing(self, run_id: str) -> RunState | None:
        with self.lock:
            return self._runs.get(run_id)

    def queue_of(self, st: RunState | None) -> list[Pending]:
        """A copy of what is buffered for a run (empty for None)."""
        with self.lock:
            return list(st.queue) if st is not None else []

    def count(self, run_id: str, *, applied: bool = True) -> None:
        with self.lock:
            (self.writes if applied else self.conflicts)[run_id] += 1

    def buffered(self, run_id: str) -> bool:
        with self.lock:
            st = self._runs.get(run_id)
            return bool(st is not None and st.queue)

    @contextlib.contextmanager
    def deleting(self, run_id: str) -> Iterator[None]:
        """Hold the run's document for a delete: its buffer is dropped first, its bookkeeping forgotten after."""
        st = self.state(run_id)
        with st.io:
            with self.lock:
                # The buffer describes a document that is going away: drop it rather
                # than write it first (and it cannot land after: update() needs the document).
                st.queue.clear()
            yield
            self.count(run_id)
        with self.lock:
            self._runs.pop(run_id, None)

    # --- buffering ------------------------------------------------------------------------------
    def buffer(self, run_id: str, update: RunUpdate) -> None:
        """Merge ``update`` into the run's buffer; a status change, a WRITTEN_AT_ONCE counter (or anything
        after close) is written now."""
        st = self.state(run_id)
        with self.lock:
            fresh = not st.queue
            append(st.queue, update, now())
            if fresh:
                st.due = max(st.due, time.monotonic())
                self._wake.notify()
        if "status" in update.set or self.closed or not WRITTEN_AT_ONCE.isdisjoint(update.incr):
            self.flush_run(run_id, paced=False)  # never left waiting: a status, such a counter, anything after close()
        else:
            self._ensure_thread()

    def restore(self, st: RunState, taken: Pending | None) -> None:
        """Put a segment whose write failed back in front of what was buffered since."""
        if not taken:
            return
        with self.lock:
            if st.queue:
                try:
                    joined = taken.copy()
                    joined.then(st.queue[0])
                    st.queue[0] = joined
                    return
                except Incompatible:
                    pass
            st.queue.insert(0, taken)

    # --- writing --------------------------------------------------------------------------------
    def flush(self, run_id: str | None = None) -> None:
        """Write what is buffered now (for one run, or every run), without waiting for the interval."""
        with self.lock:
            ids = [run_id] if run_id is not None else [r for r, st in self._runs.items() if st.queue]
        for rid in ids:
            self.flush_run(rid, paced=False)

    def close(self) -> None:
        """Write what is buffered and stop the background thread; later changes are written at once."""
        # Set under the lock the flusher waits with, so it cannot check the flag, miss this wake-up and sleep on.
        with self.lock:
            self.closed = True
            self._wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)
        self.flush()
        with self.lock:
            left = [r for r, st in self._runs.items() if st.queue]
        if left:
            log.warning("closed with changes to %d run(s) still unwritten (Firestore unreachable?): %s",
                        len(left), ", ".join(left[:10]))  # fmt: skip

    def flush_run(self, run_id: str, *, paced: bool) -> None:
        """Write the run's buffer: one paced segment, or (not paced) all of it now."""
        with self.lock:
            st = self._runs.get(run_id)
        if st is None:
            return
        with st.io:
            if paced:
                self.write_segment(run_id, st, paced=True)
                return
            for _ in range(MAX_ATTEMPTS):
                if not st.queue or not self.write_segment(run_id, st, paced=False):
                    return

    def write_segment(self, run_id: str, st: RunState, *, paced: bool) -> bool:
        """Write the first buffered segment (the caller holds ``st.io``); False if it should not be retried now.

        A paced write goes no sooner than one interval after the document's last
        write by any process (its update_time, then a precondition on it), so all
        workers together keep to about one coalesced write per interval.
        """
        ref = self._run_ref(run_id)
        with self.lock:
            peek = st.queue[0] if st.queue else None
        if not peek:
            with self.lock:
                if st.queue and not st.queue[0]:
                    st.queue.pop(0)
            return bool(st.queue)
        try:
            snap = ref.get(field_paths=READ_FOR_WRITE)
            if not snap.exists:
                self._drop(run_id, st)
                return False
            wait = snap.update_time.timestamp() + self.interval - time.time()
            if paced and wait > 0:
                # min(): a clock far behind Firestore's must not stall the run.
                st.due = time.monotonic() + min(wait, self.interval) + random.uniform(0, self.interval / 10)
                return False
            with self.lock:
                taken = st.queue.pop(0) if st.queue else None
            if not taken:
                return False
        except gexc.GoogleAPIError as exc:
            self._backoff(run_id, st, exc)
            return False
        try:
            fields = taken.fields(snap.to_dict(), self._limit)
            if not fields:
                # The run ended: what was buffered for it is not written (a terminal document stays as it was).
                log.debug("run %s has ended; dropped buffered changes %r", run_id, taken)
                return bool(st.queue)
            option = self._db().write_option(last_update_time=snap.update_time)
            ref.update(fields, option=option)
        except CONFLICTS:
            self.count(run_id, applied=False)
            self.restore(st, taken)
            if not paced:
                time.sleep(random.uniform(0.005, 0.02))
            return True  # a paced write re-reads the new update_time and waits its turn
        except gexc.NotFound:
            self._drop(run_id, st, taken)
            return False
        except (gexc.InvalidArgument, ValueError, TypeError):
            # Retrying cannot help (say the document would pass 1 MiB): drop it, loudly.
            log.exception("run %s: Firestore refuses buffered changes; dropped %r", run_id, taken)
            return True
        except gexc.GoogleAPIError as exc:
            self.restore(st, taken)
            self._backoff(run_id, st, exc)
            return False
        self.count(run_id)
        st.failures = 0
        st.due = time.monotonic() + self.interval
        return True

    def write_transition(self, run_id: str, change: RunUpdate, allowed: set[str]) -> bool:
        """Write ``change`` (it sets the status) if the stored status is in ``allowed``, with what is buffered."""
        ref = self._run_ref(run_id)
        st = self.state(run_id)
        with st.io:
            for attempt in range(MAX_ATTEMPTS):
                snap = ref.get(field_paths=READ_FOR_WRITE)
                if not snap.exists or (snap.to_dict() or {}).get("status") not in allowed:
                    return False
                # What this process buffered goes out in the same write, before the
                # transition's own fields (which are never stale: set_at=inf).
                write = Pending()
                with self.lock:
                    taken = st.queue.pop(0) if st.queue else None
                try:
                    if taken is not None:
                        if st.queue:
                            raise Incompatible  # more than one segment: the older ones go first
                        write.then(taken)
                    write.add(change, now(), set_at=math.inf)
                except Incompatible:
                    self.restore(st, taken)
                    self.write_segment(run_id, st, paced=False)
                    continue
                except BaseException:
                    self.restore(st, taken)
                    raise
                try:
                    ref.update(write.fields(snap.to_dict(), self._limit),
                               option=self._db().write_option(last_update_time=snap.update_time))  # fmt: skip
                except CONFLICTS:
                    self.count(run_id, applied=False)
                    self.restore(st, taken)
                    time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
                    continue
                except BaseException:
                    self.restore(st, taken)
                    raise
                self.count(run_id)
                st.due = time.monotonic() + self.interval
                return True
        raise StoreConflict(
            f"transition of run {run_id} to {change.set['status']}: the run document changed under "
            f"{MAX_ATTEMPTS} attempts in a row; is something writing it without coalescing?"
        )

    # --- the background thread ------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self.lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._flusher, name="haulage-firestore-flush", daemon=True)
                self._thread.start()

    def _flusher(self) -> None:
        """Write each run's buffer when its interval allows; forget runs idle for IDLE_SECONDS."""
        while not self.closed:
            with self.lock:
                if self.closed:
                    break
                mono = time.monotonic()
                due = [r for r, st in self._runs.items() if st.queue and st.due <= mono]
                if not due:
                    idle = [r for r, st in self._runs.items()
                            if not st.queue and mono - st.used > IDLE_SECONDS and not st.io.locked()]  # fmt: skip
                    for r in idle:  # a long-lived worker sees millions of runs: keep only live ones
                        del self._runs[r]
                        self.writes.pop(r, None)
                        self.conflicts.pop(r, None)
                    waits = [st.due - mono for st in self._runs.values() if st.queue]
                    self._wake.wait(min(waits) if waits else IDLE_SECONDS)
                    continue
            for rid in due:
                try:
                    self.flush_run(rid, paced=True)
                except Exception as exc:  # the writer must outlive any one run's failure (say, no credentials)
                    log.exception("coalesced write of run %s failed", rid)
                    with self.lock:
                        st = self._runs.get(rid)
                    if st is not None:
                        self._backoff(rid, st, exc)

    def _backoff(self, run_id: str, st: RunState, exc: Exception) -> None:
        st.failures += 1
        delay = min(30.0, max(self.interval, 0.5) * 2 ** min(st.failures, 6))
        st.due = time.monotonic() + delay
        log.warning("run %s: coalesced write failed (%s); retrying in %.1fs", run_id, exc, delay)

    def _drop(self, run_id: str, st: RunState, taken: Pending | None = None) -> None:
        with self.lock:
            dropped = [taken, *st.queue] if taken else list(st.queue)
            st.queue.clear()
        log.debug("run %s has no document (deleted?); dropped buffered changes %r", run_id, dropped)
