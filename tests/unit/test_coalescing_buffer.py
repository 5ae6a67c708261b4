"""The Firestore coalescing buffer and its writer, without Firestore: how buffered changes merge and land.

What a user sees through these: counters that add up however many reports
are merged into one write, fields that never run backwards, changes applied
in the order they were asked for, and a status change (or a flush) written
at once. The writer runs against a small in-memory document that records
each write, so no emulator is needed.
"""

from __future__ import annotations

import copy
import datetime
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import pytest
from google.cloud import firestore

from haulage.progress.firestore.buffer import Pending, append
from haulage.progress.firestore.writer import PacedWriter
from haulage.progress.models import Event, RunUpdate

pytestmark = pytest.mark.timeout(30)


def view(queue: list[Pending], data: dict[str, Any] | None = None, limit: int = 100) -> dict[str, Any]:
    """The document as the buffered writes would leave it (what get_run shows this process)."""
    out = copy.deepcopy(data or {})
    for segment in queue:
        segment.overlay(out, limit)
    return out


# --- merging within one coalesced write ----------------------------------------------------------
def test_changes_in_one_window_become_one_write_with_increments_summed() -> None:
    queue: list[Pending] = []
    for _ in range(50):  # a fan-out's items each report one completion and some cost
        append(queue, RunUpdate(incr={"steps.done": 1, "cost.gpt-4.1.usd": 0.01}), at=1.0)
    assert len(queue) == 1
    fields = queue[0].fields(None, limit=100)
    assert fields["steps.done"] == firestore.Increment(50)
    # the model name's dot is not a path step; money is summed from what was read, without float noise
    assert fields["cost.`gpt-4.1`.usd"] == 0.5
    doc = view(queue, {"steps": {"done": 3}})
    assert doc["steps"]["done"] == 53
    assert doc["cost"]["gpt-4.1"]["usd"] == pytest.approx(0.5)


def test_later_set_wins_and_maximum_never_moves_backwards() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(set={"message": "page 1"}, maximum={"percent": 40.0}), at=1.0)
    append(queue, RunUpdate(set={"message": "page 2"}, maximum={"percent": 30.0}), at=2.0)
    assert len(queue) == 1
    fields = queue[0].fields(None, limit=100)
    assert fields["message"] == "page 2"
    assert fields["percent"] == 40.0  # derived from what was read: the highest of stored, asked for and work done
    assert view(queue, {"percent": 55.0})["percent"] == 55.0  # the stored value is higher still: it stays


def test_a_set_replaces_earlier_increments_and_later_ones_fold_into_it() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(incr={"steps.done": 3}), at=1.0)
    append(queue, RunUpdate(set={"steps.done": 10}), at=2.0)
    append(queue, RunUpdate(incr={"steps.done": 2}), at=3.0)
    assert len(queue) == 1
    assert queue[0].fields(None, limit=100)["steps.done"] == 12
    assert view(queue, {"steps": {"done": 99}})["steps"]["done"] == 12


def test_set_values_are_copied_when_buffered() -> None:
    queue: list[Pending] = []
    result = {"pages": [1, 2]}
    append(queue, RunUpdate(set={"result": result}), at=1.0)
    result["pages"].append(3)  # the caller reuses its dict after update_run returned
    assert view(queue)["result"] == {"pages": [1, 2]}


# --- order across writes -------------------------------------------------------------------------
def test_a_field_and_one_beneath_it_go_in_separate_writes_in_call_order() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(incr={"steps.done": 5}), at=1.0)
    append(queue, RunUpdate(set={"steps": {"total": 3, "done": 0, "failed": 0}}), at=2.0)  # a reset
    append(queue, RunUpdate(incr={"steps.done": 1}), at=3.0)
    assert len(queue) == 3
    assert view(queue)["steps"] == {"total": 3, "done": 1, "failed": 0}


def test_increment_then_maximum_of_one_field_keep_their_order() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(incr={"percent": 5.0}), at=1.0)
    append(queue, RunUpdate(maximum={"percent": 3.0}), at=2.0)
    assert len(queue) == 2  # two transforms on one field cannot share a write
    assert view(queue, {"percent": 0.0})["percent"] == 5.0  # the other order would give 8.0


def test_one_update_mixing_a_field_and_one_beneath_it_applies_sets_then_increments() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(set={"steps": {"total": 2, "done": 0, "failed": 0}}, incr={"steps.done": 1}), at=1.0)
    assert view(queue)["steps"]["done"] == 1  # the order RedisStore applies one update in


def test_one_kind_of_change_to_a_field_and_one_beneath_it_is_refused_by_name() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(incr={"steps.done": 1}), at=1.0)
    with pytest.raises(ValueError, match=r"\['steps', 'steps.total'\]"):
        append(queue, RunUpdate(set={"steps": {}, "steps.total": 4}), at=2.0)
    assert len(queue) == 1 and queue[0].incr == {"steps.done": 1}  # nothing changed


def test_a_value_firestore_cannot_hold_is_refused_unless_it_is_user_data() -> None:
    queue: list[Pending] = []
    with pytest.raises(ValueError, match=r"RunUpdate.set\['message'\]"):
        append(queue, RunUpdate(set={"message": [[1, 2]]}), at=1.0)
    assert queue == []
    append(queue, RunUpdate(set={"result": [[1, 2]]}), at=1.0)
    fields = queue[0].fields(None, limit=100)
    assert fields["result"] is None and fields["result_json"] == "[[1,2]]"


