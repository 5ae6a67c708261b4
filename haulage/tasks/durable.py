"""The durable step wrapper: check, lock, run, record.

Every attempt at a step runs through :class:`Attempt`, in this order:
1. a run that is terminal is never re-run: the delivery is acknowledged and does nothing;
2. a checkpoint for (run_id, step_key) is returned at once (replay), after a name check;
3. the step lock is taken (fail closed); a delivery that finds it held comes back later;
   one that takes it over from a holder that died re-runs that attempt (a crash is not a failure);
4. the step runs; its result is checked for JSON and written as a create-if-absent checkpoint;
5. failures retry with backoff (the step QUEUED meanwhile); the last attempt records the failure.
Values pass between steps through the store; messages carry references only.
The pieces live beside it: reading checkpoints (``checkpoints``), the records
an attempt writes (``records``), ending a run (``ending``), the step lock
(``lock``) and the once-guard (``guards``).

``Attempt`` holds no Celery: a Celery task runs it through :func:`execute_step`
(:class:`CeleryAttempt`), and the Cloud Run job container (``haulage.dispatch.job``)
through its own subclass, so both run the same checks, lock and checkpoint.
The hooks a subclass adapts are where the two differ: waiting for a held lock,
and what a failed attempt does next (retry here, or report to the dispatcher).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from haulage.coordination import FanInEntry, get_coordination
from haulage.errors import Cancelled, LockUnavailable, NondeterminismError, RunCancelled, StepResultNotSerializable
from haulage.jsonutil import check_serializable
from haulage.logs import step_scope
from haulage.progress import get_store
from haulage.progress.models import Checkpoint, Event, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.progress.store import Store
from haulage.settings import get_settings
from haulage.tasks.checkpoints import build_input, check_name, input_keys
from haulage.tasks.context import StepContext
from haulage.tasks.definition import Step
from haulage.tasks.ending import fail_run, policy_blocks
from haulage.tasks.fan_in import (
    FAN_IN_WAIT,
    LEASE_SECONDS,
    ContinuationUnpublished,
    FanInIncomplete,
    publish_continuation,
    report_item,
    report_or_retry,
    resolve_input,
)
from haulage.tasks.flow import Flow, is_failure, ok_ref, skipped_ref
from haulage.tasks.heartbeat import Heartbeat
from haulage.tasks.lock import StepLock
from haulage.tasks.records import (
    RESULT_REFUSED,
    item_fields,
    mark_processing,
    not_run,
    record_failure,
    record_retry,
    write_result,
)
from haulage.tasks.results import Results
from haulage.tasks.retry import retryable

log = logging.getLogger("haulage.durable")

#: seconds a delivery that finds the step locked waits before looking again
LOCK_WAIT = 2.0
#: seconds between tries of a fan-out item's report after its lock release failed on Redis (about 7 s in all)
REPORT_RETRY_DELAYS = (0.5, 1.0, 2.0, 3.5)


@dataclass
class Finished:
    """What :func:`prepare` returns when the step must not run: the reference to return instead."""

    ref: Any
    status: RunStatus | None = None  #: the run's status when it is terminal (or None: gone or not terminal)


@dataclass
class Ready:
    """What :func:`prepare` returns when the step should run: its input."""

    inputs: list[Any]
    results: Results | None
    status: RunStatus | None = None  #: the run's status as read with the checkpoints


def prepare(store: Store, step: Step, args: tuple[Any, ...], *, run_id: str, key: str,
            flow: Flow) -> Finished | Ready:  # fmt: skip
    """The checks made before anything runs: a failed input, a terminal run, a checkpoint, the fan-in policy."""
    item = flow["item"]
    prev = resolve_input(args[0] if args else None)  # after a fan-out: the fan-in's references
    if flow["input"] == "value" and is_failure(prev):
        return Finished(prev)  # an earlier step of this fan-out item failed: carry its failure to the fan-in
    status, cps = store.load_step_state(run_id, [key, *input_keys(flow, prev)])
    if status is None or status.terminal:
        not_run(run_id, key, status)  # a run missing from the store is an ERROR with its likely cause
        return Finished(skipped_ref(key, item, status.value if status else "missing"), status)
    own = cps.get(key)
    if own is not None:
        try:
            check_name(own, step.name, key)
        except NondeterminismError as exc:
            fail_run(store, run_id, f"{type(exc).__name__}: {exc}", key)
            raise
        return Finished(ok_ref(key, item))
    inputs, results = build_input(flow, prev, cps)
    if policy_blocks(store, run_id, flow, results, key):
        return Finished(skipped_ref(key, item, "failed"))
    return Ready(inputs, results, status)


class Attempt:
    """One attempt at one step, run durably; subclasses adapt it to where it runs.

    ``backend`` is recorded on the step ("local", "local-fallback", "cloudrun")
    with ``note`` (why it runs there) and ``execution`` (a Cloud Run execution).
    """

    def __init__(self, step: Step, *, run_id: str, key: str, params: dict[str, Any], flow: Flow,
                 task_id: str | None = None, backend: str = "local", note: str = "",
                 execution: str | None = None) -> None:  # fmt: skip
        self.step = step
        self.run_id = run_id
        self.key = key
        self.params = params
        self.flow = flow
        self.attempt = flow["attempt"]
        self.task_id = task_id
        self.backend = backend
        self.note = note
        self.execution = execution
        #: the stage whose finished-unit counter this attempt bumps when it releases the lock
        self.counted: int | None = None
        self.started_at: float | None = None  #: when this attempt took the lock and began
        #: True once the lock's release recorded this fan-out item's reference in its fan-in
        self.reported = False

    #: whether this attempt records a fan-out item's end in the fan-in itself (see :meth:`release`)
    reports_fan_in = False

    # --- hooks ----------------------------------------------------------
    def acquire(self, lock: StepLock) -> bool:
        """Take the step lock. False: give up because the step was finished meanwhile."""
        raise NotImplementedError

    def on_error(self, store: Store, exc: Exception) -> Any:
        """The step raised ``exc``: retry, record the failure, or report it. Returns the step's reference."""
        raise NotImplementedError

    # --- the core -------------------------------------------------------
    def previous_attempt_died(self, store: Store, before: StepRecord | None) -> Any:
        """After a lock takeover: re-run the dead holder's attempt, within the crash budget.

        A killed worker (SIGKILL, OOM, a lost machine) ends an attempt without
        an exception anyone could catch; ``before``, the step record as the
        dead holder left it, still says RUNNING at this attempt. That is not the
        step failing, so it does not use up the step's ``retries``: the same
        attempt runs again. Deaths have a budget of their own
        (HAULAGE_CRASH_RETRIES re-runs), so that a step that kills its worker
        every time fails instead of looping. Returns the failure reference
        when the budget is spent, else None and this delivery runs the attempt.
        A hard timeout is not a death here: its next attempt comes with a
        higher number (see ``haulage.tasks.timeouts``) and counts against ``retries``.
        """
        if before is None or before.status is not StepStatus.RUNNING or before.attempt < self.attempt:
            return None
        deaths = get_coordination().count_crash(self.run_id, self.key)
        budget = get_settings().crash_retries
        if deaths > budget:
            self.counted = self.flow["stage"]
            message = (f"the worker running the step died {deaths} times "
                       f"(HAULAGE_CRASH_RETRIES={budget} re-runs after a crash allowed)")  # fmt: skip
            return record_failure(store, self.run_id, self.step, self.key, self.attempt, "WorkerLost", message,
                                  self.params, self.flow, backend=self.backend, note=self.note,
                                  started_at=self.started_at)  # fmt: skip
        store.update_run(self.run_id, RunUpdate(events=[Event(
            now(), "crash", f"{self.step.name} attempt {self.attempt} was cut short: the worker running it died "
            f"(crash {deaths} of {budget} allowed); running it again", self.key)]))  # fmt: skip
        return None

    def record(self, status: StepStatus, **fields: Any) -> StepRecord:
        fields.setdefault("started_at", self.started_at)
        return StepRecord(self.key, self.step.name, status, self.attempt, backend=self.backend,
                          message=self.note, execution=self.execution, **item_fields(self.flow, self.params),
                          **fields)  # fmt: skip

    def wait_for_fan_in(self, exc: FanInIncomplete) -> BaseException:
        """What to raise when the fan-in this step follows has not fully landed: here, the error itself."""
        return exc

    def run(self, *args: Any) -> Any:
        store = get_store()
        step, run_id, key, flow = self.step, self.run_id, self.key, self.flow
        item = flow["item"]
        try:
            ready = prepare(store, step, args, run_id=run_id, key=key, flow=flow)
        except FanInIncomplete as exc:
            raise self.wait_for_fan_in(exc) from exc
        if isinstance(ready, Finished):
            return ready.ref

        lock = StepLock(get_coordination(), run_id, key, step.hard_limit + get_settings().lock_margin)
        if not self.acquire(lock):
            return ok_ref(key, item)
        ref: Any = None
        try:
            ref = self.run_held(store, lock, ready)
            return ref
        finally:
            self.release(lock, ref)

    def run_held(self, store: Store, lock: StepLock, ready: Ready) -> Any:
        """The attempt proper, under the step lock; returns the step's reference."""
        step, run_id, key, flow = self.step, self.run_id, self.key, self.flow
        item = flow["item"]
        # Read before this attempt's own record replaces it: what the holder we took over from left.
        before = store.get_step(run_id, key) if lock.stolen else None
        self.started_at = now()
        if ready.status is RunStatus.PENDING:  # else it is PROCESSING already: spare the transition's round trip
            mark_processing(store, run_id, flow)
        if store.start_step(run_id, self.record(StepStatus.RUNNING, task_id=self.task_id),
                            RunUpdate(set={"heartbeat": now()})) is not None:  # fmt: skip
            return ok_ref(key, item)  # finished by another delivery while we waited for the lock
        if lock.stolen:
            log.warning("step %s of run %s: took the lock over from a holder that died", key, run_id)
            dead = self.previous_attempt_died(store, before)
            if dead is not None:
                return dead
        last_error = flow.get("last_error")
        if last_error and step.policy.exhausted(self.attempt - 1):
            # The previous attempt was killed at its hard time limit and it was the last one allowed.
            self.counted = flow["stage"]
            return record_failure(store, run_id, step, key, self.attempt - 1, last_error[0], last_error[1],
                                  self.params, flow, backend=self.backend, note=self.note,
                                  started_at=self.started_at)  # fmt: skip
        ctx = StepContext(store, run_id=run_id, step_key=key, step_name=step.name, attempt=self.attempt,
                          flow=flow, backend=self.backend, lock_token=lock.token)  # fmt: skip
        try:
            with Heartbeat(lock, store, run_id), step_scope(run_id=run_id, step_key=key, attempt=self.attempt,
                                                            backend=self.backend):  # fmt: skip
                value = step.func(ctx, *ready.inputs, **self.params)
            reason = check_serializable(value)
            if reason:
                raise StepResultNotSerializable(
                    f"step {step.name!r} ({key}) returned a value that is not JSON: {reason}"
                )
        except (Cancelled, RunCancelled):
            store.put_step(run_id, self.record(StepStatus.CANCELLED))
            return skipped_ref(key, item, RunStatus.CANCELLED.value)
        except Exception as exc:
            return self.on_error(store, exc)

        checkpoint = Checkpoint(key, step.name, value, self.attempt)
        done = self.record(StepStatus.COMPLETE, percent=100.0, task_id=self.task_id, finished_at=now())
        update = RunUpdate(incr={"steps.done": 1, f"stages.{flow['stage']}.done": 1}, set={"heartbeat": now()})
        if item is None:
            # The store derives the run's percent from the stages' counts (models.work_percent).
            update.events.append(Event(now(), "step", f"{step.name} complete", key))
        try:
            stored = write_result(store, step, run_id, checkpoint, done, update)
        except RESULT_REFUSED as exc:  # the store refused the result: the step's failure path, not a stall
            return self.on_error(store, exc)
        if stored is not checkpoint:
            check_name(stored, step.name, key)
        elif item is not None:
            self.counted = flow["stage"]
        return ok_ref(key, item)

    def release(self, lock: StepLock, ref: Any) -> None:
        """Release the lock; a fan-out item's last step records its reference in the fan-in in the same trip."""
        total = self.flow.get("fan_in")
        entry = None
        if self.reports_fan_in and total is not None and self.flow["item"] is not None and isinstance(ref, dict):
            entry = FanInEntry(self.flow["stage"], self.flow["item"], ref, int(total), self.task_id or lock.token,
                               LEASE_SECONDS)  # fmt: skip
        outcome = lock.release(count_stage=self.counted, fan_in=entry)
        if entry is not None:
            self.reported = True
            if outcome.continue_stage:
                publish_continuation(self.run_id, self.flow["stage"], int(total))  # type: ignore[arg-type]


