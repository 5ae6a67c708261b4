"""How a local Cloud Run server runs its jobs: commands, parallelism, retries, timeouts, log folder."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "haulage.dispatch.job")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CANCEL_GRACE = 3.0  #: seconds between SIGTERM and SIGKILL of a task's process group
DEFAULT_RPC_WORKERS = 16  #: gRPC handler threads; RunJob delays hold one each


@dataclass(frozen=True)
class ServerOptions:
    """The validated options of one server; see :class:`LocalCloudRun` for what each means."""

    command: tuple[str, ...]
    jobs: dict[str, tuple[str, ...] | None] | None
    parallelism: int | None
    max_retries: int
    task_timeout: float | None  #: seconds
    cancel_grace: float  #: seconds
    log_dir: Path
    cwd: Path | None
    rpc_workers: int

    @classmethod
    def build(
        cls,
        command: Sequence[str] | None = None,
        *,
        jobs: Mapping[str, Sequence[str] | None] | Iterable[str] | None = None,
        parallelism: int | None = None,
        max_retries: int = 0,
        task_timeout: float | None = None,
        cancel_grace: float = DEFAULT_CANCEL_GRACE,
        log_dir: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        rpc_workers: int = DEFAULT_RPC_WORKERS,
    ) -> ServerOptions:
        """Check every option (ValueError naming the option and the value) and fill in the defaults."""
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
        return cls(
            command=tuple(command) if command is not None else DEFAULT_COMMAND,
            jobs=_parse_jobs(jobs),
            parallelism=parallelism,
            max_retries=max_retries,
            task_timeout=task_timeout,
            cancel_grace=cancel_grace,
            log_dir=(
                Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="haulage-local-cloudrun-"))
            ),
            cwd=Path(cwd) if cwd is not None else None,
            rpc_workers=rpc_workers,
        )

    def command_for(self, job_id: str) -> tuple[str, ...]:
        """The job's own command when it has one, else the server's."""
        own = self.jobs.get(job_id) if self.jobs is not None else None
        return own if own is not None else self.command


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
