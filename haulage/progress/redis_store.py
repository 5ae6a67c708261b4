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
    FAILURES_LIMIT,
    PERCENT_BEFORE_COMPLETE,
    Checkpoint,
    Cost,
    Event,
    FailureEntry,
    RunRecord,
    RunStatus,
    RunUpdate,
    StepCounts,
    StepRecord,
    now,
    stage_fields,
    stages_from_fields,
)
from haulage.settings import get_settings

# Shared by the write scripts: apply one encoded RunUpdate to the run hash, then derive the
# percent from the stages (models.work_percent, the same rule in Lua). A run that has ended
# takes nothing but its `settled` marker (live_apply): a terminal document stays as written.
_APPLY = """
local TERMINAL = {['"COMPLETE"'] = true, ['"FAILED"'] = true, ['"CANCELLED"'] = true}
local function derive(run)
  local n = tonumber(redis.call('HGET', run, 'stages.n') or '0') or 0
  if n == 0 then return end
  local total, done = 0, 0
  for i = 0, n - 1 do
    local p = 'stages.' .. i .. '.'
    local f = redis.call('HMGET', run, p .. 'total', p .. 'done', p .. 'failed', p .. 'kind', p .. 'progress')
    local units = tonumber(f[1] or 'null')
    if units == nil then
      total = total + 1
    else
      if units < 0 then units = 0 end
      local finished = math.min((tonumber(f[2] or '0') or 0) + (tonumber(f[3] or '0') or 0), units)
      total = total + units
      done = done + finished
      if f[4] == '"step"' and finished < units then
        local pr = math.max(0, math.min(tonumber(f[5] or '0') or 0, 100))
        done = done + (units - finished) * pr / 100
      end
    end
  end
  if total <= 0 then return end
  local pct = math.min(ARGV_CAP, math.floor(1000 * done / total) / 10)
  local cur = tonumber(redis.call('HGET', run, 'percent') or '0') or 0
  if pct > cur then redis.call('HSET', run, 'percent', string.format('%.1f', pct)) end
end
-- a fan-out stage whose counts changed shows them as the run's message (models.stage_message)
local function counted(run, u)
  local touched = {}
  for _, tbl in ipairs({u.set, u.incr}) do
    for k, _ in pairs(tbl) do
      local i, f = string.match(k, '^stages%.(%d+)%.(%a+)$')
      if i and (f == 'total' or f == 'done' or f == 'failed') then touched[i] = true end
    end
  end
  if u.set['message'] ~= nil then return end
  for i, _ in pairs(touched) do
    local p = 'stages.' .. i .. '.'
    local f = redis.call('HMGET', run, p .. 'kind', p .. 'name', p .. 'total', p .. 'done', p .. 'failed')
    if f[1] == '"fan_out"' then
      local total = tonumber(f[3] or 'null')
      local n = (tonumber(f[4] or '0') or 0) + (tonumber(f[5] or '0') or 0)
      local text = cjson.decode(f[2] or '""') .. ' ' .. string.format('%d', n) .. '/' ..
        (total and string.format('%d', total) or '?')
      redis.call('HSET', run, 'message', cjson.encode(text))
    end
  end
end
local function apply(run, hist, u, limit, ts, channel)
  for k, v in pairs(u.set) do redis.call('HSET', run, k, v) end
  for k, v in pairs(u.incr) do
    local sum = redis.call('HINCRBYFLOAT', run, k, v)
    -- money without float noise: dollars to the nano-dollar (models.round_usd)
    if string.sub(k, 1, 5) == 'cost.' and string.sub(k, -4) == '.usd' then
      redis.call('HSET', run, k, string.format('%.9f', tonumber(sum)))
    end
  end
  for k, v in pairs(u.maximum) do
    local cur = redis.call('HGET', run, k)
    if (not cur) or tonumber(cur) < tonumber(v) then redis.call('HSET', run, k, v) end
  end
  for _, e in ipairs(u.events) do redis.call('RPUSH', hist, e) end
  if #u.events > 0 then redis.call('LTRIM', hist, -limit, -1) end
  for _, f in ipairs(u.failures) do
    local n = redis.call('HINCRBY', run, 'failures.n', 1)
    if n <= u.flimit then redis.call('HSET', run, 'failures.' .. (n - 1), f) end
  end
  -- the percent moves only with the stages' counts: other writes (events, heartbeats, costs) skip the
  -- walk over the stages, which grows with the plan's length
  local staged = false
  for _, tbl in ipairs({u.set, u.incr, u.maximum}) do
    for k, _ in pairs(tbl) do
      if string.sub(k, 1, 7) == 'stages.' then staged = true break end
    end
  end
  if staged then derive(run) end
  counted(run, u)
  redis.call('HSET', run, 'updated_at', ts)
  redis.call('PUBLISH', channel, ts)
end
local function live_apply(run, hist, u, limit, ts, channel)
  if not TERMINAL[redis.call('HGET', run, 'status') or ''] then
    apply(run, hist, u, limit, ts, channel)
    return
  end
  local v = u.set['settled']
  if v ~= nil and redis.call('HGET', run, 'settled') ~= v then
    redis.call('HSET', run, 'settled', v)
    redis.call('PUBLISH', channel, ts)
  end
end
""".replace("ARGV_CAP", repr(PERCENT_BEFORE_COMPLETE))

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = cjson.decode(ARGV[1])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
-- KEYS[2..]: the global index and the creator's and workflow's own (keys.runs_indexes)
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3]) end
return 1
"""

_UPDATE = (
    _APPLY
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
live_apply(KEYS[1], KEYS[2], cjson.decode(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4])
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
  live_apply(KEYS[3], KEYS[4], cjson.decode(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7])
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
  live_apply(KEYS[3], KEYS[4], cjson.decode(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6])
end
return false
"""
)

