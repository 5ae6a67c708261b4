"""Records to Firestore documents and back: field paths, document ids, times, and user data Firestore cannot hold.

Every time a client reads is a Firestore Timestamp (``created_at``, ``updated_at``,
``history[].at``, a step's ``started_at`` ...): the records keep float epoch
seconds, as the Redis store does, and are converted here, at the edge.

User data that a Firestore document cannot hold natively (arrays inside
arrays, integers beyond 64 bits, empty or reserved map keys) is stored as JSON
text in a ``<field>_json`` companion field; step and guard keys become
document ids with "/" and "%" percent-encoded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from google.cloud import firestore
from google.cloud.firestore_v1.field_path import FieldPath

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
    StageCounts,
    StageKind,
    StepCounts,
    StepRecord,
    now,
    stage_message,
    work_percent,
)

#: fields a run's users fill with arbitrary JSON; they fall back to "<field>_json" text
USER_DATA = frozenset({"params", "result"})
_RESERVED_NAME = re.compile(r"__.*__")
_INT64 = (-(2**63), 2**63 - 1)
_MAX_DEPTH = 20  # Firestore nests maps and arrays at most 20 deep
_MAX_ID_BYTES = 1500
Doc = dict[str, Any]  # a document's fields, as the client reads and writes them


#: run fields kept out of the document clients read, in the run's ``private/engine`` subdocument (the rules
#: refuse every read there): the parameters (large, and the run's input), engine bookkeeping, and the
#: heartbeat (it changes every few seconds while steps run; the document would change with it)
PRIVATE = frozenset({"params", "params_hash", "on_failure", "recoveries", "heartbeat"})

#: run fields holding a time: Timestamps in the document, epoch seconds in the record
RUN_TIMES = frozenset({"created_at", "updated_at", "started_at", "finished_at", "heartbeat", "status_at"})
#: the same for a step document
STEP_TIMES = frozenset({"updated_at", "retry_at", "started_at", "finished_at"})
_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


def to_timestamp(value: Any) -> Any:
    """Epoch seconds as the datetime the client stores as a Timestamp (None and datetimes pass through)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(float(value), tz=UTC)


def to_epoch(value: Any) -> float | None:
    """A Timestamp (or, in documents written before schema 1, a number) as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)


def storable(value: Any, depth: int = 0, in_array: bool = False) -> bool:
    """True if Firestore can hold ``value`` as a native value."""
    if value is None or isinstance(value, (bool, str, float)):
        return True
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return not in_array and all(storable(v, depth + 1, True) for v in value)
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and k and not _RESERVED_NAME.fullmatch(k) and storable(v, depth + 1)
            for k, v in value.items()
        )
    return False


def user_fields(name: str, value: Any, *, creating: bool) -> Doc:
    """``name`` natively when Firestore can hold it, else as JSON text in ``<name>_json``."""
    if storable(value):
        return {name: value} if creating else {name: value, f"{name}_json": firestore.DELETE_FIELD}
    return {name: None, f"{name}_json": dumps(value)}


def user_value(data: Doc, name: str) -> Any:
    text = data.get(f"{name}_json")
    return json.loads(text) if isinstance(text, str) else data.get(name)


def parts(key: str) -> tuple[str, ...]:
    """The field path of a RunUpdate key: "steps.done", "cost.<model>.usd" (model names may hold dots)."""
    if key.startswith("cost.") and "." in key[5:]:
        model, metric = key[5:].rsplit(".", 1)
        return ("cost", model, metric)
    return tuple(key.split("."))


def field_path(key: str) -> str:
    return str(FieldPath(*parts(key)).to_api_repr())


def overlaps(a: str, b: str) -> bool:
    """True if one key's path may lie beneath the other's: one write cannot touch both.

    A string test, cheap on the hot path of update_run; it is wider than the
    field paths ("cost.m" and "cost.m.x.usd" for model "m.x"), which only costs
    an extra write.
    """
    return b.startswith(a + ".") or a.startswith(b + ".")


def doc_id(key: str) -> str:
    """A document id for a step or guard key: Firestore ids cannot hold "/", be "." or "..", or match __.*__."""
    out = key.replace("%", "%25").replace("/", "%2F")
    if out in ("", ".", "..") or _RESERVED_NAME.fullmatch(out):
        out = "%" + out.encode().hex()  # "%" alone never starts an encoded key, so this cannot collide
    if len(out.encode()) > _MAX_ID_BYTES:
        out = out[:200] + "%" + hashlib.sha256(key.encode()).hexdigest()
    return out


def set_value(key: str, value: Any) -> Any:
    """The value to buffer for ``set[key]``: a copy (the caller may change its dict after update_run returns)."""
    if isinstance(value, Enum):
        value = value.value
    value = copy.deepcopy(value)
    if key in RUN_TIMES:
        return to_timestamp(value)
    if key not in USER_DATA and not storable(value) and not isinstance(value, datetime):
        raise ValueError(
            f"RunUpdate.set[{key!r}]: a Firestore document cannot hold {value!r} "
            "(arrays in arrays, integers beyond 64 bits, empty or __reserved__ map keys)"
        )
    return value


def event_doc(event: Event) -> Doc:
    data = event.to_dict()
    data["at"] = to_timestamp(data["at"])
    return data


def merge_history(stored: Iterable[Doc] | None, events: Sequence[Event], limit: int) -> list[Doc]:
    # Events buffered by several processes land out of order; keep the history
    # chronological (a stable sort leaves in-order appends as they are), newest `limit` of it.
    merged = [*(stored or []), *(event_doc(e) for e in events)]
    merged.sort(key=lambda e: to_epoch(e.get("at")) or 0.0)
    return merged[-limit:] if limit > 0 else merged


def failure_doc(entry: FailureEntry) -> Doc:
    data = entry.to_dict()
    data["at"] = to_timestamp(data["at"])
    data.update(user_fields("params", data.pop("params"), creating=True))
    return data


def merge_failures(stored: Iterable[Doc] | None, entries: Sequence[FailureEntry]) -> list[Doc]:
    """The run's failures list with ``entries`` appended: the first FAILURES_LIMIT are kept."""
    return [*(stored or []), *(failure_doc(e) for e in entries)][:FAILURES_LIMIT]


