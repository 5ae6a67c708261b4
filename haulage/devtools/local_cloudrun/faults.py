"""Failures the local Cloud Run server injects, set in process or in a JSON file re-read on every call."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass
class Faults:
    """Failures the server injects, for tests of the code that calls Cloud Run.

    ``run_job_error``: RunJob answers with this status code (for instance
    ``UNAVAILABLE``, ``PERMISSION_DENIED``, ``RESOURCE_EXHAUSTED``) and creates
    nothing, unless ``run_job_error_after_create`` is true: then the execution
    is created and started first, which is the ambiguous "did it start?" case.
    ``run_job_delay``: seconds RunJob waits before answering, after creating
    the execution (a client deadline shorter than this also gives an ambiguous
    call). ``start_delay``: seconds before an execution's tasks start.
    ``fail_task_indexes``: these task indexes exit non-zero without running
    the command. ``get_execution_error``: GetExecution answers with this code.

    Example::

        server.faults.run_job_error = grpc.StatusCode.UNAVAILABLE
        Faults(fail_task_indexes={1}).write("faults.json")  # for --faults-file
    """

    run_job_error: grpc.StatusCode | None = None
    run_job_error_after_create: bool = False
    run_job_delay: float = 0.0  #: seconds
    start_delay: float = 0.0  #: seconds
    fail_task_indexes: set[int] = field(default_factory=set)
    get_execution_error: grpc.StatusCode | None = None

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Build from the JSON form (status codes by name).

        Raises ValueError (TypeError for a non-object) naming the bad field.
        """
        if not isinstance(data, dict):
            raise TypeError(f"faults must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        faults = cls()
        for name in ("run_job_error", "get_execution_error"):
            if data.get(name) is not None:
                setattr(faults, name, _status_code(name, data[name]))
        for name in ("run_job_delay", "start_delay"):
            if name in data:
                setattr(faults, name, _non_negative(name, data[name]))
        if "run_job_error_after_create" in data:
            value = data["run_job_error_after_create"]
            if not isinstance(value, bool):
                raise ValueError(f"run_job_error_after_create must be true or false, got {value!r}")
            faults.run_job_error_after_create = value
        indexes = data.get("fail_task_indexes", [])
        if not isinstance(indexes, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indexes
        ):
            raise ValueError(f"fail_task_indexes must be a list of task indexes (integers >= 0), got {indexes!r}")
        faults.fail_task_indexes = set(indexes)
        return faults

    def to_json(self) -> dict[str, object]:
        """The JSON form read by ``--faults-file``."""
        return {
            "run_job_error": self.run_job_error.name if self.run_job_error else None,
            "run_job_error_after_create": self.run_job_error_after_create,
            "run_job_delay": self.run_job_delay,
            "start_delay": self.start_delay,
            "fail_task_indexes": sorted(self.fail_task_indexes),
            "get_execution_error": (self.get_execution_error.name if self.get_execution_error else None),
        }

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON form to ``path`` atomically, so a server never reads half a file."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, target)


def _status_code(name: str, value: object) -> grpc.StatusCode:
    if isinstance(value, grpc.StatusCode):
        return value
    if isinstance(value, str) and value.upper() in grpc.StatusCode.__members__:
        return grpc.StatusCode[value.upper()]
    raise ValueError(f"{name} must be a gRPC status code name such as UNAVAILABLE, got {value!r}")


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)
