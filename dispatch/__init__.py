"""Where a step executes: local worker queues, or Cloud Run Jobs with a visible fallback.

- :mod:`dispatch.routing`: which backend and queue a step goes to (``queue_for``, ``backend_for``);
- :mod:`dispatch.dispatcher`: ``signature_for`` (every plan node's signature), the Cloud Run
  driver task, and ``cancel_executions(run_id)``;
- :mod:`dispatch.cloudrun`: the google-cloud-run client wrapper;
- :mod:`dispatch.handoff`: the step's message and error report, passed through Redis;
- :mod:`dispatch.job`: the job container's entrypoint, ``python -m dispatch.job``;
- :mod:`dispatch.local_cloudrun`: a local Cloud Run Jobs server for development and tests.

This package imports none of them eagerly: the local server and the job
container should not pay for the Celery app, and the worker imports the
dispatcher through ``tasks.internal``.
"""

from __future__ import annotations

from dispatch.routing import CLOUDRUN, LOCAL, LOCAL_FALLBACK, QUEUES, backend_for, driver_queue_for, queue_for

__all__ = ["QUEUES", "queue_for", "driver_queue_for", "backend_for", "LOCAL", "CLOUDRUN", "LOCAL_FALLBACK"]
