"""A local Cloud Run Jobs server: the real Cloud Run v2 gRPC protocol, tasks as subprocesses.

Development and tests drive it with the real ``google.cloud.run_v2`` clients, so
the dispatch code that talks to production Cloud Run is exercised unchanged.
It implements the methods that code calls:

- ``google.cloud.run.v2.Jobs``: ``RunJob`` (a long-running operation) and ``GetJob``;
- ``google.cloud.run.v2.Executions``: ``GetExecution``, ``ListExecutions``,
  ``CancelExecution`` (a long-running operation);
- ``google.longrunning.Operations``: ``GetOperation``, which the client's
  operation future polls on the same channel.

Each ``RunJob`` creates an execution whose tasks run as subprocesses of a
configurable command (default ``python -m haulage.dispatch.job``), each in its own
process group, with the environment Cloud Run gives a task container
(``CLOUD_RUN_JOB``, ``CLOUD_RUN_EXECUTION``, ``CLOUD_RUN_TASK_INDEX``,
``CLOUD_RUN_TASK_COUNT``, ``CLOUD_RUN_TASK_ATTEMPT``) plus the request's env
overrides. Task output goes to one log file per attempt, under the folder
named by the execution's ``log_uri``.

As in production, the ``RunJob`` operation carries the ``Execution`` as its
metadata from the first answer and is done only when the execution completes:
with the ``Execution`` as its response when no task failed (a cancelled
execution included), with an error when a task failed. Calling
``operation.result()`` therefore blocks for the whole execution.

Faults for tests (``Faults``) are set on the server object or, out of process,
in a JSON file that is re-read on every call.

Example::

    server = LocalCloudRun(command=[sys.executable, "-m", "haulage.dispatch.job"])
    server.start(port=0)
    jobs, executions = make_clients(server.address)
    operation = jobs.run_job(name="projects/p/locations/l/jobs/step")
    execution_name = operation.metadata.name   # available at once
    execution = executions.get_execution(name=execution_name)
    server.stop()

Command line::

    python -m haulage.devtools.local_cloudrun --port 8123 --job haulage-step
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shlex
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import grpc
from google.cloud import run_v2
from google.cloud.run_v2.services.executions.transports import ExecutionsGrpcTransport
from google.cloud.run_v2.services.jobs.transports import JobsGrpcTransport
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import status_pb2

__all__ = [
    "DEFAULT_CANCEL_GRACE",
    "DEFAULT_COMMAND",
    "DEFAULT_HOST",
    "FAILED_EXECUTION_CODE",
    "Faults",
    "LocalCloudRun",
    "main",
    "make_clients",
]

LOGGER = logging.getLogger("haulage.dispatch.local_cloudrun")

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "haulage.dispatch.job")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CANCEL_GRACE = 3.0  #: seconds between SIGTERM and SIGKILL of a task's process group
DEFAULT_RPC_WORKERS = 16  #: gRPC handler threads; RunJob delays hold one each

# How often an execution's runner looks at its processes. Cancellation wakes it
# at once, so this only bounds how late an exit or a timeout is noticed.
_TICK = 0.05  #: seconds

_JOB_RE = re.compile(r"^projects/([^/]+)/locations/([^/]+)/jobs/([^/]+)$")
_EXECUTION_RE = re.compile(r"^projects/([^/]+)/locations/([^/]+)/jobs/([^/]+)/executions/([^/]+)$")
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits

_State = run_v2.Condition.State
_Reason = run_v2.Condition.ExecutionReason

# The status code a failed execution's RunJob operation completes with.
# Production Cloud Run documents only that `error` is set; callers should read
# the Execution's counts and conditions rather than depend on this code.
FAILED_EXECUTION_CODE = grpc.StatusCode.FAILED_PRECONDITION


# --------------------------------------------------------------------------- faults


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


# --------------------------------------------------------------------------- helpers


class _Abort(Exception):
    """Raised inside a handler to answer the call with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _timestamp(moment: datetime | None = None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment or datetime.now(UTC))
    return stamp


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _completed(state: Any, message: str, reason: Any = _Reason.EXECUTION_REASON_UNDEFINED) -> run_v2.Condition:
    return run_v2.Condition(
        type_="Completed",
        state=state,
        message=message,
        last_transition_time=_timestamp(),
        execution_reason=reason,
    )


