"""The Firestore backend of the Store: the production store.

Environment variables read here (see :meth:`FirestoreStore.from_settings`):

- ``HAULAGE_FIRESTORE_PROJECT``: the Google Cloud project; default ``GOOGLE_CLOUD_PROJECT``, else "haulage-dev".
- ``GOOGLE_CLOUD_PROJECT``: the fallback for the project above.
- ``HAULAGE_FIRESTORE_COLLECTION``: the collection of run documents; default "tasks".
- ``HAULAGE_FIRESTORE_DATABASE``: the Firestore database id; default "(default)".
- ``HAULAGE_FIRESTORE_COALESCE_SECONDS``: seconds between coalesced writes to one run document; default 1.0.

Read elsewhere but relevant: ``HAULAGE_HISTORY_LIMIT`` (events kept per run, via
``haulage.settings``) and ``FIRESTORE_EMULATOR_HOST`` (honoured by the client itself).

Layout: one document per run in the collection (id = run id) with the fields
of :class:`~haulage.progress.models.RunRecord`: ``steps.{total,done,failed}`` and
``cost.<model>.{usd,input_tokens,output_tokens,calls}`` as nested maps updated
with ``Increment``, ``history`` as a list of maps, ``updated_ts`` as a server
timestamp next to the float epoch fields, and ``status_at`` (when the status
last changed). Steps, checkpoints and guards live in the subcollections
``steps``, ``checkpoints`` and ``guards`` (document id = key, with "/" and "%"
percent-encoded). User data that a Firestore document cannot hold natively
(arrays inside arrays, integers beyond 64 bits, empty or reserved map keys) is
stored as JSON text in a ``<field>_json`` companion field.

Write coalescing: Firestore sustains about one write per second per document,
while a fan-out reports progress, cost and completions many times a second.
``update_run`` (and the run part of ``start_step``/``complete_step``) only
merges the change into a per-run buffer in memory; a background thread writes
each buffer at most once per ``HAULAGE_FIRESTORE_COALESCE_SECONDS``. The pace is
kept across processes too: a flush reads the document's ``update_time`` and
writes with it as a precondition no sooner than one interval after it, so all
workers together stay near one coalesced write per interval. Status
transitions, a step completion that ends a stage, ``flush()``/``close()`` and
process exit (atexit, and Celery's ``worker_process_shutdown`` for prefork
children, which skip atexit) write at once. ``get_run`` shows this process's
pending changes (read your writes).

What readers in other processes see: a terminal status at once, but counters
and cost buffered by other workers up to about one interval later (a run may
read COMPLETE with steps.done still catching up). A status change is a barrier
for buffered ``set`` fields: one asked for before it is dropped rather than
written over what the transition set. A change buffered by a process that is
killed (SIGKILL) is lost: counters may stay short, checkpoints never do.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1 import transforms
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath

from haulage.errors import ConfigError, StoreConflict
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

log = logging.getLogger("haulage.progress.firestore")

DEFAULT_COLLECTION = "tasks"
DEFAULT_DATABASE = "(default)"
DEFAULT_PROJECT = "haulage-dev"
DEFAULT_COALESCE_SECONDS = 1.0  #: seconds between coalesced writes to one run document

STEPS, CHECKPOINTS, GUARDS = "steps", "checkpoints", "guards"

#: attempts of a conditional write (transition, guard release) before giving up
MAX_ATTEMPTS = 25
#: seconds an idle per-run buffer is kept before it is forgotten
IDLE_SECONDS = 60.0

# Fields a run's users fill with arbitrary JSON; they fall back to "<field>_json" text.
_USER_DATA = frozenset({"params", "result"})
_RESERVED_NAME = re.compile(r"__.*__")
_INT64 = (-(2**63), 2**63 - 1)
_MAX_DEPTH = 20  # Firestore nests maps and arrays at most 20 deep
_MAX_ID_BYTES = 1500
_CONFLICTS = (gexc.FailedPrecondition, gexc.Aborted)  # a precondition on update_time did not hold
_Doc = dict[str, Any]  # a document's fields, as the client reads and writes them


# --- encoding -----------------------------------------------------------------------------------
def _storable(value: Any, depth: int = 0, in_array: bool = False) -> bool:
    """True if Firestore can hold ``value`` as a native value."""
    if value is None or isinstance(value, (bool, str, float)):
        return True
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return not in_array and all(_storable(v, depth + 1, True) for v in value)
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and k and not _RESERVED_NAME.fullmatch(k) and _storable(v, depth + 1)
            for k, v in value.items()
        )
    return False


def _user_fields(name: str, value: Any, *, creating: bool) -> dict[str, Any]:
    """``name`` natively when Firestore can hold it, else as JSON text in ``<name>_json``."""
    if _storable(value):
        return {name: value} if creating else {name: value, f"{name}_json": firestore.DELETE_FIELD}
    return {name: None, f"{name}_json": dumps(value)}


def _user_value(data: dict[str, Any], name: str) -> Any:
    text = data.get(f"{name}_json")
    return json.loads(text) if isinstance(text, str) else data.get(name)


def _parts(key: str) -> tuple[str, ...]:
    """The field path of a RunUpdate key: "steps.done", "cost.<model>.usd" (model names may hold dots)."""
    if key.startswith("cost.") and "." in key[5:]:
        model, metric = key[5:].rsplit(".", 1)
        return ("cost", model, metric)
    return tuple(key.split("."))


def _path(key: str) -> str:
    return str(FieldPath(*_parts(key)).to_api_repr())


def _overlaps(a: str, b: str) -> bool:
    """True if one key's path may lie beneath the other's: one write cannot touch both.

    A string test, cheap on the hot path of update_run; it is wider than the
    field paths ("cost.m" and "cost.m.x.usd" for model "m.x"), which only costs
    an extra write.
    """
    return b.startswith(a + ".") or a.startswith(b + ".")


def _doc_id(key: str) -> str:
    """A document id for a step or guard key: Firestore ids cannot hold "/", be "." or "..", or match __.*__."""
    out = key.replace("%", "%25").replace("/", "%2F")
    if out in ("", ".", "..") or _RESERVED_NAME.fullmatch(out):
        out = "%" + out.encode().hex()  # "%" alone never starts an encoded key, so this cannot collide
    if len(out.encode()) > _MAX_ID_BYTES:
        out = out[:200] + "%" + hashlib.sha256(key.encode()).hexdigest()
    return out


def _set_value(key: str, value: Any) -> Any:
    """The value to buffer for ``set[key]``: a copy (the caller may change its dict after update_run returns)."""
    if isinstance(value, Enum):
        value = value.value
    value = copy.deepcopy(value)
    if key not in _USER_DATA and not _storable(value):
        raise ValueError(
            f"RunUpdate.set[{key!r}]: a Firestore document cannot hold {value!r} "
            "(arrays in arrays, integers beyond 64 bits, empty or __reserved__ map keys)"
        )
    return value


def _merge_history(stored: Iterable[_Doc] | None, events: Sequence[Event], limit: int) -> list[_Doc]:
    # Events buffered by several processes land out of order; keep the history
    # chronological (a stable sort leaves in-order appends as they are), newest `limit` of it.
    merged = [*(stored or []), *(e.to_dict() for e in events)]
    merged.sort(key=lambda e: float(e.get("at") or 0.0))
    return merged[-limit:]


def _get_in(data: dict[str, Any], parts: tuple[str, ...]) -> Any:
    cur: Any = data
    for p in parts:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


def _put_in(data: dict[str, Any], parts: tuple[str, ...], value: Any) -> None:
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[parts[-1]] = value


# --- the per-run buffer ---------------------------------------------------------------------------
class _Incompatible(Exception):
    """A change cannot join a buffered one in a single write (a field and one beneath it, or two transforms)."""


@dataclass
class _Pending:
    """Changes to one run document not yet written, merged so that one write applies them in call order.

    Each field appears in only one of ``set``/``incr``/``maximum``: a later
    ``set`` replaces an earlier increment; an increment after a ``set`` is
    folded into the value. (``RunUpdate.merge`` would apply an older increment
    on top of a newer set.)
    """

    set: dict[str, Any] = field(default_factory=dict)
    set_at: dict[str, float] = field(default_factory=dict)  #: wall time each set was asked for
    incr: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    last_at: float = 0.0

    def add(self, update: RunUpdate, at: float, set_at: float | None = None) -> None:
        """Fold ``update`` (newer than everything here) in; on _Incompatible or ValueError nothing changes."""
        touched = [*update.set, *update.incr, *update.maximum]
        mine = [*self.set, *self.incr, *self.maximum]
        if (
            any(_overlaps(a, b) for a in touched for b in [*mine, *touched])
            or any(k in self.maximum or k in update.maximum for k in update.incr)
            or any(k in self.incr for k in update.maximum)
        ):
            raise _Incompatible
        values = {k: _set_value(k, v) for k, v in update.set.items()}
        for k, v in values.items():
            self.incr.pop(k, None)
            self.maximum.pop(k, None)
            self.set[k] = v
            self.set_at[k] = at if set_at is None else set_at
        for k, d in update.incr.items():
            if k in self.set:
                self.set[k] = (self.set[k] or 0) + d
            else:
                self.incr[k] = self.incr.get(k, 0) + d
        for k, m in update.maximum.items():
            if k in self.set:
                self.set[k] = m if self.set[k] is None else max(self.set[k], m)
            else:
                self.maximum[k] = max(self.maximum.get(k, m), m)
        self.events.extend(update.events)
        self.last_at = max(self.last_at, at)

    def then(self, newer: _Pending) -> None:
        """Fold a later buffer in, keeping when each of its sets was asked for; raises _Incompatible."""
        self.add(RunUpdate(set=dict(newer.set), incr=dict(newer.incr), maximum=dict(newer.maximum),
                           events=list(newer.events)), newer.last_at)  # fmt: skip
        self.set_at.update({k: newer.set_at.get(k, newer.last_at) for k in newer.set})

    def copy(self) -> _Pending:
        out = _Pending()
        out.then(self)
        return out

    def __bool__(self) -> bool:
        return bool(self.set or self.incr or self.maximum or self.events)

    def live_sets(self, status_at: float | None) -> dict[str, Any]:
        # A status change is a barrier: a set asked for before it (say a step's
        # message, buffered by another worker while the run completed) must not
        # land after it and overwrite what the transition wrote.
        if status_at is None:
            return dict(self.set)
        return {k: v for k, v in self.set.items() if self.set_at.get(k, math.inf) >= status_at}

    def fields(self, stored: dict[str, Any] | None, limit: int) -> dict[str, Any]:
        """The update() map for this buffer; ``stored`` is what was read for the write (None if nothing was)."""
        out: dict[str, Any] = {}
        for k, v in self.live_sets(_status_at(stored)).items():
            if k in _USER_DATA:
                out.update(_user_fields(k, v, creating=False))
            else:
                out[_path(k)] = v
        for k, d in self.incr.items():
            out[_path(k)] = firestore.Increment(d)
        for k, m in self.maximum.items():
            out[_path(k)] = transforms.Maximum(m)
        if self.events:
            out["history"] = _merge_history((stored or {}).get("history"), self.events, limit)
        out["updated_at"] = now()
        out["updated_ts"] = firestore.SERVER_TIMESTAMP
        return out

    def overlay(self, data: dict[str, Any], limit: int) -> None:
        """Apply this buffer to a document's data as its write would (read your writes)."""
        for k, v in self.live_sets(_status_at(data)).items():
            _put_in(data, _parts(k), copy.deepcopy(v))  # later segments change the view, never the buffer
            if k in _USER_DATA:
                data.pop(f"{k}_json", None)
        for k, d in self.incr.items():
            _put_in(data, _parts(k), (_get_in(data, _parts(k)) or 0) + d)
        for k, m in self.maximum.items():
            cur = _get_in(data, _parts(k))
            _put_in(data, _parts(k), m if cur is None else max(cur, m))
        if self.events:
            data["history"] = _merge_history(data.get("history"), self.events, limit)
        data["updated_at"] = max(float(data.get("updated_at") or 0.0), self.last_at)


