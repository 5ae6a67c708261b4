"""The coordination seam: the state runs share besides their progress documents.

The :class:`~haulage.progress.store.Store` holds what a run *is* (its document,
steps, checkpoints, guards) in Redis or Firestore. What the engine needs to
*coordinate* its processes lives here, always on Redis: step locks with their
holders' liveness, stage counters, item ledgers, the Cloud Run hand-off and
completion events. The contract suite in
tests/contract/test_coordination_contract.py runs unchanged against every
implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol


class LockGrant(Enum):
    """The outcome of :meth:`Coordination.acquire_lock`."""

    REFUSED = 0  #: another holder has the lock and is alive
    ACQUIRED = 1  #: the lock was free
    TAKEN_OVER = 2  #: the lock was held by a holder whose liveness had lapsed (the process is gone)

    @property
    def held(self) -> bool:
        return self is not LockGrant.REFUSED


@dataclass(frozen=True)
class LockRelease:
    """The outcome of :meth:`Coordination.release_lock`."""

    released: bool  #: False when the caller no longer held the lock (it lapsed and someone took it)
    stage_count: int | None  #: the stage's finished count after this release counted one; None if none was counted
    continue_stage: bool = False  #: the fan-in entry it recorded completed the stage: the caller publishes


@dataclass(frozen=True)
class FanInEntry:
    """A fan-out item's final reference, recorded by :meth:`Coordination.release_lock` in the same step."""

    stage: int
    item: int
    ref: dict[str, Any]
    total: int  #: the items the fan-in waits for
    token: str  #: the delivery (Celery task id) that publishes if this completes the stage
    lease_seconds: float


class Handoff(Enum):
    """What the dispatcher and a job container pass each other, per (run id, step key)."""

    PAYLOAD = "payload"  #: the step's message, written by the dispatcher before it starts the execution
    REPORT = "report"  #: how the step failed in a container attempt, written by the job


