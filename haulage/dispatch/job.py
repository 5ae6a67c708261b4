"""The Cloud Run job container's entrypoint: ``python -m haulage.dispatch.job`` (the workers' image and code).

Cloud Run starts it with the env overrides the dispatcher gave the execution
(``JOB_NAME`` = the step's name, ``HAULAGE_RUN_ID``, ``HAULAGE_STEP_KEY``,
``HAULAGE_ATTEMPT``) and its own ``CLOUD_RUN_*`` variables. It imports
HAULAGE_MODULES, finds the step by name, reads the step's message from Redis
(:mod:`haulage.dispatch.handoff`) and runs it through the same durable wrapper as a
worker (:class:`haulage.tasks.durable.Attempt`): terminal check, checkpoint, lock,
guards, progress, checkpoint write. It exits 0 when the step is done (or has
nothing to do) and 1 when it failed, with one log line saying which.

What differs from a worker: a step lock held by another delivery is waited for
(this container has nothing else to do); a step that raises is not retried
here but reported to the dispatcher, which owns the retry decision for every
way an execution can fail; SIGTERM (cancellation, Cloud Run's timeout) unwinds
the step so its lock is released; ``soft_timeout`` raises
``SoftTimeLimitExceeded`` in the step, as on a worker.

Example (what the local Cloud Run server runs for each task)::

    JOB_NAME=analyze_page HAULAGE_RUN_ID=... HAULAGE_STEP_KEY='1:analyze_page[0]' \\
    HAULAGE_ATTEMPT=1 CLOUD_RUN_TASK_INDEX=0 CLOUD_RUN_TASK_COUNT=1 python -m haulage.dispatch.job
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, cast

from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import RedisError

from haulage.dispatch import handoff
from haulage.dispatch.cloudrun import ENV_ATTEMPT, ENV_JOB, ENV_JOB_NAME, ENV_RUN_ID, ENV_STEP_KEY
from haulage.dispatch.routing import CLOUDRUN
from haulage.errors import HaulageError, JobError, LockUnavailable, ModuleLoadError
from haulage.logs import configure
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


@dataclass(frozen=True)
class JobEnv:
    """What Cloud Run tells the container about the work it should do."""

    job_name: str
    run_id: str
    step_key: str
    attempt: int
    task_index: int
    task_count: int
    execution: str | None  #: the execution's full name, when the job's name was passed along

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> JobEnv:
        """Read and check the variables; JobError names every one that is missing or wrong."""
        missing = [name for name in (ENV_JOB_NAME, ENV_RUN_ID, ENV_STEP_KEY, ENV_ATTEMPT) if not env.get(name)]
        if missing:
            raise JobError(f"missing environment variable(s) {', '.join(missing)}; this container runs the "
                           "executions Haulage starts, with those set as env overrides")  # fmt: skip
        numbers = {}
        for name, default in ((ENV_ATTEMPT, None), ("CLOUD_RUN_TASK_INDEX", "0"), ("CLOUD_RUN_TASK_COUNT", "1")):
            raw = env.get(name) or default
            try:
                numbers[name] = int(cast(str, raw))
            except ValueError:
                raise JobError(f"{name} must be a whole number, got {raw!r}") from None
        if numbers[ENV_ATTEMPT] < 1:
            raise JobError(f"{ENV_ATTEMPT} must be 1 or more, got {numbers[ENV_ATTEMPT]}")
        if numbers["CLOUD_RUN_TASK_COUNT"] != 1:
            raise JobError(
                "Haulage runs one step attempt per execution, so CLOUD_RUN_TASK_COUNT must be 1, "
                f"got {numbers['CLOUD_RUN_TASK_COUNT']} (a fan-out starts one execution per item)"
            )
        job, execution_id = env.get(ENV_JOB), env.get("CLOUD_RUN_EXECUTION")
        return cls(
            job_name=env[ENV_JOB_NAME],
            run_id=env[ENV_RUN_ID],
            step_key=env[ENV_STEP_KEY],
            attempt=numbers[ENV_ATTEMPT],
            task_index=numbers["CLOUD_RUN_TASK_INDEX"],
            task_count=numbers["CLOUD_RUN_TASK_COUNT"],
            execution=f"{job}/executions/{execution_id}" if job and execution_id else None,
        )


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


def load_step(env: JobEnv) -> tuple[Step, handoff.Payload]:
    """Import HAULAGE_MODULES, find the step named by JOB_NAME and read its message."""
    for module in get_settings().modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModuleLoadError(f"cannot import {module!r} from HAULAGE_MODULES: {exc}") from exc
    step = get_step(env.job_name)
    payload = handoff.get_payload(env.run_id, env.step_key)
    if payload is None:
        raise JobError(f"no message stored for step {env.step_key} of run {env.run_id}: "
                       "it expired, the run was deleted, or the step finished meanwhile")  # fmt: skip
    if payload.step != step.name:
        raise JobError(f"JOB_NAME is {step.name!r} but step {env.step_key} of run {env.run_id} "
                       f"is {payload.step!r}")  # fmt: skip
    return step, payload


def run(env: JobEnv) -> Any:
    """Run the step once, durably; return its reference (raises JobStepFailed, Terminated, HaulageError)."""
    step, payload = load_step(env)
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


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(environ: Mapping[str, str] | None = None) -> int:
    """Run the step named by the environment; return the exit status (0 done, 1 failed)."""
    configure(logging.INFO)
    started = time.monotonic()
    try:
        env = JobEnv.from_environ(os.environ if environ is None else environ)
    except JobError as exc:
        log.error("haulage job: cannot start: %s", exc)
        return 1
    where = f"step {env.job_name} ({env.step_key}) of run {env.run_id}, attempt {env.attempt}"
    if env.execution:
        where += f", execution {env.execution.rsplit('/', 1)[-1]}"
    signal.signal(signal.SIGTERM, _terminate)
    try:
        ref = run(env)
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


if __name__ == "__main__":
    sys.exit(main())