class CeleryAttempt(Attempt):
    """An attempt run by a step's Celery task: a held lock and a failure both come back as ``task.retry``."""

    reports_fan_in = True  # a Cloud Run job's attempt does not: its driver task reports for it

    def __init__(self, task: Any, step: Step, **kwargs: Any) -> None:
        super().__init__(step, task_id=task.request.id, **kwargs)
        self.task = task

    def wait_for_fan_in(self, exc: FanInIncomplete) -> BaseException:
        log.info("step %s: %s", self.key, exc)
        return self.task.retry(countdown=FAN_IN_WAIT, max_retries=None)  # not an attempt: nothing ran

    def acquire(self, lock: StepLock) -> bool:
        try:
            acquired = lock.acquire()
        except LockUnavailable as exc:
            log.warning("step %s of run %s: %s; retrying later", self.key, self.run_id, exc)
            raise self.task.retry(countdown=LOCK_WAIT, exc=exc) from exc
        if not acquired:
            # Another delivery of this step runs now; come back and find its checkpoint.
            raise self.task.retry(countdown=LOCK_WAIT * random.uniform(0.5, 1.5))
        return True

    def release(self, lock: StepLock, ref: Any) -> None:
        try:
            super().release(lock, ref)
        except ContinuationUnpublished as exc:
            raise self.task.retry(countdown=LOCK_WAIT, max_retries=None) from exc  # replays, holds the lease
        except RedisError as exc:
            if ref is None:
                raise  # the attempt is failing already: its own error goes on
            # The result is checkpointed, but the release carrying its fan-in report was lost with Redis.
            # Failing the task would ack it, and the stage would wait for this item until the reaper
            # (found by SIGKILLing Redis mid-fan-out). The report is idempotent per item: try it again
            # across a restart, then hand it to a retry, which replays from the checkpoint and reports it.
            log.warning("step %s of run %s: releasing its lock failed (%s); reporting it again", self.key,
                        self.run_id, exc)  # fmt: skip
            for delay in REPORT_RETRY_DELAYS:
                time.sleep(delay)
                try:
                    report_item(self.run_id, self.flow, ref, self.task_id or lock.token)
                except (RedisError, ContinuationUnpublished):
                    continue
                self.reported = True
                return
            raise self.task.retry(countdown=LOCK_WAIT, exc=exc) from exc

    def on_error(self, store: Store, exc: Exception) -> Any:
        step, attempt = self.step, self.attempt
        error_type, message = type(exc).__name__, str(exc)
        if retryable(exc, step.no_retry_on) and not step.policy.exhausted(attempt):
            countdown = step.policy.countdown(attempt)
            record_retry(store, self.run_id, step, self.key, attempt, error_type, message, countdown, self.task_id,
                         backend=self.backend, note=self.note, flow=self.flow, params=self.params)  # fmt: skip
            raise self.task.retry(countdown=countdown, kwargs=self.retry_kwargs()) from exc
        self.counted = self.flow["stage"]
        return record_failure(store, self.run_id, step, self.key, attempt, error_type, message, self.params,
                              self.flow, backend=self.backend, note=self.note, started_at=self.started_at)  # fmt: skip

    def retry_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"run_id": self.run_id, "key": self.key, "params": self.params,
                                  "flow": dict(self.flow, attempt=self.attempt + 1)}  # fmt: skip
        if self.backend != "local":  # a fallback stays one on its retries
            kwargs.update(backend=self.backend, backend_note=self.note)
        return kwargs


def execute_step(task: Any, step: Step, *args: Any, run_id: str, key: str, params: dict[str, Any],
                 flow: Flow, backend: str = "local", backend_note: str = "") -> Any:  # fmt: skip
    """The body of every step's Celery task (``backend``/``backend_note``: set by a Cloud Run fallback)."""
    attempt = CeleryAttempt(task, step, run_id=run_id, key=key, params=params, flow=flow, backend=backend,
                            note=backend_note)  # fmt: skip
    ref = attempt.run(*args)
    if not attempt.reported:  # ended without the lock (a replay, a terminal run): record it on its own
        report_or_retry(task, run_id, flow, ref, countdown=LOCK_WAIT)
    return ref
