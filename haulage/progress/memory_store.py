"""An in-memory Store: the Redis backend's twin for fast tests (as dramatiq's StubBroker is for its brokers).

It keeps what RedisStore keeps, the way RedisStore keeps it: run fields as
JSON text beside numeric counters ("steps.done", "cost.<model>.usd"), a
history trimmed to its newest events, and step records, checkpoints and
guards as JSON text by key. So a value JSON cannot hold fails here as it
fails there, and what a reader gets back is a copy, never the stored object.
Every method holds one lock, which makes each call atomic the way each Redis
script is. Nothing outlives the process: it is for tests, not for workers.

Example::

    store = MemoryStore()
    store.create_run(RunRecord(id="r1", workflow="wf"))
    store.update_run("r1", RunUpdate(incr={"steps.done": 1}))
    assert store.get_run("r1").steps.done == 1
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Collection, Sequence
from typing import Any

from haulage.jsonutil import dumps
from haulage.progress.models import (
    COUNT_FIELDS,
    FAILURES_LIMIT,
    TERMINAL,
    Checkpoint,
    Cost,
    Event,
    FailureEntry,
    RunRecord,
    RunStatus,
    RunUpdate,
    StageKind,
    StepCounts,
    StepRecord,
    StepStatus,
    now,
    round_usd,
    stage_fields,
    stage_message,
    stages_from_fields,
    work_percent,
)
from haulage.settings import get_settings

# Run fields kept as JSON text; the counters ("steps.*", "cost.*") are numbers, and
# history is a list of its own (RedisStore's hash fields and history list).
_JSON_FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord)
                     if f.name not in {"id", "history", "cost", "steps", "stages", "failures"})  # fmt: skip
_TERMINAL_TEXT = frozenset(dumps(s.value) for s in TERMINAL)


@dataclasses.dataclass
class _Change:
    """A RunUpdate encoded before anything is written, so that a value JSON cannot hold changes nothing."""

    set: dict[str, str]
    incr: dict[str, float]
    maximum: dict[str, float]
    events: list[str]
    failures: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, update: RunUpdate) -> _Change:
        return cls(
            set={k: dumps(v.value if isinstance(v, RunStatus) else v) for k, v in update.set.items()},
            incr=json.loads(dumps(dict(update.incr))),
            maximum=json.loads(dumps(dict(update.maximum))),
            events=[dumps(e.to_dict()) for e in update.events],
            failures=[dumps(f.to_dict()) for f in update.failures],
        )


def _counted_stages(change: _Change, count: int) -> set[int]:
    """The stages whose total, done or failed count ``change`` touches."""
    out = set()
    for key in [*change.set, *change.incr]:
        parts = key.split(".")
        if (len(parts) == 3 and parts[0] == "stages" and parts[1].isdigit() and parts[2] in COUNT_FIELDS
                and int(parts[1]) < count):  # fmt: skip
            out.add(int(parts[1]))
    return out


@dataclasses.dataclass
class _Run:
    fields: dict[str, str]
    history: list[str] = dataclasses.field(default_factory=list)


class _MemoryFeed:
    """Reports whether the run changed since the last wait (RedisStore's feed drains what was published)."""

    def __init__(self, store: MemoryStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id
        self._cond = threading.Condition()
        self._changed = False

    def notify(self) -> None:
        with self._cond:
            self._changed = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._changed, timeout=max(timeout, 0.0))
            changed, self._changed = self._changed, False
            return changed

    def close(self) -> None:
        self._store._unsubscribe(self._run_id, self)


class MemoryStore:
    """Store backend in this process's memory; see :class:`haulage.progress.store.Store` for the contract."""

    settle_seconds = 0.0  # every write is applied at once, under the lock

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._index: dict[str, float] = {}  #: run id -> created_at (RedisStore's sorted set)
        self._steps: dict[str, dict[str, str]] = {}
        self._checkpoints: dict[str, dict[str, str]] = {}
        self._guards: dict[str, dict[str, str]] = {}
        self._feeds: dict[str, list[_MemoryFeed]] = {}

    @property
    def _limit(self) -> int:
        return get_settings().history_limit

    def _apply_live(self, run_id: str, change: _Change) -> None:
        """Apply ``change`` unless the run has ended; an ended run takes only its ``settled`` marker."""
        run = self._runs[run_id]
        if run.fields.get("status") not in _TERMINAL_TEXT:
            self._apply(run_id, change)
        elif "settled" in change.set and run.fields.get("settled") != change.set["settled"]:
            run.fields["settled"] = change.set["settled"]
            for feed in self._feeds.get(run_id, []):
                feed.notify()

    def _apply(self, run_id: str, change: _Change) -> None:
        """Apply one encoded update to an existing run, in RedisStore's order; the caller holds the lock."""
        run = self._runs[run_id]
        run.fields.update(change.set)
        for k, d in change.incr.items():
            total = float(run.fields.get(k, "0")) + d
            run.fields[k] = repr(round_usd(total) if k.startswith("cost.") and k.endswith(".usd") else total)
        for k, m in change.maximum.items():
            cur = run.fields.get(k)
            if cur is None or float(cur) < m:
                run.fields[k] = dumps(m)
        if change.events:
            run.history.extend(change.events)
            del run.history[: -self._limit]  # a limit of 0 keeps all, as LTRIM 0 -1 does
        for entry in change.failures:
            n = int(run.fields.get("failures.n", "0")) + 1
            run.fields["failures.n"] = str(n)
            if n <= FAILURES_LIMIT:
                run.fields[f"failures.{n - 1}"] = entry
        stages = stages_from_fields({k: json.loads(v) for k, v in run.fields.items() if k.startswith("stages.")})
        if stages:
            derived = work_percent(stages)
            if derived > float(json.loads(run.fields.get("percent", "0"))):
                run.fields["percent"] = dumps(derived)
        if "message" not in change.set:
            for index in sorted(_counted_stages(change, len(stages))):
                if stages[index].kind == StageKind.FAN_OUT.value:
                    run.fields["message"] = dumps(stage_message(stages[index]))
        run.fields["updated_at"] = dumps(now())
        for feed in self._feeds.get(run_id, []):
            feed.notify()

    # --- runs -----------------------------------------------------------
    def create_run(self, run: RunRecord) -> RunRecord | None:
        data = run.to_dict()
        fields = {k: dumps(data[k]) for k in _JSON_FIELDS}
        fields.update({"steps.total": str(run.steps.total), "steps.done": "0", "steps.failed": "0"})
        fields.update({k: dumps(v) for k, v in stage_fields(run.stages).items()})
        change = _Change.of(RunUpdate(events=list(run.history)))
        with self._lock:
            if run.id in self._runs:
                return self._decode(run.id)
            self._runs[run.id] = _Run(fields)
            self._index[run.id] = float(run.created_at)
            if change.events:
                self._apply(run.id, change)
        return None

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            return self._decode(run_id)

    def _decode(self, run_id: str) -> RunRecord | None:
        run = self._runs.get(run_id)
        if run is None:
            return None
        data: dict[str, Any] = {}
        counts = StepCounts()
        costs: dict[str, Cost] = {}
        stages: dict[str, Any] = {}
        failures: dict[int, FailureEntry] = {}
        for key, val in run.fields.items():
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
        history = [Event.from_dict(json.loads(e)) for e in run.history]
        return RunRecord(id=run_id, steps=counts, cost=costs, history=history, stages=stages_from_fields(stages),
                         failures=[failures[i] for i in sorted(failures)], **data)  # fmt: skip

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
        wanted = {"workflow": workflow, "status": None if status is None else RunStatus(status).value,
                  "created_by": created_by}  # fmt: skip
        out: list[RunRecord] = []
        skipped = 0
        with self._lock:
            # Newest first; equal times by id, descending, as Redis orders a sorted set read in reverse.
            for rid, created in sorted(self._index.items(), key=lambda item: (item[1], item[0]), reverse=True):
                if len(out) >= limit:
                    break
                if after is not None and (created > after[0] or (created == after[0] and rid >= after[1])):
                    continue
                fields = self._runs[rid].fields
                if any(v is not None and json.loads(fields[k]) != v for k, v in wanted.items()):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                record = self._decode(rid)
                if record is not None:
                    out.append(record)
        return out

    def update_run(self, run_id: str, update: RunUpdate) -> None:
        if not update:
            return
        change = _Change.of(update)
        with self._lock:
            if run_id in self._runs:
                self._apply_live(run_id, change)

    def transition(
        self,
        run_id: str,
        to: RunStatus,
        *,
        allowed_from: Collection[RunStatus],
        update: RunUpdate | None = None,
    ) -> bool:
        allowed = {RunStatus(s).value for s in allowed_from}
        change = _Change.of(update or RunUpdate())
        change.set["status"] = dumps(RunStatus(to).value)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or json.loads(run.fields["status"]) not in allowed:
                return False
            self._apply(run_id, change)
            return True

    def delete_run(self, run_id: str) -> None:
        with self._lock:
            for table in (self._runs, self._index, self._steps, self._checkpoints, self._guards):
                table.pop(run_id, None)

    # --- steps ----------------------------------------------------------
    def get_step(self, run_id: str, step_key: str) -> StepRecord | None:
        with self._lock:
            raw = self._steps.get(run_id, {}).get(step_key)
        return StepRecord.from_dict(json.loads(raw)) if raw else None

    def put_step(self, run_id: str, step: StepRecord) -> None:
        raw = dumps(step.to_dict())
        with self._lock:
            steps = self._steps.setdefault(run_id, {})
            cur = steps.get(step.key)
            if cur is not None and step.status is not StepStatus.COMPLETE and json.loads(cur)["status"] == "COMPLETE":
                return  # a step that completed stays COMPLETE (RedisStore's _PUT_STEP)
            steps[step.key] = raw

    def create_item_rows(self, run_id: str, rows: Sequence[StepRecord]) -> None:
        raws = [(row.key, dumps(row.to_dict())) for row in rows]
        with self._lock:
            steps = self._steps.setdefault(run_id, {})
            for key, raw in raws:
                steps.setdefault(key, raw)

    def step_progress(self, run_id: str, step_key: str, percent: float, message: str) -> None:
        with self._lock:
            steps = self._steps.get(run_id, {})
            cur = steps.get(step_key)
            if cur is None:
                return
            data = json.loads(cur)
            if data["status"] != StepStatus.RUNNING.value:
                return
            data.update(percent=float(percent), message=message, updated_at=now())
            steps[step_key] = dumps(data)
            for feed in self._feeds.get(run_id, []):
                feed.notify()

    def list_steps(self, run_id: str) -> list[StepRecord]:
        with self._lock:
            raws = list(self._steps.get(run_id, {}).values())
        return sorted((StepRecord.from_dict(json.loads(v)) for v in raws), key=lambda s: s.key)

    def start_step(self, run_id: str, step: StepRecord, update: RunUpdate) -> Checkpoint | None:
        raw, change = dumps(step.to_dict()), _Change.of(update)
        with self._lock:
            existing = self._checkpoints.get(run_id, {}).get(step.key)
            if existing:
                return Checkpoint.from_dict(json.loads(existing))
            self._steps.setdefault(run_id, {})[step.key] = raw
            if run_id in self._runs:
                self._apply_live(run_id, change)
        return None

    def load_step_state(self, run_id: str, step_keys: Sequence[str]) -> tuple[RunStatus | None, dict[str, Checkpoint]]:
        with self._lock:
            run = self._runs.get(run_id)
            status = RunStatus(json.loads(run.fields["status"])) if run is not None else None
            return status, self._checkpoints_among(run_id, step_keys)

    # --- checkpoints ----------------------------------------------------
    def get_checkpoints(self, run_id: str, step_keys: Sequence[str]) -> dict[str, Checkpoint]:
        with self._lock:
            return self._checkpoints_among(run_id, step_keys)

    def _checkpoints_among(self, run_id: str, step_keys: Sequence[str]) -> dict[str, Checkpoint]:
        stored = self._checkpoints.get(run_id, {})
        return {k: Checkpoint.from_dict(json.loads(stored[k])) for k in step_keys if k in stored}

    def put_checkpoint(self, run_id: str, checkpoint: Checkpoint) -> bool:
        raw = dumps(checkpoint.to_dict())
        with self._lock:
            stored = self._checkpoints.setdefault(run_id, {})
            if checkpoint.step_key in stored:
                return False
            stored[checkpoint.step_key] = raw
            return True

    def complete_step(self, run_id: str, checkpoint: Checkpoint, step: StepRecord, update: RunUpdate) -> Checkpoint:
        raw_cp, raw_step, change = dumps(checkpoint.to_dict()), dumps(step.to_dict()), _Change.of(update)
        with self._lock:
            stored = self._checkpoints.setdefault(run_id, {})
            existing = stored.get(checkpoint.step_key)
            if existing is not None:
                return Checkpoint.from_dict(json.loads(existing))
            stored[checkpoint.step_key] = raw_cp
            self._steps.setdefault(run_id, {})[step.key] = raw_step
            if run_id in self._runs:
                self._apply_live(run_id, change)
        return checkpoint

    def watch_changes(self, run_id: str) -> _MemoryFeed:
        feed = _MemoryFeed(self, run_id)
        with self._lock:
            self._feeds.setdefault(run_id, []).append(feed)
        return feed

    def _unsubscribe(self, run_id: str, feed: _MemoryFeed) -> None:
        with self._lock:
            feeds = self._feeds.get(run_id, [])
            if feed in feeds:
                feeds.remove(feed)
            if not feeds:
                self._feeds.pop(run_id, None)

    # --- once-guards ----------------------------------------------------
    def claim_guard(self, run_id: str, key: str, token: str) -> str | None:
        with self._lock:
            guards = self._guards.setdefault(run_id, {})
            if key in guards:
                return guards[key]
            guards[key] = f"pending:{token}"
            return None

    def replace_guard(self, run_id: str, key: str, expected: str, state: str) -> bool:
        with self._lock:
            guards = self._guards.setdefault(run_id, {})
            if guards.get(key) != expected:
                return False
            guards[key] = state
            return True

    def finish_guard(self, run_id: str, key: str, token: str, done: bool) -> None:
        with self._lock:
            guards = self._guards.setdefault(run_id, {})
            if done:
                guards[key] = "done"
            elif guards.get(key) == f"pending:{token}":
                del guards[key]

    def get_guards(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._guards.get(run_id, {}))
