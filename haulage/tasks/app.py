"""The Celery application: Haulage's own settings, a deployment's additions, and a check of both.

Only Haulage's settings module is loaded by default: an application's own
``celeryconfig.py`` (which Celery's documentation teaches) never reaches
Haulage's workers unless HAULAGE_CELERYCONFIG names it. Whatever the source,
a value that would break a durability guarantee stops the process at start-up
with the setting's name.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from celery import Celery

from haulage.errors import ConfigError
from haulage.logs import connect_celery
from haulage.settings import get_settings
from haulage.tasks import config as defaults
from haulage.tasks.agreement import connect_agreement
from haulage.tasks.orphans import OrphanSweep

ENV_PREFIX = "HAULAGE_CELERY_"

# Setting -> (rule, check). Each is what the step wrapper's guarantees rest on.
_JSON_ONLY = "must be 'json' (pickle on the wire is arbitrary code execution)"
_REQUIRED: dict[str, tuple[str, Any]] = {
    "task_serializer": (_JSON_ONLY, lambda v: v == "json"),
    "result_serializer": (_JSON_ONLY, lambda v: v == "json"),
    "event_serializer": (_JSON_ONLY, lambda v: v == "json"),
    "accept_content": ("must accept only 'json'", lambda v: list(v or []) == ["json"]),
    "result_accept_content": ("must accept only 'json'", lambda v: list(v or []) == ["json"]),
    "task_acks_late": ("must be True (a message is acknowledged only after its step ran)", lambda v: v is True),
    "task_reject_on_worker_lost": ("must be True (a lost worker gives its message back)", lambda v: v is True),
    "worker_prefetch_multiplier": ("must be 1 (a worker holds no message it is not running)", lambda v: v == 1),
    "task_always_eager": ("must be False (eager tasks bypass the broker and its redelivery)", lambda v: not v),
    "beat_scheduler": (
        "must be 'redbeat.RedBeatScheduler' (two beats would fire the same entry; a file scheduler loses ticks)",
        lambda v: v == "redbeat.RedBeatScheduler",
    ),
}


def module_settings(module: ModuleType) -> dict[str, Any]:
    """The Celery settings a deployment's module defines: its public lowercase names."""
    return {
        name: value
        for name, value in vars(module).items()
        if name.islower() and not name.startswith("_") and not isinstance(value, ModuleType) and not callable(value)
    }


def env_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """HAULAGE_CELERY_<NAME>=value settings (JSON when the value parses as JSON, else the string)."""
    found: dict[str, Any] = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and raw:
            try:
                found[name[len(ENV_PREFIX) :].lower()] = json.loads(raw)
            except ValueError:
                found[name[len(ENV_PREFIX) :].lower()] = raw
    return found


def check_settings(conf: Mapping[str, Any], *, source: str = "the Celery settings") -> None:
    """Raise ConfigError naming the first durability-critical setting with an unsafe value."""
    for name, (rule, ok) in _REQUIRED.items():
        value = conf.get(name)
        if not ok(value):
            raise ConfigError(f"Celery setting {name} {rule}, got {value!r} (from {source})")
    options = conf.get("broker_transport_options") or {}
    visibility = options.get("visibility_timeout")
    limit = get_settings().max_countdown
    if not isinstance(visibility, int | float) or visibility <= limit:
        raise ConfigError(
            "Celery setting broker_transport_options['visibility_timeout'] must be a number of seconds above "
            f"HAULAGE_MAX_COUNTDOWN ({limit:g}): a retry countdown held unacked past it runs twice, got {visibility!r}"
        )


def build_app() -> Celery:
    """Haulage's Celery app: defaults, then HAULAGE_CELERYCONFIG's module, then HAULAGE_CELERY_* values."""
    celery_app = Celery("haulage")
    celery_app.config_from_object(defaults)
    overrides: dict[str, Any] = {}
    sources = []
    module_name = get_settings().celery_config
    if module_name:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"HAULAGE_CELERYCONFIG names {module_name!r}, which cannot be imported: {exc}") from exc
        overrides.update(module_settings(module))
        sources.append(f"HAULAGE_CELERYCONFIG={module_name}")
    from_env = env_settings(os.environ)
    overrides.update(from_env)
    sources.extend(f"{ENV_PREFIX}{name.upper()}" for name in from_env)
    for name in ("broker_transport_options", "result_backend_transport_options"):
        # Added to Haulage's options, not replacing them: dropping global_keyprefix would move the queues.
        if isinstance(overrides.get(name), dict):
            overrides[name] = {**getattr(defaults, name), **overrides[name]}
    if overrides:
        celery_app.conf.update(overrides)
    check_settings(celery_app.conf, source=", ".join(sources) or "Haulage's defaults")
    # Every worker marks the messages it holds and takes turns putting back those of dead workers.
    celery_app.steps["consumer"].add(OrphanSweep)
    return celery_app


app = build_app()
connect_celery()  # worker and beat log lines carry run id, step key, attempt and backend
connect_agreement()  # workers announce the settings a run's starter must share (tasks/agreement.py)
