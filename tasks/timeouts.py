"""Hard timeouts: a step killed at its hard limit is retried by its policy, never lost.

Celery's own handling of a hard time limit marks the task FAILED and
acknowledges its message. For a fan-out item that would break the chord (a
failed header task fails the whole fan-in) and lose the item. Instead, the
worker gives the message back (requeue); the next delivery finds the step's
lock held by a holder whose heartbeat has stopped, takes it over, sees from
the step record that the previous attempt died, and counts that attempt
against the step's retries (see ``tasks.durable``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.request import Request
from celery.worker.state import task_ready

log = logging.getLogger("haulage.timeouts")


class StepRequest(Request):
    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if soft:
            return super().on_timeout(soft, timeout)
        task_ready(self)
        kwargs = self.kwargs or {}
        _mark_timed_out(kwargs, timeout)
        log.error("step %s of run %s exceeded its hard time limit (%ss); its pool process was killed; "
                  "the message goes back to the queue", kwargs.get("key"), kwargs.get("run_id"), timeout)  # fmt: skip
        self.reject(requeue=True)
        return None


def _mark_timed_out(kwargs: dict[str, Any], timeout: float) -> None:
    """Leave the cause on the step record, for the delivery that takes over the lock."""
    from progress import get_store
    from progress.models import StepStatus

    run_id, key = kwargs.get("run_id"), kwargs.get("key")
    if not run_id or not key:
        return
    try:
        store = get_store()
        record = store.get_step(run_id, key)
        if record is not None and record.status is StepStatus.RUNNING:
            record.status = StepStatus.QUEUED
            record.error_type = "TimeLimitExceeded"
            record.error = f"hard time limit of {timeout:g}s exceeded"
            store.put_step(run_id, record)
    except Exception as exc:  # the requeue matters more than the note
        log.warning("could not record the timeout of step %s of run %s: %s", key, run_id, exc)
