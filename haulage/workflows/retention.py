"""Retention: remove finished runs older than HAULAGE_RETENTION_DAYS, with everything under them.

A beat job (every HAULAGE_RETENTION_INTERVAL seconds) deletes the run
document, its steps, checkpoints and guards from the store, and what the
coordination seam keeps beside it (stage counters, item ledgers), in either backend.
"""

from __future__ import annotations

import logging

from haulage.coordination import get_coordination
from haulage.progress import get_store
from haulage.progress.models import TERMINAL, now
from haulage.settings import get_settings
from haulage.tasks.app import app
from haulage.workflows.maintenance import MAINTENANCE

log = logging.getLogger("haulage.retention")


def retention_days() -> float:
    return get_settings().retention_days


def purge_finished(*, older_than_seconds: float | None = None, batch: int = 10_000) -> list[str]:
    """Delete runs that ended more than ``older_than_seconds`` ago; return their ids."""
    age = retention_days() * 86400 if older_than_seconds is None else older_than_seconds
    cutoff = now() - age
    store = get_store()
    removed: list[str] = []
    for status in TERMINAL:
        for run in store.list_runs(status=status, limit=batch):
            ended = run.finished_at or run.updated_at
            if ended >= cutoff:
                continue
            store.delete_run(run.id)
            get_coordination().purge_run(run.id)
            removed.append(run.id)
    if removed:
        log.info("retention removed %d finished run(s) older than %.0fs", len(removed), age)
    return removed


@app.task(name="haulage.retention", typing=False, max_retries=None)
def retention_task() -> int:
    return len(purge_finished())


MAINTENANCE["haulage:retention"] = {
    "task": "haulage.retention",
    "schedule": get_settings().retention_interval,
    "options": {"queue": "short"},
}