def _kill_group(pid: int, sig: signal.Signals) -> None:
    # Tasks run in their own session, so the group id is the leader's pid and
    # the signal reaches whatever the task spawned too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _parse_jobs(
    jobs: Mapping[str, Sequence[str] | None] | Iterable[str] | None,
) -> dict[str, tuple[str, ...] | None] | None:
    if jobs is None:
        return None
    if isinstance(jobs, str):
        raise TypeError(f"jobs must be a mapping or a list of job names, not the string {jobs!r}")
    pairs = jobs.items() if isinstance(jobs, Mapping) else ((name, None) for name in jobs)
    parsed: dict[str, tuple[str, ...] | None] = {}
    for name, command in pairs:
        if not name or "/" in name:
            raise ValueError(f"job names are short ids such as 'haulage-step', got {name!r}")
        if command is not None and (isinstance(command, str) or not command):
            raise ValueError(f"the command for job {name!r} must be a non-empty list of arguments, got {command!r}")
        parsed[name] = tuple(command) if command is not None else None
    return parsed


# --------------------------------------------------------------------------- executions


@dataclass
class _Record:
    """Server-side state of one execution; `proto` is guarded by the server lock."""

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


class _Attempt:
    """One try of one task: a subprocess in its own process group, or an injected failure."""

    def __init__(
        self,
        index: int,
        attempt: int,
        log_path: Path,
        proc: subprocess.Popen[bytes] | None,
        deadline: float | None,
        exit_code: int | None = None,
        failure: str | None = None,
    ) -> None:
        self.index = index
        self.attempt = attempt
        self.log_path = log_path
        self.proc = proc
        self.deadline = deadline
        self.exit_code = exit_code
        # Why the attempt ended other than by exiting on its own: "timeout",
        # "cancelled", or a launch/injection message.
        self.failure = failure
        self.stopping_reason: str | None = None
        self.term_sent_at: float | None = None
        self.killed = False

    def terminate(self, reason: str, now: float) -> None:
        if self.proc is None or self.term_sent_at is not None:
            return
        self.stopping_reason = reason
        self.term_sent_at = now
        _kill_group(self.proc.pid, signal.SIGTERM)

    def poll(self, now: float, grace: float) -> int | None:
        """Return the exit code once the attempt has ended, else None (and enforce limits)."""
        if self.proc is None:
            return self.exit_code
        code = self.proc.poll()
        if code is not None:
            # A container's processes all end with its main process; do the same
            # for anything the task left behind in its group.
            _kill_group(self.proc.pid, signal.SIGKILL)
            self.exit_code = code
            return code
        if self.deadline is not None and now >= self.deadline:
            self.terminate("timeout", now)
        if self.term_sent_at is not None and not self.killed and now >= self.term_sent_at + grace:
            self.killed = True
            _kill_group(self.proc.pid, signal.SIGKILL)
        return None


# --------------------------------------------------------------------------- server