# A step that completed stays COMPLETE: a late writer (a cancel, a driver's last poll) cannot rewrite it.
_PUT_STEP = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and ARGV[3] ~= 'COMPLETE' and cjson.decode(cur).status == 'COMPLETE' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

_STEP_PROGRESS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local step = cjson.decode(cur)
if step.status ~= 'RUNNING' then return 0 end
step.percent = tonumber(ARGV[2])
step.message = ARGV[3]
step.updated_at = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(step))
redis.call('PUBLISH', KEYS[2], ARGV[4])
return 1
"""

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
    "schema", "workflow", "status", "percent", "message", "created_by", "tags", "params",
    "idempotency_key", "params_hash", "on_failure", "result", "error", "heartbeat",
    "recoveries", "created_at", "updated_at", "started_at", "finished_at", "settled",
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
            "failures": [dumps(f.to_dict()) for f in update.failures] or {},
            "flimit": FAILURES_LIMIT,
        }
    )


#: index entries read per round trip while a status filter picks runs out of an index
_LIST_CHUNK = 200


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
        self._put_step = client.register_script(_PUT_STEP)
        self._step_progress = client.register_script(_STEP_PROGRESS)
        self._indexed = False  # set once the per-creator and per-workflow indexes are known complete

    @property
    def _limit(self) -> int:
        return get_settings().history_limit

    # --- runs -----------------------------------------------------------
    def create_run(self, run: RunRecord) -> RunRecord | None:
        data = run.to_dict()
        fields = {k: dumps(data[k]) for k in _JSON_FIELDS}
        fields.update({"steps.total": str(run.steps.total), "steps.done": "0", "steps.failed": "0"})
        fields.update({k: dumps(v) for k, v in stage_fields(run.stages).items()})
        indexes = keys.runs_indexes(created_by=run.created_by, workflow=run.workflow)
        created = self._create(keys=[keys.run(run.id), *indexes], args=[dumps(fields), run.created_at, run.id])
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
        stages: dict[str, Any] = {}
        failures: dict[int, FailureEntry] = {}
        for bkey, bval in raw.items():
            key, val = bkey.decode(), bval.decode()
            if key.startswith("stages."):
                stages[key] = json.loads(val)
            elif key.startswith("failures."):
                if key != "failures.n":
                    failures[int(key[9:])] = FailureEntry.from_dict(json.loads(val))
            elif key.startswith("steps."):
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
            stages=stages_from_fields(stages),
            failures=[failures[i] for i in sorted(failures)],
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
        after: tuple[float, str] | None = None,
    ) -> list[RunRecord]:
        # One index per creator, per workflow and per (creator, workflow): a user's listing reads
        # that user's runs only, never the whole deployment's. Only a status filter is applied
        # here, over the chosen index; without one, Redis skips the offset itself.
        self._ensure_indexed()
        index = keys.runs_index_for(created_by=created_by, workflow=workflow)
        wanted = None if status is None else dumps(RunStatus(status).value)
        top: float | str = "+inf" if after is None else after[0]
        pos, skip = (offset, 0) if wanted is None else (0, offset)
        out: list[RunRecord] = []
        while len(out) < limit:
            chunk = max(limit - len(out), 50) if wanted is None else _LIST_CHUNK
            page = cast(list[tuple[bytes, float]],
                        self.r.zrevrangebyscore(index, top, "-inf", start=pos, num=chunk, withscores=True))  # fmt: skip
            if not page:
                break
            pos += len(page)
            ids = [m.decode() for m, score in page if after is None or score < after[0] or m.decode() < after[1]]
            if wanted is not None:
                statuses = self._statuses(ids)
                ids = [rid for rid, st in zip(ids, statuses, strict=True) if st is not None and st.decode() == wanted]
            if skip:
                dropped, ids = ids[:skip], ids[skip:]
                skip -= len(dropped)
            out.extend(self._get_runs(ids[: limit - len(out)]))
        return out

    def _statuses(self, run_ids: list[str]) -> list[bytes | None]:
        with self.r.pipeline(transaction=False) as pipe:
            for rid in run_ids:
                pipe.hget(keys.run(rid), "status")
            return cast(list[bytes | None], pipe.execute())

    def _get_runs(self, run_ids: list[str]) -> list[RunRecord]:
        """The documents of ``run_ids`` in one round trip; runs deleted meanwhile are left out."""
        with self.r.pipeline(transaction=False) as pipe:
            for rid in run_ids:
                pipe.hgetall(keys.run(rid))
                pipe.lrange(keys.history(rid), 0, -1)
            replies = pipe.execute()
        out = []
        for i, rid in enumerate(run_ids):
            raw, hist = replies[2 * i], replies[2 * i + 1]
            if raw:
                out.append(self._decode_run(rid, raw, hist))
        return out

    def _ensure_indexed(self) -> None:
        """Once per deployment: add runs recorded before the per-creator indexes existed to them."""
        if self._indexed or self.r.exists(keys.runs_indexed()):
            self._indexed = True
            return
        start = 0
        while ids := [i.decode() for i in cast(list[bytes], self.r.zrange(keys.runs_index(), start, start + 499))]:
            start += len(ids)
            with self.r.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hmget(keys.run(rid), ["workflow", "created_by", "created_at"])
                heads = pipe.execute()
            with self.r.pipeline(transaction=False) as pipe:
                for rid, (wf, by, at) in zip(ids, heads, strict=True):
                    if wf is None:
                        continue
                    for index in keys.runs_indexes(created_by=json.loads(by), workflow=json.loads(wf))[1:]:
                        pipe.zadd(index, {rid: float(json.loads(at))})
                pipe.execute()
        self.r.set(keys.runs_indexed(), dumps(now()))
        self._indexed = True

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
        wf, by = self.r.hmget(keys.run(run_id), ["workflow", "created_by"])
        indexes = [keys.runs_index()]
        if wf is not None:
            indexes = keys.runs_indexes(created_by=json.loads(by) if by else None, workflow=json.loads(wf))
        with self.r.pipeline() as pipe:
            pipe.delete(*keys.run_keys(run_id))
            for index in indexes:
                pipe.zrem(index, run_id)
            pipe.execute()

    # --- steps ----------------------------------------------------------
    def get_step(self, run_id: str, step_key: str) -> StepRecord | None:
        raw = self.r.hget(keys.steps(run_id), step_key)
        return StepRecord.from_dict(json.loads(raw)) if raw else None

    def put_step(self, run_id: str, step: StepRecord) -> None:
        self._put_step(keys=[keys.steps(run_id)], args=[step.key, dumps(step.to_dict()), step.status.value])

    def create_item_rows(self, run_id: str, rows: Sequence[StepRecord]) -> None:
        for start in range(0, len(rows), 500):
            with self.r.pipeline(transaction=False) as pipe:
                for row in rows[start:start + 500]:
                    pipe.hsetnx(keys.steps(run_id), row.key, dumps(row.to_dict()))
                pipe.execute()

    def step_progress(self, run_id: str, step_key: str, percent: float, message: str) -> None:
        self._step_progress(keys=[keys.steps(run_id), keys.changes_channel(run_id)],
                            args=[step_key, percent, message, now()])  # fmt: skip

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
