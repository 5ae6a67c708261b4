"""Haulage's Celery queues, and the local queue each step's messages go to.

``runtime="short"`` steps run on the ``short`` queue, ``runtime="long"`` ones
on ``long``; a step's ``queue=`` option wins over both. The ``dispatch`` queue
carries the small tasks that drive Cloud Run executions
(:mod:`haulage.dispatch.routing` says when a step goes there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

QUEUES = ("short", "long", "dispatch")


def broker_prefix(key_prefix: str) -> str:
    """kombu's ``global_keyprefix`` for HAULAGE_KEY_PREFIX: queue ``short`` is the Redis list ``haulage:short``."""
    return f"{key_prefix}:"


def broker_key(transport_options: Mapping[str, Any], name: str) -> str:
    """The Redis key kombu uses for ``name`` (``"unacked"``, ``"unacked_index"``, a queue) under these options.

    ``name`` may also be an option naming a key (``"unacked_key"``): its value is used.
    """
    key = str(transport_options.get(name, name)) if name.endswith("_key") else name
    return f"{transport_options.get('global_keyprefix', '')}{key}"


class Queued(Protocol):
    runtime: str
    queue: str | None


_routes: dict[str, str] = {}


def route(task_name: str, queue: str) -> None:
    """Send ``task_name``'s messages to ``queue`` when the sender names none (``@step`` calls this)."""
    _routes[task_name] = queue


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, str] | None:
    """Celery router (``task_routes``): a step's queue; None lets Celery's defaults decide."""
    queue = _routes.get(name)
    return {"queue": queue} if queue else None


def queue_for(step: Queued) -> str:
    """The local queue: a step's own ``queue=`` wins; otherwise its runtime names the queue."""
    return step.queue or ("long" if step.runtime == "long" else "short")
