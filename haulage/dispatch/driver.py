"""The Cloud Run path: a small Celery task that drives one attempt of one step as a Cloud Run execution.

:func:`haulage.dispatch.dispatcher.signature_for` sends a step here when it
runs on Cloud Run: :func:`drive_execution` on the ``dispatch`` queue. The driver:

1. makes the durable wrapper's checks (terminal run, checkpoint, fan-in policy);
2. re-attaches to the execution recorded on the step for this attempt, if any,
   so a redelivered driver never starts a second one;
3. otherwise stores the step's message (:mod:`haulage.dispatch.handoff`), marks the step
   as starting, calls ``RunJob`` with the env overrides, and records the
   execution's name on the step before it waits;
4. polls ``GetExecution`` with short countdown retries (``task.retry``): no
   worker is held, nothing blocks, and Haulage's own deadline (the step's
   timeout plus HAULAGE_CLOUDRUN_DEADLINE_MARGIN) cancels a stuck execution;
5. when the execution ends, succeeds only if the step's checkpoint exists (done
   without error is not success); otherwise applies the step's retry policy,
   recording retries and failures as the local path does, so a fan-in gets the
   same failure references.

Cloud Run not configured, its client failing to initialise, or ``RunJob``
failing sends the step to its local queue instead (``backend: local-fallback``
on the step and in the run's history). A call that failed ambiguously (it may
have started an execution: a deadline, an unavailable server) first looks for
that execution by its env overrides; the step's lock and checkpoint make sure
that two executions, or an execution and a fallback, never both commit.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from redis.exceptions import RedisError

from haulage.dispatch import handoff
from haulage.dispatch.cloudrun import CloudRunJobs, created_at, get_cloudrun, is_done, job_name, outcome, succeeded
from haulage.dispatch.job_config import read_key
from haulage.dispatch.routing import CLOUDRUN, LOCAL_FALLBACK
from haulage.errors import (
    CloudRunNotConfigured,
    CloudRunUnavailable,
    ConfigError,
    ExecutionDeadlineExceeded,
    ExecutionFailed,
)
from haulage.progress import get_store
from haulage.progress.models import Checkpoint, Event, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.settings import get_settings
from haulage.tasks.app import app
from haulage.tasks.checkpoints import check_name
from haulage.tasks.definition import Step
from haulage.tasks.durable import Finished, prepare
from haulage.tasks.fan_in import FAN_IN_WAIT, FanInIncomplete, report_or_retry
from haulage.tasks.flow import Flow, ok_ref, skipped_ref
from haulage.tasks.queues import queue_for
from haulage.tasks.records import (
    count_finished_unit,
    mark_processing,
    record_failure,
    record_retry,
)
from haulage.tasks.step import get_step

log = logging.getLogger("haulage.dispatch")

#: the driver's Celery task name
DRIVER_TASK = "haulage.dispatch.cloudrun"
#: seconds a driver that could not reach Redis waits before trying again (fail closed)
REDIS_WAIT = 2.0
#: step message while RunJob is in flight; a redelivered driver that finds it looks for the execution
STARTING = "starting a Cloud Run execution"
#: RunJob errors after which an execution may exist all the same
_AMBIGUOUS = ("DeadlineExceeded", "ServiceUnavailable", "InternalServerError", "Unknown", "GatewayTimeout")

_fallbacks_logged: set[str] = set()


@app.task(name=DRIVER_TASK, bind=True, typing=False, max_retries=None)
def drive_execution(task: Any, *args: Any, run_id: str, key: str, params: dict[str, Any], flow: Flow,
                    step: str) -> Any:  # fmt: skip
    """Run one step as a Cloud Run execution (see the module docstring); returns the step's reference."""
    driver = Driver(task, get_step(step), args, run_id=run_id, key=key, params=params, flow=flow)
    try:
        ref = driver.run()
        report_or_retry(task, run_id, flow, ref, countdown=REDIS_WAIT)  # a fan-out item's last step: counted
        return ref
    except RedisError as exc:
        # Without the store we cannot know what was started: do nothing, come back.
        log.warning("step %s of run %s: Redis error (%s); trying again in %.0fs", key, run_id, exc, REDIS_WAIT)
        raise task.retry(countdown=REDIS_WAIT, exc=exc) from exc


