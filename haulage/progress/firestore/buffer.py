"""The coalescing buffer: a run document's changes merged in memory until one write sends them.

Firestore sustains about one write per second per document, while a fan-out
reports progress, cost and completions many times a second. Changes to one
run are folded into a queue of :class:`Pending` segments, each of which one
``update()`` applies in the order the changes were asked for; a new segment
starts only when a change cannot join the last one in a single write (a field
and a field beneath it, or two transforms on one field).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore
from google.cloud.firestore_v1 import transforms

from haulage.progress.firestore.encoding import (
    USER_DATA,
    Doc,
    field_path,
    get_in,
    merge_history,
    overlaps,
    parts,
    put_in,
    set_value,
    status_at,
    user_fields,
)
from haulage.progress.models import Event, RunUpdate, now


class Incompatible(Exception):
    """Raised when a change cannot join a buffered one in one write (a field and one beneath it, two transforms)."""


@dataclass
class Pending:
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
        """Fold ``update`` (newer than everything here) in; on Incompatible or ValueError nothing changes."""
        touched = [*update.set, *update.incr, *update.maximum]
        mine = [*self.set, *self.incr, *self.maximum]
        if (
            any(overlaps(a, b) for a in touched for b in [*mine, *touched])
            or any(k in self.maximum or k in update.maximum for k in update.incr)
            or any(k in self.incr for k in update.maximum)
        ):
            raise Incompatible
        values = {k: set_value(k, v) for k, v in update.set.items()}
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

    def then(self, newer: Pending) -> None:
        """Fold a later buffer in, keeping when each of its sets was asked for; raises Incompatible."""
        self.add(RunUpdate(set=dict(newer.set), incr=dict(newer.incr), maximum=dict(newer.maximum),
                           events=list(newer.events)), newer.last_at)  # fmt: skip
        self.set_at.update({k: newer.set_at.get(k, newer.last_at) for k in newer.set})

    def copy(self) -> Pending:
        out = Pending()
        out.then(self)
        return out

    def __bool__(self) -> bool:
        return bool(self.set or self.incr or self.maximum or self.events)

    def live_sets(self, changed_at: float | None) -> dict[str, Any]:
        # A status change is a barrier: a set asked for before it (say a step's
        # message, buffered by another worker while the run completed) must not
        # land after it and overwrite what the transition wrote.
        if changed_at is None:
            return dict(self.set)
        return {k: v for k, v in self.set.items() if self.set_at.get(k, math.inf) >= changed_at}

    def fields(self, stored: Doc | None, limit: int) -> Doc:
        """The update() map for this buffer; ``stored`` is what was read for the write (None if nothing was)."""
        out: Doc = {}
        for k, v in self.live_sets(status_at(stored)).items():
            if k in USER_DATA:
                out.update(user_fields(k, v, creating=False))
            else:
                out[field_path(k)] = v
        for k, d in self.incr.items():
            out[field_path(k)] = firestore.Increment(d)
        for k, m in self.maximum.items():
            out[field_path(k)] = transforms.Maximum(m)
        if self.events:
            out["history"] = merge_history((stored or {}).get("history"), self.events, limit)
        out["updated_at"] = now()
        out["updated_ts"] = firestore.SERVER_TIMESTAMP
        return out

    def overlay(self, data: Doc, limit: int) -> None:
        """Apply this buffer to a document's data as its write would (read your writes)."""
        for k, v in self.live_sets(status_at(data)).items():
            put_in(data, parts(k), copy.deepcopy(v))  # later segments change the view, never the buffer
            if k in USER_DATA:
                data.pop(f"{k}_json", None)
        for k, d in self.incr.items():
            put_in(data, parts(k), (get_in(data, parts(k)) or 0) + d)
        for k, m in self.maximum.items():
            cur = get_in(data, parts(k))
            put_in(data, parts(k), m if cur is None else max(cur, m))
        if self.events:
            data["history"] = merge_history(data.get("history"), self.events, limit)
        data["updated_at"] = max(float(data.get("updated_at") or 0.0), self.last_at)


def append(queue: list[Pending], update: RunUpdate, at: float) -> None:
    """Buffer ``update`` after ``queue``: into its last segment when one write can hold both, else a new one."""
    if queue:
        try:
            queue[-1].add(update, at)
            return
        except Incompatible:
            pass
    segment = Pending()
    try:
        segment.add(update, at)
    except Incompatible:
        if sum(1 for kind in (update.set, update.incr, update.maximum) if kind) <= 1:
            raise ValueError(
                "RunUpdate changes a field and a field beneath it at once "
                f"({sorted([*update.set, *update.incr, *update.maximum])}); split it into two updates"
            ) from None
        # In the order the Redis backend applies one update: sets, increments, maxima (and events).
        pieces = [RunUpdate(set=dict(update.set)), RunUpdate(incr=dict(update.incr)),
                  RunUpdate(maximum=dict(update.maximum), events=list(update.events))]  # fmt: skip
        for piece in pieces:
            if piece:
                append(queue, piece, at)
        return
    queue.append(segment)