def stage_key(key: str) -> tuple[int, str] | None:
    """(index, field) of a "stages.<i>.<field>" update key; None for other keys."""
    if not key.startswith("stages."):
        return None
    index, _, name = key[7:].partition(".")
    return (int(index), name) if index.isdigit() and name else None


def apply_stages(stored: Any, sets: dict[str, Any], incr: dict[str, float],
                 maximum: dict[str, float]) -> list[Doc] | None:  # fmt: skip
    """The stages list after the "stages.<i>.<field>" changes; None when there are none.

    The list is written whole (array elements have no field paths): the writer
    reads it with the document and writes under a precondition on its update time.
    """
    changes = [(k, v, kind) for kind, table in (("set", sets), ("incr", incr), ("max", maximum))
               for k, v in table.items() if stage_key(k) is not None]  # fmt: skip
    if not changes:
        return None
    stages = [dict(s) for s in stored] if isinstance(stored, list) else []
    for key, value, kind in changes:
        index, name = stage_key(key) or (0, "")
        while len(stages) <= index:
            stages.append(StageCounts(name="").to_dict())
        cur = stages[index].get(name)
        if kind == "set":
            stages[index][name] = value
        elif kind == "incr":
            stages[index][name] = (cur or 0) + value
        else:
            stages[index][name] = value if cur is None else max(cur, value)
    return stages


def counted_message(stages: list[Doc], sets: dict[str, Any], incr: dict[str, float]) -> str | None:
    """The run's message when a fan-out stage's counts change and nothing set one (models.stage_message)."""
    if "message" in sets:
        return None
    message = None
    for key in sorted([*sets, *incr]):
        where = stage_key(key)
        if where is None or where[1] not in COUNT_FIELDS or where[0] >= len(stages):
            continue
        stage = StageCounts.from_dict(stages[where[0]])
        if stage.kind == StageKind.FAN_OUT.value:
            message = stage_message(stage)
    return message


def derived_percent(stored_percent: Any, stages: Any, wanted: float | None) -> float | None:
    """The percent to write: the highest of what is stored, what was asked for, and the work done."""
    candidates = [float(stored_percent or 0.0)]
    if wanted is not None:
        candidates.append(float(wanted))
    if isinstance(stages, list) and stages:
        candidates.append(work_percent([StageCounts.from_dict(s) for s in stages]))
    best = max(candidates)
    return best if best != float(stored_percent or 0.0) or wanted is not None else None


def ended(stored: Doc | None) -> bool:
    """True if the stored document is terminal: nothing but ``settled`` may change it."""
    return stored is not None and stored.get("status") in _TERMINAL_VALUES


def get_in(data: Doc, path: tuple[str, ...]) -> Any:
    cur: Any = data
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


