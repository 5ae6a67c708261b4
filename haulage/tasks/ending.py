"""Ending a run: the one way to move a run to a terminal status.

After the transition it sends ``haulage.run_ended`` by name, so completion
events and follow-ups (workflows/completion.py) happen whichever layer ended
the run, without the Celery side importing the workflow layer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from haulage.progress.models import ACTIVE, Event, RunStatus, RunUpdate, now
from haulage.progress.store import Store
from haulage.tasks.app import app
from haulage.tasks.flow import Flow
from haulage.tasks.results import Results

log = logging.getLogger("haulage.ending")

#: failures listed in a run document's result summary
SUMMARY_FAILURES = 100


def end_run(store: Store, run_id: str, to: RunStatus, update: RunUpdate,
            allowed_from: Collection[RunStatus] = ACTIVE) -> bool:  # fmt: skip
    """Move the run to terminal status ``to`` unless it already ended; announce it if this call did."""
    if not store.transition(run_id, to, allowed_from=allowed_from, update=update):
        return False
    announce(run_id)
    return True


def announce(run_id: str) -> None:
    try:
        app.send_task("haulage.run_ended", kwargs={"run_id": run_id}, queue="short")
    except Exception as exc:  # the run has ended either way; only its notice is lost
        log.error("could not announce the end of run %s: %s", run_id, exc)


def fail_run(store: Store, run_id: str, error: str, step_key: str | None = None, result: Any = None) -> bool:
    """End the run FAILED with ``error`` unless it already ended."""
    return end_run(
        store,
        run_id,
        RunStatus.FAILED,
        RunUpdate(
            set={"error": error, "message": error, "finished_at": now(), "result": result},
            events=[Event(now(), "failed", error, step_key)],
        ),
    )


def policy_blocks(store: Store, run_id: str, flow: Flow, results: Results | None, key: str) -> bool:
    """Apply on_failure="fail": a fan-out with failures ends the run before the next stage."""
    if results is None or results.ok or flow["on_failure"] != "fail":
        return False
    first = results.failures[0]
    fail_run(
        store,
        run_id,
        f"{len(results.failures)} of {len(results)} fan-out items failed "
        f"(first: {first.step}: {first.error_type}: {first.message})",
        key,
        result=results_summary(results),
    )
    return True


def results_summary(results: Results) -> dict[str, Any]:
    """What a run document shows of a fan-out's Results: the counts and the first failures."""
    return {
        "successes": len(results.successes),
        "failed": len(results.failures),
        "failures": [f.to_dict() for f in results.failures[:SUMMARY_FAILURES]],
    }
