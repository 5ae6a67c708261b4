"""The long-running operations RunJob and CancelExecution answer with, and GetOperation reads.

As in production, an operation carries the ``Execution`` as its metadata from
the first answer and is done only when the execution completes: with the
``Execution`` as its response when no task failed (a cancelled execution
included), with an error when a task of a RunJob's execution failed.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

import grpc
from google.cloud import run_v2
from google.longrunning import operations_pb2
from google.rpc import status_pb2

# The status code a failed execution's RunJob operation completes with.
# Production Cloud Run documents only that `error` is set; callers should read
# the Execution's counts and conditions rather than depend on this code.
FAILED_EXECUTION_CODE = grpc.StatusCode.FAILED_PRECONDITION


class OperationKind(StrEnum):
    """What an operation waits for: a RunJob's execution, or its cancellation."""

    RUN = "run"
    CANCEL = "cancel"


def new_operation_name(project: str, location: str) -> str:
    return f"projects/{project}/locations/{location}/operations/{uuid.uuid4()}"


def operation_proto(
    name: str, kind: OperationKind, execution: run_v2.Execution, done: bool
) -> operations_pb2.Operation:
    """The operation ``name`` as a client sees it, for an execution in its current state."""
    execution_pb = run_v2.Execution.pb(execution)
    operation = operations_pb2.Operation(name=name, done=done)
    operation.metadata.Pack(execution_pb)
    if done:
        if kind is OperationKind.RUN and execution.failed_count > 0:
            message = execution.conditions[0].message if execution.conditions else "execution failed"
            operation.error.CopyFrom(status_pb2.Status(code=FAILED_EXECUTION_CODE.value[0], message=message))
        else:
            operation.response.Pack(execution_pb)
    return operation
