"""How a local Cloud Run server runs its jobs: commands, parallelism, retries, timeouts, log folder."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from haulage.dispatch.job_config import OVERRIDES

#: ``-I``: the job ignores PYTHON* variables and the current folder (see haulage.dispatch.job)
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-I", "-m", "haulage.dispatch.job")
#: the env overrides a request may carry by default: the ones Haulage's dispatcher sends
DOCUMENTED_OVERRIDES: frozenset[str] = OVERRIDES
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CANCEL_GRACE = 3.0  #: seconds between SIGTERM and SIGKILL of a task's process group
DEFAULT_RPC_WORKERS = 16  #: gRPC handler threads; RunJob delays hold one each
MIN_TOKEN_LENGTH = 16  #: characters of a bearer token


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
    token: str  #: the bearer token every call must carry
    task_env: dict[str, str]  #: what every task gets, as a job's template env (overrides win)
    allowed_env: frozenset[str] | None  #: env override names a request may set (None: any, and args too)

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
        token: str | None = None,
        allowed_env: Iterable[str] | None = DOCUMENTED_OVERRIDES,
        task_env: Mapping[str, str] | None = None,
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
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token must be at least {MIN_TOKEN_LENGTH} characters, got {len(token)}")
        if isinstance(allowed_env, str):
            raise TypeError(f"allowed_env must be a collection of names, not the string {allowed_env!r}")
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
            # Random when not given: any local process could otherwise start executions (run commands).
            token=token if token is not None else secrets.token_urlsafe(24),
            allowed_env=frozenset(allowed_env) if allowed_env is not None else None,
            task_env=dict(task_env or {}),
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
