"""One error hierarchy for Haulage: every error it raises is a ``HaulageError``.

Four groups, so a caller can catch by what happened rather than by name:

- :class:`UsageError`: the caller's or the deployment's mistake (settings, parameters, plans, modules);
- :class:`NotFound`: a name or id that does not exist (also a built-in ``LookupError``);
- :class:`RunOutcome`: what a run ended as, when a caller asked for its results or waited on it;
- :class:`InfrastructureError`: a service Haulage depends on failed (store, broker, lock, Cloud Run).

:class:`Cancelled` is apart: a step raises it (``ctx.raise_if_cancelled()``) to stop
because its run was cancelled. It derives from ``BaseException``, as asyncio's
``CancelledError`` does, so an ordinary ``except Exception`` in step code does not swallow it.

Messages name the thing that is wrong, the rule it broke and the value seen,
so that a user reading one line knows what to fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class HaulageError(Exception):
    """Raised for any error Haulage reports; the root of the hierarchy."""


class UsageError(HaulageError):
    """Raised for a mistake of the caller or the deployment; retrying the same call fails the same way."""


class NotFound(HaulageError, LookupError):
    """Raised when a workflow, step or run named by the caller does not exist."""


class RunOutcome(HaulageError):
    """Raised when a run did not end as the caller needed (failed, cancelled, not yet finished)."""


class InfrastructureError(HaulageError):
    """Raised when a service Haulage depends on failed; the same call may succeed later."""


class Cancelled(BaseException):  # noqa: N818 - named like asyncio.CancelledError's role, not an error
    """Raised inside a step to stop it because its run was cancelled; not caught by ``except Exception``."""


class ConfigError(UsageError):
    """Raised when a setting (environment variable or option) is invalid."""


class InvalidParams(UsageError):
    """Raised when workflow parameters do not match the workflow's type hints."""

    def __init__(self, workflow: str, errors: list[dict[str, Any]]) -> None:
        self.workflow = workflow
        #: One entry per problem: {"field": "pages.2", "message": "...", "input": ...}
        self.errors = errors
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(f"invalid parameters for workflow {workflow!r}: {detail}")


class ParamsTooLarge(InvalidParams):
    """Raised when a run's parameters, as JSON, are larger than the workflow's max_params_bytes."""

    def __init__(self, workflow: str, size: int, limit: int, field: str = "(parameters)") -> None:
        self.size = size
        self.limit = limit
        message = (f"are {size} bytes of JSON; workflow {workflow!r} takes at most {limit} "
                   "(max_params_bytes, HAULAGE_MAX_PARAMS_BYTES)")  # fmt: skip
        super().__init__(workflow, [{"field": field, "message": message}])


class UnknownWorkflow(NotFound):
    """Raised when a workflow name is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(self.known) or "none registered; is HAULAGE_MODULES set?"
        super().__init__(f"unknown workflow {name!r}; known workflows: {listed}")


class UnknownStep(NotFound):
    """Raised when a step name is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(self.known) or "none registered; is HAULAGE_MODULES set?"
        super().__init__(f"unknown step {name!r}; known steps: {listed}")


class PlanError(UsageError):
    """Raised when a workflow's plan (its chain and fan-outs) is malformed."""


class ModuleLoadError(UsageError):
    """Raised when a module named in HAULAGE_MODULES cannot be imported."""


class IdempotencyConflict(UsageError):
    """Raised when an idempotency key is reused with different parameters."""


class BrokerUnavailable(InfrastructureError):
    """Raised when a run cannot be enqueued because the broker is unreachable."""


class RunNotFound(NotFound):
    """Raised when no run has the given id."""


class RunNotFinished(RunOutcome):
    """Raised when results are asked of a run that has not finished."""


class RunFailed(RunOutcome):
    """Raised when results are asked of a run that ended FAILED."""

    def __init__(self, run_id: str, error: str | None, failures: list[Any] | None = None) -> None:
        self.run_id = run_id
        self.error = error
        self.failures = failures or []
        super().__init__(f"run {run_id} failed: {error}")


class RunCancelled(RunOutcome):
    """Raised when results are asked of a cancelled run (a step stops with :class:`Cancelled`)."""


class WaitTimeout(RunOutcome, TimeoutError):
    """Raised when ``Run.wait`` reaches its timeout before the run ends."""


class NondeterminismError(UsageError):
    """Raised when a checkpoint was written by a different step than the one replaying it.

    The step key is derived from the step's position in the plan, so this means
    the workflow's plan changed while the run was in flight.
    """


class StoreUnavailable(InfrastructureError):
    """Raised when the store (Redis or Firestore) cannot be reached or refuses to answer."""


class StoreConflict(InfrastructureError):
    """Raised when a store write kept conflicting with concurrent writers past its retry limit."""


class MissingCheckpoint(InfrastructureError):
    """Raised when a step's input checkpoint is gone (deleted by retention, or an emptied store)."""


class LockUnavailable(InfrastructureError):
    """Raised when the step lock cannot be checked (Redis error): fail closed."""


class EffectOutcomeUnknown(InfrastructureError):
    """Raised by ``ctx.once(key, on_unknown="fail")`` when an earlier attempt died inside the guarded block.

    Whether that attempt's effect happened is unknown; the step fails without
    retrying (another attempt would find the same unknown).
    """


class StepFailed(RunOutcome):
    """Raised (and recorded on the run) when a step of the main chain fails after its retries."""


class StepResultNotSerializable(UsageError):
    """Raised when a step returns a value that cannot be stored as JSON."""


class StepResultTooLarge(StepResultNotSerializable):
    """Raised when a step's result is larger than the store holds in one checkpoint (never retried)."""


class ConfigMismatch(UsageError):
    """Raised when this process's settings disagree with the workers' on a setting both must share.

    ``settings`` maps each disagreeing setting to ``{"here": value, "workers": {hostname: value}}``.
    """

    def __init__(self, message: str, settings: dict[str, Any] | None = None) -> None:
        self.settings = settings or {}
        super().__init__(message)


class DispatchError(InfrastructureError):
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


class HandoffRefused(JobError):
    """Raised by the job container when a hand-off's signature is missing or does not match its key."""
