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

from celery._state import get_current_task

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


def task_fields() -> dict[str, Any]:
    """The run id and step key of the Haulage task this thread is running (fan-out, finish, driver), if any.

    Every Haulage task is called with ``run_id`` and ``key`` (or ``flow``) keyword arguments, so
    the engine's own lines outside a step's body still say which run they are about.
    """
    task = get_current_task()
    request = getattr(task, "request", None)
    kwargs = getattr(request, "kwargs", None)
    if not isinstance(kwargs, dict) or not kwargs.get("run_id"):
        return {}
    flow = kwargs.get("flow")
    flow = flow if isinstance(flow, dict) else {}
    fields: dict[str, Any] = {"run_id": kwargs["run_id"]}
    if kwargs.get("key"):
        fields["step_key"] = kwargs["key"]
    if flow.get("attempt"):
        fields["attempt"] = flow["attempt"]
    return fields


class StepFields(logging.Filter):
    """Adds the running step's fields to every record (from the running task outside a step; else empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _step.get() or task_fields()
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, current.get(name, ""))
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [run=... step=... attempt=... backend=...] message``, showing only the fields set."""

    NAMES = {"run_id": "run", "step_key": "step", "attempt": "attempt", "backend": "backend"}

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(haulage_fields)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        shown = " ".join(f"{label}={getattr(record, name)}" for name, label in self.NAMES.items()
                         if getattr(record, name, "") not in ("", None))  # fmt: skip
        record.haulage_fields = f" [{shown}]" if shown else ""
        return super().format(record)


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


def log_format() -> str:
    value = os.environ.get("HAULAGE_LOG_FORMAT", "").strip().lower() or "text"
    if value not in ("text", "json"):
        raise ConfigError(f"HAULAGE_LOG_FORMAT must be text or json, got {value!r}")
    return value


def install(handler: logging.Handler) -> None:
    """Give ``handler`` the step fields and the configured format."""
    if not any(isinstance(f, StepFields) for f in handler.filters):
        handler.addFilter(StepFields())
    handler.setFormatter(JsonFormatter() if log_format() == "json" else TextFormatter())


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
