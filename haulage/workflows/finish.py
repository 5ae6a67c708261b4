"""Finishing a run: the ``haulage.finish`` task at the end of every plan's chain.

It records the run's final value as the checkpoint ``end`` (what
``Run.results()`` returns), copies a small summary onto the run document, and
ends the run COMPLETE (percent 100, the only write that shows it; the message
says how many fan-out items failed, in any stage), or FAILED when
``on_failure="fail"`` and the last fan-out had failures.
"""

from __future__ import annotations

from typing import Any

from haulage.jsonutil import dumps
from haulage.progress import get_store
from haulage.progress.models import Checkpoint, Event, RunRecord, RunStatus, RunUpdate, StageKind, now
from haulage.tasks.app import app
from haulage.tasks.checkpoints import build_input, input_keys
from haulage.tasks.ending import end_run, policy_blocks, results_summary
from haulage.tasks.fan_in import resolve_or_retry
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
    prev = resolve_or_retry(task, args[0] if args else None)  # after a fan-out: the fan-in's references
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
    message = completion_message(store.get_run(run_id))
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


def completion_message(run: RunRecord | None) -> str:
    """ "complete", or with the fan-out items that failed: "complete, 4 of 30 items failed" (whatever came after)."""
    if run is None:
        return "complete"
    fanned = [s for s in run.stages if s.kind == StageKind.FAN_OUT.value]
    failed = sum(s.failed for s in fanned)
    if not failed:
        return "complete"
    total = sum(s.total or 0 for s in fanned)
    return f"complete, {failed} of {total} item{'s' if total != 1 else ''} failed"


def _counters_landed(store: Any, run_id: str) -> bool:
    run = store.get_run(run_id)
    return run is None or run.steps.done + run.steps.failed >= run.steps.total


def _summary(final: Any, results: Results | None) -> Any:
    if results is not None:
        return results_summary(results)
    text = dumps(final)
    return final if len(text) <= SUMMARY_LIMIT else {"truncated": True, "size": len(text)}
