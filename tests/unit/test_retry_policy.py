"""The retry policy: how long a failed step waits, when it gives up, and which errors it never retries.

What a user sees through these: backoff that doubles from ``backoff`` seconds,
capped by ``backoff_max`` and by HAULAGE_MAX_COUNTDOWN (kept under the
broker's visibility timeout so a waiting retry is never delivered twice);
jitter that spreads retries between half and all of that wait; ``retries``
counted after the first attempt; and programming errors (and the step's
``no_retry_on`` types) failing at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from haulage.errors import ConfigError, NondeterminismError, PlanError, StepResultNotSerializable
from haulage.settings import reset_settings
from haulage.tasks import StepContext, step
from haulage.tasks.retry import RetryPolicy, retryable

pytestmark = pytest.mark.timeout(30)


class PaymentDeclined(Exception):
    pass


class CardExpired(PaymentDeclined):
    pass


@pytest.fixture
def countdown_cap(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """Set HAULAGE_MAX_COUNTDOWN (with a visibility timeout above it) for the test."""

    def set_cap(seconds: float) -> None:
        monkeypatch.setenv("HAULAGE_VISIBILITY_TIMEOUT", str(seconds * 2 + 10))
        monkeypatch.setenv("HAULAGE_MAX_COUNTDOWN", str(seconds))
        reset_settings()

    yield set_cap
    monkeypatch.undo()
    reset_settings()


def test_backoff_doubles_from_its_first_wait(countdown_cap: Callable[[float], None]) -> None:
    countdown_cap(10_000)
    policy = RetryPolicy(retries=5, backoff=2.0, backoff_max=600.0, jitter=False)
    assert [policy.countdown(attempt) for attempt in range(1, 6)] == [2.0, 4.0, 8.0, 16.0, 32.0]


def test_backoff_stops_growing_at_backoff_max(countdown_cap: Callable[[float], None]) -> None:
    countdown_cap(10_000)
    policy = RetryPolicy(retries=20, backoff=1.0, backoff_max=30.0, jitter=False)
    assert policy.countdown(5) == 16.0
    assert policy.countdown(6) == 30.0
    assert policy.countdown(15) == 30.0


def test_no_wait_is_longer_than_the_max_countdown(countdown_cap: Callable[[float], None]) -> None:
    countdown_cap(5)
    policy = RetryPolicy(retries=10, backoff=4.0, backoff_max=600.0, jitter=False)
    assert policy.countdown(1) == 4.0
    assert policy.countdown(2) == 5.0
    assert policy.countdown(9) == 5.0


def test_jitter_waits_between_half_and_all_of_the_backoff(countdown_cap: Callable[[float], None]) -> None:
    countdown_cap(10_000)
    policy = RetryPolicy(retries=5, backoff=8.0, jitter=True)
    waits = [policy.countdown(2) for _ in range(500)]  # full backoff: 16 s
    assert all(8.0 <= w <= 16.0 for w in waits)
    assert len(set(waits)) > 100  # spread out, so items failing together do not retry together
    assert min(waits) < 10.0 and max(waits) > 14.0


def test_jitter_never_goes_above_the_cap(countdown_cap: Callable[[float], None]) -> None:
    countdown_cap(3)
    policy = RetryPolicy(retries=5, backoff=100.0, jitter=True)
    assert all(1.5 <= policy.countdown(1) <= 3.0 for _ in range(200))


def test_zero_backoff_retries_at_once(countdown_cap: Callable[[float], None]) -> None:
    countdown_cap(10_000)
    assert RetryPolicy(retries=3, backoff=0.0, jitter=True).countdown(3) == 0.0


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_are_counted_after_the_first_attempt(retries: int) -> None:
    # exhausted(n): after attempt n failed, is there no retry left? A step runs at most retries + 1 times.
    policy = RetryPolicy(retries=retries)
    attempts = 1
    while not policy.exhausted(attempts):
        attempts += 1
    assert attempts == retries + 1


def test_ordinary_errors_are_retried() -> None:
    assert retryable(RuntimeError("timeout talking to the model"))
    assert retryable(ConnectionError("reset"))
    assert retryable(PaymentDeclined("try later"))


@pytest.mark.parametrize(
    "exc",
    [TypeError("missing argument"), PlanError("bad plan"), NondeterminismError("plan changed"),
     StepResultNotSerializable("a set")],
)  # fmt: skip
def test_programming_errors_are_never_retried(exc: BaseException) -> None:
    assert not retryable(exc)


def test_a_steps_no_retry_on_types_and_their_subclasses_fail_at_once() -> None:
    assert not retryable(PaymentDeclined("declined"), (PaymentDeclined,))
    assert not retryable(CardExpired("expired"), (PaymentDeclined,))
    assert retryable(RuntimeError("flaky"), (PaymentDeclined,))


def test_the_step_decorator_builds_the_policy_from_its_options() -> None:
    @step(name="unit_retry_charge", retries=5, backoff=0.5, backoff_max=10.0, jitter=False,
          no_retry_on=(PaymentDeclined,))  # fmt: skip
    def charge(ctx: StepContext, amount: int) -> int:
        return amount

    assert charge.policy == RetryPolicy(retries=5, backoff=0.5, backoff_max=10.0, jitter=False)
    assert charge.no_retry_on == (PaymentDeclined,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries must be 0 or more, got -1"),
        ({"backoff": -1.0}, "backoff and backoff_max must be 0 or more seconds"),
        ({"backoff_max": -5.0}, "backoff and backoff_max must be 0 or more seconds"),
        ({"soft_timeout": 0}, "soft_timeout must be more than 0 seconds, got 0"),
        ({"soft_timeout": 10, "hard_timeout": 5}, "soft_timeout (10) must be below hard_timeout (5)"),
    ],
)
def test_a_bad_retry_or_timeout_option_is_refused_at_declaration(options: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError) as info:

        @step(name="unit_retry_bad", **options)  # type: ignore[call-overload]
        def bad(ctx: StepContext) -> None:
            return None

    assert message in str(info.value)
    assert str(info.value).startswith("step 'unit_retry_bad': ")
