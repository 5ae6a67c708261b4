"""The Cloud Run Jobs API as Haulage uses it: trigger, look up, find and cancel executions.

A thin wrapper over the ``google.cloud.run_v2`` clients. Every call carries
``timeout=HAULAGE_CLOUDRUN_CALL_TIMEOUT`` (run_v2 calls have no default
deadline) and none blocks on an execution: ``run_job`` returns the execution's
name from the operation's metadata and never calls ``operation.result()``.

Clients are created on first use in each process (never at import, never
shared across a fork): against the real API with the default credentials, or,
when HAULAGE_CLOUDRUN_ENDPOINT is set, over an insecure channel to a local
server (``python -m haulage.devtools.local_cloudrun``).

Example::

    jobs = get_cloudrun()
    name = jobs.run_job(step_name="analyze_page", run_id=run_id, step_key=key, attempt=1, timeout=180)
    execution = jobs.get_execution(name)
    if is_done(execution) and not succeeded(execution): ...
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

from haulage.dispatch import job_config
from haulage.errors import CloudRunNotConfigured, CloudRunUnavailable
from haulage.settings import Settings, get_settings

if TYPE_CHECKING:
    from google.cloud import run_v2

log = logging.getLogger("haulage.dispatch.cloudrun")

# The env overrides an execution gets (besides the CLOUD_RUN_* variables Cloud Run sets); the job
# keeps only these of what a caller may override (haulage.dispatch.job_config).
ENV_JOB_NAME = job_config.ENV_JOB_NAME
ENV_RUN_ID = job_config.ENV_RUN_ID
ENV_STEP_KEY = job_config.ENV_STEP_KEY
ENV_ATTEMPT = job_config.ENV_ATTEMPT
ENV_JOB = job_config.ENV_JOB
ENV_SIGNATURE = job_config.ENV_SIGNATURE

#: seconds a failed client initialisation is remembered before trying again
#: (looking for default credentials can take seconds off Google Cloud)
INIT_RETRY = 60.0
#: executions read while looking for one started by an ambiguous RunJob call (newest first)
FIND_LIMIT = 200
# gRPC backs off reconnecting to an address that refused it, up to 120 s, and shares that
# state between channels; a local server that is restarted should be used again at once.
LOCAL_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def job_name(settings: Settings | None = None) -> str:
    """The configured job's full resource name; CloudRunNotConfigured says which variable is missing."""
    s = settings or get_settings()
    if not s.cloudrun_job:
        raise CloudRunNotConfigured("Cloud Run is not configured: HAULAGE_CLOUDRUN_JOB is not set")
    if "/" in s.cloudrun_job:
        return s.cloudrun_job
    missing = [name for name, value in (("HAULAGE_CLOUDRUN_PROJECT (or GOOGLE_CLOUD_PROJECT)", s.cloudrun_project),
                                        ("HAULAGE_CLOUDRUN_REGION", s.cloudrun_region)) if not value]  # fmt: skip
    if missing:
        raise CloudRunNotConfigured(
            f"Cloud Run is not configured: HAULAGE_CLOUDRUN_JOB={s.cloudrun_job!r} is a bare job id, "
            f"and {' and '.join(missing)} is not set"
        )
    return f"projects/{s.cloudrun_project}/locations/{s.cloudrun_region}/jobs/{s.cloudrun_job}"


def is_done(execution: run_v2.Execution) -> bool:
    """True once the execution has ended, whichever way."""
    return execution.completion_time is not None


def succeeded(execution: run_v2.Execution) -> bool:
    """Every task succeeded. A cancelled execution also ends without error, so the counts decide."""
    return (
        is_done(execution)
        and execution.succeeded_count == execution.task_count
        and execution.failed_count == 0
        and execution.cancelled_count == 0
    )


def outcome(execution: run_v2.Execution) -> str:
    """One line on how the execution ended (or stands): its counts and its Completed condition."""
    counts = (f"{execution.succeeded_count} succeeded, {execution.failed_count} failed, "
              f"{execution.cancelled_count} cancelled of {execution.task_count}")  # fmt: skip
    for condition in execution.conditions:
        if condition.type_ == "Completed" and condition.message:
            return f"{counts}: {condition.message}"
    return counts


def created_at(execution: run_v2.Execution) -> float:
    """When the execution was created (epoch seconds): Haulage's deadline runs from there."""
    stamp = execution.create_time
    return stamp.timestamp() if stamp is not None else time.time()


def env_of(execution: run_v2.Execution) -> dict[str, str]:
    containers = execution.template.containers
    return {var.name: var.value for var in containers[0].env} if containers else {}