def put_in(data: Doc, path: tuple[str, ...], value: Any) -> None:
    cur = data
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[path[-1]] = value


def status_at(stored: Doc | None) -> float | None:
    """When the stored status last changed (None if unknown): the barrier for stale buffered sets."""
    if stored is None or stored.get("status_at") is None:
        return None
    return to_epoch(stored["status_at"])


def encode_run(run: RunRecord, limit: int) -> Doc:
    """The fields of a new run document (its id is the document's)."""
    data = run.to_dict()
    data.pop("id")
    data["history"] = [event_doc(e) for e in run.history][-limit:] if limit > 0 else [event_doc(e) for e in run.history]
    data["failures"] = merge_failures([], run.failures)
    for name in USER_DATA:
        data.update(user_fields(name, data.pop(name), creating=True))
    data["status_at"] = now()
    for name in RUN_TIMES:
        data[name] = to_timestamp(data.get(name))
    data["updated_ts"] = firestore.SERVER_TIMESTAMP
    return data


def split_private(data: Doc) -> tuple[Doc, Doc]:
    """A new run's fields as (the document clients read, the private subdocument)."""
    public = {k: v for k, v in data.items() if k not in PRIVATE and k != "params_json"}
    private = {k: v for k, v in data.items() if k in PRIVATE or k == "params_json"}
    return public, private


def decode_run(run_id: str, data: Doc) -> RunRecord:
    """The run record a document's fields describe (missing fields take their defaults)."""
    counts = data.get("steps") or {}
    costs = {
        model: Cost(
            usd=float(c.get("usd") or 0.0),
            input_tokens=int(c.get("input_tokens") or 0),
            output_tokens=int(c.get("output_tokens") or 0),
            calls=int(c.get("calls") or 0),
        )
        for model, c in (data.get("cost") or {}).items()
        if isinstance(c, dict)
    }

    def num(name: str) -> float | None:
        return to_epoch(data.get(name))

    def history(e: Doc) -> Event:
        return Event.from_dict({**e, "at": to_epoch(e.get("at")) or 0.0})

    def failure(f: Doc) -> FailureEntry:
        params = user_value(f, "params") or {}
        return FailureEntry.from_dict({**f, "at": to_epoch(f.get("at")) or 0.0, "params": params})

    return RunRecord(
        id=run_id,
        workflow=data.get("workflow", ""),
        schema=int(data.get("schema") or 0),
        stages=[StageCounts.from_dict(st) for st in data.get("stages") or [] if isinstance(st, dict)],
        failures=[failure(f) for f in data.get("failures") or [] if isinstance(f, dict)],
        settled=bool(data.get("settled")),
        status=RunStatus(data["status"]),
        percent=float(data.get("percent") or 0.0),
        message=data.get("message") or "",
        created_by=data.get("created_by"),
        tags=list(data.get("tags") or []),
        params=user_value(data, "params") or {},
        idempotency_key=data.get("idempotency_key"),
        params_hash=data.get("params_hash") or "",
        on_failure=data.get("on_failure") or "collect",
        history=[history(e) for e in data.get("history") or []],
        cost=costs,
        steps=StepCounts(
            total=int(counts.get("total") or 0),
            done=int(counts.get("done") or 0),
            failed=int(counts.get("failed") or 0),
        ),
        result=user_value(data, "result"),
        error=data.get("error"),
        heartbeat=num("heartbeat"),
        recoveries=int(data.get("recoveries") or 0),
        created_at=num("created_at") or 0.0,
        updated_at=num("updated_at") or 0.0,
        started_at=num("started_at"),
        finished_at=num("finished_at"),
    )


def encode_step(step: StepRecord) -> Doc:
    """A step document: the record's fields, its times as Timestamps, its parameters user data."""
    data = step.to_dict()
    for name in STEP_TIMES:
        data[name] = to_timestamp(data.get(name))
    return data


def decode_step(data: Doc | None) -> StepRecord:
    data = dict(data or {})
    for name in STEP_TIMES:
        data[name] = to_epoch(data.get(name))
    if data.get("updated_at") is None:
        data.pop("updated_at", None)
    return StepRecord.from_dict(data)


def encode_checkpoint(cp: Checkpoint) -> Doc:
    data = cp.to_dict()
    data.update(user_fields("value", data.pop("value"), creating=True))
    return data


def decode_checkpoint(data: Doc | None) -> Checkpoint:
    data = dict(data or {})
    data["value"] = user_value(data, "value")
    return Checkpoint.from_dict(data)
