"""Hard timeouts: a step killed at its hard limit is retried by its policy, never lost.

Celery's own handling of a hard time limit marks the task FAILED and
acknowledges its message: for a fan-out item that would fail the chord (a
failed header task fails the whole fan-in) and lose the item. Instead, the
worker's main process sends the step's next attempt itself (the same message,
chain and chord included, with the attempt number raised and the timeout as
its last error), after the step's backoff, and acknowledges the old one. The
next attempt runs, or, when the policy has no attempts left, records the
timeout as the step's failure (see ``haulage.tasks.durable``).
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery.worker.request import Request
from celery.worker.state import task_ready

from haulage.progress import get_store
from haulage.tasks.records import record_retry
from haulage.tasks.step import get_step

log = logging.getLogger("haulage.timeouts")


class StepRequest(Request):
    """Celery calls both on_timeout and on_failure for a hard time limit, in either order: handle it once."""

    _timed_out = False

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if soft:
            return super().on_timeout(soft, timeout)
        self._next_attempt(timeout)
        return None

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # unwrap ExceptionWithTraceback
        if isinstance(exc, TimeLimitExceeded):
            self._next_attempt(exc.args[0] if exc.args else 0)
            return None
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _next_attempt(self, timeout: float) -> None:
        if self._timed_out:
            return
        self._timed_out = True
        task_ready(self)
        kwargs = dict(self.kwargs or {})
        flow = dict(kwargs.get("flow") or {})
        attempt = int(flow.get("attempt", 1))
        step = get_step(self.task.name)
        message = f"hard time limit of {float(timeout):g}s exceeded"
        flow.update(attempt=attempt + 1, last_error=["TimeLimitExceeded", message])
        kwargs["flow"] = flow
        countdown = 0.0 if step.policy.exhausted(attempt) else step.policy.countdown(attempt)
        log.error("step %s of run %s: attempt %d: %s; its pool process was killed; next: attempt %d in %.1fs",
                  kwargs.get("key"), kwargs.get("run_id"), attempt, message, attempt + 1, countdown)  # fmt: skip
        if not step.policy.exhausted(attempt) and kwargs.get("run_id") and kwargs.get("key"):
            try:  # QUEUED with retry_at: the reaper leaves the run alone during the backoff
                record_retry(get_store(), kwargs["run_id"], step, kwargs["key"], attempt, "TimeLimitExceeded",
                             message, countdown, self.id)  # fmt: skip
            except Exception as exc:  # the next attempt matters more than the note
                log.warning("could not record the timeout of step %s: %s", kwargs.get("key"), exc)
        sig = self.task.signature_from_request(request=self._context, args=self.args, kwargs=kwargs,
                                               countdown=countdown)  # fmt: skip
        sig.apply_async()
        self.acknowledge()
