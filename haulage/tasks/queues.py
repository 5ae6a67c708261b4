"""Haulage's Celery queues, and the local queue each step's messages go to.

``runtime="short"`` steps run on the ``short`` queue, ``runtime="long"`` ones
on ``long``; a step's ``queue=`` option wins over both. The ``dispatch`` queue
carries the small tasks that drive Cloud Run executions
(:mod:`haulage.dispatch.routing` says when a step goes there).
"""

from __future__ import annotations

from typing import Protocol

QUEUES = ("short", "long", "dispatch")


class Queued(Protocol):
    runtime: str
    queue: str | None


def queue_for(step: Queued) -> str:
    """The local queue: a step's own ``queue=`` wins; otherwise its runtime names the queue."""
    return step.queue or ("long" if step.runtime == "long" else "short")
