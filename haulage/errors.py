"""One error hierarchy for Haulage: every error it raises is a ``HaulageError``.

Messages name the thing that is wrong, the rule it broke and the value seen,
so that a user reading one line knows what to fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class HaulageError(Exception):
    """Raised for any error Haulage reports; the root of the hierarchy."""


class ConfigError(HaulageError):
    """Raised when a setting (environment variable or option) is invalid."""


class InvalidParams(HaulageError):
    """Raised when workflow parameters do not match the workflow's type hints."""

    def __init__(self, workflow: str, errors: list[dict[str, Any]]) -> None:
        self.workflow = workflow
        #: One entry per problem: {"field": "pages.2", "message": "...", "input": ...}
        self.errors = errors
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(f"invalid parameters for workflow {workflow!r}: {detail}")


class UnknownWorkflow(HaulageError):
    """Raised when a workflow name is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(self.known) or "none registered; is HAULAGE_MODULES set?"
        super().__init__(f"unknown workflow {name!r}; known workflows: {listed}")


class UnknownStep(HaulageError):
    """Raised when a step name is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(self.known) or "none registered; is HAULAGE_MODULES set?"
        super().__init__(f"unknown step {name!r}; known steps: {listed}")


class PlanError(HaulageError):
    """Raised when a workflow's plan (its chain and fan-outs) is malformed."""


class ModuleLoadError(HaulageError):
    """Raised when a module named in HAULAGE_MODULES cannot be imported."""


class IdempotencyConflict(HaulageError):
    """Raised when an idempotency key is reused with different parameters."""


class BrokerUnavailable(HaulageError):
    """Raised when a run cannot be enqueued because the broker is unreachable."""


class RunNotFound(HaulageError):
    """Raised when no run has the given id."""


class RunNotFinished(HaulageError):
    """Raised when results are asked of a run that has not finished."""


class RunFailed(HaulageError):
    """Raised when results are asked of a run that ended FAILED."""

    def __init__(self, run_id: str, error: str | None, failures: list[Any] | None = None) -> None:
        self.run_id = run_id
        self.error = error
        self.failures = failures or []
        super().__init__(f"run {run_id} failed: {error}")


class RunCancelled(HaulageError):
    """Raised when results are asked of a cancelled run, or a step sees its run cancelled."""


class WaitTimeout(HaulageError, TimeoutError):
    """Raised when ``Run.wait`` reaches its timeout before the run ends."""


class NondeterminismError(HaulageError):
    """Raised when a checkpoint was written by a different step than the one replaying it.

    The step key is derived from the step's position in the plan, so this means
    the workflow's plan changed while the run was in flight.
    """


class LockUnavailable(HaulageError):
    """Raised when the step lock cannot be checked (Redis error): fail closed."""


class StepFailed(HaulageError):
    """Raised (and recorded on the run) when a step of the main chain fails after its retries."""


class StepResultNotSerializable(HaulageError):
    """Raised when a step returns a value that cannot be stored as JSON."""


class DispatchError(HaulageError):
    """Raised when a step cannot be handed to, or run by, the backend chosen for it."""


class CloudRunNotConfigured(DispatchError):
    """Raised when a step should go to Cloud Run but no job is configured (the step falls back)."""


class CloudRunUnavailable(DispatchError):
    """Raised when the Cloud Run client cannot be created (no credentials, bad endpoint)."""


class ExecutionFailed(DispatchError):
    """Raised (and recorded on the step) when a Cloud Run execution ended without the step's checkpoint."""


class ExecutionDeadlineExceeded(ExecutionFailed):
    """Raised when a Cloud Run execution outlived its step's timeout plus HAULAGE_CLOUDRUN_DEADLINE_MARGIN."""


class JobError(DispatchError):
    """Raised by the job container entrypoint when it cannot run its step (env, payload, lock)."""
