"""The run handle: follow, wait for, collect, cancel and resume a run from anywhere."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from typing import Any

from redis.exceptions import RedisError

from haulage.coordination import get_coordination
from haulage.dispatch.driver import cancel_executions
from haulage.errors import InvalidParams, RunCancelled, RunFailed, RunNotFinished, RunNotFound, WaitTimeout
from haulage.progress import get_store
from haulage.progress.models import Event, FailureEntry, RunRecord, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.progress.store import ChangeFeed
from haulage.tasks.agreement import lost_run_error
from haulage.tasks.app import app
from haulage.tasks.ending import end_run, fail_run
from haulage.tasks.results import Failure, Results
from haulage.workflows import registry
from haulage.workflows.finish import RESULT_KEY
from haulage.workflows.plan import compile_plan

log = logging.getLogger("haulage.run")

#: what a run id is: the hex of a UUID (uuid4, or uuid5 of an idempotency key)
RUN_ID_PATTERN = r"[0-9a-f]{32}"
_RUN_ID = re.compile(RUN_ID_PATTERN)

#: seconds between the safety-net re-reads of a run that ``Run.wait`` otherwise learns of by subscription
SAFETY_POLL = 1.0
#: the longest (seconds) and the share of the time waited so far that ``Run.wait`` lets change notices gather
NOTICE_GAP_MAX = 0.05
NOTICE_GAP_SHARE = 0.02
#: seconds of waiting before notices are gathered at all: a short run is answered at its first notice
NOTICE_GAP_AFTER = 0.5


class Run:
    """A handle on one run; cheap to create, holds no state but the id.

    >>> run = review_plan.start(project_id="p1", pages=[1, 2])
    >>> run.wait(timeout=60).status
    <RunStatus.COMPLETE: 'COMPLETE'>
    >>> run.results()
    """

    def __init__(self, run_id: str) -> None:
        self.id = run_id

    def __repr__(self) -> str:
        return f"<Run {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def status(self) -> RunRecord:
        """The run document now: status, percent, message, steps, cost, history."""
        store = get_store()
        record = store.get_run(self.id)
        if record is None:
            raise RunNotFound(f"no run with id {self.id!r}")
        if record.status is RunStatus.PENDING:
            # A worker that got its first step but not the run (settings that disagree) left a notice:
            # the run then fails here with the explanation instead of waiting forever.
            try:
                lost = lost_run_error(self.id)
            except RedisError:  # the notice is a second channel; the run document is the answer
                lost = None
            if lost and fail_run(store, self.id, lost):
                log.error("run %s: %s", self.id, lost)
                record = store.get_run(self.id) or record
        return record

    def steps(self) -> list[StepRecord]:
        return get_store().list_steps(self.id)

    def wait(self, timeout: float | None = None, *, poll: float = SAFETY_POLL) -> RunRecord:
        """Block until the run ends; return its final document. Raises WaitTimeout.

        Event-driven: the end arrives through the store's subscription (Redis
        pub/sub, or a Firestore snapshot listener), and a notice costs one
        status read, so no poll interval adds latency (notices of a busy run are
        read in batches, at most 2% of the wait later). ``poll`` is only the
        safety net: the whole document is re-read that often anyway, so a
        missed notice (or a lost subscription) delays the answer, never loses it.
        """
        begun = time.monotonic()
        deadline = None if timeout is None else begun + timeout
        store = get_store()
        feed = store.watch_changes(self.id)  # subscribed before the first read, so the end cannot slip between
        try:
            record = self.status()
            while not record.terminal:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeout(f"run {self.id} still {record.status.value} after {timeout}s")
                if _notified(feed, poll if left is None else min(poll, left)):
                    status, _ = store.load_step_state(self.id, [])
                    if status is not None and not status.terminal:
                        # A change, not the end. A busy run changes thousands of times a second: past
                        # its first half second, let the notices gather a moment (at most 2% of the wait
                        # so far, 50 ms), so that the caller does not spend a core re-reading; the end is
                        # learnt that much later at most.
                        waited = time.monotonic() - begun - NOTICE_GAP_AFTER
                        if waited > 0:
                            time.sleep(min(NOTICE_GAP_MAX, NOTICE_GAP_SHARE * waited))
                        continue
                record = self.status()
            return record
        finally:
            feed.close()

    def watch(self, timeout: float | None = None, *, resync: float = 2.0) -> Iterator[RunRecord]:
        """Yield the run document each time it changes, ending with its terminal state.

        Changes arrive through the store's subscription (Redis pub/sub, or a
        Firestore snapshot listener); the document is re-read every
        ``resync`` seconds anyway, so a missed notice only delays an update.
        Raises WaitTimeout after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        feed = get_store().watch_changes(self.id)
        try:
            last: tuple[Any, ...] | None = None
            while True:
                record = self.status()
                seen = _fingerprint(record)
                if seen != last:
                    last = seen
                    yield record
                if record.terminal:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeout(f"run {self.id} still {record.status.value} after {timeout}s")
                feed.wait(resync if left is None else min(resync, left))
        finally:
            feed.close()

    def results(self) -> Any:
        """The final output: the last stage's value, or ``Results`` when the plan ends in a fan-out.

        Raises RunFailed (with ``.failures``), RunCancelled, or RunNotFinished.
        """
        record = self.status()
        if record.status is RunStatus.COMPLETE:
            cp = get_store().get_checkpoints(self.id, [RESULT_KEY]).get(RESULT_KEY)
            value = cp.value if cp else None
            return Results.from_dict(value) if isinstance(value, dict) and Results.is_results(value) else value
        if record.status is RunStatus.FAILED:
            failures = record.result.get("failures", []) if isinstance(record.result, dict) else []
            raise RunFailed(self.id, record.error, [Failure.from_dict(f) for f in failures])
        if record.status is RunStatus.CANCELLED:
            raise RunCancelled(f"run {self.id} was cancelled")
        raise RunNotFinished(f"run {self.id} is {record.status.value}; wait() for it first")

    def failures(self) -> list[FailureEntry]:
        """The failed steps the run document lists, with each item's parameters and label, in any stage.

        The first FAILURES_LIMIT (100) of them; ``status().steps.failed`` counts all.
        """
        return self.status().failures

    def cancel(self) -> bool:
        """Cancel the run: True if this call cancelled it, False if it had already ended."""
        return cancel_run(self.id)

    def resume(self) -> Run:
        """Continue the run from its checkpoints (after a crash or a failure)."""
        return resume_run(self.id)


