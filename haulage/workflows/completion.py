"""Completion events: when a run ends, tell subscribers and start its follow-up.

The engine sends ``haulage.run_ended`` (by name, from whichever layer ended
the run) after every terminal transition. That task publishes a completion
event through the configured publisher (Redis pub/sub by default; any object
with ``publish(event)`` can stand in, e.g. a Google Pub/Sub publisher) and, for
a run that ended COMPLETE, starts the workflow's ``on_complete`` follow-up.
The follow-up's idempotency key is derived from the finished run, so a
repeated notice never starts it twice.

Then ``haulage.settle`` waits for the steps still RUNNING when the run ended
(a cancel does not stop a step mid-call) to land, and sets the document's
``settled`` marker: the one change a terminal run document takes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Protocol

from haulage.coordination import get_coordination
from haulage.errors import ConfigError, HaulageError
from haulage.progress import get_store
from haulage.progress.models import RunRecord, RunStatus, RunUpdate, StepStatus
from haulage.tasks.app import app
from haulage.workflows import registry
from haulage.workflows.run import Run

log = logging.getLogger("haulage.completion")


class CompletionPublisher(Protocol):
    def publish(self, event: dict[str, Any]) -> None: ...


class RedisPublisher:
    """Publishes each event as JSON on the Redis channel ``<prefix>:run-completed``."""

    def publish(self, event: dict[str, Any]) -> None:
        get_coordination().publish_completion(event)


@functools.cache
def get_publisher() -> CompletionPublisher:
    """HAULAGE_COMPLETION_PUBLISHER: "redis" (default), "none", or "package.module:factory"."""
    choice = os.environ.get("HAULAGE_COMPLETION_PUBLISHER", "").strip() or "redis"
    if choice == "redis":
        return RedisPublisher()
    if choice == "none":
        return _Silent()
    module, _, attr = choice.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"HAULAGE_COMPLETION_PUBLISHER: cannot load {choice!r}: {exc}") from exc
    return factory()  # type: ignore[no-any-return,unused-ignore]


class _Silent:
    def publish(self, event: dict[str, Any]) -> None:
        return None


def completion_event(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "workflow": run.workflow,
        "status": run.status.value,
        "created_by": run.created_by,
        "tags": run.tags,
        "steps": {"total": run.steps.total, "done": run.steps.done, "failed": run.steps.failed},
        "error": run.error,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


@app.task(name="haulage.run_ended", typing=False, max_retries=5, default_retry_delay=5)
def run_ended(run_id: str) -> dict[str, Any] | None:
    run = get_store().get_run(run_id)
    if run is None or not run.terminal:
        return None
    event = completion_event(run)
    get_publisher().publish(event)
    settle_run.apply_async(kwargs={"run_id": run_id}, queue="short")
    wf = registry.get(run.workflow) if run.workflow in registry.names() else None
    if wf is not None and wf.on_complete and run.status is RunStatus.COMPLETE:
        follow = registry.get(wf.on_complete)
        results = Run(run_id).results()
        params = wf.on_complete_params(event, results) if wf.on_complete_params else {}
        try:
            nxt = follow.start(idempotency_key=f"on_complete:{run_id}", created_by=run.created_by,
                               tags=[*run.tags, f"after:{run_id}"], **params)  # fmt: skip
        except HaulageError as exc:
            log.error("follow-up %s of run %s could not start: %s", wf.on_complete, run_id, exc)
        else:
            event["follow_up"] = nxt.id
            log.info("run %s ended COMPLETE; follow-up %s started as %s", run_id, wf.on_complete, nxt.id)
    return event


#: seconds between looks at a run's steps while some still run after its end
SETTLE_POLL = 2.0
#: seconds after which a run is marked settled even if a step still says RUNNING (its worker died)
SETTLE_LIMIT = 600.0


@app.task(name="haulage.settle", bind=True, typing=False, max_retries=None)
def settle_run(task: Any, run_id: str, waited: float = 0.0) -> bool:
    """Set ``settled`` on an ended run once none of its steps is RUNNING (or after SETTLE_LIMIT seconds)."""
    store = get_store()
    run = store.get_run(run_id)
    if run is None or not run.terminal or run.settled:
        return False
    running = [s.key for s in store.list_steps(run_id) if s.status is StepStatus.RUNNING]
    if running and waited < SETTLE_LIMIT:
        raise task.retry(countdown=SETTLE_POLL, kwargs={"run_id": run_id, "waited": waited + SETTLE_POLL})
    if running:
        log.warning("run %s marked settled with step(s) still RUNNING after %.0fs: %s", run_id, waited,
                    ", ".join(running[:10]))  # fmt: skip
    store.update_run(run_id, RunUpdate(set={"settled": True}))
    return True
