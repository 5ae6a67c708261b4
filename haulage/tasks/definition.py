"""What a step is: its options, the checks of the parameters it is given, and ``StepCall``, a step in a plan.

The ``@step`` decorator (:mod:`haulage.tasks.step`) builds a :class:`Step` and
registers its Celery task; the durable wrapper and the dispatcher read the
options from here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from haulage.errors import ConfigError, PlanError
from haulage.jsonutil import check_serializable
from haulage.settings import get_settings
from haulage.tasks.retry import RetryPolicy

RUNTIMES = ("short", "long")
#: where a step may be pinned with ``dispatch=``; None follows its runtime and HAULAGE_DISPATCH_MODE
DISPATCH = ("local", "cloudrun")


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
        #: the step's Celery task, registered by the ``@step`` decorator (haulage.tasks.step)
        self.task: Any = None
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ConfigError(f"step {name!r}: its first parameter must be the StepContext (ctx)")
        self._params = params[1:]
        self._accepts_any = any(p.kind is p.VAR_KEYWORD for p in self._params)
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
