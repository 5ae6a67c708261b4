"""The durable step wrapper: check, lock, run, record.

Every step's Celery task runs through :func:`execute_step`, in this order:
1. a run that is terminal is never re-run: the delivery is acknowledged and does nothing;
2. a checkpoint for (run_id, step_key) is returned at once (replay), after a name check;
3. the step lock is taken (fail closed); a delivery that finds it held comes back later;
4. the step runs; its result is checked for JSON and written as a create-if-absent checkpoint;
5. failures retry with backoff (the step QUEUED meanwhile); the last attempt records the failure.
Values pass between steps through the store; messages carry references only.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from haulage.errors import (
    HaulageError,
    LockUnavailable,
    NondeterminismError,
    PlanError,
    RunCancelled,
    StepFailed,
    StepResultNotSerializable,
)
from haulage.jsonutil import check_serializable
from haulage.redis_client import get_redis
from haulage.settings import get_settings
from progress import get_store
from progress.models import (
    ACTIVE,
    Checkpoint,
    Event,
    RunStatus,
    RunUpdate,
    StepRecord,
    StepStatus,
    now,
)
from progress.store import Store
from tasks.context import StepContext
from tasks.flow import Flow, failure_ref, is_failure, ok_ref, skipped_ref, stage_percent
from tasks.heartbeat import Heartbeat
from tasks.lock import StepLock
from tasks.results import Failure, Results
from tasks.step import Step

log = logging.getLogger("haulage.durable")

# Programming errors: retrying them cannot help.
_NEVER_RETRY: tuple[type[BaseException], ...] = (
    StepResultNotSerializable,
    NondeterminismError,
    PlanError,
    TypeError,
)

#: seconds a delivery that finds the step locked waits before looking again
LOCK_WAIT = 2.0


def input_keys(flow: Flow, prev: Any) -> list[str]:
    """The checkpoint keys this step's input comes from."""
    if flow["input"] == "value" and isinstance(prev, dict) and prev.get("ok") == 1:
        return [prev["k"]]
    if flow["input"] == "results" and isinstance(prev, list):
        return [r["k"] for r in prev if isinstance(r, dict) and r.get("ok") == 1]
    return []


def build_input(flow: Flow, prev: Any, cps: dict[str, Checkpoint]) -> tuple[list[Any], Results | None]:
    """The positional input for the step, and the fan-out Results when that is what it gets."""
    if flow["input"] == "none":
        return [], None
    if flow["input"] == "value":
        cp = cps.get(prev["k"]) if isinstance(prev, dict) else None
        if cp is None:
            raise HaulageError(f"the checkpoint of the previous step {prev!r} is missing")
        return [cp.value], None
    refs = sorted((r for r in prev or [] if isinstance(r, dict)), key=lambda r: (r.get("i") or 0))
    successes, failures = [], []
    for ref in refs:
        if ref.get("ok") == 1:
            cp = cps.get(ref["k"])
            if cp is None:
                raise HaulageError(f"the checkpoint of fan-out step {ref['k']!r} is missing")
            successes.append(cp.value)
        elif "error_type" in ref:
            failures.append(Failure(ref.get("params") or {}, ref["error_type"], ref["message"], ref["k"]))
    results = Results(successes, failures)
    return [results], results


def fail_run(store: Store, run_id: str, error: str, step_key: str | None = None, result: Any = None) -> bool:
    """End the run FAILED with ``error`` unless it already ended."""
    return store.transition(
        run_id,
        RunStatus.FAILED,
        allowed_from=ACTIVE,
        update=RunUpdate(
            set={"error": error, "message": error, "finished_at": now(), "result": result},
            events=[Event(now(), "failed", error, step_key)],
        ),
    )


