"""The Redis backend of the Store: the embedded default.

Layout (keys in haulage/keys.py): a hash per run whose fields hold JSON
values and numeric counters ("steps.done", "cost.<model>.usd"), a capped list
for its history, and hashes for step records, checkpoints and guards. Writes
that must be atomic (create-if-absent, status transitions, step completion)
are Lua scripts, so each costs one round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from typing import Any, cast

import redis

from haulage import keys
from haulage.jsonutil import dumps
from haulage.progress.models import (
    Checkpoint,
    Cost,
    Event,
    RunRecord,
    RunStatus,
    RunUpdate,
    StepCounts,
    StepRecord,
    now,
)
from haulage.settings import get_settings

# Shared by the write scripts: apply one encoded RunUpdate to the run hash.
_APPLY = """
local function apply(run, hist, u, limit, ts, channel)
  for k, v in pairs(u.set) do redis.call('HSET', run, k, v) end
  for k, v in pairs(u.incr) do redis.call('HINCRBYFLOAT', run, k, v) end
  for k, v in pairs(u.maximum) do
    local cur = redis.call('HGET', run, k)
    if (not cur) or tonumber(cur) < tonumber(v) then redis.call('HSET', run, k, v) end
  end
  for _, e in ipairs(u.events) do redis.call('RPUSH', hist, e) end
  if #u.events > 0 then redis.call('LTRIM', hist, -limit, -1) end
  redis.call('HSET', run, 'updated_at', ts)
  redis.call('PUBLISH', channel, ts)
end
"""

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = cjson.decode(ARGV[1])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

_UPDATE = (
    _APPLY
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
apply(KEYS[1], KEYS[2], cjson.decode(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4])
return 1
"""
)

