"""``LocalCloudRun``: the server's lifecycle, its options and its faults, around the gRPC services."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import grpc
from google.cloud import run_v2

from haulage.devtools.local_cloudrun.executions import ExecutionTable
from haulage.devtools.local_cloudrun.faults import Faults
from haulage.devtools.local_cloudrun.options import (
    DEFAULT_CANCEL_GRACE,
    DEFAULT_HOST,
    DEFAULT_RPC_WORKERS,
    DOCUMENTED_OVERRIDES,
    ServerOptions,
)
from haulage.devtools.local_cloudrun.protocol import LOGGER
from haulage.devtools.local_cloudrun.services import CloudRunServices


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

    Every call must carry ``authorization: Bearer <token>`` (``token``, random
    when not given: read it back as ``server.token``), because whoever can start
    an execution runs its command. ``allowed_env`` names the env overrides a
    request may set, by default only those Haulage's dispatcher sends
    (``DOCUMENTED_OVERRIDES``); a request with any other, or with args, is refused.
    ``allowed_env=None`` accepts any, as a generic Cloud Run fake. ``task_env``
    is what every task gets besides this process's environment, as a job's
    template env (for Haulage's job: ``HAULAGE_JOB_CONFIG_FILE``).

    Example::

        with LocalCloudRun(command=["python", "job.py"], jobs=["step"]) as server:
            server.start(port=0)
            jobs_client, executions_client = make_clients(server.address, server.token)
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
        token: str | None = None,
        allowed_env: Iterable[str] | None = DOCUMENTED_OVERRIDES,
        task_env: Mapping[str, str] | None = None,
    ) -> None:
        self.options = ServerOptions.build(
            command, jobs=jobs, parallelism=parallelism, max_retries=max_retries, task_timeout=task_timeout,
            cancel_grace=cancel_grace, log_dir=log_dir, cwd=cwd, rpc_workers=rpc_workers, token=token,
            allowed_env=allowed_env, task_env=task_env,
        )  # fmt: skip
        self.faults = faults if faults is not None else Faults()
        self.faults_file = Path(faults_file) if faults_file is not None else None
        #: Calls received per method name ("RunJob", "GetExecution", ...), for tests.
        self.call_counts: Counter[str] = Counter()
        self._table = ExecutionTable()
        self._services = CloudRunServices(self._table, self.options, faults=self.current_faults,
                                          call_counts=self.call_counts)  # fmt: skip
        self._server: grpc.Server | None = None
        self._address: str | None = None

    @property
    def log_dir(self) -> Path:
        """The folder of task logs: one subfolder per execution, one file per task attempt."""
        return self.options.log_dir

    @property
    def token(self) -> str:
        """The bearer token clients must send (``make_clients(server.address, server.token)``)."""
        return self.options.token

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
        server = grpc.server(ThreadPoolExecutor(self.options.rpc_workers, thread_name_prefix="local-cloudrun-rpc"))
        server.add_generic_rpc_handlers(self._services.handlers())
        bind_host = f"[{host}]" if ":" in host else host
        bound = server.add_insecure_port(f"{bind_host}:{port}")
        if not bound:
            raise OSError(f"the local Cloud Run server could not listen on {bind_host}:{port}")
        server.start()
        self._table.stopping.clear()
        self._server = server
        self._address = f"{bind_host}:{bound}"
        LOGGER.info("local Cloud Run server listening on %s (task logs in %s)", self._address, self.log_dir)
        return int(bound)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every running execution (killing its tasks), then stop serving."""
        self._table.stopping.set()
        with self._table.lock:
            records = list(self._table.records.values())
        for record in records:
            record.cancel_requested.set()
            record.wake.set()
        deadline = time.monotonic() + timeout
        for record in records:
            if record.thread is not None:
                record.thread.join(max(0.0, deadline - time.monotonic()))
                if record.thread.is_alive():
                    LOGGER.error("execution %s did not finish within %.1fs of stop", record.name, timeout)
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
        with self._table.lock:
            return [self._table.snapshot(r) for r in self._table.newest_first()]