class CompletionFeed(Protocol):
    """Completion events as they are published (close the feed when done)."""

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, waiting up to ``timeout`` seconds; None if none came."""

    def close(self) -> None: ...


class Coordination(Protocol):
    # --- step locks -----------------------------------------------------
    def acquire_lock(
        self, run_id: str, step_key: str, token: str, *, ttl_seconds: float, liveness_seconds: float
    ) -> LockGrant:
        """Take the lock of (run, step) for ``token``, atomically.

        Granted when the lock is free, or when its holder's liveness has lapsed
        (a take-over); refused while a live holder has it. On a grant the lock
        lives ``ttl_seconds`` and the new holder's liveness ``liveness_seconds``.
        Raises :class:`~haulage.errors.LockUnavailable` when the backend cannot
        answer: without an answer no one can know the step is not running
        elsewhere, so callers fail closed.
        """

    def refresh_liveness(self, token: str, liveness_seconds: float) -> None:
        """Keep the holder ``token`` alive for another ``liveness_seconds`` (its heartbeat)."""

    def release_lock(self, run_id: str, step_key: str, token: str, *, count_stage: int | None = None,
                     fan_in: FanInEntry | None = None) -> LockRelease:  # fmt: skip
        """Release the lock if ``token`` still holds it (compare-and-delete) and end the holder's liveness.

        A lock that lapsed and was taken by another holder is left to that
        holder. When ``count_stage`` is given, one finished unit of that stage
        is counted in the same atomic step, whoever held the lock; when
        ``fan_in`` is given, it is recorded as :meth:`fan_in_add` would, also
        in the same step (one round trip for the end of a fan-out item).
        """

    def lock_holder(self, run_id: str, step_key: str) -> str | None:
        """The token that holds the lock of (run, step) now, or None when no one holds it."""

    def holder_alive(self, token: str) -> bool:
        """True while the holder ``token`` is alive: its liveness has not lapsed (nor been ended by a release)."""

    # --- crashes and the deliveries live workers hold ---------------------
    def count_crash(self, run_id: str, step_key: str) -> int:
        """Count one death of a worker running (run, step); return how many the step has had (atomic)."""

    def reset_crashes(self, run_id: str) -> None:
        """Forget the run's counted deaths (a resume gives every step its crash budget again)."""

    def hold_deliveries(self, tags: Sequence[str], liveness_seconds: float) -> None:
        """Mark broker delivery ``tags`` as held by a live worker for the next ``liveness_seconds``."""

    def held_deliveries(self, tags: Sequence[str]) -> list[bool]:
        """For each of ``tags`` (in order), whether a live worker marked it held and the mark has not lapsed."""

    def take_turn(self, name: str, token: str, seconds: float) -> bool:
        """True for one caller only until ``seconds`` pass: whose turn it is at a periodic job named ``name``."""

    # --- settings agreement ----------------------------------------------
    def announce_worker(self, hostname: str, settings: dict[str, Any], ttl_seconds: float) -> None:
        """Publish ``settings`` (JSON) as worker ``hostname``'s for the next ``ttl_seconds``; drop lapsed ones."""

    def withdraw_worker(self, hostname: str) -> None:
        """Forget worker ``hostname``'s announcement (it is shutting down)."""

    def worker_announcements(self) -> dict[str, dict[str, Any]]:
        """The settings of every worker whose announcement has not lapsed, by hostname."""

    def report_lost_run(self, run_id: str, notice: dict[str, Any], ttl_seconds: float) -> None:
        """Record ``notice``: a worker got a step of ``run_id`` but cannot find the run in its store."""

    def lost_run(self, run_id: str) -> dict[str, Any] | None:
        """The notice :meth:`report_lost_run` left for ``run_id``, or None."""

    # --- stage counters -------------------------------------------------
    def count_stage(self, run_id: str, stage: int) -> int:
        """Count one finished unit of plan stage ``stage``; return the stage's new count (atomic)."""

    # --- fan-in ---------------------------------------------------------
    def fan_in_open(self, run_id: str, stage: int, continuation: list[dict[str, Any]], *,
                    opener: str = "") -> None:  # fmt: skip
        """At each expansion of fan-out ``stage``: keep ``continuation`` (the rest of the chain, JSON) to
        publish when the last item lands, and forget earlier failures and publish marks (a re-expansion
        runs the failed items again and publishes the continuation again)."""

    def fan_in_add(self, run_id: str, stage: int, refs: dict[int, dict[str, Any]], total: int, token: str,
                   lease_seconds: float) -> bool:  # fmt: skip
        """Record the final reference of each item in ``refs`` (by index), atomically.

        An item's success replaces its failure, never the other way. True when all ``total`` items
        have landed, the continuation is not yet marked published, and the caller ``token`` holds (or
        took) the publish lease for ``lease_seconds``: that caller, and only it, publishes. The same
        token asking again (its delivery redelivered) is answered True again.
        """

    def fan_in_continuation(self, run_id: str, stage: int) -> list[dict[str, Any]] | None:
        """The continuation :meth:`fan_in_open` kept, or None."""

    def fan_in_continued(self, run_id: str, stage: int) -> None:
        """Mark the continuation published (in the broker): later arrivals do not publish it again."""

    def fan_in_refs(self, run_id: str, stage: int) -> list[dict[str, Any]]:
        """Every item's final reference, in no particular order."""

    # --- ledgers --------------------------------------------------------
    def ledger_add(self, run_id: str, step_key: str, name: str, item_id: str) -> None:
        """Record ``item_id`` in the ledger ``name`` of (run, step); adding it again changes nothing."""

    def ledger_contains(self, run_id: str, step_key: str, name: str, item_ids: Sequence[str]) -> list[bool]:
        """For each of ``item_ids`` (in order), whether the ledger holds it, read in one round trip."""

    def ledger_count(self, run_id: str, step_key: str, name: str) -> int:
        """How many distinct items the ledger holds."""

    # --- Cloud Run hand-off ---------------------------------------------
    def put_handoff(self, run_id: str, step_key: str, kind: Handoff, data: dict[str, Any], ttl_seconds: float) -> None:
        """Store ``data`` (JSON) as the step's ``kind``, replacing any earlier one; it expires after ``ttl_seconds``."""

    def get_handoff(self, run_id: str, step_key: str, kind: Handoff) -> dict[str, Any] | None:
        """The step's ``kind`` as stored, or None if there is none (never written, cleared or expired)."""

    def clear_handoff(self, run_id: str, step_key: str) -> None:
        """Forget every kind of hand-off of the step."""

    # --- completion events ----------------------------------------------
    def publish_completion(self, event: dict[str, Any]) -> None:
        """Send ``event`` (JSON) to every current subscriber; no one listening is not an error."""

    def watch_completions(self) -> CompletionFeed:
        """Subscribe to completion events published from now on."""

    # --- retention ------------------------------------------------------
    def purge_run(self, run_id: str) -> None:
        """Delete the run's stage counters, fan-ins and ledgers, and nothing of any other run."""
