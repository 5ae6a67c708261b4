"""Records to Firestore documents and back: field paths, document ids, and user data Firestore cannot hold.

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
from enum import Enum
from typing import Any

from google.cloud import firestore
from google.cloud.firestore_v1.field_path import FieldPath

from haulage.jsonutil import dumps
from haulage.progress.models import Checkpoint, Cost, Event, RunRecord, RunStatus, StepCounts, now

#: fields a run's users fill with arbitrary JSON; they fall back to "<field>_json" text
USER_DATA = frozenset({"params", "result"})
_RESERVED_NAME = re.compile(r"__.*__")
_INT64 = (-(2**63), 2**63 - 1)
_MAX_DEPTH = 20  # Firestore nests maps and arrays at most 20 deep
_MAX_ID_BYTES = 1500
Doc = dict[str, Any]  # a document's fields, as the client reads and writes them


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
    if key not in USER_DATA and not storable(value):
        raise ValueError(
            f"RunUpdate.set[{key!r}]: a Firestore document cannot hold {value!r} "
            "(arrays in arrays, integers beyond 64 bits, empty or __reserved__ map keys)"
        )
    return value


def merge_history(stored: Iterable[Doc] | None, events: Sequence[Event], limit: int) -> list[Doc]:
    # Events buffered by several processes land out of order; keep the history
    # chronological (a stable sort leaves in-order appends as they are), newest `limit` of it.
    merged = [*(stored or []), *(e.to_dict() for e in events)]
    merged.sort(key=lambda e: float(e.get("at") or 0.0))
    return merged[-limit:]


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
    return float(stored["status_at"])


def encode_run(run: RunRecord, limit: int) -> Doc:
    """The fields of a new run document (its id is the document's)."""
    data = run.to_dict()
    data.pop("id")
    data["history"] = data["history"][-limit:]
    for name in USER_DATA:
        data.update(user_fields(name, data.pop(name), creating=True))
    data["status_at"] = now()
    data["updated_ts"] = firestore.SERVER_TIMESTAMP
    return data


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
        value = data.get(name)
        return None if value is None else float(value)

    return RunRecord(
        id=run_id,
        workflow=data.get("workflow", ""),
        status=RunStatus(data["status"]),
        percent=float(data.get("percent") or 0.0),
        message=data.get("message") or "",
        created_by=data.get("created_by"),
        tags=list(data.get("tags") or []),
        params=user_value(data, "params") or {},
        idempotency_key=data.get("idempotency_key"),
        params_hash=data.get("params_hash") or "",
        on_failure=data.get("on_failure") or "collect",
        history=[Event.from_dict(e) for e in data.get("history") or []],
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
        created_at=float(data.get("created_at") or 0.0),
        updated_at=float(data.get("updated_at") or 0.0),
        started_at=num("started_at"),
        finished_at=num("finished_at"),
    )


def encode_checkpoint(cp: Checkpoint) -> Doc:
    data = cp.to_dict()
    data.update(user_fields("value", data.pop("value"), creating=True))
    return data


def decode_checkpoint(data: Doc | None) -> Checkpoint:
    data = dict(data or {})
    data["value"] = user_value(data, "value")
    return Checkpoint.from_dict(data)
