"""Recurring runs: ``@workflow(..., schedule=...)`` entries for Celery beat.

Beat runs with the Redis-backed RedBeat scheduler, whose lock lets only one
beat process fire at a time. Even a doubled beat (two processes with two
locks, or a lock that expired under a stalled beat) makes one run per tick:
each scheduled run's idempotency key is derived from (schedule name, tick).
Those keys are the scheduler's own: the run id includes the creator
(``SCHEDULER``), and keys sent over HTTP live under ``api:<uid>:``, so no
caller can occupy a tick's run ahead of beat.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import signals
from celery.schedules import crontab, schedule

from haulage.tasks.app import app
from haulage.workflows import reaper, registry, retention  # noqa: F401 - reaper, retention: their beat entries
from haulage.workflows.maintenance import MAINTENANCE
from haulage.workflows.workflow import SCHEDULER

log = logging.getLogger("haulage.schedules")


def tick_of(spec: Any, at: float) -> str:
    """The schedule tick that a firing at ``at`` belongs to.

    Rounded to the nearest tick, not floored: two beats firing a moment before
    and a moment after the due time agree on the tick.
    """
    if isinstance(spec, crontab):
        return datetime.fromtimestamp(round(at / 60) * 60, UTC).strftime("%Y%m%dT%H%M")
    seconds = spec.run_every.total_seconds() if isinstance(spec, schedule) else float(spec)
    return str(math.floor(at / seconds + 0.5))


def beat_schedule() -> dict[str, dict[str, Any]]:
    """Entries for every scheduled workflow (load the modules first) and the maintenance jobs."""
    entries = dict(MAINTENANCE)
    for wf in registry.all_workflows():
        if wf.schedule is None:
            continue
        spec = wf.schedule if isinstance(wf.schedule, crontab | schedule) else timedelta(seconds=float(wf.schedule))
        entries[f"workflow:{wf.name}"] = {
            "task": "haulage.start_scheduled",
            "schedule": spec,
            "kwargs": {"workflow": wf.name, "schedule_name": f"workflow:{wf.name}"},
            "options": {"queue": "short"},
        }
    return entries


@signals.before_task_publish.connect
def stamp_firing_time(sender: str | None = None, body: Any = None, **_: Any) -> None:
    """Beat's publish of a scheduled start carries the moment it fired.

    The tick must come from when beat fired, not from when a worker got to the
    message: behind a backlog a late start would name the next tick (a gap,
    and the next firing then a duplicate key, so a run lost).
    """
    if sender != "haulage.start_scheduled" or not isinstance(body, tuple | list) or len(body) < 2:
        return
    kwargs = body[1]
    if isinstance(kwargs, dict):
        kwargs.setdefault("fired_at", time.time())


@app.task(name="haulage.start_scheduled", typing=False, max_retries=None)
def start_scheduled(workflow: str, schedule_name: str, fired_at: float | None = None) -> str:
    """Start one scheduled run; the same tick always names the same run."""
    wf = registry.get(workflow)
    tick = tick_of(wf.schedule, fired_at if fired_at is not None else time.time())
    run = wf.start(idempotency_key=f"{schedule_name}:{tick}", tags=["scheduled", schedule_name],
                   created_by=SCHEDULER, **(wf.schedule_params or {}))  # fmt: skip
    log.info("scheduled run %s of %s for tick %s", run.id, workflow, tick)
    return run.id
