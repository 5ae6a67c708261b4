"""The ``@step`` decorator: declare a function as a durable step, and find steps by name.

A step's Celery task runs every delivery through the durable wrapper
(:func:`haulage.tasks.durable.execute_step`); what a step is and the checks of
its parameters live in :mod:`haulage.tasks.definition`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

from haulage.errors import ConfigError, UnknownStep
from haulage.tasks.app import app
from haulage.tasks.definition import DISPATCH, RUNTIMES, Step
from haulage.tasks.durable import execute_step
from haulage.tasks.queues import queue_for, route
from haulage.tasks.retry import RetryPolicy

_steps: dict[str, Step] = {}


def _register_task(step: Step) -> Any:
    def run(task: Any, *args: Any, **kwargs: Any) -> Any:
        return execute_step(task, step, *args, **kwargs)

    run.__name__ = step.func.__name__
    run.__doc__ = step.func.__doc__
    # Its queue is a route (task_routes), not the task attribute Celery deprecates (a warning per step).
    route(step.name, queue_for(step))
    return app.task(
        run,
        name=step.name,
        bind=True,
        typing=False,
        max_retries=None,  # attempts are counted by Haulage's policy, not Celery's
        # A step's outcome is its checkpoint, and its reference travels in the chain's message or the
        # fan-in (tasks/fan_in.py): no one reads its Celery result, so skip the backend's STARTED and
        # SUCCESS writes (two round trips and two publishes a step).
        ignore_result=True,
        soft_time_limit=step.soft_timeout,
        # Always a hard limit (HAULAGE_DEFAULT_HARD_TIMEOUT when the step sets none): the step
        # lock's TTL is derived from it, and must outlive any run of the step.
        time_limit=step.hard_limit,
        rate_limit=step.rate_limit,
        # A hard timeout gives the message back instead of failing it (see tasks/timeouts.py).
        Request="haulage.tasks.timeouts:StepRequest",
    )


@overload
def step(func: Callable[..., Any], /) -> Step: ...


@overload
def step(
    *,
    name: str | None = None,
    runtime: str = "short",
    retries: int = 3,
    backoff: float = 2.0,
    backoff_max: float = 600.0,
    jitter: bool = True,
    soft_timeout: float | None = None,
    hard_timeout: float | None = None,
    rate_limit: str | None = None,
    queue: str | None = None,
    no_retry_on: tuple[type[BaseException], ...] = (),
    dispatch: str | None = None,
) -> Callable[[Callable[..., Any]], Step]: ...


def step(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    runtime: str = "short",
    retries: int = 3,
    backoff: float = 2.0,
    backoff_max: float = 600.0,
    jitter: bool = True,
    soft_timeout: float | None = None,
    hard_timeout: float | None = None,
    rate_limit: str | None = None,
    queue: str | None = None,
    no_retry_on: tuple[type[BaseException], ...] = (),
    dispatch: str | None = None,
) -> Step | Callable[[Callable[..., Any]], Step]:
    """Declare a durable step.

    >>> @step(runtime="short", retries=3)
    ... def analyze_page(ctx, project_id: str, page: int) -> dict:
    ...     ctx.progress(40, "matching")
    ...     return {"page": page}

    ``runtime``: "short" (local workers) or "long" (Cloud Run Jobs, else the
    local ``long`` queue). ``retries``: retries after the first attempt, with
    exponential backoff from ``backoff`` seconds, capped at ``backoff_max``.
    ``soft_timeout``/``hard_timeout``: seconds (the soft one raises
    SoftTimeLimitExceeded in the step so it can clean up). ``rate_limit``:
    Celery's form, e.g. "10/m", per worker. ``queue``: overrides the runtime's
    queue. ``no_retry_on``: exception types that fail the step at once.
    ``dispatch``: "local" or "cloudrun" pins where the step runs whatever its
    runtime and HAULAGE_DISPATCH_MODE say (None: follow them).
    """

    def decorate(f: Callable[..., Any]) -> Step:
        step_name = name or f.__name__
        where = f"step {step_name!r}"
        if runtime not in RUNTIMES:
            raise ConfigError(f"{where}: runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if dispatch is not None and dispatch not in DISPATCH:
            raise ConfigError(f"{where}: dispatch must be one of {', '.join(DISPATCH)} or None, got {dispatch!r}")
        if retries < 0:
            raise ConfigError(f"{where}: retries must be 0 or more, got {retries}")
        if backoff < 0 or backoff_max < 0:
            raise ConfigError(f"{where}: backoff and backoff_max must be 0 or more seconds")
        for label, value in (("soft_timeout", soft_timeout), ("hard_timeout", hard_timeout)):
            if value is not None and value <= 0:
                raise ConfigError(f"{where}: {label} must be more than 0 seconds, got {value}")
        if soft_timeout and hard_timeout and soft_timeout >= hard_timeout:
            raise ConfigError(
                f"{where}: soft_timeout ({soft_timeout}) must be below hard_timeout ({hard_timeout}) "
                "so the step gets its chance to clean up"
            )
        existing = _steps.get(step_name)
        if existing is not None and existing.func.__qualname__ != f.__qualname__:
            raise ConfigError(
                f"{where} is already registered by {existing.func.__module__}.{existing.func.__qualname__}; "
                "pass name= to tell them apart"
            )
        s = Step(
            f,
            name=step_name,
            runtime=runtime,
            policy=RetryPolicy(retries=retries, backoff=backoff, backoff_max=backoff_max, jitter=jitter),
            soft_timeout=soft_timeout,
            hard_timeout=hard_timeout,
            rate_limit=rate_limit,
            queue=queue,
            no_retry_on=tuple(no_retry_on),
            dispatch=dispatch,
        )
        s.task = _register_task(s)
        _steps[step_name] = s
        return s

    if func is not None:
        return decorate(func)
    return decorate


def get_step(name: str) -> Step:
    try:
        return _steps[name]
    except KeyError:
        raise UnknownStep(name, _steps) from None


def all_steps() -> dict[str, Step]:
    return dict(_steps)
