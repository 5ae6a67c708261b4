"""Haulage settings, read from the environment in one place.

Every variable is documented in the README's configuration table. Values are
validated when first read, so a typo fails at start-up with the variable's name
rather than deep inside a worker.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from haulage.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _number(name: str, default: float, *, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Resolved settings; build with :func:`get_settings`."""

    redis_url: str
    broker_url: str
    result_backend: str
    modules: tuple[str, ...]
    store: str
    key_prefix: str
    visibility_timeout: float  #: seconds a reserved message may stay unacked before redelivery
    max_countdown: float  #: seconds; the longest retry backoff, kept under the visibility timeout
    history_limit: int  #: events kept per run document (newest win)
    default_hard_timeout: float  #: seconds; a step's hard limit when it sets none
    lock_margin: float  #: seconds the step lock outlives the hard timeout
    dispatch_mode: str
    dev_dir: Path


def load_settings() -> Settings:
    """Read and validate the environment (uncached)."""
    redis_url = _str("HAULAGE_REDIS_URL", DEFAULT_REDIS_URL)
    visibility = _number("HAULAGE_VISIBILITY_TIMEOUT", 3600, minimum=10)
    max_countdown = _number("HAULAGE_MAX_COUNTDOWN", min(600.0, visibility / 2), minimum=0)
    # A countdown is held unacked by the worker; if it outlived the visibility
    # timeout the broker would hand the message to a second worker.
    if max_countdown >= visibility:
        raise ConfigError(
            f"HAULAGE_MAX_COUNTDOWN must be below HAULAGE_VISIBILITY_TIMEOUT ({visibility:g}), "
            f"got {max_countdown:g}"
        )
    modules = tuple(m.strip() for m in os.environ.get("HAULAGE_MODULES", "").split(",") if m.strip())
    return Settings(
        redis_url=redis_url,
        broker_url=_str("HAULAGE_BROKER_URL", redis_url),
        result_backend=_str("HAULAGE_RESULT_BACKEND", redis_url),
        modules=modules,
        store=_choice("HAULAGE_STORE", "redis", ("redis", "firestore")),
        key_prefix=_str("HAULAGE_KEY_PREFIX", "haulage"),
        visibility_timeout=visibility,
        max_countdown=max_countdown,
        history_limit=int(_number("HAULAGE_HISTORY_LIMIT", 100, minimum=1)),
        default_hard_timeout=_number("HAULAGE_DEFAULT_HARD_TIMEOUT", 1800, minimum=1),
        lock_margin=_number("HAULAGE_LOCK_MARGIN", 60, minimum=1),
        dispatch_mode=_choice("HAULAGE_DISPATCH_MODE", "local", ("local", "cloudrun")),
        dev_dir=Path(_str("HAULAGE_DEV_DIR", ".haulage")),
    )


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI change the environment)."""
    get_settings.cache_clear()
