"""StepContext: what a running step can see and report."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import AbstractContextManager

from haulage.coordination import get_coordination
from haulage.errors import Cancelled
from haulage.progress.models import Event, RunStatus, RunUpdate, cost_increments, now
from haulage.progress.store import Store
from haulage.tasks import guards
from haulage.tasks.flow import Flow
from haulage.tasks.guards import OnUnknown
from haulage.tasks.ledger import Ledger

log = logging.getLogger("haulage.step")

# How stale a cached cancellation answer may be: ctx.cancelled is called in
# tight loops, and one store read per second per step is plenty.
_CANCEL_CHECK_SECONDS = 1.0
#: seconds between a fan-out item's progress writes to its step document (Firestore's sustained rate per document)
PROGRESS_SECONDS = 1.0


class StepContext:
    """Passed as the first argument of every step.

    >>> def analyze_page(ctx, project_id, page):
    ...     ctx.progress(40, "matching code sections")
    ...     ctx.add_cost("model-x", usd=0.002, input_tokens=900, output_tokens=120)
    ...     with ctx.once("meter-page") as first:
    ...         if first:
    ...             meter(project_id, page, idempotency_key=ctx.guard_id("meter-page"))
    """

    def __init__(self, store: Store, *, run_id: str, step_key: str, step_name: str, attempt: int,
                 flow: Flow, backend: str = "local", lock_token: str | None = None) -> None:  # fmt: skip
        self._store = store
        self.run_id = run_id
        self.step_key = step_key
        self.step_name = step_name
        self.attempt = attempt
        self.backend = backend
        self._flow = flow
        self._cancel_checked = 0.0
        self._cancelled = False
        self._item_progress: tuple[float, str] | None = None  #: reported, not yet written to the step document
        self._progress_written = 0.0
        #: this attempt's step-lock token, not whoever holds the lock now: a frozen attempt whose lock was
        #: taken over must not claim guards in the new holder's name
        self._lock_token = lock_token
        self.log = logging.LoggerAdapter(
            log, {"run_id": run_id, "step_key": step_key, "attempt": attempt, "backend": backend}
        )

    def progress(self, percent: float, message: str = "") -> None:
        """Report this step's progress (0-100) and a message.

        A stage of one step moves the run's bar (its stage's ``progress``, from which
        the store derives the run's percent) and message. A fan-out item reports on its
        own step document (at most one write per PROGRESS_SECONDS; a report inside that
        interval waits for the next one, and the step's final record supersedes it);
        the run's message is then the stage's count ("analyze_page 12/40"), never
        whichever item wrote last.
        """
        if self.cancelled:
            return  # the run's last word is "cancelled"; a late progress message must not replace it
        percent = max(0.0, min(100.0, float(percent)))
        if self._flow["item"] is None and self._flow["units"] <= 1:
            update = RunUpdate(set={"message": message, "heartbeat": now()} if message else {"heartbeat": now()},
                               maximum={f"stages.{self._flow['stage']}.progress": percent})  # fmt: skip
            self._store.update_run(self.run_id, update)
            return
        self._item_progress = (percent, message)
        if time.monotonic() - self._progress_written >= PROGRESS_SECONDS:
            self.flush_progress()

    def flush_progress(self) -> None:
        """Write the item's last reported progress to its step document, if any is unwritten."""
        pending, self._item_progress = self._item_progress, None
        if pending is None:
            return
        self._progress_written = time.monotonic()
        self._store.step_progress(self.run_id, self.step_key, pending[0], pending[1])

    def add_cost(self, model: str, *, usd: float = 0.0, input_tokens: int = 0, output_tokens: int = 0,
                 calls: int = 1) -> None:  # fmt: skip
        """Add spending on ``model`` to the run's per-model totals (usd, tokens, calls)."""
        if not model:
            raise ValueError("add_cost: model must be a non-empty name")
        self._store.update_run(
            self.run_id,
            RunUpdate(
                incr=cost_increments(
                    model, usd=usd, input_tokens=input_tokens, output_tokens=output_tokens, calls=calls
                )
            ),  # fmt: skip
        )

    def event(self, message: str, kind: str = "step") -> None:
        """Append a line to the run's history."""
        self._store.update_run(self.run_id, RunUpdate(events=[Event(now(), kind, message, self.step_key)]))

    @property
    def cancelled(self) -> bool:
        """True once the run is cancelled: a long step should stop at its next safe point."""
        if self._cancelled:
            return True
        if time.monotonic() - self._cancel_checked >= _CANCEL_CHECK_SECONDS:
            self._cancel_checked = time.monotonic()
            status, _ = self._store.load_step_state(self.run_id, [])
            self._cancelled = status is None or status is RunStatus.CANCELLED
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        """Stop the step here if its run was cancelled: raises :class:`~haulage.errors.Cancelled`.

        ``Cancelled`` is a ``BaseException``, so step code's own ``except Exception`` lets it through.
        """
        if self.cancelled:
            raise Cancelled(f"run {self.run_id} was cancelled")

    def once(self, key: str, *, on_unknown: OnUnknown = "redo") -> AbstractContextManager[bool]:
        """Guard a side effect so it happens once per run and step.

        Yields True to the attempt that must perform it, False to every later
        attempt, retry, redelivery or resume once it is done. The guard is
        claimed before the effect and marked done after it; if the block
        raises, the claim is released so a retry may perform the effect.

        If the process dies inside the block (SIGKILL, out of memory, a lost
        machine), no one knows whether the effect happened. The next attempt
        finds the claim, sees that its holder is dead, writes a
        ``guard-unknown`` event into the run's history, and acts on ``on_unknown``:

        - ``"redo"`` (default): performs the effect again (at least once): pass
          ``ctx.guard_id(key)`` as the idempotency key of the system you call,
          so that it drops the repeat;
        - ``"skip"``: does not perform it again (at most once; the effect may be lost);
        - ``"fail"``: fails the step with :class:`~haulage.errors.EffectOutcomeUnknown`, without retrying.

        >>> with ctx.once("charge", on_unknown="redo") as first:
        ...     if first:
        ...         payments.charge(order, idempotency_key=ctx.guard_id("charge"))
        """
        return guards.once(self._store, get_coordination(), self.run_id, self.step_key, key, holder=self._holder(),
                           log=self.log, on_unknown=on_unknown)  # fmt: skip

    def _holder(self) -> str:
        """This attempt's step-lock token: a guard claimed under it is alive exactly while the holder is."""
        if self._lock_token is None:
            # Read once per attempt, and only by steps that guard an effect. The
            # lock is taken before the step body runs, so its holder is this attempt.
            # Without a lock (a context made outside the durable wrapper) a
            # fresh token has no liveness: a later attempt treats the claim as dead.
            self._lock_token = get_coordination().lock_holder(self.run_id, self.step_key) or uuid.uuid4().hex
        return self._lock_token

    def ledger(self, name: str) -> Ledger:
        """The processed-item ledger ``name`` of this step: ``done(id)``, ``mark(id)``, ``pending(items, key=)``."""
        return Ledger(get_coordination(), self.run_id, self.step_key, name)

    def guard_id(self, key: str) -> str:
        """A stable id for the effect guarded by ``once(key)``: pass it to systems that dedupe."""
        return guards.guard_id(self.run_id, self.step_key, key)

    def __repr__(self) -> str:
        return f"<StepContext run={self.run_id} step={self.step_key} attempt={self.attempt}>"
