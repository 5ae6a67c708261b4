"""The per-step run lock: one delivery of a step runs at a time, anywhere.

A thin holder over the coordination seam (:mod:`haulage.coordination`), which
does the locking atomically: take the lock, or take it over from a holder
whose liveness lapsed; release it only while still its holder. A backend that
cannot answer raises LockUnavailable: without the lock we cannot know that no
one else is running the step, so we do not run it (fail closed).

The lock's TTL is above the step's hard timeout, so it cannot lapse while the
step legitimately runs; the heartbeat thread (tasks/heartbeat.py) keeps the
holder's short liveness fresh, so a holder killed with SIGKILL blocks its step
only until that liveness lapses. The checkpoint's create-if-absent write keeps
the result single even in the unlikely case that a frozen (not dead) holder
wakes up.
"""

from __future__ import annotations

import uuid

from haulage import keys
from haulage.coordination import Coordination, FanInEntry, LockGrant, LockRelease
from haulage.settings import get_settings


def liveness_seconds() -> float:
    """Seconds a holder's liveness lasts without a heartbeat (HAULAGE_LOCK_LIVENESS)."""
    return get_settings().lock_liveness


class StepLock:
    def __init__(self, coordination: Coordination, run_id: str, step_key: str, ttl_seconds: float) -> None:
        self.coordination = coordination
        self.run_id = run_id
        self.step_key = step_key
        self.key = keys.step_lock(run_id, step_key)  #: the lock's Redis key, named in logs and errors
        self.ttl_seconds = ttl_seconds
        self.token = uuid.uuid4().hex
        self.held = False
        self.stolen = False  #: True when the lock was taken over from a dead holder

    def acquire(self) -> bool:
        grant = self.coordination.acquire_lock(
            self.run_id, self.step_key, self.token, ttl_seconds=self.ttl_seconds, liveness_seconds=liveness_seconds()
        )
        self.held = grant.held
        self.stolen = grant is LockGrant.TAKEN_OVER
        return self.held

    def keep_alive(self) -> None:
        """Refresh the holder's liveness (called by the step's heartbeat thread)."""
        self.coordination.refresh_liveness(self.token, liveness_seconds())

    def release(self, count_stage: int | None = None, fan_in: FanInEntry | None = None) -> LockRelease:
        """Release the lock; when ``count_stage`` is given, also count one finished unit of that stage,
        and record ``fan_in`` (a fan-out item's final reference), all in the same round trip."""
        outcome = self.coordination.release_lock(self.run_id, self.step_key, self.token, count_stage=count_stage,
                                                 fan_in=fan_in)  # fmt: skip
        self.held = False
        return outcome
