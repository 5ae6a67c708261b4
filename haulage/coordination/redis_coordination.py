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
from haulage.coordination.seam import FanInEntry, Handoff, LockGrant, LockRelease
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


# KEYS: ok refs, failed refs, lease, continued; ARGV: total, lease ms, token, then (index, ok, ref) triples.
# One script: two items landing at once cannot both see the stage complete, nor both miss it.
# Open a stage's fan-in: store what follows it. A new opener (a first expansion, or a resume's) also
# clears the failures, the lease and the continued mark, so re-run items count afresh; the same opener
# again (a redelivery or a retry of the expansion) keeps them, so finished failures are not lost.
# KEYS: next, failed, lease, continued, opener. ARGV: continuation, opener ("" resets always).
_FAN_IN_OPEN = """
if ARGV[2] == '' or redis.call('GET', KEYS[5]) ~= ARGV[2] then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[5], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1])
"""

_FAN_IN_ADD = """
for j = 4, #ARGV, 3 do
  if ARGV[j + 1] == '1' then
    redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 2])
    redis.call('HDEL', KEYS[2], ARGV[j])
  elseif redis.call('HEXISTS', KEYS[1], ARGV[j]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 2])
  end
end
if redis.call('HLEN', KEYS[1]) + redis.call('HLEN', KEYS[2]) < tonumber(ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
return 1
"""

# The release and the fan-in record in one script: KEYS as _RELEASE's then _FAN_IN_ADD's; ARGV as _RELEASE's,
# then the fan-in's (total, lease ms, token, index, ok, ref). Returns {released, count, continue}.
_RELEASE_FAN_IN = """
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then released = redis.call('DEL', KEYS[1]) end
redis.call('DEL', ARGV[3] .. ARGV[1])
local count = -1
if ARGV[2] ~= '' then count = redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[3], ARGV[7], ARGV[9])
  redis.call('HDEL', KEYS[4], ARGV[7])
elseif redis.call('HEXISTS', KEYS[3], ARGV[7]) == 0 then
  redis.call('HSET', KEYS[4], ARGV[7], ARGV[9])
end
if redis.call('HLEN', KEYS[3]) + redis.call('HLEN', KEYS[4]) < tonumber(ARGV[4]) then return {released, count, 0} end
if redis.call('EXISTS', KEYS[6]) == 1 then return {released, count, 0} end
local holder = redis.call('GET', KEYS[5])
if holder and holder ~= ARGV[6] then return {released, count, 0} end
redis.call('SET', KEYS[5], ARGV[6], 'PX', ARGV[5])
return {released, count, 1}
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
        self._fan_in_add = client.register_script(_FAN_IN_ADD)
        self._fan_in_open = client.register_script(_FAN_IN_OPEN)
        self._release_fan_in = client.register_script(_RELEASE_FAN_IN)

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

    def release_lock(self, run_id: str, step_key: str, token: str, *, count_stage: int | None = None,
                     fan_in: FanInEntry | None = None) -> LockRelease:  # fmt: skip
        field = "" if count_stage is None else str(count_stage)
        lock_keys = [keys.step_lock(run_id, step_key), keys.stage_progress(run_id)]
        args: list[Any] = [token, field, keys.lock_alive("")]
        if fan_in is None:
            released, count = self._release(keys=lock_keys, args=args)
            carry_on = 0
        else:
            parts = [keys.fan_in(run_id, fan_in.stage, part) for part in ("ok", "failed", "lease", "continued")]
            args += [fan_in.total, _ms(fan_in.lease_seconds), fan_in.token, fan_in.item,
                     "1" if fan_in.ref.get("ok") == 1 else "0", dumps(fan_in.ref)]  # fmt: skip
            released, count, carry_on = self._release_fan_in(keys=lock_keys + parts, args=args)
        return LockRelease(released=bool(released), stage_count=None if count_stage is None else int(count),
                           continue_stage=bool(carry_on))  # fmt: skip

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

    # --- fan-in ---------------------------------------------------------
    def fan_in_open(self, run_id: str, stage: int, continuation: list[dict[str, Any]], *,
                    opener: str = "") -> None:  # fmt: skip
        parts = [keys.fan_in(run_id, stage, part) for part in ("next", "failed", "lease", "continued", "opener")]
        self._fan_in_open(keys=parts, args=[dumps(continuation), opener])

    def fan_in_add(self, run_id: str, stage: int, refs: dict[int, dict[str, Any]], total: int, token: str,
                   lease_seconds: float) -> bool:  # fmt: skip
        args: list[Any] = [total, _ms(lease_seconds), token]
        for index, ref in refs.items():
            args += [index, "1" if ref.get("ok") == 1 else "0", dumps(ref)]
        parts = [keys.fan_in(run_id, stage, part) for part in ("ok", "failed", "lease", "continued")]
        return bool(self._fan_in_add(keys=parts, args=args))

    def fan_in_continuation(self, run_id: str, stage: int) -> list[dict[str, Any]] | None:
        raw = self.r.get(keys.fan_in(run_id, stage, "next"))
        return None if raw is None else cast(list[dict[str, Any]], loads(cast(bytes, raw)))

    def fan_in_continued(self, run_id: str, stage: int) -> None:
        self.r.set(keys.fan_in(run_id, stage, "continued"), "1")

    def fan_in_refs(self, run_id: str, stage: int) -> list[dict[str, Any]]:
        with self.r.pipeline(transaction=True) as pipe:  # both halves as of one moment
            pipe.hvals(keys.fan_in(run_id, stage, "ok"))
            pipe.hvals(keys.fan_in(run_id, stage, "failed"))
            ok, failed = pipe.execute()
        return [loads(raw) for raw in (*ok, *failed)]

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
        fan_ins = list(self.r.scan_iter(keys.fan_in_pattern(run_id)))
        self.r.delete(keys.stage_progress(run_id), keys.crashes(run_id), *ledgers, *fan_ins)
