"""What an attempt writes on its step and its run besides the checkpoint.

The run started (PENDING -> PROCESSING), an attempt failed and the next one
is due (the step QUEUED with ``retry_at``), the step's final failure, and a
fan-out stage's progress. The durable wrapper, the hard-timeout handler and
the Cloud Run driver all write these, so the records read the same whichever
path a step took.
"""

from __future__ import annotations

import logging
from typing import Any

from haulage.coordination import get_coordination
from haulage.errors import StepFailed
from haulage.progress.models import Event, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.progress.store import Store
from haulage.tasks.definition import Step
from haulage.tasks.ending import fail_run
from haulage.tasks.flow import Flow, failure_ref, stage_percent

log = logging.getLogger("haulage.durable")


def mark_processing(store: Store, run_id: str, flow: Flow) -> None:
    """The first stage's first step moves the run from PENDING to PROCESSING."""
    if flow["stage"] == 0:
        store.transition(
            run_id,
            RunStatus.PROCESSING,
            allowed_from={RunStatus.PENDING},
            update=RunUpdate(set={"started_at": now()}, events=[Event(now(), "started", "run started")]),
        )


def record_retry(store: Store, run_id: str, step: Step, key: str, attempt: int, error_type: str, message: str,
                 countdown: float, task_id: str | None, *, backend: str = "local", note: str = "") -> None:  # fmt: skip
    """Record that ``attempt`` failed and the next one starts in ``countdown`` seconds."""
    # QUEUED with retry_at tells the stale-run reaper this step is waiting out its backoff.
    store.put_step(
        run_id,
        StepRecord(
            key,
            step.name,
            StepStatus.QUEUED,
            attempt + 1,
            error_type=error_type,
            error=message,
            retry_at=now() + countdown,
            task_id=task_id,
            backend=backend,
            message=note,
        ),  # fmt: skip
    )
    store.update_run(
        run_id,
        RunUpdate(
            set={"heartbeat": now()},
            events=[
                Event(
                    now(),
                    "retry",
                    f"{step.name} attempt {attempt} failed ({error_type}: {message}); retrying in {countdown:.1f}s",
                    key,
                )
            ],  # fmt: skip
        ),
    )
    log.warning("step %s of run %s failed (attempt %d): %s: %s; retry in %.1fs",
                key, run_id, attempt, error_type, message, countdown)  # fmt: skip


def record_failure(store: Store, run_id: str, step: Step, key: str, attempt: int, error_type: str, message: str,
                   params: dict[str, Any], flow: Flow, *, backend: str = "local", note: str = "",
                   execution: str | None = None) -> Any:  # fmt: skip
    """Record the step's final failure: a fan-out item returns its failure reference, a chain step fails the run."""
    store.put_step(
        run_id,
        StepRecord(
            key,
            step.name,
            StepStatus.FAILED,
            attempt,
            error_type=error_type,
            error=message,
            backend=backend,
            message=note,
            execution=execution,
        ),  # fmt: skip
    )
    summary = f"{step.name} failed after {attempt} attempt(s): {error_type}: {message}"
    store.update_run(run_id, RunUpdate(incr={"steps.failed": 1}, events=[Event(now(), "step-failed", summary, key)]))
    log.error("step %s of run %s %s", key, run_id, summary)
    if flow["item"] is not None:
        return failure_ref(key, flow["item"], flow.get("item_params", params), error_type, message)
    fail_run(store, run_id, f"step {key} failed: {error_type}: {message}", key)
    raise StepFailed(f"step {key} of run {run_id} failed: {error_type}: {message}")


def count_finished_unit(run_id: str, flow: Flow) -> int:
    """Count one finished unit of the step's stage without holding its lock (a dispatcher recording a failure).

    The same counter the lock release bumps; returns its new value.
    """
    return get_coordination().count_stage(run_id, flow["stage"])


def report_stage_progress(store: Store, run_id: str, flow: Flow, finished: int) -> None:
    """Move the run's percent for a stage with ``finished`` units done."""
    # Write the percent only when its whole number moves: a 1,000-item fan-out
    # makes at most 100 such writes, not 1,000.
    now_pct, before = stage_percent(flow, finished), stage_percent(flow, finished - 1)
    if int(now_pct) != int(before) or finished >= flow["units"]:
        store.update_run(run_id, RunUpdate(maximum={"percent": now_pct}))
