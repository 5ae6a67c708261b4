"""Applying HAULAGE_* settings inside a running test process.

Haulage reads its settings once and builds its Celery app the first time
``haulage.tasks`` is imported: a user's conftest.py that imports its workflows
at the top builds the app against the default Redis before any fixture runs.
:func:`apply_settings` sets the variables, forgets every cached client (the
settings, the Redis client, the store, Cloud Run, the completion publisher)
and, if the app already exists, gives it the new broker, backend and key
prefix before a worker or a run uses it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from haulage.progress import reset_store
from haulage.redis_client import reset_redis
from haulage.settings import get_settings, reset_settings


def apply_settings(env: Mapping[str, str]) -> None:
    """Set ``env`` in ``os.environ`` and make Haulage (settings, clients, the Celery app) use it from now on."""
    os.environ.update(env)
    reset_settings()
    reset_redis()
    reset_store()
    # Loaded only if something already imported them; nothing here builds the Celery app.
    cloudrun = sys.modules.get("haulage.dispatch.cloudrun")
    if cloudrun is not None:
        cloudrun.reset_cloudrun()
    completion = sys.modules.get("haulage.workflows.completion")
    if completion is not None:
        completion.get_publisher.cache_clear()
    app_module = sys.modules.get("haulage.tasks.app")
    if app_module is not None:
        _reconfigure(app_module.app)


def _reconfigure(app: Any) -> None:
    config = sys.modules["haulage.tasks.config"]
    app.conf.update(config.from_settings(get_settings()))
    release_app(app)


def release_app(app: Any) -> None:
    """Close the app's connections to Redis and forget them (before that Redis stops, or moves).

    A client that started runs is subscribed to their Celery results; left open when Redis
    stops, that subscription retries for 20 s at exit ("Retry limit exceeded ... result store").
    """
    backend = getattr(app, "_backend_cache", None) or getattr(app._local, "backend", None)
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        consumer._pubsub = None
        consumer.subscribed_to.clear()
    # Celery caches its connection pool and result backend on first use; these are the
    # attributes its own after-fork cleanup resets (celery.app.base.Celery._after_fork).
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    app._backend_cache = None
    app._local = threading.local()