def _notified(feed: ChangeFeed, timeout: float) -> bool:
    """Wait on the feed; a subscription that broke degrades to the safety-net poll, it does not fail the wait."""
    try:
        return feed.wait(timeout)
    except RedisError as exc:
        log.warning("waiting on a run: the change feed failed (%s); re-reading every %.1fs", exc, timeout)
        time.sleep(timeout)
        return False


def _fingerprint(record: RunRecord) -> tuple[Any, ...]:
    cost = tuple(sorted((m, c.usd, c.calls) for m, c in record.cost.items()))
    steps = (record.steps.total, record.steps.done, record.steps.failed)
    return (record.status, record.percent, record.message, steps, cost, len(record.history))


def get_run(run_id: str) -> Run:
    """The handle of an existing run; RunNotFound if there is none."""
    run = Run(run_id)
    run.status()
    return run


#: the deepest ``offset`` list_runs accepts; page further with ``cursor`` (an offset is read and skipped)
MAX_OFFSET = 10_000


def list_runs(*, workflow: str | None = None, status: RunStatus | str | None = None,
              created_by: str | None = None, limit: int = 50, offset: int = 0,
              cursor: str | None = None) -> list[RunRecord]:  # fmt: skip
    """Run documents, newest first.

    Page with ``cursor=run_cursor(last_run_of_previous_page)``; ``offset`` is
    kept for short jumps and refused past MAX_OFFSET.

    >>> page = list_runs(created_by="ana", limit=50)
    >>> more = list_runs(created_by="ana", limit=50, cursor=run_cursor(page[-1]))
    """
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidParams("list_runs", [{"field": "offset", "message": f"must be between 0 and {MAX_OFFSET}; "
                                           "page further with cursor", "input": offset}])  # fmt: skip
    return get_store().list_runs(
        workflow=workflow,
        status=RunStatus(status) if status is not None else None,
        created_by=created_by,
        limit=limit,
        offset=offset,
        after=parse_cursor(cursor) if cursor is not None else None,
    )


