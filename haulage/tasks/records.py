"""What an attempt writes on its step and its run besides the checkpoint.

The run started (PENDING -> PROCESSING), an attempt failed and the next one
is due (the step QUEUED with ``retry_at``), the step's final failure (with an
entry in the run's ``failures`` list: the item's parameters and label), and
where a step stands in the plan (stage, item index, label). The durable wrapper, the hard-timeout handler and
the Cloud Run driver all write these, so the records read the same whichever
path a step took.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from haulage.coordination import get_coordination
from haulage.errors import ConfigError, HaulageError, StepFailed, StepResultTooLarge, StoreUnavailable
from haulage.jsonutil import dumps
from haulage.progress.models import Checkpoint, Event, FailureEntry, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.progress.store import Store
from haulage.settings import get_settings
from haulage.tasks.agreement import report_missing_run
from haulage.tasks.definition import Step
from haulage.tasks.ending import fail_run
from haulage.tasks.flow import Flow, failure_ref, params_key

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
                 countdown: float, task_id: str | None, *, backend: str = "local", note: str = "",
                 flow: Flow | None = None, params: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Record that ``attempt`` failed and the next one starts in ``countdown`` seconds.

    The records are for people and the reaper; the retry itself is the broker's.
    So a store that refuses these writes too (it is down, or still full after
    refusing the result) is logged and the retry goes ahead: the message comes
    back either way, and a store that is back by then takes the next attempt's records.
    """
    log.warning("step %s of run %s failed (attempt %d): %s: %s; retry in %.1fs",
                key, run_id, attempt, error_type, message, countdown)  # fmt: skip
    # QUEUED with retry_at tells the stale-run reaper this step is waiting out its backoff.
    where = item_fields(flow, params or {}) if flow is not None else {}
    queued = StepRecord(key, step.name, StepStatus.QUEUED, attempt + 1, error_type=error_type, error=message,
                        retry_at=now() + countdown, task_id=task_id, backend=backend, message=note,
                        **where)  # fmt: skip
    event = Event(now(), "retry",
                  f"{step.name} attempt {attempt} failed ({error_type}: {message}); retrying in {countdown:.1f}s",
                  key)  # fmt: skip
    try:
        store.put_step(run_id, queued)
        store.update_run(run_id, RunUpdate(set={"heartbeat": now()}, events=[event]))
    except Exception as exc:  # the store's own client errors (optional packages): see the docstring
        log.error("step %s of run %s: could not record the retry (%s: %s); retrying anyway",
                  key, run_id, type(exc).__name__, exc)  # fmt: skip


def keep_failure_params(store: Store, run_id: str, key: str, name: str, params: dict[str, Any]) -> None:
    """Keep a failed item's parameters in the store, for the fan-in's ``Failure``; never in a task's return value.

    Create-if-absent: an item's parameters are the same at every attempt.
    """
    patiently(lambda: store.put_checkpoint(run_id, Checkpoint(params_key(key), name, params)))


def record_failure(store: Store, run_id: str, step: Step, key: str, attempt: int, error_type: str, message: str,
                   params: dict[str, Any], flow: Flow, *, backend: str = "local", note: str = "",
                   execution: str | None = None, started_at: float | None = None) -> Any:  # fmt: skip
    """Record the step's final failure: a fan-out item returns its failure reference, a chain step fails the run.

    These are the last writes of the step: lost, the run would wait for the
    reaper. So each gets a few chances (:func:`patiently`) against a store that
    refuses briefly, as a full Redis does while it frees the refused result.
    """
    where = item_fields(flow, params)
    failed = StepRecord(key, step.name, StepStatus.FAILED, attempt, error_type=error_type, error=message,
                        backend=backend, message=note, execution=execution, started_at=started_at,
                        finished_at=now(), **where)  # fmt: skip
    patiently(lambda: store.put_step(run_id, failed))
    summary = f"{step.name} failed after {attempt} attempt(s): {error_type}: {message}"
    entry = FailureEntry(step=key, name=step.name, error_type=error_type, message=message[:MESSAGE_CHARS],
                         index=flow["item"], label=where.get("label"), stage=flow["stage"],
                         params=flow.get("item_params", params))  # fmt: skip
    update = RunUpdate(incr={"steps.failed": 1, f"stages.{flow['stage']}.failed": 1},
                       events=[Event(now(), "step-failed", summary, key)], failures=[entry])  # fmt: skip
    patiently(lambda: store.update_run(run_id, update))
    log.error("step %s of run %s %s", key, run_id, summary)
    if flow["item"] is not None:
        keep_failure_params(store, run_id, key, step.name, flow.get("item_params", params))
        return failure_ref(key, flow["item"], error_type, message)
    patiently(lambda: fail_run(store, run_id, f"step {key} failed: {error_type}: {message}", key))
    raise StepFailed(f"step {key} of run {run_id} failed: {error_type}: {message}")


#: characters of an error message kept in a run document's failures list (the step document has it whole)
MESSAGE_CHARS = 500

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

    The same counter the lock release bumps; returns its new value. (The run's
    percent and message are not written here: every store derives them from the
    stages' counts, so they agree with the counts in every snapshot.)
    """
    return get_coordination().count_stage(run_id, flow["stage"])


#: characters of a label made from an item's parameters
LABEL_CHARS = 60


def item_label(template: str | None, params: dict[str, Any]) -> str:
    """What a UI shows for a fan-out item: ``template`` formatted with its parameters, else the parameters, short.

    >>> item_label("page {page}", {"page": 3})
    'page 3'
    >>> item_label(None, {"project_id": "p1", "page": 3})
    'project_id=p1, page=3'
    """
    if template:
        try:
            return template.format(**params)[:LABEL_CHARS * 2]
        except (KeyError, IndexError, ValueError, AttributeError):
            pass  # a template naming a parameter the item lacks: fall back to the parameters
    text = ", ".join(f"{k}={v if isinstance(v, (str, int, float, bool)) else dumps(v)}" for k, v in params.items())
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "\u2026"


#: fan-out items per stage that get a QUEUED row when the stage expands (HAULAGE_ITEM_ROWS_MAX)
DEFAULT_ITEM_ROWS_MAX = 1000


def item_rows_max() -> int:
    """HAULAGE_ITEM_ROWS_MAX: items per fan-out stage listed as QUEUED rows at expansion (0: none).

    Items beyond it get their row when they start; the stage's counts cover all of them.
    A row is one document write, so this bounds what an expansion costs.
    """
    raw = os.environ.get("HAULAGE_ITEM_ROWS_MAX", "").strip()
    if not raw:
        return DEFAULT_ITEM_ROWS_MAX
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"HAULAGE_ITEM_ROWS_MAX must be a whole number of rows at least 0, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"HAULAGE_ITEM_ROWS_MAX must be a whole number of rows at least 0, got {raw!r}")
    return value


def item_fields(flow: Flow, params: dict[str, Any]) -> dict[str, Any]:
    """The fields a step record carries to say where it stands in the plan: stage, item index, label."""
    if flow["item"] is None:
        return {"stage": flow["stage"]}
    item = flow.get("item_params", params)
    return {"stage": flow["stage"], "index": flow["item"], "label": item_label(flow.get("label"), item)}
