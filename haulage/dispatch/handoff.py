"""What the dispatcher and the job container pass each other through the coordination seam, by (run id, step key).

A Cloud Run execution gets only a few env vars (``JOB_NAME``, run id, step
key, attempt); the step's message (its parameters, the ``flow`` dict and the
references to its input) would not fit there, so the dispatcher stores it as a
:class:`Payload` before it triggers the execution and the job reads it back.
The job reports a step's exception as an :class:`ErrorReport`, because the
retry decision is the dispatcher's: only it sees every way an execution can
end (the step raising, the container crashing, a timeout, a cancellation).

Whoever may run the job with overrides chooses its env, so the job does not
take the env's word for what to run: the dispatcher signs each hand-off
(:func:`sign`, HMAC-SHA256 over run id, step key, attempt, step name and the
SHA-256 of the payload's JSON) with a key both read from a mounted secret file,
passes the signature as one more override, and the job runs only a payload
whose signature :func:`verify` accepts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from typing import Any

from haulage.coordination import Handoff, get_coordination
from haulage.errors import HandoffRefused
from haulage.jsonutil import dumps, loads
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


def payload_digest(payload: Payload) -> str:
    """SHA-256 of the payload as stored: its JSON read back, keys sorted, so both sides hash the same text."""
    stored = loads(dumps(asdict(payload)))
    canonical = json.dumps(stored, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sign(key: bytes, *, run_id: str, step_key: str, attempt: int, payload: Payload) -> str:
    """The hand-off's signature: HMAC-SHA256 over [run id, step key, attempt, step name, payload digest]."""
    # A JSON array, not a joined string: no field can end early inside another (keys hold ':' and '[').
    message = json.dumps([run_id, step_key, attempt, payload.step, payload_digest(payload)], separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def verify(key: bytes, signature: str, *, run_id: str, step_key: str, attempt: int, payload: Payload) -> None:
    """Return if ``signature`` is the dispatcher's for exactly this hand-off; raise HandoffRefused if not."""
    if not signature:
        raise HandoffRefused(f"step {step_key} of run {run_id}: the execution carries no hand-off signature")
    expected = sign(key, run_id=run_id, step_key=step_key, attempt=attempt, payload=payload)
    if not hmac.compare_digest(expected, signature.strip().lower()):
        raise HandoffRefused(f"step {step_key} of run {run_id}, attempt {attempt}: the hand-off signature does "
                             "not match (the execution's overrides or the stored message were not the "
                             "dispatcher's)")  # fmt: skip
