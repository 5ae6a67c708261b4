"""The Store protocol: where run documents, step records, checkpoints and guards live.

Two backends implement it (Redis for the embedded default, Firestore for
production), and an in-memory twin for fast tests (haulage.progress.memory_store);
the contract suite in tests/contract/test_store_contract.py runs unchanged
against each of the three.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from haulage.progress.models import Checkpoint, RunRecord, RunStatus, RunUpdate, StepRecord


class ChangeFeed(Protocol):
    """Signals that a run document changed (Redis pub/sub, Firestore snapshot listener)."""

    def wait(self, timeout: float) -> bool:
        """Block until the document changes or ``timeout`` seconds pass; True if it changed."""

    def close(self) -> None: ...


class Store(Protocol):
    #: seconds that writes made by other processes may take to land (0: every write lands at once)
    settle_seconds: float

    # --- runs -----------------------------------------------------------
    def create_run(self, run: RunRecord) -> RunRecord | None:
        """Create ``run`` if no run has its id; return the existing one otherwise (None when created)."""

    def get_run(self, run_id: str) -> RunRecord | None: ...

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
        """Runs, newest first, filtered by the given fields.

        ``after`` is ``(created_at, id)`` of the last run of the previous page:
        the listing continues after it (a cursor, cheaper than ``offset``).
        """

    def update_run(self, run_id: str, update: RunUpdate) -> None:
        """Apply ``update`` as one write; the history keeps its newest events only."""

    def transition(
        self,
        run_id: str,
        to: RunStatus,
        *,
        allowed_from: Collection[RunStatus],
        update: RunUpdate | None = None,
    ) -> bool:
        """Set the status to ``to`` only if it is now one of ``allowed_from`` (atomically); apply ``update`` with it."""

    def delete_run(self, run_id: str) -> None:
        """Remove the run and everything under it (steps, checkpoints, guards)."""

    # --- steps ----------------------------------------------------------
    def get_step(self, run_id: str, step_key: str) -> StepRecord | None: ...

    def put_step(self, run_id: str, step: StepRecord) -> None:
        """Write the step record whole (last writer wins)."""

    def list_steps(self, run_id: str) -> list[StepRecord]: ...

    def create_item_rows(self, run_id: str, rows: Sequence[StepRecord]) -> None:
        """Create the QUEUED rows of a fan-out's items in batches, leaving any row that exists as it is.

        Called once per expansion, so a frontend lists every item before it starts.
        """

    def step_progress(self, run_id: str, step_key: str, percent: float, message: str) -> None:
        """Set a RUNNING step's own percent and message (a fan-out item's ``ctx.progress``); else do nothing."""

    def start_step(self, run_id: str, step: StepRecord, update: RunUpdate) -> Checkpoint | None:
        """Mark a step started (write ``step``, apply ``update``) unless it has a checkpoint; return that checkpoint."""

    def load_step_state(self, run_id: str, step_keys: Sequence[str]) -> tuple[RunStatus | None, dict[str, Checkpoint]]:
        """The run's status (None if there is no such run) and the checkpoints among ``step_keys``, read together."""

    # --- checkpoints ----------------------------------------------------
    def get_checkpoints(self, run_id: str, step_keys: Sequence[str]) -> dict[str, Checkpoint]:
        """The checkpoints that exist among ``step_keys``."""

    def put_checkpoint(self, run_id: str, checkpoint: Checkpoint) -> bool:
        """Create-if-absent: True if written, False if one already existed (the first one wins)."""

    def complete_step(self, run_id: str, checkpoint: Checkpoint, step: StepRecord, update: RunUpdate) -> Checkpoint:
        """Record a step's success: create the checkpoint if absent, write the step, apply ``update``.

        Returns the checkpoint that stands (an earlier one if it existed, in
        which case the step and run are left as they are).
        """

    def watch_changes(self, run_id: str) -> ChangeFeed:
        """Subscribe to changes of the run document (close the feed when done)."""

    # --- once-guards ----------------------------------------------------
    def claim_guard(self, run_id: str, key: str, token: str) -> str | None:
        """Claim guard ``key`` for ``token``; return None if claimed, else the state already there.

        States: "pending:<token>" while the effect is being performed, "done"
        after, "unknown" once a claimant died inside the block and the outcome
        was given up on (``once(key, on_unknown="skip"|"fail")``). One round
        trip: this is on the path of every guarded effect.
        """

    def replace_guard(self, run_id: str, key: str, expected: str, state: str) -> bool:
        """Set guard ``key`` to ``state`` only if it now holds ``expected`` (atomically); True if replaced.

        How a live attempt takes over the claim of a dead one, so that two
        attempts that both saw the dead claim cannot both take it.
        """

    def finish_guard(self, run_id: str, key: str, token: str, done: bool) -> None:
        """Mark the guard done, or (``done=False``) release a claim held by ``token`` so a retry may perform it."""

    def get_guards(self, run_id: str) -> dict[str, Any]: ...
