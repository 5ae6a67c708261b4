"""What Cloud Run tells a job container about the work it should do: the documented env overrides, checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from haulage.dispatch.job_config import ENV_ATTEMPT, ENV_JOB, ENV_JOB_NAME, ENV_RUN_ID, ENV_SIGNATURE, ENV_STEP_KEY
from haulage.errors import JobError


@dataclass(frozen=True)
class JobEnv:
    """What Cloud Run tells the container about the work it should do."""

    job_name: str
    run_id: str
    step_key: str
    attempt: int
    task_index: int
    task_count: int
    execution: str | None  #: the execution's full name, when the job's name was passed along
    signature: str  #: the dispatcher's HMAC over the hand-off ("" when the execution carries none)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> JobEnv:
        """Read and check the variables; JobError names every one that is missing or wrong."""
        missing = [name for name in (ENV_JOB_NAME, ENV_RUN_ID, ENV_STEP_KEY, ENV_ATTEMPT) if not env.get(name)]
        if missing:
            raise JobError(f"missing environment variable(s) {', '.join(missing)}; this container runs the "
                           "executions Haulage starts, with those set as env overrides")  # fmt: skip
        numbers = {}
        for name, default in ((ENV_ATTEMPT, None), ("CLOUD_RUN_TASK_INDEX", "0"), ("CLOUD_RUN_TASK_COUNT", "1")):
            raw = env.get(name) or default
            try:
                numbers[name] = int(cast(str, raw))
            except ValueError:
                raise JobError(f"{name} must be a whole number, got {raw!r}") from None
        if numbers[ENV_ATTEMPT] < 1:
            raise JobError(f"{ENV_ATTEMPT} must be 1 or more, got {numbers[ENV_ATTEMPT]}")
        if numbers["CLOUD_RUN_TASK_COUNT"] != 1:
            raise JobError(
                "Haulage runs one step attempt per execution, so CLOUD_RUN_TASK_COUNT must be 1, "
                f"got {numbers['CLOUD_RUN_TASK_COUNT']} (a fan-out starts one execution per item)"
            )
        job, execution_id = env.get(ENV_JOB), env.get("CLOUD_RUN_EXECUTION")
        return cls(
            job_name=env[ENV_JOB_NAME],
            run_id=env[ENV_RUN_ID],
            step_key=env[ENV_STEP_KEY],
            attempt=numbers[ENV_ATTEMPT],
            task_index=numbers["CLOUD_RUN_TASK_INDEX"],
            task_count=numbers["CLOUD_RUN_TASK_COUNT"],
            execution=f"{job}/executions/{execution_id}" if job and execution_id else None,
            signature=env.get(ENV_SIGNATURE, "").strip(),
        )
