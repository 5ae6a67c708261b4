"""Running an execution's tasks as subprocesses: parallelism, retries, timeouts, cancellation.

Each task attempt runs the execution's command in its own process group, with
the environment Cloud Run gives a task container (``CLOUD_RUN_JOB``,
``CLOUD_RUN_EXECUTION``, ``CLOUD_RUN_TASK_INDEX``, ``CLOUD_RUN_TASK_COUNT``,
``CLOUD_RUN_TASK_ATTEMPT``) plus the request's env overrides, and its output
in one log file per attempt.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from haulage.devtools.local_cloudrun.executions import ExecutionRecord, ExecutionTable
from haulage.devtools.local_cloudrun.protocol import LOGGER, Reason, State, completed, timestamp

# How often an execution's runner looks at its processes. Cancellation wakes it
# at once, so this only bounds how late an exit or a timeout is noticed.
_TICK = 0.05  #: seconds


def kill_group(pid: int, sig: signal.Signals) -> None:
    # Tasks run in their own session, so the group id is the leader's pid and
    # the signal reaches whatever the task spawned too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Attempt:
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
        kill_group(self.proc.pid, signal.SIGTERM)

    def poll(self, now: float, grace: float) -> int | None:
        """Return the exit code once the attempt has ended, else None (and enforce limits)."""
        if self.proc is None:
            return self.exit_code
        code = self.proc.poll()
        if code is not None:
            # A container's processes all end with its main process; do the same
            # for anything the task left behind in its group.
            kill_group(self.proc.pid, signal.SIGKILL)
            self.exit_code = code
            return code
        if self.deadline is not None and now >= self.deadline:
            self.terminate("timeout", now)
        if self.term_sent_at is not None and not self.killed and now >= self.term_sent_at + grace:
            self.killed = True
            kill_group(self.proc.pid, signal.SIGKILL)
        return None


class ExecutionRunner:
    """Runs one execution's tasks to the end on its own thread, publishing counts and the outcome."""

    def __init__(self, record: ExecutionRecord, table: ExecutionTable, *, cancel_grace: float,
                 cwd: Path | None, task_env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.task_env = dict(task_env or {})
        self.record = record
        self.table = table
        self.cancel_grace = cancel_grace
        self.cwd = cwd

    def run(self) -> None:
        failures: list[str] = []
        try:
            self._run_tasks(failures)
        finally:
            # Also on an unexpected error, so pollers see an end instead of
            # waiting forever on an execution nobody runs.
            self._finish(failures)

    def _run_tasks(self, failures: list[str]) -> None:
        record = self.record
        if record.start_delay > 0:
            record.cancel_requested.wait(record.start_delay)
        pending: deque[int] = deque(range(record.task_count))
        running: dict[int, Attempt] = {}
        try:
            self._loop(failures, pending, running)
        except BaseException:
            # Do not leave task processes behind a runner that died.
            for attempt in running.values():
                if attempt.proc is not None:
                    kill_group(attempt.proc.pid, signal.SIGKILL)
                    attempt.proc.wait()
            raise

    def _loop(self, failures: list[str], pending: deque[int], running: dict[int, Attempt]) -> None:
        record = self.record
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
                    self.table.update(
                        record,
                        start_time=timestamp(),
                        conditions=[completed(State.CONDITION_RECONCILING, "Tasks are running.")],
                    )
                running[index] = self._launch(index, 0)
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
                    running[index] = self._launch(index, attempt.attempt + 1)
                else:
                    failed += 1
                    failures.append(self._describe_failure(attempt))
            counts = (len(running), succeeded, failed, cancelled, retried)
            if counts != published:
                published = counts
                self.table.update(
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

    def _launch(self, index: int, attempt: int) -> Attempt:
        record = self.record
        log_path = record.log_dir / f"task-{index}-attempt-{attempt}.log"
        record.log_dir.mkdir(parents=True, exist_ok=True)  # survives a cleaned-up folder
        with open(log_path, "ab") as log:
            if index in record.fail_indexes:
                log.write(b"local-cloudrun: injected fault: this task fails without running its command\n")
                return Attempt(index, attempt, log_path, None, None, exit_code=1, failure="injected fault")
            env = {**os.environ, **self.task_env, **record.env}
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
                return Attempt(index, attempt, log_path, None, None, exit_code=127, failure=message)
        # The child holds its own copy of the log descriptor; ours closed above.
        deadline = time.monotonic() + record.timeout if record.timeout is not None else None
        LOGGER.debug("execution %s task %d attempt %d: pid %d", record.name, index, attempt, proc.pid)
        return Attempt(index, attempt, log_path, proc, deadline)

    def _describe_failure(self, attempt: Attempt) -> str:
        if attempt.stopping_reason == "timeout":
            why = f"timed out after {self.record.timeout:g}s and was killed"
        elif attempt.failure is not None:
            why = attempt.failure
        else:
            why = f"exit code {attempt.exit_code}"
        return f"Task {attempt.index} (attempt {attempt.attempt}) {why}; log: {attempt.log_path}"

    def _finish(self, failures: list[str]) -> None:
        record = self.record
        with self.table.lock:
            proto = record.proto
            if proto.failed_count:
                condition = completed(
                    State.CONDITION_FAILED,
                    f"Execution failed: {proto.failed_count} of {proto.task_count} task(s) failed. "
                    + " ".join(failures),
                    Reason.NON_ZERO_EXIT_CODE,
                )
            elif proto.cancelled_count:
                condition = completed(
                    State.CONDITION_FAILED,
                    f"Execution was cancelled: {proto.cancelled_count} of {proto.task_count} task(s) cancelled.",
                    Reason.CANCELLED,
                )
            elif proto.succeeded_count == proto.task_count:
                condition = completed(
                    State.CONDITION_SUCCEEDED,
                    f"Execution completed successfully: {proto.succeeded_count} task(s) succeeded.",
                )
            else:
                condition = completed(
                    State.CONDITION_FAILED,
                    "Execution failed: the local Cloud Run server hit an internal error (see its log).",
                )
            now = timestamp()
            proto.conditions = [condition]
            proto.running_count = 0
            proto.reconciling = False
            proto.completion_time = now
            proto.update_time = now
            record.completed.set()
        LOGGER.info("execution %s completed: %s", record.name, condition.message)
