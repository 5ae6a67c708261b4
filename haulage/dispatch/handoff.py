"""What the dispatcher and the job container pass each other through the coordination seam, by (run id, step key).

A Cloud Run execution gets only a few env vars (``JOB_NAME``, run id, step
key, attempt); the step's message (its parameters, the ``flow`` dict and the
references to its input) would not fit there, so the dispatcher stores it as a
:class:`Payload` before it triggers the execution and the job reads it back.
The job reports a step's exception as an :class:`ErrorReport`, because the
retry decision is the dispatcher's: only it sees every way an execution can
end (the step raising, the container crashing, a timeout, a cancellation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from haulage.coordination import Handoff, get_coordination
from haulage.tasks.flow import Flow

#: seconds a payload or report is kept: longer than any execution may queue and run
TTL = 7 * 24 * 3600


@dataclass
class Payload:
    """A step's Celery message, minus the broker: what the job container runs."""

    step: str  #: the step's registered name (the execution's JOB_NAME)
    args: list[Any]  #: the previous stage's reference, as the step's task would have received it
    params: dict[str, Any]
    flow: Flow
    task_id: str | None = None  #: the driver's Celery task id, shown on the step while the job runs


@dataclass
class ErrorReport:
    """How the step itself failed in a container attempt: what the local path would have recorded."""

    attempt: int
    error_type: str
    message: str
    retryable: bool


def put_payload(run_id: str, step_key: str, payload: Payload) -> None:
    get_coordination().put_handoff(run_id, step_key, Handoff.PAYLOAD, asdict(payload), TTL)


def get_payload(run_id: str, step_key: str) -> Payload | None:
    data = get_coordination().get_handoff(run_id, step_key, Handoff.PAYLOAD)
    if data is None:
        return None
    return Payload(step=data["step"], args=list(data["args"]), params=dict(data["params"]), flow=data["flow"],
                   task_id=data.get("task_id"))


def put_report(run_id: str, step_key: str, report: ErrorReport) -> None:
    get_coordination().put_handoff(run_id, step_key, Handoff.REPORT, asdict(report), TTL)


def get_report(run_id: str, step_key: str, attempt: int) -> ErrorReport | None:
    """The report of ``attempt``; None if that attempt wrote none (it crashed, or was killed)."""
    data = get_coordination().get_handoff(run_id, step_key, Handoff.REPORT)
    if data is None:
        return None
    report = ErrorReport(**data)
    return report if report.attempt == attempt else None


def clear(run_id: str, step_key: str) -> None:
    """Forget the payload and report once the step has its final outcome."""
    get_coordination().clear_handoff(run_id, step_key)
