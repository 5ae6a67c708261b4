"""The ``@step`` decorator: a function that runs durably as a Celery task."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

from haulage.errors import ConfigError, PlanError, UnknownStep
from haulage.jsonutil import check_serializable
from haulage.tasks.retry import RetryPolicy

RUNTIMES = ("short", "long")
#: where a step may be pinned with ``dispatch=``; None follows its runtime and HAULAGE_DISPATCH_MODE
DISPATCH = ("local", "cloudrun")

_steps: dict[str, Step] = {}


@dataclass(frozen=True)
class StepCall:
    """A step bound to keyword arguments: one node of a plan (``my_step.s(x=1)``)."""

    step: Step
    kwargs: dict[str, Any]


class Step:
    """A registered step. Call ``.s(**kwargs)`` to place it in a plan."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str,
        runtime: str,
        policy: RetryPolicy,
        soft_timeout: float | None,
        hard_timeout: float | None,
        rate_limit: str | None,
        queue: str | None,
        no_retry_on: tuple[type[BaseException], ...],
        dispatch: str | None = None,
    ) -> None:
        self.func = func
        self.name = name
        self.runtime = runtime
        self.policy = policy
        self.soft_timeout = soft_timeout
        self.hard_timeout = hard_timeout
        self.rate_limit = rate_limit
        self.queue = queue
        self.no_retry_on = no_retry_on
        self.dispatch = dispatch
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ConfigError(f"step {name!r}: its first parameter must be the StepContext (ctx)")
        self._params = params[1:]
        self._accepts_any = any(p.kind is p.VAR_KEYWORD for p in self._params)
        self.task = _register_task(self)
        self.__doc__ = func.__doc__
        self.__name__ = func.__name__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<step {self.name} runtime={self.runtime}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly (unit tests of step logic); no durability."""
        return self.func(*args, **kwargs)

    def s(self, **kwargs: Any) -> StepCall:
        """Bind keyword arguments for use in ``chain``/``fan_out``."""
        self.check_kwargs(kwargs, takes_input=None)
        return StepCall(self, dict(kwargs))

    @property
    def hard_limit(self) -> float:
        from haulage.settings import get_settings

        return self.hard_timeout or get_settings().default_hard_timeout

    def check_kwargs(self, kwargs: dict[str, Any], *, takes_input: bool | None, where: str = "") -> None:
        """Raise PlanError if ``kwargs`` cannot be passed to this step (unknown names, not JSON)."""
        at = f" ({where})" if where else ""
        if not self._accepts_any:
            names = {p.name for p in self._params if p.kind is not p.VAR_POSITIONAL}
            unknown = sorted(set(kwargs) - names)
            if unknown:
                raise PlanError(
                    f"step {self.name!r}{at}: unknown parameter(s) {', '.join(unknown)}; "
                    f"it takes {', '.join(sorted(names)) or 'no parameters'}"
                )
        for key, value in kwargs.items():
            reason = check_serializable(value)
            if reason:
                raise PlanError(f"step {self.name!r}{at}: parameter {key!r} is not JSON-serialisable: {reason}")
        if takes_input is None:
            return
        # The previous stage's output goes to the first parameter after ctx.
        unbound = [p for p in self._params if p.name not in kwargs and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if takes_input:
            first = self._params[0] if self._params else None
            if first is None or first.kind is first.KEYWORD_ONLY:
                raise PlanError(
                    f"step {self.name!r}{at}: it receives the previous stage's output, "
                    "so it needs a parameter for it after ctx"
                )
            if first.name in kwargs:
                raise PlanError(
                    f"step {self.name!r}{at}: parameter {first.name!r} receives the previous stage's output; "
                    "do not bind it"
                )
            unbound = [p for p in unbound if p is not first]
        missing = [p.name for p in unbound if p.default is p.empty]
        if missing:
            raise PlanError(f"step {self.name!r}{at}: missing parameter(s) {', '.join(missing)}")


def _register_task(step: Step) -> Any:
    from haulage.dispatch.routing import queue_for
    from haulage.tasks.app import app
    from haulage.tasks.durable import execute_step

    def run(task: Any, *args: Any, **kwargs: Any) -> Any:
        return execute_step(task, step, *args, **kwargs)

    run.__name__ = step.func.__name__
    run.__doc__ = step.func.__doc__
    return app.task(
        run,
        name=step.name,
        bind=True,
        typing=False,
        max_retries=None,  # attempts are counted by Haulage's policy, not Celery's
        queue=queue_for(step),
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