class LocalCloudRun:
    """A gRPC server speaking Cloud Run v2 Jobs/Executions/Operations, running tasks locally.

    ``command`` runs each task (default ``python -m haulage.dispatch.job``); ``jobs``
    names the jobs it knows, as a list of ids or a mapping of id to a command
    for that job (None for the default); without ``jobs`` any job id is known.
    ``parallelism`` caps tasks running at once per execution (None or 0: all of
    them). ``max_retries`` retries a failed task that many times.
    ``task_timeout`` (seconds) applies when a request gives no timeout.
    ``cancel_grace`` is the time between SIGTERM and SIGKILL. Task logs go to
    ``log_dir`` (default: a new temporary folder, kept after stop).

    Example::

        with LocalCloudRun(command=["python", "job.py"], jobs=["step"]) as server:
            server.start(port=0)
            jobs_client, executions_client = make_clients(server.address)
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        jobs: Mapping[str, Sequence[str] | None] | Iterable[str] | None = None,
        parallelism: int | None = None,
        max_retries: int = 0,
        task_timeout: float | None = None,
        cancel_grace: float = DEFAULT_CANCEL_GRACE,
        log_dir: str | os.PathLike[str] | None = None,
        faults: Faults | None = None,
        faults_file: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        rpc_workers: int = DEFAULT_RPC_WORKERS,
    ) -> None:
        if command is not None and (isinstance(command, str) or not command):
            raise ValueError(f"command must be a non-empty list of arguments, got {command!r}")
        if parallelism is not None and (not isinstance(parallelism, int) or parallelism < 0):
            raise ValueError(f"parallelism must be an integer >= 0 or None, got {parallelism!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError(f"task_timeout must be a number of seconds > 0 or None, got {task_timeout!r}")
        if cancel_grace < 0:
            raise ValueError(f"cancel_grace must be a number of seconds >= 0, got {cancel_grace!r}")
        if rpc_workers < 1:
            raise ValueError(f"rpc_workers must be an integer >= 1, got {rpc_workers!r}")
        self.command: tuple[str, ...] = tuple(command) if command is not None else DEFAULT_COMMAND
        self.jobs = _parse_jobs(jobs)
        self.parallelism = parallelism
        self.max_retries = max_retries
        self.task_timeout = task_timeout
        self.cancel_grace = cancel_grace
        self.faults = faults if faults is not None else Faults()
        self.faults_file = Path(faults_file) if faults_file is not None else None
        self.cwd = Path(cwd) if cwd is not None else None
        self.log_dir = (
            Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="haulage-local-cloudrun-"))
        )
        #: Calls received per method name ("RunJob", "GetExecution", ...), for tests.
        self.call_counts: Counter[str] = Counter()
        self._rpc_workers = rpc_workers
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        # Operation name -> (kind "run" or "cancel", execution name).
        self._operations: dict[str, tuple[str, str]] = {}
        self._seq = 0
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self._address: str | None = None
        self._created = _timestamp()

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        """``host:port`` to pass to ``make_clients``; set by ``start``."""
        if self._address is None:
            raise RuntimeError("the local Cloud Run server is not started; call start() first")
        return self._address

    def start(self, port: int = 0, host: str = DEFAULT_HOST) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the bound port."""
        if self._server is not None:
            raise RuntimeError(f"the local Cloud Run server already listens on {self._address}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        server = grpc.server(ThreadPoolExecutor(self._rpc_workers, thread_name_prefix="local-cloudrun-rpc"))
        server.add_generic_rpc_handlers(self._handlers())
        bind_host = f"[{host}]" if ":" in host else host
        bound = server.add_insecure_port(f"{bind_host}:{port}")
        if not bound:
            raise OSError(f"the local Cloud Run server could not listen on {bind_host}:{port}")
        server.start()
        self._stopping.clear()
        self._server = server
        self._address = f"{bind_host}:{bound}"
        LOGGER.info(
            "local Cloud Run server listening on %s (task logs in %s)",
            self._address,
            self.log_dir,
        )
        return int(bound)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every running execution (killing its tasks), then stop serving."""
        self._stopping.set()
        with self._lock:
            records = list(self._records.values())
        for record in records:
            record.cancel_requested.set()
            record.wake.set()
        deadline = time.monotonic() + timeout
        for record in records:
            if record.thread is not None:
                record.thread.join(max(0.0, deadline - time.monotonic()))
                if record.thread.is_alive():
                    LOGGER.error(
                        "execution %s did not finish within %.1fs of stop",
                        record.name,
                        timeout,
                    )
        if self._server is not None:
            self._server.stop(grace=0.5).wait()
            self._server = None
            LOGGER.info("local Cloud Run server on %s stopped", self._address)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def current_faults(self) -> Faults:
        """The faults in force: the faults file when given and present, else ``self.faults``."""
        if self.faults_file is None:
            return self.faults
        try:
            text = self.faults_file.read_text()
        except FileNotFoundError:
            return self.faults
        if not text.strip():
            return Faults()
        try:
            return Faults.from_json(json.loads(text))
        except (ValueError, TypeError) as exc:
            # A typo must not silently disable every fault: say so on each call.
            LOGGER.error("ignoring faults file %s: %s", self.faults_file, exc)
            return self.faults

    def executions(self) -> list[run_v2.Execution]:
        """Snapshots of every execution, newest first."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.seq, reverse=True)
            return [self._snapshot(r) for r in records]

    # ------------------------------------------------------------------ gRPC plumbing

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(
            method: str,
            handler: Callable[[Any], Any],
            deserialize: Callable[[bytes], Any],
            serialize: Callable[[Any], bytes],
        ) -> grpc.RpcMethodHandler:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                with self._lock:
                    self.call_counts[method] += 1
                try:
                    return handler(request)
                except _Abort as abort:
                    LOGGER.debug("%s answers %s: %s", method, abort.code.name, abort.message)
                    context.abort(abort.code, abort.message)

            return grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=deserialize, response_serializer=serialize
            )

        operation_out = operations_pb2.Operation.SerializeToString
        return [
            grpc.method_handlers_generic_handler(
                "google.cloud.run.v2.Jobs",
                {
                    "RunJob": unary(
                        "RunJob",
                        self._run_job,
                        run_v2.RunJobRequest.deserialize,
                        operation_out,
                    ),
                    "GetJob": unary(
                        "GetJob",
                        self._get_job,
                        run_v2.GetJobRequest.deserialize,
                        run_v2.Job.serialize,
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "google.cloud.run.v2.Executions",
                {
                    "GetExecution": unary(
                        "GetExecution",
                        self._get_execution,
                        run_v2.GetExecutionRequest.deserialize,
                        run_v2.Execution.serialize,
                    ),
                    "ListExecutions": unary(
                        "ListExecutions",
                        self._list_executions,
                        run_v2.ListExecutionsRequest.deserialize,
                        run_v2.ListExecutionsResponse.serialize,
                    ),
                    "CancelExecution": unary(
                        "CancelExecution",
                        self._cancel_execution,
                        run_v2.CancelExecutionRequest.deserialize,
                        operation_out,
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "google.longrunning.Operations",
                {
                    "GetOperation": unary(
                        "GetOperation",
                        self._get_operation,
                        operations_pb2.GetOperationRequest.FromString,
                        operation_out,
                    ),
                },
            ),
        ]

    # ------------------------------------------------------------------ handlers

    def _run_job(self, request: run_v2.RunJobRequest) -> operations_pb2.Operation:
        faults = self.current_faults()
        if self._stopping.is_set():
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the local Cloud Run server is stopping")
        project, location, job_id = self._known_job(request.name)
        if faults.run_job_error is not None and not faults.run_job_error_after_create:
            raise _Abort(
                faults.run_job_error,
                f"injected fault: RunJob answers {faults.run_job_error.name}",
            )
        if request.validate_only:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "validate_only is not supported by the local Cloud Run server",
            )
        record = self._create_execution(project, location, job_id, request, faults)
        if faults.run_job_delay > 0:
            # The execution already runs; a client deadline shorter than this
            # delay sees DEADLINE_EXCEEDED for a call that did start something.
            self._stopping.wait(faults.run_job_delay)
        if faults.run_job_error is not None:
            raise _Abort(
                faults.run_job_error,
                f"injected fault: RunJob answers {faults.run_job_error.name} after creating {record.name}",
            )
        return self._operation(record.operation_name)

    def _get_job(self, request: run_v2.GetJobRequest) -> run_v2.Job:
        project, location, job_id = self._known_job(request.name)
        command = self._command_for(job_id)
        with self._lock:
            mine = [
                r for r in self._records.values() if (r.project, r.location, r.job_id) == (project, location, job_id)
            ]
            latest = max(mine, key=lambda r: r.seq, default=None)
            template = run_v2.TaskTemplate(
                containers=[run_v2.Container(name=job_id, image="local-process", command=list(command))],
                max_retries=self.max_retries,
            )
            if self.task_timeout is not None:
                template.timeout = _duration(self.task_timeout)
            job = run_v2.Job(
                name=request.name,
                uid=str(uuid.uuid5(uuid.NAMESPACE_URL, request.name)),
                generation=1,
                create_time=self._created,
                update_time=self._created,
                template=run_v2.ExecutionTemplate(task_count=1, parallelism=self.parallelism or 0, template=template),
                observed_generation=1,
                terminal_condition=run_v2.Condition(type_="Ready", state=_State.CONDITION_SUCCEEDED),
                execution_count=len(mine),
                reconciling=False,
            )
            if latest is not None:
                job.latest_created_execution = run_v2.ExecutionReference(
                    name=latest.name, create_time=latest.proto.create_time
                )
            return job

    def _get_execution(self, request: run_v2.GetExecutionRequest) -> run_v2.Execution:
        faults = self.current_faults()
        if faults.get_execution_error is not None:
            code = faults.get_execution_error
            raise _Abort(code, f"injected fault: GetExecution answers {code.name}")
        with self._lock:
            return self._snapshot(self._record(request.name))

    def _list_executions(self, request: run_v2.ListExecutionsRequest) -> run_v2.ListExecutionsResponse:
        match = _JOB_RE.match(request.parent)
        if not match:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"parent must look like projects/P/locations/L/jobs/J (J may be '-'), got {request.parent!r}",
            )
        project, location, job_id = match.groups()
        if job_id != "-":
            self._known_job(request.parent)
        try:
            offset = int(request.page_token) if request.page_token else 0
        except ValueError:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid page_token {request.page_token!r}",
            ) from None
        with self._lock:
            mine = sorted(
                (
                    r
                    for r in self._records.values()
                    if (r.project, r.location) == (project, location) and job_id in ("-", r.job_id)
                ),
                key=lambda r: r.seq,
                reverse=True,
            )
            end = offset + request.page_size if request.page_size > 0 else len(mine)
            page = [self._snapshot(r) for r in mine[offset:end]]
        return run_v2.ListExecutionsResponse(executions=page, next_page_token=str(end) if end < len(mine) else "")

    def _cancel_execution(self, request: run_v2.CancelExecutionRequest) -> operations_pb2.Operation:
        with self._lock:
            record = self._record(request.name)
            if record.completed.is_set():
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"execution {record.name} has already completed; there is nothing to cancel",
                )
            if record.cancel_operation_name is None:
                record.cancel_operation_name = self._new_operation_name(record, "cancel")
                record.proto.conditions = [
                    _completed(
                        _State.CONDITION_RECONCILING,
                        "Cancelling the execution.",
                        _Reason.CANCELLING,
                    )
                ]
                record.proto.update_time = _timestamp()
                LOGGER.info("cancelling execution %s", record.name)
            operation_name = record.cancel_operation_name
        record.cancel_requested.set()
        record.wake.set()
        return self._operation(operation_name)

    def _get_operation(self, request: operations_pb2.GetOperationRequest) -> operations_pb2.Operation:
        return self._operation(request.name)

    # ------------------------------------------------------------------ state helpers

    def _known_job(self, name: str) -> tuple[str, str, str]:
        match = _JOB_RE.match(name)
        if not match:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"job name must look like projects/P/locations/L/jobs/J, got {name!r}",
            )
        project, location, job_id = match.groups()
        if self.jobs is not None and job_id not in self.jobs:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"job {job_id!r} ({name}) is not known to the local Cloud Run server "
                f"(known jobs: {known}); add it with jobs=[...] or --job {job_id}",
            )
        return project, location, job_id

    def _command_for(self, job_id: str) -> tuple[str, ...]:
        own = self.jobs.get(job_id) if self.jobs is not None else None
        return own if own is not None else self.command

    def _record(self, name: str) -> _Record:
        record = self._records.get(name)
        if record is None:
            if not _EXECUTION_RE.match(name):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"execution name must look like projects/P/locations/L/jobs/J/executions/E, got {name!r}",
                )
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"execution {name!r} is not known to the local Cloud Run server "
                "(executions live only as long as the server process)",
            )
        return record

    def _snapshot(self, record: _Record) -> run_v2.Execution:
        # A copy made under the lock: gRPC serializes responses after the
        # handler returns, while the runner thread may be changing the original.
        return run_v2.Execution.deserialize(run_v2.Execution.serialize(record.proto))

    def _new_operation_name(self, record: _Record, kind: str) -> str:
        name = f"projects/{record.project}/locations/{record.location}/operations/{uuid.uuid4()}"
        self._operations[name] = (kind, record.name)
        return name

    def _operation(self, name: str) -> operations_pb2.Operation:
        with self._lock:
            entry = self._operations.get(name)
            if entry is None:
                raise _Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"operation {name!r} is not known to the local Cloud Run server",
                )
            kind, execution_name = entry
            record = self._records[execution_name]
            execution_pb = run_v2.Execution.pb(record.proto)
            operation = operations_pb2.Operation(name=name, done=record.completed.is_set())
            operation.metadata.Pack(execution_pb)
            if operation.done:
                if kind == "run" and record.proto.failed_count > 0:
                    message = record.proto.conditions[0].message if record.proto.conditions else "execution failed"
                    operation.error.CopyFrom(status_pb2.Status(code=FAILED_EXECUTION_CODE.value[0], message=message))
                else:
                    operation.response.Pack(execution_pb)
            return operation

    def _create_execution(
        self,
        project: str,
        location: str,
        job_id: str,
        request: run_v2.RunJobRequest,
        faults: Faults,
    ) -> _Record:
        overrides = run_v2.RunJobRequest.pb(request).overrides
        if len(overrides.container_overrides) > 1:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the local Cloud Run server runs one container per task; "
                f"got {len(overrides.container_overrides)} container_overrides",
            )
        env: dict[str, str] = {}
        args: list[str] = []
        if overrides.container_overrides:
            container = overrides.container_overrides[0]
            env = {var.name: var.value for var in container.env}
            args = list(container.args)
        if overrides.task_count < 0:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"task_count must be >= 0, got {overrides.task_count}",
            )
        task_count = overrides.task_count or 1
        timeout = overrides.timeout.ToNanoseconds() / 1e9 if overrides.HasField("timeout") else self.task_timeout
        if timeout is not None and timeout <= 0:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout must be > 0 seconds, got {timeout}",
            )
        parallelism = min(self.parallelism or task_count, task_count)
        command = self._command_for(job_id) + tuple(args)

        with self._lock:
            # Checked again under the lock: stop() takes its list of executions
            # to cancel under the same lock, so none can slip in after it.
            if self._stopping.is_set():
                raise _Abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the local Cloud Run server is stopping",
                )
            self._seq += 1
            short_id = self._new_short_id(project, location, job_id)
            name = f"projects/{project}/locations/{location}/jobs/{job_id}/executions/{short_id}"
            log_dir = self.log_dir / short_id
            log_dir.mkdir(parents=True, exist_ok=True)
            template = run_v2.TaskTemplate(
                containers=[
                    run_v2.Container(
                        name=job_id,
                        image="local-process",
                        command=list(command),
                        args=args,
                        env=[run_v2.EnvVar(name=k, value=v) for k, v in env.items()],
                    )
                ],
                max_retries=self.max_retries,
            )
            if timeout is not None:
                template.timeout = _duration(timeout)
            now = _timestamp()
            proto = run_v2.Execution(
                name=name,
                uid=str(uuid.uuid4()),
                creator="local-cloudrun",
                generation=1,
                create_time=now,
                update_time=now,
                job=job_id,
                parallelism=parallelism,
                task_count=task_count,
                template=template,
                reconciling=True,
                conditions=[_completed(_State.CONDITION_PENDING, "Waiting for tasks to start.")],
                observed_generation=1,
                log_uri=log_dir.resolve().as_uri() + "/",
                etag=str(self._seq),
            )
            record = _Record(
                name=name,
                short_id=short_id,
                project=project,
                location=location,
                job_id=job_id,
                seq=self._seq,
                proto=proto,
                command=command,
                env=env,
                task_count=task_count,
                parallelism=parallelism,
                timeout=timeout,
                max_retries=self.max_retries,
                start_delay=faults.start_delay,
                fail_indexes=frozenset(faults.fail_task_indexes),
                log_dir=log_dir,
                operation_name="",
            )
            record.operation_name = self._new_operation_name(record, "run")
            self._records[name] = record
            record.thread = threading.Thread(
                target=self._run_execution,
                args=(record,),
                name=f"local-cloudrun-{short_id}",
                daemon=True,
            )
            # Started under the lock so stop() never sees an unstarted thread.
            record.thread.start()
        LOGGER.info(
            "execution %s created: %d task(s), parallelism %d",
            name,
            task_count,
            parallelism,
        )
        return record

    def _new_short_id(self, project: str, location: str, job_id: str) -> str:
        # Cloud Run names executions "<job>-<5 random characters>".
        prefix = f"projects/{project}/locations/{location}/jobs/{job_id}/executions/"
        while True:
            short_id = f"{job_id}-{''.join(random.choices(_SUFFIX_ALPHABET, k=5))}"
            if prefix + short_id not in self._records:
                return short_id

    def _update(self, record: _Record, **fields: Any) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(record.proto, key, value)
            record.proto.update_time = _timestamp()

    # ------------------------------------------------------------------ task runner

    def _run_execution(self, record: _Record) -> None:
        failures: list[str] = []
        try:
            self._run_tasks(record, failures)
        finally:
            # Also on an unexpected error, so pollers see an end instead of
            # waiting forever on an execution nobody runs.
            self._finish(record, failures)

    def _run_tasks(self, record: _Record, failures: list[str]) -> None:
        if record.start_delay > 0:
            record.cancel_requested.wait(record.start_delay)
        pending: deque[int] = deque(range(record.task_count))
        running: dict[int, _Attempt] = {}
        try:
            self._loop(record, failures, pending, running)
        except BaseException:
            # Do not leave task processes behind a runner that died.
            for attempt in running.values():
                if attempt.proc is not None:
                    _kill_group(attempt.proc.pid, signal.SIGKILL)
                    attempt.proc.wait()
            raise

    def _loop(
        self,
        record: _Record,
        failures: list[str],
        pending: deque[int],
        running: dict[int, _Attempt],
    ) -> None:
        succeeded = failed = cancelled = retried = 0
        started = False
        published: tuple[int, ...] = ()
        while True:
            now = time.monotonic()
            if record.cancel_requested.is_set():
                cancelled += len(pending)
                pending.clear()
                for attempt in running.values():
                    attempt.terminate("cancelled", now)
            while pending and len(running) < record.parallelism:
                index = pending.popleft()
                if not started:
                    started = True
                    self._update(
                        record,
                        start_time=_timestamp(),
                        conditions=[_completed(_State.CONDITION_RECONCILING, "Tasks are running.")],
                    )
                running[index] = self._launch(record, index, 0)
            for index, attempt in list(running.items()):
                code = attempt.poll(now, self.cancel_grace)
                if code is None:
                    continue
                del running[index]
                if attempt.stopping_reason == "cancelled":
                    cancelled += 1
                elif code == 0 and attempt.stopping_reason is None:
                    succeeded += 1
                elif attempt.attempt < record.max_retries and not record.cancel_requested.is_set():
                    retried += 1
                    running[index] = self._launch(record, index, attempt.attempt + 1)
                else:
                    failed += 1
                    failures.append(self._describe_failure(attempt, record))
            counts = (len(running), succeeded, failed, cancelled, retried)
            if counts != published:
                published = counts
                self._update(
                    record,
                    running_count=len(running),
                    succeeded_count=succeeded,
                    failed_count=failed,
                    cancelled_count=cancelled,
                    retried_count=retried,
                )
            if not pending and not running:
                return
            record.wake.wait(_TICK)
            record.wake.clear()

    def _launch(self, record: _Record, index: int, attempt: int) -> _Attempt:
        log_path = record.log_dir / f"task-{index}-attempt-{attempt}.log"
        record.log_dir.mkdir(parents=True, exist_ok=True)  # survives a cleaned-up folder
        with open(log_path, "ab") as log:
            if index in record.fail_indexes:
                log.write(b"local-cloudrun: injected fault: this task fails without running its command\n")
                return _Attempt(
                    index,
                    attempt,
                    log_path,
                    None,
                    None,
                    exit_code=1,
                    failure="injected fault",
                )
            env = {**os.environ, **record.env}
            # Cloud Run reserves these names, so they win over any override.
            env.update(
                CLOUD_RUN_JOB=record.job_id,
                CLOUD_RUN_EXECUTION=record.short_id,
                CLOUD_RUN_TASK_INDEX=str(index),
                CLOUD_RUN_TASK_COUNT=str(record.task_count),
                CLOUD_RUN_TASK_ATTEMPT=str(attempt),
            )
            try:
                proc = subprocess.Popen(
                    record.command,
                    env=env,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                message = f"could not start {shlex.join(record.command)}: {exc}"
                log.write(f"local-cloudrun: {message}\n".encode())
                LOGGER.error("execution %s task %d: %s", record.name, index, message)
                return _Attempt(index, attempt, log_path, None, None, exit_code=127, failure=message)
        # The child holds its own copy of the log descriptor; ours closed above.
        deadline = time.monotonic() + record.timeout if record.timeout is not None else None
        LOGGER.debug(
            "execution %s task %d attempt %d: pid %d",
            record.name,
            index,
            attempt,
            proc.pid,
        )
        return _Attempt(index, attempt, log_path, proc, deadline)

    @staticmethod
    def _describe_failure(attempt: _Attempt, record: _Record) -> str:
        if attempt.stopping_reason == "timeout":
            why = f"timed out after {record.timeout:g}s and was killed"
        elif attempt.failure is not None:
            why = attempt.failure
        else:
            why = f"exit code {attempt.exit_code}"
        return f"Task {attempt.index} (attempt {attempt.attempt}) {why}; log: {attempt.log_path}"

    def _finish(self, record: _Record, failures: list[str]) -> None:
        with self._lock:
            proto = record.proto
            if proto.failed_count:
                condition = _completed(
                    _State.CONDITION_FAILED,
                    f"Execution failed: {proto.failed_count} of {proto.task_count} task(s) failed. "
                    + " ".join(failures),
                    _Reason.NON_ZERO_EXIT_CODE,
                )
            elif proto.cancelled_count:
                condition = _completed(
                    _State.CONDITION_FAILED,
                    f"Execution was cancelled: {proto.cancelled_count} of {proto.task_count} task(s) cancelled.",
                    _Reason.CANCELLED,
                )
            elif proto.succeeded_count == proto.task_count:
                condition = _completed(
                    _State.CONDITION_SUCCEEDED,
                    f"Execution completed successfully: {proto.succeeded_count} task(s) succeeded.",
                )
            else:
                condition = _completed(
                    _State.CONDITION_FAILED,
                    "Execution failed: the local Cloud Run server hit an internal error (see its log).",
                )
            now = _timestamp()
            proto.conditions = [condition]
            proto.running_count = 0
            proto.reconciling = False
            proto.completion_time = now
            proto.update_time = now
            record.completed.set()
        LOGGER.info("execution %s completed: %s", record.name, condition.message)


# --------------------------------------------------------------------------- clients


def make_clients(address: str) -> tuple[run_v2.JobsClient, run_v2.ExecutionsClient]:
    """Real run_v2 clients for ``host:port`` over one insecure channel (no credentials).

    Close both with ``jobs.transport.close()``: they share the channel.

    Example::

        jobs, executions = make_clients(server.address)
    """
    channel = grpc.insecure_channel(address)
    return (
        run_v2.JobsClient(transport=JobsGrpcTransport(channel=channel)),
        run_v2.ExecutionsClient(transport=ExecutionsGrpcTransport(channel=channel)),
    )


# --------------------------------------------------------------------------- CLI


def _job_option(value: str) -> tuple[str, tuple[str, ...] | None]:
    name, sep, command = value.partition("=")
    if sep and not shlex.split(command):
        raise argparse.ArgumentTypeError(f"--job {value!r}: the command after '=' is empty")
    return name, tuple(shlex.split(command)) if sep else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m haulage.devtools.local_cloudrun",
        description="Serve the Cloud Run v2 Jobs API locally; tasks run as subprocesses.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument(
        "--command",
        type=shlex.split,
        default=None,
        help=f"task command, shell-quoted (default: {shlex.join(DEFAULT_COMMAND)})",
    )
    parser.add_argument(
        "--job",
        dest="jobs",
        action="append",
        type=_job_option,
        default=None,
        metavar="NAME[=COMMAND]",
        help="a job id to serve, optionally with its own command; repeatable (default: any job id)",
    )
    parser.add_argument(
        "--parallelism",
        type=int,
        default=None,
        help="tasks at once per execution (default: all)",
    )
    parser.add_argument("--max-retries", type=int, default=0, help="retries per failed task (default 0)")
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=None,
        help="seconds, when a request sets none",
    )
    parser.add_argument(
        "--cancel-grace",
        type=float,
        default=DEFAULT_CANCEL_GRACE,
        help=f"seconds between SIGTERM and SIGKILL (default {DEFAULT_CANCEL_GRACE:g})",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="folder for task logs (default: a new temporary folder)",
    )
    parser.add_argument("--faults-file", default=None, help="JSON faults, re-read on every call")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve in the foreground until SIGINT or SIGTERM; return the exit status."""
    parser = _parser()
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        server = LocalCloudRun(
            options.command or None,
            jobs=dict(options.jobs) if options.jobs else None,
            parallelism=options.parallelism,
            max_retries=options.max_retries,
            task_timeout=options.task_timeout,
            cancel_grace=options.cancel_grace,
            log_dir=options.log_dir,
            faults_file=options.faults_file,
        )
    except ValueError as exc:
        parser.error(str(exc))
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        LOGGER.info("received %s; stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server.start(port=options.port, host=options.host)
    # The one line a supervisor or a test reads to learn the address.
    print(
        f"local Cloud Run Jobs server listening on {server.address} (task logs in {server.log_dir})",
        flush=True,
    )
    try:
        stop_requested.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
