"""Small pieces of the Cloud Run v2 protocol the server builds answers from.

Resource-name patterns, protobuf timestamps and durations, the execution's
"Completed" condition, and ``Abort``, which answers a call with a gRPC status.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import grpc
from google.cloud import run_v2
from google.protobuf import duration_pb2, timestamp_pb2

#: One logger for every module of the server, so a single level setting covers it.
LOGGER = logging.getLogger("haulage.devtools.local_cloudrun")

JOB_RE = re.compile(r"^projects/([^/]+)/locations/([^/]+)/jobs/([^/]+)$")
EXECUTION_RE = re.compile(r"^projects/([^/]+)/locations/([^/]+)/jobs/([^/]+)/executions/([^/]+)$")

State = run_v2.Condition.State
Reason = run_v2.Condition.ExecutionReason


class Abort(Exception):
    """Raised inside a handler to answer the call with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def timestamp(moment: datetime | None = None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment or datetime.now(UTC))
    return stamp


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def completed(state: Any, message: str, reason: Any = Reason.EXECUTION_REASON_UNDEFINED) -> run_v2.Condition:
    """The execution's "Completed" condition, which is what pollers read for its state."""
    return run_v2.Condition(
        type_="Completed",
        state=state,
        message=message,
        last_transition_time=timestamp(),
        execution_reason=reason,
    )