def cancel_executions(run_id: str) -> list[str]:
    """Cancel the Cloud Run executions of a run's running steps; return the names asked to cancel.

    For ``cancel_run``: the drivers notice a cancelled run at their next poll
    and cancel too, this only saves that interval. Errors are logged, not raised.
    """
    steps = [s for s in get_store().list_steps(run_id)
             if s.backend == CLOUDRUN and s.execution and s.status is StepStatus.RUNNING]  # fmt: skip
    if not steps:
        return []
    from google.api_core.exceptions import GoogleAPIError  # optional: the [cloudrun] extra

    try:
        cloud = get_cloudrun()
    except CloudRunUnavailable as exc:
        log.warning("run %s: cannot cancel %d Cloud Run execution(s): %s", run_id, len(steps), exc)
        return []
    cancelled = []
    for s in steps:
        assert s.execution is not None
        try:
            if cloud.cancel_execution(s.execution):
                cancelled.append(s.execution)
        except GoogleAPIError as exc:
            log.warning("run %s: cannot cancel execution %s: %s", run_id, s.execution, exc)
    if cancelled:
        log.info("run %s: cancelled %d Cloud Run execution(s)", run_id, len(cancelled))
    return cancelled


class Driver:
    """One delivery of the driver task: decides whether to start, attach to, poll or give up an execution."""

    def __init__(self, task: Any, step: Step, args: tuple[Any, ...], *, run_id: str, key: str,
                 params: dict[str, Any], flow: Flow) -> None:  # fmt: skip
        self.task = task
        self.step = step
        self.args = args
        self.run_id = run_id
        self.key = key
        self.params = params
        self.flow = flow
        self.attempt = flow["attempt"]
        self.item = flow["item"]
        self.store = get_store()
        self.settings = get_settings()

    def run(self) -> Any:
        try:
            ready = prepare(self.store, self.step, self.args, run_id=self.run_id, key=self.key, flow=self.flow)
        except FanInIncomplete as exc:
            log.info("step %s: %s", self.key, exc)
            raise self.task.retry(countdown=FAN_IN_WAIT, max_retries=None) from exc
        record = self.store.get_step(self.run_id, self.key)
        if isinstance(ready, Finished):
            if ready.status is not None:
                self._stop(record, ready.status)
            elif record is not None and record.backend == CLOUDRUN:
                handoff.clear(self.run_id, self.key)
            return ready.ref
        if record is not None and record.backend == CLOUDRUN and record.attempt > self.attempt:
            # A later attempt was recorded (this message is a stale redelivery): follow it.
            self.attempt = record.attempt
            self.flow = cast(Flow, dict(self.flow, attempt=record.attempt))
        if record is not None and record.backend == LOCAL_FALLBACK and record.attempt == self.attempt:
            # This delivery already fell back before it was redelivered: do that again, not start Cloud Run.
            return self._fall_back(record.message or "fell back before a redelivery", "redelivered")
        mark_processing(self.store, self.run_id, self.flow)
        name = self._attached(record)
        if name is None:
            return self._launch()
        return self._poll(name)

    # --- starting ---------------------------------------------------------------------------
    def _attached(self, record: StepRecord | None) -> str | None:
        if record is None or record.backend != CLOUDRUN or record.attempt != self.attempt:
            return None
        if record.execution:
            return record.execution
        if record.status is StepStatus.RUNNING and record.message == STARTING:
            # A launch of this attempt began and its execution was never recorded: the driver died
            # between RunJob and the write. Look for it before starting another.
            try:
                return self._find(get_cloudrun())
            except (CloudRunUnavailable, CloudRunNotConfigured):
                return None
        return None

    def _launch(self) -> Any:
        try:
            job_name(self.settings)  # before the client: without a job there is nothing to create it for
            cloud = get_cloudrun()
        except CloudRunNotConfigured as exc:
            return self._fall_back(str(exc), "not-configured")
        except CloudRunUnavailable as exc:
            return self._fall_back(str(exc), "client")
        from google.api_core.exceptions import GoogleAPIError  # optional: the [cloudrun] extra

        try:
            key = read_key(self.settings.handoff_key_file)  # HAULAGE_HANDOFF_KEY_FILE, a mounted secret
        except ConfigError as exc:
            return self._fall_back(f"cannot sign the hand-off: {exc}", "handoff-key")
        payload = handoff.Payload(self.step.name, list(self.args), self.params, self.flow, self.task.request.id)
        handoff.put_payload(self.run_id, self.key, payload)
        signature = handoff.sign(key, run_id=self.run_id, step_key=self.key, attempt=self.attempt, payload=payload)
        self._put(StepStatus.RUNNING, message=STARTING)
        try:
            name: str | None = cloud.run_job(step_name=self.step.name, run_id=self.run_id, step_key=self.key,
                                             attempt=self.attempt, timeout=self.step.hard_limit,
                                             signature=signature)  # fmt: skip
        except GoogleAPIError as exc:
            code = _code(exc)
            name = self._find(cloud) if type(exc).__name__ in _AMBIGUOUS else None
            if name is None:
                return self._fall_back(f"RunJob failed: {code}: {_message(exc)}", code)
            log.warning("step %s of run %s: RunJob answered %s but execution %s had started; attaching to it",
                        self.key, self.run_id, code, name)  # fmt: skip
        assert name is not None
        self._put(StepStatus.RUNNING, execution=name)
        if self.item is None:
            self.store.update_run(self.run_id, RunUpdate(events=[
                Event(now(), "dispatch", f"{self.step.name} started on Cloud Run as {name}", self.key)]))  # fmt: skip
        log.info("step %s of run %s attempt %d: started Cloud Run execution %s",
                 self.key, self.run_id, self.attempt, name)  # fmt: skip
        raise self._poll_later()

    def _find(self, cloud: CloudRunJobs) -> str | None:
        from google.api_core.exceptions import GoogleAPIError  # optional: the [cloudrun] extra

        try:
            return cloud.find_execution(run_id=self.run_id, step_key=self.key, attempt=self.attempt)
        except (GoogleAPIError, CloudRunNotConfigured) as exc:
            log.warning("step %s of run %s: cannot list executions (%s); assuming none started",
                        self.key, self.run_id, exc)  # fmt: skip
            return None

    # --- waiting ----------------------------------------------------------------------------
    def _poll(self, name: str) -> Any:
        from google.api_core.exceptions import GoogleAPIError, NotFound  # optional: the [cloudrun] extra

        try:
            cloud = get_cloudrun()
            execution = cloud.get_execution(name)
        except NotFound:
            return self._failed(ExecutionFailed.__name__, f"Cloud Run execution {name} no longer exists", name)
        except (GoogleAPIError, CloudRunUnavailable) as exc:
            log.warning("step %s of run %s: cannot look at execution %s (%s); trying again",
                        self.key, self.run_id, name, exc)  # fmt: skip
            raise self._poll_later() from exc
        if not is_done(execution):
            limit = self.step.hard_limit + self.settings.cloudrun_deadline_margin
            if time.time() > created_at(execution) + limit:
                self._cancel(cloud, name)
                return self._failed(ExecutionDeadlineExceeded.__name__,
                                    f"Cloud Run execution {name} still running {limit:g}s after it was created "
                                    f"(step timeout {self.step.hard_limit:g}s + HAULAGE_CLOUDRUN_DEADLINE_MARGIN); "
                                    f"cancelled it ({outcome(execution)})", name)  # fmt: skip
            self.store.update_run(self.run_id, RunUpdate(set={"heartbeat": now()}))
            raise self._poll_later()
        status, cps = self.store.load_step_state(self.run_id, [self.key])
        if self.key in cps:
            return self._succeeded(cps[self.key], name)
        if status is None:
            return skipped_ref(self.key, self.item, "missing")  # the run was deleted: write nothing
        if status.terminal:
            self._stop(self.store.get_step(self.run_id, self.key), status)
            return skipped_ref(self.key, self.item, status.value)
        report = handoff.get_report(self.run_id, self.key, self.attempt)
        if report is not None:
            return self._failed(report.error_type, report.message, name, retryable=report.retryable)
        if succeeded(execution):
            message = f"Cloud Run execution {name} succeeded but the step wrote no checkpoint ({outcome(execution)})"
        else:
            message = f"Cloud Run execution {name} ended without the step's checkpoint ({outcome(execution)})"
        return self._failed(ExecutionFailed.__name__, message, name)

    def _poll_later(self) -> Exception:
        countdown = min(self.settings.cloudrun_poll_interval, self.settings.max_countdown)
        return self.task.retry(countdown=countdown, kwargs=self._kwargs(self.attempt))

    def _kwargs(self, attempt: int) -> dict[str, Any]:
        return {"run_id": self.run_id, "key": self.key, "params": self.params,
                "flow": dict(self.flow, attempt=attempt), "step": self.step.name}  # fmt: skip

    # --- outcomes ---------------------------------------------------------------------------
    def _succeeded(self, checkpoint: Checkpoint, name: str) -> Any:
        check_name(checkpoint, self.step.name, self.key)
        record = self.store.get_step(self.run_id, self.key)
        if record is None or record.status is not StepStatus.COMPLETE:
            # Our "running" write can land after the job's "complete" one; the checkpoint is the truth.
            self._put(StepStatus.COMPLETE, execution=name, percent=100.0)
        handoff.clear(self.run_id, self.key)
        return ok_ref(self.key, self.item)

    def _failed(self, error_type: str, message: str, name: str, *, retryable: bool = True) -> Any:
        """The attempt failed: retry it as a new execution, or record the step's failure (the local path's rules)."""
        step, attempt = self.step, self.attempt
        if retryable and not step.policy.exhausted(attempt):
            countdown = step.policy.countdown(attempt)
            record_retry(self.store, self.run_id, step, self.key, attempt, error_type, message, countdown,
                         self.task.request.id, backend=CLOUDRUN)  # fmt: skip
            raise self.task.retry(countdown=countdown, kwargs=self._kwargs(attempt + 1))
        handoff.clear(self.run_id, self.key)
        ref = record_failure(self.store, self.run_id, step, self.key, attempt, error_type, message, self.params,
                             self.flow, backend=CLOUDRUN, execution=name)  # fmt: skip
        # Only a fan-out item gets here (a chain step's failure raised StepFailed): count it finished.
        count_finished_unit(self.run_id, self.flow)
        return ref

    def _stop(self, record: StepRecord | None, status: RunStatus) -> None:
        """The run ended: cancel this step's execution if it still runs."""
        if record is None or record.backend != CLOUDRUN or not record.execution:
            return
        if record.status is StepStatus.RUNNING:
            try:
                self._cancel(get_cloudrun(), record.execution)
            except CloudRunUnavailable as exc:
                log.warning("run %s ended %s: cannot cancel execution %s: %s",
                            self.run_id, status.value, record.execution, exc)  # fmt: skip
            if status is RunStatus.CANCELLED:
                self._put(StepStatus.CANCELLED, execution=record.execution)
        handoff.clear(self.run_id, self.key)

    def _cancel(self, cloud: CloudRunJobs, name: str) -> None:
        from google.api_core.exceptions import GoogleAPIError  # optional: the [cloudrun] extra

        try:
            if cloud.cancel_execution(name):
                log.info("step %s of run %s: cancelled Cloud Run execution %s", self.key, self.run_id, name)
        except GoogleAPIError as exc:
            log.warning("step %s of run %s: cannot cancel execution %s: %s", self.key, self.run_id, name, exc)

    def _fall_back(self, reason: str, kind: str) -> Any:
        """Send the step to its local queue, visibly: on the step, in the run's history, in the log."""
        queue = queue_for(self.step)
        self.store.put_step(self.run_id, StepRecord(self.key, self.step.name, StepStatus.QUEUED, self.attempt,
                                                    backend=LOCAL_FALLBACK, message=reason,
                                                    task_id=self.task.request.id))  # fmt: skip
        event = Event(now(), "fallback", f"{self.step.name}: {LOCAL_FALLBACK} to queue {queue!r}: {reason}", self.key)
        self.store.update_run(self.run_id, RunUpdate(events=[event]))
        if kind not in _fallbacks_logged:
            _fallbacks_logged.add(kind)
            log.warning("Cloud Run unavailable (%s): long steps fall back to local queues; "
                        "this is logged once per process and recorded on every step (first: step %s of run %s)",
                        reason, self.key, self.run_id)  # fmt: skip
        else:
            log.debug("step %s of run %s: %s to %s: %s", self.key, self.run_id, LOCAL_FALLBACK, queue, reason)
        handoff.clear(self.run_id, self.key)
        local = self.step.task.s(*self.args, run_id=self.run_id, key=self.key, params=self.params, flow=self.flow,
                                 backend=LOCAL_FALLBACK, backend_note=reason).set(queue=queue)  # fmt: skip
        # The local task takes this one's place in the chain or chord, with its id.
        return self.task.replace(local)

    def _put(self, status: StepStatus, *, execution: str | None = None, message: str = "",
             percent: float = 0.0) -> None:  # fmt: skip
        self.store.put_step(self.run_id, StepRecord(self.key, self.step.name, status, self.attempt, percent=percent,
                                                    message=message, backend=CLOUDRUN, execution=execution,
                                                    task_id=self.task.request.id))  # fmt: skip


def _code(exc: Exception) -> str:
    code = getattr(exc, "grpc_status_code", None)
    return str(code.name) if code is not None else type(exc).__name__


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc)
