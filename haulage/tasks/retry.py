"""Retry policy: exponential backoff with jitter, bounded by the broker's visibility timeout.

Also which errors are worth another attempt at all: :func:`retryable`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from haulage.errors import EffectOutcomeUnknown, NondeterminismError, PlanError, StepResultNotSerializable
from haulage.settings import get_settings

#: programming errors: retrying them cannot help
NEVER_RETRY: tuple[type[BaseException], ...] = (
    StepResultNotSerializable,
    NondeterminismError,
    PlanError,
    TypeError,
    EffectOutcomeUnknown,  # the next attempt would find the same dead claim
)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  #: retries after the first attempt
    backoff: float = 2.0  #: seconds before the first retry; doubles each time
    backoff_max: float = 600.0  #: seconds
    jitter: bool = True

    def countdown(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``.

        Full backoff is ``backoff * 2**(attempt-1)``; jitter takes a random
        value between half and all of it so that items failing together do
        not retry together. Never above HAULAGE_MAX_COUNTDOWN, which is below
        the visibility timeout: a longer countdown would be redelivered to a
        second worker while the first still holds it.
        """
        delay = min(self.backoff * (2 ** max(attempt - 1, 0)), self.backoff_max, get_settings().max_countdown)
        if self.jitter:
            delay = random.uniform(delay / 2, delay)
        return max(delay, 0.0)

    def exhausted(self, attempt: int) -> bool:
        return attempt > self.retries


def retryable(exc: BaseException, no_retry_on: tuple[type[BaseException], ...] = ()) -> bool:
    """False for programming errors and a step's ``no_retry_on`` types: another attempt cannot help."""
    return not isinstance(exc, NEVER_RETRY + no_retry_on)
