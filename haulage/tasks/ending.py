"""Ending a run: the one way to move a run to a terminal status.

After the transition it sends ``haulage.run_ended`` by name, so completion
events and follow-ups (workflows/completion.py) happen whichever layer ended
the run, without the Celery side importing the workflow layer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from haulage.progress.models import ACTIVE, RunStatus, RunUpdate
from haulage.progress.store import Store

log = logging.getLogger("haulage.ending")


def end_run(store: Store, run_id: str, to: RunStatus, update: RunUpdate,
            allowed_from: Collection[RunStatus] = ACTIVE) -> bool:  # fmt: skip
    """Move the run to terminal status ``to`` unless it already ended; announce it if this call did."""
    if not store.transition(run_id, to, allowed_from=allowed_from, update=update):
        return False
    announce(run_id)
    return True


def announce(run_id: str) -> None:
    from haulage.tasks.app import app

    try:
        app.send_task("haulage.run_ended", kwargs={"run_id": run_id}, queue="short")
    except Exception as exc:  # the run has ended either way; only its notice is lost
        log.error("could not announce the end of run %s: %s", run_id, exc)
