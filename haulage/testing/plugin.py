"""The pytest fixtures of :mod:`haulage.testing` (registered by the ``pytest11`` entry point ``haulage``).

Nothing here imports the Celery app when pytest loads the plugin: the app is
built, or re-pointed at the session's Redis, only when a fixture runs.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from haulage.devtools.redis_server import free_port, start_redis
from haulage.testing.settings import apply_settings, release_app

#: queues the in-process worker serves by default: all of Haulage's (steps, fan-outs, finishing, drivers)
QUEUES = ("short", "long", "dispatch")


@pytest.fixture(scope="session")
def haulage_env() -> dict[str, str]:
    """HAULAGE_* variables applied with the session's Redis; override in conftest.py to add your own."""
    return {}


@pytest.fixture(scope="session")
def haulage_redis(tmp_path_factory: pytest.TempPathFactory, haulage_env: dict[str, str]) -> Iterator[str]:
    """A redis-server of the session's own on a free port; its URL, applied to Haulage's settings and app."""
    data = tmp_path_factory.mktemp("haulage-redis")
    port = free_port()
    proc = start_redis(data, port, appendonly=False)
    url = f"redis://127.0.0.1:{port}/0"
    apply_settings({"HAULAGE_REDIS_URL": url, "HAULAGE_BROKER_URL": url, "HAULAGE_RESULT_BACKEND": url,
                    **haulage_env})  # fmt: skip
    yield url
    app_module = sys.modules.get("haulage.tasks.app")
    if app_module is not None:
        release_app(app_module.app)
    _stop(proc)


@pytest.fixture(scope="session")
def haulage_app(haulage_redis: str) -> Any:
    """Haulage's Celery app, on the session's Redis, with the modules of HAULAGE_MODULES loaded."""
    # Imported now, not with the plugin: building the app reads the settings the Redis fixture applied.
    app = importlib.import_module("haulage.tasks.app").app
    importlib.import_module("haulage.workflows.registry").load_modules()
    for module in app.conf.imports:  # the engine's own tasks (fan-out, finish, drivers) register on import
        importlib.import_module(module)
    return app


@pytest.fixture(scope="session")
def haulage_worker(haulage_app: Any) -> Iterator[Any]:
    """A real Celery worker on Haulage's app in threads of the test process, serving all Haulage queues.

    Steps run here, so a test can set breakpoints in them. Time limits need the prefork pool:
    test those with a ``haulage worker`` subprocess.
    """
    # No ping check: it needs Celery's test task `celery.ping`, which Haulage's app does not register.
    with start_worker(haulage_app, pool="threads", concurrency=4, queues=list(QUEUES), perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=10) as worker:  # fmt: skip
        yield worker


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # No persistence to flush (appendonly off, no snapshots): SIGTERM ends it at once.
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


__all__ = ["haulage_env", "haulage_redis", "haulage_app", "haulage_worker"]
