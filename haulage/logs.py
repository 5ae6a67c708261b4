"""Structured logs: every line logged while a step runs carries its run id, step key, attempt and backend.

All of Haulage logs under the ``haulage`` logger hierarchy. HAULAGE_LOG_FORMAT
chooses ``text`` (default) or ``json``: one JSON object per line with the
fields Cloud Logging reads (``severity``, ``message``, ``time``) plus
``run_id``, ``step_key``, ``attempt``, ``backend`` and the logger name, so
logs filter by run or step. Workers install it through Celery's logging
signals; the job container and the CLI call :func:`configure`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from haulage.errors import ConfigError

FIELDS = ("run_id", "step_key", "attempt", "backend")

_step: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("haulage_step", default=None)


@contextmanager
def step_scope(**fields: Any) -> Iterator[None]:
    """While the block runs, log records carry ``fields`` (run_id, step_key, attempt, backend)."""
    token = _step.set(fields)
    try:
        yield
    finally:
        _step.reset(token)


class StepFields(logging.Filter):
    """Adds the running step's fields to every record (empty strings outside a step)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _step.get() or {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, current.get(name, ""))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, in the shape Cloud Logging parses from stdout."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        for name in FIELDS:
            value = getattr(record, name, "")
            if value != "":
                entry[name] = value
        if entry.get("run_id"):
            entry["logging.googleapis.com/labels"] = {"run_id": str(entry["run_id"])}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [run=%(run_id)s step=%(step_key)s attempt=%(attempt)s " \
              "backend=%(backend)s] %(message)s"  # fmt: skip


def log_format() -> str:
    value = os.environ.get("HAULAGE_LOG_FORMAT", "").strip().lower() or "text"
    if value not in ("text", "json"):
        raise ConfigError(f"HAULAGE_LOG_FORMAT must be text or json, got {value!r}")
    return value


def install(handler: logging.Handler) -> None:
    """Give ``handler`` the step fields and the configured format."""
    if not any(isinstance(f, StepFields) for f in handler.filters):
        handler.addFilter(StepFields())
    handler.setFormatter(JsonFormatter() if log_format() == "json" else logging.Formatter(TEXT_FORMAT))


def configure(level: str | int | None = None) -> None:
    """Set up the root logger for a Haulage process (HAULAGE_LOG_LEVEL, default INFO)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        install(handler)
    root.setLevel(level or os.environ.get("HAULAGE_LOG_LEVEL", "INFO").upper())


def connect_celery() -> None:
    """Install the fields and format on the handlers Celery sets up in workers and beat."""
    from celery import signals

    def setup(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            install(handler)

    signals.after_setup_logger.connect(setup, weak=False)
    signals.after_setup_task_logger.connect(setup, weak=False)