def _status_at(stored: dict[str, Any] | None) -> float | None:
    if stored is None or stored.get("status_at") is None:
        return None
    return float(stored["status_at"])


def _append(queue: list[_Pending], update: RunUpdate, at: float) -> None:
    """Buffer ``update`` after ``queue``: into its last segment when one write can hold both, else a new one."""
    if queue:
        try:
            queue[-1].add(update, at)
            return
        except _Incompatible:
            pass
    segment = _Pending()
    try:
        segment.add(update, at)
    except _Incompatible:
        if sum(1 for kind in (update.set, update.incr, update.maximum) if kind) <= 1:
            raise ValueError(
                "RunUpdate changes a field and a field beneath it at once "
                f"({sorted([*update.set, *update.incr, *update.maximum])}); split it into two updates"
            ) from None
        # In the order the Redis backend applies one update: sets, increments, maxima (and events).
        parts = [RunUpdate(set=dict(update.set)), RunUpdate(incr=dict(update.incr)),
                 RunUpdate(maximum=dict(update.maximum), events=list(update.events))]  # fmt: skip
        for part in parts:
            if part:
                _append(queue, part, at)
        return
    queue.append(segment)


@dataclass
class _RunState:
    """This process's bookkeeping for one run document."""

    io: threading.Lock = field(default_factory=threading.Lock)  #: held across a read-and-write of the document
    queue: list[_Pending] = field(default_factory=list)  #: buffered changes, one write per segment (usually one)
    due: float = 0.0  #: monotonic time before which no coalesced write is sent
    failures: int = 0
    used: float = field(default_factory=time.monotonic)


