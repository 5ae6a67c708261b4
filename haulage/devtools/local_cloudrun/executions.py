"""The server's executions: one record per execution, and the table that holds them under one lock.

A record's ``proto`` is the ``Execution`` clients read; the runner thread
changes it while gRPC handlers read it, so both go through the table's lock.
"""

from __future__ import annotations

import random
import string
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.cloud import run_v2
from google.longrunning import operations_pb2

from haulage.devtools.local_cloudrun.operations import OperationKind, new_operation_name, operation_proto
from haulage.devtools.local_cloudrun.protocol import EXECUTION_RE, Abort, timestamp

_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class ExecutionRecord:
    """Server-side state of one execution; `proto` is guarded by the table's lock."""

    name: str
    short_id: str
    project: str
    location: str
    job_id: str
    seq: int
    proto: run_v2.Execution
    command: tuple[str, ...]
    env: dict[str, str]
    task_count: int
    parallelism: int
    timeout: float | None
    max_retries: int
    start_delay: float
    fail_indexes: frozenset[int]
    log_dir: Path
    operation_name: str
    cancel_operation_name: str | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    completed: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class ExecutionTable:
    """Every execution the server created and every operation it answered with.

    Methods whose docstring says "under the lock" expect the caller to hold
    ``lock``; the others take it themselves.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Set by stop(): no new execution is created once it is.
        self.stopping = threading.Event()
        self.records: dict[str, ExecutionRecord] = {}
        self._operations: dict[str, tuple[OperationKind, str]] = {}
        self._seq = 0

    def next_seq(self) -> int:
        """The creation number of a new execution (under the lock); it orders executions newest first."""
        self._seq += 1
        return self._seq

    def get(self, name: str) -> ExecutionRecord:
        """The execution called ``name`` (under the lock), or an INVALID_ARGUMENT / NOT_FOUND answer."""
        record = self.records.get(name)
        if record is None:
            if not EXECUTION_RE.match(name):
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"execution name must look like projects/P/locations/L/jobs/J/executions/E, got {name!r}",
                )
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"execution {name!r} is not known to the local Cloud Run server "
                "(executions live only as long as the server process)",
            )
        return record

    def newest_first(self) -> list[ExecutionRecord]:
        """Every execution, newest first (under the lock)."""
        return sorted(self.records.values(), key=lambda r: r.seq, reverse=True)

    @staticmethod
    def snapshot(record: ExecutionRecord) -> run_v2.Execution:
        """A copy of the execution (under the lock).

        gRPC serializes responses after the handler returns, while the runner
        thread may be changing the original.
        """
        return run_v2.Execution.deserialize(run_v2.Execution.serialize(record.proto))

    def new_short_id(self, project: str, location: str, job_id: str) -> str:
        """A fresh execution id (under the lock); Cloud Run names them "<job>-<5 random characters>"."""
        prefix = f"projects/{project}/locations/{location}/jobs/{job_id}/executions/"
        while True:
            short_id = f"{job_id}-{''.join(random.choices(_SUFFIX_ALPHABET, k=5))}"
            if prefix + short_id not in self.records:
                return short_id

    def new_operation(self, record: ExecutionRecord, kind: OperationKind) -> str:
        """Name a new operation on ``record`` (under the lock)."""
        name = new_operation_name(record.project, record.location)
        self._operations[name] = (kind, record.name)
        return name

    def operation(self, name: str) -> operations_pb2.Operation:
        """The operation ``name`` in its current state, or a NOT_FOUND answer."""
        with self.lock:
            entry = self._operations.get(name)
            if entry is None:
                raise Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"operation {name!r} is not known to the local Cloud Run server",
                )
            kind, execution_name = entry
            record = self.records[execution_name]
            return operation_proto(name, kind, record.proto, record.completed.is_set())

    def update(self, record: ExecutionRecord, **fields: Any) -> None:
        """Set fields of the execution and its update time."""
        with self.lock:
            for key, value in fields.items():
                setattr(record.proto, key, value)
            record.proto.update_time = timestamp()
