"""Haulage: durable workflows on Celery, with long steps on Cloud Run Jobs and progress in Firestore.

>>> from haulage import step, StepContext, workflow, chain, fan_out, get_run
>>> @step(runtime="short", retries=3)
... def analyze_page(ctx: StepContext, project_id: str, page: int) -> dict:
...     ctx.progress(40, "matching code sections")
...     return {"page": page}
>>> @workflow("review_plan")
... def review_plan(project_id: str, pages: list[int]):
...     return chain(fan_out(analyze_page, [{"page": p} for p in pages], kwargs={"project_id": project_id}))
>>> run = review_plan.start(project_id="p1", pages=[1, 2, 3])   # returns at once
>>> run.wait(timeout=60).status

Importing ``haulage`` is cheap: the names below load their modules (and the
Celery app) on first use, so the job container, the dev tools and the errors
module do not pay for what they do not touch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from haulage.errors import (
    BrokerUnavailable,
    Cancelled,
    CloudRunNotConfigured,
    CloudRunUnavailable,
    ConfigError,
    ConfigMismatch,
    DispatchError,
    EffectOutcomeUnknown,
    ExecutionDeadlineExceeded,
    ExecutionFailed,
    HaulageError,
    IdempotencyConflict,
    InfrastructureError,
    InvalidParams,
    JobError,
    LockUnavailable,
    MissingCheckpoint,
    ModuleLoadError,
    NondeterminismError,
    NotFound,
    PlanError,
    RunCancelled,
    RunFailed,
    RunNotFinished,
    RunNotFound,
    RunOutcome,
    StepFailed,
    StepResultNotSerializable,
    StepResultTooLarge,
    StoreConflict,
    StoreUnavailable,
    UnknownStep,
    UnknownWorkflow,
    UsageError,
    WaitTimeout,
)

if TYPE_CHECKING:
    from haulage.progress.models import RunRecord, RunStatus, StepRecord, StepStatus
    from haulage.tasks.context import StepContext
    from haulage.tasks.definition import Step, StepCall
    from haulage.tasks.results import Failure, Results
    from haulage.tasks.step import step
    from haulage.workflows import registry
    from haulage.workflows.plan import Chain, FanOut, chain, fan_out
    from haulage.workflows.run import Run, cancel_run, get_run, list_runs, resume_run
    from haulage.workflows.workflow import Workflow, workflow

# Public name -> the module that defines it (loaded on first access).
_LAZY = {
    "step": "haulage.tasks.step",
    "Step": "haulage.tasks.definition",
    "StepCall": "haulage.tasks.definition",
    "StepContext": "haulage.tasks.context",
    "Results": "haulage.tasks.results",
    "Failure": "haulage.tasks.results",
    "workflow": "haulage.workflows.workflow",
    "Workflow": "haulage.workflows.workflow",
    "chain": "haulage.workflows.plan",
    "fan_out": "haulage.workflows.plan",
    "Chain": "haulage.workflows.plan",
    "FanOut": "haulage.workflows.plan",
    "Run": "haulage.workflows.run",
    "get_run": "haulage.workflows.run",
    "list_runs": "haulage.workflows.run",
    "cancel_run": "haulage.workflows.run",
    "resume_run": "haulage.workflows.run",
    "RunRecord": "haulage.progress.models",
    "RunStatus": "haulage.progress.models",
    "StepRecord": "haulage.progress.models",
    "StepStatus": "haulage.progress.models",
}


def __getattr__(name: str) -> Any:
    if name == "registry":
        return importlib.import_module("haulage.workflows.registry")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'haulage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    # defining steps and workflows
    "step",
    "StepContext",
    "workflow",
    "chain",
    "fan_out",
    "Step",
    "StepCall",
    "Workflow",
    "Chain",
    "FanOut",
    "registry",
    # running and following
    "Run",
    "get_run",
    "list_runs",
    "cancel_run",
    "resume_run",
    "Results",
    "Failure",
    "RunRecord",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    # errors: the root and its four groups
    "HaulageError",
    "UsageError",
    "NotFound",
    "RunOutcome",
    "InfrastructureError",
    "Cancelled",
    # usage errors
    "ConfigError",
    "InvalidParams",
    "PlanError",
    "ModuleLoadError",
    "IdempotencyConflict",
    "NondeterminismError",
    "StepResultNotSerializable",
    "StepResultTooLarge",
    "ConfigMismatch",
    # lookups
    "UnknownWorkflow",
    "UnknownStep",
    "RunNotFound",
    # run outcomes
    "RunFailed",
    "RunCancelled",
    "RunNotFinished",
    "WaitTimeout",
    "StepFailed",
    # infrastructure
    "StoreUnavailable",
    "StoreConflict",
    "BrokerUnavailable",
    "LockUnavailable",
    "EffectOutcomeUnknown",
    "MissingCheckpoint",
    "DispatchError",
    "CloudRunNotConfigured",
    "CloudRunUnavailable",
    "ExecutionFailed",
    "ExecutionDeadlineExceeded",
    "JobError",
]