# --- the store ------------------------------------------------------------------------------------
class _SnapshotFeed:
    """A snapshot listener on the run document; its callback runs on the client's thread."""

    def __init__(self, ref: Any) -> None:
        self.changed = threading.Event()
        self.watch = ref.on_snapshot(lambda *_: self.changed.set())

    def wait(self, timeout: float) -> bool:
        fired = self.changed.wait(timeout)
        self.changed.clear()
        return fired

    def close(self) -> None:
        self.watch.unsubscribe()


class FirestoreStore:
    """Store backend on Firestore; see :class:`haulage.progress.store.Store` for the contract.

    Example::

        store = FirestoreStore(project="my-project", collection="tasks")
        store.update_run(run_id, RunUpdate(incr={"steps.done": 1}))  # buffered, written within a second
        store.close()  # writes what is buffered

    ``writes[run_id]`` counts the writes this instance made to each run
    document; ``conflicts[run_id]`` the commits a precondition refused (they
    wrote nothing and were retried). Both forget a run IDLE_SECONDS after this
    process last touched it.
    """

    def __init__(
        self,
        *,
        project: str = DEFAULT_PROJECT,
        collection: str = DEFAULT_COLLECTION,
        database: str = DEFAULT_DATABASE,
        coalesce_seconds: float = DEFAULT_COALESCE_SECONDS,
        client: firestore.Client | None = None,
    ) -> None:
        if not (coalesce_seconds >= 0 and math.isfinite(coalesce_seconds)):
            raise ConfigError(f"coalesce_seconds must be a finite number at least 0, got {coalesce_seconds!r}")
        self.project = project
        self.collection_name = collection
        self.database = database
        self.interval = coalesce_seconds  #: seconds
        #: other workers' buffered counters land within about two intervals
        self.settle_seconds = 2 * coalesce_seconds + 1.0
        self.writes: Counter[str] = Counter()
        self.conflicts: Counter[str] = Counter()
        self._given_client = client
        self._closed = False
        self._reset_process_state()
        _at_exit(self)

    @classmethod
    def from_settings(cls) -> FirestoreStore:
        """A store configured from the environment (HAULAGE_FIRESTORE_*; see the module docstring)."""
        project = (
            os.environ.get("HAULAGE_FIRESTORE_PROJECT", "").strip()
            or os.environ.get("GOOGLE_CLOUD_PROJECT", "").strip()
            or DEFAULT_PROJECT
        )
        collection = os.environ.get("HAULAGE_FIRESTORE_COLLECTION", "").strip() or DEFAULT_COLLECTION
        if "/" in collection:
            raise ConfigError(f"HAULAGE_FIRESTORE_COLLECTION must be a collection id without '/', got {collection!r}")
        database = os.environ.get("HAULAGE_FIRESTORE_DATABASE", "").strip() or DEFAULT_DATABASE
        raw = os.environ.get("HAULAGE_FIRESTORE_COALESCE_SECONDS", "").strip()
        try:
            interval = float(raw) if raw else DEFAULT_COALESCE_SECONDS
        except ValueError:
            raise ConfigError(f"HAULAGE_FIRESTORE_COALESCE_SECONDS must be a number of seconds, got {raw!r}") from None
        if not (interval >= 0 and math.isfinite(interval)):
            raise ConfigError(f"HAULAGE_FIRESTORE_COALESCE_SECONDS must be a finite number at least 0, got {raw!r}")
        return cls(project=project, collection=collection, database=database, coalesce_seconds=interval)

    # --- process state ---------------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        # gRPC channels and threads do not survive fork: a Celery prefork child
        # builds its own client and flusher, and leaves the parent's buffer to the parent.
        self._pid = os.getpid()
        self._client: firestore.Client | None = self._given_client
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._runs: dict[str, _RunState] = {}
        self._thread: threading.Thread | None = None

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._given_client = None
            self._reset_process_state()

    @property
    def db(self) -> firestore.Client:
        self._check_fork()
        if self._client is None:
            self._client = firestore.Client(project=self.project, database=self.database)
        return self._client

    def _runs_ref(self) -> Any:
        return self.db.collection(self.collection_name)

    def _run_ref(self, run_id: str) -> Any:
        return self._runs_ref().document(run_id)

    def _sub_ref(self, run_id: str, sub: str, key: str) -> Any:
        return self._run_ref(run_id).collection(sub).document(_doc_id(key))

    @property
    def _limit(self) -> int:
        return get_settings().history_limit

    def _state(self, run_id: str) -> _RunState:
        with self._lock:
            st = self._runs.get(run_id)
            if st is None:
                st = self._runs[run_id] = _RunState()
            st.used = time.monotonic()
            return st

    def _count(self, run_id: str, *, applied: bool = True) -> None:
        with self._lock:
            (self.writes if applied else self.conflicts)[run_id] += 1

    # --- runs -----------------------------------------------------------------------------------
    def create_run(self, run: RunRecord) -> RunRecord | None:
        data = run.to_dict()
        data.pop("id")
        data["history"] = data["history"][-self._limit :]
        for name in _USER_DATA:
            data.update(_user_fields(name, data.pop(name), creating=True))
        data["status_at"] = now()
        data["updated_ts"] = firestore.SERVER_TIMESTAMP
        try:
            self._run_ref(run.id).create(data)
        except gexc.AlreadyExists:
            return self.get_run(run.id)
        self._count(run.id)
        self._state(run.id).due = time.monotonic() + self.interval
        return None

    def watch_changes(self, run_id: str) -> _SnapshotFeed:
        return _SnapshotFeed(self._run_ref(run_id))

    def get_run(self, run_id: str) -> RunRecord | None:
        self._check_fork()
        with self._lock:
            st = self._runs.get(run_id)
        if st is None:
            return self._decode_run(self._run_ref(run_id).get(), [])
        # Under the run's io lock no write of ours is in flight, so the document
        # plus what is buffered is exactly what this process has asked for.
        with st.io:
            snap = self._run_ref(run_id).get()
            with self._lock:
                queue = list(st.queue)
            return self._decode_run(snap, queue)

    def _decode_run(self, snap: Any, queue: list[_Pending]) -> RunRecord | None:
        if not snap.exists:
            return None
        data: dict[str, Any] = snap.to_dict() or {}
        for segment in queue:
            segment.overlay(data, self._limit)
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
            id=snap.id,
            workflow=data.get("workflow", ""),
            status=RunStatus(data["status"]),
            percent=float(data.get("percent") or 0.0),
            message=data.get("message") or "",
            created_by=data.get("created_by"),
            tags=list(data.get("tags") or []),
            params=_user_value(data, "params") or {},
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
            result=_user_value(data, "result"),
            error=data.get("error"),
            heartbeat=num("heartbeat"),
            recoveries=int(data.get("recoveries") or 0),
            created_at=float(data.get("created_at") or 0.0),
            updated_at=float(data.get("updated_at") or 0.0),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
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
        # Equality filters ordered by created_at need composite indexes in
        # production (one per combination used); the emulator needs none.
        query = self._runs_ref()
        filters = {"workflow": workflow, "status": None if status is None else RunStatus(status).value,
                   "created_by": created_by}  # fmt: skip
        for name, value in filters.items():
            if value is not None:
                query = query.where(filter=FieldFilter(name, "==", value))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING)
        if offset:
            query = query.offset(offset)
        out = []
        for snap in query.limit(limit).stream():
            # No io lock here: a write in flight may be missing from a listing
            # for a moment, but is never counted twice (it left the buffer first).
            with self._lock:
                st = self._runs.get(snap.id)
                queue = list(st.queue) if st is not None else []
            record = self._decode_run(snap, queue)
            if record is not None:
                out.append(record)
        return out

    def update_run(self, run_id: str, update: RunUpdate) -> None:
        if not update:
            return
        self._check_fork()
        if "status" in update.set:
            update = RunUpdate(set={**update.set, "status_at": now()}, incr=update.incr, maximum=update.maximum,
                               events=update.events)  # fmt: skip
        st = self._state(run_id)
        with self._lock:
            fresh = not st.queue
            _append(st.queue, update, now())
            if fresh:
                st.due = max(st.due, time.monotonic())
                self._wake.notify()
        if "status" in update.set or self._closed:
            self._flush_run(run_id, paced=False)  # a status is never left waiting; nor is anything after close()
        else:
            self._ensure_thread()

    def transition(
        self,
        run_id: str,
        to: RunStatus,
        *,
        allowed_from: Collection[RunStatus],
        update: RunUpdate | None = None,
    ) -> bool:
        self._check_fork()
        allowed = {RunStatus(s).value for s in allowed_from}
        change = RunUpdate()
        if update is not None:
            change = RunUpdate(set=dict(update.set), incr=dict(update.incr), maximum=dict(update.maximum),
                               events=list(update.events))  # fmt: skip
        change.set.update({"status": RunStatus(to).value, "status_at": now()})
        ref = self._run_ref(run_id)
        # Most calls find the condition false (every item of a stage-0 fan-out
        # marks the run PROCESSING): one small read, no lock, no write. A status
        # is never buffered, so the stored one is the one to test.
        head = ref.get(field_paths=["status"])
        if not head.exists or (head.to_dict() or {}).get("status") not in allowed:
            return False
        st = self._state(run_id)
        with st.io:
            for attempt in range(MAX_ATTEMPTS):
                snap = ref.get(field_paths=_READ_FOR_WRITE)
                if not snap.exists or (snap.to_dict() or {}).get("status") not in allowed:
                    return False
                # What this process buffered goes out in the same write, before the
                # transition's own fields (which are never stale: set_at=inf).
                write = _Pending()
                with self._lock:
                    taken = st.queue.pop(0) if st.queue else None
                try:
                    if taken is not None:
                        if st.queue:
                            raise _Incompatible  # more than one segment: the older ones go first
                        write.then(taken)
                    write.add(change, now(), set_at=math.inf)
                except _Incompatible:
                    self._restore(st, taken)
                    self._write_segment(run_id, st, paced=False)
                    continue
                except BaseException:
                    self._restore(st, taken)
                    raise
                try:
                    ref.update(write.fields(snap.to_dict(), self._limit),
                               option=self.db.write_option(last_update_time=snap.update_time))  # fmt: skip
                except _CONFLICTS:
                    self._count(run_id, applied=False)
                    self._restore(st, taken)
                    time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
                    continue
                except BaseException:
                    self._restore(st, taken)
                    raise
                self._count(run_id)
                st.due = time.monotonic() + self.interval
                return True
        raise StoreConflict(
            f"transition of run {run_id} to {RunStatus(to).value}: the run document changed under "
            f"{MAX_ATTEMPTS} attempts in a row; is something writing it without coalescing?"
        )

    def _restore(self, st: _RunState, taken: _Pending | None) -> None:
        """Put a segment whose write failed back in front of what was buffered since."""
        if not taken:
            return
        with self._lock:
            if st.queue:
                try:
                    joined = taken.copy()
                    joined.then(st.queue[0])
                    st.queue[0] = joined
                    return
                except _Incompatible:
                    pass
            st.queue.insert(0, taken)

    def delete_run(self, run_id: str) -> None:
        self._check_fork()
        st = self._state(run_id)
        with st.io:
            with self._lock:
                # The buffer describes a document that is going away: drop it rather
                # than write it first (and it cannot land after: update() needs the document).
                st.queue.clear()
            ref = self._run_ref(run_id)
            # The run document goes last, so a delete cut short is finished by calling it again.
            for sub in (STEPS, CHECKPOINTS, GUARDS):
                self._delete_collection(ref.collection(sub))
            ref.delete()
            self._count(run_id)
        with self._lock:
            self._runs.pop(run_id, None)

    def _delete_collection(self, coll: Any) -> None:
        while True:
            docs = list(coll.list_documents(page_size=500))
            if not docs:
                return
            batch = self.db.batch()
            for doc in docs:
                batch.delete(doc)
            batch.commit()

    # --- steps ----------------------------------------------------------------------------------
    def get_step(self, run_id: str, step_key: str) -> StepRecord | None:
        snap = self._sub_ref(run_id, STEPS, step_key).get()
        return StepRecord.from_dict(snap.to_dict()) if snap.exists else None

    def put_step(self, run_id: str, step: StepRecord) -> None:
        self._sub_ref(run_id, STEPS, step.key).set(step.to_dict())

    def list_steps(self, run_id: str) -> list[StepRecord]:
        steps = (StepRecord.from_dict(s.to_dict()) for s in self._run_ref(run_id).collection(STEPS).stream())
        return sorted(steps, key=lambda s: s.key)

    def start_step(self, run_id: str, step: StepRecord, update: RunUpdate) -> Checkpoint | None:
        cp_ref = self._sub_ref(run_id, CHECKPOINTS, step.key)
        for _ in range(3):
            batch = self.db.batch()
            # A delete that must find no document is a "no checkpoint yet" check:
            # when one exists it fails the whole batch, the step write with it.
            batch.delete(cp_ref, option=self.db.write_option(exists=False))
            batch.set(self._sub_ref(run_id, STEPS, step.key), step.to_dict())
            try:
                batch.commit()
            except (gexc.AlreadyExists, gexc.FailedPrecondition):
                existing = cp_ref.get()
                if existing.exists:
                    return _decode_checkpoint(existing.to_dict())
                continue  # deleted with its run meanwhile: look again
            # The run's part is buffered: a fan-out starts many steps a second.
            self.update_run(run_id, update)
            return None
        raise StoreConflict(f"start_step {step.key!r} of run {run_id}: its checkpoint kept appearing and vanishing")

    def load_step_state(self, run_id: str, step_keys: Sequence[str]) -> tuple[RunStatus | None, dict[str, Checkpoint]]:
        run_ref = self._run_ref(run_id)
        refs = [run_ref, *(self._sub_ref(run_id, CHECKPOINTS, k) for k in dict.fromkeys(step_keys))]
        status: RunStatus | None = None
        found: dict[str, Checkpoint] = {}
        # One BatchGetDocuments call: the documents are read at one point in time.
        for snap in self.db.get_all(refs):
            if not snap.exists:
                continue
            if snap.reference.path == run_ref.path:
                status = RunStatus((snap.to_dict() or {})["status"])
            else:
                cp = _decode_checkpoint(snap.to_dict())
                found[cp.step_key] = cp
        return status, {k: found[k] for k in step_keys if k in found}

    # --- checkpoints ----------------------------------------------------------------------------
    def get_checkpoints(self, run_id: str, step_keys: Sequence[str]) -> dict[str, Checkpoint]:
        if not step_keys:
            return {}
        refs = [self._sub_ref(run_id, CHECKPOINTS, k) for k in dict.fromkeys(step_keys)]
        found = {}
        for snap in self.db.get_all(refs):
            if snap.exists:
                cp = _decode_checkpoint(snap.to_dict())
                found[cp.step_key] = cp
        return {k: found[k] for k in step_keys if k in found}

    def put_checkpoint(self, run_id: str, checkpoint: Checkpoint) -> bool:
        try:
            self._sub_ref(run_id, CHECKPOINTS, checkpoint.step_key).create(_encode_checkpoint(checkpoint))
        except gexc.AlreadyExists:
            return False
        return True

    def complete_step(self, run_id: str, checkpoint: Checkpoint, step: StepRecord, update: RunUpdate) -> Checkpoint:
        cp_ref = self._sub_ref(run_id, CHECKPOINTS, checkpoint.step_key)
        batch = self.db.batch()
        # create() fails the whole batch when a checkpoint exists: the first one
        # stands and the step record is left as it was.
        batch.create(cp_ref, _encode_checkpoint(checkpoint))
        batch.set(self._sub_ref(run_id, STEPS, step.key), step.to_dict())
        try:
            batch.commit()
        except gexc.AlreadyExists:
            existing = cp_ref.get()
            if existing.exists:
                return _decode_checkpoint(existing.to_dict())
            raise
        # The run's part is buffered like any update (a fan-out item's counters),
        # unless it ends a stage: users watch for that, so it is written now.
        self.update_run(run_id, update)
        if _ends_stage(update):
            self._flush_run(run_id, paced=False)
        return checkpoint

    # --- once-guards ----------------------------------------------------------------------------
    def claim_guard(self, run_id: str, key: str, token: str) -> str | None:
        ref = self._sub_ref(run_id, GUARDS, key)
        for _ in range(MAX_ATTEMPTS):
            try:
                ref.create({"key": key, "state": f"pending:{token}"})
                return None
            except gexc.AlreadyExists:
                snap = ref.get()
                if snap.exists:
                    return str((snap.to_dict() or {}).get("state"))
                # released between our create and our read: claim it again
        raise StoreConflict(f"guard {key!r} of run {run_id} kept being claimed and released")

    def finish_guard(self, run_id: str, key: str, token: str, done: bool) -> None:
        ref = self._sub_ref(run_id, GUARDS, key)
        if done:
            ref.set({"key": key, "state": "done"})
            return
        for _ in range(MAX_ATTEMPTS):
            snap = ref.get()
            if not snap.exists or (snap.to_dict() or {}).get("state") != f"pending:{token}":
                return  # not held by this token (any more): leave it
            try:
                # Release only the claim we read: a precondition on its update_time
                # is the compare in compare-and-delete.
                ref.delete(option=self.db.write_option(last_update_time=snap.update_time))
                return
            except _CONFLICTS:
                continue
        raise StoreConflict(f"guard {key!r} of run {run_id} kept changing while being released")

    def get_guards(self, run_id: str) -> dict[str, Any]:
        out = {}
        for snap in self._run_ref(run_id).collection(GUARDS).stream():
            data = snap.to_dict() or {}
            out[data.get("key", snap.id)] = data.get("state")
        return out

    # --- coalescing -----------------------------------------------------------------------------
    def flush(self, run_id: str | None = None) -> None:
        """Write what is buffered now (for one run, or every run), without waiting for the interval."""
        self._check_fork()
        with self._lock:
            ids = [run_id] if run_id is not None else [r for r, st in self._runs.items() if st.queue]
        for rid in ids:
            self._flush_run(rid, paced=False)

    def buffered(self, run_id: str) -> bool:
        """True while changes to the run wait in this process's buffer (tests wait on it going False)."""
        self._check_fork()
        with self._lock:
            st = self._runs.get(run_id)
            return bool(st is not None and st.queue)

    def close(self) -> None:
        """Write what is buffered and stop the background writer; later updates are written at once."""
        self._check_fork()
        self._closed = True
        with self._lock:
            self._wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)
        self.flush()
        with self._lock:
            left = [r for r, st in self._runs.items() if st.queue]
        if left:
            log.warning("closed with changes to %d run(s) still unwritten (Firestore unreachable?): %s",
                        len(left), ", ".join(left[:10]))  # fmt: skip

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._flusher, name="haulage-firestore-flush", daemon=True)
                self._thread.start()

    def _flusher(self) -> None:
        """Write each run's buffer when its interval allows; forget runs idle for IDLE_SECONDS."""
        while not self._closed:
            with self._lock:
                mono = time.monotonic()
                due = [r for r, st in self._runs.items() if st.queue and st.due <= mono]
                if not due:
                    idle = [r for r, st in self._runs.items()
                            if not st.queue and mono - st.used > IDLE_SECONDS and not st.io.locked()]  # fmt: skip
                    for r in idle:  # a long-lived worker sees millions of runs: keep only live ones
                        del self._runs[r]
                        self.writes.pop(r, None)
                        self.conflicts.pop(r, None)
                    waits = [st.due - mono for st in self._runs.values() if st.queue]
                    self._wake.wait(min(waits) if waits else IDLE_SECONDS)
                    continue
            for rid in due:
                try:
                    self._flush_run(rid, paced=True)
                except Exception as exc:  # the writer must outlive any one run's failure (say, no credentials)
                    log.exception("coalesced write of run %s failed", rid)
                    with self._lock:
                        st = self._runs.get(rid)
                    if st is not None:
                        self._backoff(rid, st, exc)

    def _flush_run(self, run_id: str, *, paced: bool) -> None:
        """Write the run's buffer: one paced segment, or (not paced) all of it now."""
        with self._lock:
            st = self._runs.get(run_id)
        if st is None:
            return
        with st.io:
            if paced:
                self._write_segment(run_id, st, paced=True)
                return
            for _ in range(MAX_ATTEMPTS):
                if not st.queue or not self._write_segment(run_id, st, paced=False):
                    return

    def _write_segment(self, run_id: str, st: _RunState, *, paced: bool) -> bool:
        """Write the first buffered segment (the caller holds ``st.io``); False if it should not be retried now.

        A paced write goes no sooner than one interval after the document's last
        write by any process (its update_time, then a precondition on it), so all
        workers together keep to about one coalesced write per interval.
        """
        ref = self._run_ref(run_id)
        with self._lock:
            peek = st.queue[0] if st.queue else None
        if not peek:
            with self._lock:
                if st.queue and not st.queue[0]:
                    st.queue.pop(0)
            return bool(st.queue)
        snap = None
        try:
            if paced or peek.events or peek.set:
                snap = ref.get(field_paths=_READ_FOR_WRITE)
                if not snap.exists:
                    self._drop(run_id, st)
                    return False
                wait = snap.update_time.timestamp() + self.interval - time.time()
                if paced and wait > 0:
                    # min(): a clock far behind Firestore's must not stall the run.
                    st.due = time.monotonic() + min(wait, self.interval) + random.uniform(0, self.interval / 10)
                    return False
            with self._lock:
                taken = st.queue.pop(0) if st.queue else None
            if not taken:
                return False
            if snap is None and (taken.events or taken.set):
                self._restore(st, taken)  # it grew sets or events since the peek: they need the read
                return True
        except gexc.GoogleAPIError as exc:
            self._backoff(run_id, st, exc)
            return False
        try:
            if snap is None:
                # Increments and maxima commute: no read, no precondition.
                ref.update(taken.fields(None, self._limit))
            else:
                option = self.db.write_option(last_update_time=snap.update_time)
                ref.update(taken.fields(snap.to_dict(), self._limit), option=option)
        except _CONFLICTS:
            self._count(run_id, applied=False)
            self._restore(st, taken)
            if not paced:
                time.sleep(random.uniform(0.005, 0.02))
            return True  # a paced write re-reads the new update_time and waits its turn
        except gexc.NotFound:
            self._drop(run_id, st, taken)
            return False
        except (gexc.InvalidArgument, ValueError, TypeError):
            # Retrying cannot help (say the document would pass 1 MiB): drop it, loudly.
            log.exception("run %s: Firestore refuses buffered changes; dropped %r", run_id, taken)
            return True
        except gexc.GoogleAPIError as exc:
            self._restore(st, taken)
            self._backoff(run_id, st, exc)
            return False
        self._count(run_id)
        st.failures = 0
        st.due = time.monotonic() + self.interval
        return True

    def _backoff(self, run_id: str, st: _RunState, exc: Exception) -> None:
        st.failures += 1
        delay = min(30.0, max(self.interval, 0.5) * 2 ** min(st.failures, 6))
        st.due = time.monotonic() + delay
        log.warning("run %s: coalesced write failed (%s); retrying in %.1fs", run_id, exc, delay)

    def _drop(self, run_id: str, st: _RunState, taken: _Pending | None = None) -> None:
        with self._lock:
            dropped = [taken, *st.queue] if taken else list(st.queue)
            st.queue.clear()
        log.debug("run %s has no document (deleted?); dropped buffered changes %r", run_id, dropped)


