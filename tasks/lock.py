"""The per-step run lock: one delivery of a step runs at a time, anywhere.

SET NX PX with a random token; released with compare-and-delete, so a lock
that expired and was taken by another delivery is never released by the first.
Any Redis error raises LockUnavailable: without the lock we cannot know that no
one else is running the step, so we do not run it (fail closed).
"""

from __future__ import annotations

import uuid

import redis

from haulage import keys
from haulage.errors import LockUnavailable

_RELEASE = """
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then released = redis.call('DEL', KEYS[1]) end
local count = -1
if ARGV[2] ~= '' then count = redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
return {released, count}
"""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class StepLock:
    def __init__(self, client: redis.Redis, run_id: str, step_key: str, ttl_seconds: float) -> None:
        self.client = client
        self.run_id = run_id
        self.key = keys.step_lock(run_id, step_key)
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> bool:
        try:
            self.held = bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        except redis.RedisError as exc:
            raise LockUnavailable(f"cannot take step lock {self.key}: {exc}") from exc
        return self.held

    def extend(self) -> bool:
        """Push the expiry out again (long steps call this through their heartbeat)."""
        try:
            return bool(self.client.eval(_EXTEND, 1, self.key, self.token, self.ttl_ms))
        except redis.RedisError as exc:
            raise LockUnavailable(f"cannot extend step lock {self.key}: {exc}") from exc

    def release(self, count_stage: int | None = None) -> int:
        """Release the lock; when ``count_stage`` is given, also count one finished unit of that stage.

        Returns the stage's new finished count (or -1), in the same round trip.
        """
        field = "" if count_stage is None else str(count_stage)
        released, count = self.client.eval(_RELEASE, 2, self.key, keys.stage_progress(self.run_id), self.token, field)
        self.held = False
        return int(count)