def policy_blocks(store: Store, run_id: str, flow: Flow, results: Results | None, key: str) -> bool:
    """Apply on_failure="fail": a fan-out with failures ends the run before the next stage."""
    if results is None or results.ok or flow["on_failure"] != "fail":
        return False
    first = results.failures[0]
    fail_run(
        store,
        run_id,
        f"{len(results.failures)} of {len(results)} fan-out items failed "
        f"(first: {first.step}: {first.error_type}: {first.message})",
        key,
        result=results_summary(results),
    )
    return True


#: failures listed in a run document's result summary
SUMMARY_FAILURES = 100


def results_summary(results: Results) -> dict[str, Any]:
    return {
        "successes": len(results.successes),
        "failed": len(results.failures),
        "failures": [f.to_dict() for f in results.failures[:SUMMARY_FAILURES]],
    }


def mark_processing(store: Store, run_id: str, flow: Flow) -> None:
    if flow["stage"] == 0:
        store.transition(
            run_id,
            RunStatus.PROCESSING,
            allowed_from={RunStatus.PENDING},
            update=RunUpdate(set={"started_at": now()}, events=[Event(now(), "started", "run started")]),
        )


def execute_step(task: Any, step: Step, *args: Any, run_id: str, key: str, params: dict[str, Any],
                 flow: Flow) -> Any:  # fmt: skip
    store = get_store()
    item = flow["item"]
    prev = args[0] if args else None
    if flow["input"] == "value" and is_failure(prev):
        return prev  # an earlier step of this fan-out item failed: carry its failure to the fan-in

    status, cps = store.load_step_state(run_id, [key, *input_keys(flow, prev)])
    if status is None or status.terminal:
        log.info("run %s is %s; step %s not run", run_id, status.value if status else "gone", key)
        return skipped_ref(key, item, status.value if status else "missing")
    own = cps.get(key)
    if own is not None:
        try:
            _check_name(own, step.name, key)
        except NondeterminismError as exc:
            fail_run(store, run_id, f"{type(exc).__name__}: {exc}", key)
            raise
        return ok_ref(key, item)
    inputs, results = build_input(flow, prev, cps)
    if policy_blocks(store, run_id, flow, results, key):
        return skipped_ref(key, item, "failed")

    lock = StepLock(get_redis(), run_id, key, step.hard_limit + get_settings().lock_margin)
    try:
        acquired = lock.acquire()
    except LockUnavailable as exc:
        log.warning("step %s of run %s: %s; retrying later", key, run_id, exc)
        raise task.retry(countdown=LOCK_WAIT, exc=exc) from exc
    if not acquired:
        # Another delivery of this step runs now; come back and find its checkpoint.
        raise task.retry(countdown=LOCK_WAIT * random.uniform(0.5, 1.5))

    attempt = flow["attempt"]
    counted: int | None = None
    try:
        record = StepRecord(key, step.name, StepStatus.RUNNING, attempt, task_id=task.request.id)
        mark_processing(store, run_id, flow)
        if store.start_step(run_id, record, RunUpdate(set={"heartbeat": now()})) is not None:
            return ok_ref(key, item)  # finished by another delivery while we waited for the lock
        if lock.stolen:
            log.warning("step %s of run %s: took the lock over from a holder that died", key, run_id)
        ctx = StepContext(store, run_id=run_id, step_key=key, step_name=step.name, attempt=attempt, flow=flow)
        try:
            with Heartbeat(lock, store, run_id):
                value = step.func(ctx, *inputs, **params)
            reason = check_serializable(value)
            if reason:
                raise StepResultNotSerializable(
                    f"step {step.name!r} ({key}) returned a value that is not JSON: {reason}"
                )
        except RunCancelled:
            store.put_step(run_id, StepRecord(key, step.name, StepStatus.CANCELLED, attempt))
            return skipped_ref(key, item, RunStatus.CANCELLED.value)
        except Exception as exc:
            if _retryable(step, exc) and not step.policy.exhausted(attempt):
                countdown = step.policy.countdown(attempt)
                _record_retry(store, run_id, step, key, attempt, exc, countdown, task.request.id)
                retry_flow = dict(flow, attempt=attempt + 1)
                raise task.retry(
                    countdown=countdown, kwargs={"run_id": run_id, "key": key, "params": params, "flow": retry_flow}
                ) from exc
            counted = flow["stage"]
            return _record_failure(store, run_id, step, key, attempt, exc, params, flow)

        checkpoint = Checkpoint(key, step.name, value, attempt)
        done = StepRecord(key, step.name, StepStatus.COMPLETE, attempt, percent=100.0, task_id=task.request.id)
        update = RunUpdate(incr={"steps.done": 1}, set={"heartbeat": now()})
        if item is None:
            update.maximum["percent"] = stage_percent(flow, flow["units"])
            update.events.append(Event(now(), "step", f"{step.name} complete", key))
        stored = store.complete_step(run_id, checkpoint, done, update)
        if stored is not checkpoint:
            _check_name(stored, step.name, key)
        elif item is not None:
            counted = flow["stage"]
        return ok_ref(key, item)
    finally:
        finished = lock.release(count_stage=counted)
        if counted is not None and item is not None:
            _report_stage_progress(store, run_id, flow, finished)