# Fields a conditional write reads: the status (transitions, and the barrier
# for stale sets) and the history it appends to.
_READ_FOR_WRITE = ["status", "status_at", "history"]


def _ends_stage(update: RunUpdate) -> bool:
    # The engine's completion of a whole stage carries the run's percent and a
    # history event; a fan-out item's carries only counters.
    return bool(update.events) or "percent" in update.maximum or "percent" in update.set


def _encode_checkpoint(cp: Checkpoint) -> dict[str, Any]:
    data = cp.to_dict()
    data.update(_user_fields("value", data.pop("value"), creating=True))
    return data


def _decode_checkpoint(data: dict[str, Any] | None) -> Checkpoint:
    data = dict(data or {})
    data["value"] = _user_value(data, "value")
    return Checkpoint.from_dict(data)


_live_stores: weakref.WeakSet[FirestoreStore] = weakref.WeakSet()
_exit_hooks_lock = threading.Lock()
_exit_hooks_installed = False


def _at_exit(store: FirestoreStore) -> None:
    """Write ``store``'s buffers when the process ends normally (installed with the first store)."""
    global _exit_hooks_installed
    with _exit_hooks_lock:
        _live_stores.add(store)
        if _exit_hooks_installed:
            return
        _exit_hooks_installed = True
        atexit.register(_close_stores)
        try:
            from celery import signals
        except ImportError:
            return
        # Celery's prefork children leave through os._exit, which skips atexit;
        # the pool's exit hook (worker_process_shutdown) is their last chance.
        signals.worker_process_shutdown.connect(_close_stores, weak=False, dispatch_uid="haulage-firestore-close")


def _close_stores(*_args: Any, **_kwargs: Any) -> None:
    for store in list(_live_stores):
        if store._pid != os.getpid():
            continue  # a forked copy: its buffer belongs to the parent
        try:
            store.close()
        except Exception:  # at exit there is no one left to raise to
            log.exception("writing buffered run changes at exit failed")
