"""What an attempt writes on its step and its run besides the checkpoint.

The run started (PENDING -> PROCESSING), an attempt failed and the next one
is due (the step QUEUED with ``retry_at``), the step's final failure, and a
fan-out stage's progress. The durable wrapper, the hard-timeout handler and
the Cloud Run driver all write these, so the records read the same whichever
path a step took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from haulage.coordination import get_coordination
from haulage.errors import HaulageError, StepFailed, StepResultTooLarge, StoreUnavailable
from haulage.jsonutil import dumps
from haulage.progress.models import Checkpoint, Event, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.progress.store import Store
from haulage.settings import get_settings
from haulage.tasks.agreement import report_missing_run
from haulage.tasks.definition import Step
from haulage.tasks.ending import fail_run
from haulage.tasks.flow import Flow, failure_ref, stage_percent

log = logging.getLogger("haulage.durable")

#: store -> (bytes of JSON one checkpoint may hold, where the limit comes from). Firestore
#: holds at most 1 MiB per document (1,048,576 bytes), the value and the checkpoint's own
#: fields together; the margin keeps the fields' share.
RESULT_LIMITS = {
    "firestore": (1_000_000, "Firestore's 1 MiB document limit"),
    "redis": (512 * 1024 * 1024, "Redis's 512 MB value limit"),
}


def mark_processing(store: Store, run_id: str, flow: Flow) -> None:
    """The first stage's first step moves the run from PENDING to PROCESSING."""
    if flow["stage"] == 0:
        store.transition(
            run_id,
            RunStatus.PROCESSING,
            allowed_from={RunStatus.PENDING},
            update=RunUpdate(set={"started_at": now()}, events=[Event(now(), "started", "run started")]),
        )


#: what :func:`write_result` raises when the store refuses a result (the wrapper's failure path handles them)
RESULT_REFUSED = (StepResultTooLarge, StoreUnavailable)


def not_run(run_id: str, key: str, status: RunStatus | None) -> None:
    """Say why a delivery did not run its step: the run ended (normal), or it is not in the store (never silent)."""
    if status is None:
        report_missing_run(run_id, key)
    else:
        log.info("run %s is %s; step %s not run", run_id, status.value, key)


def check_result_size(store_name: str, step: Step, key: str, value: object) -> None:
    """Raise StepResultTooLarge when the result is over what the store holds in one checkpoint."""
    limit, source = RESULT_LIMITS.get(store_name, (0, ""))
    if not limit:
        return
    size = len(dumps(value).encode())
    if size > limit:
        raise StepResultTooLarge(
            f"step {step.name!r} ({key}) returned {size:,} bytes of JSON; the {store_name} store holds at most "
            f"{limit:,} bytes per result ({source}): store large values elsewhere (a file, a bucket) and return "
            "a reference"
        )


def write_result(store: Store, step: Step, run_id: str, checkpoint: Checkpoint, done: StepRecord,
                 update: RunUpdate) -> Checkpoint:  # fmt: skip
    """Write the step's checkpoint; a store that refuses it raises StoreUnavailable naming the step and the store.

    The store's client raises its own errors (redis-py's, or google-api-core's on
    Firestore, whose package is optional): whatever it raised becomes an error the
    step's failure path handles, retried like any failure, never an exception that
    escapes the wrapper and leaves the run PROCESSING.
    """
    check_result_size(get_settings().store, step, checkpoint.step_key, checkpoint.value)
    try:
        return store.complete_step(run_id, checkpoint, done, update)
    except HaulageError:
        raise
    except Exception as exc:  # re-raised with its type and message: see the docstring
        raise StoreUnavailable(
            f"step {step.name!r} ({checkpoint.step_key}): the {get_settings().store} store refused its result "
            f"checkpoint: {type(exc).__name__}: {exc}"
        ) from exc


def record_retry(store: Store, run_id: str, step: Step, key: str, attempt: int, error_type: str, message: str,
                 countdown: float, task_id: str | None, *, backend: str = "local", note: str = "") -> None:  # fmt: skip
    """Record that ``attempt`` failed and the next one starts in ``countdown`` seconds.

    The records are for people and the reaper; the retry itself is the broker's.
    So a store that refuses these writes too (it is down, or still full after
    refusing the result) is logged and the retry goes ahead: the message comes
    back either way, and a store that is back by then takes the next attempt's records.
    """
    log.warning("step %s of run %s failed (attempt %d): %s: %s; retry in %.1fs",
                key, run_id, attempt, error_type, message, countdown)  # fmt: skip
    # QUEUED with retry_at tells the stale-run reaper this step is waiting out its backoff.
    queued = StepRecord(key, step.name, StepStatus.QUEUED, attempt + 1, error_type=error_type, error=message,
                        retry_at=now() + countdown, task_id=task_id, backend=backend, message=note)  # fmt: skip
    event = Event(now(), "retry",
                  f"{step.name} attempt {attempt} failed ({error_type}: {message}); retrying in {countdown:.1f}s",
                  key)  # fmt: skip
    try:
        store.put_step(run_id, queued)
        store.update_run(run_id, RunUpdate(set={"heartbeat": now()}, events=[event]))
    except Exception as exc:  # the store's own client errors (optional packages): see the docstring
        log.error("step %s of run %s: could not record the retry (%s: %s); retrying anyway",
                  key, run_id, type(exc).__name__, exc)  # fmt: skip


def record_failure(store: Store, run_id: str, step: Step, key: str, attempt: int, error_type: str, message: str,
                   params: dict[str, Any], flow: Flow, *, backend: str = "local", note: str = "",
                   execution: str | None = None) -> Any:  # fmt: skip
    """Record the step's final failure: a fan-out item returns its failure reference, a chain step fails the run.

    These are the last writes of the step: lost, the run would wait for the
    reaper. So each gets a few chances (:func:`patiently`) against a store that
    refuses briefly, as a full Redis does while it frees the refused result.
    """
    failed = StepRecord(key, step.name, StepStatus.FAILED, attempt, error_type=error_type, error=message,
                        backend=backend, message=note, execution=execution)  # fmt: skip
    patiently(lambda: store.put_step(run_id, failed))
    summary = f"{step.name} failed after {attempt} attempt(s): {error_type}: {message}"
    update = RunUpdate(incr={"steps.failed": 1}, events=[Event(now(), "step-failed", summary, key)])
    patiently(lambda: store.update_run(run_id, update))
    log.error("step %s of run %s %s", key, run_id, summary)
    if flow["item"] is not None:
        return failure_ref(key, flow["item"], flow.get("item_params", params), error_type, message)
    patiently(lambda: fail_run(store, run_id, f"step {key} failed: {error_type}: {message}", key))
    raise StepFailed(f"step {key} of run {run_id} failed: {error_type}: {message}")


#: pauses (seconds) between the tries of :func:`patiently`: about 1.5 s in all
PATIENCE = (0.1, 0.2, 0.4, 0.8)


def patiently(write: Callable[[], object]) -> None:
    """Run a store write, trying again after each pause of PATIENCE while the store's client raises."""
    for pause in (*PATIENCE, None):
        try:
            write()
            return
        except HaulageError:
            raise
        except Exception as exc:  # the store's own client errors (optional packages, unnamed here)
            if pause is None:
                raise
            log.warning("store write refused (%s: %s); trying again in %.1fs", type(exc).__name__, exc, pause)
            time.sleep(pause)


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
