"""The per-step run lock: one delivery of a step runs at a time, anywhere.

SET NX PX with a random token; released with compare-and-delete, so a lock
that expired and was taken by another delivery is never released by the first.
Any Redis error raises LockUnavailable: without the lock we cannot know that no
one else is running the step, so we do not run it (fail closed).

The lock's TTL is above the step's hard timeout, so it cannot lapse while the
step legitimately runs. But a holder killed with SIGKILL would then block its
step for that whole TTL. So the holder also keeps a short-lived liveness key
fresh from a heartbeat thread; a contender that finds the lock held by a
holder whose liveness key has expired (the process is gone) takes the lock
over. The checkpoint's create-if-absent write keeps the result single even in
the unlikely case that a frozen (not dead) holder wakes up.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis

from haulage import keys
from haulage.errors import LockUnavailable

_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and redis.call('EXISTS', ARGV[4] .. cur) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', ARGV[4] .. ARGV[1], '1', 'PX', ARGV[3])
if cur then return 2 end
return 1
"""

_RELEASE = """
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then released = redis.call('DEL', KEYS[1]) end
redis.call('DEL', ARGV[3] .. ARGV[1])
local count = -1
if ARGV[2] ~= '' then count = redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
return {released, count}
"""

def liveness_ms() -> int:
    """Milliseconds a holder's liveness key lives without a heartbeat (HAULAGE_LOCK_LIVENESS)."""
    from haulage.settings import get_settings

    return int(get_settings().lock_liveness * 1000)


_acquire_script: Any = None
_release_script: Any = None


def _scripts(client: redis.Redis) -> tuple[Any, Any]:
    # EVALSHA with the script cached in Redis, instead of sending the source every call.
    global _acquire_script, _release_script
    if _acquire_script is None or _acquire_script.registered_client is not client:
        _acquire_script = client.register_script(_ACQUIRE)
        _release_script = client.register_script(_RELEASE)
    return _acquire_script, _release_script


class StepLock:
    def __init__(self, client: redis.Redis, run_id: str, step_key: str, ttl_seconds: float) -> None:
        self.client = client
        self.run_id = run_id
        self.key = keys.step_lock(run_id, step_key)
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token = uuid.uuid4().hex
        self.held = False
        self.stolen = False  #: True when the lock was taken over from a dead holder

    def acquire(self) -> bool:
        try:
            acquire, _ = _scripts(self.client)
            got = int(acquire(keys=[self.key], args=[self.token, self.ttl_ms, liveness_ms(), keys.lock_alive("")]))
        except redis.RedisError as exc:
            raise LockUnavailable(f"cannot take step lock {self.key}: {exc}") from exc
        self.held = got > 0
        self.stolen = got == 2
        return self.held

    def keep_alive(self) -> None:
        """Refresh the liveness key (called by the step's heartbeat thread)."""
        self.client.set(keys.lock_alive(self.token), "1", px=liveness_ms())

    def release(self, count_stage: int | None = None) -> int:
        """Release the lock; when ``count_stage`` is given, also count one finished unit of that stage.

        Returns the stage's new finished count (or -1), in the same round trip.
        """
        field = "" if count_stage is None else str(count_stage)
        _, release = _scripts(self.client)
        _released, count = release(
            keys=[self.key, keys.stage_progress(self.run_id)], args=[self.token, field, keys.lock_alive("")]
        )
        self.held = False
        return int(count)
