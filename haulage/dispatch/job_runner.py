"""What the job container does once it is configured: find the step, check its hand-off, run it durably.

Imported by :mod:`haulage.dispatch.job` only after the job's environment has
been replaced by its config file's settings: importing this module builds the
Celery app and reads the settings (see :mod:`haulage.dispatch.job_config`).

The step runs through the same durable wrapper as on a worker
(:class:`haulage.tasks.durable.Attempt`): terminal check, checkpoint, lock,
guards, progress, checkpoint write. What differs from a worker: a step lock
held by another delivery is waited for (this container has nothing else to
do); a step that raises is not retried here but reported to the dispatcher,
which owns the retry decision for every way an execution can fail; SIGTERM
(cancellation, Cloud Run's timeout) unwinds the step so its lock is released;
``soft_timeout`` raises ``SoftTimeLimitExceeded`` in the step, as on a worker.
Nothing runs, and nothing is written, unless the hand-off's signature matches.
"""

from __future__ import annotations

import importlib
import logging
import signal
import time
from types import FrameType
from typing import Any, cast

from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import RedisError

from haulage.dispatch import handoff
from haulage.dispatch.job_env import JobEnv
from haulage.dispatch.routing import CLOUDRUN
from haulage.errors import HandoffRefused, HaulageError, JobError, LockUnavailable, ModuleLoadError
from haulage.progress import get_store
from haulage.progress.store import Store
from haulage.settings import get_settings
from haulage.tasks.definition import Step
from haulage.tasks.durable import Attempt
from haulage.tasks.flow import Flow, is_failure
from haulage.tasks.lock import StepLock
from haulage.tasks.retry import retryable
from haulage.tasks.step import get_step

log = logging.getLogger("haulage.dispatch.job")

#: seconds between looks at a step lock held by another delivery
LOCK_POLL = 1.0


class JobStepFailed(JobError):
    """Raised when the step raised in this container; its error was reported to the dispatcher."""

    def __init__(self, report: handoff.ErrorReport) -> None:
        self.report = report
        super().__init__(f"{report.error_type}: {report.message}")


class Terminated(BaseException):
    """Raised in the step when the container gets SIGTERM. Not an Exception: step code must not swallow it."""


class JobAttempt(Attempt):
    """The attempt a job container makes: waits for a held lock, reports a failure instead of retrying."""

    def acquire(self, lock: StepLock) -> bool:
        # A duplicate execution (an ambiguous RunJob) or a local fallback may hold the lock:
        # wait for it to finish, then find its checkpoint. Bounded by the step's own timeout.
        give_up = time.monotonic() + self.step.hard_limit
        while True:
            try:
                if lock.acquire():
                    return True
                if get_store().get_checkpoints(self.run_id, [self.key]):
                    return False
                problem = "is held by another delivery"
            except (LockUnavailable, RedisError) as exc:
                problem = f"cannot be checked ({exc})"
            if time.monotonic() > give_up:
                raise JobError(f"the lock of step {self.key} {problem} after {self.step.hard_limit:g}s; giving up")
            log.info("step %s of run %s: the lock %s; waiting", self.key, self.run_id, problem)
            time.sleep(LOCK_POLL)

    def on_error(self, store: Store, exc: Exception) -> Any:
        report = handoff.ErrorReport(self.attempt, type(exc).__name__, str(exc), retryable(exc, self.step.no_retry_on))
        handoff.put_report(self.run_id, self.key, report)
        raise JobStepFailed(report) from exc


def load_step(env: JobEnv, key: bytes) -> tuple[Step, handoff.Payload]:
    """Read the step's message, check its signature, import HAULAGE_MODULES and find the step.

    The signature is checked before any of the application's code is imported:
    a refused hand-off runs nothing and writes nothing.
    """
    payload = handoff.get_payload(env.run_id, env.step_key)
    if payload is None:
        raise JobError(f"no message stored for step {env.step_key} of run {env.run_id}: "
                       "it expired, the run was deleted, or the step finished meanwhile")  # fmt: skip
    handoff.verify(key, env.signature, run_id=env.run_id, step_key=env.step_key, attempt=env.attempt,
                   payload=payload)  # fmt: skip
    if payload.step != env.job_name:
        raise JobError(f"JOB_NAME is {env.job_name!r} but step {env.step_key} of run {env.run_id} "
                       f"is {payload.step!r}")  # fmt: skip
    for module in get_settings().modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModuleLoadError(f"cannot import {module!r} from HAULAGE_MODULES: {exc}") from exc
    return get_step(env.job_name), payload


def run(env: JobEnv, key: bytes) -> Any:
    """Run the step once, durably; return its reference (raises JobStepFailed, Terminated, HaulageError)."""
    step, payload = load_step(env, key)
    flow = cast(Flow, dict(payload.flow, attempt=env.attempt))
    attempt = JobAttempt(step, run_id=env.run_id, key=env.step_key, params=payload.params, flow=flow,
                         task_id=payload.task_id, backend=CLOUDRUN, execution=env.execution)  # fmt: skip
    if step.soft_timeout:
        signal.signal(signal.SIGALRM, _soft_timeout)
        signal.setitimer(signal.ITIMER_REAL, step.soft_timeout)
    try:
        return attempt.run(*payload.args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _soft_timeout(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)




def execute(env: JobEnv, key: bytes, started: float) -> int:
    """Run the step and log how it ended in one line; return the exit status (0 done, 1 failed or refused)."""
    where = f"step {env.job_name} ({env.step_key}) of run {env.run_id}, attempt {env.attempt}"
    if env.execution:
        where += f", execution {env.execution.rsplit('/', 1)[-1]}"
    signal.signal(signal.SIGTERM, terminate)
    try:
        ref = run(env, key)
    except HandoffRefused as exc:
        log.error("haulage job: refusing %s: %s; nothing was run or written", where, exc)
        return 1
    except JobStepFailed as exc:
        log.error("haulage job: %s failed after %.2fs: %s", where, time.monotonic() - started, exc)
        return 1
    except Terminated as exc:
        log.error("haulage job: %s stopped by %s after %.2fs (cancelled or timed out)",
                  where, exc, time.monotonic() - started)  # fmt: skip
        return 1
    except (HaulageError, RedisError) as exc:
        log.error("haulage job: %s could not run: %s: %s", where, type(exc).__name__, exc)
        return 1
    if is_failure(ref):
        log.info("haulage job: %s not run: %s", where, ref.get("skipped", "nothing to do"))
    else:
        log.info("haulage job: %s complete in %.2fs", where, time.monotonic() - started)
    return 0