_TRANSITION = (
    _APPLY
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local allowed = cjson.decode(ARGV[1])
local ok = false
for _, s in ipairs(allowed) do if cjson.encode(s) == cur then ok = true end end
if not ok then return 0 end
local u = cjson.decode(ARGV[2])
u.set['status'] = ARGV[3]
apply(KEYS[1], KEYS[2], u, tonumber(ARGV[4]), ARGV[5], ARGV[6])
return 1
"""
)

_COMPLETE_STEP = (
    _APPLY
    + """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return redis.call('HGET', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then
  apply(KEYS[3], KEYS[4], cjson.decode(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7])
end
return false
"""
)

_START_STEP = (
    _APPLY
    + """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  apply(KEYS[3], KEYS[4], cjson.decode(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6])
end
return false
"""
)

_CLAIM_GUARD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return false end
return redis.call('HGET', KEYS[1], ARGV[1])
"""

_REPLACE_GUARD = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

_FINISH_GUARD = """
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], 'done')
elseif redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""

# Run fields stored as JSON text; counters ("steps.*", "cost.*") are plain numbers.
_JSON_FIELDS = (
    "workflow", "status", "percent", "message", "created_by", "tags", "params",
    "idempotency_key", "params_hash", "on_failure", "result", "error", "heartbeat",
    "recoveries", "created_at", "updated_at", "started_at", "finished_at",
)  # fmt: skip


def _encode_update(update: RunUpdate) -> str:
    # Lua's cjson turns an empty JSON object into a table that iterates fine,
    # but an empty array must stay an array: events is always a list.
    return dumps(
        {
            "set": {k: dumps(v.value if isinstance(v, RunStatus) else v) for k, v in update.set.items()},
            "incr": dict(update.incr),
            "maximum": dict(update.maximum),
            "events": [dumps(e.to_dict()) for e in update.events] or {},
        }
    )


class _PubSubFeed:
    """Every write script PUBLISHes on the run's channel; this listens to it."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        changed = False
        while True:
            left = deadline - time.monotonic()
            message = self.pubsub.get_message(timeout=max(left, 0.0) if not changed else 0.0)
            if message is None:
                return changed  # nothing more queued: report what we saw
            changed = True

    def close(self) -> None:
        self.pubsub.close()


class RedisStore:
    """Store backend on Redis; see :class:`haulage.progress.store.Store` for the contract."""

    settle_seconds = 0.0  # every write is one script, applied at once

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._transition = client.register_script(_TRANSITION)
        self._complete = client.register_script(_COMPLETE_STEP)
        self._start = client.register_script(_START_STEP)
        self._claim = client.register_script(_CLAIM_GUARD)
        self._finish = client.register_script(_FINISH_GUARD)
        self._replace = client.register_script(_REPLACE_GUARD)

    @property
    def _limit(self) -> int:
        return get_settings().history_limit

    # --- runs -----------------------------------------------------------
    def create_run(self, run: RunRecord) -> RunRecord | None:
        data = run.to_dict()
        fields = {k: dumps(data[k]) for k in _JSON_FIELDS}
        fields.update({"steps.total": str(run.steps.total), "steps.done": "0", "steps.failed": "0"})
        created = self._create(keys=[keys.run(run.id), keys.runs_index()], args=[dumps(fields), run.created_at, run.id])
        if created:
            if run.history:
                self.update_run(run.id, RunUpdate(events=list(run.history)))
            return None
        return self.get_run(run.id)

    def get_run(self, run_id: str) -> RunRecord | None:
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.run(run_id))
            pipe.lrange(keys.history(run_id), 0, -1)
            raw, hist = pipe.execute()
        if not raw:
            return None
        return self._decode_run(run_id, raw, hist)

    @staticmethod
    def _decode_run(run_id: str, raw: dict[bytes, bytes], hist: list[bytes]) -> RunRecord:
        data: dict[str, Any] = {}
        counts = StepCounts()
        costs: dict[str, Cost] = {}
        for bkey, bval in raw.items():
            key, val = bkey.decode(), bval.decode()
            if key.startswith("steps."):
                setattr(counts, key[6:], int(float(val)))
            elif key.startswith("cost."):
                model, metric = key[5:].rsplit(".", 1)
                cost = costs.setdefault(model, Cost())
                setattr(cost, metric, float(val) if metric == "usd" else int(float(val)))
            elif key in _JSON_FIELDS:
                data[key] = json.loads(val)
        data["status"] = RunStatus(data["status"])
        return RunRecord(
            id=run_id,
            steps=counts,
            cost=costs,
            history=[Event.from_dict(json.loads(e)) for e in hist],
            **data,
        )

    def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: RunStatus | None = None,
        created_by: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[RunRecord]:
        out: list[RunRecord] = []
        skipped = 0
        start, chunk = 0, 200
        while len(out) < limit:
            ids = [i.decode() for i in cast(list[bytes], self.r.zrevrange(keys.runs_index(), start, start + chunk - 1))]
            if not ids:
                break
            start += chunk
            with self.r.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hmget(keys.run(rid), ["workflow", "status", "created_by"])
                heads = pipe.execute()
            for rid, (wf, st, by) in zip(ids, heads, strict=True):
                if wf is None:
                    continue  # deleted between the index read and now
                if workflow is not None and json.loads(wf) != workflow:
                    continue
                if status is not None and json.loads(st) != RunStatus(status).value:
                    continue
                if created_by is not None and json.loads(by) != created_by:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                run = self.get_run(rid)
                if run is not None:
                    out.append(run)
                if len(out) >= limit:
                    break
        return out

    def update_run(self, run_id: str, update: RunUpdate) -> None:
        if not update:
            return
        self._update(
            keys=[keys.run(run_id), keys.history(run_id)],
            args=[_encode_update(update), self._limit, dumps(now()), keys.changes_channel(run_id)],
        )

    def transition(
        self,
        run_id: str,
        to: RunStatus,
        *,
        allowed_from: Collection[RunStatus],
        update: RunUpdate | None = None,
    ) -> bool:
        return bool(
            self._transition(
                keys=[keys.run(run_id), keys.history(run_id)],
                args=[
                    dumps([RunStatus(s).value for s in allowed_from]),
                    _encode_update(update or RunUpdate()),
                    dumps(RunStatus(to).value),
                    self._limit,
                    dumps(now()),
                    keys.changes_channel(run_id),
                ],
            )
        )

    def delete_run(self, run_id: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(*keys.run_keys(run_id))
            pipe.zrem(keys.runs_index(), run_id)
            pipe.execute()

    # --- steps ----------------------------------------------------------
    def get_step(self, run_id: str, step_key: str) -> StepRecord | None:
        raw = self.r.hget(keys.steps(run_id), step_key)
        return StepRecord.from_dict(json.loads(raw)) if raw else None

    def put_step(self, run_id: str, step: StepRecord) -> None:
        self.r.hset(keys.steps(run_id), step.key, dumps(step.to_dict()))

    def list_steps(self, run_id: str) -> list[StepRecord]:
        raw = self.r.hgetall(keys.steps(run_id))
        return sorted((StepRecord.from_dict(json.loads(v)) for v in raw.values()), key=lambda s: s.key)

    def start_step(self, run_id: str, step: StepRecord, update: RunUpdate) -> Checkpoint | None:
        existing = self._start(
            keys=[keys.checkpoints(run_id), keys.steps(run_id), keys.run(run_id), keys.history(run_id)],
            args=[
                step.key,
                dumps(step.to_dict()),
                _encode_update(update),
                self._limit,
                dumps(now()),
                keys.changes_channel(run_id),
            ],  # fmt: skip
        )
        return Checkpoint.from_dict(json.loads(existing)) if existing else None

    def load_step_state(self, run_id: str, step_keys: Sequence[str]) -> tuple[RunStatus | None, dict[str, Checkpoint]]:
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hget(keys.run(run_id), "status")
            if step_keys:
                pipe.hmget(keys.checkpoints(run_id), list(step_keys))
            replies = pipe.execute()
        status = RunStatus(json.loads(replies[0])) if replies[0] else None
        values = replies[1] if step_keys else []
        cps = {k: Checkpoint.from_dict(json.loads(v)) for k, v in zip(step_keys, values, strict=True) if v is not None}
        return status, cps

    # --- checkpoints ----------------------------------------------------
    def get_checkpoints(self, run_id: str, step_keys: Sequence[str]) -> dict[str, Checkpoint]:
        if not step_keys:
            return {}
        values = self.r.hmget(keys.checkpoints(run_id), list(step_keys))
        return {k: Checkpoint.from_dict(json.loads(v)) for k, v in zip(step_keys, values, strict=True) if v is not None}

    def put_checkpoint(self, run_id: str, checkpoint: Checkpoint) -> bool:
        return bool(self.r.hsetnx(keys.checkpoints(run_id), checkpoint.step_key, dumps(checkpoint.to_dict())))

    def complete_step(self, run_id: str, checkpoint: Checkpoint, step: StepRecord, update: RunUpdate) -> Checkpoint:
        existing = self._complete(
            keys=[keys.checkpoints(run_id), keys.steps(run_id), keys.run(run_id), keys.history(run_id)],
            args=[
                checkpoint.step_key,
                dumps(checkpoint.to_dict()),
                dumps(step.to_dict()),
                _encode_update(update),
                self._limit,
                dumps(now()),
                keys.changes_channel(run_id),
            ],
        )
        return Checkpoint.from_dict(json.loads(existing)) if existing else checkpoint

    def watch_changes(self, run_id: str) -> _PubSubFeed:
        return _PubSubFeed(self.r, keys.changes_channel(run_id))

    # --- once-guards ----------------------------------------------------
    def claim_guard(self, run_id: str, key: str, token: str) -> str | None:
        held = self._claim(keys=[keys.guards(run_id)], args=[key, f"pending:{token}"])
        return held.decode() if held else None

    def replace_guard(self, run_id: str, key: str, expected: str, state: str) -> bool:
        return bool(self._replace(keys=[keys.guards(run_id)], args=[key, expected, state]))

    def finish_guard(self, run_id: str, key: str, token: str, done: bool) -> None:
        self._finish(keys=[keys.guards(run_id)], args=[key, f"pending:{token}", "1" if done else "0"])

    def get_guards(self, run_id: str) -> dict[str, Any]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(keys.guards(run_id)))
        return {k.decode(): v.decode() for k, v in raw.items()}
