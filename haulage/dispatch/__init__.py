"""Where a step executes: local worker queues, or Cloud Run Jobs with a visible fallback.

- :mod:`haulage.dispatch.routing`: which backend a step goes to (``backend_for``, ``driver_queue_for``);
- :mod:`haulage.dispatch.dispatcher`: ``signature_for``, every plan node's signature;
- :mod:`haulage.dispatch.driver`: the Cloud Run driver task, and ``cancel_executions(run_id)``;
- :mod:`haulage.dispatch.cloudrun`: the google-cloud-run client wrapper;
- :mod:`haulage.dispatch.handoff`: the step's message and error report, passed through coordination;
- :mod:`haulage.dispatch.job`: the job container's entrypoint, ``python -m haulage.dispatch.job``;
- :mod:`haulage.devtools.local_cloudrun`: a local Cloud Run Jobs server for development and tests.

The local queues are the Celery side's (:mod:`haulage.tasks.queues`). This
package imports none of the modules above eagerly: the local server and the
job container should not pay for the Celery app, and the worker imports the
driver through its Celery ``imports`` setting.
"""

from __future__ import annotations

from haulage.dispatch.routing import CLOUDRUN, LOCAL, LOCAL_FALLBACK, backend_for, driver_queue_for

__all__ = ["backend_for", "driver_queue_for", "LOCAL", "CLOUDRUN", "LOCAL_FALLBACK"]
