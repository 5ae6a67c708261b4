"""The coordination seam on Redis: see :class:`haulage.coordination.seam.Coordination` for the contract.

Locks are SET NX PX with a random token, released with compare-and-delete, so
a lock that expired and was taken by another delivery is never released by
the first. The lock's TTL is above the step's hard timeout, so it cannot lapse
while the step legitimately runs; but a holder killed with SIGKILL would then
block its step for that whole TTL. So each holder also has a short-lived
liveness key (``keys.lock_alive(token)``) that its heartbeat keeps fresh; a
contender that finds the lock held by a holder whose liveness key has expired
takes the lock over. Both checks and writes run in one Lua script each, so no
other client sees a half-taken lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, cast

import redis

from haulage import keys
from haulage.coordination.seam import Handoff, LockGrant, LockRelease
from haulage.errors import LockUnavailable
from haulage.jsonutil import dumps, loads

# KEYS[1] the lock; ARGV: token, lock TTL ms, liveness TTL ms, liveness key prefix.
# The liveness prefix comes in as an argument because the holder's key is only known inside the script.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and redis.call('EXISTS', ARGV[4] .. cur) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', ARGV[4] .. ARGV[1], '1', 'PX', ARGV[3])
if cur then return 2 end
return 1
"""

# KEYS[1] the lock, KEYS[2] the stage counters; ARGV: token, stage field ('' for none), liveness key prefix.
_RELEASE = """
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then released = redis.call('DEL', KEYS[1]) end
redis.call('DEL', ARGV[3] .. ARGV[1])
local count = -1
if ARGV[2] ~= '' then count = redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
return {released, count}
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _expires(raw: bytes) -> float:
    try:
        return float(loads(raw).get("expires", 0))
    except (ValueError, AttributeError):
        return 0.0  # not ours or damaged: treat as lapsed


class _CompletionFeed:
    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(keys.completions_channel())
        # Read the confirmation, so that an event published once this returns cannot reach Redis first.
        self.pubsub.get_message(timeout=5.0)

    def get(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(timeout=left)
            if message is not None and message["type"] == "message":
                return cast(dict[str, Any], json.loads(message["data"]))
        return None

    def close(self) -> None:
        self.pubsub.close()


class RedisCoordination:
    """Coordination on one Redis client (the engine's, ``get_redis()``, whatever the store)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        # EVALSHA with the script cached in Redis, instead of sending the source every call.
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    # --- step locks -----------------------------------------------------
    def acquire_lock(
        self, run_id: str, step_key: str, token: str, *, ttl_seconds: float, liveness_seconds: float
    ) -> LockGrant:
        key = keys.step_lock(run_id, step_key)
        try:
            got = self._acquire(keys=[key], args=[token, _ms(ttl_seconds), _ms(liveness_seconds), keys.lock_alive("")])
        except redis.RedisError as exc:
            raise LockUnavailable(f"cannot take step lock {key}: {exc}") from exc
        return LockGrant(int(got))

    def refresh_liveness(self, token: str, liveness_seconds: float) -> None:
        self.r.set(keys.lock_alive(token), "1", px=_ms(liveness_seconds))

    def release_lock(self, run_id: str, step_key: str, token: str, *, count_stage: int | None = None) -> LockRelease:
        field = "" if count_stage is None else str(count_stage)
        released, count = self._release(
            keys=[keys.step_lock(run_id, step_key), keys.stage_progress(run_id)],
            args=[token, field, keys.lock_alive("")],
        )
        return LockRelease(released=bool(released), stage_count=None if count_stage is None else int(count))

    def lock_holder(self, run_id: str, step_key: str) -> str | None:
        raw = self.r.get(keys.step_lock(run_id, step_key))
        return None if raw is None else cast(bytes, raw).decode()

    def holder_alive(self, token: str) -> bool:
        return bool(self.r.exists(keys.lock_alive(token)))

    # --- crashes and the deliveries live workers hold ---------------------
    def count_crash(self, run_id: str, step_key: str) -> int:
        return int(self.r.hincrby(keys.crashes(run_id), step_key, 1))

    def reset_crashes(self, run_id: str) -> None:
        self.r.delete(keys.crashes(run_id))

    def hold_deliveries(self, tags: Sequence[str], liveness_seconds: float) -> None:
        if not tags:
            return
        pipe = self.r.pipeline(transaction=False)  # one round trip per beat, however many tags
        for tag in tags:
            pipe.set(keys.held_delivery(tag), "1", px=_ms(liveness_seconds))
        pipe.execute()

    def held_deliveries(self, tags: Sequence[str]) -> list[bool]:
        if not tags:
            return []  # MGET refuses an empty list
        return [v is not None for v in cast(list[Any], self.r.mget([keys.held_delivery(t) for t in tags]))]

    def take_turn(self, name: str, token: str, seconds: float) -> bool:
        return bool(self.r.set(keys.turn(name), token, nx=True, px=_ms(seconds)))

    # --- settings agreement ----------------------------------------------
    # One small hash for every worker of every prefix; each entry carries its own expiry
    # (a hash field has no TTL on Redis 7.0), and the whole hash lapses when no worker is left.
    def announce_worker(self, hostname: str, settings: dict[str, Any], ttl_seconds: float) -> None:
        key, at = keys.worker_settings(), time.time()
        stored = cast(dict[bytes, bytes], self.r.hgetall(key))
        lapsed = [name for name, raw in stored.items() if _expires(raw) < at and name != hostname.encode()]
        pipe = self.r.pipeline()
        if lapsed:
            pipe.hdel(key, *lapsed)
        pipe.hset(key, hostname, dumps({**settings, "expires": at + ttl_seconds}))
        pipe.expire(key, max(1, int(ttl_seconds * 4)))
        pipe.execute()

    def withdraw_worker(self, hostname: str) -> None:
        self.r.hdel(keys.worker_settings(), hostname)

    def worker_announcements(self) -> dict[str, dict[str, Any]]:
        at = time.time()
        found = {}
        for name, raw in cast(dict[bytes, bytes], self.r.hgetall(keys.worker_settings())).items():
            if _expires(raw) >= at:
                found[name.decode()] = loads(raw)
        return found

    def report_lost_run(self, run_id: str, notice: dict[str, Any], ttl_seconds: float) -> None:
        self.r.set(keys.lost_run(run_id), dumps(notice), px=_ms(ttl_seconds))

    def lost_run(self, run_id: str) -> dict[str, Any] | None:
        raw = self.r.get(keys.lost_run(run_id))
        return loads(cast(bytes, raw)) if raw else None

    # --- stage counters -------------------------------------------------
    def count_stage(self, run_id: str, stage: int) -> int:
        return int(self.r.hincrby(keys.stage_progress(run_id), str(stage), 1))

    # --- ledgers --------------------------------------------------------
    def ledger_add(self, run_id: str, step_key: str, name: str, item_id: str) -> None:
        self.r.sadd(keys.ledger(run_id, step_key, name), item_id)

    def ledger_contains(self, run_id: str, step_key: str, name: str, item_ids: Sequence[str]) -> list[bool]:
        if not item_ids:
            return []  # SMISMEMBER refuses an empty list
        found = self.r.smismember(keys.ledger(run_id, step_key, name), list(item_ids))
        return [bool(f) for f in cast(list[int], found)]

    def ledger_count(self, run_id: str, step_key: str, name: str) -> int:
        return int(self.r.scard(keys.ledger(run_id, step_key, name)))

    # --- Cloud Run hand-off ---------------------------------------------
    def put_handoff(self, run_id: str, step_key: str, kind: Handoff, data: dict[str, Any], ttl_seconds: float) -> None:
        self.r.set(keys.handoff(run_id, step_key, kind.value), dumps(data), px=_ms(ttl_seconds))

    def get_handoff(self, run_id: str, step_key: str, kind: Handoff) -> dict[str, Any] | None:
        raw = self.r.get(keys.handoff(run_id, step_key, kind.value))
        return None if raw is None else cast(dict[str, Any], loads(cast(bytes, raw)))

    def clear_handoff(self, run_id: str, step_key: str) -> None:
        self.r.delete(*(keys.handoff(run_id, step_key, kind.value) for kind in Handoff))

    # --- completion events ----------------------------------------------
    def publish_completion(self, event: dict[str, Any]) -> None:
        self.r.publish(keys.completions_channel(), json.dumps(event))

    def watch_completions(self) -> _CompletionFeed:
        return _CompletionFeed(self.r)

    # --- retention ------------------------------------------------------
    def purge_run(self, run_id: str) -> None:
        ledgers = list(self.r.scan_iter(keys.ledger_pattern(run_id)))
        self.r.delete(keys.stage_progress(run_id), keys.crashes(run_id), *ledgers)
