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
    apply_stages,
    counted_message,
    derived_percent,
    ended,
    field_path,
    get_in,
    merge_failures,
    merge_history,
    overlaps,
    parts,
    put_in,
    set_value,
    stage_key,
    status_at,
    to_epoch,
    to_timestamp,
    user_fields,
)
from haulage.progress.models import Event, FailureEntry, RunUpdate, now, round_usd

#: fields the buffer derives from what it read rather than writing as given (see Pending.fields)
_DERIVED = frozenset({"percent"})


def _is_usd(key: str) -> bool:
    return key.startswith("cost.") and key.endswith(".usd")


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
    failures: list[FailureEntry] = field(default_factory=list)
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
        self.failures.extend(update.failures)
        self.last_at = max(self.last_at, at)

    def then(self, newer: Pending) -> None:
        """Fold a later buffer in, keeping when each of its sets was asked for; raises Incompatible."""
        self.add(RunUpdate(set=dict(newer.set), incr=dict(newer.incr), maximum=dict(newer.maximum),
                           events=list(newer.events), failures=list(newer.failures)), newer.last_at)  # fmt: skip
        self.set_at.update({k: newer.set_at.get(k, newer.last_at) for k in newer.set})

    def copy(self) -> Pending:
        out = Pending()
        out.then(self)
        return out

    def __bool__(self) -> bool:
        return bool(self.set or self.incr or self.maximum or self.events or self.failures)

    def live_sets(self, changed_at: float | None) -> dict[str, Any]:
        # A status change is a barrier: a set asked for before it (say a step's
        # message, buffered by another worker while the run completed) must not
        # land after it and overwrite what the transition wrote.
        if changed_at is None:
            return dict(self.set)
        return {k: v for k, v in self.set.items() if self.set_at.get(k, math.inf) >= changed_at}

    def fields(self, stored: Doc | None, limit: int) -> Doc:
        """The update() map for this buffer, given ``stored``: what was read for the write (under its update time).

        A terminal document takes nothing but ``settled`` (empty map: write
        nothing). The stages list, the percent derived from it, the failures list
        and money are computed from what was read, so the write that lands is
        exact; counters are increments.
        """
        if ended(stored) and "status" not in self.set:
            wanted = self.set.get("settled")
            return {"settled": wanted} if wanted is not None and (stored or {}).get("settled") != wanted else {}
        base = stored or {}
        sets = self.live_sets(status_at(stored))
        out: Doc = {}
        for k, v in sets.items():
            if stage_key(k) is not None or k in _DERIVED:
                continue
            if k in USER_DATA:
                out.update(user_fields(k, v, creating=False))
            else:
                out[field_path(k)] = v
        for k, d in self.incr.items():
            if stage_key(k) is not None:
                continue
            if _is_usd(k):
                out[field_path(k)] = round_usd((get_in(base, parts(k)) or 0.0) + d)
            else:
                out[field_path(k)] = firestore.Increment(d)
        for k, m in self.maximum.items():
            if stage_key(k) is None and k not in _DERIVED:
                out[field_path(k)] = transforms.Maximum(m)
        stages = apply_stages(base.get("stages"), sets, self.incr, self.maximum)
        if stages is not None:
            out["stages"] = stages
            message = counted_message(stages, sets, self.incr)
            if message is not None:
                out["message"] = message
        percent = self._percent(base, stages, sets)
        if percent is not None:
            out["percent"] = percent
        if self.events:
            out["history"] = merge_history(base.get("history"), self.events, limit)
        if self.failures:
            out["failures"] = merge_failures(base.get("failures"), self.failures)
        out["updated_at"] = to_timestamp(now())
        out["updated_ts"] = firestore.SERVER_TIMESTAMP
        return out

    def _percent(self, base: Doc, stages: list[Doc] | None, sets: dict[str, Any]) -> float | None:
        if "percent" in sets:
            return float(sets["percent"])  # set outright: COMPLETE's 100
        return derived_percent(base.get("percent"), stages if stages is not None else base.get("stages"),
                               self.maximum.get("percent"))  # fmt: skip

    def overlay(self, data: Doc, limit: int) -> None:
        """Apply this buffer to a document's data as its write would (read your writes)."""
        if ended(data) and "status" not in self.set:
            if "settled" in self.set:
                data["settled"] = self.set["settled"]
            return
        sets = self.live_sets(status_at(data))
        for k, v in sets.items():
            if stage_key(k) is not None or k in _DERIVED:
                continue
            put_in(data, parts(k), copy.deepcopy(v))  # later segments change the view, never the buffer
            if k in USER_DATA:
                data.pop(f"{k}_json", None)
        for k, d in self.incr.items():
            if stage_key(k) is None:
                total = (get_in(data, parts(k)) or 0) + d
                put_in(data, parts(k), round_usd(total) if _is_usd(k) else total)
        for k, m in self.maximum.items():
            if stage_key(k) is None and k not in _DERIVED:
                cur = get_in(data, parts(k))
                put_in(data, parts(k), m if cur is None else max(cur, m))
        stages = apply_stages(data.get("stages"), sets, self.incr, self.maximum)
        if stages is not None:
            data["stages"] = stages
            message = counted_message(stages, sets, self.incr)
            if message is not None:
                data["message"] = message
        percent = self._percent(data, stages, sets)
        if percent is not None:
            data["percent"] = percent
        if self.events:
            data["history"] = merge_history(data.get("history"), self.events, limit)
        if self.failures:
            data["failures"] = merge_failures(data.get("failures"), self.failures)
        data["updated_at"] = to_timestamp(max(to_epoch(data.get("updated_at")) or 0.0, self.last_at))


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
                  RunUpdate(maximum=dict(update.maximum), events=list(update.events),
                            failures=list(update.failures))]  # fmt: skip
        for piece in pieces:
            if piece:
                append(queue, piece, at)
        return
    queue.append(segment)