def run_cursor(record: RunRecord) -> str:
    """The cursor that continues a listing after ``record`` (opaque to callers)."""
    return f"{record.created_at!r}~{record.id}"


def parse_cursor(cursor: str) -> tuple[float, str]:
    """``(created_at, run id)`` of a cursor from :func:`run_cursor`; InvalidParams when it is not one."""
    at, sep, run_id = cursor.partition("~")
    try:
        created = float(at)
    except ValueError:
        created = math.nan
    if not sep or not math.isfinite(created) or not _RUN_ID.fullmatch(run_id):
        raise InvalidParams("list_runs", [{"field": "cursor", "message": "must be a next_cursor this service returned",
                                           "input": cursor[:100]}])  # fmt: skip
    return created, run_id


def cancel_run(run_id: str) -> bool:
    store = get_store()
    if store.get_run(run_id) is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    cancelled = end_run(
        store,
        run_id,
        RunStatus.CANCELLED,
        RunUpdate(
            set={"message": "cancelled", "finished_at": now()},
            events=[Event(now(), "cancelled", "run cancelled")],
        ),
    )
    if cancelled:
        cancel_executions(run_id)  # Cloud Run executions stop now, not at their driver's next poll
        # Steps check the status before they start; revoking what is queued also
        # keeps workers from picking those messages up at all.
        waiting = [s.task_id for s in store.list_steps(run_id) if s.status is StepStatus.QUEUED and s.task_id]
        if waiting:
            app.control.revoke(waiting)
    return cancelled


def resume_run(run_id: str, *, reason: str = "resumed on request", recovery: bool = True) -> Run:
    """Re-apply the run's plan: checkpointed steps return at once, the rest run.

    ``recovery``: count it among the run's recoveries (the reaper's budget, HAULAGE_MAX_RECOVERIES).
    """
    store = get_store()
    record = store.get_run(run_id)
    if record is None:
        raise RunNotFound(f"no run with id {run_id!r}")
    if record.status is RunStatus.CANCELLED:
        raise RunCancelled(f"run {run_id} was cancelled; a cancelled run is never resumed")
    if record.status is RunStatus.COMPLETE:
        return Run(run_id)
    wf = registry.get(record.workflow)
    values, _ = wf.validate(record.params)
    canvas, _known = compile_plan(wf.build_plan(values), run_id=run_id, workflow=wf.name, on_failure=wf.on_failure)
    resumed = store.transition(
        run_id,
        RunStatus.PROCESSING,
        allowed_from={RunStatus.PENDING, RunStatus.PROCESSING, RunStatus.FAILED},
        update=RunUpdate(
            # The failed steps run again: their counts start over (stages too, so done + failed <= total),
            # and the run is no longer settled.
            set={"error": None, "finished_at": None, "message": "resumed", "steps.failed": 0, "heartbeat": now(),
                 "settled": False, **{f"stages.{i}.failed": 0 for i in range(len(record.stages))}},
            incr={"recoveries": 1} if recovery else {},
            events=[Event(now(), "resumed", reason)],
        ),
    )
    if not resumed:  # it ended (or was cancelled) meanwhile
        return Run(run_id)
    # A step failed for dying too often gets its crash budget back, as a failed one gets its retries.
    get_coordination().reset_crashes(run_id)
    canvas.apply_async()
    log.info("run %s resumed: %s", run_id, reason)
    return Run(run_id)
