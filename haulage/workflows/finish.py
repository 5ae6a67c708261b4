"""Finishing a run: the ``haulage.finish`` task at the end of every plan's chain.

It records the run's final value as the checkpoint ``end`` (what
``Run.results()`` returns), copies a small summary onto the run document, and
ends the run COMPLETE, or FAILED when ``on_failure="fail"`` and the last
fan-out had failures.
"""

from __future__ import annotations

from typing import Any

from haulage.jsonutil import dumps
from haulage.progress import get_store
from haulage.progress.models import Checkpoint, Event, RunStatus, RunUpdate, now
from haulage.tasks.app import app
from haulage.tasks.checkpoints import build_input, input_keys
from haulage.tasks.ending import end_run, policy_blocks, results_summary
from haulage.tasks.flow import Flow
from haulage.tasks.results import Results

#: seconds between looks while waiting for a coalescing store's counters to land
SETTLE_POLL = 0.5
#: the checkpoint key of a run's final value
RESULT_KEY = "end"
#: a final value up to this size (JSON characters) is copied into the run document's summary
SUMMARY_LIMIT = 4096


@app.task(name="haulage.finish", bind=True, typing=False, max_retries=None)
def finish_run(task: Any, *args: Any, run_id: str, flow: Flow, settled_for: float = 0.0) -> Any:
    """Record the run's final value and end it COMPLETE (or FAILED under on_failure="fail")."""
    store = get_store()
    prev = args[0] if args else None
    status, cps = store.load_step_state(run_id, input_keys(flow, prev))
    if status is None or status.terminal:
        return None
    if settled_for < store.settle_seconds and not _counters_landed(store, run_id):
        # A coalescing store (Firestore) may still hold other workers' counter updates;
        # the final document should show them, so wait for them, briefly.
        raise task.retry(countdown=SETTLE_POLL, kwargs={"run_id": run_id, "flow": flow,
                                                        "settled_for": settled_for + SETTLE_POLL})  # fmt: skip
    inputs, results = build_input(flow, prev, cps)
    if policy_blocks(store, run_id, flow, results, RESULT_KEY):
        return None
    final = results.to_dict() if results is not None else (inputs[0] if inputs else None)
    store.put_checkpoint(run_id, Checkpoint(RESULT_KEY, RESULT_KEY, final))
    summary = _summary(final, results)
    message = "complete" if results is None or results.ok else f"complete with {len(results.failures)} failure(s)"
    end_run(
        store,
        run_id,
        RunStatus.COMPLETE,
        RunUpdate(
            set={"result": summary, "percent": 100.0, "message": message, "finished_at": now()},
            events=[Event(now(), "complete", message)],
        ),
    )
    return None


def _counters_landed(store: Any, run_id: str) -> bool:
    run = store.get_run(run_id)
    return run is None or run.steps.done + run.steps.failed >= run.steps.total


def _summary(final: Any, results: Results | None) -> Any:
    if results is not None:
        return results_summary(results)
    text = dumps(final)
    return final if len(text) <= SUMMARY_LIMIT else {"truncated": True, "size": len(text)}