def test_history_lands_chronologically_and_bounded() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(events=[Event(5.0, "step", "late")]), at=5.0)
    append(queue, RunUpdate(events=[Event(3.0, "step", "early")]), at=5.0)  # buffered by another worker
    stored = {"history": [{"at": 1.0, "kind": "created", "message": "first", "step": None}]}
    history = queue[0].fields(stored, limit=2)["history"]
    assert [e["message"] for e in history] == ["early", "late"]


def test_a_status_change_is_a_barrier_for_older_sets() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(set={"message": "analysing page 3"}, incr={"steps.done": 1}), at=100.0)
    resumed = {"status": "PROCESSING", "status_at": 150.0, "message": "resumed"}
    fields = queue[0].fields(resumed, limit=100)
    assert "message" not in fields and fields["steps.done"] == firestore.Increment(1)
    assert view(queue, resumed)["message"] == "resumed"
    assert queue[0].fields({"status_at": 50.0}, limit=100)["message"] == "analysing page 3"


def test_a_terminal_document_takes_nothing_but_its_settled_marker() -> None:
    queue: list[Pending] = []
    append(queue, RunUpdate(set={"message": "late"}, incr={"steps.done": 1, "cost.m.usd": 0.1},
                            events=[Event(200.0, "usage", "late")]), at=200.0)  # fmt: skip
    completed = {"status": "CANCELLED", "status_at": 150.0, "message": "cancelled", "settled": False}
    assert queue[0].fields(completed, limit=100) == {}  # nothing to write
    assert view(queue, completed) == completed
    append(queue, RunUpdate(set={"settled": True}), at=300.0)
    assert queue[-1].fields(completed, limit=100) == {"settled": True}


# --- flushing ------------------------------------------------------------------------------------
class _Snap:
    def __init__(self, doc: _Doc) -> None:
        self.exists = True
        self.update_time = doc.update_time
        self._data = copy.deepcopy(doc.data)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)


class _Doc:
    """A run document that records every write made to it."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"status": "PROCESSING", "status_at": 0.0}
        # Written just now: a paced write by the background thread waits its turn, so only flushes land.
        self.update_time = datetime.datetime.now(datetime.UTC)
        self.writes: list[dict[str, Any]] = []
        self.preconditions: list[Any] = []

    def get(self, field_paths: list[str] | None = None) -> _Snap:
        return _Snap(self)

    def update(self, fields: dict[str, Any], option: Any = None) -> None:
        self.writes.append(fields)
        self.preconditions.append(option)


class _Client:
    def __init__(self) -> None:
        self.docs: dict[str, _Doc] = {}

    def collection(self, name: str) -> _Client:
        return self

    def document(self, run_id: str) -> _Doc:
        return self.docs.setdefault(run_id, _Doc())

    def write_option(self, **precondition: Any) -> dict[str, Any]:
        return precondition


@pytest.fixture
def client() -> _Client:
    return _Client()


@pytest.fixture
def writer(client: _Client) -> Iterator[PacedWriter]:
    out = PacedWriter(interval=60.0, db=lambda: cast(Any, client), collection="tasks",
                      writes=Counter(), conflicts=Counter())  # fmt: skip
    yield out
    out.close()


def test_changes_wait_in_the_buffer_until_flushed_then_land_in_order(writer: PacedWriter, client: _Client) -> None:
    writer.buffer("r1", RunUpdate(incr={"steps.done": 1}))
    writer.buffer("r1", RunUpdate(incr={"steps.done": 1}, set={"message": "two done"}))
    writer.buffer("r1", RunUpdate(set={"steps": {"total": 9, "done": 0, "failed": 0}}))
    assert writer.buffered("r1") and client.document("r1").writes == []
    writer.flush()
    assert not writer.buffered("r1")
    first, second = client.document("r1").writes
    assert first["steps.done"] == firestore.Increment(2) and first["message"] == "two done"
    assert second["steps"] == {"total": 9, "done": 0, "failed": 0}
    assert writer.writes["r1"] == 2


def test_every_write_is_conditional_on_what_it_read(writer: PacedWriter, client: _Client) -> None:
    # Even increments: the write reads the status (a terminal document takes nothing) and derives the percent.
    writer.buffer("r1", RunUpdate(incr={"steps.done": 1}, maximum={"percent": 10.0}))
    writer.flush("r1")
    assert client.document("r1").preconditions[0]["last_update_time"] is not None


def test_a_status_change_is_written_at_once(writer: PacedWriter, client: _Client) -> None:
    writer.buffer("r1", RunUpdate(incr={"steps.done": 1}))
    writer.buffer("r1", RunUpdate(set={"status": "COMPLETE"}))
    assert not writer.buffered("r1")
    (write,) = client.document("r1").writes
    assert write["status"] == "COMPLETE" and write["steps.done"] == firestore.Increment(1)


def test_after_close_every_change_is_written_at_once(writer: PacedWriter, client: _Client) -> None:
    writer.buffer("r1", RunUpdate(incr={"steps.done": 1}))
    writer.close()
    assert len(client.document("r1").writes) == 1  # close() wrote what was buffered
    writer.buffer("r1", RunUpdate(incr={"steps.failed": 1}))
    assert not writer.buffered("r1") and len(client.document("r1").writes) == 2
