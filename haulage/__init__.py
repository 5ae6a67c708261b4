"""Haulage's shared kernel: settings, errors, Redis keys and JSON helpers.

Application code imports from ``tasks`` (steps) and ``workflows`` (workflows,
runs); this package holds what every layer needs and depends on nothing else.
"""

from __future__ import annotations

from haulage.errors import (
    BrokerUnavailable,
    ConfigError,
    HaulageError,
    IdempotencyConflict,
    InvalidParams,
    LockUnavailable,
    ModuleLoadError,
    NondeterminismError,
    PlanError,
    RunCancelled,
    RunFailed,
    RunNotFinished,
    RunNotFound,
    StepFailed,
    StepResultNotSerializable,
    UnknownStep,
    UnknownWorkflow,
    WaitTimeout,
)

__all__ = [
    # errors
    "HaulageError",
    "ConfigError",
    "InvalidParams",
    "UnknownWorkflow",
    "UnknownStep",
    "PlanError",
    "ModuleLoadError",
    "IdempotencyConflict",
    "BrokerUnavailable",
    "RunNotFound",
    "RunNotFinished",
    "RunFailed",
    "RunCancelled",
    "WaitTimeout",
    "NondeterminismError",
    "LockUnavailable",
    "StepFailed",
    "StepResultNotSerializable",
]
