"""Where a step runs: on a local worker queue, or as a Cloud Run Job driven from the ``dispatch`` queue.

``runtime="short"`` steps run on the local ``short`` queue. ``runtime="long"``
steps run as Cloud Run Jobs when HAULAGE_DISPATCH_MODE is ``cloudrun`` (driven
by a small task on the ``dispatch`` queue), else on the local ``long`` queue.
A step's ``dispatch=`` option pins the backend whatever its runtime and the
mode say; its ``queue=`` option names the queue of every Celery task that works
on it (its local run, a fallback, and the task that drives its Cloud Run
execution), so that one pool of workers owns the step.

The choice is made where the signature is built (the process that starts the
run, or the worker that expands a fan-out), so HAULAGE_DISPATCH_MODE must be
the same there and on the workers. The local queues themselves are the Celery
side's (:mod:`haulage.tasks.queues`).
"""

from __future__ import annotations

from typing import Protocol

from haulage.settings import get_settings

LOCAL = "local"
CLOUDRUN = "cloudrun"
#: recorded on a step that should have gone to Cloud Run but ran on a local queue
LOCAL_FALLBACK = "local-fallback"


class Routable(Protocol):
    runtime: str
    queue: str | None
    dispatch: str | None


def driver_queue_for(step: Routable) -> str:
    """The queue of the task that drives a step's Cloud Run execution."""
    return step.queue or "dispatch"


def backend_for(step: Routable, mode: str | None = None) -> str:
    """``"cloudrun"`` or ``"local"``: the step's ``dispatch=`` option, else its runtime under the dispatch mode."""
    if step.dispatch is not None:
        return step.dispatch
    if mode is None:
        mode = get_settings().dispatch_mode
    return CLOUDRUN if step.runtime == "long" and mode == CLOUDRUN else LOCAL
