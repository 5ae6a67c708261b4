"""What applications use: define workflows, start runs, follow them.

>>> from haulage.tasks import step, StepContext
>>> from haulage.workflows import workflow, chain, fan_out, get_run
"""

from __future__ import annotations

from haulage.errors import (
    HaulageError,
    IdempotencyConflict,
    InvalidParams,
    RunCancelled,
    RunFailed,
    RunNotFinished,
    RunNotFound,
    UnknownWorkflow,
    WaitTimeout,
)
from haulage.progress.models import RunRecord, RunStatus, StepRecord, StepStatus
from haulage.tasks.results import Failure, Results
from haulage.workflows import registry
from haulage.workflows.plan import Chain, FanOut, chain, fan_out
from haulage.workflows.run import RUN_ID_PATTERN, Run, cancel_run, get_run, list_runs, resume_run, run_cursor
from haulage.workflows.workflow import Workflow, workflow

__all__ = [
    # defining
    "workflow",
    "chain",
    "fan_out",
    "Workflow",
    "Chain",
    "FanOut",
    "registry",
    # running
    "Run",
    "get_run",
    "list_runs",
    "run_cursor",
    "RUN_ID_PATTERN",
    "cancel_run",
    "resume_run",
    "RunRecord",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "Results",
    "Failure",
    # errors
    "HaulageError",
    "InvalidParams",
    "UnknownWorkflow",
    "IdempotencyConflict",
    "RunNotFound",
    "RunNotFinished",
    "RunFailed",
    "RunCancelled",
    "WaitTimeout",
]