class CloudRunJobs:
    """The two run_v2 clients and the configured job, with Haulage's deadlines on every call."""

    def __init__(self, jobs: run_v2.JobsClient, executions: run_v2.ExecutionsClient, *, job: str | None,
                 call_timeout: float, unconfigured: str = "") -> None:  # fmt: skip
        self.jobs = jobs
        self.executions = executions
        self.job = job
        self.call_timeout = call_timeout
        #: why ``job`` is None (cancelling and looking up executions need no job)
        self.unconfigured = unconfigured

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> CloudRunJobs:
        """Clients for HAULAGE_CLOUDRUN_ENDPOINT, else Google's API; CloudRunUnavailable if they cannot be made."""
        s = settings or get_settings()
        job: str | None = None
        unconfigured = ""
        try:
            job = job_name(s)
        except CloudRunNotConfigured as exc:
            unconfigured = str(exc)
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError
        from google.cloud import run_v2

        try:
            if s.cloudrun_endpoint:
                import grpc
                from google.cloud.run_v2.services.executions.transports import ExecutionsGrpcTransport
                from google.cloud.run_v2.services.jobs.transports import JobsGrpcTransport

                from haulage.dispatch.bearer import BearerToken

                # A local server speaks plain gRPC on loopback; one channel serves both clients. It
                # wants the bearer token it was started with on every call (any local process could
                # otherwise start executions).
                channel = grpc.insecure_channel(s.cloudrun_endpoint, options=LOCAL_CHANNEL_OPTIONS)
                if s.cloudrun_token:
                    channel = grpc.intercept_channel(channel, BearerToken(s.cloudrun_token))
                jobs = run_v2.JobsClient(transport=JobsGrpcTransport(channel=channel))
                executions = run_v2.ExecutionsClient(transport=ExecutionsGrpcTransport(channel=channel))
            else:
                jobs = run_v2.JobsClient()
                executions = run_v2.ExecutionsClient()
        except (GoogleAuthError, GoogleAPIError, ValueError, OSError) as exc:
            where = s.cloudrun_endpoint or "the Cloud Run API (default credentials)"
            raise CloudRunUnavailable(
                f"cannot create the Cloud Run client for {where}: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(jobs, executions, job=job, call_timeout=s.cloudrun_call_timeout, unconfigured=unconfigured)

    def close(self) -> None:
        self.jobs.transport.close()
        self.executions.transport.close()

    def require_job(self) -> str:
        """The job's name; CloudRunNotConfigured (naming the missing variable) when there is none."""
        if self.job is None:
            raise CloudRunNotConfigured(self.unconfigured or "Cloud Run is not configured")
        return self.job

    def run_job(self, *, step_name: str, run_id: str, step_key: str, attempt: int, timeout: float,
                signature: str) -> str:  # fmt: skip
        """Start one execution of the job for one attempt of one step; return the execution's name.

        ``signature`` is the hand-off's (:func:`haulage.dispatch.handoff.sign`): the job runs nothing without it.

        Raises the google.api_core exception of a failed call (the execution may
        still have been created when that is DeadlineExceeded: see ``find_execution``).
        """
        from google.cloud import run_v2

        job = self.require_job()
        env = {ENV_JOB_NAME: step_name, ENV_RUN_ID: run_id, ENV_STEP_KEY: step_key, ENV_ATTEMPT: str(attempt),
               ENV_JOB: job, ENV_SIGNATURE: signature}  # fmt: skip
        overrides = run_v2.RunJobRequest.Overrides(
            container_overrides=[
                run_v2.RunJobRequest.Overrides.ContainerOverride(
                    env=[run_v2.EnvVar(name=k, value=v) for k, v in env.items()]
                )
            ],
            # One task per execution: a fan-out starts one execution per item (see the README).
            task_count=1,
            timeout=timedelta(seconds=max(1, round(timeout))),
        )
        operation = self.jobs.run_job(request=run_v2.RunJobRequest(name=job, overrides=overrides),
                                      timeout=self.call_timeout)  # fmt: skip
        # The operation completes only when the execution does; its metadata names it at once.
        return str(operation.metadata.name)

    def get_execution(self, name: str) -> run_v2.Execution:
        return self.executions.get_execution(name=name, timeout=self.call_timeout)

    def cancel_execution(self, name: str) -> bool:
        """Ask Cloud Run to cancel ``name``; False if it had already ended or is gone."""
        from google.api_core.exceptions import FailedPrecondition, NotFound

        try:
            self.executions.cancel_execution(name=name, timeout=self.call_timeout)
        except (FailedPrecondition, NotFound):
            return False
        return True

    def find_execution(self, *, run_id: str, step_key: str, attempt: int) -> str | None:
        """The newest execution of the job started for this attempt of this step, by its env overrides."""
        wanted = {ENV_RUN_ID: run_id, ENV_STEP_KEY: step_key, ENV_ATTEMPT: str(attempt)}
        for n, execution in enumerate(self._executions()):
            if n >= FIND_LIMIT:
                break
            env = env_of(execution)
            if all(env.get(k) == v for k, v in wanted.items()):
                return str(execution.name)
        return None

    def _executions(self) -> Iterator[run_v2.Execution]:
        from google.cloud import run_v2

        request = run_v2.ListExecutionsRequest(parent=self.require_job(), page_size=50)
        yield from self.executions.list_executions(request=request, timeout=self.call_timeout)


@functools.cache
def _cached(pid: int) -> CloudRunJobs:
    # Keyed by pid: a forked child makes its own clients (gRPC channels do not survive fork).
    return CloudRunJobs.from_settings()


_init_failed: tuple[float, CloudRunUnavailable] | None = None


def get_cloudrun() -> CloudRunJobs:
    """This process's Cloud Run clients, created on first use; raises CloudRunUnavailable."""
    global _init_failed
    if _init_failed is not None and time.monotonic() - _init_failed[0] < INIT_RETRY:
        raise _init_failed[1]
    try:
        return _cached(os.getpid())
    except CloudRunUnavailable as exc:
        _init_failed = (time.monotonic(), exc)
        log.error("%s", exc)
        raise


def reset_cloudrun() -> None:
    """Forget this process's clients (tests and the CLI change the settings)."""
    global _init_failed
    _init_failed = None
    _cached.cache_clear()
