"""The dispatcher: every node of a plan gets its signature here, for the backend it runs on.

A step that runs locally is its own Celery task on its local queue
(:mod:`haulage.tasks.queues`); one that runs on Cloud Run is the driver task
(:mod:`haulage.dispatch.driver`) on the ``dispatch`` queue, which starts and
follows the execution. :mod:`haulage.dispatch.routing` makes the choice.
"""

from __future__ import annotations

from typing import Any

from celery.canvas import Signature

from haulage.dispatch.driver import drive_execution
from haulage.dispatch.routing import CLOUDRUN, backend_for, driver_queue_for
from haulage.tasks.definition import Step
from haulage.tasks.flow import Flow
from haulage.tasks.queues import queue_for


def signature_for(step: Step, *, run_id: str, key: str, params: dict[str, Any], flow: Flow) -> Signature:
    """The signature of one node of a plan: the step's task on its local queue, or its Cloud Run driver."""
    # The shadow name is what Flower and the logs show: "workflow.step", readable at a glance.
    shadow = f"{flow.get('workflow', '')}.{step.name}"
    if backend_for(step) == CLOUDRUN:
        return drive_execution.s(run_id=run_id, key=key, params=params, flow=flow, step=step.name).set(
            queue=driver_queue_for(step), shadow=f"{shadow}@cloudrun"
        )
    return step.task.s(run_id=run_id, key=key, params=params, flow=flow).set(queue=queue_for(step), shadow=shadow)
