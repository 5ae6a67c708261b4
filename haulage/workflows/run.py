"""The run handle: follow, wait for, collect, cancel and resume a run from anywhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from redis.exceptions import RedisError

from haulage.coordination import get_coordination
from haulage.dispatch.driver import cancel_executions
from haulage.errors import RunCancelled, RunFailed, RunNotFinished, RunNotFound, WaitTimeout
from haulage.progress import get_store
from haulage.progress.models import Event, RunRecord, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.tasks.agreement import lost_run_error
from haulage.tasks.app import app
from haulage.tasks.ending import end_run, fail_run
from haulage.tasks.results import Failure, Results
from haulage.workflows import registry
from haulage.workflows.finish import RESULT_KEY
from haulage.workflows.plan import compile_plan

log = logging.getLogger("haulage.run")


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

    def wait(self, timeout: float | None = None, *, poll: float = 0.2) -> RunRecord:
        """Block until the run ends; return its final document. Raises WaitTimeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.status()
            if record.terminal:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"run {self.id} still {record.status.value} after {timeout}s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

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

    def cancel(self) -> bool:
        """Cancel the run: True if this call cancelled it, False if it had already ended."""
        return cancel_run(self.id)

    def resume(self) -> Run:
        """Continue the run from its checkpoints (after a crash or a failure)."""
        return resume_run(self.id)


def _fingerprint(record: RunRecord) -> tuple[Any, ...]:
    cost = tuple(sorted((m, c.usd, c.calls) for m, c in record.cost.items()))
    steps = (record.steps.total, record.steps.done, record.steps.failed)
    return (record.status, record.percent, record.message, steps, cost, len(record.history))


def get_run(run_id: str) -> Run:
    """The handle of an existing run; RunNotFound if there is none."""
    run = Run(run_id)
    run.status()
    return run


def list_runs(*, workflow: str | None = None, status: RunStatus | str | None = None,
              created_by: str | None = None, limit: int = 50, offset: int = 0) -> list[RunRecord]:  # fmt: skip
    """Run documents, newest first."""
    return get_store().list_runs(
        workflow=workflow,
        status=RunStatus(status) if status is not None else None,
        created_by=created_by,
        limit=limit,
        offset=offset,
    )


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


def resume_run(run_id: str, *, reason: str = "resumed on request") -> Run:
    """Re-apply the run's plan: checkpointed steps return at once, the rest run."""
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
            set={"error": None, "finished_at": None, "message": "resumed", "steps.failed": 0, "heartbeat": now()},
            incr={"recoveries": 1},
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
