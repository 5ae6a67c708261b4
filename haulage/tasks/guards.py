"""The once-guard behind ``ctx.once(key)``: a side effect once per run and step, and what a crash inside it means.

The guard lives in the store beside the run's checkpoints, so it survives
retries, redeliveries and resumes, and is removed with the run. Its states:
``pending:<holder>`` while an attempt performs the effect (``holder`` is that
attempt's step-lock token, whose liveness key its heartbeat keeps fresh),
``done`` after, and ``unknown`` once a dead claimant's outcome was given up on.

A process killed inside the block leaves ``pending:<holder>`` behind, and no
one can know whether the effect happened. The next attempt (it holds the step
lock now) sees the claim, finds the claimant's liveness lapsed, and acts on
``on_unknown``: ``"redo"`` (the default) performs the effect again, at least
once, so the external system should deduplicate on :func:`guard_id`, as Temporal
and DBOS advise for activities and steps; ``"skip"`` does not (at most once);
``"fail"`` fails the step with :class:`~haulage.errors.EffectOutcomeUnknown`.
Each of them writes a ``guard-unknown`` event, naming the step, into the run's history.

The claim itself stays one store round trip (create-if-absent); the liveness
check and the take-over happen only when a claim is found pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

from haulage.coordination import Coordination
from haulage.errors import EffectOutcomeUnknown, StoreConflict
from haulage.progress.models import Event, RunUpdate, now
from haulage.progress.store import Store

#: the value a guard holds once its block finished
DONE = "done"
#: the value a guard holds once a dead claimant's outcome was given up on (on_unknown "skip" or "fail")
UNKNOWN = "unknown"
PENDING = "pending:"

#: what ``once`` does when an earlier attempt died inside the block
OnUnknown = Literal["redo", "skip", "fail"]
ON_UNKNOWN: tuple[str, ...] = get_args(OnUnknown)

#: take-over attempts before giving up: each lost race means another attempt changed the guard meanwhile
_ATTEMPTS = 5


class _Guard:
    """One ``once(key)`` of one attempt: claim it, or decide what a dead claimant's claim means."""

    def __init__(self, store: Store, coordination: Coordination, run_id: str, step_key: str, key: str,
                 holder: str, log: logging.LoggerAdapter[logging.Logger]) -> None:  # fmt: skip
        self.store, self.coordination = store, coordination
        self.run_id, self.step_key, self.key = run_id, step_key, key
        self.guard = f"{step_key}:{key}"
        self.holder = holder
        self.log = log

    def enter(self, on_unknown: OnUnknown) -> bool:
        """True if this attempt must perform the effect."""
        mine = PENDING + self.holder
        for _ in range(_ATTEMPTS):
            held = self.store.claim_guard(self.run_id, self.guard, self.holder)
            if held is None:
                return True
            if held in (DONE, mine):  # done, or this attempt's own claim (a nested once of the same key)
                return False
            if held.startswith(PENDING) and self.coordination.holder_alive(held[len(PENDING) :]):
                # A frozen holder woke up and is performing it: the step lock was
                # taken from it, but its block still runs. Leave the effect to it.
                self.log.warning("once(%r): another attempt that is still alive performs it; not here", self.key)
                return False
            # The claimant is dead (its liveness lapsed), or an earlier attempt already gave up on it.
            if on_unknown == "redo":
                if self.store.replace_guard(self.run_id, self.guard, held, mine):
                    self.record("performing it again (on_unknown='redo'); the effect may happen twice unless "
                                f"its system deduplicates on guard_id {self.guard_id()!r}")  # fmt: skip
                    return True
                continue  # another attempt changed it meanwhile: look again
            if held != UNKNOWN:
                if not self.store.replace_guard(self.run_id, self.guard, held, UNKNOWN):
                    continue
                self.record("skipped (on_unknown='skip')" if on_unknown == "skip" else "failing the step "
                            "(on_unknown='fail')")  # fmt: skip
            if on_unknown == "skip":
                return False
            raise EffectOutcomeUnknown(
                f"once({self.key!r}) of step {self.step_key} of run {self.run_id}: an earlier attempt died inside "
                f"the guarded block, so whether its effect happened is unknown (on_unknown='fail'; guard_id "
                f"{self.guard_id()!r})"
            )
        raise StoreConflict(f"guard {self.guard!r} of run {self.run_id} kept changing while being taken over")

    def record(self, action: str) -> None:
        message = (f"once({self.key!r}): an earlier attempt died inside the guarded block; whether its effect "
                   f"happened is unknown; {action}")  # fmt: skip
        self.log.warning("%s", message)
        self.store.update_run(self.run_id, RunUpdate(events=[Event(now(), "guard-unknown", message, self.step_key)]))

    def finish(self, done: bool) -> None:
        if not done:
            self.store.finish_guard(self.run_id, self.guard, self.holder, done=False)
            return
        # The effect has happened: a lost "done" mark would have a later attempt redo it, so the
        # mark is worth a few tries across a store blip before the attempt gives up.
        for delay in DONE_RETRY_DELAYS:
            try:
                self.store.finish_guard(self.run_id, self.guard, self.holder, done=True)
                return
            except Exception:  # the store's own errors differ by backend; the last try raises
                self.log.warning("guard %s: marking the effect done failed; trying again in %.1fs", self.key, delay)
                time.sleep(delay)
        self.store.finish_guard(self.run_id, self.guard, self.holder, done=True)

    def guard_id(self) -> str:
        return guard_id(self.run_id, self.step_key, self.key)


DONE_RETRY_DELAYS = (0.1, 0.3, 1.0)  #: seconds between tries of the "done" mark after an effect


@contextmanager
def once(store: Store, coordination: Coordination, run_id: str, step_key: str, key: str, *, holder: str,
         log: logging.LoggerAdapter[logging.Logger], on_unknown: OnUnknown = "redo") -> Iterator[bool]:  # fmt: skip
    """Yield True to the attempt that must perform the effect guarded by ``key``, False to every other.

    ``holder`` is the attempt's step-lock token: its liveness is how a later
    attempt tells a dead claimant from a live one. The guard is claimed before
    the effect and marked done after it; if the block raises, the claim is
    released so a retry may perform the effect.
    """
    if on_unknown not in ON_UNKNOWN:
        raise ValueError(f"once({key!r}): on_unknown must be one of {', '.join(ON_UNKNOWN)}; got {on_unknown!r}")
    guard = _Guard(store, coordination, run_id, step_key, key, holder, log)
    first = guard.enter(on_unknown)
    try:
        yield first
    except BaseException:
        if first:
            guard.finish(done=False)
        raise
    if first:
        guard.finish(done=True)


def guard_id(run_id: str, step_key: str, key: str) -> str:
    """A stable id for the effect guarded by ``once(key)``: pass it to systems that dedupe."""
    return f"{run_id}:{step_key}:{key}"