def _check_name(cp: Checkpoint, name: str, key: str) -> None:
    if cp.name != name:
        raise NondeterminismError(
            f"step {key!r} was checkpointed by {cp.name!r} but is now {name!r}; "
            "the workflow's plan changed while this run was in flight: check that it is deterministic"
        )


def _retryable(step: Step, exc: Exception) -> bool:
    return not isinstance(exc, _NEVER_RETRY + step.no_retry_on)


def _record_retry(store: Store, run_id: str, step: Step, key: str, attempt: int, exc: Exception,
                  countdown: float, task_id: str | None) -> None:  # fmt: skip
    # QUEUED with retry_at tells the stale-run reaper this step is waiting out its backoff.
    store.put_step(
        run_id,
        StepRecord(key, step.name, StepStatus.QUEUED, attempt + 1, error_type=type(exc).__name__,
                   error=str(exc), retry_at=now() + countdown, task_id=task_id),  # fmt: skip
    )
    store.update_run(
        run_id,
        RunUpdate(
            set={"heartbeat": now()},
            events=[Event(now(), "retry", f"{step.name} attempt {attempt} failed ({type(exc).__name__}: {exc}); "
                          f"retrying in {countdown:.1f}s", key)],  # fmt: skip
        ),
    )
    log.warning("step %s of run %s failed (attempt %d): %s: %s; retry in %.1fs",
                key, run_id, attempt, type(exc).__name__, exc, countdown)  # fmt: skip


def _record_failure(store: Store, run_id: str, step: Step, key: str, attempt: int, exc: Exception,
                    params: dict[str, Any], flow: Flow) -> Any:  # fmt: skip
    error_type, message = type(exc).__name__, str(exc)
    store.put_step(
        run_id, StepRecord(key, step.name, StepStatus.FAILED, attempt, error_type=error_type, error=message)
    )
    summary = f"{step.name} failed after {attempt} attempt(s): {error_type}: {message}"
    store.update_run(run_id, RunUpdate(incr={"steps.failed": 1}, events=[Event(now(), "step-failed", summary, key)]))
    log.error("step %s of run %s %s", key, run_id, summary)
    if flow["item"] is not None:
        return failure_ref(key, flow["item"], flow.get("item_params", params), error_type, message)
    fail_run(store, run_id, f"step {key} failed: {error_type}: {message}", key)
    raise StepFailed(f"step {key} of run {run_id} failed: {error_type}: {message}")


def _report_stage_progress(store: Store, run_id: str, flow: Flow, finished: int) -> None:
    # Write the percent only when its whole number moves: a 1,000-item fan-out
    # makes at most 100 such writes, not 1,000.
    now_pct, before = stage_percent(flow, finished), stage_percent(flow, finished - 1)
    if int(now_pct) != int(before) or finished >= flow["units"]:
        store.update_run(run_id, RunUpdate(maximum={"percent": now_pct}))
