"""The gRPC services: ``google.cloud.run.v2.Jobs`` and ``Executions``, ``google.longrunning.Operations``.

Only the methods Haulage's dispatch code calls: RunJob and GetJob;
GetExecution, ListExecutions and CancelExecution; GetOperation, which the
client's operation future polls on the same channel.
"""

from __future__ import annotations

import hmac
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from google.cloud import run_v2
from google.longrunning import operations_pb2

from haulage.devtools.local_cloudrun.executions import ExecutionRecord, ExecutionTable
from haulage.devtools.local_cloudrun.faults import Faults
from haulage.devtools.local_cloudrun.operations import OperationKind
from haulage.devtools.local_cloudrun.options import ServerOptions
from haulage.devtools.local_cloudrun.protocol import (
    JOB_RE,
    LOGGER,
    Abort,
    Reason,
    State,
    completed,
    duration,
    timestamp,
)
from haulage.devtools.local_cloudrun.runner import ExecutionRunner


class CloudRunServices:
    """The handlers of the three services, over one table of executions.

    ``faults`` is called on each call that can inject one, so a faults file
    edited while the server runs takes effect at once. ``call_counts`` counts
    calls per method name, for tests.
    """

    def __init__(self, table: ExecutionTable, options: ServerOptions, *, faults: Callable[[], Faults],
                 call_counts: Counter[str]) -> None:  # fmt: skip
        self.table = table
        self.options = options
        self.faults = faults
        self.call_counts = call_counts
        self._created = timestamp()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The generic handlers to add to a ``grpc.Server``."""
        operation_out = operations_pb2.Operation.SerializeToString
        return [
            grpc.method_handlers_generic_handler(
                "google.cloud.run.v2.Jobs",
                {
                    "RunJob": self._unary("RunJob", self.run_job, run_v2.RunJobRequest.deserialize, operation_out),
                    "GetJob": self._unary(
                        "GetJob", self.get_job, run_v2.GetJobRequest.deserialize, run_v2.Job.serialize
                    ),  # fmt: skip
                },
            ),
            grpc.method_handlers_generic_handler(
                "google.cloud.run.v2.Executions",
                {
                    "GetExecution": self._unary(
                        "GetExecution",
                        self.get_execution,
                        run_v2.GetExecutionRequest.deserialize,
                        run_v2.Execution.serialize,
                    ),  # fmt: skip
                    "ListExecutions": self._unary(
                        "ListExecutions",
                        self.list_executions,
                        run_v2.ListExecutionsRequest.deserialize,
                        run_v2.ListExecutionsResponse.serialize,
                    ),  # fmt: skip
                    "CancelExecution": self._unary(
                        "CancelExecution",
                        self.cancel_execution,
                        run_v2.CancelExecutionRequest.deserialize,
                        operation_out,
                    ),  # fmt: skip
                },
            ),
            grpc.method_handlers_generic_handler(
                "google.longrunning.Operations",
                {
                    "GetOperation": self._unary(
                        "GetOperation", self.get_operation, operations_pb2.GetOperationRequest.FromString, operation_out
                    ),  # fmt: skip
                },
            ),
        ]

    def _unary(
        self,
        method: str,
        handler: Callable[[Any], Any],
        deserialize: Callable[[bytes], Any],
        serialize: Callable[[Any], bytes],
    ) -> grpc.RpcMethodHandler:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            with self.table.lock:
                self.call_counts[method] += 1
            try:
                self._authenticate(context)
                return handler(request)
            except Abort as abort:
                LOGGER.debug("%s answers %s: %s", method, abort.code.name, abort.message)
                context.abort(abort.code, abort.message)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=deserialize, response_serializer=serialize
        )

    # ------------------------------------------------------------------ Jobs

    def run_job(self, request: run_v2.RunJobRequest) -> operations_pb2.Operation:
        faults = self.faults()
        if self.table.stopping.is_set():
            raise Abort(grpc.StatusCode.UNAVAILABLE, "the local Cloud Run server is stopping")
        project, location, job_id = self._known_job(request.name)
        if faults.run_job_error is not None and not faults.run_job_error_after_create:
            raise Abort(faults.run_job_error, f"injected fault: RunJob answers {faults.run_job_error.name}")
        if request.validate_only:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "validate_only is not supported by the local Cloud Run server"
            )
        record = self._create_execution(project, location, job_id, request, faults)
        if faults.run_job_delay > 0:
            # The execution already runs; a client deadline shorter than this
            # delay sees DEADLINE_EXCEEDED for a call that did start something.
            self.table.stopping.wait(faults.run_job_delay)
        if faults.run_job_error is not None:
            raise Abort(
                faults.run_job_error,
                f"injected fault: RunJob answers {faults.run_job_error.name} after creating {record.name}",
            )
        return self.table.operation(record.operation_name)

    def get_job(self, request: run_v2.GetJobRequest) -> run_v2.Job:
        project, location, job_id = self._known_job(request.name)
        options = self.options
        command = options.command_for(job_id)
        with self.table.lock:
            mine = [r for r in self.table.records.values()
                    if (r.project, r.location, r.job_id) == (project, location, job_id)]  # fmt: skip
            latest = max(mine, key=lambda r: r.seq, default=None)
            template = run_v2.TaskTemplate(
                containers=[run_v2.Container(name=job_id, image="local-process", command=list(command))],
                max_retries=options.max_retries,
            )
            if options.task_timeout is not None:
                template.timeout = duration(options.task_timeout)
            job = run_v2.Job(
                name=request.name,
                uid=str(uuid.uuid5(uuid.NAMESPACE_URL, request.name)),
                generation=1,
                create_time=self._created,
                update_time=self._created,
                template=run_v2.ExecutionTemplate(
                    task_count=1, parallelism=options.parallelism or 0, template=template
                ),  # fmt: skip
                observed_generation=1,
                terminal_condition=run_v2.Condition(type_="Ready", state=State.CONDITION_SUCCEEDED),
                execution_count=len(mine),
                reconciling=False,
            )
            if latest is not None:
                job.latest_created_execution = run_v2.ExecutionReference(
                    name=latest.name, create_time=latest.proto.create_time
                )
            return job

    # ------------------------------------------------------------------ Executions

    def get_execution(self, request: run_v2.GetExecutionRequest) -> run_v2.Execution:
        faults = self.faults()
        if faults.get_execution_error is not None:
            code = faults.get_execution_error
            raise Abort(code, f"injected fault: GetExecution answers {code.name}")
        with self.table.lock:
            return self.table.snapshot(self.table.get(request.name))

    def list_executions(self, request: run_v2.ListExecutionsRequest) -> run_v2.ListExecutionsResponse:
        match = JOB_RE.match(request.parent)
        if not match:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"parent must look like projects/P/locations/L/jobs/J (J may be '-'), got {request.parent!r}",
            )
        project, location, job_id = match.groups()
        if job_id != "-":
            self._known_job(request.parent)
        try:
            offset = int(request.page_token) if request.page_token else 0
        except ValueError:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid page_token {request.page_token!r}") from None
        with self.table.lock:
            mine = [r for r in self.table.newest_first()
                    if (r.project, r.location) == (project, location) and job_id in ("-", r.job_id)]  # fmt: skip
            end = offset + request.page_size if request.page_size > 0 else len(mine)
            page = [self.table.snapshot(r) for r in mine[offset:end]]
        return run_v2.ListExecutionsResponse(executions=page, next_page_token=str(end) if end < len(mine) else "")

    def cancel_execution(self, request: run_v2.CancelExecutionRequest) -> operations_pb2.Operation:
        with self.table.lock:
            record = self.table.get(request.name)
            if record.completed.is_set():
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"execution {record.name} has already completed; there is nothing to cancel",
                )
            if record.cancel_operation_name is None:
                record.cancel_operation_name = self.table.new_operation(record, OperationKind.CANCEL)
                record.proto.conditions = [
                    completed(State.CONDITION_RECONCILING, "Cancelling the execution.", Reason.CANCELLING)
                ]
                record.proto.update_time = timestamp()
                LOGGER.info("cancelling execution %s", record.name)
            operation_name = record.cancel_operation_name
        record.cancel_requested.set()
        record.wake.set()
        return self.table.operation(operation_name)

    # ------------------------------------------------------------------ Operations

    def get_operation(self, request: operations_pb2.GetOperationRequest) -> operations_pb2.Operation:
        return self.table.operation(request.name)

    # ------------------------------------------------------------------ helpers

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        """The call carries ``authorization: Bearer <the server's token>``, or it is refused (UNAUTHENTICATED)."""
        sent = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = str(sent).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.options.token.encode()):
            raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                        "the local Cloud Run server wants 'authorization: Bearer <token>' with the token it was "
                        "started with (HAULAGE_CLOUDRUN_TOKEN)")  # fmt: skip

    def _check_overrides(self, env: dict[str, str], args: list[str]) -> None:
        """Only the documented env overrides, and no args, when the server was told which are documented."""
        allowed = self.options.allowed_env
        if allowed is None:
            return
        unknown = sorted(set(env) - allowed)
        if unknown:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"env override(s) {', '.join(unknown)} are not accepted; this server takes only "
                        f"{', '.join(sorted(allowed))}")  # fmt: skip
        if args:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "args overrides are not accepted by this server")

    def _known_job(self, name: str) -> tuple[str, str, str]:
        match = JOB_RE.match(name)
        if not match:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"job name must look like projects/P/locations/L/jobs/J, got {name!r}",
            )
        project, location, job_id = match.groups()
        jobs = self.options.jobs
        if jobs is not None and job_id not in jobs:
            known = ", ".join(sorted(jobs)) or "none"
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"job {job_id!r} ({name}) is not known to the local Cloud Run server "
                f"(known jobs: {known}); add it with jobs=[...] or --job {job_id}",
            )
        return project, location, job_id

    def _create_execution(self, project: str, location: str, job_id: str, request: run_v2.RunJobRequest,
                          faults: Faults) -> ExecutionRecord:  # fmt: skip
        overrides = run_v2.RunJobRequest.pb(request).overrides
        if len(overrides.container_overrides) > 1:
            raise Abort(
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
        self._check_overrides(env, args)
        if overrides.task_count < 0:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"task_count must be >= 0, got {overrides.task_count}")
        task_count = overrides.task_count or 1
        options = self.options
        timeout = overrides.timeout.ToNanoseconds() / 1e9 if overrides.HasField("timeout") else options.task_timeout
        if timeout is not None and timeout <= 0:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"timeout must be > 0 seconds, got {timeout}")
        parallelism = min(options.parallelism or task_count, task_count)
        command = options.command_for(job_id) + tuple(args)

        table = self.table
        with table.lock:
            # Checked again under the lock: stop() takes its list of executions
            # to cancel under the same lock, so none can slip in after it.
            if table.stopping.is_set():
                raise Abort(grpc.StatusCode.UNAVAILABLE, "the local Cloud Run server is stopping")
            seq = table.next_seq()
            short_id = table.new_short_id(project, location, job_id)
            name = f"projects/{project}/locations/{location}/jobs/{job_id}/executions/{short_id}"
            log_dir = options.log_dir / short_id
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
                max_retries=options.max_retries,
            )
            if timeout is not None:
                template.timeout = duration(timeout)
            now = timestamp()
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
                conditions=[completed(State.CONDITION_PENDING, "Waiting for tasks to start.")],
                observed_generation=1,
                log_uri=log_dir.resolve().as_uri() + "/",
                etag=str(seq),
            )
            record = ExecutionRecord(
                name=name, short_id=short_id, project=project, location=location, job_id=job_id, seq=seq,
                proto=proto, command=command, env=env, task_count=task_count, parallelism=parallelism,
                timeout=timeout, max_retries=options.max_retries, start_delay=faults.start_delay,
                fail_indexes=frozenset(faults.fail_task_indexes), log_dir=log_dir, operation_name="",
            )  # fmt: skip
            record.operation_name = table.new_operation(record, OperationKind.RUN)
            table.records[name] = record
            runner = ExecutionRunner(record, table, cancel_grace=options.cancel_grace, cwd=options.cwd,
                                    task_env=options.task_env)  # fmt: skip
            record.thread = threading.Thread(target=runner.run, name=f"local-cloudrun-{short_id}", daemon=True)
            # Started under the lock so stop() never sees an unstarted thread.
            record.thread.start()
        LOGGER.info("execution %s created: %d task(s), parallelism %d", name, task_count, parallelism)
        return record
