"""Where a step executes: local worker queues, or Cloud Run Jobs with a visible fallback.

- :mod:`haulage.dispatch.routing`: which backend and queue a step goes to (``queue_for``, ``backend_for``);
- :mod:`haulage.dispatch.dispatcher`: ``signature_for`` (every plan node's signature), the Cloud Run
  driver task, and ``cancel_executions(run_id)``;
- :mod:`haulage.dispatch.cloudrun`: the google-cloud-run client wrapper;
- :mod:`haulage.dispatch.handoff`: the step's message and error report, passed through Redis;
- :mod:`haulage.dispatch.job`: the job container's entrypoint, ``python -m haulage.dispatch.job``;
- :mod:`haulage.devtools.local_cloudrun`: a local Cloud Run Jobs server for development and tests.

This package imports none of them eagerly: the local server and the job
container should not pay for the Celery app, and the worker imports the
dispatcher through ``haulage.tasks.internal``.
"""

from __future__ import annotations

from haulage.dispatch.routing import CLOUDRUN, LOCAL, LOCAL_FALLBACK, QUEUES, backend_for, driver_queue_for, queue_for

__all__ = ["QUEUES", "queue_for", "driver_queue_for", "backend_for", "LOCAL", "CLOUDRUN", "LOCAL_FALLBACK"]
